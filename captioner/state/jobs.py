"""Jobs: create, submit images, progress, finish, cancel, retry.

Every function takes a `Session` and never commits: the caller owns the transaction, so a
submit can be committed before anything is published. Only code under `captioner/state/`
changes a status column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, exists, func, select, update
from sqlalchemy.orm import Session

from captioner.state.models import (
    Image,
    ImageStatus,
    Job,
    JobStatus,
    Split,
    utcnow,
)


class LifecycleError(ValueError):
    """A lifecycle call that cannot apply (unknown id, invalid review, ...)."""


class TransitionRefused(LifecycleError):
    """A transition that does not apply to the row's current state (a job already finished or
    cancelled, a review with nothing left to undo): the request conflicts with the state."""


# The failure reason of the images a cancel takes off the queue; shown to people.
CANCEL_REASON = "job cancelled"


@dataclass(frozen=True)
class ImageSpec:
    """One image to submit: where its bytes are, plus what is known about them already."""

    storage_key: str
    original_name: str = ""
    content_sha256: str | None = None
    size_bytes: int | None = None
    split: Split = Split.TRAIN


@dataclass(frozen=True)
class RetriedImages:
    """Failed images a retry put back on the queue: the caller publishes them after its commit."""

    job_id: int
    image_ids: list[int]


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


def accepts_images(job: Job | None) -> bool:
    """Whether new images may still be added to `job` (it exists and was not cancelled)."""
    return job is not None and job.status != JobStatus.CANCELLED


def finish_if_empty(session: Session, job_id: int, now: datetime | None = None) -> bool:
    """Finish a job that ended up holding no images (an empty listing, say), so it does not stay
    queued forever; a cancelled job stays cancelled. Returns whether the job was finished."""
    rows = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.image_count == 0, Job.status != JobStatus.CANCELLED)
        .values(status=JobStatus.FINISHED, finished_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    return rows.rowcount > 0


# --- cancel and retry -----------------------------------------------------------------------


def cancel_job(session: Session, job_id: int, *, now: datetime | None = None) -> int:
    """Cancel a queued or running job: its queued images fail with `CANCEL_REASON`, running ones
    are left to finish. Returns how many images it failed.

    Raises `TransitionRefused` for a job already finished or cancelled, `LifecycleError` for an
    unknown id. The job row is changed in SQL: refresh a `Job` already loaded in the session.
    """
    now = now or utcnow()
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .values(status=JobStatus.CANCELLED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    if cancelled.rowcount == 0:
        raise _not_open(session, job_id)
    failed = session.execute(
        update(Image)
        .where(Image.job_id == job_id, Image.status == ImageStatus.QUEUED)
        .values(status=ImageStatus.FAILED, failure_reason=CANCEL_REASON, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    return failed.rowcount


def _not_open(session: Session, job_id: int) -> LifecycleError:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        return LifecycleError(f"no job with id {job_id}")
    return TransitionRefused(f"job {job_id} is already {JobStatus(status).value}")


def retry_failed(session: Session, job_id: int, *, now: datetime | None = None) -> RetriedImages:
    """Put a job's failed images back on the queue (attempts reset) and re-open the job when
    there were any (running if it had started, else queued). Publishing is the caller's."""
    now = now or utcnow()
    rows = session.execute(
        update(Image)
        .where(Image.job_id == job_id, Image.status == ImageStatus.FAILED)
        .values(
            status=ImageStatus.QUEUED,
            failure_reason=None,
            attempts=0,
            queued_at=now,
            finished_at=None,
        )
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    image_ids = sorted(rows.scalars())
    if image_ids:
        _reopen(session, job_id)
    return RetriedImages(job_id=job_id, image_ids=image_ids)


def _reopen(session: Session, job_id: int) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=case(
                (Job.started_at.is_(None), JobStatus.QUEUED.value),
                else_=JobStatus.RUNNING.value,
            ),
            finished_at=None,
        )
        .execution_options(synchronize_session=False)
    )
