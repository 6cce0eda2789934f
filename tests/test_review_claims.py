"""Reviewers get different items, and one review per image content, on SQLite and PostgreSQL.

Claims: the review queue claims its first item for the caller and leaves out the items other
reviewers hold; a claim is renewed by its holder, refused to others (409), lasts
`review_claim_seconds` in Redis, and goes with a decision, an undo or the holder's next claim;
with Redis unreachable the queue and the decisions work on, unclaimed.

Same content: a decision on an image is given to the images of the same bytes in the same
owner's other jobs still awaiting review, in the same transaction, counters kept; an undo takes
back what that decision did; another owner's identical image is never touched.

The API tests run the dashboard in-process (Flask's test client) over a migrated database of
each backend, with the test session's private Redis; captions are recorded as a worker records
them (tests/dashboard_helpers.py). The state tests call captioner.state directly.
"""

from __future__ import annotations

import io

import pytest
import redis
from dashboard_helpers import active_version, fake_caption, image_ids, make_user, png
from sqlalchemy import select

from captioner.accounts import create_user
from captioner.state import images, jobs, reviews
from captioner.state.db import session_scope
from captioner.state.models import (
    Caption,
    Image,
    ImageStatus,
    Job,
    Review,
    ReviewDecision,
)
from tests.conftest import free_port


def _settings(tmp_path, database_url: str, redis_url: str, **extra):
    from captioner.settings import Settings

    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        secret_key="test-secret",
        submit_rate_limit="1000/minute",
        login_rate_limit="1000/minute",
        **extra,
    )


def _make_app(settings, publisher):
    from dashboard import create_app

    app = create_app(settings, publisher=publisher)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def redis_url(redis_dbs) -> str:
    return redis_dbs.flushed("main")


@pytest.fixture
def app(migrated_url, tmp_path, publisher, redis_url):
    """The dashboard over a migrated database (once per backend) and the private Redis."""
    app = _make_app(_settings(tmp_path, migrated_url, redis_url), publisher)
    yield app
    app.extensions["captioner"].engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def users(app):
    return {
        "rev1": make_user(app, "rev1@example.com", "reviewer"),
        "rev2": make_user(app, "rev2@example.com", "reviewer"),
        "alice": make_user(app, "alice@example.com", "submitter"),
        "bob": make_user(app, "bob@example.com", "submitter"),
    }


def _upload(app, client, owner, files: list[tuple[str, bytes]]) -> tuple[int, list[int]]:
    """A job of these files, captioned ('caption <name>', ascending scores); id and image ids.
    Bytes the active model captioned before reuse that caption at submission (no worker)."""
    data = {"files": [(io.BytesIO(content), name) for name, content in files]}
    r = client.post(
        "/api/v1/jobs/upload", data=data, headers=owner.headers, content_type="multipart/form-data"
    )
    assert r.status_code == 202, r.json
    job_id = r.json["id"]
    queued = image_ids(app, job_id, ImageStatus.QUEUED)
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        names = {i: session.get(Image, i).original_name for i in queued}
    fake_caption(
        app,
        job_id,
        texts=[f"caption {names[i]}" for i in queued],
        scores=[-2.0 + 0.1 * n for n in range(len(queued))],
    )
    return job_id, image_ids(app, job_id)


def _distinct(n: int, tag: int = 0) -> list[tuple[str, bytes]]:
    return [(f"img{tag}-{k}.png", png((k * 40 % 256, tag, 90))) for k in range(n)]


def _queue(client, account, job_id: int, **params) -> list[int]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    r = client.get(f"/api/v1/review/queue?job_id={job_id}&{query}", headers=account.headers)
    assert r.status_code == 200, r.json
    return [item["id"] for item in r.json["items"]]


def _claim(client, account, image_id: int):
    return client.put(f"/api/v1/images/{image_id}/claim", headers=account.headers)


def _decide(client, account, image_id: int, decision: str = "approved", text=None):
    body = {"decision": decision} | ({"text": text} if text is not None else {})
    r = client.post(f"/api/v1/images/{image_id}/reviews", json=body, headers=account.headers)
    assert r.status_code == 201, r.json
    return r.json


def _undo(client, account, image_id: int):
    r = client.post(f"/api/v1/images/{image_id}/reviews/undo", headers=account.headers)
    assert r.status_code == 201, r.json
    return r.json


def _claim_keys(redis_url: str) -> dict[str, str]:
    """Every image claim in Redis: {image id: holder's user id}."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = list(client.scan_iter("captioner:review-claim:*"))
        return {key.rsplit(":", 1)[1]: client.get(key) for key in keys}
    finally:
        client.close()


# --- claims ----------------------------------------------------------------------------------


def test_two_reviewers_get_different_first_items(app, client, users):
    job_id, ids = _upload(app, client, users["alice"], _distinct(3))
    rev1, rev2 = users["rev1"], users["rev2"]

    first1 = _queue(client, rev1, job_id, claim="true")
    first2 = _queue(client, rev2, job_id, claim="true")
    assert first1 == ids and first2 == ids[1:]
    # The holder's own queue still shows its item; a plain listing shows every item.
    assert _queue(client, rev1, job_id, skip_claimed="true") == [ids[0], ids[2]]
    assert _queue(client, rev1, job_id) == ids
    # The total still counts the claimed items: they await review.
    r = client.get(f"/api/v1/review/queue?job_id={job_id}&claim=true", headers=rev2.headers)
    assert r.json["total"] == 3

    # One reviewer's claim is refused to the other, renewed for its holder.
    refused = _claim(client, rev2, ids[0])
    assert refused.status_code == 409
    assert "another reviewer" in refused.json["message"]
    renewed = _claim(client, rev1, ids[0])
    assert renewed.status_code == 200
    assert renewed.json == {"image_id": ids[0], "claimed": True, "expires_in": 120}


def test_a_reviewer_holds_one_claim_and_a_decision_or_undo_lets_it_go(
    app, client, users, redis_url
):
    job_id, ids = _upload(app, client, users["alice"], _distinct(3))
    rev1, rev2 = users["rev1"], users["rev2"]
    rev1_id = str(rev1.id)

    assert _claim(client, rev1, ids[0]).status_code == 200
    assert _claim_keys(redis_url) == {str(ids[0]): rev1_id}
    # Claiming the next item lets the previous one go.
    assert _claim(client, rev1, ids[1]).status_code == 200
    assert _claim_keys(redis_url) == {str(ids[1]): rev1_id}
    assert _queue(client, rev2, job_id, claim="true")[0] == ids[0]
    assert _claim_keys(redis_url) == {str(ids[1]): rev1_id, str(ids[0]): str(rev2.id)}

    # A decision lets the claim go; the decided item no longer awaits review (409 to claim).
    _decide(client, rev1, ids[1])
    assert _claim_keys(redis_url) == {str(ids[0]): str(rev2.id)}
    gone = _claim(client, rev2, ids[1])
    assert gone.status_code == 409 and "does not await review" in gone.json["message"]

    # An undo puts it back in the queue, unclaimed: the other reviewer can take it.
    _claim(client, rev1, ids[2])
    _undo(client, rev1, ids[1])
    assert str(ids[1]) not in _claim_keys(redis_url)
    assert _claim(client, rev2, ids[1]).status_code == 200
    # ... and claiming it let rev2's earlier claim go.
    assert _queue(client, rev1, job_id, skip_claimed="true") == [ids[0], ids[2]]


def test_a_claim_expires(app, client, users, redis_url):
    """Redis expires the claim after `review_claim_seconds`: the key carries that time to live,
    and once Redis has expired it (brought forward here) the item is free for anyone."""
    job_id, ids = _upload(app, client, users["alice"], _distinct(2))
    rev1, rev2 = users["rev1"], users["rev2"]
    assert _queue(client, rev1, job_id, claim="true")[0] == ids[0]
    assert _queue(client, rev2, job_id, skip_claimed="true") == ids[1:]

    r = redis.Redis.from_url(redis_url)
    try:
        [key] = r.keys("captioner:review-claim:*")
        assert 0 < r.ttl(key) <= 120
        r.pexpire(key, 1)
        while r.exists(key):  # Redis's own expiry; no assertion on how long it takes
            pass
    finally:
        r.close()
    assert _queue(client, rev2, job_id, claim="true") == ids
    assert _claim(client, rev1, ids[0]).status_code == 409


def test_claims_are_not_shared_between_databases(tmp_path, redis_url):
    """Two deployments over different databases sharing one Redis see none of each other's
    claims: the keys are named after the database."""
    from captioner.settings import Settings
    from dashboard.claims import ReviewClaims

    def claims(name: str) -> ReviewClaims:
        settings = Settings(database_url=f"sqlite:///{tmp_path / name}", redis_url=redis_url)
        return ReviewClaims.from_settings(settings)

    one, other = claims("one.db"), claims("other.db")
    assert one.claim(5, user_id=1).claimed
    assert one.held_by_others([5], user_id=2) == {5}
    assert other.held_by_others([5], user_id=2) == set()
    assert other.claim(5, user_id=2).claimed
    assert one.claim(5, user_id=2).held_by == 1


def test_redis_down_the_queue_and_decisions_work_unclaimed(
    migrated_url, tmp_path, publisher, caplog
):
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = _make_app(_settings(tmp_path, migrated_url, down), publisher)
    client = app.test_client()
    try:
        rev1 = make_user(app, "rev1@example.com", "reviewer")
        rev2 = make_user(app, "rev2@example.com", "reviewer")
        alice = make_user(app, "alice@example.com", "submitter")
        job_id, ids = _upload(app, client, alice, _distinct(3))

        assert _queue(client, rev1, job_id, claim="true") == ids
        assert _queue(client, rev2, job_id, claim="true") == ids
        claim = _claim(client, rev2, ids[0])
        assert claim.status_code == 200
        assert claim.json == {"image_id": ids[0], "claimed": False, "expires_in": 0}
        _decide(client, rev1, ids[0])
        _undo(client, rev1, ids[0])
        _decide(client, rev2, ids[1], "rejected")
        assert _queue(client, rev1, job_id, skip_claimed="true") == [ids[0], ids[2]]
        assert "review claims unavailable" in caplog.text
    finally:
        app.extensions["captioner"].engine.dispose()


def test_claims_need_the_reviewer_role_and_a_visible_image(app, client, users):
    job_id, ids = _upload(app, client, users["alice"], _distinct(1))
    assert _claim(client, users["alice"], ids[0]).status_code == 403
    assert _claim(client, users["rev1"], ids[-1] + 1000).status_code == 404
    # An image not captioned yet does not await review.
    r = client.post(
        "/api/v1/jobs/upload",
        data={"files": [(io.BytesIO(png((1, 2, 3))), "new.png")]},
        headers=users["alice"].headers,
        content_type="multipart/form-data",
    )
    [queued] = image_ids(app, r.json["id"])
    assert _claim(client, users["rev1"], queued).status_code == 409


# --- one review per image content -------------------------------------------------------------


def _current(app, image_id: int) -> Review | None:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        review = reviews.current_review(session, image_id)
        if review is not None:
            session.expunge(review)
        return review


def _unreviewed(app, *job_ids: int) -> list[int]:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        return [session.get(Job, j).unreviewed_count for j in job_ids]


def _no_drift(app) -> None:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        assert jobs.recount(session) == []


def test_the_same_image_in_two_jobs_is_reviewed_once(app, client, users):
    alice, bob, rev = users["alice"], users["bob"], users["rev1"]
    same = png((7, 7, 7))
    job_a, (same_a, other_a) = _upload(app, client, alice, [("x.png", same), ("p.png", png())])
    job_b, (same_b, other_b) = _upload(
        app, client, alice, [("x-again.png", same), ("q.png", png((1, 200, 1)))]
    )
    job_c, [same_c] = _upload(app, client, bob, [("bobs.png", same)])
    assert _unreviewed(app, job_a, job_b, job_c) == [2, 2, 1]

    approved = _decide(client, rev, same_a)
    # The other job's copy got the same decision in the same transaction; bob's did not.
    twin = _current(app, same_b)
    assert (twin.decision, twin.text, twin.reviewer_id) == (
        ReviewDecision.APPROVED,
        approved["text"],
        rev.id,
    )
    assert _current(app, same_c) is None
    assert _unreviewed(app, job_a, job_b, job_c) == [1, 1, 1]
    assert same_b not in _queue(client, rev, job_b)
    assert _queue(client, rev, job_c) == [same_c]
    _no_drift(app)

    # Undo takes back both; bob's image is still untouched.
    _undo(client, rev, same_a)
    assert _current(app, same_a).decision == ReviewDecision.UNDONE
    assert _current(app, same_b).decision == ReviewDecision.UNDONE
    assert _current(app, same_c) is None
    assert _unreviewed(app, job_a, job_b, job_c) == [2, 2, 1]
    assert set(_queue(client, rev, job_b)) == {same_b, other_b}
    _no_drift(app)

    # A decision on the copy is shared the other way round; a correction stays a correction.
    _decide(client, rev, same_b, "corrected", "a grey square")
    twin = _current(app, same_a)
    assert (twin.decision, twin.text) == (ReviewDecision.CORRECTED, "a grey square")
    assert _current(app, same_c) is None
    # A decision on bob's image touches none of alice's.
    _decide(client, rev, same_c, "rejected")
    assert _current(app, same_a).decision == ReviewDecision.CORRECTED
    assert _current(app, other_a) is None and _current(app, other_b) is None
    _no_drift(app)


def test_undo_leaves_a_twin_decided_since(app, client, users):
    alice, rev1, rev2 = users["alice"], users["rev1"], users["rev2"]
    same = png((9, 9, 9))
    _, [first] = _upload(app, client, alice, [("x.png", same)])
    _, [second] = _upload(app, client, alice, [("y.png", same)])

    _decide(client, rev1, first)
    assert _current(app, second).decision == ReviewDecision.APPROVED
    # Someone corrects the copy afterwards: undoing the first decision leaves that alone.
    _decide(client, rev2, second, "corrected", "nine grey pixels")
    _undo(client, rev1, first)
    assert _current(app, first).decision == ReviewDecision.UNDONE
    current = _current(app, second)
    assert (current.decision, current.text) == (ReviewDecision.CORRECTED, "nine grey pixels")
    _no_drift(app)


# --- captioner.state: sharing, the queue walk with skipped keys --------------------------------


def _captioned(session, owner_id, items, version) -> list[int]:
    """A job of `owner_id` with one captioned image per (content hash, caption text)."""
    job = jobs.create_job(session, "j", owner_id=owner_id)
    specs = [
        jobs.ImageSpec(f"k/{job.id}/{n}", original_name=f"{n}.png", content_sha256=sha)
        for n, (sha, _) in enumerate(items)
    ]
    ids = jobs.submit_images(session, job.id, specs)
    images.claim_images(session, worker_id="t", lease_seconds=60, job_id=job.id)
    for n, (image_id, (_, text)) in enumerate(zip(ids, items, strict=True)):
        images.complete_image(
            session, image_id=image_id, model_version_id=version, text=text, score=-1.0 + n
        )
    return ids


def _two_owners(session):
    """Two submitters, alice and bob, and the active model version."""
    alice = create_user(session, "alice@example.com", "pw-123456789", role="submitter")
    bob = create_user(session, "bob@example.com", "pw-123456789", role="submitter")
    return alice, bob, active_version(session)


def test_sharing_rules_in_state(session):
    alice, bob, version = _two_owners(session)
    sha = "ab" * 32
    [x] = _captioned(session, alice.id, [(sha, "a red square")], version)
    [y, z] = _captioned(session, alice.id, [(sha, "a red box"), (sha, "a red square")], version)
    [b] = _captioned(session, bob.id, [(sha, "a red square")], version)
    [n1] = _captioned(session, None, [(sha, "a red square")], version)
    [n2] = _captioned(session, None, [(sha, "a red square")], version)

    review, shared = reviews.add_content_review(
        session, image_id=x, decision="approved", caption_id=None, text="a red square"
    )
    assert sorted(shared) == [y, z]
    # The approved text is what the other caption said (z) or a correction of it (y).
    got = {i: reviews.current_review(session, i) for i in (y, z)}
    assert (got[y].decision, got[y].text) == (ReviewDecision.CORRECTED, "a red square")
    assert (got[z].decision, got[z].text) == (ReviewDecision.APPROVED, "a red square")
    assert all(r.created_at == review.created_at for r in got.values())
    assert reviews.current_review(session, b) is None
    assert jobs.recount(session) == []

    # Jobs without an owner share nothing, with each other or anyone.
    _, none_shared = reviews.add_content_review(session, image_id=n1, decision="rejected")
    assert none_shared == [] and reviews.current_review(session, n2) is None

    undo, undone = reviews.undo_content_review(session, z)
    assert sorted(undone) == [x, y]
    for image_id in (x, y, z):
        assert reviews.current_review(session, image_id).decision == ReviewDecision.UNDONE
    assert undo.undoes_id == got[z].id
    with pytest.raises(jobs.TransitionRefused):
        reviews.undo_content_review(session, y)
    assert jobs.recount(session) == []
    keys = session.scalars(select(Image.id).where(Image.review_score.is_not(None))).all()
    assert {x, y, z, b, n2} <= set(keys)


def test_grid_approvals_are_shared_with_the_same_content(session):
    alice, bob, version = _two_owners(session)
    sha = "cd" * 32
    [x] = _captioned(session, alice.id, [(sha, "a blue circle")], version)
    [y, other] = _captioned(
        session, alice.id, [(sha, "a blue circle"), ("ef" * 32, "a box")], version
    )
    [b] = _captioned(session, bob.id, [(sha, "a blue circle")], version)

    def pick(image_id: int) -> tuple[int, int]:
        return image_id, session.scalar(select(Caption.id).where(Caption.image_id == image_id))

    # y is picked too, after x: it got x's approval already, and is not approved twice
    done = reviews.approve_images(session, [pick(x), pick(y), pick(other)], reviewer_id=alice.id)
    assert [r.image_id for r in done.added] == [x, other]
    assert done.shared == [y] and done.skipped == []
    shared = reviews.current_review(session, y)
    assert (shared.decision, shared.reviewer_id) == (ReviewDecision.APPROVED, alice.id)
    assert len(reviews.review_history(session, y)) == 1
    assert reviews.current_review(session, b) is None  # never across owners
    assert jobs.recount(session) == []

    # Undoing the approval on x takes back the one it gave y.
    _, undone = reviews.undo_content_review(session, x)
    assert undone == [y]
    assert reviews.current_review(session, y).decision == ReviewDecision.UNDONE
    assert jobs.recount(session) == []


def test_the_queue_walk_skips_keys_and_still_visits_every_other_once(session):
    version = active_version(session)
    ids = _captioned(session, None, [(None, f"caption {n}") for n in range(40)], version)
    skipped = set(ids[3:25]) | {ids[-1]}  # a long run of them, and the very last
    asked: list[list[int]] = []

    def skip(page_ids: list[int]) -> set[int]:
        asked.append(page_ids)
        return skipped & set(page_ids)

    walked, after = [], None
    queue = reviews.QueueFilter()
    while True:
        page = reviews.review_queue(session, queue, limit=4, after=after, skip=skip)
        assert len(page.rows) <= 4
        walked += [image.id for image, _, _ in page.rows]
        assert page.total == 40  # skipped keys still await review
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert walked == [i for i in ids if i not in skipped]
    assert max(len(a) for a in asked) <= 4 + 1 + reviews.SKIP_SLACK
    # Without `skip`, the same pages as before.
    plain = reviews.review_queue(session, queue, limit=4)
    assert [image.id for image, _, _ in plain.rows] == ids[:4]
