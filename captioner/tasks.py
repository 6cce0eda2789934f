"""Every task name, queue and route, and the helpers that publish tasks by name.

Shared by the dashboard, the CLI and the workers; the workers define the task bodies under
these names (`workers/`), and nothing else names a task or a queue.

Redis only wakes workers: a message names a job and a chunk of image ids, nothing else, and
is sent by task *name*, so a publisher never imports the worker code (or torch). Publish only
after the rows are committed: a worker that wakes before the commit would find nothing to
claim, and the sweeper would have to pick the images up later.

Queues go to Redis lists of the same name through the default (nameless) exchange, so a
publisher needs no exchange bindings in Redis: after a FLUSHALL (or a Redis restart without
persistence) publishing still delivers, and the sweeper can re-publish what was lost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from captioner.settings import Settings

TASK_CAPTION_BATCH = "captioner.caption_batch"  # (job_id, image_ids): caption one chunk
TASK_SWEEP = "captioner.sweep"  # (): re-publish lost work, expire leases, finish jobs
TASK_ENUMERATE_PREFIX = "captioner.enumerate_prefix"  # (job_id): list a prefix into the job
TASK_FETCH_URLS = "captioner.fetch_urls"  # (job_id): fetch the job's URLs into the store
TASK_DELIVER_WEBHOOK = "captioner.deliver_webhook"  # (delivery_id): one webhook attempt
TASK_MAYBE_RETRAIN = "captioner.maybe_retrain"  # (): start a due training run, dispatch runs
TASK_TRAIN_RUN = "captioner.train_run"  # (run_id): fine-tune, evaluate, gate
TASK_EXPORT = "captioner.export"  # (export_id): write an export file into the store

QUEUE_INTERACTIVE = "caption.interactive"  # single images a person is waiting for: served first
QUEUE_BULK = "caption"
QUEUE_TRAIN = "train"
QUEUE_MAINTENANCE = "maintenance"
# Order matters: a worker listening on several queues polls them in this order.
ALL_QUEUES = (QUEUE_INTERACTIVE, QUEUE_BULK, QUEUE_MAINTENANCE, QUEUE_TRAIN)
CAPTION_QUEUES = (QUEUE_INTERACTIVE, QUEUE_BULK)

# The queue each task goes to unless its publisher says otherwise (a caption batch a person is
# waiting for goes to QUEUE_INTERACTIVE).
TASK_QUEUES = {
    TASK_CAPTION_BATCH: QUEUE_BULK,
    TASK_SWEEP: QUEUE_MAINTENANCE,
    TASK_ENUMERATE_PREFIX: QUEUE_MAINTENANCE,
    TASK_FETCH_URLS: QUEUE_MAINTENANCE,
    TASK_DELIVER_WEBHOOK: QUEUE_MAINTENANCE,
    TASK_MAYBE_RETRAIN: QUEUE_MAINTENANCE,
    TASK_TRAIN_RUN: QUEUE_TRAIN,
    TASK_EXPORT: QUEUE_MAINTENANCE,
}


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from captioner.settings import get_settings

    return get_settings()


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration both publishers and workers use (broker, serialisation, queues)."""
    from kombu import Exchange, Queue

    default_exchange = Exchange("", type="direct")
    return {
        "broker_url": settings.redis_url,
        # No result backend: results live in SQL (captions, image status), never in Redis.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_queues": [Queue(q, default_exchange, routing_key=q) for q in ALL_QUEUES],
        "task_default_queue": QUEUE_BULK,
        "task_default_exchange": "",
        "task_default_routing_key": QUEUE_BULK,
        "task_create_missing_queues": False,
        "task_routes": {
            name: {"queue": queue, "routing_key": queue} for name, queue in TASK_QUEUES.items()
        },
        "broker_transport_options": {
            # A message a worker took but did not acknowledge comes back after this long. It
            # must outlast the longest task, or a slow batch would be delivered twice (harmless
            # -- claims are conditional -- but wasted work).
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            # Poll queues in the listed order (interactive first), not round-robin.
            "queue_order_strategy": "priority",
        },
        "broker_connection_retry_on_startup": True,
    }


@lru_cache(maxsize=8)
def _publisher_for(redis_url: str, visibility_timeout: int) -> Celery:
    from celery import Celery

    from captioner.settings import Settings

    app = Celery("captioner-publisher", set_as_current=False)
    app.conf.update(
        celery_config(
            Settings(redis_url=redis_url, broker_visibility_timeout_seconds=visibility_timeout)
        )
    )
    return app


def publisher(settings: Settings | None = None) -> Celery:
    """A light Celery app for sending tasks by name (cached per broker URL)."""
    settings = _settings(settings)
    return _publisher_for(settings.redis_url, settings.broker_visibility_timeout_seconds)


def chunked(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield [int(i) for i in ids[start : start + size]]


def publish_caption_batches(
    job_id: int,
    image_ids: Sequence[int],
    *,
    interactive: bool = False,
    settings: Settings | None = None,
) -> int:
    """Send `caption_batch(job_id, chunk)` for each `batch_size` chunk; returns messages sent.

    Call it after the transaction that queued the images has committed. Sending the same ids
    twice is harmless: a worker claims an image only while it is claimable.
    """
    settings = _settings(settings)
    queue = QUEUE_INTERACTIVE if interactive else QUEUE_BULK
    app = publisher(settings)
    sent = 0
    with app.producer_or_acquire() as producer:
        for chunk in chunked(list(image_ids), settings.batch_size):
            app.send_task(
                TASK_CAPTION_BATCH,
                args=(int(job_id), chunk),
                queue=queue,
                routing_key=queue,
                producer=producer,
            )
            sent += 1
    return sent


def send_task(name: str, *args: Any, settings: Settings | None = None) -> None:
    """Send a task by name to its queue (`TASK_QUEUES`), after the caller's commit."""
    queue = TASK_QUEUES[name]
    publisher(settings).send_task(name, args=args, queue=queue, routing_key=queue)


def publish_train_run(run_id: int, settings: Settings | None = None) -> None:
    """Send `train_run(run_id)` to the train queue (after the run's row is committed)."""
    send_task(TASK_TRAIN_RUN, int(run_id), settings=settings)


def publish_deliveries(delivery_ids: Sequence[int], settings: Settings | None = None) -> None:
    """Send `deliver_webhook(delivery_id)` for each id (after the deliveries are committed)."""
    for delivery_id in delivery_ids:
        send_task(TASK_DELIVER_WEBHOOK, int(delivery_id), settings=settings)


def queue_depths(settings: Settings | None = None) -> dict[str, int]:
    """Messages waiting in each queue (not counting ones a worker holds unacknowledged)."""
    import redis

    settings = _settings(settings)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        # kombu keeps prioritised messages in sibling lists named `<queue>\x06\x16<priority>`.
        depths = {}
        for queue in ALL_QUEUES:
            keys = [queue] + [f"{queue}\x06\x16{p}" for p in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            depths[queue] = int(sum(pipe.execute()))
        return depths
    finally:
        client.close()
