"""Job lifecycle on SQLite and PostgreSQL: submit, claim, caption, fail, sweep, progress, reviews."""

import multiprocessing
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import StatementError

from captioner.state import images, jobs, reviews
from captioner.state.db import make_engine, make_sessionmaker, session_scope
from captioner.state.models import (
    ApiToken,
    Caption,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    ModelVersion,
    Review,
    ReviewDecision,
    User,
    utcnow,
)


def _job_with_images(session, n, **kw):
    job = jobs.create_job(session, "test job", source="upload")
    ids = jobs.submit_images(
        session, job.id, [f"jobs/{job.id}/{i:04d}.jpg" for i in range(n)], **kw
    )
    return job, ids


def _model(session, name="v1"):
    mv = ModelVersion(name=name, checkpoint_uri=f"file:///ckpt/{name}")
    session.add(mv)
    session.flush()
    return mv


def _image(session, image_id) -> Image:
    session.expire_all()  # the lifecycle functions update rows in SQL, not through the ORM
    return session.get(Image, image_id)


def test_submit_is_ordered_and_idempotent(session):
    job, ids = _job_with_images(session, 3)
    assert len(set(ids)) == 3
    again = jobs.submit_images(session, job.id, ["new.jpg", f"jobs/{job.id}/0001.jpg", "new.jpg"])
    assert again[1] == ids[1] and again[0] == again[2] and again[0] not in ids
    session.expire_all()
    assert session.get(Job, job.id).image_count == 4
    assert session.scalar(select(func.count()).select_from(Image)) == 4
    image = session.get(Image, ids[0])
    assert (image.status, image.attempts, image.original_name) == ("queued", 0, "0000.jpg")


def test_submit_to_unknown_job(session):
    with pytest.raises(jobs.LifecycleError, match="no job with id 999"):
        jobs.submit_images(session, 999, ["a.jpg"])


def test_claim_takes_queued_images_once(session):
    job, ids = _job_with_images(session, 5)
    first = images.claim_images(session, worker_id="w1", lease_seconds=60, job_id=job.id, limit=3)
    assert first == ids[:3]
    second = images.claim_images(session, worker_id="w2", lease_seconds=60, job_id=job.id)
    assert second == ids[3:]
    assert images.claim_images(session, worker_id="w3", lease_seconds=60, image_ids=ids) == []
    image = _image(session, ids[0])
    assert (image.status, image.lease_owner, image.attempts) == ("running", "w1", 1)
    assert image.lease_until > utcnow() + timedelta(seconds=50)
    job = session.get(Job, job.id)
    assert job.status == JobStatus.RUNNING and job.started_at is not None


def test_claim_by_ids_only_touches_those(session):
    _, ids = _job_with_images(session, 4)
    assert images.claim_images(
        session, worker_id="w", lease_seconds=60, image_ids=[ids[1], ids[3]]
    ) == [ids[1], ids[3]]
    assert _image(session, ids[0]).status == ImageStatus.QUEUED
    assert images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=[]) == []


def test_expired_lease_can_be_claimed_again_until_attempts_run_out(session):
    _, [image_id] = _job_with_images(session, 1)
    later = utcnow() + timedelta(seconds=120)
    assert images.claim_images(session, worker_id="w1", lease_seconds=60, image_ids=[image_id]) == [
        image_id
    ]
    # Lease still valid: no one else gets it.
    assert (
        images.claim_images(session, worker_id="w2", lease_seconds=60, image_ids=[image_id]) == []
    )
    assert images.claim_images(
        session, worker_id="w2", lease_seconds=60, image_ids=[image_id], now=later, max_attempts=3
    ) == [image_id]
    assert _image(session, image_id).attempts == 2
    much_later = later + timedelta(seconds=120)
    assert (
        images.claim_images(
            session,
            worker_id="w3",
            lease_seconds=60,
            image_ids=[image_id],
            now=much_later,
            max_attempts=2,
        )
        == []
    )


def test_complete_saves_one_caption_per_model_version(session):
    _, [image_id] = _job_with_images(session, 1)
    v1, v2 = _model(session, "v1"), _model(session, "v2")
    images.claim_images(session, worker_id="w", lease_seconds=60)
    nbest = [{"text": "a cat", "score": -0.5}, {"text": "a dog", "score": -1.5}]
    images.complete_image(
        session,
        image_id=image_id,
        model_version_id=v1.id,
        text="a cat",
        score=-0.5,
        candidates=nbest,
        width=640,
        height=480,
    )
    # Run twice (a redelivered task): same rows, newest text.
    images.complete_image(
        session, image_id=image_id, model_version_id=v1.id, text="a cat, again", score=-0.4
    )
    images.complete_image(
        session, image_id=image_id, model_version_id=v2.id, text="a kitten", score=-0.2
    )
    captions = session.scalars(select(Caption).order_by(Caption.model_version_id)).all()
    session.expire_all()
    assert [(c.model_version_id, c.text) for c in captions] == [
        (v1.id, "a cat, again"),
        (v2.id, "a kitten"),
    ]
    image = _image(session, image_id)
    assert (image.status, image.lease_owner, image.lease_until) == ("captioned", None, None)
    assert (image.width, image.height) == (640, 480)


def test_model_caption_never_overwrites_a_reviewed_caption(session):
    _, [image_id] = _job_with_images(session, 1)
    mv = _model(session)
    assert images.save_caption(
        session,
        image_id=image_id,
        model_version_id=mv.id,
        text="a cat",
        score=-1.0,
        candidates=[{"text": "a cat", "score": -1.0}],
    )
    caption = session.scalars(select(Caption)).one()
    review = reviews.add_review(
        session, image_id=image_id, caption_id=caption.id, decision="approved"
    )
    assert review.text == "a cat"
    saved = images.save_caption(
        session, image_id=image_id, model_version_id=mv.id, text="a bus", score=-0.1
    )
    assert saved is False
    session.expire_all()
    caption = session.get(Caption, caption.id)
    assert (caption.text, caption.score, caption.candidates) == (
        "a cat",
        -1.0,
        [{"text": "a cat", "score": -1.0}],
    )


def test_fail_with_reason_and_captioned_wins(session):
    _, [a, b] = _job_with_images(session, 2)
    mv = _model(session)
    images.claim_images(session, worker_id="w", lease_seconds=60)
    assert images.fail_image(session, a, "truncated file") is True
    image = _image(session, a)
    assert (image.status, image.failure_reason, image.lease_owner) == (
        "failed",
        "truncated file",
        None,
    )
    images.complete_image(session, image_id=b, model_version_id=mv.id, text="t", score=0.0)
    assert images.fail_image(session, b, "late failure") is False
    assert _image(session, b).status == ImageStatus.CAPTIONED


def test_release_expired_leases(session):
    _, ids = _job_with_images(session, 3)
    images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=ids[:2])
    # ids[1] has been tried twice already.
    session.execute(Image.__table__.update().where(Image.id == ids[1]).values(attempts=3))
    assert images.release_expired_leases(session, max_attempts=3) == []  # nothing expired yet
    later = utcnow() + timedelta(seconds=61)
    assert images.release_expired_leases(session, max_attempts=3, now=later) == [ids[0]]
    first, second = _image(session, ids[0]), _image(session, ids[1])
    assert (first.status, first.lease_owner, first.queued_at) == ("queued", None, later)
    assert second.status == ImageStatus.FAILED and "3 attempts" in second.failure_reason
    assert jobs.group_by_job(session, [ids[0]]) == {first.job_id: [ids[0]]}


def test_requeue_stale_queued_restarts_the_clock(session):
    _, ids = _job_with_images(session, 2)
    images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=[ids[1]])
    assert images.requeue_stale_queued(session, older_than_seconds=600) == []
    later = utcnow() + timedelta(seconds=601)
    assert images.requeue_stale_queued(session, older_than_seconds=600, now=later) == [ids[0]]
    assert images.requeue_stale_queued(session, older_than_seconds=600, now=later) == []


def test_requeue_and_extend_only_for_the_lease_holder(session):
    _, ids = _job_with_images(session, 2)
    images.claim_images(session, worker_id="w1", lease_seconds=60)
    assert images.extend_lease(session, ids, worker_id="w2", lease_seconds=600) == []
    assert images.extend_lease(session, ids, worker_id="w1", lease_seconds=600) == ids
    assert _image(session, ids[0]).lease_until > utcnow() + timedelta(seconds=500)
    assert images.requeue_images(session, [ids[0]], worker_id="w2") == []
    assert images.requeue_images(session, [ids[0]], worker_id="w1") == [ids[0]]
    assert _image(session, ids[0]).status == ImageStatus.QUEUED


def test_progress_and_finishing_jobs(session):
    job, ids = _job_with_images(session, 3)
    other, _ = _job_with_images(session, 1)
    mv = _model(session)
    assert jobs.job_progress(session, job.id) == jobs.JobProgress(job.id, queued=3)
    images.claim_images(session, worker_id="w", lease_seconds=60, job_id=job.id)
    images.complete_image(session, image_id=ids[0], model_version_id=mv.id, text="x", score=0.0)
    images.fail_image(session, ids[1], "not an image")
    progress = jobs.job_progress(session, job.id)
    assert (progress.running, progress.captioned, progress.failed, progress.total) == (1, 1, 1, 3)
    assert not progress.is_complete
    assert jobs.finish_completed_jobs(session) == []
    images.complete_image(session, image_id=ids[2], model_version_id=mv.id, text="y", score=0.0)
    assert jobs.finish_completed_jobs(session) == [job.id]  # `other` is still queued
    session.expire_all()
    finished = session.get(Job, job.id)
    assert (finished.status, finished.captioned_count, finished.failed_count) == ("finished", 2, 1)
    assert finished.finished_at is not None
    assert jobs.finish_completed_jobs(session) == []
    # New images re-open a finished job.
    jobs.submit_images(session, job.id, ["late.jpg"])
    session.expire_all()
    reopened = session.get(Job, job.id)
    assert (reopened.status, reopened.finished_at, reopened.image_count) == ("running", None, 4)
    assert session.get(Job, other.id).status == JobStatus.QUEUED


def test_reviews_are_history_and_the_newest_counts(session):
    _, [a, b, c, held] = _job_with_images(session, 4)
    session.execute(Image.__table__.update().where(Image.id == held).values(split="holdout"))
    mv = _model(session)
    user = User(email="r@example.com", name="Rita")
    session.add(user)
    session.flush()
    for image_id in (a, b, c, held):
        images.save_caption(
            session,
            image_id=image_id,
            model_version_id=mv.id,
            text=f"model {image_id}",
            score=-float(image_id),
        )
    cap = {cap.image_id: cap.id for cap in session.scalars(select(Caption))}
    first = reviews.add_review(
        session, image_id=a, caption_id=cap[a], decision="approved", reviewer_id=user.id
    )
    reviews.add_review(
        session, image_id=a, caption_id=cap[a], decision="corrected", text=" a red bus "
    )
    reviews.add_review(session, image_id=b, caption_id=cap[b], decision="approved")
    rb = reviews.add_review(
        session, image_id=b, caption_id=cap[b], decision="rejected", text="ignored"
    )
    reviews.add_review(session, image_id=c, caption_id=cap[c], decision="approved")
    reviews.add_review(session, image_id=held, decision="corrected", text="held out text")

    assert [r.decision for r in reviews.review_history(session, a)] == ["approved", "corrected"]
    assert reviews.current_review(session, a).text == "a red bus"
    assert rb.text is None
    assert session.get(Review, first.id).text == "model " + str(a)  # old row untouched


def test_review_validation(session):
    _, [a, b] = _job_with_images(session, 2)
    mv = _model(session)
    images.save_caption(session, image_id=b, model_version_id=mv.id, text="t", score=0.0)
    cap_b = session.scalars(select(Caption)).one()
    with pytest.raises(jobs.LifecycleError, match="corrected text"):
        reviews.add_review(session, image_id=a, decision="corrected", text="  ")
    with pytest.raises(jobs.LifecycleError, match="not a caption of image"):
        reviews.add_review(session, image_id=a, caption_id=cap_b.id, decision="approved")
    with pytest.raises(jobs.LifecycleError, match="needs the caption"):
        reviews.add_review(session, image_id=a, decision="approved")
    with pytest.raises(ValueError):
        reviews.add_review(session, image_id=a, decision="maybe", text="x")


def test_review_queue_lowest_score_first(session):
    job, ids = _job_with_images(session, 4)
    mv = _model(session)
    for image_id, score in zip(ids, [-0.5, -3.0, -1.0, -2.0], strict=True):
        images.save_caption(
            session, image_id=image_id, model_version_id=mv.id, text="t", score=score
        )
    reviews.add_review(session, image_id=ids[1], decision="corrected", text="done already")
    page = reviews.review_queue(session, reviews.QueueFilter(), limit=2)
    assert [caption.image_id for _, caption, _ in page.rows] == [ids[3], ids[2]]
    assert len(reviews.review_queue(session, reviews.QueueFilter(job_id=job.id)).rows) == 3


# --- transitions: cancel, retry, undo, bulk approve -----------------------------------------


def test_cancel_fails_queued_images_leaves_running_ones_and_refuses_twice(session):
    job, ids = _job_with_images(session, 3)
    images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=[ids[0]])
    assert jobs.cancel_job(session, job.id) == 2
    running = _image(session, ids[0])
    assert (running.status, running.failure_reason) == (ImageStatus.RUNNING, None)
    for image_id in ids[1:]:
        image = _image(session, image_id)
        assert (image.status, image.failure_reason) == (ImageStatus.FAILED, jobs.CANCEL_REASON)
        assert image.finished_at is not None
    cancelled = session.get(Job, job.id)
    assert cancelled.status == JobStatus.CANCELLED and cancelled.finished_at is not None
    with pytest.raises(jobs.TransitionRefused, match=f"job {job.id} is already cancelled"):
        jobs.cancel_job(session, job.id)


def test_cancel_refuses_a_finished_job_and_an_unknown_one(session):
    job, [image_id] = _job_with_images(session, 1)
    mv = _model(session)
    images.claim_images(session, worker_id="w", lease_seconds=60)
    images.complete_image(session, image_id=image_id, model_version_id=mv.id, text="t", score=0.0)
    assert jobs.finish_completed_jobs(session) == [job.id]
    with pytest.raises(jobs.TransitionRefused, match=f"job {job.id} is already finished"):
        jobs.cancel_job(session, job.id)
    assert _image(session, image_id).status == ImageStatus.CAPTIONED
    with pytest.raises(jobs.LifecycleError, match="no job with id 999") as refused:
        jobs.cancel_job(session, 999)
    assert not isinstance(refused.value, jobs.TransitionRefused)


def test_retry_requeues_failed_images_and_reopens_the_job(session):
    job, ids = _job_with_images(session, 3)
    mv = _model(session)
    images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=ids)
    images.fail_image(session, ids[0], "truncated file")
    images.fail_image(session, ids[1], "not an image")
    images.complete_image(session, image_id=ids[2], model_version_id=mv.id, text="t", score=0.0)
    assert jobs.finish_completed_jobs(session) == [job.id]
    assert jobs.retry_failed(session, job.id) == jobs.RetriedImages(job.id, ids[:2])
    for image_id in ids[:2]:
        image = _image(session, image_id)
        assert (image.status, image.attempts, image.failure_reason, image.finished_at) == (
            ImageStatus.QUEUED,
            0,
            None,
            None,
        )
    assert _image(session, ids[2]).status == ImageStatus.CAPTIONED
    reopened = session.get(Job, job.id)
    assert (reopened.status, reopened.finished_at) == (JobStatus.RUNNING, None)
    assert jobs.retry_failed(session, job.id).image_ids == []


def test_retry_of_a_cancelled_job_that_never_started_queues_it_again(session):
    job, ids = _job_with_images(session, 2)
    jobs.cancel_job(session, job.id)
    assert jobs.retry_failed(session, job.id).image_ids == ids
    session.expire_all()
    job = session.get(Job, job.id)
    assert (job.status, job.finished_at) == (JobStatus.QUEUED, None)
    assert jobs.job_progress(session, job.id) == jobs.JobProgress(job.id, queued=2)


def test_undo_restores_the_previous_decision_then_undone_then_refuses(session):
    _, [image_id] = _job_with_images(session, 1)
    mv = _model(session)
    user = User(email="u@example.com")
    session.add(user)
    session.flush()
    images.save_caption(session, image_id=image_id, model_version_id=mv.id, text="t", score=0.0)
    caption = session.scalars(select(Caption)).one()
    first = reviews.add_review(
        session, image_id=image_id, caption_id=caption.id, decision="corrected", text="a dog"
    )
    second = reviews.add_review(
        session, image_id=image_id, caption_id=caption.id, decision="corrected", text="a big dog"
    )
    undo = reviews.undo_review(session, image_id, user.id)
    assert (undo.decision, undo.text, undo.undoes_id, undo.reviewer_id) == (
        ReviewDecision.CORRECTED,
        "a dog",
        second.id,
        user.id,
    )
    undo = reviews.undo_review(session, image_id, user.id)
    assert (undo.decision, undo.text, undo.undoes_id, undo.caption_id) == (
        ReviewDecision.UNDONE,
        None,
        first.id,
        caption.id,
    )
    with pytest.raises(jobs.TransitionRefused, match="nothing to undo"):
        reviews.undo_review(session, image_id, user.id)
    history = reviews.review_history(session, image_id)
    assert [r.decision for r in history] == ["corrected", "corrected", "corrected", "undone"]
    assert [r.text for r in history] == ["a dog", "a big dog", "a dog", None]


def test_bulk_approve_skips_an_image_reviewed_meanwhile(session, session_factory, engine):
    job, ids = _job_with_images(session, 5)
    mv = _model(session)
    user = User(email="bulk@example.com")
    session.add(user)
    session.flush()
    for image_id, score in zip(ids, [-0.5, -3.0, -1.0, -0.2, -0.8], strict=True):
        images.save_caption(
            session, image_id=image_id, model_version_id=mv.id, text=f"c{image_id}", score=score
        )
    reviews.add_review(session, image_id=ids[2], decision="rejected")  # reviewed before
    reviews.add_review(session, image_id=ids[4], decision="rejected")
    reviews.undo_review(session, ids[4])  # undone: unreviewed again
    session.commit()
    meanwhile = ids[3]
    fired = []

    def review_meanwhile(_conn, _cursor, statement, *_args):
        # Another reviewer commits a decision just before the bulk approval's statement runs.
        if fired or not statement.lstrip().upper().startswith("INSERT INTO REVIEWS"):
            return
        fired.append(statement)
        with session_scope(session_factory) as other:
            reviews.add_review(other, image_id=meanwhile, decision="corrected", text="a boat")

    event.listen(engine, "before_cursor_execute", review_meanwhile)
    try:
        count = reviews.bulk_approve(session, job_id=job.id, min_score=-1.0, reviewer_id=user.id)
    finally:
        event.remove(engine, "before_cursor_execute", review_meanwhile)
    assert fired and count == 2
    session.expire_all()
    current = {i: reviews.current_review(session, i) for i in ids}
    assert current[ids[1]] is None  # below the threshold
    assert (current[ids[2]].decision, current[meanwhile].decision) == ("rejected", "corrected")
    for image_id in (ids[0], ids[4]):
        approval = current[image_id]
        assert (approval.decision, approval.text, approval.reviewer_id) == (
            ReviewDecision.APPROVED,
            f"c{image_id}",
            user.id,
        )
        assert approval.caption.image_id == image_id
    assert reviews.bulk_approve(session, job_id=job.id, min_score=-1.0) == 0


def test_api_tokens_store_only_a_hash(session):
    user = User(email="a@example.com")
    session.add(user)
    session.flush()
    raw, token = ApiToken.issue(user.id, "cli")
    session.add(token)
    session.flush()
    stored = session.scalars(select(ApiToken.token_sha256)).one()
    assert raw not in stored and len(stored) == 64
    found = session.scalars(
        select(ApiToken).where(ApiToken.token_sha256 == ApiToken.hash(raw))
    ).one()
    assert found.user.email == "a@example.com"


def test_times_are_utc_aware(session):
    job, [image_id] = _job_with_images(session, 1)
    session.commit()
    session.expire_all()
    image = session.get(Image, image_id)
    assert image.created_at.utcoffset() == timedelta(0)
    with pytest.raises(StatementError, match="naive datetime"):
        images.claim_images(
            session, worker_id="w", lease_seconds=1, now=utcnow().replace(tzinfo=None)
        )


# --- two processes claiming the same rows ---------------------------------------------------


def _claim_until_empty(url, worker_id, barrier, results):
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    won = []
    barrier.wait(timeout=60)
    while True:
        with session_scope(factory) as session:
            ids = images.claim_images(session, worker_id=worker_id, lease_seconds=300, limit=10)
        if not ids:
            break
        won.extend(ids)
    engine.dispose()
    results.put((worker_id, won))


@pytest.mark.parametrize("migrated_url", ["postgresql", "sqlite"], indirect=True)
def test_two_processes_claim_each_image_exactly_once(migrated_url, session_factory):
    with session_scope(session_factory) as session:
        _, ids = _job_with_images(session, 1_000)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_claim_until_empty, args=(migrated_url, f"w{i}", barrier, results))
        for i in range(2)
    ]
    for p in workers:
        p.start()
    won = dict(results.get(timeout=120) for _ in workers)
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    claimed = won["w0"] + won["w1"]
    assert sorted(claimed) == sorted(ids)  # every image, none twice
    assert set(won["w0"]).isdisjoint(won["w1"])
    # How the rows split between the two is up to the scheduler (one may win them all on a
    # loaded machine); what must hold is above and below: each row claimed once, by its owner.
    with session_scope(session_factory) as session:
        rows = session.execute(select(Image.id, Image.lease_owner, Image.attempts)).all()
    owner = {image_id: worker for image_id, worker, _ in rows}
    assert all(owner[i] == "w0" for i in won["w0"]) and all(owner[i] == "w1" for i in won["w1"])
    assert {attempts for *_, attempts in rows} == {1}
    with session_scope(session_factory) as session:
        assert jobs.recount(session) == []  # concurrent claims counted exactly
