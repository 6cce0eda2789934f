"""Job and image lifecycle: submit, claim, caption, fail, sweep, progress, reviews for training.

Every function takes a `Session` and never commits: the caller owns the transaction, so a
submit can be committed before anything is published, and a worker's caption and status
change land together. Functions that change many rows use single conditional UPDATEs (with
RETURNING) instead of read-modify-write, so concurrent workers cannot double-claim; ORM
objects already loaded in the session are not refreshed by them (call `session.expire_all()`
if you hold any).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, literal_column, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from captioner.models import (
    Caption,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    Review,
    ReviewDecision,
    Split,
    utcnow,
)

# Failure reasons are shown to people in the dashboard; keep them plain.
LEASE_EXHAUSTED_REASON = "gave up after {attempts} attempts (worker lost or timed out each time)"


class LifecycleError(ValueError):
    """A lifecycle call that cannot apply (unknown id, invalid review, ...)."""


@dataclass(frozen=True)
class ImageSpec:
    """One image to submit: where its bytes are, plus what is known about them already."""

    storage_key: str
    original_name: str = ""
    content_sha256: str | None = None
    size_bytes: int | None = None
    split: Split = Split.TRAIN


@dataclass(frozen=True)
class JobProgress:
    job_id: int
    queued: int = 0
    running: int = 0
    captioned: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.running + self.captioned + self.failed

    @property
    def done(self) -> int:
        return self.captioned + self.failed

    @property
    def is_complete(self) -> bool:
        return self.total > 0 and self.done == self.total


@dataclass(frozen=True)
class ReviewedCaption:
    """A training (or evaluation) example: the current, accepted review of one image."""

    image_id: int
    review_id: int
    storage_key: str
    text: str
    split: Split
    extra: dict[str, Any] = field(default_factory=dict)


# --- submit ---------------------------------------------------------------------------------


def create_job(
    session: Session,
    name: str,
    *,
    source: str = "",
    options: dict[str, Any] | None = None,
    priority: int = 0,
    owner_id: int | None = None,
) -> Job:
    """Add a job row (flushed, so it has an id)."""
    job = Job(name=name, source=source, options=options or {}, priority=priority, owner_id=owner_id)
    session.add(job)
    session.flush()
    return job


def submit_images(session: Session, job_id: int, images: Iterable[ImageSpec | str]) -> list[int]:
    """Queue images for a job; returns their ids in input order.

    Idempotent: a storage key already in the job returns the existing image's id. A finished
    job that receives new images is re-opened.
    """
    specs = [ImageSpec(storage_key=s) if isinstance(s, str) else s for s in images]
    if not specs:
        return []
    if session.get(Job, job_id) is None:
        raise LifecycleError(f"no job with id {job_id}")
    keys = [s.storage_key for s in specs]
    existing = _existing_image_ids(session, job_id, keys)
    now = utcnow()
    new_rows = []
    for spec in specs:
        if spec.storage_key in existing:
            continue
        row = Image(
            job_id=job_id,
            storage_key=spec.storage_key,
            original_name=spec.original_name or spec.storage_key.rsplit("/", 1)[-1],
            content_sha256=spec.content_sha256,
            size_bytes=spec.size_bytes,
            split=spec.split,
            status=ImageStatus.QUEUED,
            queued_at=now,
        )
        existing[spec.storage_key] = row  # duplicates inside one call collapse too
        new_rows.append(row)
    session.add_all(new_rows)
    session.flush()
    if new_rows:
        _count_new_images(session, job_id, len(new_rows))
    return [_id(existing[k]) for k in keys]


def _count_new_images(session: Session, job_id: int, n: int) -> None:
    # An SQL increment, not `job.image_count += n`: concurrent submits to one job both count.
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            image_count=Job.image_count + n,
            # New images re-open a finished job.
            status=case(
                (Job.status != JobStatus.FINISHED, Job.status),
                (Job.started_at.is_(None), JobStatus.QUEUED.value),
                else_=JobStatus.RUNNING.value,
            ),
            finished_at=case((Job.status == JobStatus.FINISHED, None), else_=Job.finished_at),
        )
        .execution_options(synchronize_session=False)
    )


def _existing_image_ids(session: Session, job_id: int, keys: Sequence[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    # Chunked: SQLite caps bound parameters per statement.
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        rows = session.execute(
            select(Image.storage_key, Image.id).where(
                Image.job_id == job_id, Image.storage_key.in_(chunk)
            )
        )
        found.update({key: image_id for key, image_id in rows})
    return found


def _id(value: Any) -> int:
    return value if isinstance(value, int) else value.id


# --- claim ----------------------------------------------------------------------------------


def _claimable(now: datetime, max_attempts: int | None):
    """Queued, or running with a lease that has run out (its worker is presumed lost)."""
    condition = or_(
        Image.status == ImageStatus.QUEUED,
        and_(Image.status == ImageStatus.RUNNING, Image.lease_until < now),
    )
    if max_attempts is not None:
        condition = and_(condition, Image.attempts < max_attempts)
    return condition


def claim_images(
    session: Session,
    *,
    worker_id: str,
    lease_seconds: int,
    image_ids: Sequence[int] | None = None,
    job_id: int | None = None,
    limit: int | None = None,
    max_attempts: int | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Claim claimable images for `worker_id`: queued -> running with a lease. Returns the ids won.

    The final UPDATE repeats the claimable condition, so a row another worker already holds
    does not match: it is skipped, never claimed twice. On PostgreSQL the candidates are first
    locked with SELECT ... FOR UPDATE SKIP LOCKED, so concurrent claimers split the rows
    instead of waiting on each other (a separate statement: inside `UPDATE ... IN (subquery
    LIMIT n)` the planner may evaluate the subquery more than once and exceed the limit).
    SQLite has one writer at a time, so there a single UPDATE with the subquery is atomic (and
    starting with the write avoids a read-then-write lock upgrade failing under contention).
    """
    now = now or utcnow()
    candidates = select(Image.id).where(_claimable(now, max_attempts))
    if image_ids is not None:
        if not image_ids:
            return []
        candidates = candidates.where(Image.id.in_(list(image_ids)))
    if job_id is not None:
        candidates = candidates.where(Image.job_id == job_id)
    candidates = candidates.order_by(Image.id)
    if limit is not None:
        candidates = candidates.limit(limit)

    if session.get_bind().dialect.name == "postgresql":
        locked = list(session.scalars(candidates.with_for_update(skip_locked=True)))
        if not locked:
            return []
        chosen = Image.id.in_(locked)
    else:
        chosen = Image.id.in_(candidates.scalar_subquery())

    statement = (
        update(Image)
        .where(chosen, _claimable(now, max_attempts))
        .values(
            status=ImageStatus.RUNNING,
            lease_owner=worker_id,
            lease_until=now + timedelta(seconds=lease_seconds),
            attempts=Image.attempts + 1,
            failure_reason=None,
        )
        .returning(Image.id, Image.job_id)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(statement).all()
    _mark_jobs_started({job for _, job in rows}, session, now)
    return sorted(image_id for image_id, _ in rows)


def _mark_jobs_started(job_ids: set[int], session: Session, now: datetime) -> None:
    if not job_ids:
        return
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now)
        .execution_options(synchronize_session=False)
    )


def extend_lease(
    session: Session, image_ids: Sequence[int], *, worker_id: str, lease_seconds: int
) -> list[int]:
    """Push out the lease on images this worker still holds (long batches); returns those ids."""
    rows = session.execute(
        update(Image)
        .where(
            Image.id.in_(list(image_ids)),
            Image.status == ImageStatus.RUNNING,
            Image.lease_owner == worker_id,
        )
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars())


# --- finish one image -----------------------------------------------------------------------


def save_caption(
    session: Session,
    *,
    image_id: int,
    model_version_id: int,
    text: str,
    score: float,
    candidates: list[dict[str, Any]] | None = None,
) -> bool:
    """Upsert the caption for (image, model version); returns False if it was left alone.

    A caption row that a review points at is never overwritten: the reviewer judged that
    text, and a model re-run must not change it under them.
    """
    now = utcnow()
    values = {
        "image_id": image_id,
        "model_version_id": model_version_id,
        "text": text,
        "score": score,
        "candidates": candidates or [],
        "created_at": now,
        "updated_at": now,
    }
    statement = _caption_upsert(session, [values]).returning(Caption.id)
    return session.execute(statement).first() is not None


def _caption_upsert(session: Session, rows: list[dict[str, Any]]):
    """INSERT captions ... ON CONFLICT (image, model version) DO UPDATE, unless reviewed."""
    insert = _dialect_insert(session)(Caption).values(rows)
    # The conflicting (existing) row is `captions` inside ON CONFLICT ... WHERE; a plain
    # `Caption.id` here would add `captions` to the subquery's FROM and match ANY reviewed caption.
    unreviewed = ~exists().where(Review.caption_id == literal_column("captions.id"))
    return insert.on_conflict_do_update(
        index_elements=[Caption.image_id, Caption.model_version_id],
        set_={
            "text": insert.excluded.text,
            "score": insert.excluded.score,
            "candidates": insert.excluded.candidates,
            "updated_at": insert.excluded.updated_at,
        },
        where=unreviewed,
    )


def _dialect_insert(session: Session):
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise LifecycleError(f"upsert is not implemented for the {name} dialect")


def complete_image(
    session: Session,
    *,
    image_id: int,
    model_version_id: int,
    text: str,
    score: float,
    candidates: list[dict[str, Any]] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> None:
    """Save the caption and mark the image captioned (lease released, any failure cleared)."""
    save_caption(
        session,
        image_id=image_id,
        model_version_id=model_version_id,
        text=text,
        score=score,
        candidates=candidates,
    )
    values: dict[str, Any] = {
        "status": ImageStatus.CAPTIONED,
        "failure_reason": None,
        "lease_owner": None,
        "lease_until": None,
        "finished_at": utcnow(),
    }
    if width is not None and height is not None:
        values.update(width=width, height=height)
    session.execute(
        update(Image)
        .where(Image.id == image_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


@dataclass
class CaptionRow:
    """One image's caption, for `complete_images`."""

    image_id: int
    text: str
    score: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    width: int | None = None
    height: int | None = None


def complete_images(session: Session, model_version_id: int, rows: Sequence[CaptionRow]) -> None:
    """`complete_image` for a whole batch in two statements: one multi-row caption upsert
    (never over a reviewed caption) and one executemany UPDATE of the images."""
    if not rows:
        return
    now = utcnow()
    rows_values = [
        {
            "image_id": r.image_id,
            "model_version_id": model_version_id,
            "text": r.text,
            "score": r.score,
            "candidates": r.candidates,
            "created_at": now,
            "updated_at": now,
        }
        for r in rows
    ]
    session.execute(_caption_upsert(session, rows_values))
    done = {
        "status": ImageStatus.CAPTIONED,
        "failure_reason": None,
        "lease_owner": None,
        "lease_until": None,
        "finished_at": now,
    }
    session.execute(
        update(Image),
        [
            {
                "id": r.image_id,
                **done,
                **({"width": r.width, "height": r.height} if r.width else {}),
            }
            for r in rows
        ],
    )


def fail_image(session: Session, image_id: int, reason: str) -> bool:
    """Mark an image failed with a reason a person can read; returns False if it was captioned.

    A caption that another worker already saved wins over a late failure.
    """
    rows = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status != ImageStatus.CAPTIONED)
        .values(
            status=ImageStatus.FAILED,
            failure_reason=reason,
            lease_owner=None,
            lease_until=None,
            finished_at=utcnow(),
        )
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return rows.first() is not None


def _back_to_queue(session: Session, *where, now: datetime) -> list[int]:
    """Images matching `where` go back to queued, lease cleared; their sorted ids."""
    rows = session.execute(
        update(Image)
        .where(*where)
        .values(status=ImageStatus.QUEUED, lease_owner=None, lease_until=None, queued_at=now)
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars())


def requeue_images(session: Session, image_ids: Sequence[int], *, worker_id: str) -> list[int]:
    """Give back images this worker holds but will not finish (shutdown, transient error)."""
    return _back_to_queue(
        session,
        Image.id.in_(list(image_ids)),
        Image.status == ImageStatus.RUNNING,
        Image.lease_owner == worker_id,
        now=utcnow(),
    )


# --- sweeper --------------------------------------------------------------------------------


def release_expired_leases(
    session: Session, *, max_attempts: int, now: datetime | None = None
) -> list[int]:
    """Expired leases go back to queued (ids returned, to re-publish) or, out of attempts, failed."""
    now = now or utcnow()
    expired = and_(Image.status == ImageStatus.RUNNING, Image.lease_until < now)
    session.execute(
        update(Image)
        .where(expired, Image.attempts >= max_attempts)
        .values(
            status=ImageStatus.FAILED,
            failure_reason=LEASE_EXHAUSTED_REASON.format(attempts=max_attempts),
            lease_owner=None,
            lease_until=None,
            finished_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return _back_to_queue(session, expired, Image.attempts < max_attempts, now=now)


def requeue_stale_queued(
    session: Session, *, older_than_seconds: int, now: datetime | None = None
) -> list[int]:
    """Ids of images queued longer than the timeout (message lost?); their clock is restarted."""
    now = now or utcnow()
    rows = session.execute(
        update(Image)
        .where(
            Image.status == ImageStatus.QUEUED,
            Image.queued_at < now - timedelta(seconds=older_than_seconds),
        )
        .values(queued_at=now)
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars())


def group_by_job(session: Session, image_ids: Sequence[int]) -> dict[int, list[int]]:
    """{job_id: [image ids]} for building queue messages, which carry one job's ids each."""
    grouped: dict[int, list[int]] = {}
    ids = list(image_ids)
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(Image.job_id, Image.id)
            .where(Image.id.in_(ids[start : start + 500]))
            .order_by(Image.id)
        )
        for job_id, image_id in rows:
            grouped.setdefault(job_id, []).append(image_id)
    return grouped


# --- jobs -----------------------------------------------------------------------------------


def job_progress(session: Session, job_id: int) -> JobProgress:
    """Live counts of a job's images by status."""
    rows = session.execute(
        select(Image.status, func.count()).where(Image.job_id == job_id).group_by(Image.status)
    )
    counts = {ImageStatus(status).value: n for status, n in rows}
    return JobProgress(job_id=job_id, **counts)


def finish_completed_jobs(session: Session, now: datetime | None = None) -> list[int]:
    """Mark started jobs whose images are all captioned or failed as finished; returns their ids."""
    now = now or utcnow()
    pending = exists().where(
        Image.job_id == Job.id, Image.status.in_([ImageStatus.QUEUED, ImageStatus.RUNNING])
    )
    ids = list(
        session.scalars(
            select(Job.id)
            .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), ~pending)
            .where(exists().where(Image.job_id == Job.id))
            .order_by(Job.id)
        )
    )
    for job_id in ids:
        progress = job_progress(session, job_id)
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.FINISHED,
                finished_at=now,
                captioned_count=progress.captioned,
                failed_count=progress.failed,
                started_at=func.coalesce(Job.started_at, now),
            )
            .execution_options(synchronize_session=False)
        )
    return ids


# --- reviews --------------------------------------------------------------------------------


def add_review(
    session: Session,
    *,
    image_id: int,
    decision: ReviewDecision | str,
    text: str | None = None,
    caption_id: int | None = None,
    reviewer_id: int | None = None,
) -> Review:
    """Append a review (never edits an old one). Approved without text keeps the caption's text."""
    decision = ReviewDecision(decision)
    caption = session.get(Caption, caption_id) if caption_id is not None else None
    if caption_id is not None and (caption is None or caption.image_id != image_id):
        raise LifecycleError(f"caption {caption_id} is not a caption of image {image_id}")
    if decision == ReviewDecision.CORRECTED and not (text and text.strip()):
        raise LifecycleError("a corrected review needs the corrected text")
    if decision == ReviewDecision.APPROVED and text is None:
        if caption is None:
            raise LifecycleError("an approval needs the caption it approves, or the text")
        text = caption.text
    if decision == ReviewDecision.REJECTED:
        text = None
    review = Review(
        image_id=image_id,
        caption_id=caption_id,
        reviewer_id=reviewer_id,
        decision=decision,
        text=text.strip() if text else text,
    )
    session.add(review)
    session.flush()
    return review


def current_review_ids():
    """A subquery of the current (newest) review id per image: columns image_id, review_id."""
    return (
        select(Review.image_id, func.max(Review.id).label("review_id"))
        .group_by(Review.image_id)
        .subquery("current_reviews")
    )


def current_review(session: Session, image_id: int) -> Review | None:
    return session.scalars(
        select(Review).where(Review.image_id == image_id).order_by(Review.id.desc()).limit(1)
    ).first()


def review_history(session: Session, image_id: int) -> list[Review]:
    """Every review of an image, oldest first."""
    return list(
        session.scalars(select(Review).where(Review.image_id == image_id).order_by(Review.id))
    )


def reviewed_captions(
    session: Session,
    *,
    split: Split | None = Split.TRAIN,
    after_review_id: int = 0,
    up_to_review_id: int | None = None,
) -> list[ReviewedCaption]:
    """Training (or held-out) examples: images whose current review approves or corrects a caption.

    `after_review_id`/`up_to_review_id` pick the reviews that became current in a window, so
    a training run can snapshot "reviews since the last run". A later rejection or re-edit
    replaces an earlier approval, because only the current review counts.
    """
    current = current_review_ids()
    query = (
        select(Review.id, Review.image_id, Review.text, Image.storage_key, Image.split)
        .join(current, current.c.review_id == Review.id)
        .join(Image, Image.id == Review.image_id)
        .where(
            Review.decision.in_([ReviewDecision.APPROVED, ReviewDecision.CORRECTED]),
            Review.id > after_review_id,
        )
        .order_by(Review.id)
    )
    if up_to_review_id is not None:
        query = query.where(Review.id <= up_to_review_id)
    if split is not None:
        query = query.where(Image.split == split)
    return [
        ReviewedCaption(
            image_id=image_id, review_id=review_id, storage_key=key, text=text, split=Split(sp)
        )
        for review_id, image_id, text, key, sp in session.execute(query)
    ]


def review_queue(
    session: Session, *, model_version_id: int, limit: int = 50, job_id: int | None = None
) -> list[Caption]:
    """Unreviewed captions of one model version, least confident first."""
    query = (
        select(Caption)
        .where(
            Caption.model_version_id == model_version_id,
            ~exists().where(Review.image_id == Caption.image_id),
        )
        .order_by(Caption.score.asc(), Caption.id)
        .limit(limit)
    )
    if job_id is not None:
        query = query.join(Image, Image.id == Caption.image_id).where(Image.job_id == job_id)
    return list(session.scalars(query))
