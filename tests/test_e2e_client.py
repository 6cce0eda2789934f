"""End to end through `captioner.client`, every part a real process: a running dashboard
(werkzeug HTTP server) and a `captioner worker` (Celery on Redis, the tiny untrained model),
driven by the Python client as a program would: submit, wait, list, review, export, import.

The same flow as tests/test_e2e_submit.py (which drives the `captioner submit` command).
"""

from __future__ import annotations

import json

from captioner.client import CaptionerClient, NotFound, SubmitOptions
from captioner.state import jobs, migrate
from captioner.state.db import session_scope
from captioner.state.models import (
    ApiToken,
    ImageStatus,
    JobStatus,
    ReviewDecision,
    UserRole,
)
from tests.conftest import free_port
from tests.live_server import DashboardProcess
from tests.workers_fixtures import Stack, WorkerProcess, png, write_checkpoint

N_FILES = 12
SHARED = "shared/"


def test_the_client_submits_waits_lists_reviews_exports_and_imports(tmp_path, redis_dbs):
    root = tmp_path
    database_url = f"sqlite:///{root / 'captioner.db'}"
    migrate.upgrade(database_url)
    settings_env = {
        "CAPTIONER_DATA_DIR": str(root / "var"),
        "CAPTIONER_DATABASE_URL": database_url,
        "CAPTIONER_REDIS_URL": redis_dbs.flushed("main"),
        "CAPTIONER_STORAGE_URL": f"file://{root / 'objects'}",
        "CAPTIONER_SECRET_KEY": "e2e-secret",
        "CAPTIONER_SOURCE_PREFIXES": json.dumps([SHARED]),
    }
    stack = Stack(
        root=root,
        database_url=database_url,
        redis_url=settings_env["CAPTIONER_REDIS_URL"],
        checkpoint=write_checkpoint(root / "ckpt"),
        extra_env=settings_env | {"CAPTIONER_METRICS_PORT": str(free_port())},
    )
    from captioner.accounts import create_user

    with session_scope(stack.sessions) as s:
        admin = create_user(s, "admin@example.com", "e2e password", role=UserRole.ADMIN)
        token, row = ApiToken.issue(admin.id, "e2e")
        s.add(row)

    folder = root / "photos"
    folder.mkdir()
    for i in range(N_FILES):
        (folder / f"img-{i:03d}.png").write_bytes(png(i))
    for i in range(3):  # objects already in the store, submitted by key with external ids
        stack.store.put(f"{SHARED}k/{i}.png", png(100 + i))

    dashboard = DashboardProcess(settings_env, root / "dashboard.log")
    worker = WorkerProcess(stack, "e2e-client")
    try:
        dashboard.wait_ready()
        worker.wait_ready()
        with CaptionerClient(dashboard.url, token, timeout=120) as client:
            _submit_wait_list_review_export(client, folder, root, worker)
            _import_review_export(client, root)
            try:
                client.job(2**31 - 1)
                raise AssertionError("a job that does not exist was found")
            except NotFound as exc:
                assert exc.status == 404
        with stack.sessions() as s:
            assert jobs.recount(s) == []  # every counter matches its rows
        assert worker.alive()
    finally:
        worker.stop()
        dashboard.stop()
        stack.close()
        redis_dbs.flushed("main")


def _submit_wait_list_review_export(client, folder, root, worker) -> None:
    seen: list[int] = []
    job = client.submit_folder(folder, SubmitOptions(name="client e2e"))
    job = client.wait(
        job.id, timeout=300, poll=0.5, progress=lambda j: seen.append(j.progress.done)
    )
    assert job.status == JobStatus.FINISHED, worker.log()[-3000:]
    assert (job.progress.captioned, job.progress.failed) == (N_FILES, 0)
    assert seen == sorted(seen) and seen[-1] == N_FILES  # progress only goes forward
    assert job.id in [j.id for j in client.jobs(page_size=2)]

    listed = list(client.images(job.id, page_size=5))  # three pages
    assert len(listed) == N_FILES and len({i.id for i in listed}) == N_FILES
    assert all(i.status == ImageStatus.CAPTIONED and i.caption for i in listed)
    assert all(i.caption.source == "model" and i.caption.model_version_id for i in listed)

    keyed = client.submit_keys(
        [{"key": f"{SHARED}k/0.png", "external_id": "sku-0"}, f"{SHARED}k/1.png"],
        SubmitOptions(name="by key"),
    )
    keyed = client.wait(keyed.id, timeout=300, poll=0.5)
    assert keyed.progress.captioned == 2, worker.log()[-3000:]
    by_name = {i.original_name: i.external_id for i in client.images(keyed.id)}
    assert by_name == {"0.png": "sku-0", "1.png": None}

    queue = list(client.review_queue(job_id=job.id, page_size=4))
    assert len(queue) == N_FILES
    scores = [i.caption.score for i in queue]
    assert scores == sorted(scores)  # least confident first
    first, second, third = queue[:3]
    client.review(first.id, "approved")
    client.review(second.id, "corrected", "a small square of colour")
    client.review(third.id, ReviewDecision.REJECTED)
    undone = client.undo(third.id)
    assert undone.decision == ReviewDecision.UNDONE
    assert [r.decision for r in client.reviews(third.id)] == [
        ReviewDecision.REJECTED,
        ReviewDecision.UNDONE,
    ]
    assert client.image(second.id).review.text == "a small square of colour"
    assert len(list(client.review_queue(job_id=job.id))) == N_FILES - 2

    out = root / "job.jsonl"
    written = client.export("jsonl", job_id=job.id, to=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == out.stat().st_size and len(rows) == N_FILES
    decisions = {r["image_id"]: (r["review_decision"], r["reviewed_caption"]) for r in rows}
    assert decisions[first.id] == ("approved", first.caption.text)
    assert decisions[second.id] == ("corrected", "a small square of colour")
    assert decisions[third.id] == (None, None)
    reviewed = root / "reviewed.csv"
    client.export("csv", job_id=job.id, which="reviewed", to=reviewed)
    assert len(reviewed.read_text().splitlines()) == 1 + 2  # header, approved, corrected

    keyed_rows = root / "keyed.jsonl"
    client.export("jsonl", job_id=keyed.id, to=keyed_rows)
    exported = {json.loads(line)["file_name"]: json.loads(line) for line in keyed_rows.open()}
    assert exported["0.png"]["external_id"] == "sku-0"


def _import_review_export(client, root) -> None:
    """Captions written elsewhere come in already captioned, never through the worker."""
    rows = [
        {"key": f"{SHARED}k/2.png", "caption": "a photo from elsewhere", "external_id": "ext-2"},
        {"key": f"{SHARED}k/0.png", "caption": "reviewed elsewhere", "review": "approved"},
    ]
    job = client.import_captions(rows, name="imported")
    assert job.status == JobStatus.FINISHED and job.source == "import:imported"
    assert job.progress.captioned == 2
    fresh, approved = client.images(job.id)
    assert fresh.caption.source == "import" and fresh.caption.model_version_id is None
    assert approved.review.decision == ReviewDecision.APPROVED
    [waiting] = client.review_queue(job_id=job.id)
    assert waiting.id == fresh.id
    client.review(fresh.id, "corrected", "a photo of a coloured square")
    out = root / "imported.jsonl"
    client.export("jsonl", job_id=job.id, to=out)
    exported = {r["external_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert exported["ext-2"]["model_caption"] == "a photo from elsewhere"
    assert exported["ext-2"]["reviewed_caption"] == "a photo of a coloured square"
    assert exported[None]["review_decision"] == "approved"
