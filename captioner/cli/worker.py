"""`captioner worker` and `captioner beat`: `celery worker|beat` with this project's defaults.

A caption worker is one process per device: the model is loaded once, lazily, and CUDA is never
initialised before a fork. By default it is pipelined on CUDA: `--pool=threads` with
`--concurrency` = `CAPTIONER_WORKER_PIPELINE_DEPTH` (2 on CUDA), so while one batch runs the
model the next is fetched and decoded and the last one saved, all sharing the one model (see
`workers.caption`). On the CPU, or with a depth of 1, it is `--pool=solo`, one batch at a time.
Run one worker per GPU with `CAPTIONER_DEVICE=cuda:N`, one `captioner worker -Q
maintenance,train` for the sweeper (and training; a worker that consumes no caption queue is
always `solo`), and one `captioner beat` per deployment.
"""

from __future__ import annotations

import logging
import os
import socket

import click

DEFAULT_CAPTION_QUEUES = "caption.interactive,caption,maintenance"
CAPTION_QUEUES = frozenset({"caption", "caption.interactive"})


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


def choose_pool(
    pool: str | None, concurrency: int | None, queues: str, settings
) -> tuple[str, int]:
    """(pool, concurrency) for `captioner worker`: what was given, else a pipelined `threads`
    pool when the worker consumes a caption queue and its pipeline depth is above 1, else solo."""
    consumes_captions = bool(CAPTION_QUEUES & {q.strip() for q in queues.split(",")})
    if pool is None:
        depth = resolve_pipeline_depth(settings) if consumes_captions else 1
        pool = "threads" if depth > 1 else "solo"
        return pool, concurrency or (depth if pool == "threads" else 1)
    if concurrency is None:
        threads = pool == "threads" and consumes_captions
        concurrency = resolve_pipeline_depth(settings) if threads else 1
    return pool, concurrency


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
    help="Default: threads (pipelined batches sharing one model) when the worker consumes a "
    "caption queue and its pipeline depth is above 1, else solo. prefork only for CPU-only "
    "maintenance.",
)
@click.option(
    "--concurrency",
    "-c",
    default=None,
    type=int,
    help="Tasks at once. Default: the pipeline depth for a threads pool, else 1.",
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
    pool, concurrency = choose_pool(pool, concurrency, queues, get_settings())
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
