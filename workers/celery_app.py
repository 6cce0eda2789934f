"""The Celery application: Redis broker, JSON only, four queues, delivery settings for long GPU work.

`create_celery_app()` builds it from `Settings`; `workers/entry.py` is what `celery -A` loads.
Nothing here imports torch or loads a model: the model is loaded lazily by the first batch
(`workers.model_runtime`).

Delivery, for batches that may run for minutes on a GPU:
- late acknowledgement: a message is acknowledged after its task returns, so a worker that
  dies mid-batch leaves it unacknowledged (and `task_reject_on_worker_lost` re-queues it);
- prefetch multiplier 1: a worker holds one message per pool slot -- one for a `solo` worker,
  the pipeline depth for a pipelined (`threads`) one, so its next batch arrives and is fetched
  while the current one runs the model -- and queued work stays visible to the others (an
  interactive message waits behind at most the batches a worker has already started);
- the Redis visibility timeout outlasts the hard time limit, so a slow batch is not re-delivered
  while it still runs. None of this is relied on for correctness: SQL leases and the sweeper are.
- time limits: enforced by the prefork pool only; GPU workers use `--pool solo`, or `threads`
  when pipelined (one process per device, no fork after CUDA init), where a batch's lease is
  the limit that counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery

from captioner.settings import get_settings
from captioner.tasks import QUEUE_MAINTENANCE, TASK_MAYBE_RETRAIN, TASK_SWEEP, celery_config

if TYPE_CHECKING:
    from captioner.settings import Settings

# The modules a worker imports at start: every task (by its name in `captioner.tasks`) and the
# worker's start and stop signal handlers.
WORKER_MODULES = (
    "workers.caption",
    "workers.sweep",
    "workers.ingest",
    "workers.deliveries",
    "workers.training",
    "workers.exports",
    "workers.lifecycle",
)


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A configured Celery app with every task of `WORKER_MODULES` registered."""
    settings = settings or get_settings()
    app = Celery("captioner", include=list(WORKER_MODULES))
    conf = celery_config(settings)
    # The visibility timeout must outlast the hard limit, whatever the operator configured.
    conf["broker_transport_options"]["visibility_timeout"] = max(
        settings.broker_visibility_timeout_seconds, settings.task_time_limit_seconds * 2
    )
    conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_seconds,
        task_time_limit=settings.task_time_limit_seconds,
        task_track_started=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        # A worker keeps its own logging (the CLI configures it); don't hijack the root logger.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # If the broker connection drops mid-task the late ack cannot be delivered anyway; the
        # message comes back and the (idempotent) task runs again.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        beat_schedule={
            "sweep": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval_seconds,
                # A sweep that waited longer than one interval is superseded by the next one.
                "options": {
                    "queue": QUEUE_MAINTENANCE,
                    "routing_key": QUEUE_MAINTENANCE,
                    "expires": settings.sweep_interval_seconds,
                },
            },
            "maybe-retrain": {
                "task": TASK_MAYBE_RETRAIN,
                "schedule": retrain_schedule(settings.retrain_schedule),
                "options": {"queue": QUEUE_MAINTENANCE, "routing_key": QUEUE_MAINTENANCE},
            },
        },
        timezone="UTC",
        enable_utc=True,
    )
    app.conf.update(conf)
    return app


def retrain_schedule(line: str):
    """A Celery crontab from a five-field crontab line (minute hour day month weekday)."""
    from celery.schedules import crontab

    fields = line.split()
    if len(fields) != 5:
        raise ValueError(
            f"retrain_schedule {line!r}: expected five crontab fields (minute hour day month weekday)"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )
