"""Background exports: create, start, progress, finish, fail. The only code that changes
`exports.status` (and the progress columns beside it).

An export is `queued` when created (the caller publishes `captioner.export` after its commit),
`running` while a worker writes the file, then `done` (the file is in the object store at
`object_key`) or `failed` (`error` says why, for people). Every function takes a `Session` and
never commits: the caller owns the transaction. Transitions are conditional UPDATEs, so a
redelivered task and a slow one cannot both move the same export.

`rows_total` comes from the job counters (`captioner.state.jobs`), never from a COUNT over the
images: `image_count` for `both`, `captioned_count` for `model` and `reviewed` (an upper bound:
the rows the filter keeps are known only once written, and `finish_export` sets the exact
number).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from captioner.state.models import Export, ExportStatus, Job, utcnow

# Longest error kept on an export: enough to say what went wrong.
ERROR_MAX_CHARS = 2000
_OPEN = (ExportStatus.QUEUED, ExportStatus.RUNNING)


def expected_rows(session: Session, *, job_id: int | None, owner_id: int | None, which: str) -> int:
    """The rows an export of `job_id` (or of every job, only `owner_id`'s if given) will hold
    at most, from the job counters (one row per job read, never the images)."""
    counter = Job.image_count if which == "both" else Job.captioned_count
    query = select(func.coalesce(func.sum(counter), 0))
    if job_id is not None:
        query = query.where(Job.id == job_id)
    if owner_id is not None:
        query = query.where(Job.owner_id == owner_id)
    return int(session.scalar(query) or 0)


def create_export(
    session: Session,
    *,
    owner_id: int,
    fmt: str,
    job_id: int | None = None,
    options: dict[str, Any] | None = None,
    rows_total: int = 0,
) -> Export:
    """A new `queued` export (flushed, so it has its id)."""
    export = Export(
        owner_id=owner_id,
        job_id=job_id,
        format=fmt,
        options=dict(options or {}),
        status=ExportStatus.QUEUED,
        rows_total=rows_total,
        rows_done=0,
    )
    session.add(export)
    session.flush()
    return export


def start_export(
    session: Session,
    export_id: int,
    *,
    now: datetime | None = None,
    restart_after: timedelta | None = None,
) -> bool:
    """Move a queued export to running. A running one starts again from 0 rows (its worker
    was lost) when it started more than `restart_after` ago, or always when that is None; a
    duplicate message for an export that is still being written then changes nothing. False,
    changing nothing, when it is done, failed, missing or still running: the task then has
    nothing to do."""
    now = now or utcnow()
    startable = Export.status == ExportStatus.QUEUED
    if restart_after is None:
        startable = Export.status.in_(_OPEN)
    else:
        lost = and_(Export.status == ExportStatus.RUNNING, Export.started_at < now - restart_after)
        startable = or_(startable, lost)
    started = session.execute(
        update(Export)
        .where(Export.id == export_id, startable)
        .values(status=ExportStatus.RUNNING, started_at=now, rows_done=0, error=None)
        .execution_options(synchronize_session=False)
    )
    return started.rowcount == 1


def stalled_exports(
    session: Session, *, queued_before: datetime, running_before: datetime
) -> list[int]:
    """Exports whose message was lost: queued since before `queued_before`, or running since
    before `running_before` (past every time limit: their worker is gone). The sweeper sends
    them again; `start_export` makes a duplicate harmless."""
    return list(
        session.scalars(
            select(Export.id)
            .where(
                or_(
                    and_(Export.status == ExportStatus.QUEUED, Export.created_at < queued_before),
                    and_(Export.status == ExportStatus.RUNNING, Export.started_at < running_before),
                )
            )
            .order_by(Export.id)
        )
    )


def record_progress(session: Session, export_id: int, rows_done: int) -> None:
    """The rows written so far, while the export runs."""
    session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status == ExportStatus.RUNNING)
        .values(rows_done=rows_done)
        .execution_options(synchronize_session=False)
    )


def finish_export(
    session: Session,
    export_id: int,
    *,
    object_key: str,
    size_bytes: int,
    rows_done: int,
    notes: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """A running export's file is in the store: done, with its key, size and the exact row
    count (also as `rows_total`); `notes` (e.g. images missing from the store) are merged into
    its options. False, changing nothing, when it is not running."""
    values: dict[str, Any] = {
        "status": ExportStatus.DONE,
        "object_key": object_key,
        "size_bytes": size_bytes,
        "rows_done": rows_done,
        "rows_total": rows_done,
        "finished_at": now or utcnow(),
        "error": None,
    }
    if notes:
        current = session.scalar(select(Export.options).where(Export.id == export_id)) or {}
        values["options"] = {**current, **notes}
    done = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status == ExportStatus.RUNNING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return done.rowcount == 1


def fail_export(
    session: Session, export_id: int, error: str, *, now: datetime | None = None
) -> bool:
    """A queued or running export that cannot be written: failed with `error` (cut to
    `ERROR_MAX_CHARS`). False, changing nothing, when it already ended or is missing."""
    failed = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status.in_(_OPEN))
        .values(
            status=ExportStatus.FAILED,
            error=(error or "failed")[:ERROR_MAX_CHARS],
            finished_at=now or utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return failed.rowcount == 1
