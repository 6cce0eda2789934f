"""Jobs: create, submit images, progress, finish, cancel, retry, and the job counters.

Every function takes a `Session` and never commits: the caller owns the transaction, so a
submit can be committed before anything is published. Only code under `captioner/state/`
changes a status column or a counter.

The counters on the job row (`queued_count` ... `unreviewed_count`) change in the same
transaction as the rows they count, by SQL increments (`x = x + n`, grouped by job), so they
stay exact under concurrency and progress is one row read however large the job. `recount`
checks them against the rows (`captioner db check`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String, bindparam, case, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
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
    # The submitter's own id for the image (at most `Image.external_id`'s 512 characters).
    external_id: str | None = None


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


# --- counters -------------------------------------------------------------------------------

# The job counter that counts the images in each status.
STATUS_COUNTERS: dict[ImageStatus, str] = {
    ImageStatus.QUEUED: "queued_count",
    ImageStatus.RUNNING: "running_count",
    ImageStatus.CAPTIONED: "captioned_count",
    ImageStatus.FAILED: "failed_count",
}
# Every counter `recount` checks, in the order it reports them.
COUNTERS = ("image_count", *STATUS_COUNTERS.values(), "unreviewed_count")


@dataclass
class CounterDeltas:
    """Counter changes gathered during one transition, written by `apply` in one statement."""

    by_job: dict[int, dict[str, int]] = field(default_factory=dict)

    def add(self, job_id: int, counter: str, n: int = 1) -> None:
        counts = self.by_job.setdefault(job_id, {})
        counts[counter] = counts.get(counter, 0) + n

    def move(self, job_id: int, old: ImageStatus, new: ImageStatus, n: int = 1) -> None:
        """`n` images of the job went from status `old` to `new`."""
        if old != new:
            self.add(job_id, STATUS_COUNTERS[ImageStatus(old)], -n)
            self.add(job_id, STATUS_COUNTERS[ImageStatus(new)], n)

    def apply(self, session: Session) -> None:
        """UPDATE jobs SET x = x + :dx ... WHERE id = :job, one executemany, jobs in id order
        (concurrent transitions lock job rows in one order)."""
        changed = {
            job_id: {c: n for c, n in counts.items() if n}
            for job_id, counts in sorted(self.by_job.items())
        }
        changed = {job_id: counts for job_id, counts in changed.items() if counts}
        if not changed:
            return
        columns = sorted({c for counts in changed.values() for c in counts})
        jobs = Job.__table__
        statement = (
            update(jobs)
            .where(jobs.c.id == bindparam("b_job_id"))
            .values({c: jobs.c[c] + bindparam(f"b_{c}") for c in columns})
        )
        params = [
            {"b_job_id": job_id, **{f"b_{c}": counts.get(c, 0) for c in columns}}
            for job_id, counts in changed.items()
        ]
        session.execute(statement, params)
        self.by_job.clear()


@dataclass(frozen=True)
class Drift:
    """A job counter that differs from a recount of the job's rows."""

    job_id: int
    counter: str
    stored: int
    actual: int

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.counter} is {self.stored}, the rows say {self.actual}"


def recount(session: Session, *, repair: bool = False) -> list[Drift]:
    """Recount every job from its images (one GROUP BY over images, joined to the job rows in
    the same statement, so both sides come from one snapshot) and return each counter that
    differs. `repair` corrects them by the difference (`x = x + (actual - stored)`), so a
    transition committed meanwhile is not lost."""
    counted = (
        select(
            Image.job_id,
            func.count().label("image_count"),
            *(
                func.sum(case((Image.status == status, 1), else_=0)).label(counter)
                for status, counter in STATUS_COUNTERS.items()
            ),
            func.sum(case((Image.review_score.is_not(None), 1), else_=0)).label("unreviewed_count"),
        )
        .group_by(Image.job_id)
        .subquery("counted")
    )
    rows = session.execute(
        select(
            Job.id,
            *(getattr(Job, c) for c in COUNTERS),
            *(counted.c[c] for c in COUNTERS),
        )
        .outerjoin(counted, counted.c.job_id == Job.id)
        .order_by(Job.id)
    )
    drifts = []
    for job_id, *values in rows:
        stored, actual = values[: len(COUNTERS)], values[len(COUNTERS) :]
        for counter, have, want in zip(COUNTERS, stored, actual, strict=True):
            if have != (want or 0):
                drifts.append(Drift(job_id, counter, have, want or 0))
    if repair and drifts:
        deltas = CounterDeltas()
        for d in drifts:
            deltas.add(d.job_id, d.counter, d.actual - d.stored)
        deltas.apply(session)
    return drifts


# --- submit ---------------------------------------------------------------------------------

# Keys per existence query and per bulk INSERT (SQLite caps bound parameters per statement).
SUBMIT_CHUNK = 1000


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
    job that receives new images is re-opened. Per chunk of `SUBMIT_CHUNK` keys: one bulk
    INSERT ... ON CONFLICT DO NOTHING (so two submits of one key racing both succeed), one
    query for the keys that were there already (none for new keys), one counter update.
    """
    specs = [ImageSpec(storage_key=s) if isinstance(s, str) else s for s in images]
    if not specs:
        return []
    if session.scalar(select(Job.id).where(Job.id == job_id)) is None:
        raise LifecycleError(f"no job with id {job_id}")
    ids: dict[str, int] = {}
    now = utcnow()
    for start in range(0, len(specs), SUBMIT_CHUNK):
        _submit_chunk(session, job_id, specs[start : start + SUBMIT_CHUNK], ids, now)
    return [ids[s.storage_key] for s in specs]


def _submit_chunk(
    session: Session, job_id: int, specs: Sequence[ImageSpec], ids: dict[str, int], now: datetime
) -> None:
    """Add the chunk's keys to the job; `ids` gains every key's image id."""
    new_rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.storage_key in ids or spec.storage_key in new_rows:
            continue  # duplicates inside one call collapse too
        new_rows[spec.storage_key] = {
            "job_id": job_id,
            "storage_key": spec.storage_key,
            "original_name": spec.original_name or spec.storage_key.rsplit("/", 1)[-1],
            "content_sha256": spec.content_sha256,
            "size_bytes": spec.size_bytes,
            "split": spec.split,
            "external_id": spec.external_id,
            "status": ImageStatus.QUEUED,
            "attempts": 0,
            "created_at": now,
            "queued_at": now,
        }
    if not new_rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        inserted = _insert_unnest(session, job_id, list(new_rows.values()), now)
    else:
        images = Image.__table__
        statement = (
            dialect_insert(session)(images)
            .on_conflict_do_nothing(index_elements=[images.c.job_id, images.c.storage_key])
            .returning(images.c.storage_key, images.c.id)
        )
        inserted = dict(session.execute(statement, list(new_rows.values())).all())
    ids.update(inserted)
    if inserted:
        _count_new_images(session, job_id, len(inserted))
    there = [key for key in new_rows if key not in inserted]
    if there:
        rows = session.execute(
            select(Image.storage_key, Image.id).where(
                Image.job_id == job_id, Image.storage_key.in_(there)
            )
        )
        ids.update({key: image_id for key, image_id in rows})


# The fields of a new image that differ from row to row, with their SQL types.
_PER_ROW = {
    "storage_key": String(),
    "original_name": String(),
    "content_sha256": String(),
    "size_bytes": Integer(),
    "split": String(),
    "external_id": String(),
}


def _insert_unnest(
    session: Session, job_id: int, rows: list[dict[str, Any]], now: datetime
) -> dict[str, int]:
    """PostgreSQL: the chunk as one INSERT ... SELECT FROM unnest(one array per field), so the
    statement and its parameters stay small however many rows (an executemany of wide VALUES
    lists spends most of its time parsing parameters). {storage key: id} of the rows added."""
    arrays = [
        bindparam(f"b_{name}", [row[name] for row in rows], type_=postgresql.ARRAY(type_))
        for name, type_ in _PER_ROW.items()
    ]
    new = func.unnest(*arrays).table_valued(*_PER_ROW).render_derived(name="new_images")
    images = Image.__table__
    fixed = {
        "job_id": literal(job_id, images.c.job_id.type),
        "status": literal(ImageStatus.QUEUED, images.c.status.type),
        "attempts": literal(0, images.c.attempts.type),
        "created_at": literal(now, images.c.created_at.type),
        "queued_at": literal(now, images.c.queued_at.type),
    }
    source = select(*(new.c[name] for name in _PER_ROW), *fixed.values())
    statement = (
        postgresql.insert(images)
        .from_select([*_PER_ROW, *fixed], source)
        .on_conflict_do_nothing(index_elements=[images.c.job_id, images.c.storage_key])
        .returning(images.c.storage_key, images.c.id)
    )
    return dict(session.execute(statement).all())


def _count_new_images(session: Session, job_id: int, n: int) -> None:
    # An SQL increment, not `job.image_count += n`: concurrent submits to one job both count.
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            image_count=Job.image_count + n,
            queued_count=Job.queued_count + n,
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


def dialect_insert(session: Session):
    """The INSERT construct of the session's dialect (for ON CONFLICT)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise LifecycleError(f"upsert is not implemented for the {name} dialect")


# --- jobs -----------------------------------------------------------------------------------


def job_progress(session: Session, job_id: int) -> JobProgress:
    """Live counts of a job's images by status: the job row's counters (all zero for an
    unknown job)."""
    row = session.execute(
        select(Job.queued_count, Job.running_count, Job.captioned_count, Job.failed_count).where(
            Job.id == job_id
        )
    ).first()
    if row is None:
        return JobProgress(job_id=job_id)
    return JobProgress(job_id, *row)


def finish_completed_jobs(session: Session, now: datetime | None = None) -> list[int]:
    """Mark started jobs whose images are all captioned or failed as finished; returns their ids.

    Read from the counters. A job row another transaction holds is skipped (SKIP LOCKED on
    PostgreSQL): that transaction is changing the job, and the one after it (its own finish
    call, or the sweeper's) sees the result, while waiting here could deadlock two workers
    that each hold their own job's row.
    """
    now = now or utcnow()
    ids = list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                Job.queued_count + Job.running_count == 0,
                Job.image_count > 0,
            )
            .order_by(Job.id)
            .with_for_update(skip_locked=True)
        )
    )
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(
                status=JobStatus.FINISHED,
                finished_at=now,
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
    Images before the job row, the order every transition takes its locks in.
    """
    failed = _end_open_job(
        session, job_id, reason=CANCEL_REASON, now=now, status=JobStatus.CANCELLED
    )
    if failed is None:
        raise _not_open(session, job_id)
    return failed


def fail_job(session: Session, job_id: int, reason: str, *, now: datetime | None = None) -> bool:
    """End a queued or running job whose background step (a prefix listing, a URL fetch)
    failed for good: it is finished with `Job.failure_reason` set, its queued images fail with
    `reason`, running ones are left to finish. Returns False, changing nothing, for a job
    already finished or cancelled, or unknown (a repeated failure is a no-op).

    `outbox.record_job_events` then records `job.failed` for it. The job row is changed in SQL:
    refresh a `Job` already loaded in the session. Images before the job row, as `cancel_job`.
    """
    ended = _end_open_job(
        session, job_id, reason=reason, now=now, status=JobStatus.FINISHED, failure_reason=reason
    )
    return ended is not None


def _end_open_job(
    session: Session, job_id: int, *, reason: str, now: datetime | None, **job_values: Any
) -> int | None:
    """End a queued or running job with `job_values` (its new status, ...): its queued images
    fail with `reason`, running ones are left to finish, the counters move in the same
    statement. Returns how many images failed, or None when the job was not open (unknown,
    already ended, or ended by another transaction meanwhile, whose counters are then fixed)."""
    now = now or utcnow()
    open_statuses = [JobStatus.QUEUED, JobStatus.RUNNING]
    if session.scalar(select(Job.status).where(Job.id == job_id)) not in open_statuses:
        return None
    failed = session.execute(
        update(Image)
        .where(Image.job_id == job_id, Image.status == ImageStatus.QUEUED)
        .values(status=ImageStatus.FAILED, failure_reason=reason, finished_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    ended = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(open_statuses))
        .values(
            finished_at=now,
            queued_count=Job.queued_count - failed,
            failed_count=Job.failed_count + failed,
            **job_values,
        )
        .execution_options(synchronize_session=False)
    )
    if ended.rowcount == 0:  # ended meanwhile: its counters still count the images failed here
        deltas = CounterDeltas()
        deltas.move(job_id, ImageStatus.QUEUED, ImageStatus.FAILED, failed)
        deltas.apply(session)
        return None
    return failed


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
        _reopen(session, job_id, len(image_ids))
    return RetriedImages(job_id=job_id, image_ids=image_ids)


def _reopen(session: Session, job_id: int, requeued: int) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=case(
                (Job.started_at.is_(None), JobStatus.QUEUED.value),
                else_=JobStatus.RUNNING.value,
            ),
            finished_at=None,
            failed_count=Job.failed_count - requeued,
            queued_count=Job.queued_count + requeued,
        )
        .execution_options(synchronize_session=False)
    )
