"""Webhooks: signed `job.completed` / `job.failed` events, delivered from an outbox with retries.

Flow: whoever finishes jobs (the workers, after `jobs.finish_completed_jobs`) calls
`captioner.state.outbox.record_job_events(session, job_ids)` in the same transaction; it writes
one `WebhookDelivery` row per (webhook, event, job) -- recording twice is a no-op. After the
commit it publishes `captioner.deliver_webhook(delivery_id)` for each
(`captioner.tasks.publish_deliveries`).
The task calls `deliver(session, delivery_id)`: it POSTs the JSON body with
`X-Captioner-Signature: sha256=<hex HMAC-SHA256 of the body with the webhook's secret>`; a
2xx marks it delivered, anything else schedules the next attempt with exponential backoff
(`next_attempt_at`, returned so the task can retry with that countdown) until
`webhook_max_attempts`. URLs obey the same rules as URL submission (public addresses only,
unless allow-listed in `url_allow_hosts`), checked again at every attempt; no redirects.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from captioner.intake.errors import UnsafeURL
from captioner.state.models import (
    WebhookDelivery,
    WebhookStatus,
    utcnow,
)

if TYPE_CHECKING:
    from captioner.intake.urls import Resolver
    from captioner.settings import Settings

SIGNATURE_HEADER = "X-Captioner-Signature"
EVENT_HEADER = "X-Captioner-Event"
DELIVERY_HEADER = "X-Captioner-Delivery"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def sign(secret: str, body: bytes) -> str:
    """The signature header value for `body`: `sha256=<hex>`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """Constant-time check of a received signature (what a receiver should do)."""
    return hmac.compare_digest(sign(secret, body), signature or "")


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    status: WebhookStatus
    retry_in_seconds: float | None = None  # set when another attempt is scheduled
    error: str | None = None


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from captioner.settings import get_settings

    return get_settings()


def deliver(
    session: Session,
    delivery_id: int,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    resolver: Resolver | None = None,
    post=None,
) -> Attempt:
    """One delivery attempt (idempotent for a delivered or failed row: it does nothing)."""
    from functools import partial

    import requests

    from captioner.intake.urls import checked_addresses
    from captioner.intake.urls import post as pinned_post

    settings = _settings(settings)
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        return Attempt(delivery_id, WebhookStatus.FAILED, error="no such delivery")
    if delivery.status != WebhookStatus.PENDING:
        return Attempt(delivery_id, delivery.status)
    hook = delivery.webhook
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
    delivery.attempts += 1
    error = None
    try:
        # resolved once and checked; the POST connects only to these addresses (no rebinding)
        addresses = checked_addresses(
            hook.url, allow_hosts=settings.url_allow_hosts, resolver=resolver
        )
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(hook.secret, body),
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: str(delivery.id),
            "User-Agent": "captioner-webhooks/1",
        }
        poster = post or partial(pinned_post, addresses=addresses)
        response = poster(
            hook.url,
            data=body,
            headers=headers,
            timeout=settings.webhook_timeout_seconds,
            allow_redirects=False,
        )
        delivery.response_status = response.status_code
        if 200 <= response.status_code < 300:
            delivery.status = WebhookStatus.DELIVERED
            delivery.delivered_at = now or utcnow()
            delivery.next_attempt_at = None
            delivery.last_error = None
            session.flush()
            return Attempt(delivery_id, WebhookStatus.DELIVERED)
        error = f"HTTP {response.status_code}"
    except UnsafeURL as exc:
        delivery.status = WebhookStatus.FAILED
        delivery.last_error = exc.reason
        delivery.next_attempt_at = None
        session.flush()
        return Attempt(delivery_id, WebhookStatus.FAILED, error=exc.reason)
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    delivery.last_error = error
    if delivery.attempts >= settings.webhook_max_attempts:
        delivery.status = WebhookStatus.FAILED
        delivery.next_attempt_at = None
        session.flush()
        return Attempt(delivery_id, WebhookStatus.FAILED, error=error)
    delay = settings.webhook_backoff_seconds * 2 ** (delivery.attempts - 1)
    delivery.next_attempt_at = (now or utcnow()) + timedelta(seconds=delay)
    session.flush()
    return Attempt(delivery_id, WebhookStatus.PENDING, retry_in_seconds=delay, error=error)


def due_deliveries(session: Session, now: datetime | None = None) -> list[int]:
    """Pending deliveries whose next attempt is due (for a sweeper to re-publish)."""
    now = now or utcnow()
    return list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == WebhookStatus.PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.id)
        )
    )
