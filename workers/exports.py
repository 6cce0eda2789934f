"""Background exports: the `captioner.export(export_id)` task (maintenance queue).

The task moves the export to running (`captioner.state.exports.start_export`; an export already
done or failed is left alone, so a redelivered message changes nothing), streams the rows
(`captioner.export.export_rows`, a server-side cursor) into a temporary file in the export's
format (`captioner.export.write_export`), recording `rows_done` every `PROGRESS_EVERY` rows, then
uploads the file to the object store under `exports/<owner id>/<export id>/<file name>` (a
system namespace: nobody submits keys or prefixes there) and marks the export done with its key
and size. The key depends only on the export, so a second run writes the same one object.

Any failure -- the store, the database after its retries, a bug -- ends the export `failed`
with a reason a person can read. The temporary file lives in the process's temp directory
(`TMPDIR`), which must hold the largest export.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from captioner import export
from captioner.settings import get_settings
from captioner.state import exports
from captioner.state.db import session_scope
from captioner.state.models import Export
from captioner.storage import ObjectStore
from captioner.tasks import TASK_EXPORT
from workers.resources import backoff, is_transient_db_error, resources

log = logging.getLogger("captioner.worker.exports")

# Rows between two `rows_done` updates.
PROGRESS_EVERY = 5000
# The namespace export files live under (one of `captioner.storage.SYSTEM_PREFIXES`).
EXPORTS_PREFIX = "exports/"


@dataclass(frozen=True)
class ExportPlan:
    """What one export writes, read from its row when it starts."""

    export_id: int
    owner_id: int
    job_id: int | None
    fmt: str
    which: export.Which
    owner_only: bool  # without a job: only the owner's jobs (else every job)

    @property
    def file_name(self) -> str:
        return export.export_file_name(self.fmt, self.job_id, self.which)

    @property
    def object_key(self) -> str:
        return f"{EXPORTS_PREFIX}{self.owner_id}/{self.export_id}/{self.file_name}"


def _plan(row: Export) -> ExportPlan:
    options = dict(row.options or {})
    return ExportPlan(
        export_id=row.id,
        owner_id=row.owner_id,
        job_id=row.job_id,
        fmt=row.format,
        which=options.get("which", "both"),
        owner_only=bool(options.get("owner_only", True)),
    )


def run_export(
    export_id: int, *, sessions, store: ObjectStore, restart_after: timedelta | None = None
) -> dict[str, Any]:
    """Write export `export_id` from the database of `sessions` and upload it to `store`;
    returns {"outcome": done | skipped, ...}. A running export is written again only when it
    started more than `restart_after` ago (its worker was lost; None: always). Errors are
    raised: `export_task` retries transient database errors and fails the export for anything
    else."""
    with session_scope(sessions) as session:
        if not exports.start_export(session, export_id, restart_after=restart_after):
            return {"outcome": "skipped", "export_id": export_id}
        plan = _plan(session.get_one(Export, export_id))
    if plan.fmt not in export.BACKGROUND_FORMATS:
        raise ValueError(f"unknown export format {plan.fmt!r}")

    def report(rows_done: int) -> None:
        with session_scope(sessions) as session:
            exports.record_progress(session, export_id, rows_done)

    with tempfile.TemporaryDirectory(prefix="captioner-export-") as folder:
        path = Path(folder) / plan.file_name
        with sessions() as session, path.open("wb") as out:
            rows = export.export_rows(
                session,
                job_id=plan.job_id,
                owner_id=plan.owner_id if plan.owner_only else None,
                which=plan.which,
            )
            stats = export.write_export(
                rows,
                plan.fmt,
                out,
                plan.which,
                store=store,
                report=report,
                every=PROGRESS_EVERY,
            )
        size = path.stat().st_size
        store.put_file(plan.object_key, path, export.CONTENT_TYPES[plan.fmt])
    notes = {}
    if stats.missing_images:
        notes["missing_images"] = len(stats.missing_images)
    if stats.shards:
        notes["shards"] = stats.shards
    with session_scope(sessions) as session:
        finished = exports.finish_export(
            session,
            export_id,
            object_key=plan.object_key,
            size_bytes=size,
            rows_done=stats.rows,
            notes=notes,
        )
    log.info(
        "export %s (%s): %d rows, %d bytes at %s%s",
        export_id,
        plan.fmt,
        stats.rows,
        size,
        plan.object_key,
        "" if finished else " (it had ended meanwhile)",
    )
    return {"outcome": "done", "export_id": export_id, "rows": stats.rows, "bytes": size}


def failure_reason(exc: BaseException) -> str:
    """What people are told about an export that failed: the error's type and message."""
    if isinstance(exc, SoftTimeLimitExceeded):
        limit = get_settings().task_soft_time_limit_seconds
        return (
            f"writing the export failed: it ran past the worker's time limit ({limit} s, "
            "CAPTIONER_TASK_SOFT_TIME_LIMIT_SECONDS); export a job at a time or raise the limit"
        )
    message = " ".join(str(exc).split())
    return f"writing the export failed: {type(exc).__name__}" + (f": {message}" if message else "")


def fail(export_id: int, reason: str, sessions) -> bool:
    """Mark the export failed with `reason`; if even that fails (the database is down), it is
    logged and the export stays open."""
    try:
        with session_scope(sessions) as session:
            return exports.fail_export(session, export_id, reason)
    except Exception:
        log.exception("error: could not mark export %s failed", export_id)
        return False


# The worker's time limits apply (`task_soft_time_limit_seconds`, 30 minutes by default, on the
# prefork pool of a `-Q maintenance` worker): an export that runs past them fails with that
# reason instead of running on past the broker's visibility timeout (which would deliver it
# to a second worker meanwhile).
@shared_task(name=TASK_EXPORT, bind=True, max_retries=None, acks_late=True)
def export_task(self, export_id: int) -> dict[str, Any]:
    """Write one export into the object store (idempotent: a done export is left alone)."""
    settings = get_settings()
    res = resources(settings)
    retries = self.request.retries or 0
    try:
        return run_export(
            int(export_id),
            sessions=res.sessions,
            store=res.store,
            restart_after=timedelta(seconds=settings.task_time_limit_seconds),
        )
    except Exception as exc:
        if is_transient_db_error(exc) and retries < settings.task_max_retries:
            log.warning("retrying export %s, database error: %s", export_id, exc)
            raise self.retry(countdown=backoff(retries), exc=exc) from None
        log.exception("error: export %s failed", export_id)
        reason = failure_reason(exc)
        fail(int(export_id), reason, res.sessions)
        return {"outcome": "failed", "export_id": int(export_id), "reason": reason}
