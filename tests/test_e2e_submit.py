"""End to end, every part a real process: `captioner submit DIR --server URL --wait` against a
running dashboard (werkzeug HTTP server) and a `captioner worker` (Celery on Redis, the tiny
untrained model), with a webhook receiver on an allow-listed loopback port.

Acceptance (issue 6): a folder of 50 images ends with all 50 captioned, and the receiver gets
exactly one `job.completed` whose HMAC signature verifies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from sqlalchemy import func, select

from captioner import webhooks
from captioner.state import migrate
from captioner.state.db import session_scope
from captioner.state.models import (
    ApiToken,
    Caption,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    User,
    UserRole,
    WebhookDelivery,
    WebhookStatus,
)
from tests.conftest import free_port
from tests.live_server import REPO, DashboardProcess, clean_env
from tests.workers_fixtures import Stack, WorkerProcess, png, wait_for

N_IMAGES = 50


def _receiver():
    received: list[tuple[str, dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "captioner.cli", *args],
        cwd=REPO,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_folder_with_wait_captions_all_and_fires_one_signed_webhook(tmp_path, redis_dbs):
    root = tmp_path
    database_url = f"sqlite:///{root / 'captioner.db'}"
    migrate.upgrade(database_url)
    redis_url = redis_dbs.flushed("main")
    receiver, received = _receiver()
    settings_env = {
        "CAPTIONER_DATA_DIR": str(root / "var"),
        "CAPTIONER_DATABASE_URL": database_url,
        "CAPTIONER_REDIS_URL": redis_url,
        "CAPTIONER_STORAGE_URL": f"file://{root / 'objects'}",
        "CAPTIONER_SECRET_KEY": "e2e-secret",
        # The operator trusts the loopback receiver (webhooks refuse loopback otherwise).
        "CAPTIONER_URL_ALLOW_HOSTS": '["127.0.0.1"]',
        "CAPTIONER_WEBHOOK_ALLOW_HOSTS": '["127.0.0.1"]',
    }

    # The model: a tiny untrained checkpoint written by the CLI.
    ckpt = root / "ckpt"
    made = _cli(["init-model", "--preset", "tiny", "--out", str(ckpt)], settings_env)
    assert made.returncode == 0, made.stderr

    # The first admin, from the CLI; an API token for them, straight into the database.
    created = _cli(
        ["user", "create", "admin@example.com", "--role", "admin", "--password", "e2e password"],
        settings_env,
    )
    assert created.returncode == 0, created.stderr
    stack = Stack(
        root=root,
        database_url=database_url,
        redis_url=redis_url,
        checkpoint=ckpt,
        extra_env=settings_env
        | {"CAPTIONER_METRICS_PORT": str(free_port()), "CAPTIONER_CAPTION_MAX_NEW_TOKENS": "4"},
    )
    with session_scope(stack.sessions) as s:
        admin = s.scalar(select(User).where(User.email == "admin@example.com"))
        assert admin.role == UserRole.ADMIN
        token, row = ApiToken.issue(admin.id, "e2e")
        s.add(row)
        admin_id = admin.id

    folder = root / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(N_IMAGES):
        sub = folder / "nested" if i % 5 == 0 else folder
        (sub / f"img-{i:03d}.png").write_bytes(png(i))
    (folder / "notes.txt").write_text("not an image")  # left out by the client

    dashboard = DashboardProcess(settings_env, root / "dashboard.log")
    worker = WorkerProcess(stack, "e2e")
    try:
        dashboard.wait_ready()
        worker.wait_ready()

        # Register the webhook through the API of the running server.
        hook_url = f"http://127.0.0.1:{receiver.server_port}/hooks/captioner"
        response = requests.post(
            dashboard.url + "/api/v1/webhooks",
            json={"url": hook_url, "events": ["job.completed", "job.failed"]},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        secret = response.json()["secret"]

        submitted = _cli(
            ["submit", str(folder), "--server", dashboard.url, "--wait", "--name", "fifty"],
            settings_env | {"CAPTIONER_TOKEN": token},
            timeout=300,
        )
        assert submitted.returncode == 0, (submitted.stdout, submitted.stderr, worker.log()[-3000:])
        assert f"{N_IMAGES} captioned, 0 failed" in submitted.stdout

        with stack.sessions() as s:
            job = s.scalar(select(Job).where(Job.owner_id == admin_id))
            assert job.name == "fifty" and job.status == JobStatus.FINISHED
            assert (job.image_count, job.captioned_count, job.failed_count) == (
                N_IMAGES,
                N_IMAGES,
                0,
            )
            statuses = dict(
                s.execute(
                    select(Image.status, func.count())
                    .where(Image.job_id == job.id)
                    .group_by(Image.status)
                ).all()
            )
            assert statuses == {ImageStatus.CAPTIONED: N_IMAGES}
            captions = s.scalar(
                select(func.count(Caption.id))
                .join(Image, Image.id == Caption.image_id)
                .where(Image.job_id == job.id)
            )
            assert captions == N_IMAGES
            job_id = job.id

        # The webhook: delivered once (the worker sends it after the job's last batch commits).
        def delivered():
            with stack.sessions() as s:
                rows = s.scalars(select(WebhookDelivery)).all()
                return (
                    rows
                    if rows and all(r.status == WebhookStatus.DELIVERED for r in rows)
                    else None
                )

        [delivery] = wait_for(delivered, 60, what="webhook delivered")
        assert delivery.job_id == job_id and delivery.event == "job.completed"
        assert len(received) == 1
        path, headers, body = received[0]
        assert path == "/hooks/captioner"
        assert webhooks.verify(secret, body, headers)
        assert not webhooks.verify(secret, body + b" ", headers)
        event = json.loads(body)
        assert event["event"] == "job.completed"
        assert event["job"]["id"] == job_id
        assert event["job"]["captioned_count"] == N_IMAGES and event["job"]["failed_count"] == 0
        assert worker.alive()
    finally:
        worker.stop()
        dashboard.stop()
        receiver.shutdown()
        receiver.server_close()
        stack.close()
        redis_dbs.flushed("main")
