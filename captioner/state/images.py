"""Images: claim, extend the lease, complete (save captions), fail, requeue, expire.

Every function takes a `Session` and never commits: the caller owns the transaction, so a
worker's caption and status change land together. Functions that change many rows use single
conditional UPDATEs (with RETURNING) instead of read-modify-write, so concurrent workers cannot
double-claim; ORM objects already loaded in the session are not refreshed by them (call
`session.expire_all()` if you hold any).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, literal_column, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from captioner.state.jobs import LifecycleError
from captioner.state.models import (
    Caption,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    Review,
    utcnow,
)

# Failure reasons are shown to people in the dashboard; keep them plain.
LEASE_EXHAUSTED_REASON = "gave up after {attempts} attempts (worker lost or timed out each time)"


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


def fail_queued_past_cap(session: Session, max_attempts: int) -> list[int]:
    """Queued images already claimed `max_attempts` times can never be claimed again: fail them."""
    rows = session.execute(
        update(Image)
        .where(Image.status == ImageStatus.QUEUED, Image.attempts >= max_attempts)
        .values(
            status=ImageStatus.FAILED,
            failure_reason=LEASE_EXHAUSTED_REASON.format(attempts=max_attempts),
            lease_owner=None,
            lease_until=None,
            finished_at=utcnow(),
        )
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars())
