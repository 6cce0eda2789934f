"""`captioner worker` and `captioner beat`: `celery worker|beat` with this project's defaults.

A caption worker is one process per device: the model is loaded once, lazily, and CUDA is never
initialised before a fork. By default it is pipelined on CUDA: `--pool=threads` with
`--concurrency` = `CAPTIONER_WORKER_PIPELINE_DEPTH` (2 on CUDA), so while one batch runs the
model the next is fetched and decoded and the last one saved, all sharing the one model (see
`workers.caption`). On the CPU, or with a depth of 1, it is `--pool=solo`, one batch at a time.

Maintenance (the sweeper, ingestion, webhook deliveries) runs on a pool that enforces Celery's
time limits (`task_soft_time_limit` / `task_time_limit`, set in `workers.celery_app`): a
`-Q maintenance` worker is `--pool=prefork` (the solo and threads pools enforce none, so they
are refused). Training gets a worker of its own (`-Q train`, solo: a run is long and has no
time limit), so one hostile webhook or listing cannot stall retraining and a training run
cannot hold up the sweeper. Run one worker per GPU with `CAPTIONER_DEVICE=cuda:N`, one
`captioner worker -Q train`, one `captioner worker -Q maintenance`, and one `captioner beat`
per deployment.
"""

from __future__ import annotations

import logging
import os
import socket

import click

DEFAULT_CAPTION_QUEUES = "caption.interactive,caption,maintenance"
CAPTION_QUEUES = frozenset({"caption", "caption.interactive"})
MAINTENANCE_QUEUE = "maintenance"
# Celery pools that enforce the soft and hard time limits (solo and threads enforce none).
LIMITED_POOLS = frozenset({"prefork", "gevent", "eventlet"})
# Maintenance tasks at once on a maintenance worker by default: the sweeper, ingestion and
# webhook deliveries, each bounded by the time limits, so a slow one holds only its own slot.
MAINTENANCE_CONCURRENCY = 4

log = logging.getLogger("captioner.worker")


class PoolRefused(ValueError):
    """A pool that would run a maintenance worker's tasks without time limits."""


def resolve_pipeline_depth(settings) -> int:
    """Batches a caption worker works on at once: `Settings.worker_pipeline_depth`, else 2 on
    CUDA and 1 on the CPU (where decoding and the model compete for the same cores)."""
    if settings.worker_pipeline_depth is not None:
        return settings.worker_pipeline_depth
    device = settings.device
    if device == "auto":  # torch only to resolve it; solo and threads pools never fork
        from core_model.inference import resolve_device

        device = resolve_device(device).type
    return 2 if device.startswith("cuda") else 1


def queue_set(queues: str) -> frozenset[str]:
    """The queue names of a `--queues` value."""
    return frozenset(q.strip() for q in queues.split(",") if q.strip())


def choose_pool(
    pool: str | None, concurrency: int | None, queues: str, settings
) -> tuple[str, int]:
    """(pool, concurrency) for `captioner worker`.

    A maintenance-only worker (`-Q maintenance`): `prefork` with `MAINTENANCE_CONCURRENCY`
    processes unless told otherwise, and only a pool in `LIMITED_POOLS` (else `PoolRefused`).
    Any other worker: what was given, else a pipelined `threads` pool when it consumes a
    caption queue and its pipeline depth is above 1, else solo. A worker that serves
    maintenance next to other queues (the single-machine `captioner run`) keeps that choice,
    with a warning: its maintenance tasks share the pool and run without time limits."""
    names = queue_set(queues)
    if names == {MAINTENANCE_QUEUE}:
        return _maintenance_pool(pool, concurrency)
    chosen = _other_pool(pool, concurrency, bool(CAPTION_QUEUES & names), settings)
    if MAINTENANCE_QUEUE in names:
        log.warning(
            "queues %s: maintenance tasks share this worker's %s pool%s; give them a worker "
            "of their own (-Q maintenance)",
            ",".join(sorted(names)),
            chosen[0],
            "" if chosen[0] in LIMITED_POOLS else " and run without time limits",
        )
    return chosen


def _other_pool(
    pool: str | None, concurrency: int | None, consumes_captions: bool, settings
) -> tuple[str, int]:
    if pool is None:
        depth = resolve_pipeline_depth(settings) if consumes_captions else 1
        pool = "threads" if depth > 1 else "solo"
        return pool, concurrency or (depth if pool == "threads" else 1)
    if concurrency is None:
        threads = pool == "threads" and consumes_captions
        concurrency = resolve_pipeline_depth(settings) if threads else 1
    return pool, concurrency


def _maintenance_pool(pool: str | None, concurrency: int | None) -> tuple[str, int]:
    pool = pool or "prefork"
    if pool not in LIMITED_POOLS:
        raise PoolRefused(
            f"--pool={pool} enforces no time limits; maintenance runs on "
            f"{' or '.join(sorted(LIMITED_POOLS))}"
        )
    return pool, concurrency or MAINTENANCE_CONCURRENCY


def _configure_logging(level: str) -> None:
    # Text or JSON (CAPTIONER_LOG_FORMAT), with job/image ids; Celery logs through it too.
    from captioner.logging import configure_logging, install_celery_logging

    configure_logging(level=level)
    install_celery_logging(level=level)


@click.command()
@click.option(
    "--queues",
    "-Q",
    default=DEFAULT_CAPTION_QUEUES,
    show_default=True,
    help="Queues to consume, polled in this order (interactive before bulk).",
)
@click.option(
    "--name", "-n", default=None, help="Worker node name (default: caption-<pid>@<host>)."
)
@click.option(
    "--pool",
    default=None,
    help="Default: prefork for a maintenance-only worker (-Q maintenance; solo and threads, "
    "which enforce no time limits, are refused there); threads (pipelined batches sharing one "
    "model) when the worker consumes a caption queue and its pipeline depth is above 1; else "
    "solo.",
)
@click.option(
    "--concurrency",
    "-c",
    default=None,
    type=int,
    help=f"Tasks at once. Default: {MAINTENANCE_CONCURRENCY} for a maintenance-only worker, "
    "the pipeline depth for a threads pool, else 1.",
)
@click.option(
    "--pipeline-depth",
    type=click.IntRange(1, 8),
    default=None,
    help="Caption batches worked on at once (overrides CAPTIONER_WORKER_PIPELINE_DEPTH; "
    "default 2 on CUDA, 1 on the CPU).",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Prometheus port (overrides CAPTIONER_METRICS_PORT).",
)
@click.option("--device", default=None, help="auto, cpu, cuda:N (overrides CAPTIONER_DEVICE).")
@click.option(
    "--max-tasks-per-child", type=int, default=None, help="Recycle the process after N batches."
)
def worker(
    queues,
    name,
    pool,
    concurrency,
    pipeline_depth,
    loglevel,
    metrics_port,
    device,
    max_tasks_per_child,
):
    """Run a caption worker: Celery on the configured Redis, one process, model loaded lazily
    (on CUDA, pipelined: the next batch is fetched and decoded while the model runs)."""
    if metrics_port is not None:
        os.environ["CAPTIONER_METRICS_PORT"] = str(metrics_port)
    if device is not None:
        os.environ["CAPTIONER_DEVICE"] = device
    if pipeline_depth is not None:
        os.environ["CAPTIONER_WORKER_PIPELINE_DEPTH"] = str(pipeline_depth)
    from captioner.settings import get_settings, reset_settings

    reset_settings()
    _configure_logging(loglevel)
    try:
        pool, concurrency = choose_pool(pool, concurrency, queues, get_settings())
    except PoolRefused as exc:
        raise click.UsageError(str(exc)) from None
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
        # One message per pool slot: a pipelined worker's next batch arrives while one runs,
        # and no worker hoards more than it can start.
        "--prefetch-multiplier=1",
    ]
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    log.info("starting worker: %s", " ".join(argv[1:]))
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        log.info("worker exited: code %s", exc.code)
        raise
    log.info("worker exited: code 0")


@click.command()
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--schedule-file", default=None, help="Where beat keeps its state (default: in the data dir)."
)
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
