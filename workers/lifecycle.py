"""A worker process's start and stop, each named and logged: `worker ready` (with its device,
batch size and metrics port; the metrics server starts here), `worker stopping` and
`worker stopped`. Connected to Celery's worker signals when the app imports this module
(`workers.celery_app` includes it).
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from captioner.settings import get_settings
from workers import metrics

log = logging.getLogger("captioner.worker")


@worker_ready.connect
def _on_worker_ready(sender=None, **_kwargs) -> None:
    settings = get_settings()
    port = metrics.start_metrics_server(settings.metrics_port)
    log.info(
        "worker ready: %s pid %d, device %s, batch size %d, metrics %s",
        getattr(sender, "hostname", "?"),
        os.getpid(),
        settings.device,
        settings.batch_size,
        f"on port {port}" if port else "off",
    )


@worker_shutting_down.connect
def _on_worker_shutting_down(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    log.info("worker stopping: signal %s, %s shutdown, exit code %s", sig, how, exitcode)


@worker_shutdown.connect
def _on_worker_shutdown(**_kwargs) -> None:
    log.info("worker stopped: pid %d", os.getpid())
