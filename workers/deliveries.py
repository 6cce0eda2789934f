"""Webhook deliveries: the `captioner.deliver_webhook` task, and publishing the deliveries a task
has just committed.

Whoever finishes jobs (a caption batch, the sweeper, an ingest step) records their webhook
events in the same transaction (`outbox.record_job_events`, an outbox) and publishes the
deliveries after the commit with `publish_committed_deliveries`; a delivery whose message is
lost is re-sent by the sweeper.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from kombu.exceptions import OperationalError as KombuOperationalError

from captioner import webhooks
from captioner.settings import Settings, get_settings
from captioner.tasks import TASK_DELIVER_WEBHOOK, publish_deliveries
from workers.resources import resources

log = logging.getLogger("captioner.worker")


def publish_committed_deliveries(delivery_ids: list[int], settings: Settings) -> None:
    """Send the webhook deliveries just committed. If the broker is down they stay pending in
    SQL and the sweeper re-sends them once they are overdue."""
    if not delivery_ids:
        return
    try:
        publish_deliveries(delivery_ids, settings=settings)
    except (OSError, KombuOperationalError) as exc:
        log.warning(
            "could not publish %d webhook deliveries (the sweeper re-sends them): %s",
            len(delivery_ids),
            exc,
        )


def run_deliver_webhook(delivery_id: int, settings: Settings | None = None) -> webhooks.Attempt:
    """One delivery attempt: counted and committed before the POST, its outcome after."""
    settings = settings or get_settings()
    return webhooks.deliver(resources(settings).sessions, delivery_id, settings=settings)


@shared_task(name=TASK_DELIVER_WEBHOOK, bind=True, max_retries=None, acks_late=True)
def deliver_webhook(self, delivery_id: int) -> dict[str, Any]:
    """POST one signed webhook event; a failed attempt retries after the delivery's backoff,
    until `Settings.webhook_max_attempts` (counted in SQL, so a re-sent message changes nothing)."""
    attempt = run_deliver_webhook(delivery_id)
    log.info(
        "webhook delivery %s: %s%s",
        delivery_id,
        attempt.status.value,
        f" ({attempt.error})" if attempt.error else "",
    )
    if attempt.retry_in_seconds is not None:
        raise self.retry(countdown=attempt.retry_in_seconds) from None
    return {"outcome": attempt.status.value, "error": attempt.error}
