"""Maintenance tasks against a real `captioner worker` process: S3-style prefix enumeration and
URL fetching in the background, signed webhook deliveries with retries, and the sweeper's
webhook outbox duties (record events for jobs it finishes, re-send overdue deliveries).

Redis (the session's private redis-server), an SQLite file, a file:// object store,
the tiny untrained model, and loopback HTTP servers (allow-listed) for URLs and webhooks.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from captioner import tasks, webhooks
from captioner.state import images, jobs, outbox
from captioner.state.db import session_scope
from captioner.state.models import (
    Image,
    ImageStatus,
    Job,
    JobStatus,
    User,
    Webhook,
    WebhookDelivery,
    WebhookStatus,
    utcnow,
)
from tests.conftest import free_port
from tests.workers_fixtures import (
    Stack,
    WorkerProcess,
    png,
    wait_for,
    write_checkpoint,
)


class MaintenanceStack(Stack):
    def settings(self):
        from captioner.settings import Settings

        values = {k[len("CAPTIONER_") :].lower(): v for k, v in self.env.items()}
        for name in ("url_allow_hosts", "webhook_allow_hosts"):
            values[name] = json.loads(values[name])  # a JSON list in env
        return Settings(**values)


class Receiver:
    """A loopback HTTP server: serves `files` on GET, records POSTs and answers them with the
    codes in `codes` (then 200)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.codes: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                data = receiver.files.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.posts.append((self.path, dict(self.headers), body))
                    code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts_to(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for p, h, b in self.posts if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_dbs):
    from captioner.state import migrate

    root = tmp_path_factory.mktemp("maintenance")
    url = f"sqlite:///{root / 'captioner.db'}"
    migrate.upgrade(url)
    s = MaintenanceStack(
        root=root,
        database_url=url,
        redis_url=redis_dbs.flushed("main"),
        checkpoint=write_checkpoint(root / "ckpt"),
        extra_env={
            "CAPTIONER_METRICS_PORT": str(free_port()),
            # The loopback receiver is trusted by the operator (URL submission and webhooks).
            "CAPTIONER_URL_ALLOW_HOSTS": '["127.0.0.1"]',
            "CAPTIONER_WEBHOOK_ALLOW_HOSTS": '["127.0.0.1"]',
            "CAPTIONER_WEBHOOK_BACKOFF_SECONDS": "0.5",
            "CAPTIONER_WEBHOOK_MAX_ATTEMPTS": "3",
        },
    )
    yield s
    s.close()
    redis_dbs.flushed("main")


@pytest.fixture(scope="module")
def worker(stack):
    w = WorkerProcess(stack, "maintenance").wait_ready()
    yield w
    w.stop()


@pytest.fixture
def env(stack, monkeypatch):
    stack.apply_env(monkeypatch)
    return stack


def _finished(stack: Stack, job_id: int):
    with stack.sessions() as s:
        job = s.get(Job, job_id)
        return job if job.status == JobStatus.FINISHED else None


def _owner_with_hook(stack: Stack, url: str, email: str) -> tuple[int, int, str]:
    with session_scope(stack.sessions) as s:
        user = User(email=email)
        s.add(user)
        s.flush()
        hook = Webhook(owner_id=user.id, url=url, secret=webhooks.new_secret(), events=[])
        s.add(hook)
        s.flush()
        return user.id, hook.id, hook.secret


def _deliveries(stack: Stack, hook_id: int) -> list[WebhookDelivery]:
    with stack.sessions() as s:
        rows = s.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == hook_id)
            .order_by(WebhookDelivery.id)
        ).all()
        s.expunge_all()
    return list(rows)


# --- background ingestion -----------------------------------------------------------------------


def test_enumerate_prefix_task_queues_and_captions_the_listing(stack, worker, env):
    for i in range(7):
        stack.store.put(f"bucket/photos/{i:03d}.png", png(i))
    stack.store.put("bucket/photos/readme.txt", b"not an image")
    stack.store.put("bucket/other/999.png", png(99))  # outside the prefix
    with session_scope(stack.sessions) as s:
        job_id = jobs.create_job(s, "prefix", options={"prefix": "bucket/photos/"}).id

    tasks.send_task(tasks.TASK_ENUMERATE_PREFIX, job_id, settings=stack.settings())

    job = wait_for(lambda: _finished(stack, job_id), 60, what="prefix job finished")
    assert (job.image_count, job.captioned_count, job.failed_count) == (7, 7, 0)
    with stack.sessions() as s:
        keys = sorted(s.scalars(select(Image.storage_key).where(Image.job_id == job_id)))
    assert keys == [f"bucket/photos/{i:03d}.png" for i in range(7)]
    assert "prefix enumerated" in worker.log()

    # The same message again (a redelivery) adds nothing.
    from workers.ingest import enumerate_prefix

    assert enumerate_prefix.apply(args=(job_id,)).get()["images"] == 7
    with stack.sessions() as s:
        job = s.get(Job, job_id)
        assert job.image_count == 7 and job.status == JobStatus.FINISHED


def test_fetch_urls_task_fetches_queues_and_fails_bad_urls_alone(stack, worker, receiver):
    for i in range(3):
        receiver.files[f"/img/{i}.png"] = png(10 + i)
    urls = [f"{receiver.url}/img/{i}.png" for i in range(3)] + [f"{receiver.url}/img/missing.png"]
    with session_scope(stack.sessions) as s:
        job_id = jobs.create_job(s, "urls", options={"urls": urls}).id

    tasks.send_task(tasks.TASK_FETCH_URLS, job_id, settings=stack.settings())

    job = wait_for(lambda: _finished(stack, job_id), 60, what="URL job finished")
    assert (job.image_count, job.captioned_count, job.failed_count) == (4, 3, 1)
    with stack.sessions() as s:
        images = {
            im.original_name: im for im in s.scalars(select(Image).where(Image.job_id == job_id))
        }
    assert set(images) == set(urls)
    missing = images[urls[-1]]
    assert missing.status == ImageStatus.FAILED and "404" in missing.failure_reason
    assert all(images[u].status == ImageStatus.CAPTIONED for u in urls[:3])
    # The fetched bytes are in the object store under content-addressed keys.
    assert stack.store.get(images[urls[0]].storage_key) == png(10)


def test_fetch_urls_task_finishing_a_job_of_failed_urls_delivers_job_failed(
    stack, worker, receiver
):
    owner_id, hook_id, secret = _owner_with_hook(stack, f"{receiver.url}/hook-d", "d@example.com")
    urls = [f"{receiver.url}/img/gone-{i}.png" for i in range(2)]
    with session_scope(stack.sessions) as s:
        job_id = jobs.create_job(s, "dead urls", owner_id=owner_id, options={"urls": urls}).id

    tasks.send_task(tasks.TASK_FETCH_URLS, job_id, settings=stack.settings())

    wait_for(lambda: receiver.posts_to("/hook-d"), 60, what="job.failed delivered")
    [(headers, body)] = receiver.posts_to("/hook-d")
    assert webhooks.verify(secret, body, headers)
    assert headers[webhooks.EVENT_HEADER] == "job.failed"
    event = json.loads(body)["job"]
    assert (event["id"], event["status"], event["failed_count"]) == (job_id, "finished", 2)
    [delivery] = _deliveries(stack, hook_id)
    assert delivery.job_id == job_id and delivery.event == "job.failed"


class _Published:
    """What an in-process task run would have published: caption batches and deliveries."""

    def __init__(self, monkeypatch) -> None:
        import workers.ingest

        self.images: list[int] = []
        self.deliveries: list[int] = []
        monkeypatch.setattr(
            workers.ingest,
            "publish_caption_batches",
            lambda job_id, ids, settings=None: self.images.extend(ids),
        )
        monkeypatch.setattr(
            workers.ingest,
            "publish_committed_deliveries",
            lambda ids, settings: self.deliveries.extend(ids),
        )


def _assert_failed_for_good(stack, job_id, hook_id, published, reason_part):
    with stack.sessions() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.FINISHED and job.finished_at is not None
        assert reason_part in job.failure_reason
        rows = s.scalars(select(Image).where(Image.job_id == job_id)).all()
        assert {im.status for im in rows} <= {ImageStatus.FAILED}
        assert {im.failure_reason for im in rows} <= {job.failure_reason}
        assert (job.queued_count, job.failed_count, job.image_count) == (0, len(rows), len(rows))
        assert jobs.recount(s) == []
    [delivery] = _deliveries(stack, hook_id)
    assert (delivery.job_id, delivery.event) == (job_id, "job.failed")
    assert delivery.payload["job"]["failure_reason"] == job.failure_reason
    assert published.deliveries == [delivery.id]
    return job, rows


def test_a_prefix_listing_that_fails_for_good_ends_the_job_with_its_webhook(
    stack, env, receiver, monkeypatch
):
    """The store's listing raises (not a transient database error) after one page was queued:
    the task gives up at once, the job ends with the reason, its queued images fail, and
    `job.failed` is recorded and published."""
    import captioner.intake.prefixes
    from captioner.storage import StorageError
    from workers.ingest import enumerate_prefix
    from workers.resources import resources

    owner_id, hook_id, _secret = _owner_with_hook(stack, f"{receiver.url}/hook-f", "f@x.org")
    with session_scope(stack.sessions) as s:
        job_id = jobs.create_job(s, "broken", owner_id=owner_id, options={"prefix": "gone/"}).id

    def listing(prefix=""):
        yield from (f"gone/{i}.png" for i in range(3))
        raise StorageError("listing refused by https://user:pw@store.example/b?sig=1")

    monkeypatch.setattr(captioner.intake.prefixes, "PAGE_SIZE", 2)
    monkeypatch.setattr(resources(stack.settings()).store, "list", listing)
    published = _Published(monkeypatch)

    result = enumerate_prefix.apply(args=(job_id,)).get()

    assert result["outcome"] == "failed"
    job, rows = _assert_failed_for_good(stack, job_id, hook_id, published, "StorageError")
    assert len(rows) == 2 and sorted(published.images) == sorted(im.id for im in rows)
    assert job.failure_reason == result["reason"]
    assert "enumerating the prefix" in job.failure_reason
    # URLs in the reason are redacted to scheme, host and path.
    assert "https://store.example/b" in job.failure_reason
    assert "pw" not in job.failure_reason and "sig=" not in job.failure_reason

    # A redelivered message finds the job ended: nothing changes, nothing is recorded twice.
    assert enumerate_prefix.apply(args=(job_id,)).get()["outcome"] == "failed"
    assert len(_deliveries(stack, hook_id)) == 1


def test_a_url_fetch_that_keeps_hitting_database_errors_fails_after_its_retries(
    stack, env, receiver, monkeypatch
):
    """A transient database error is retried `task_max_retries` times; then the job ends."""
    from sqlalchemy.exc import OperationalError

    import captioner.intake.fetch
    from captioner.settings import reset_settings
    from workers.ingest import fetch_urls

    monkeypatch.setenv("CAPTIONER_TASK_MAX_RETRIES", "2")
    reset_settings()
    owner_id, hook_id, _secret = _owner_with_hook(stack, f"{receiver.url}/hook-g", "g@x.org")
    urls = [f"{receiver.url}/img/never-{i}.png" for i in range(2)]
    with session_scope(stack.sessions) as s:
        job_id = jobs.create_job(s, "flaky db", owner_id=owner_id, options={"urls": urls}).id
    calls = []

    def body(job_id, **_kwargs):
        calls.append(job_id)
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(captioner.intake.fetch, "run_fetch_urls", body)
    published = _Published(monkeypatch)

    result = fetch_urls.apply(args=(job_id,)).get()

    assert len(calls) == 3  # the first try and two retries
    assert result["outcome"] == "failed"
    job, rows = _assert_failed_for_good(stack, job_id, hook_id, published, "OperationalError")
    assert rows == [] and "fetching the URLs" in job.failure_reason


# --- webhooks -------------------------------------------------------------------------------------


def test_worker_finishing_a_job_delivers_one_signed_event_with_retry(stack, worker, receiver):
    owner_id, hook_id, secret = _owner_with_hook(stack, f"{receiver.url}/hook-a", "a@example.com")
    receiver.codes.append(503)  # the first attempt fails: retried after the backoff
    for i in range(5):
        stack.store.put(f"hooked/{i}.png", png(20 + i))
    with session_scope(stack.sessions) as s:
        job_id = jobs.create_job(s, "hooked", owner_id=owner_id).id
        ids = jobs.submit_images(s, job_id, [f"hooked/{i}.png" for i in range(5)])
    from captioner.tasks import publish_caption_batches

    publish_caption_batches(job_id, ids, settings=stack.settings())

    wait_for(
        lambda: len(receiver.posts_to("/hook-a")) >= 2, 60, what="webhook retried and delivered"
    )
    # the receiver records a post before it answers; the worker saves the outcome after the answer
    wait_for(
        lambda: _deliveries(stack, hook_id)[0].status != WebhookStatus.PENDING,
        30,
        what="delivery outcome saved",
    )
    [delivery] = _deliveries(stack, hook_id)
    assert delivery.status == WebhookStatus.DELIVERED
    assert delivery.attempts == 2 and delivery.response_status == 200
    posts = receiver.posts_to("/hook-a")
    assert len(posts) == 2
    for headers, body in posts:
        assert webhooks.verify(secret, body, headers)
        assert headers[webhooks.EVENT_HEADER] == "job.completed"
        event = json.loads(body)
        assert event["event"] == "job.completed"
        assert event["job"]["id"] == job_id and event["job"]["captioned_count"] == 5
    assert not webhooks.verify(webhooks.new_secret(), posts[-1][1], posts[-1][0])


def test_deliver_webhook_task_refuses_an_unsafe_url_without_retrying(stack, env):
    # Not allow-listed, link-local: refused at delivery time, failed at once, never POSTed.
    owner_id, hook_id, _ = _owner_with_hook(stack, "http://169.254.169.254/hook", "b@example.com")
    with session_scope(stack.sessions) as s:
        job = jobs.create_job(s, "done", owner_id=owner_id)
        jobs.submit_images(s, job.id, ["x/1.png"])
        [image_id] = images.claim_images(s, worker_id="t", lease_seconds=60, job_id=job.id)
        images.fail_image(s, image_id, "test")
        assert jobs.finish_completed_jobs(s) == [job.id]
        [delivery_id] = outbox.record_job_events(s, [job.id])

    from workers.deliveries import deliver_webhook

    result = deliver_webhook.apply(args=(delivery_id,)).get()
    assert result["outcome"] == "failed" and "169.254.169.254" in result["error"]
    [row] = _deliveries(stack, hook_id)
    assert row.event == "job.failed"  # nothing captioned
    assert row.status == WebhookStatus.FAILED and row.attempts == 1
    # Run again (a duplicate message): no second attempt.
    assert deliver_webhook.apply(args=(delivery_id,)).get()["outcome"] == "failed"
    assert _deliveries(stack, hook_id)[0].attempts == 1


def test_sweeper_records_events_for_jobs_it_finishes_and_resends_overdue(
    stack, worker, receiver, env
):
    owner_id, hook_id, secret = _owner_with_hook(stack, f"{receiver.url}/hook-c", "c@example.com")
    with session_scope(stack.sessions) as s:
        # A job whose images were all done but that nobody finished (its worker died).
        orphan = jobs.create_job(s, "orphan", owner_id=owner_id)
        jobs.submit_images(s, orphan.id, ["o/1.png"])
        [image_id] = images.claim_images(s, worker_id="gone", lease_seconds=60, job_id=orphan.id)
        images.fail_image(s, image_id, "test")
        # A finished job whose delivery message was lost an hour ago.
        lost = jobs.create_job(s, "lost", owner_id=owner_id)
        jobs.submit_images(s, lost.id, ["l/1.png"])
        [image_id] = images.claim_images(s, worker_id="gone", lease_seconds=60, job_id=lost.id)
        images.fail_image(s, image_id, "test")
        assert jobs.finish_completed_jobs(s) == [orphan.id, lost.id]
        [lost_delivery] = outbox.record_job_events(s, [lost.id])
        s.get(WebhookDelivery, lost_delivery).next_attempt_at = utcnow() - timedelta(hours=1)
        # ... and orphan is re-opened as unfinished, for the sweeper to find.
        s.get(Job, orphan.id).status = JobStatus.RUNNING
        orphan_id, lost_id = orphan.id, lost.id

    from workers.sweep import run_sweep

    summary = run_sweep()
    assert summary["jobs_finished"] == 1
    assert summary["webhooks_recorded"] == 1 and summary["webhooks_resent"] == 1

    wait_for(lambda: len(receiver.posts_to("/hook-c")) >= 2, 60, what="both deliveries")
    posts = receiver.posts_to("/hook-c")
    assert sorted(json.loads(b)["job"]["id"] for _, b in posts) == sorted([orphan_id, lost_id])
    assert all(webhooks.verify(secret, b, h) for h, b in posts)
    wait_for(
        lambda: all(d.status == WebhookStatus.DELIVERED for d in _deliveries(stack, hook_id)),
        30,
        what="deliveries marked delivered",
    )
    # A second sweep finds nothing to finish, record or re-send.
    again = run_sweep()
    assert again["jobs_finished"] == 0 and again["webhooks_recorded"] == 0
    assert again["webhooks_resent"] == 0
    assert len(_deliveries(stack, hook_id)) == 2


def test_sweeper_resends_an_export_whose_message_was_lost_and_leaves_a_live_one(stack, worker, env):
    from captioner.state import exports
    from captioner.state.models import Export, ExportStatus, User
    from workers.sweep import run_sweep

    with session_scope(stack.sessions) as s:
        owner = User(email="exporter@example.com", name="exporter")
        s.add(owner)
        s.flush()
        job = jobs.create_job(s, "to export", owner_id=owner.id)
        jobs.submit_images(s, job.id, ["e/1.png", "e/2.png"])
        # Queued an hour ago, its message lost (Redis flushed before a worker took it).
        lost = exports.create_export(s, owner_id=owner.id, fmt="jsonl", job_id=job.id)
        lost.created_at = utcnow() - timedelta(hours=1)
        # Being written right now by a live worker: not to be sent again.
        live = exports.create_export(s, owner_id=owner.id, fmt="csv", job_id=job.id)
        assert exports.start_export(s, live.id)
        lost_id, live_id = lost.id, live.id

    summary = run_sweep()
    assert summary["exports_resent"] == 1

    def written():
        with stack.sessions() as s:
            return s.get(Export, lost_id).status == ExportStatus.DONE

    wait_for(written, 60, what="the lost export written")
    with stack.sessions() as s:
        assert s.get(Export, live_id).status == ExportStatus.RUNNING
        # A duplicate message for the live export changes nothing while it runs.
        assert not exports.start_export(s, live_id, restart_after=timedelta(minutes=30))
    assert run_sweep()["exports_resent"] == 0


def test_a_running_export_restarts_only_after_its_time_limit():
    import tempfile
    from datetime import datetime

    from sqlalchemy import create_engine

    from captioner.state import exports, migrate
    from captioner.state.db import make_sessionmaker
    from captioner.state.models import Export, ExportStatus, User

    with tempfile.TemporaryDirectory() as root:
        url = f"sqlite:///{root}/x.db"
        migrate.upgrade(url)
        sessions = make_sessionmaker(create_engine(url))
        with session_scope(sessions) as s:
            owner = User(email="r@example.com", name="r")
            s.add(owner)
            s.flush()
            export_id = exports.create_export(s, owner_id=owner.id, fmt="jsonl").id
        t0 = datetime(2026, 1, 1, tzinfo=utcnow().tzinfo)
        limit = timedelta(minutes=30)
        with session_scope(sessions) as s:
            assert exports.start_export(s, export_id, now=t0, restart_after=limit)
            assert not exports.start_export(s, export_id, now=t0 + limit / 2, restart_after=limit)
            assert exports.start_export(s, export_id, now=t0 + 2 * limit, restart_after=limit)
        with sessions() as s:
            row = s.get(Export, export_id)
            assert row.status == ExportStatus.RUNNING and row.started_at == t0 + 2 * limit
