"""`captioner worker` chooses its Celery pool from the queues it serves: a maintenance-only worker
runs on a pool that enforces time limits (prefork), never solo or threads; caption workers keep
their solo or pipelined threads pool; training runs on a worker of its own."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from captioner.cli.worker import (
    LIMITED_POOLS,
    MAINTENANCE_CONCURRENCY,
    PoolRefused,
    choose_pool,
    queue_set,
)
from captioner.cli.worker import worker as worker_command
from captioner.settings import Settings

CPU = Settings(device="cpu")
CUDA = Settings(device="cuda:0")


@pytest.mark.parametrize(
    ("queues", "settings", "expected"),
    [
        ("maintenance", CPU, ("prefork", MAINTENANCE_CONCURRENCY)),
        (" maintenance ,", CUDA, ("prefork", MAINTENANCE_CONCURRENCY)),
        ("train", CPU, ("solo", 1)),
        ("train", CUDA, ("solo", 1)),
        ("caption.interactive,caption", CPU, ("solo", 1)),
        ("caption.interactive,caption", CUDA, ("threads", 2)),
        ("caption", Settings(device="cpu", worker_pipeline_depth=3), ("threads", 3)),
    ],
)
def test_default_pool_for_each_queue_set(queues, settings, expected):
    assert choose_pool(None, None, queues, settings) == expected


def test_a_maintenance_worker_never_gets_a_pool_without_time_limits():
    assert "prefork" in LIMITED_POOLS and not {"solo", "threads"} & LIMITED_POOLS
    for pool in ("solo", "threads"):
        with pytest.raises(PoolRefused, match="no time limits"):
            choose_pool(pool, None, "maintenance", CPU)
    assert choose_pool("prefork", 2, "maintenance", CPU) == ("prefork", 2)
    assert choose_pool(None, 8, "maintenance", CPU) == ("prefork", 8)


def test_the_cli_refuses_solo_for_maintenance_before_starting_anything():
    result = CliRunner().invoke(worker_command, ["-Q", "maintenance", "--pool", "solo"])
    assert result.exit_code == 2
    assert "enforces no time limits" in result.output


def test_explicit_pools_and_concurrency_are_kept_for_other_workers():
    assert choose_pool("solo", None, "train", CPU) == ("solo", 1)
    assert choose_pool("threads", None, "caption", CUDA) == ("threads", 2)
    assert choose_pool("threads", 5, "caption", CPU) == ("threads", 5)
    assert choose_pool("prefork", None, "caption", CPU) == ("prefork", 1)


def test_maintenance_sharing_a_pool_is_named_in_the_log(caplog):
    # The single-machine stack serves every queue from one worker: allowed, but said.
    everything = "caption.interactive,caption,maintenance,train"
    with caplog.at_level(logging.WARNING, logger="captioner.worker"):
        assert choose_pool(None, None, everything, CPU) == ("solo", 1)
    assert "without time limits" in caplog.text and "-Q maintenance" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioner.worker"):
        choose_pool(None, None, "maintenance", CPU)
        choose_pool(None, None, "caption", CPU)
    assert caplog.text == ""


def test_queue_set_reads_the_option_as_given():
    assert queue_set("caption.interactive, caption,,maintenance") == {
        "caption.interactive",
        "caption",
        "maintenance",
    }
