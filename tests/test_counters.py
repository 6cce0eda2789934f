"""Job counters and the review-queue key, on SQLite and PostgreSQL: they equal a recount of the
rows after any mix of transitions, a batch save costs the same statements in a job of any size,
and the review queue pages by cursor without repeating or skipping an image."""

from __future__ import annotations

import random
import re
import shutil
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import event, func, select, text, update

from captioner.cli.db import db
from captioner.state import images, jobs, migrate, outbox, reviews
from captioner.state.db import make_engine, make_sessionmaker, session_scope
from captioner.state.models import (
    Caption,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    ModelVersion,
    Review,
    ReviewDecision,
    Split,
    User,
    Webhook,
    WebhookDelivery,
    utcnow,
)


def _model(session, name="v1") -> ModelVersion:
    mv = ModelVersion(name=name, checkpoint_uri=f"file:///ckpt/{name}")
    session.add(mv)
    session.flush()
    return mv


def _job(session, n, *, owner_id=None, prefix="k"):
    job = jobs.create_job(session, f"job of {n}", owner_id=owner_id)
    ids = jobs.submit_images(session, job.id, [f"{prefix}/{job.id}/{i:05d}.jpg" for i in range(n)])
    return job.id, ids


def _progress_from_rows(session, job_id) -> jobs.JobProgress:
    rows = session.execute(
        select(Image.status, func.count()).where(Image.job_id == job_id).group_by(Image.status)
    )
    return jobs.JobProgress(job_id, **{ImageStatus(s).value: n for s, n in rows})


def _review_key_truth(session) -> dict[int, float | None]:
    """What `Image.review_score` should be, from captions and reviews (the slow way)."""
    truth: dict[int, float | None] = {}
    for image_id in session.scalars(select(Image.id)):
        caption = session.scalars(
            select(Caption).where(Caption.image_id == image_id).order_by(Caption.id.desc())
        ).first()
        review = reviews.current_review(session, image_id)
        waiting = caption is not None and (
            review is None or review.decision == ReviewDecision.UNDONE
        )
        truth[image_id] = caption.score if waiting else None
    return truth


def _assert_consistent(session, step=""):
    assert jobs.recount(session) == [], step
    stored = dict(session.execute(select(Image.id, Image.review_score)).all())
    assert stored == _review_key_truth(session), step
    for job_id in session.scalars(select(Job.id)):
        assert jobs.job_progress(session, job_id) == _progress_from_rows(session, job_id), step


# --- counters equal a recount after a random mix --------------------------------------------


class _Mix:
    """Random transitions over a few jobs, as workers, the sweeper and reviewers make them."""

    def __init__(self, session, rng: random.Random):
        self.s, self.rng = session, rng
        self.versions = [_model(session, "v1").id, _model(session, "v2").id]
        self.jobs = [_job(session, rng.randint(3, 12))[0] for _ in range(3)]
        self.keys = 0

    def ids(self, *statuses):
        query = select(Image.id)
        if statuses:
            query = query.where(Image.status.in_(statuses))
        return list(self.s.scalars(query.order_by(Image.id)))

    def pick(self, ids, k):
        return self.rng.sample(ids, min(k, len(ids)))

    def submit(self):
        job_id = self.rng.choice(self.jobs)
        old = list(self.s.scalars(select(Image.storage_key).where(Image.job_id == job_id)))
        self.keys += 1
        new = [f"new/{self.keys}/{i}.jpg" for i in range(self.rng.randint(1, 4))]
        jobs.submit_images(self.s, job_id, new + self.pick(old, 2) + new[:1])

    def claim(self):
        later = utcnow() + timedelta(seconds=self.rng.choice([0, 120]))  # 120: leases expired
        images.claim_images(
            self.s,
            worker_id=f"w{self.rng.randint(1, 3)}",
            lease_seconds=60,
            job_id=self.rng.choice([None, *self.jobs]),
            limit=self.rng.choice([None, 1, 3, 5]),
            max_attempts=self.rng.choice([None, 3]),
            now=later,
        )

    def complete(self):
        chosen = self.pick(self.ids(), self.rng.randint(1, 5))
        version = self.rng.choice(self.versions)
        rows = [images.CaptionRow(i, f"c{i}", self.rng.uniform(-3, 0), [], 8, 8) for i in chosen]
        images.complete_images(self.s, version, rows)

    def complete_one(self):  # the reuse path: a queued image captioned without a claim
        for image_id in self.pick(self.ids(ImageStatus.QUEUED), 1):
            images.complete_image(
                self.s,
                image_id=image_id,
                model_version_id=self.rng.choice(self.versions),
                text="reused",
                score=self.rng.uniform(-3, 0),
            )

    def save_caption(self):
        for image_id in self.pick(self.ids(), 1):
            images.save_caption(
                self.s,
                image_id=image_id,
                model_version_id=self.rng.choice(self.versions),
                text="again",
                score=self.rng.uniform(-3, 0),
            )

    def fail(self):
        for image_id in self.pick(self.ids(), 2):
            images.fail_image(self.s, image_id, "not an image")

    def requeue(self):
        for worker in ("w1", "w2", "w3"):
            held = self.s.scalars(select(Image.id).where(Image.lease_owner == worker))
            images.requeue_images(self.s, self.pick(list(held), 2), worker_id=worker)

    def sweep(self):
        later = utcnow() + timedelta(seconds=self.rng.choice([0, 300]))
        images.release_expired_leases(self.s, max_attempts=3, now=later)
        images.requeue_stale_queued(self.s, older_than_seconds=0, now=later)
        images.fail_queued_past_cap(self.s, 2)
        jobs.finish_completed_jobs(self.s)

    def retry(self):
        jobs.retry_failed(self.s, self.rng.choice(self.jobs))

    def cancel(self):
        try:
            jobs.cancel_job(self.s, self.rng.choice(self.jobs))
        except jobs.TransitionRefused:
            pass

    def review(self):
        captioned = list(self.s.scalars(select(Caption.image_id).distinct()))
        for image_id in self.pick(captioned, 2):
            decision = self.rng.choice(["approved", "corrected", "rejected", "undone"])
            reviews.add_review(self.s, image_id=image_id, decision=decision, text="a text")

    def undo(self):
        reviewed = list(self.s.scalars(select(Review.image_id).distinct()))
        for image_id in self.pick(reviewed, 2):
            try:
                reviews.undo_review(self.s, image_id)
            except jobs.TransitionRefused:
                pass

    def bulk_approve(self):
        reviews.bulk_approve(
            self.s, job_id=self.rng.choice(self.jobs), min_score=self.rng.uniform(-3, 0)
        )

    def step(self):
        action = self.rng.choice(
            [
                self.submit,
                self.claim,
                self.claim,
                self.complete,
                self.complete,
                self.complete_one,
                self.save_caption,
                self.fail,
                self.requeue,
                self.sweep,
                self.retry,
                self.cancel,
                self.review,
                self.review,
                self.undo,
                self.bulk_approve,
            ]
        )
        action()
        return action.__name__


def test_counters_equal_a_recount_after_a_random_mix(session):
    rng = random.Random(14)
    mix = _Mix(session, rng)
    _assert_consistent(session, "start")
    done, statuses = [], set()
    for n in range(160):
        done.append(mix.step())
        if n % 40 == 39:
            session.commit()  # the same in committed and in-flight transactions
        _assert_consistent(session, f"after {done[-5:]}")
        statuses |= set(session.scalars(select(Image.status).distinct()))
    # The mix really reached every kind of row it counts.
    assert statuses == set(ImageStatus)
    assert session.scalar(select(func.sum(Job.unreviewed_count))) > 0
    assert session.scalar(select(func.count()).select_from(Review)) > 10


def test_fail_job_fails_the_queued_images_ends_the_job_and_records_job_failed(session):
    """A background step that failed for good: the job ends with the reason, its queued images
    fail, running and captioned ones are left alone, counters equal a recount, and the owner's
    webhook gets `job.failed` even though an image was captioned."""
    owner = User(email="fail@example.com")
    session.add(owner)
    session.flush()
    session.add(Webhook(owner_id=owner.id, url="https://hooks.example/x", secret="s", events=[]))
    version = _model(session)
    job_id, ids = _job(session, 6, owner_id=owner.id)
    other_id, other_ids = _job(session, 3)
    claimed = images.claim_images(session, worker_id="w1", lease_seconds=60, job_id=job_id, limit=2)
    [first, second] = sorted(claimed)
    images.complete_images(session, version.id, [images.CaptionRow(first, "a", -1.0, [], 8, 8)])
    _assert_consistent(session, "before")

    reason = "enumerating the prefix failed: StorageError: listing refused"
    assert jobs.fail_job(session, job_id, reason) is True
    _assert_consistent(session, "after fail_job")

    job = session.get(Job, job_id, populate_existing=True)
    assert (job.status, job.failure_reason, job.finished_at is not None) == (
        JobStatus.FINISHED,
        reason,
        True,
    )
    assert (job.queued_count, job.running_count, job.captioned_count, job.failed_count) == (
        0,
        1,
        1,
        4,
    )
    rows = dict(session.execute(select(Image.id, Image.status).where(Image.job_id == job_id)).all())
    assert rows[first] == ImageStatus.CAPTIONED and rows[second] == ImageStatus.RUNNING
    failed = [i for i in ids if i not in (first, second)]
    assert {rows[i] for i in failed} == {ImageStatus.FAILED}
    reasons = set(session.scalars(select(Image.failure_reason).where(Image.id.in_(failed))))
    assert reasons == {reason}
    # Another job is untouched.
    others = set(session.scalars(select(Image.status).where(Image.id.in_(other_ids))))
    assert others == {ImageStatus.QUEUED}
    assert session.get(Job, other_id, populate_existing=True).status == JobStatus.QUEUED

    [delivery_id] = outbox.record_job_events(session, [job_id])
    delivery = session.get(WebhookDelivery, delivery_id)
    assert delivery.event == "job.failed"
    assert delivery.payload["job"]["failure_reason"] == reason

    # Failing it again, or failing a cancelled or unknown job, changes nothing.
    assert jobs.fail_job(session, job_id, "again") is False
    assert session.get(Job, job_id, populate_existing=True).failure_reason == reason
    jobs.cancel_job(session, other_id)
    assert jobs.fail_job(session, other_id, "late") is False
    assert session.get(Job, other_id, populate_existing=True).status == JobStatus.CANCELLED
    assert jobs.fail_job(session, 10**9, "none") is False
    _assert_consistent(session, "after the no-ops")

    # The running image that finishes later still counts right.
    images.complete_images(session, version.id, [images.CaptionRow(second, "b", -1.0, [], 8, 8)])
    _assert_consistent(session, "after the running image finished")
    session.commit()
    _assert_consistent(session, "committed")


def test_recount_reports_and_repairs_drift(session):
    job_id, _ = _job(session, 4)
    session.execute(update(Job).where(Job.id == job_id).values(queued_count=9, failed_count=-1))
    drifts = jobs.recount(session)
    assert {(d.job_id, d.counter, d.stored, d.actual) for d in drifts} == {
        (job_id, "queued_count", 9, 4),
        (job_id, "failed_count", -1, 0),
    }
    assert "queued_count is 9, the rows say 4" in str(drifts[0]) + str(drifts[1])
    assert jobs.recount(session, repair=True) == drifts
    assert jobs.recount(session) == []


def test_db_check_prints_drift_and_repairs_it(migrated_url):
    engine = make_engine(migrated_url)
    with session_scope(engine) as session:
        job_id, ids = _job(session, 3)
        images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=ids[:1])
    with engine.begin() as conn:  # a status changed behind the state layer's back
        conn.execute(text("UPDATE images SET status = 'queued' WHERE id = :i"), {"i": ids[0]})
    engine.dispose()
    runner = CliRunner()
    result = runner.invoke(db, ["check", "--url", migrated_url])
    assert result.exit_code == 1, result.output
    assert f"drift: job {job_id}: queued_count is 2, the rows say 3" in result.output
    assert f"drift: job {job_id}: running_count is 1, the rows say 0" in result.output
    result = runner.invoke(db, ["check", "--url", migrated_url, "--repair"])
    assert result.exit_code == 0 and "repaired 2 job counters" in result.output
    result = runner.invoke(db, ["check", "--url", migrated_url])
    assert result.exit_code == 0 and "job counters match the rows" in result.output


# --- cost per batch does not grow with the job ----------------------------------------------


def _statements_of_one_batch_save(session, engine, n_images: int) -> int:
    """Statements a worker's batch save issues (complete_images of 32 + progress + finish) for
    the last batch of a job of `n_images`, the rest of it already captioned."""
    mv = _model(session, f"v-{n_images}")
    job_id, ids = _job(session, n_images, prefix=f"size{n_images}")
    images.claim_images(session, worker_id="w", lease_seconds=600, job_id=job_id)
    earlier, batch = ids[:-32], ids[-32:]
    for start in range(0, len(earlier), 500):
        rows = [images.CaptionRow(i, "old", -1.0) for i in earlier[start : start + 500]]
        images.complete_images(session, mv.id, rows)
    session.commit()
    rows = [images.CaptionRow(i, f"c{i}", -0.5, [], 16, 16) for i in batch]
    statements = []

    def count(_conn, _cursor, statement, *_args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        images.complete_images(session, mv.id, rows)
        assert jobs.job_progress(session, job_id).is_complete
        assert jobs.finish_completed_jobs(session) == [job_id]
    finally:
        event.remove(engine, "before_cursor_execute", count)
    session.commit()
    assert jobs.recount(session) == []
    return len(statements)


def test_a_batch_save_issues_the_same_statements_for_100_and_5000_images(session, engine):
    small = _statements_of_one_batch_save(session, engine, 100)
    large = _statements_of_one_batch_save(session, engine, 5_000)
    assert small == large and small > 0


def _sqlite_plans_of_images_by_id(engine, run) -> dict[str, list[str]]:
    """{statement: its SQLite query plan's steps over `images`} of each statement `run()`
    issues that picks images by id."""
    issued: dict[str, tuple] = {}

    def keep(_conn, _cursor, statement, parameters, _context, executemany):
        if not executemany and re.search(r"\bimages\.id (IN \(|= \?)", statement):
            issued.setdefault(statement, tuple(parameters))

    event.listen(engine, "before_cursor_execute", keep)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    with engine.connect() as conn:
        return {
            statement: [
                step
                for *_, step in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
                if re.match(r"(SEARCH|SCAN) images\b", step)
            ]
            for statement, params in issued.items()
        }


def test_a_batch_on_sqlite_looks_its_images_up_by_id_not_by_status(_sqlite_template, tmp_path):
    """A batch's statements find its images by id whatever else the table holds. Without
    statistics SQLite took `status = ?` beside a list of ids for the better index and walked
    every image in that status -- each save walked every captioned image of every job, each
    claim every queued one -- so a batch cost more the bigger the jobs."""
    path = tmp_path / "plans.db"
    shutil.copyfile(_sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            mv = _model(session)
            job_id, ids = _job(session, 200)
            done, batch, spare = ids[:100], ids[100:132], ids[132:164]
            images.claim_images(session, worker_id="w", lease_seconds=600, image_ids=done)
            images.complete_images(session, mv.id, [images.CaptionRow(i, "a", -1.0) for i in done])

            def one_batch():
                claim = {"lease_seconds": 600, "job_id": job_id, "max_attempts": 3}
                images.claim_images(session, worker_id="w", image_ids=batch, **claim)
                held = images.extend_lease(session, batch, worker_id="w", lease_seconds=600)
                rows = [images.CaptionRow(i, f"c{i}", -0.5, [], 16, 16) for i in held]
                images.complete_images(session, mv.id, rows)
                images.claim_images(session, worker_id="w", image_ids=spare, **claim)
                images.requeue_images(session, spare[:16], worker_id="w")
                images.fail_image(session, spare[16], "broken")

            plans = _sqlite_plans_of_images_by_id(engine, one_batch)
            assert len(plans) >= 5
            for statement, steps in plans.items():
                assert steps, statement
                for step in steps:
                    # The primary key (rowid=?), or an index on (job_id, id) walked by the ids.
                    assert re.search(r"\b(rowid|id)=\?", step), (step, statement)
            assert jobs.recount(session) == []
    finally:
        engine.dispose()


# --- submit ---------------------------------------------------------------------------------


def test_submit_in_chunks_keeps_order_and_collapses_duplicates(session):
    job = jobs.create_job(session, "big")
    n = jobs.SUBMIT_CHUNK * 2 + 7
    keys = [f"big/{i}.jpg" for i in range(n)]
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    first = jobs.submit_images(session, job.id, keys[:10])
    # Keys seen earlier in the call, in an earlier call, and twice in one chunk.
    ids = jobs.submit_images(session, job.id, shuffled + keys[:3] + [keys[5]])
    by_key = dict(zip(shuffled + keys[:3] + [keys[5]], ids, strict=True))
    assert [by_key[k] for k in keys[:10]] == first
    assert len(set(ids)) == n
    stored = dict(session.execute(select(Image.storage_key, Image.id)).all())
    assert stored == {k: by_key[k] for k in keys}
    progress = jobs.job_progress(session, job.id)
    assert (progress.queued, progress.total) == (n, n)
    # Every field of a spec is stored.
    spec = jobs.ImageSpec("held/x.jpg", "x.jpg", "ab" * 32, 1234, Split.HOLDOUT)
    [held] = jobs.submit_images(session, job.id, [spec])
    image = session.get(Image, held)
    stored = (image.original_name, image.content_sha256, image.size_bytes, image.split)
    assert stored == ("x.jpg", "ab" * 32, 1234, Split.HOLDOUT)
    assert (image.status, image.attempts, image.queued_at is not None) == ("queued", 0, True)
    assert jobs.recount(session) == []


# --- the review queue -----------------------------------------------------------------------


def test_queue_cursor_round_trips_and_refuses_garbage():
    cursor = reviews.QueueCursor(-1.2345678901234567, 123456789)
    token = cursor.encode()
    assert token.isascii() and all(c.isalnum() or c in "-_" for c in token)
    assert reviews.QueueCursor.decode(token) == cursor
    for garbage in ["", "abc", "!!!!", token[:-2], token + "AAAA", "x" * 40]:
        with pytest.raises(jobs.LifecycleError):
            reviews.QueueCursor.decode(garbage)


def _captioned_job(session, scores, *, owner_id=None, version=None):
    version = version or _model(session, f"v{random.random()}")
    job_id, ids = _job(session, len(scores), owner_id=owner_id)
    rows = [images.CaptionRow(i, f"caption {i}", s) for i, s in zip(ids, scores, strict=True)]
    images.complete_images(session, version.id, rows)
    return job_id, ids


def _walk(session, filters, limit):
    seen, after = [], None
    while True:
        page = reviews.review_queue(session, filters, limit=limit, after=after)
        seen += [image.id for image, _, _ in page.rows]
        if page.next_cursor is None:
            return seen, page
        after = page.next_cursor.encode()


def test_review_queue_pages_by_cursor_with_filters_and_totals(session):
    owner = User(email="owner@example.com")
    session.add(owner)
    session.flush()
    rng = random.Random(3)
    scores_a = [round(rng.uniform(-3, 0), 1) for _ in range(23)]  # rounded: many ties
    job_a, ids_a = _captioned_job(session, scores_a, owner_id=owner.id)
    job_b, ids_b = _captioned_job(session, [-2.0, -0.5, -1.5])
    reviews.add_review(session, image_id=ids_a[0], decision="rejected")
    reviews.add_review(session, image_id=ids_b[1], decision="rejected")
    reviews.undo_review(session, ids_b[1])  # undone: waiting again
    score = dict(zip(ids_a + ids_b, scores_a + [-2.0, -0.5, -1.5], strict=True))

    def expected(candidates):
        return sorted(candidates, key=lambda i: (score[i], i))

    waiting = [i for i in ids_a + ids_b if i != ids_a[0]]
    seen, last = _walk(session, reviews.QueueFilter(), limit=4)
    assert seen == expected(waiting)
    assert (last.total, last.total_exact) == (len(waiting), True)
    seen, last = _walk(session, reviews.QueueFilter(job_id=job_b), limit=2)
    assert (seen, last.total) == (expected(ids_b), 3)
    seen, last = _walk(session, reviews.QueueFilter(owner_id=owner.id), limit=5)
    assert (seen, last.total) == (expected(ids_a[1:]), 22)
    band = reviews.QueueFilter(min_score=-2.0, max_score=-1.0)
    seen, last = _walk(session, band, limit=3)
    in_band = [i for i in waiting if -2.0 <= score[i] <= -1.0]
    assert (seen, last.total) == (expected(in_band), len(in_band))
    named = reviews.QueueFilter(text=f"caption {ids_b[2]}")
    assert [im.id for im, _, _ in reviews.review_queue(session, named).rows] == [ids_b[2]]
    # A row: the image, its newest caption and its current review (the undo row, or None).
    rows = {image.id: (caption, review) for image, caption, review in _rows_of(session, job_b)}
    assert rows[ids_b[0]][0].image_id == ids_b[0] and rows[ids_b[0]][1] is None
    assert rows[ids_b[1]][1].decision == ReviewDecision.UNDONE
    with pytest.raises(jobs.LifecycleError, match="cursor"):
        reviews.review_queue(session, reviews.QueueFilter(), offset=10)
    # Other statuses page by cursor too (or offset).
    reviewed = reviews.QueueFilter(status=reviews.QueueStatus.REVIEWED)
    assert _walk(session, reviewed, limit=1)[0] == [ids_a[0]]
    any_status = reviews.QueueFilter(status=reviews.QueueStatus.ANY, job_id=job_b)
    assert _walk(session, any_status, limit=2)[0] == expected(ids_b)
    second = reviews.review_queue(session, any_status, limit=1, offset=1)
    assert [im.id for im, _, _ in second.rows] == expected(ids_b)[1:2]


def _rows_of(session, job_id):
    return reviews.review_queue(session, reviews.QueueFilter(job_id=job_id), limit=100).rows


def test_review_queue_walk_is_consistent_while_another_reviewer_works(session_factory):
    rng = random.Random(7)
    with session_scope(session_factory) as session:
        scores = [round(rng.uniform(-3, 0), 1) for _ in range(80)]  # many ties
        job_id, ids = _captioned_job(session, scores)
    touched: set[int] = set()  # reviewed (or undone) by the other reviewer at some point
    seen: list[int] = []
    after = None
    with session_factory() as walker:
        while True:
            page = reviews.review_queue(walker, reviews.QueueFilter(), limit=6, after=after)
            walker.rollback()  # each page in its own transaction, as each request is
            seen += [image.id for image, _, _ in page.rows]
            # Meanwhile another reviewer decides, corrects and undoes, committing each time.
            with session_scope(session_factory) as other:
                for image_id in rng.sample(ids, 3):
                    touched.add(image_id)
                    reviews.add_review(other, image_id=image_id, decision="approved", text="ok")
                for image_id in rng.sample(sorted(touched), 2):
                    try:
                        reviews.undo_review(other, image_id)
                    except jobs.TransitionRefused:
                        pass  # already undone
                expected_total = sum(v is not None for v in _review_key_truth(other).values())
            if page.next_cursor is None:
                break
            after = page.next_cursor
    assert len(seen) == len(set(seen)), "an image was shown twice in one walk"
    untouched = set(ids) - touched
    assert untouched and untouched <= set(seen), "an image waiting throughout was skipped"
    with session_scope(session_factory) as session:
        assert reviews.review_queue(session, reviews.QueueFilter()).total == expected_total
        assert jobs.recount(session) == []


# --- the migration fills the counters and the key from existing rows ------------------------


def test_migration_fills_counters_and_review_key_from_the_rows(db_url):
    migrate.upgrade(db_url, "0003")
    engine = make_engine(db_url)
    now = {"t": "2026-11-30 12:00:00"}
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, name, source, options, priority, status, image_count,"
                " captioned_count, failed_count, created_at) VALUES"
                " (1, 'j', '', '{}', 0, 'running', 5, 0, 0, :t),"
                " (2, 'empty', '', '{}', 0, 'finished', 0, 0, 0, :t)"
            ),
            now,
        )
        for image_id, status in enumerate(
            ["queued", "running", "captioned", "captioned", "failed"], start=1
        ):
            conn.execute(
                text(
                    "INSERT INTO images (id, job_id, storage_key, original_name, status, attempts,"
                    " split, created_at, queued_at) VALUES"
                    " (:i, 1, :k, '', :s, 0, 'train', :t, :t)"
                ),
                {"i": image_id, "k": f"k{image_id}", "s": status, **now},
            )
        conn.execute(
            text(
                "INSERT INTO model_versions (id, name, checkpoint_uri, config, metrics, status,"
                " created_at) VALUES (1, 'v1', 'file:///v1', '{}', '{}', 'retired', :t),"
                " (2, 'v2', 'file:///v2', '{}', '{}', 'active', :t)"
            ),
            now,
        )
        for caption_id, image_id, version, score in [
            (1, 3, 1, -1.0),
            (2, 4, 1, -2.0),
            (3, 3, 2, -0.5),
        ]:
            conn.execute(
                text(
                    "INSERT INTO captions (id, image_id, model_version_id, text, score, candidates,"
                    " created_at, updated_at) VALUES (:c, :i, :v, 't', :s, '[]', :t, :t)"
                ),
                {"c": caption_id, "i": image_id, "v": version, "s": score, **now},
            )
        conn.execute(
            text("INSERT INTO reviews (image_id, decision, created_at) VALUES (4, 'approved', :t)"),
            now,
        )
    engine.dispose()
    migrate.upgrade(db_url)
    assert migrate.check(db_url) == []
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            assert jobs.recount(session) == []
            assert jobs.job_progress(session, 1) == jobs.JobProgress(1, 1, 1, 2, 1)
            keys = dict(session.execute(select(Image.id, Image.review_score)).all())
            # Image 3: its newest caption's score; image 4: reviewed; the rest: no caption.
            assert keys == {1: None, 2: None, 3: -0.5, 4: None, 5: None}
            assert session.get(Job, 1).unreviewed_count == 1
    finally:
        engine.dispose()
