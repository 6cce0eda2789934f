"""Webhooks: signed `job.completed` / `job.failed` events, delivered from an outbox with retries.

Flow: whoever finishes jobs (the workers, after `jobs.finish_completed_jobs`) calls
`captioner.state.outbox.record_job_events(session, job_ids)` in the same transaction; it writes
one `WebhookDelivery` row per (webhook, event, job) -- recording twice is a no-op. After the
commit it publishes `captioner.deliver_webhook(delivery_id)` for each
(`captioner.tasks.publish_deliveries`).
The task calls `deliver(session_factory, delivery_id)`: it counts the attempt and commits
BEFORE sending (so a worker killed by a hostile receiver cannot re-send forever), then POSTs the
JSON body signed in the Standard Webhooks format through the bounded outbound path of
`captioner.intake.urls` (a total time limit, the reply read raw and capped at
`REPLY_MAX_BYTES`); a 2xx marks it delivered, anything else leaves
the next attempt scheduled with exponential backoff (`next_attempt_at`, returned so the task
can retry with that countdown) until `webhook_max_attempts`. Receiver URLs must be public
unless allow-listed in `webhook_allow_hosts` (a list of its own: trusting an internal receiver
does not open it to URL submission), checked again at every attempt; no redirects. Errors
stored and logged name the URL redacted to scheme, host and path.

Signatures (the `standardwebhooks` package): `webhook-id` is the delivery id (the same on every
retry, so a receiver can drop duplicates), `webhook-timestamp` the attempt's time in seconds,
`webhook-signature` `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`; a receiver refuses a
timestamp more than 5 minutes from its clock, so a captured delivery cannot be replayed later.
Secrets are `whsec_<base64 key>`. A secret made before this format (any other string) keeps
working: its key is the secret's UTF-8 bytes, i.e. its `whsec_` form is `whsec_` + base64 of
them (`signing_key`). `rotate_secret` replaces a webhook's secret; for
`webhook_secret_grace_hours` deliveries carry a second signature, made with the previous
secret, after the new one (space-separated), so a receiver can switch secrets at its own pace.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks import WebhookVerificationError

from captioner.intake.errors import SubmissionRejected, UnsafeURL
from captioner.state.db import session_scope
from captioner.state.models import (
    Webhook,
    WebhookDelivery,
    WebhookStatus,
    utcnow,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from captioner.intake.urls import Resolver
    from captioner.settings import Settings

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
EVENT_HEADER = "X-Captioner-Event"
SECRET_PREFIX = "whsec_"
# How far a delivery's timestamp may be from the receiver's clock (the library's own tolerance).
TOLERANCE = timedelta(minutes=5)
# Most bytes of a receiver's reply read (raw, never decompressed): nothing but its status is used.
REPLY_MAX_BYTES = 4096


def new_secret() -> str:
    """A new signing secret: `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def signing_key(secret: str) -> str:
    """`secret` in the `whsec_` form the library takes: as it is, or for a secret made before
    that form, `whsec_` + base64 of its UTF-8 bytes (those bytes are the HMAC key)."""
    if secret.startswith(SECRET_PREFIX):
        return secret
    return SECRET_PREFIX + base64.b64encode(secret.encode("utf-8")).decode("ascii")


def _seconds(moment: datetime) -> datetime:
    """`moment` in UTC, cut to whole seconds (what `webhook-timestamp` carries)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(moment.timestamp()), UTC)


def sign(secret: str, msg_id: str, timestamp: datetime, body: bytes) -> str:
    """One `webhook-signature` entry: `v1,<base64>` over `msg_id.timestamp.body`."""
    return StandardWebhook(signing_key(secret)).sign(msg_id, _seconds(timestamp), body.decode())


def signing_secrets(hook: Webhook, now: datetime | None = None) -> list[str]:
    """The secrets a delivery is signed with now: the current one, then the previous one until
    its grace period ends."""
    found = [hook.secret]
    expires = hook.previous_secret_expires_at
    if hook.previous_secret and expires is not None and expires > (now or utcnow()):
        found.append(hook.previous_secret)
    return found


def signature_headers(
    hook: Webhook, msg_id: str, body: bytes, now: datetime | None = None
) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` (now) and `webhook-signature` (one signature per
    secret of `signing_secrets`, space-separated) for `body`."""
    stamp = _seconds(now or utcnow())
    signatures = " ".join(sign(s, msg_id, stamp, body) for s in signing_secrets(hook, now))
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(int(stamp.timestamp())),
        SIGNATURE_HEADER: signatures,
    }


def verify(
    secret: str, body: bytes, headers: Mapping[str, str], *, now: datetime | None = None
) -> bool:
    """What a receiver does: `standardwebhooks` checks that one of the signatures was made with
    `secret` over the id, timestamp and body, and refuses a timestamp more than `TOLERANCE` from
    its clock (a replay). `now` stands for the receiver's clock (the library reads the real one)."""
    if now is None:
        try:
            StandardWebhook(signing_key(secret)).verify(body, dict(headers), json_parse=False)
        except WebhookVerificationError:
            return False
        return True
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        stamp = datetime.fromtimestamp(int(lower.get(TIMESTAMP_HEADER, "")), UTC)
    except ValueError:
        return False
    if abs(stamp - now) > TOLERANCE:
        return False
    expected = sign(secret, lower.get(ID_HEADER, ""), stamp, body)
    return any(hmac.compare_digest(expected, s) for s in lower.get(SIGNATURE_HEADER, "").split())


def rotate_secret(
    session: Session,
    hook: Webhook,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
) -> str:
    """Give `hook` a new secret and return it (to show once). The replaced secret keeps signing
    deliveries, after the new one, for `webhook_secret_grace_hours` (a rotation within that time
    ends the older secret's grace at once: two signatures at most)."""
    grace = timedelta(hours=_settings(settings).webhook_secret_grace_hours)
    if grace > timedelta(0):
        hook.previous_secret = hook.secret
        hook.previous_secret_expires_at = (now or utcnow()) + grace
    else:
        hook.previous_secret = hook.previous_secret_expires_at = None
    hook.secret = new_secret()
    session.flush()
    return hook.secret


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    status: WebhookStatus
    retry_in_seconds: float | None = None  # set when another attempt is scheduled
    error: str | None = None


@dataclass(frozen=True)
class Outgoing:
    """One attempt, counted and ready to send: where, the signed body and its headers."""

    delivery_id: int
    attempt: int
    url: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Sent:
    """What sending an `Outgoing` came to: the receiver's status, or why there was none
    (`refused`: the URL is not allowed, so retrying cannot help)."""

    status: int | None = None
    error: str | None = None
    refused: bool = False


# Posts one signed body: `post(url, data=..., headers=...)`, an object with `.status` back.
Post = Callable[..., Any]


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from captioner.settings import get_settings

    return get_settings()


def check_receiver_url(
    url: str, settings: Settings | None = None, *, resolver: Resolver | None = None
) -> str:
    """`url` if a webhook may be sent there (public, or in `webhook_allow_hosts`); else
    `UnsafeURL`. For registering a webhook; every delivery checks again."""
    from captioner.intake.urls import check_url

    return check_url(url, allow_hosts=_settings(settings).webhook_allow_hosts, resolver=resolver)


def _backoff(settings: Settings, attempts: int) -> float:
    return settings.webhook_backoff_seconds * 2 ** (attempts - 1)


def begin_attempt(
    session: Session,
    delivery_id: int,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
) -> Outgoing | Attempt:
    """Count one attempt of a pending delivery and schedule the next one as if this one
    failed; the caller commits BEFORE sending, so a worker killed while sending (a hostile
    receiver) still used up an attempt and the sweeper re-sends only after the backoff, until
    `webhook_max_attempts`. An `Attempt` back means there is nothing to send (delivered,
    failed, gone, or out of attempts: then it is marked failed)."""
    settings = _settings(settings)
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        return Attempt(delivery_id, WebhookStatus.FAILED, error="no such delivery")
    if delivery.status != WebhookStatus.PENDING:
        return Attempt(delivery_id, delivery.status)
    if delivery.attempts >= settings.webhook_max_attempts:
        # Every attempt was started and none recorded an outcome: the sender was lost.
        error = delivery.last_error or "no outcome recorded for the last attempt"
        return _fail(session, delivery, error)
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
    now = now or utcnow()
    delivery.attempts += 1
    delivery.last_error = f"attempt {delivery.attempts} started, no outcome recorded"
    delivery.next_attempt_at = now + timedelta(seconds=_backoff(settings, delivery.attempts))
    session.flush()
    hook = delivery.webhook
    headers = {
        "Content-Type": "application/json",
        **signature_headers(hook, str(delivery.id), body, now),
        EVENT_HEADER: delivery.event,
        "User-Agent": "captioner-webhooks/1",
    }
    return Outgoing(delivery.id, delivery.attempts, hook.url, body, headers)


def send(
    outgoing: Outgoing,
    *,
    settings: Settings | None = None,
    resolver: Resolver | None = None,
    post: Post | None = None,
) -> Sent:
    """POST one attempt (no transaction should be open): the URL checked again against
    `webhook_allow_hosts` and pinned, `webhook_timeout_seconds` in total, no redirects, at most
    `REPLY_MAX_BYTES` of the reply read and never decompressed."""
    from captioner.intake import urls

    settings = _settings(settings)
    limits = urls.Limits(
        seconds=settings.webhook_timeout_seconds, max_bytes=REPLY_MAX_BYTES, truncate=True
    )

    def pinned(url: str, *, data: bytes, headers: dict[str, str]) -> urls.Reply:
        allow = settings.webhook_allow_hosts
        return urls.request(
            "POST",
            url,
            allow_hosts=allow,
            limits=limits,
            data=data,
            headers=headers,
            resolver=resolver,
        )

    try:
        reply = (post or pinned)(outgoing.url, data=outgoing.body, headers=outgoing.headers)
    except UnsafeURL as exc:
        return Sent(error=exc.reason, refused=True)
    except SubmissionRejected as exc:
        return Sent(error=exc.reason)
    return Sent(status=reply.status)


def finish_attempt(
    session: Session,
    outgoing: Outgoing,
    sent: Sent,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
) -> Attempt:
    """Record what an attempt came to: delivered on a 2xx, failed when the URL is refused or
    the attempts are used up, else pending until the next attempt (already scheduled by
    `begin_attempt`)."""
    settings = _settings(settings)
    delivery = session.get(WebhookDelivery, outgoing.delivery_id)
    if delivery is None or delivery.status != WebhookStatus.PENDING:
        return Attempt(outgoing.delivery_id, delivery.status if delivery else WebhookStatus.FAILED)
    delivery.response_status = sent.status
    if sent.status is not None and 200 <= sent.status < 300:
        delivery.status = WebhookStatus.DELIVERED
        delivery.delivered_at = now or utcnow()
        delivery.next_attempt_at = None
        delivery.last_error = None
        session.flush()
        return Attempt(delivery.id, WebhookStatus.DELIVERED)
    error = sent.error or f"HTTP {sent.status}"
    if sent.refused or delivery.attempts >= settings.webhook_max_attempts:
        return _fail(session, delivery, error)
    delivery.last_error = error
    session.flush()
    delay = _backoff(settings, delivery.attempts)
    return Attempt(delivery.id, WebhookStatus.PENDING, retry_in_seconds=delay, error=error)


def _fail(session: Session, delivery: WebhookDelivery, error: str) -> Attempt:
    delivery.status = WebhookStatus.FAILED
    delivery.last_error = error[:500]
    delivery.next_attempt_at = None
    session.flush()
    return Attempt(delivery.id, WebhookStatus.FAILED, error=error)


def deliver(
    session_factory: sessionmaker[Session],
    delivery_id: int,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    resolver: Resolver | None = None,
    post: Post | None = None,
) -> Attempt:
    """One delivery attempt in two transactions around the POST: the attempt is counted and
    committed first (`begin_attempt`), the POST runs with no transaction open (`send`), then
    its outcome is committed (`finish_attempt`). Idempotent for a delivered or failed row."""
    settings = _settings(settings)
    with session_scope(session_factory) as session:
        outgoing = begin_attempt(session, delivery_id, settings=settings, now=now)
    if isinstance(outgoing, Attempt):
        return outgoing
    sent = send(outgoing, settings=settings, resolver=resolver, post=post)
    with session_scope(session_factory) as session:
        return finish_attempt(session, outgoing, sent, settings=settings, now=now)


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
