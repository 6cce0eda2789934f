"""`captioner worker` and `captioner beat`: `celery worker|beat` with this project's defaults.

A GPU worker is one process per device (`--pool solo`, concurrency 1): the model is loaded once,
lazily, and CUDA is never initialised before a fork. Run one worker per GPU with
`CAPTIONER_DEVICE=cuda:N`, one `captioner worker -Q maintenance,train` for the sweeper (and
training), and one `captioner beat` per deployment.
"""

from __future__ import annotations

import logging
import os
import socket

import click

DEFAULT_CAPTION_QUEUES = "caption.interactive,caption,maintenance"


def _configure_logging(level: str) -> None:
    # Text or JSON (CAPTIONER_LOG_FORMAT), with job/image ids; Celery logs through it too.
    from captioner.logging import configure_logging, install_celery_logging

    configure_logging(level=level)
    install_celery_logging(level=level)


@click.command()
@click.option(
    "--queues", "-Q", default=DEFAULT_CAPTION_QUEUES, show_default=True,
    help="Queues to consume, polled in this order (interactive before bulk).",
)
@click.option("--name", "-n", default=None, help="Worker node name (default: caption-<pid>@<host>).")
@click.option("--pool", default="solo", show_default=True, help="solo for GPU workers; prefork for CPU-only maintenance.")
@click.option("--concurrency", "-c", default=1, show_default=True, type=int)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (overrides CAPTIONER_METRICS_PORT).")
@click.option("--device", default=None, help="auto, cpu, cuda:N (overrides CAPTIONER_DEVICE).")
@click.option("--max-tasks-per-child", type=int, default=None, help="Recycle the process after N batches.")
def worker(queues, name, pool, concurrency, loglevel, metrics_port, device, max_tasks_per_child):
    """Run a caption worker: Celery on the configured Redis, one process, model loaded lazily."""
    if metrics_port is not None:
        os.environ["CAPTIONER_METRICS_PORT"] = str(metrics_port)
    if device is not None:
        os.environ["CAPTIONER_DEVICE"] = device
    from captioner.settings import reset_settings

    reset_settings()
    _configure_logging(loglevel)
    from workers.entry import app

    argv = [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        f"--hostname={name or f'caption-{os.getpid()}@{socket.gethostname()}'}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--prefetch-multiplier=1",
    ]
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    log = logging.getLogger("captioner.worker")
    log.info("starting worker: %s", " ".join(argv[1:]))
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        log.info("worker exited: code %s", exc.code)
        raise
    log.info("worker exited: code 0")


@click.command()
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--schedule-file", default=None, help="Where beat keeps its state (default: in the data dir).")
def beat(loglevel, schedule_file):
    """Run Celery beat: the sweeper every `CAPTIONER_SWEEP_INTERVAL_SECONDS` (default 60 s)."""
    from captioner.settings import get_settings

    _configure_logging(loglevel)
    from workers.entry import app

    if schedule_file is None:
        data_dir = get_settings().data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        schedule_file = str(data_dir / "celerybeat-schedule")
    app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule_file}"])
