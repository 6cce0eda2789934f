"""Background exports in the JSON API (under `/api/v1`, in the same OpenAPI document):

    POST /exports                  start one: {job_id (none: every job you can see), format,
                                   which} -> 202 with the export, queued
    GET  /exports                  your exports, newest first (`before` pages by id)
    GET  /exports/<id>             status, rows_done / rows_total, progress, download_url once done
    GET  /exports/<id>/download    the file, streamed from the object store

A worker writes the file (`workers.exports`, task `captioner.export` on the maintenance queue)
into the object store under `exports/<owner id>/<export id>/`; the dashboard only creates the
row (`captioner.state.exports`), publishes the task after the commit, and streams the file back.
Each user sees only their own exports (admins see all): anyone else's is 404.

Formats: jsonl, csv, coco, parquet, imagefolder (a zip for `datasets.load_dataset("imagefolder",
...)`) and webdataset (a tar of WebDataset shards). The synchronous `GET /api/v1/export` still
streams jsonl, csv and coco within the request, for small jobs.
"""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint, Schema, abort
from apiflask.fields import DateTime, Float, Integer, List, Nested, String
from apiflask.validators import OneOf, Range
from flask import Response, current_app, stream_with_context, url_for
from sqlalchemy import select

from captioner import export
from captioner.state import exports
from captioner.state.models import Export, ExportStatus, User, UserRole
from captioner.storage import ObjectNotFound
from captioner.tasks import TASK_EXPORT
from dashboard import MAX_ID, services
from dashboard.api import AUTH, E401, E404, E409, E422, E429, _user
from dashboard.auth import api_auth, db, limiter, submit_limit

bp = APIBlueprint("exports", __name__, url_prefix="/api/v1", tag="Exports")

# Bytes per read while a download streams from the store.
DOWNLOAD_CHUNK = 1024 * 1024


# --- schemas -------------------------------------------------------------------------------


class ExportCreateIn(Schema):
    job_id = Integer(
        validate=Range(1, MAX_ID),
        metadata={"description": "The job to export; leave out for every job you can see"},
    )
    format = String(
        load_default="jsonl",
        validate=OneOf(list(export.BACKGROUND_FORMATS)),
        metadata={
            "description": "jsonl, csv, coco (COCO captions JSON), parquet, imagefolder (a zip "
            "of images/ and metadata.jsonl for `datasets.load_dataset('imagefolder')`) or "
            "webdataset (a tar of WebDataset shards of images, .txt captions and .json metadata)"
        },
    )
    which = String(
        load_default="both",
        validate=OneOf(list(export.WHICH)),
        metadata={
            "description": "model: the model's captions; reviewed: approved or corrected "
            "captions only; both"
        },
    )


class ExportOut(Schema):
    id = Integer()
    job_id = Integer(allow_none=True, metadata={"description": "None: every job you could see"})
    format = String()
    which = String()
    status = String(metadata={"description": "queued, running, done or failed"})
    rows_done = Integer()
    rows_total = Integer(
        metadata={"description": "The rows expected (from the job counters); exact once done"}
    )
    progress = Float(metadata={"description": "Percent of rows_total written"})
    size_bytes = Integer(allow_none=True)
    file_name = String()
    content_type = String()
    download_url = String(allow_none=True, metadata={"description": "Set once the export is done"})
    error = String(allow_none=True, metadata={"description": "Why it failed"})
    missing_images = Integer(
        metadata={"description": "Images left out of an image archive: not in the object store"}
    )
    shards = Integer(allow_none=True, metadata={"description": "WebDataset shards in the tar"})
    owner = String(allow_none=True)
    created_at = DateTime()
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)


class ExportListQuery(Schema):
    limit = Integer(load_default=20, validate=Range(1, 100))
    before = Integer(
        validate=Range(1, MAX_ID),
        metadata={"description": "The `next_before` of the page before: older exports"},
    )


class ExportListOut(Schema):
    items = List(Nested(ExportOut))
    next_before = Integer(
        allow_none=True, metadata={"description": "Pass as `before` for the next page; None: last"}
    )


# --- helpers -------------------------------------------------------------------------------


def export_dict(row: Export) -> dict[str, Any]:
    options = dict(row.options or {})
    which = options.get("which", "both")
    done = row.status == ExportStatus.DONE
    total = row.rows_total or 0
    return {
        "id": row.id,
        "job_id": row.job_id,
        "format": row.format,
        "which": which,
        "status": ExportStatus(row.status).value,
        "rows_done": row.rows_done,
        "rows_total": total,
        "progress": _percent(row.rows_done, total, done),
        "size_bytes": row.size_bytes,
        "file_name": export.export_file_name(row.format, row.job_id, which),
        "content_type": export.CONTENT_TYPES.get(row.format, "application/octet-stream"),
        "download_url": url_for("exports.download_export", export_id=row.id) if done else None,
        "error": row.error,
        "missing_images": int(options.get("missing_images", 0)),
        "shards": options.get("shards"),
        "owner": row.owner.email if row.owner else None,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
    }


def _percent(rows_done: int, rows_total: int, done: bool) -> float:
    if done:
        return 100.0
    return round(min(100.0, 100.0 * rows_done / rows_total), 1) if rows_total else 0.0


def _visible(user: User):
    query = select(Export)
    if user.role != UserRole.ADMIN:
        query = query.where(Export.owner_id == user.id)
    return query


def _export_or_404(export_id: int) -> Export:
    user = _user()
    row = db().get(Export, export_id)
    if row is None or (user.role != UserRole.ADMIN and row.owner_id != user.id):
        abort(404, f"no export {export_id}")
    return row


# --- endpoints -----------------------------------------------------------------------------


@bp.post("/exports")
@api_auth()
@limiter.limit(submit_limit)
@bp.input(ExportCreateIn, arg_name="data")
@bp.output(ExportOut, status_code=202, description="The export, queued")
@bp.doc(
    summary="Start a background export of a job (or of every job you can see)",
    responses=E401 | E404 | E422 | E429,
    **AUTH,
)
def create_export(data):
    """Returns at once with the export queued; follow it with `GET /exports/{id}` and fetch
    the file from its `download_url` once it is done."""
    session, user = db(), _user()
    job_id = data.get("job_id")
    if job_id is not None:
        try:
            services.get_job(session, user, job_id)
        except services.NotFound:
            abort(404, f"no job {job_id}")
    owner_only = not services.sees_all_jobs(user)
    which = data["which"]
    total = exports.expected_rows(
        session, job_id=job_id, owner_id=user.id if owner_only else None, which=which
    )
    row = exports.create_export(
        session,
        owner_id=user.id,
        job_id=job_id,
        fmt=data["format"],
        options={"which": which, "owner_only": owner_only},
        rows_total=total,
    )
    session.commit()
    current_app.extensions["captioner"].publisher.task(TASK_EXPORT, row.id)
    return export_dict(row)


@bp.get("/exports")
@api_auth()
@bp.input(ExportListQuery, location="query", arg_name="query")
@bp.output(ExportListOut)
@bp.doc(summary="Your exports, newest first", responses=E401 | E422, **AUTH)
def list_exports(query):
    """Pages by id (keyset): pass a page's `next_before` as `before` for the next one."""
    limit = query["limit"]
    statement = _visible(_user()).order_by(Export.id.desc()).limit(limit + 1)
    if query.get("before") is not None:
        statement = statement.where(Export.id < query["before"])
    rows = list(db().scalars(statement))
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [export_dict(r) for r in rows],
        "next_before": rows[-1].id if more else None,
    }


@bp.get("/exports/<int:export_id>")
@api_auth()
@bp.output(ExportOut)
@bp.doc(summary="One export: status, progress, download link", responses=E401 | E404, **AUTH)
def get_export(export_id):
    return export_dict(_export_or_404(export_id))


@bp.get("/exports/<int:export_id>/download")
@api_auth()
@bp.doc(
    summary="Download an export's file",
    responses={
        200: {
            "description": "The export file, streamed",
            "content": {
                content_type.split(";")[0]: {"schema": {"type": "string", "format": "binary"}}
                for content_type in dict.fromkeys(export.CONTENT_TYPES.values())
            },
        }
    }
    | E401
    | E404
    | E409,
    **AUTH,
)
def download_export(export_id):
    row = _export_or_404(export_id)
    if row.status != ExportStatus.DONE or not row.object_key:
        abort(409, f"export {export_id} is {ExportStatus(row.status).value}, not done")
    store = current_app.extensions["captioner"].store
    try:
        body = store.open(row.object_key)
    except ObjectNotFound:
        abort(404, f"the file of export {export_id} is no longer in the store")
    which = (row.options or {}).get("which", "both")
    name = export.export_file_name(row.format, row.job_id, which)

    def stream():
        try:
            while chunk := body.read(DOWNLOAD_CHUNK):
                yield chunk
        finally:
            body.close()

    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if row.size_bytes is not None:
        headers["Content-Length"] = str(row.size_bytes)
    return Response(
        stream_with_context(stream()),
        content_type=export.CONTENT_TYPES.get(row.format, "application/octet-stream"),
        headers=headers,
    )
