"""Webhooks: Standard Webhooks signatures and secret rotation, outbox idempotence, address
rules, retries with backoff."""

from __future__ import annotations

import json
import threading
import tracemalloc
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks
from conftest import PUBLIC_IP
from sqlalchemy import select

from captioner import webhooks
from captioner.settings import Settings
from captioner.state import images, jobs, outbox
from captioner.state.models import User, Webhook, WebhookDelivery, WebhookStatus, utcnow


@pytest.fixture
def receiver():
    """A loopback receiver; answers with the codes in `codes` (then 200) and keeps requests."""
    received, codes = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(codes.pop(0) if codes else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received, codes
    server.shutdown()


def finished_job(session, url):
    user = User(email="o@example.com")
    session.add(user)
    session.flush()
    hook = Webhook(owner_id=user.id, url=url, secret="s3cret", events=[])
    session.add(hook)
    job = jobs.create_job(session, "j", owner_id=user.id)
    [image_id] = jobs.submit_images(session, job.id, ["a.jpg"])
    images.claim_images(session, worker_id="w", lease_seconds=60)
    images.fail_image(session, image_id, "broken")
    jobs.finish_completed_jobs(session)
    session.commit()  # deliveries run in transactions of their own
    return job


def test_sign_and_verify():
    body = b'{"event":"job.completed"}'
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_")
    hook = Webhook(secret=secret)
    headers = webhooks.signature_headers(hook, "7", body)
    assert headers["webhook-id"] == "7" and headers["webhook-signature"].startswith("v1,")
    assert webhooks.verify(secret, body, headers)
    assert standardwebhooks.Webhook(secret).verify(body, headers) == {"event": "job.completed"}
    assert not webhooks.verify(secret, body + b" ", headers)
    assert not webhooks.verify(webhooks.new_secret(), body, headers)
    assert not webhooks.verify(secret, body, {**headers, "webhook-id": "8"})


def test_secret_made_before_the_whsec_form_keeps_working():
    """An old secret's key is its UTF-8 bytes: a receiver passes them as they are, or the
    `whsec_` form of them."""
    body = b'{"event":"job.failed"}'
    headers = webhooks.signature_headers(Webhook(secret="s3cret"), "1", body)
    standardwebhooks.Webhook(b"s3cret").verify(body, headers)
    standardwebhooks.Webhook(webhooks.signing_key("s3cret")).verify(body, headers)
    assert webhooks.verify("s3cret", body, headers)


def test_delivery_signed_to_allow_listed_loopback(session, session_factory, receiver):
    url, received, _ = receiver
    job = finished_job(session, url)
    ids = outbox.record_job_events(session, [job.id])
    assert len(ids) == 1 and outbox.record_job_events(session, [job.id]) == []  # idempotent
    session.commit()
    settings = Settings(webhook_allow_hosts=["127.0.0.1"])
    attempt = webhooks.deliver(session_factory, ids[0], settings=settings)
    assert attempt.status == WebhookStatus.DELIVERED
    [(headers, body)] = received
    assert webhooks.verify("s3cret", body, headers)
    assert headers["webhook-id"] == str(ids[0])
    payload = json.loads(body)
    assert payload["event"] == "job.failed" and payload["job"]["failed_count"] == 1
    assert (
        webhooks.deliver(session_factory, ids[0], settings=settings).status
        == WebhookStatus.DELIVERED
    )
    assert len(received) == 1  # delivered rows are not sent again


def test_loopback_refused_without_allow_list(session, session_factory, receiver):
    url, received, _ = receiver
    job = finished_job(session, url)
    [delivery_id] = outbox.record_job_events(session, [job.id])
    session.commit()
    attempt = webhooks.deliver(session_factory, delivery_id, settings=Settings())
    assert (
        attempt.status == WebhookStatus.FAILED and "refused URL" in attempt.error and received == []
    )


def test_retries_with_exponential_backoff_then_fail(session, session_factory, receiver):
    url, received, codes = receiver
    codes.extend([500, 503, 500])
    job = finished_job(session, url)
    [delivery_id] = outbox.record_job_events(session, [job.id])
    session.commit()
    settings = Settings(
        webhook_allow_hosts=["127.0.0.1"], webhook_backoff_seconds=5, webhook_max_attempts=3
    )
    delays = [
        webhooks.deliver(session_factory, delivery_id, settings=settings).retry_in_seconds
        for _ in range(2)
    ]
    assert delays == [5, 10]
    last = webhooks.deliver(session_factory, delivery_id, settings=settings)
    assert last.status == WebhookStatus.FAILED and last.error == "HTTP 500"
    session.expire_all()
    assert session.get(WebhookDelivery, delivery_id).attempts == 3 and len(received) == 3
    # Every attempt has the same webhook-id (a receiver drops duplicates) and its own signature.
    assert {h["webhook-id"] for h, _ in received} == {str(delivery_id)}
    assert all(webhooks.verify("s3cret", b, h) for h, b in received)


def test_delivery_connects_to_the_checked_address_not_a_rebound_one(
    session, session_factory, receiver, rebinding_dns
):
    """The hook's name answers a public address for the check and 127.0.0.1 afterwards: the POST
    goes to the checked address (refused here) and never reaches the loopback receiver."""
    url, received, _ = receiver
    port = url.split(":")[2].split("/")[0]
    lookups, connects = rebinding_dns
    job = finished_job(session, f"http://rebind.example:{port}/hook")
    [delivery_id] = outbox.record_job_events(session, [job.id])
    session.commit()
    attempt = webhooks.deliver(session_factory, delivery_id, settings=Settings())
    assert (
        attempt.status == WebhookStatus.PENDING and "ConnectionError" in attempt.error
    )  # retried later
    assert lookups == ["rebind.example"] and connects == [PUBLIC_IP]
    assert received == []


# --- bounded deliveries: a total deadline, a capped raw reply, attempts committed first -------


@pytest.fixture
def hostile():
    from test_ingest import HostileServer

    server = HostileServer()
    yield server
    server.close()


def _pending(session, url):
    job = finished_job(session, url)
    [delivery_id] = outbox.record_job_events(session, [job.id])
    session.commit()
    return delivery_id


def test_delivery_to_a_drip_receiver_ends_at_the_deadline(session, session_factory, hostile):
    delivery_id = _pending(session, hostile.url + "/drip")
    settings = Settings(webhook_allow_hosts=["127.0.0.1"], webhook_timeout_seconds=1.0)
    attempt = webhooks.deliver(session_factory, delivery_id, settings=settings)
    assert attempt.status == WebhookStatus.PENDING and attempt.error.endswith("timed out")
    session.expire_all()
    assert session.get(WebhookDelivery, delivery_id).attempts == 1


def test_gzip_bomb_reply_is_read_raw_and_capped(session, session_factory, hostile):
    delivery_id = _pending(session, hostile.url + "/bomb")
    settings = Settings(webhook_allow_hosts=["127.0.0.1"])
    tracemalloc.start()
    try:
        attempt = webhooks.deliver(session_factory, delivery_id, settings=settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert attempt.status == WebhookStatus.DELIVERED
    assert peak < 16 * 1024 * 1024  # the reply inflates to 256 MiB


def test_redirecting_receiver_is_not_followed(session, session_factory, hostile):
    delivery_id = _pending(session, hostile.url + "/hop/0")
    settings = Settings(webhook_allow_hosts=["127.0.0.1"])
    attempt = webhooks.deliver(session_factory, delivery_id, settings=settings)
    assert attempt.status == WebhookStatus.PENDING and attempt.error == "HTTP 302"
    assert hostile.paths == ["/hop/0"]


def test_attempt_is_committed_before_the_post(session, session_factory):
    """The receiver looks at the delivery from another connection while it is being posted:
    the attempt is already counted there, so a sender killed now has used it up."""
    seen = []

    def post(url, data, headers):
        with session_factory() as other:
            seen.append(other.get(WebhookDelivery, int(headers[webhooks.ID_HEADER])).attempts)
        raise KeyboardInterrupt  # the worker dies mid-send

    delivery_id = _pending(session, "http://93.184.215.14/hook")
    settings = Settings(webhook_max_attempts=2, webhook_backoff_seconds=30)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            webhooks.deliver(session_factory, delivery_id, settings=settings, post=post)
    assert seen == [1, 2]
    session.expire_all()
    row = session.get(WebhookDelivery, delivery_id)
    assert row.status == WebhookStatus.PENDING and row.next_attempt_at > utcnow()
    # The sweeper re-sends it once overdue: out of attempts, it fails without another POST.
    last = webhooks.deliver(session_factory, delivery_id, settings=settings, post=post)
    assert last.status == WebhookStatus.FAILED and seen == [1, 2]


def test_url_allow_list_does_not_trust_webhook_receivers(session, session_factory, receiver):
    url, received, _ = receiver
    delivery_id = _pending(session, url)
    settings = Settings(url_allow_hosts=["127.0.0.1"])
    attempt = webhooks.deliver(session_factory, delivery_id, settings=settings)
    assert attempt.status == WebhookStatus.FAILED and "refused URL" in attempt.error
    assert received == []


def test_receiver_url_is_redacted_in_errors(session, session_factory, hostile):
    delivery_id = _pending(session, f"http://u:pw@{hostile.url[7:]}/drip?token=SECRET#x")
    settings = Settings(webhook_allow_hosts=["127.0.0.1"], webhook_timeout_seconds=0.5)
    attempt = webhooks.deliver(session_factory, delivery_id, settings=settings)
    session.expire_all()
    stored = session.get(WebhookDelivery, delivery_id).last_error
    assert attempt.error == stored == f"{hostile.url}/drip: timed out"


# --- Standard Webhooks: verified by the library, replays refused, secrets rotated ------------


def _delivered(session, session_factory, receiver, **kw):
    """Deliver a fresh event to `receiver`; returns (headers, body) of the POST."""
    url, received, _ = receiver
    delivery_id = _pending(session, url)
    settings = Settings(webhook_allow_hosts=["127.0.0.1"])
    attempt = webhooks.deliver(session_factory, delivery_id, settings=settings, **kw)
    assert attempt.status == WebhookStatus.DELIVERED
    return received[-1]


def test_delivery_verifies_with_the_standardwebhooks_library(session, session_factory, receiver):
    url, received, _ = receiver
    job = finished_job(session, url)
    hook = session.scalars(select(Webhook)).one()
    hook.secret = secret = webhooks.new_secret()
    [delivery_id] = outbox.record_job_events(session, [job.id])
    session.commit()
    settings = Settings(webhook_allow_hosts=["127.0.0.1"])
    assert (
        webhooks.deliver(session_factory, delivery_id, settings=settings).status
        == WebhookStatus.DELIVERED
    )
    [(headers, body)] = received
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["event"] == "job.failed"
    assert headers["X-Captioner-Event"] == "job.failed"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(body, headers)


def _delivered_again(session, session_factory, receiver, hook, **kw):
    """A second job of `hook`'s owner, finished and delivered; (headers, body) of its POST."""
    url, received, _ = receiver
    job = jobs.create_job(session, "again", owner_id=hook.owner_id)
    [image_id] = jobs.submit_images(session, job.id, ["b.jpg"])
    images.claim_images(session, worker_id="w", lease_seconds=60, job_id=job.id)
    images.fail_image(session, image_id, "broken")
    jobs.finish_completed_jobs(session)
    [delivery_id] = outbox.record_job_events(session, [job.id])
    session.commit()
    settings = Settings(webhook_allow_hosts=["127.0.0.1"])
    attempt = webhooks.deliver(session_factory, delivery_id, settings=settings, **kw)
    assert attempt.status == WebhookStatus.DELIVERED
    return received[-1]


def test_replayed_delivery_with_an_old_timestamp_is_refused(session, session_factory, receiver):
    """A delivery captured and sent again later: the library refuses its timestamp, and the
    timestamp cannot be changed without breaking the signature."""
    sent_at = utcnow() - timedelta(minutes=10)
    headers, body = _delivered(session, session_factory, receiver, now=sent_at)
    assert int(headers["webhook-timestamp"]) == int(sent_at.timestamp())
    with pytest.raises(standardwebhooks.WebhookVerificationError, match="too old"):
        standardwebhooks.Webhook(webhooks.signing_key("s3cret")).verify(body, headers)
    assert not webhooks.verify("s3cret", body, headers)
    assert webhooks.verify("s3cret", body, headers, now=sent_at)  # it was signed correctly
    fresh = {**headers, "webhook-timestamp": str(int(utcnow().timestamp()))}
    with pytest.raises(standardwebhooks.WebhookVerificationError, match="No matching signature"):
        standardwebhooks.Webhook(webhooks.signing_key("s3cret")).verify(body, fresh)


def test_rotated_secret_signs_next_to_the_previous_one_for_the_grace_period(
    session, session_factory, receiver
):
    headers, body = _delivered(session, session_factory, receiver)
    hook = session.scalars(select(Webhook)).one()
    rotated_at = utcnow()
    settings = Settings(webhook_secret_grace_hours=24)
    new = webhooks.rotate_secret(session, hook, settings=settings, now=rotated_at)
    session.commit()
    assert new.startswith("whsec_") and hook.secret == new and hook.previous_secret == "s3cret"
    assert hook.previous_secret_expires_at == rotated_at + timedelta(hours=24)

    during = rotated_at + timedelta(hours=23)
    headers, body = _delivered_again(session, session_factory, receiver, hook, now=during)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert webhooks.verify(new, body, headers, now=during)
    assert webhooks.verify("s3cret", body, headers, now=during)

    after = rotated_at + timedelta(hours=25)
    headers, body = _delivered_again(session, session_factory, receiver, hook, now=after)
    assert len(headers["webhook-signature"].split(" ")) == 1
    assert webhooks.verify(new, body, headers, now=after)
    assert not webhooks.verify("s3cret", body, headers, now=after)


def test_rotation_without_a_grace_period_drops_the_previous_secret_at_once(session):
    user = User(email="g@example.com")
    session.add(user)
    session.flush()
    hook = Webhook(owner_id=user.id, url="http://93.184.215.14/hook", secret="old", events=[])
    session.add(hook)
    session.flush()
    new = webhooks.rotate_secret(session, hook, settings=Settings(webhook_secret_grace_hours=0))
    assert hook.previous_secret is None and webhooks.signing_secrets(hook) == [new]
    body = b"{}"
    headers = webhooks.signature_headers(hook, "1", body)
    assert webhooks.verify(new, body, headers) and not webhooks.verify("old", body, headers)
