"""Prometheus metrics of a caption worker, served by `start_metrics_server(port)`.

A GPU worker is one process (`--pool solo`), so the default in-process registry is exact; a
prefork pool would need prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR), which
we do not use. Failure reasons are labelled by kind (`NotAnImage`, `ImageTooLarge`,
`not_found`, ...), never by free text, so the label set stays small.
"""

from __future__ import annotations

import logging
import math

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from captioner.tasks import ALL_QUEUES

log = logging.getLogger(__name__)

IMAGES_CAPTIONED = Counter("captioner_images_captioned_total", "Images captioned by this worker.")
IMAGES_FAILED = Counter(
    "captioner_images_failed_total", "Images this worker marked failed, by reason.", ["reason"]
)
BATCHES = Counter("captioner_batches_total", "Caption batches handled, by outcome.", ["outcome"])
BATCH_SECONDS = Histogram(
    "captioner_batch_seconds",
    "Wall time of one caption batch: claim, fetch, decode, model, save.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
MODEL_SECONDS = Histogram(
    "captioner_model_seconds",
    "Model time of one batch (generation only).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUE_DEPTH = Gauge(
    "captioner_queue_depth", "Messages waiting in a queue (read from Redis at scrape).", ["queue"]
)

_server_port: int | None = None


def _depth_reader(queue: str):
    def read() -> float:
        from captioner.tasks import queue_depths

        try:
            return float(queue_depths()[queue])
        except Exception:  # Redis down: report "unknown", never break the scrape
            log.debug("queue depth of %s unavailable", queue, exc_info=True)
            return math.nan

    return read


for _queue in ALL_QUEUES:
    QUEUE_DEPTH.labels(queue=_queue).set_function(_depth_reader(_queue))


def start_metrics_server(port: int) -> int | None:
    """Serve /metrics on `port` once per process (0 = off). Returns the port, or None."""
    global _server_port
    if not port:
        return None
    if _server_port is None:
        start_http_server(port)
        _server_port = port
        log.info("metrics served on port %d", port)
    return _server_port
