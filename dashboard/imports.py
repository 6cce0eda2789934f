"""`POST /api/v1/imports`: captions written elsewhere brought in as a job whose images are
already captioned (and, if the file says so, reviewed), ready for review, export and training.

The file (multipart `file`, JSONL, CSV or COCO captions) or a JSON body (`rows`, or a COCO
document as `coco`) is read and checked as a whole first (`captioner.intake.imports`): one bad
row refuses the import (422, the first problems with their lines in `detail.errors`) and
nothing is created. Key images are captioned in the request's transaction; URL images are
fetched in the background and captioned with their imported caption once stored.
"""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint, Schema, abort
from apiflask.fields import Dict, File, Float, Integer, List, Nested, Raw, String
from apiflask.validators import Length, OneOf
from flask import current_app, request
from marshmallow import INCLUDE, ValidationError, validates_schema

from captioner import tasks
from captioner.intake import imports
from captioner.intake.errors import SubmissionRejected
from captioner.state.imports import IMPORT_DECISIONS
from dashboard.api import AUTH, E401, E403, E413, E422, E429, JobOut, job_dict
from dashboard.auth import api_auth, current_user, db, limiter, submit_limit

bp = APIBlueprint("imports", __name__, url_prefix="/api/v1", tag="Captioner")

_DECISIONS = [d.value for d in IMPORT_DECISIONS]
TEXT_MAX = imports.TEXT_MAX_LENGTH


# --- schemas -----------------------------------------------------------------------------------


class ImportRowIn(Schema):
    """One image and its caption. Unknown fields are ignored, so a `captioner export` JSONL
    line (`storage_key`, `model_caption`, `model_score`, `review_decision`,
    `reviewed_caption`) imports as it is."""

    class Meta:
        unknown = INCLUDE

    key = String(
        validate=Length(1, 1024),
        metadata={"description": "An object key in the store (give `key` or `url`)"},
    )
    url = String(validate=Length(1, 4096), metadata={"description": "An http(s) URL"})
    caption = String(required=True, validate=Length(1, imports.TEXT_MAX_LENGTH))
    score = Float(
        allow_nan=False,
        allow_none=True,
        metadata={
            "description": "Sorts the review queue (least confident first); without one: "
            f"{imports.UNSCORED}, after every model caption"
        },
    )
    external_id = String(validate=Length(1, 512), metadata={"description": "Your id for it"})
    review = Raw(
        metadata={
            "description": "A decision, or an object with the decision and its text",
            "oneOf": [
                {"type": "string", "enum": _DECISIONS},
                {
                    "type": "object",
                    "properties": {
                        "decision": {"type": "string", "enum": _DECISIONS},
                        "text": {"type": "string", "minLength": 1, "maxLength": TEXT_MAX},
                    },
                    "required": ["decision"],
                    "description": "`text`: the corrected caption (required for `corrected`)",
                },
            ],
        }
    )
    review_text = String(validate=Length(1, imports.TEXT_MAX_LENGTH))


class ImportOptionsIn(Schema):
    name = String(
        validate=Length(1, 200), metadata={"description": "The job's name (default: the file's)"}
    )
    key_prefix = String(
        load_default="",
        validate=Length(0, 1024),
        metadata={"description": "Put before every key (COCO file names are often bare)"},
    )


class ImportFileIn(ImportOptionsIn):
    file = File(required=True, metadata={"description": "JSONL, CSV or COCO captions JSON"})
    format = String(
        validate=OneOf(imports.FORMATS),
        metadata={"description": "Default: from the file name (.jsonl, .csv, .json = coco)"},
    )


class ImportRowsIn(ImportOptionsIn):
    rows = List(Nested(ImportRowIn), required=True, validate=Length(1, imports.MAX_ROWS))


class ImportCocoIn(ImportOptionsIn):
    coco = Dict(
        required=True,
        metadata={
            "description": "A COCO captions document: `images` ({id, file_name or key or url, "
            "external_id}) and `annotations` ({image_id, caption, score, review}); an image's "
            "first annotation is its caption, all of them its candidates"
        },
    )


class ImportJsonIn(ImportOptionsIn):
    """What a JSON body is loaded with: the rows are checked by the import itself, with the
    row numbers its refusals name."""

    rows = List(Dict(), validate=Length(1, imports.MAX_ROWS))
    coco = Dict()

    @validates_schema
    def _one_source(self, data, **kwargs):
        if ("rows" in data) == ("coco" in data):
            raise ValidationError("give exactly one of rows or coco")


class ImportOut(JobOut):
    rows = Integer(metadata={"description": "Rows imported"})


def _document_body(schema: Any, content_types: list[str]):
    """State `schema` as the request body of each of `content_types`: the view reads the body
    itself (a file or JSON)."""

    def decorator(f):
        if not hasattr(f, "_spec"):
            f._spec = {}
        f._spec.update(body=schema, content_type=content_types)
        return f

    return decorator


# --- the endpoint ------------------------------------------------------------------------------


@bp.post("/imports")
@api_auth()
@limiter.limit(submit_limit)
@_document_body(
    {"oneOf": [ImportFileIn, ImportRowsIn, ImportCocoIn]},
    ["multipart/form-data", "application/json"],
)
@bp.output(ImportOut, status_code=202)
@bp.doc(
    summary="Import captions (JSONL, CSV or COCO): a job whose images are already captioned",
    description="A multipart `file`, or a JSON body with `rows` or `coco`. Each row: `key` or "
    "`url`, `caption`, and optionally `score`, `external_id`, `review` (approved, corrected "
    "with its text, rejected: needs the reviewer role). Every row is checked first; one bad "
    "row refuses the whole import, nothing is created, and `detail.errors` lists the first "
    f"{imports.MAX_ERRORS} problems with their lines. Keys must lie in your source locations "
    "(403), as for a key submission, and name an object in the store (422). URL images are fetched in the background and captioned "
    "with their imported caption; a URL that cannot be fetched becomes a failed image.",
    responses=E401 | E403 | E413 | E422 | E429,
    **AUTH,
)
def create_import():
    source = _read_body()
    user = current_user()
    assert user is not None  # api_auth ran first
    session = db()
    settings = current_app.extensions["captioner"].settings
    try:
        rows, fmt, name = _rows(source)
        store = current_app.extensions["captioner"].store
        made = imports.create_import_job(session, user, settings, store, rows, name=name, fmt=fmt)
    except imports.ImportRefused as exc:
        session.rollback()
        abort(exc.status_code, exc.reason, detail={"errors": [e.as_dict() for e in exc.errors]})
    except SubmissionRejected as exc:
        session.rollback()
        abort(exc.status_code, exc.reason)
    session.commit()
    session.refresh(made.job)
    publisher = current_app.extensions["captioner"].publisher
    if made.fetch_urls:
        publisher.task(tasks.TASK_FETCH_URLS, made.job.id)
    for delivery_id in made.deliveries:
        publisher.task(tasks.TASK_DELIVER_WEBHOOK, delivery_id)
    return job_dict(made.job) | {"rows": len(rows)}


def _read_body() -> dict[str, Any]:
    """The request body, loaded: a multipart file with its options, or JSON rows or COCO."""
    if request.mimetype == "multipart/form-data":
        data = {**request.form.to_dict(), **request.files.to_dict()}
        return _load(ImportFileIn(), data, "form_and_files") | {"kind": "file"}
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(422, "the body is not a JSON object")
        return _load(ImportJsonIn(), body, "json") | {"kind": "json"}
    abort(422, "send a multipart/form-data `file`, or a JSON body with `rows` or `coco`")


def _load(schema: Schema, data: dict[str, Any], location: str) -> dict[str, Any]:
    """`schema.load(data)`; a 422 in the shape of the API's other validation errors."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        abort(422, "Validation error", detail={location: exc.messages})


def _rows(source: dict[str, Any]) -> tuple[list[imports.ImportRow], str, str]:
    """(rows, format, job name) of the loaded body; ImportRefused for bad rows."""
    prefix = source["key_prefix"]
    if source["kind"] == "json":
        if "rows" in source:
            return imports.parse_rows(source["rows"], key_prefix=prefix), "jsonl", _name(source)
        return imports.parse_coco(source["coco"], key_prefix=prefix), "coco", _name(source)
    upload = source["file"]
    filename = (upload.filename or "").rsplit("/", 1)[-1]
    fmt = source.get("format") or imports.guess_format(filename)
    if fmt is None:
        raise SubmissionRejected(
            f"cannot tell the format of {filename or 'the file'!r}: name it .jsonl, .csv or "
            ".json (COCO), or give `format`"
        )
    rows = imports.parse(upload.read(), fmt, key_prefix=prefix)
    return rows, fmt, _name(source, filename)


def _name(source: dict[str, Any], filename: str = "") -> str:
    return (source.get("name") or filename or "import")[:200]
