"""Approval in bulk and by selection, on SQLite and PostgreSQL: the threshold approval's
preview (no writes), confirm and undo as one batch; the review grid's "approve selected";
"Try one image" jobs left out of the jobs lists; the job page's rows.

The API tests run the dashboard in-process (Flask's test client) over a migrated database of
each backend; captions are recorded as a worker records them (tests/dashboard_helpers.py).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from dashboard_helpers import (
    PASSWORD,
    active_version,
    fake_caption,
    image_ids,
    login,
    make_user,
    png,
)
from sqlalchemy import func, select

from captioner.state import images, jobs, reviews
from captioner.state.db import session_scope
from captioner.state.models import Image, Job, Review, ReviewDecision, User


@pytest.fixture
def app(migrated_url, tmp_path, publisher):
    """The dashboard over a migrated database, once per backend."""
    from captioner.settings import Settings
    from dashboard import create_app

    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=migrated_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        secret_key="test-secret",
        submit_rate_limit="1000/minute",
        login_rate_limit="1000/minute",
    )
    app = create_app(settings, publisher=publisher)
    app.config["TESTING"] = True
    yield app
    app.extensions["captioner"].engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def users(app):
    return {
        "admin": make_user(app, "admin@example.com", "admin"),
        "reviewer": make_user(app, "rev@example.com", "reviewer"),
        "other": make_user(app, "rev2@example.com", "reviewer"),
        "alice": make_user(app, "alice@example.com", "submitter"),
    }


SCORES = [-0.2, -2.0, -1.0, -0.5, -0.9]


def _job(app, client, owner, scores=SCORES) -> tuple[int, list[int]]:
    """A job of distinct images captioned with these scores; its id and image ids in order."""
    files = [(f"img{i}.png", png((i * 40 % 256, len(scores), 90))) for i in range(len(scores))]
    data = {"files": [(io.BytesIO(content), name) for name, content in files]}
    r = client.post(
        "/api/v1/jobs/upload", data=data, headers=owner.headers, content_type="multipart/form-data"
    )
    assert r.status_code == 202, r.json
    job_id = r.json["id"]
    fake_caption(app, job_id, texts=[f"caption {i}" for i in range(len(scores))], scores=scores)
    return job_id, image_ids(app, job_id)


def _count_reviews(app) -> int:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        return session.scalar(select(func.count()).select_from(Review))


def _queue(client, account, job_id) -> list[int]:
    r = client.get(f"/api/v1/review/queue?job_id={job_id}", headers=account.headers)
    return [item["id"] for item in r.json["items"]]


def _unreviewed_count(app, job_id) -> int:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        return session.get(Job, job_id).unreviewed_count


def test_preview_confirm_and_undo_the_batch(app, client, users):
    job_id, ids = _job(app, client, users["alice"])
    rev = users["reviewer"].headers
    by_score = dict(zip(SCORES, ids, strict=True))

    # The preview writes nothing: how many, and the lowest scoring of them first.
    preview = client.get(f"/api/v1/jobs/{job_id}/approve-above?min_score=-1&sample=2", headers=rev)
    assert preview.status_code == 200, preview.json
    assert (preview.json["count"], preview.json["count_exact"]) == (4, True)
    sample = preview.json["sample"]
    assert [i["id"] for i in sample] == [by_score[-1.0], by_score[-0.9]]
    assert sample[0]["caption"]["text"] == "caption 2"
    assert sample[0]["content_url"] == f"/api/v1/images/{by_score[-1.0]}/content"
    assert _count_reviews(app) == 0 and len(_queue(client, users["reviewer"], job_id)) == 5

    # Confirm: the same four are approved, as one batch.
    r = client.post(f"/api/v1/jobs/{job_id}/approve-above", json={"min_score": -1.0}, headers=rev)
    assert r.status_code == 200 and r.json["count"] == 4
    batch = r.json["batch"]
    assert _queue(client, users["reviewer"], job_id) == [by_score[-2.0]]
    assert _unreviewed_count(app, job_id) == 1

    # Someone corrects one of them afterwards: the undo leaves that one alone.
    corrected = by_score[-0.5]
    r = client.post(
        f"/api/v1/images/{corrected}/reviews",
        json={"decision": "corrected", "text": "a better caption"},
        headers=users["other"].headers,
    )
    assert r.status_code == 201

    undo = client.post(f"/api/v1/jobs/{job_id}/approve-undo", json={"batch": batch}, headers=rev)
    assert undo.status_code == 200 and undo.json == {"count": 3}
    back = {by_score[s] for s in (-0.2, -1.0, -0.9)}
    assert set(_queue(client, users["reviewer"], job_id)) == back | {by_score[-2.0]}
    assert _unreviewed_count(app, job_id) == 4
    current = client.get(f"/api/v1/images/{corrected}", headers=rev).json["review"]
    assert (current["decision"], current["text"]) == ("corrected", "a better caption")
    history = client.get(f"/api/v1/images/{by_score[-0.2]}/reviews", headers=rev).json["items"]
    assert [h["decision"] for h in history] == ["approved", "undone"]
    assert history[1]["undoes_id"] == history[0]["id"]
    assert history[1]["reviewer"] == "rev@example.com"

    # Undoing twice takes back nothing more.
    again = client.post(f"/api/v1/jobs/{job_id}/approve-undo", json={"batch": batch}, headers=rev)
    assert again.json == {"count": 0}
    assert _unreviewed_count(app, job_id) == 4


def test_nothing_to_approve_gives_no_batch(app, client, users):
    job_id, _ = _job(app, client, users["alice"], scores=[-3.0, -4.0])
    rev = users["reviewer"].headers
    preview = client.get(f"/api/v1/jobs/{job_id}/approve-above?min_score=0", headers=rev).json
    assert (preview["count"], preview["sample"]) == (0, [])
    r = client.post(f"/api/v1/jobs/{job_id}/approve-above", json={"min_score": 0}, headers=rev)
    assert r.json == {"count": 0, "batch": None}


def test_undo_refusals_and_who_may_undo(app, client, users):
    job_id, _ = _job(app, client, users["alice"])
    other_job, _ = _job(app, client, users["alice"], scores=[-0.1])
    rev, other, admin = (users[k].headers for k in ("reviewer", "other", "admin"))
    batch = client.post(
        f"/api/v1/jobs/{job_id}/approve-above", json={"min_score": -1.0}, headers=rev
    ).json["batch"]
    url = f"/api/v1/jobs/{job_id}/approve-undo"

    for junk in ("not-a-batch", "AAAA", batch[:-3]):
        r = client.post(url, json={"batch": junk}, headers=rev)
        assert r.status_code == 422 and "approval batch" in r.json["message"]
    r = client.post(f"/api/v1/jobs/{other_job}/approve-undo", json={"batch": batch}, headers=rev)
    assert r.status_code == 422 and f"job {job_id}" in r.json["message"]
    r = client.post(url, json={"batch": batch}, headers=other)
    assert r.status_code == 403 and "reviewer who approved" in r.json["message"]
    r = client.post(url, json={"batch": batch}, headers=users["alice"].headers)
    assert r.status_code == 403
    assert (
        client.post("/api/v1/jobs/999999/approve-undo", json={"batch": batch}, headers=rev)
    ).status_code == 404
    preview = client.get(f"/api/v1/jobs/{job_id}/approve-above", headers=rev)
    assert preview.status_code == 422  # min_score is required
    r = client.get(
        f"/api/v1/jobs/{job_id}/approve-above?min_score=-1", headers=users["alice"].headers
    )
    assert r.status_code == 403
    # An admin may undo another reviewer's batch.
    assert client.post(url, json={"batch": batch}, headers=admin).json == {"count": 4}


def test_batch_names_only_its_own_rows(session):
    """Approvals by the same reviewer at another moment, or by someone else in the id range,
    are not part of the batch; the batch survives its encoding to the microsecond."""
    job = jobs.create_job(session, "batch", source="upload")
    ids = jobs.submit_images(session, job.id, [f"b/{i}.png" for i in range(4)])
    user = User(email="batch@example.com")
    session.add(user)
    session.flush()
    version = active_version(session)
    for image_id, score in zip(ids, [-0.1, -0.2, -0.3, -5.0], strict=True):
        images.save_caption(
            session, image_id=image_id, model_version_id=version, text=f"t{image_id}", score=score
        )
    at = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    batch = reviews.approve_batch(
        session, job_id=job.id, min_score=-1.0, reviewer_id=user.id, now=at
    )
    assert batch.count == 3
    decoded = reviews.ApprovalBatch.decode(batch.encode())
    assert (decoded.job_id, decoded.reviewer_id, decoded.created_at) == (job.id, user.id, at)
    assert (decoded.first_review_id, decoded.last_review_id) == (
        batch.first_review_id,
        batch.last_review_id,
    )
    # A later manual approval by the same reviewer is not in the batch.
    manual = reviews.add_review(
        session, image_id=ids[3], decision="approved", text="by hand", reviewer_id=user.id
    )
    wider = reviews.ApprovalBatch(job.id, user.id, batch.first_review_id, manual.id, at)
    assert reviews.undo_approval_batch(session, wider, reviewer_id=user.id) == 3
    assert reviews.current_review(session, ids[3]).decision == ReviewDecision.APPROVED
    for image_id in ids[:3]:
        assert reviews.current_review(session, image_id).decision == ReviewDecision.UNDONE
    session.expire_all()
    awaiting = session.scalar(
        select(func.count()).where(Image.job_id == job.id, Image.review_score.is_not(None))
    )
    assert session.get(Job, job.id).unreviewed_count == awaiting == 3
    # Another moment: nothing matches.
    later = reviews.ApprovalBatch(
        job.id, user.id, batch.first_review_id, batch.last_review_id, datetime.now(UTC)
    )
    assert reviews.undo_approval_batch(session, later) == 0


def test_approve_selected_skips_images_reviewed_meanwhile(app, client, users):
    job_id, ids = _job(app, client, users["alice"])
    rev = users["reviewer"].headers
    items = client.get(f"/api/v1/review/queue?job_id={job_id}", headers=rev).json["items"]
    picks = [{"image_id": i["id"], "caption_id": i["caption"]["id"]} for i in items[:3]]
    # The second one is rejected by another reviewer before the approval arrives.
    client.post(
        f"/api/v1/images/{picks[1]['image_id']}/reviews",
        json={"decision": "rejected"},
        headers=users["other"].headers,
    )
    r = client.post("/api/v1/review/approve", json={"items": picks}, headers=rev)
    assert r.status_code == 200, r.json
    assert [a["image_id"] for a in r.json["items"]] == [picks[0]["image_id"], picks[2]["image_id"]]
    assert all(
        a["decision"] == "approved" and a["reviewer"] == "rev@example.com" for a in r.json["items"]
    )
    assert r.json["items"][0]["text"] == items[0]["caption"]["text"]
    assert r.json["skipped"] == [picks[1]["image_id"]]
    rejected = client.get(f"/api/v1/images/{picks[1]['image_id']}", headers=rev).json["review"]
    assert rejected["decision"] == "rejected"
    assert set(_queue(client, users["reviewer"], job_id)) == {i["id"] for i in items[3:]}
    assert _unreviewed_count(app, job_id) == 2
    # Twice: both are skipped now.
    again = client.post("/api/v1/review/approve", json={"items": picks[:1]}, headers=rev).json
    assert (again["items"], again["skipped"]) == ([], [picks[0]["image_id"]])


def test_approve_selected_refusals(app, client, users):
    job_id, ids = _job(app, client, users["alice"], scores=[-1.0, -2.0])
    rev = users["reviewer"].headers
    items = client.get(f"/api/v1/review/queue?job_id={job_id}", headers=rev).json["items"]
    wrong = {"image_id": items[0]["id"], "caption_id": items[1]["caption"]["id"]}
    r = client.post("/api/v1/review/approve", json={"items": [wrong]}, headers=rev)
    assert r.status_code == 422 and "is not a caption of image" in r.json["message"]
    missing = {"image_id": 999_999, "caption_id": items[0]["caption"]["id"]}
    r = client.post("/api/v1/review/approve", json={"items": [missing]}, headers=rev)
    assert r.status_code == 404 and "999999" in r.json["message"]
    assert client.post("/api/v1/review/approve", json={"items": []}, headers=rev).status_code == 422
    pick = {"image_id": items[0]["id"], "caption_id": items[0]["caption"]["id"]}
    r = client.post(
        "/api/v1/review/approve", json={"items": [pick]}, headers=users["alice"].headers
    )
    assert r.status_code == 403
    assert _count_reviews(app) == 0


def test_tries_are_left_out_of_the_jobs_lists(app, client, users):
    alice = users["alice"]
    listed_before, _ = _job(app, client, alice, scores=[-1.0])
    r = client.post(
        "/api/v1/try",
        data={"file": (io.BytesIO(png((1, 2, 3))), "mine.png")},
        headers=alice.headers,
        content_type="multipart/form-data",
    )
    assert r.status_code == 202, r.json
    tried = r.json
    assert (tried["source"], tried["options"]["try"], tried["options"]["interactive"]) == (
        "try",
        True,
        True,
    )
    assert tried["name"] == "try: mine.png"
    # A job whose source happens to be "try" but is no try (a storage prefix named so) is listed.
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        prefix_job = jobs.create_job(
            session, "prefix", source="try", options={"prefix": "try"}, owner_id=alice.id
        ).id
    listing = client.get("/api/v1/jobs", headers=alice.headers).json
    assert [j["id"] for j in listing["items"]] == [prefix_job, listed_before]
    assert listing["total"] == 2
    assert client.get(f"/api/v1/jobs/{tried['id']}", headers=alice.headers).status_code == 200
    images_of_try = client.get(f"/api/v1/jobs/{tried['id']}/images", headers=alice.headers).json
    assert [i["original_name"] for i in images_of_try["items"]] == ["mine.png"]
    login(client, alice.email, PASSWORD)
    page = client.get("/jobs").data.decode()
    assert f'data-job-id="{listed_before}"' in page and f'data-job-id="{prefix_job}"' in page
    assert f'data-job-id="{tried["id"]}"' not in page
    # A refused file is a 422 with the reason.
    r = client.post(
        "/api/v1/try",
        data={"file": (io.BytesIO(b"not an image"), "x.png")},
        headers=alice.headers,
        content_type="multipart/form-data",
    )
    assert r.status_code == 422 and "x.png" in r.json["message"]


def test_job_page_rows_show_thumbnail_caption_and_review(app, client, users):
    job_id, ids = _job(app, client, users["alice"], scores=[-1.0, -2.0])
    client.post(
        f"/api/v1/images/{ids[0]}/reviews",
        json={"decision": "rejected"},
        headers=users["reviewer"].headers,
    )
    login(client, "rev@example.com", PASSWORD)
    page = client.get(f"/jobs/{job_id}").data.decode()
    assert f'src="/api/v1/images/{ids[0]}/content"' in page
    assert "caption 0" in page and "(-1.000)" in page
    assert 'class="decision-rejected">rejected' in page and "unreviewed" in page
    assert 'id="job-cancel"' not in page  # the job is finished
    assert 'id="approve-form"' in page and f"/grid?job_id={job_id}" in page
    grid = client.get(f"/grid?job_id={job_id}")
    assert grid.status_code == 200 and b'id="grid"' in grid.data
    login(client, "alice@example.com", PASSWORD)
    assert client.get("/grid").status_code == 403
