"""The JSON API, `/api/v1`: jobs, images, review, export, tokens, users, webhooks.

Every endpoint is described by its schemas, so the OpenAPI document at `/api/openapi.json`
is generated from this code. Errors are `{"message": ..., "detail": {...}}` with the status
codes each endpoint lists (401 bad token, 403 role, 404 not visible, 409 conflict, 413 too
large, 422 refused input with the reason in `message`).
"""

from __future__ import annotations

import mimetypes

from apiflask import APIBlueprint, Schema, abort
from apiflask.fields import (
    Boolean,
    DateTime,
    Dict,
    Field,
    File,
    Float,
    Integer,
    List,
    Nested,
    String,
)
from apiflask.validators import Length, OneOf, Range
from flask import Response, current_app, stream_with_context
from marshmallow import INCLUDE, ValidationError, validates_schema
from sqlalchemy import func, select

from captioner import export, webhooks
from captioner.accounts import (
    change_password,
    create_user,
    disable_user,
    enable_user,
    find_user,
    revoke_tokens,
)
from captioner.intake import previews, submit
from captioner.intake.decode import ImageRejected, open_image
from captioner.intake.errors import SubmissionRejected
from captioner.intake.prefixes import check_grants
from captioner.intake.uploads import UploadRefused, open_upload
from captioner.state import jobs, outbox, reviews
from captioner.state.models import (
    ApiToken,
    Image,
    ImageStatus,
    Job,
    User,
    UserRole,
    Webhook,
    utcnow,
)
from captioner.storage import ObjectNotFound, ObjectTooLarge, StorageError
from dashboard import services
from dashboard.auth import (
    api_auth,
    current_user,
    db,
    keep_this_session,
    limiter,
    submit_limit,
    token_in_use,
)

bp = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="Captioner")

AUTH = {"security": "bearerAuth"}
E401 = {401: "Missing, invalid or revoked token"}
E403 = {403: "Your role does not allow this"}
E404 = {404: "Not found (or not yours)"}
E409 = {409: "Conflict with the current state"}
E413 = {413: "Upload too large"}
E422 = {422: "Refused input; `message` says why"}
E429 = {429: "Too many submissions; slow down"}

# --- schemas -------------------------------------------------------------------------------


class ProgressOut(Schema):
    queued = Integer()
    running = Integer()
    captioned = Integer()
    failed = Integer()
    total = Integer()
    done = Integer()
    percent = Float()


class JobOut(Schema):
    id = Integer()
    name = String()
    source = String()
    status = String()
    priority = Integer()
    options = Dict()
    owner = String(allow_none=True)
    image_count = Integer()
    created_at = DateTime()
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)
    progress = Nested(ProgressOut)


class JobListOut(Schema):
    items = List(Nested(JobOut))
    total = Integer()


class CandidateOut(Schema):
    text = String()
    score = Float(
        allow_none=True,
        metadata={"description": "Mean token log-probability of this alternative (at most 0)"},
    )
    confidence = Float(
        allow_none=True,
        metadata={"description": "Probability in [0, 1] that this alternative is right"},
    )


class CaptionOut(Schema):
    id = Integer()
    text = String()
    score = Float(
        metadata={
            "description": "A model caption's confidence: the probability in [0, 1] that it is "
            "right (the review queue shows the least confident first); an imported caption's "
            "score is the one it was imported with"
        }
    )
    candidates = List(Nested(CandidateOut))
    model_version_id = Integer(
        allow_none=True, metadata={"description": "The model that wrote it; null if imported"}
    )
    source = String(metadata={"description": "`model`, or `import` (a caption import)"})


class ReviewOut(Schema):
    id = Integer()
    image_id = Integer()
    decision = String()
    text = String(allow_none=True)
    caption_id = Integer(allow_none=True)
    reviewer = String(allow_none=True)
    created_at = DateTime()
    undoes_id = Integer(allow_none=True)


class ImageOut(Schema):
    id = Integer()
    job_id = Integer()
    original_name = String()
    external_id = String(
        allow_none=True,
        metadata={"description": "Your id for the image, given at submission or import"},
    )
    status = String()
    failure_reason = String(allow_none=True)
    width = Integer(allow_none=True)
    height = Integer(allow_none=True)
    content_url = String(metadata={"description": "The original image"})
    preview_url = String(
        metadata={"description": "The image fitted within 1024 px (a stored JPEG preview)"}
    )
    thumbnail_url = String(metadata={"description": "The image fitted within 256 px"})
    caption = Nested(CaptionOut, allow_none=True)
    review = Nested(ReviewOut, allow_none=True)


class ImageListOut(Schema):
    items = List(Nested(ImageOut))
    total = Integer(metadata={"description": "Images the filter matches (the job's counters)"})
    next_after = Integer(
        allow_none=True,
        metadata={"description": "Pass as `after` for the next page; null on the last page"},
    )


class QueueOut(Schema):
    items = List(Nested(ImageOut))
    total = Integer(metadata={"description": "Captions the filters match"})
    total_exact = Boolean(
        metadata={"description": "False when `total` stopped at a cap (score or text filters)"}
    )
    next_cursor = String(
        allow_none=True,
        metadata={"description": "Pass as `after` for the next page; null on the last page"},
    )


class JobDetailOut(JobOut):
    failures = List(Nested(ImageOut))


class DecodingFields(Schema):
    name = String(load_default="untitled", validate=Length(1, 200))
    priority = Integer(
        load_default=0,
        validate=Range(-100, 100),
        metadata={"description": "Above 0 needs the admin role (403)"},
    )
    num_beams = Integer(load_default=3, validate=Range(1, 16))
    n_best = Integer(load_default=3, validate=Range(1, 10))
    recaption = Boolean(load_default=False)
    interactive = Boolean(
        load_default=False,
        metadata={
            "description": "The low-latency queue: at most `CAPTIONER_INTERACTIVE_MAX_IMAGES` "
            "images, never a prefix (422)"
        },
    )


EXTERNAL_ID_MAX = submit.EXTERNAL_ID_MAX_LENGTH  # `images.external_id`


class SourceItem(Field):
    """One key or URL of a submission: the plain string, or an object with it (under `name`)
    and the submitter's `external_id` for the image. Loads as the string or as
    `{name: ..., "external_id": ...}`; the document states both shapes (`oneOf`)."""

    def __init__(self, name: str, max_length: int, **kwargs) -> None:
        self.item_name = name
        self.max_length = max_length
        text = {"type": "string", "minLength": 1, "maxLength": max_length}
        external_id = {"type": "string", "minLength": 1, "maxLength": EXTERNAL_ID_MAX}
        shape = {
            "type": "object",
            "properties": {name: text, "external_id": external_id},
            "required": [name],
            "additionalProperties": False,
        }
        super().__init__(metadata={"oneOf": [text, shape]}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return self._text(value, self.item_name)
        if not isinstance(value, dict) or set(value) - {self.item_name, "external_id"}:
            raise ValidationError(
                f"a string, or an object with `{self.item_name}` and optionally `external_id`"
            )
        if self.item_name not in value:
            raise ValidationError(f"`{self.item_name}` missing")
        item = {self.item_name: self._text(value[self.item_name], self.item_name)}
        if "external_id" in value:
            item["external_id"] = self._text(value["external_id"], "external_id", EXTERNAL_ID_MAX)
        return item

    def _text(self, value, what: str, longest: int | None = None) -> str:
        longest = longest or self.max_length
        if not isinstance(value, str) or not 1 <= len(value) <= longest:
            raise ValidationError(f"`{what}` must be a string of 1 to {longest} characters")
        return value


def _keys(**kwargs) -> List:
    return List(SourceItem("key", 1024), validate=Length(1, 100_000), **kwargs)


def _prefix(**kwargs) -> String:
    return String(validate=Length(0, 1024), **kwargs)


def _urls(**kwargs) -> List:
    return List(SourceItem("url", 4096), validate=Length(1, 100_000), **kwargs)


class JobCreateIn(DecodingFields):
    """What `POST /jobs` validates: the options and exactly one source. The document shows it
    as `JOB_CREATE_DOC`, one shape per source."""

    keys = _keys()
    prefix = _prefix()
    urls = _urls()

    @validates_schema
    def _one_source(self, data, **kwargs):
        given = [k for k in ("keys", "prefix", "urls") if k in data]
        if len(given) != 1:
            raise ValidationError("give exactly one of keys, prefix or urls")


class JobFromKeysIn(DecodingFields):
    keys = _keys(required=True)


class JobFromPrefixIn(DecodingFields):
    prefix = _prefix(required=True)


class JobFromUrlsIn(DecodingFields):
    urls = _urls(required=True)


# Each shape forbids unknown properties, so a body matches exactly one: the rule `_one_source`
# enforces, stated where a client (or a fuzzer) can read it.
JOB_CREATE_DOC = {"oneOf": [JobFromKeysIn, JobFromPrefixIn, JobFromUrlsIn]}


def _document_body(schema: dict):
    """Show `schema` (JSON Schema, marshmallow schemas allowed inside `oneOf`) as the request
    body in the OpenAPI document instead of the `bp.input` schema, which still validates.
    Goes directly above `bp.input`."""

    def decorator(f):
        f._spec["body"] = schema
        return f

    return decorator


class UploadIn(DecodingFields):
    files = List(File(), load_default=list)
    archive = File(metadata={"description": "A zip archive of images"})


class RefusedOut(Schema):
    name = String(metadata={"description": "The file's name, or the zip member's path"})
    reason = String()


class UploadJobOut(JobOut):
    refused = List(
        Nested(RefusedOut),
        metadata={
            "description": "Files and zip members left out of the job, each with its reason; "
            "the job holds the rest"
        },
    )


class UploadRefusedDetail(Schema):
    class Meta:
        unknown = INCLUDE  # a validation error names the fields it refused instead

    refused = List(Nested(RefusedOut), metadata={"description": "Every file with its reason"})


class UploadRefusedOut(Schema):
    message = String(metadata={"description": "The refused files with their reasons, in words"})
    detail = Nested(UploadRefusedDetail)


def _refused_response(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": UploadRefusedOut}},
    }


class IdsOut(Schema):
    count = Integer()


class QueueIn(Schema):
    job_id = Integer(validate=Range(1, 2**31 - 1))
    status = String(
        load_default="unreviewed",
        validate=OneOf(["unreviewed", "reviewed", "approved", "corrected", "rejected", "any"]),
    )
    min_score = Float(allow_nan=False)
    max_score = Float(allow_nan=False)
    q = String(validate=Length(0, 200))
    limit = Integer(load_default=50, validate=Range(1, 500))
    after = String(
        validate=Length(1, 100),
        metadata={"description": "The `next_cursor` of the page before (opaque)"},
    )
    offset = Integer(
        load_default=0,
        validate=Range(0, 10_000),
        metadata={"description": "Not for the unreviewed queue; beyond 10,000 page by `after`"},
    )
    skip_claimed = Boolean(
        load_default=False,
        metadata={"description": "Unreviewed queue: leave out images other reviewers claimed"},
    )
    claim = Boolean(
        load_default=False,
        metadata={
            "description": "Unreviewed queue: also claim the first image returned for you "
            "(implies `skip_claimed`); the review page's first request"
        },
    )


class ClaimOut(Schema):
    image_id = Integer()
    claimed = Boolean(
        metadata={"description": "False when claims are unavailable (Redis down): review on"}
    )
    expires_in = Integer(metadata={"description": "Seconds the claim lasts unless renewed"})


class ReviewIn(Schema):
    decision = String(required=True, validate=OneOf(["approved", "corrected", "rejected"]))
    text = String(validate=Length(1, 2000), allow_none=True)
    caption_id = Integer(allow_none=True, validate=Range(1, 2**31 - 1))


class HistoryOut(Schema):
    items = List(Nested(ReviewOut))


class BulkApproveIn(Schema):
    min_score = Float(required=True, allow_nan=False)


class BulkApproveOut(Schema):
    count = Integer(metadata={"description": "Captions approved"})
    batch = String(
        allow_none=True,
        metadata={
            "description": "Names this approval for `POST /jobs/{job_id}/approve-undo`; null "
            "when nothing was approved"
        },
    )


class ImagesQueryIn(Schema):
    status = String(validate=OneOf([s.value for s in ImageStatus]))
    limit = Integer(load_default=100, validate=Range(1, 1000))
    after = Integer(
        validate=Range(0, 2**63 - 1),
        metadata={"description": "The `next_after` of the page before: images with a larger id"},
    )
    offset = Integer(load_default=0, validate=Range(0, 10_000))


class ExportIn(Schema):
    job_id = Integer(validate=Range(1, 2**31 - 1))
    format = String(load_default="jsonl", validate=OneOf(list(export.FORMATS)))
    which = String(load_default="both", validate=OneOf(list(export.WHICH)))


class TokenIn(Schema):
    name = String(load_default="", validate=Length(0, 200))


class TokenOut(Schema):
    id = Integer()
    name = String()
    created_at = DateTime()
    last_used_at = DateTime(allow_none=True)
    revoked_at = DateTime(allow_none=True)
    token = String(metadata={"description": "The plain token: shown only in the create response"})


class TokenListOut(Schema):
    items = List(Nested(TokenOut))


class UserIn(Schema):
    email = String(required=True, validate=Length(3, 320))
    name = String(load_default="", validate=Length(0, 200))
    password = String(required=True, validate=Length(8, 200))
    role = String(load_default="submitter", validate=OneOf([r.value for r in UserRole]))


class UserPatchIn(Schema):
    name = String(validate=Length(0, 200))
    password = String(validate=Length(8, 200))
    role = String(validate=OneOf([r.value for r in UserRole]))
    source_prefixes = List(
        String(validate=Length(0, 1024)),
        validate=Length(0, 100),
        metadata={
            "description": "Key prefixes the user may submit keys and prefixes within, besides "
            "`CAPTIONER_SOURCE_PREFIXES`; never the system's uploads/, urls/, models/, exports/"
        },
    )


class UserOut(Schema):
    id = Integer()
    email = String()
    name = String()
    role = String()
    created_at = DateTime()
    disabled_at = DateTime(allow_none=True)
    source_prefixes = List(String())


class RevokedOut(Schema):
    revoked = Integer()


class UserListOut(Schema):
    items = List(Nested(UserOut))


class WebhookIn(Schema):
    url = String(required=True, validate=Length(1, 2000))
    events = List(String(validate=OneOf(list(outbox.EVENTS))), load_default=list)


class WebhookOut(Schema):
    id = Integer()
    url = String()
    events = List(String())
    created_at = DateTime()
    secret = String(
        metadata={
            "description": "Signing secret (`whsec_...`, Standard Webhooks): shown only in the "
            "create and rotate responses"
        }
    )
    previous_secret_expires_at = DateTime(
        allow_none=True,
        metadata={"description": "Until then deliveries are also signed with the previous secret"},
    )


class WebhookListOut(Schema):
    items = List(Nested(WebhookOut))


class EmptyOut(Schema):
    pass


# --- serialisers ---------------------------------------------------------------------------


def job_dict(job: Job) -> dict:
    """The job with its progress, read from the counters on its row."""
    progress = services.progress_of(job)
    return {
        "id": job.id,
        "name": job.name,
        "source": job.source,
        "status": job.status.value,
        "priority": job.priority,
        "options": {k: v for k, v in (job.options or {}).items() if k != "urls"},
        "owner": job.owner.email if job.owner else None,
        "image_count": job.image_count,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": {
            "queued": progress.queued,
            "running": progress.running,
            "captioned": progress.captioned,
            "failed": progress.failed,
            "total": progress.total,
            "done": progress.done,
            "percent": round(100.0 * progress.done / progress.total, 1) if progress.total else 0.0,
        },
    }


def review_dict(review) -> dict | None:
    if review is None:
        return None
    return {
        "id": review.id,
        "image_id": review.image_id,
        "decision": review.decision.value,
        "text": review.text,
        "caption_id": review.caption_id,
        "reviewer": review.reviewer.email if review.reviewer else None,
        "created_at": review.created_at,
        "undoes_id": review.undoes_id,
    }


def caption_dict(caption) -> dict | None:
    if caption is None:
        return None
    return {
        "id": caption.id,
        "text": caption.text,
        "score": caption.score,
        "candidates": [
            {
                "text": str(c.get("text", "")),
                "score": c.get("score"),
                "confidence": c.get("confidence"),
            }
            for c in (caption.candidates or [])
            if isinstance(c, dict)
        ],
        "model_version_id": caption.model_version_id,
        "source": caption.source.value,
    }


def image_dicts(session, images: list[Image]) -> list[dict]:
    """`image_dict` of each image, their captions and reviews loaded in one query each."""
    ids = [image.id for image in images]
    captions = services.newest_captions(session, ids)
    current = services.current_reviews(session, ids)
    return [image_dict(session, i, captions.get(i.id), current.get(i.id)) for i in images]


def image_dict(session, image: Image, caption=..., review=...) -> dict:
    if caption is ...:
        caption = services.latest_caption(session, image.id)
    if review is ...:
        review = reviews.current_review(session, image.id)
    return {
        "id": image.id,
        "job_id": image.job_id,
        "original_name": image.original_name,
        "external_id": image.external_id,
        "status": image.status.value,
        "failure_reason": image.failure_reason,
        "width": image.width,
        "height": image.height,
        "content_url": f"/api/v1/images/{image.id}/content",
        "preview_url": f"/api/v1/images/{image.id}/preview?side={previews.PREVIEW_SIDE}",
        "thumbnail_url": f"/api/v1/images/{image.id}/preview?side={previews.THUMBNAIL_SIDE}",
        "caption": caption_dict(caption),
        "review": review_dict(review),
    }


def _user() -> User:
    user = current_user()
    assert user is not None  # api_auth ran first
    return user


def _job_or_404(job_id: int) -> Job:
    try:
        return services.get_job(db(), _user(), job_id)
    except services.NotFound:
        abort(404, f"no job {job_id}")


def _own_job_or_404(job_id: int) -> Job:
    """The job to cancel or retry: 404 when the caller cannot see it, 403 when they see it but
    are neither its owner nor an admin."""
    try:
        return services.get_own_job(db(), _user(), job_id)
    except services.NotFound:
        abort(404, f"no job {job_id}")
    except services.Forbidden as exc:
        abort(403, str(exc))


def _image_or_404(image_id: int) -> Image:
    try:
        return services.get_image(db(), _user(), image_id)
    except services.NotFound:
        abort(404, f"no image {image_id}")


def _opts(data: dict) -> services.JobOptions:
    return services.JobOptions(
        name=data.get("name") or "untitled",
        priority=data.get("priority", 0),
        num_beams=data.get("num_beams", 3),
        n_best=min(data.get("n_best", 3), data.get("num_beams", 3)),
        recaption=data.get("recaption", False),
        interactive=data.get("interactive", False),
    )


# --- jobs ----------------------------------------------------------------------------------


@bp.post("/jobs")
@api_auth()
@limiter.limit(submit_limit)
@_document_body(JOB_CREATE_DOC)
@bp.input(JobCreateIn, arg_name="data")
@bp.output(JobOut, status_code=202)
@bp.doc(
    summary="Submit object keys, a storage prefix or http(s) URLs",
    responses=E401 | E403 | E413 | E422 | E429,
    **AUTH,
)
def create_job(data):
    """Returns at once: a prefix is listed and URLs are fetched by background tasks."""
    session = db()
    try:
        if "keys" in data:
            job = services.submit_keys(session, _user(), _opts(data), data["keys"])
        elif "prefix" in data:
            job = services.submit_prefix(session, _user(), _opts(data), data["prefix"])
        else:
            job = services.submit_urls(session, _user(), _opts(data), data["urls"])
    except SubmissionRejected as exc:
        session.rollback()
        abort(exc.status_code, exc.reason)
    return job_dict(job)


@bp.post("/jobs/upload")
@api_auth()
@limiter.limit(submit_limit)
@bp.input(UploadIn, location="form_and_files", arg_name="data")
@bp.output(UploadJobOut, status_code=202)
@bp.doc(
    summary="Upload image files and/or one zip archive",
    responses=E401
    | E403
    | E429
    | {
        413: _refused_response("Upload too large, or every file over the size limit"),
        422: _refused_response("Refused input, or every file refused; `message` says why"),
    },
    **AUTH,
)
def upload_job(data):
    """Each file and zip member is checked, then stored, one at a time. A refused one is left
    out and listed in `refused` with its reason; the job holds the rest. When every one is
    refused, nothing is created: 422 (413 when every one was too large) listing them all."""
    settings = current_app.extensions["captioner"].settings
    user, opts = _user(), _opts(data)
    try:
        with open_upload(data.get("files") or [], data.get("archive"), settings) as pending:
            services.check_options(user, opts, pending.count)  # before anything is stored
            upload = pending.store(current_app.extensions["captioner"].store, owner_id=user.id)
        job = services.submit_files(db(), user, opts, upload.files, upload.source)
    except SubmissionRejected as exc:
        db().rollback()
        refused = exc.refused if isinstance(exc, UploadRefused) else None
        abort(exc.status_code, exc.reason, refused and {"refused": [r.as_dict() for r in refused]})
    return job_dict(job) | {"refused": [r.as_dict() for r in upload.refused]}


@bp.get("/jobs")
@api_auth()
@bp.input(
    Schema.from_dict(
        {
            "limit": Integer(load_default=50, validate=Range(1, 500)),
            "offset": Integer(load_default=0, validate=Range(0, 10_000_000)),
        },
        name="JobsQuery",
    ),
    location="query",
    arg_name="query",
)
@bp.output(JobListOut)
@bp.doc(summary="Jobs you can see, newest first", responses=E401, **AUTH)
def list_jobs(query):
    session = db()
    # The jobs table holds one row per submission, not per image: counting it is cheap.
    base = services.listed_jobs(_user())  # "Try one image" jobs are not listed
    total = session.scalar(select(func.count()).select_from(base.subquery()))
    rows = services.jobs_page(session, _user(), limit=query["limit"], offset=query["offset"])
    return {"items": [job_dict(j) for j in rows], "total": total}


@bp.get("/jobs/<int:job_id>")
@api_auth()
@bp.output(JobDetailOut)
@bp.doc(summary="A job with live progress and its first failures", responses=E401 | E404, **AUTH)
def get_job(job_id):
    session = db()
    job = _job_or_404(job_id)
    failed = []
    if job.failed_count:
        failed = services.job_images(session, job, status=ImageStatus.FAILED, limit=50).images
    return job_dict(job) | {"failures": image_dicts(session, failed)}


@bp.get("/jobs/<int:job_id>/images")
@api_auth()
@bp.input(ImagesQueryIn, location="query", arg_name="query")
@bp.output(ImageListOut)
@bp.doc(
    summary="A job's images with status, failure reason, caption and review, by id",
    responses=E401 | E404,
    **AUTH,
)
def job_images(job_id, query):
    """Pages by image id: pass the response's `next_after` as `after` for the next page."""
    session = db()
    job = _job_or_404(job_id)
    page = services.job_images(
        session,
        job,
        status=query.get("status"),
        limit=query["limit"],
        after=query.get("after"),
        offset=query["offset"],
    )
    items = image_dicts(session, page.images)
    return {"items": items, "total": page.total, "next_after": page.next_after}


@bp.post("/jobs/<int:job_id>/cancel")
@api_auth()
@bp.output(JobOut)
@bp.doc(
    summary="Cancel a job: its queued images are not captioned (its owner or an admin)",
    responses=E401 | E403 | E404 | E409,
    **AUTH,
)
def cancel_job(job_id):
    job = _own_job_or_404(job_id)
    try:
        services.cancel_job(db(), job)
    except services.Conflict as exc:
        abort(409, str(exc))
    return job_dict(job)


@bp.post("/jobs/<int:job_id>/retry")
@api_auth()
@bp.output(IdsOut)
@bp.doc(
    summary="Queue a job's failed images again (its owner or an admin)",
    responses=E401 | E403 | E404,
    **AUTH,
)
def retry_job(job_id):
    job = _own_job_or_404(job_id)
    return {"count": services.retry_failed(db(), job)}


@bp.post("/jobs/<int:job_id>/approve-above")
@api_auth("reviewer")
@bp.input(BulkApproveIn, arg_name="data")
@bp.output(BulkApproveOut)
@bp.doc(
    summary="Approve every unreviewed caption of a job scoring at least min_score",
    description="Preview first with `GET` on the same path (how many, and a sample). The "
    "returned `batch` undoes this approval as one action: `POST /jobs/{job_id}/approve-undo`.",
    responses=E401 | E403 | E404,
    **AUTH,
)
def approve_above(job_id, data):
    job = _job_or_404(job_id)
    batch = services.approve_above(db(), _user(), job, data["min_score"])
    return {"count": batch.count, "batch": batch.encode() if batch.count else None}


# --- images and review ---------------------------------------------------------------------


@bp.get("/images/<int:image_id>")
@api_auth()
@bp.output(ImageOut)
@bp.doc(
    summary="An image's status, caption (with n-best) and current review",
    responses=E401 | E404,
    **AUTH,
)
def get_image(image_id):
    return image_dict(db(), _image_or_404(image_id))


@bp.get("/images/<int:image_id>/content")
@api_auth()
@bp.doc(
    summary="The image's bytes",
    responses={200: {"description": "The image file", "content": {"image/*": {}}}}
    | E401
    | E404
    | {413: "The stored object is larger than `CAPTIONER_MAX_IMAGE_BYTES`"},
    **AUTH,
)
def image_content(image_id):
    image = _image_or_404(image_id)
    ext = current_app.extensions["captioner"]
    limit = ext.settings.max_image_bytes
    try:
        # An object over the limit is refused without being read (its length comes first).
        data = ext.store.get_at_most(image.storage_key, limit)
    except ObjectTooLarge as exc:
        abort(413, f"the image's stored object is {exc.size} bytes > limit {limit}")
    except (ObjectNotFound, StorageError):
        abort(404, "the image's bytes are not in storage")
    try:
        fmt = open_image(data, max_bytes=max(len(data), 1)).format or ""
    except ImageRejected:
        fmt = ""
    mime = mimetypes.types_map.get("." + fmt.lower().replace("jpeg", "jpg").replace("mpo", "jpg"))
    if not mime or not mime.startswith("image/"):
        mime = "application/octet-stream"
    response = Response(data, mimetype=mime)
    response.headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


class PreviewIn(Schema):
    side = Integer(
        load_default=previews.PREVIEW_SIDE,
        validate=OneOf(previews.SIDES),
        metadata={"description": "Longest side in pixels"},
    )


@bp.get("/images/<int:image_id>/preview")
@api_auth()
@bp.input(PreviewIn, location="query", arg_name="query")
@bp.doc(
    summary="The image fitted within `side` pixels: a JPEG made once and kept in the store "
    "(the original when it is already that small)",
    responses={200: {"description": "The preview", "content": {"image/*": {}}}}
    | E401
    | E404
    | E422
    | {413: "The stored object is larger than `CAPTIONER_MAX_IMAGE_BYTES`"},
    **AUTH,
)
def image_preview(image_id, query):
    image = _image_or_404(image_id)
    ext = current_app.extensions["captioner"]
    try:
        made = previews.preview(
            ext.store,
            image.storage_key,
            query["side"],
            max_pixels=ext.settings.max_image_pixels,
            max_bytes=ext.settings.max_image_bytes,
        )
    except ObjectTooLarge as exc:
        abort(413, f"the image's stored object is {exc.size} bytes > limit {exc.limit}")
    except (ObjectNotFound, StorageError):
        abort(404, "the image's bytes are not in storage")
    except ImageRejected as exc:
        abort(404, f"the image cannot be shown: {exc}")
    if made is None:
        return image_content(image_id)
    response = Response(made, mimetype="image/jpeg")
    response.headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.get("/review/queue")
@api_auth()
@bp.input(QueueIn, location="query", arg_name="query")
@bp.output(QueueOut)
@bp.doc(
    summary="Captions to review, least confident first, with filters",
    responses=E401 | E422,
    **AUTH,
)
def review_queue(query):
    """Pages by cursor: pass the response's `next_cursor` as `after` for the next page. Rows
    reviewed or added meanwhile never make a walk show an item twice or skip one."""
    session = db()
    filters = {k: query.get(k) for k in ("job_id", "min_score", "max_score")}
    try:
        page = services.review_queue(
            session,
            _user(),
            status=query["status"],
            text=query.get("q"),
            limit=query["limit"],
            after=query.get("after"),
            offset=query["offset"],
            skip_claimed=query["skip_claimed"],
            claim=query["claim"],
            **filters,
        )
    except jobs.LifecycleError as exc:
        abort(422, str(exc))
    items = [image_dict(session, image, caption, review) for image, caption, review in page.rows]
    return {
        "items": items,
        "total": page.total,
        "total_exact": page.total_exact,
        "next_cursor": page.next_cursor.encode() if page.next_cursor else None,
    }


@bp.post("/images/<int:image_id>/reviews")
@api_auth("reviewer")
@bp.input(ReviewIn, arg_name="data")
@bp.output(ReviewOut, status_code=201)
@bp.doc(
    summary="Approve, correct or reject an image's caption",
    responses=E401 | E403 | E404 | E409,
    **AUTH,
)
def add_review(image_id, data):
    image = _image_or_404(image_id)
    try:
        review = services.review_image(
            db(), _user(), image, data["decision"], data.get("text"), data.get("caption_id")
        )
    except jobs.LifecycleError as exc:
        db().rollback()
        abort(422, str(exc))
    except services.Conflict as exc:
        abort(409, str(exc))
    return review_dict(review)


@bp.put("/images/<int:image_id>/claim")
@api_auth("reviewer")
@bp.output(ClaimOut)
@bp.doc(
    summary="Claim an image awaiting review while you review it (renews your claim)",
    description="A short claim (`CAPTIONER_REVIEW_CLAIM_SECONDS`): other reviewers' queues "
    "with `skip_claimed` leave the image out meanwhile. You hold one claim at a time: claiming "
    "another image lets this one go, and so does a decision or an undo. 409 when another "
    "reviewer holds it or it no longer awaits review.",
    responses=E401 | E403 | E404 | E409,
    **AUTH,
)
def claim_image(image_id):
    image = _image_or_404(image_id)
    try:
        claim = services.claim_image(_user(), image)
    except services.Conflict as exc:
        abort(409, str(exc))
    return {"image_id": image.id, "claimed": claim.claimed, "expires_in": claim.expires_in}


@bp.get("/images/<int:image_id>/reviews")
@api_auth()
@bp.output(HistoryOut)
@bp.doc(
    summary="Every review of the image, oldest first (who, when, what)",
    responses=E401 | E404,
    **AUTH,
)
def review_history(image_id):
    image = _image_or_404(image_id)
    return {"items": [review_dict(r) for r in reviews.review_history(db(), image.id)]}


@bp.post("/images/<int:image_id>/reviews/undo")
@api_auth("reviewer")
@bp.output(ReviewOut, status_code=201)
@bp.doc(
    summary="Take back the current review (appends a restoring row)",
    responses=E401 | E403 | E404 | E409,
    **AUTH,
)
def undo_review(image_id):
    image = _image_or_404(image_id)
    try:
        return review_dict(services.undo_review(db(), _user(), image))
    except services.Conflict as exc:
        abort(409, str(exc))


# --- export --------------------------------------------------------------------------------


@bp.get("/export")
@api_auth()
@bp.input(ExportIn, location="query", arg_name="query")
@bp.doc(
    summary="Export captions of a job (or of every job you can see)",
    responses={
        200: {
            "description": "The export file",
            "content": {
                "application/x-ndjson": {},
                "text/csv": {},
                "application/json": {},
            },
        }
    }
    | E401
    | E404,
    **AUTH,
)
def export_captions(query):
    user = _user()
    job_id = query.get("job_id")
    if job_id is not None:
        _job_or_404(job_id)
    owner = None if services.sees_all_jobs(user) else user.id
    fmt, which = query["format"], query["which"]
    session_factory = current_app.extensions["captioner"].sessionmaker

    def generate():
        with session_factory() as session:
            rows = export.export_rows(session, job_id=job_id, owner_id=owner, which=which)
            yield from export.render(rows, fmt, which)

    extension = {"jsonl": "jsonl", "csv": "csv", "coco": "json"}[fmt]
    name = f"captions-{'job' + str(job_id) if job_id else 'all'}-{which}.{extension}"
    return Response(
        stream_with_context(generate()),
        content_type=export.CONTENT_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# --- tokens, users, webhooks ---------------------------------------------------------------


def token_dict(row: ApiToken, raw: str | None = None) -> dict:
    data = {
        "id": row.id,
        "name": row.name,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
    }
    if raw:
        data["token"] = raw
    return data


@bp.get("/tokens")
@api_auth()
@bp.output(TokenListOut)
@bp.doc(summary="Your API tokens (never the tokens themselves)", responses=E401, **AUTH)
def list_tokens():
    rows = db().scalars(
        select(ApiToken).where(ApiToken.user_id == _user().id).order_by(ApiToken.id)
    )
    return {"items": [token_dict(r) for r in rows]}


@bp.post("/tokens")
@api_auth()
@bp.input(TokenIn, arg_name="data")
@bp.output(TokenOut, status_code=201)
@bp.doc(
    summary="Create a personal token; the response is the only time it is shown",
    responses=E401,
    **AUTH,
)
def create_token(data):
    raw, row = ApiToken.issue(_user().id, data.get("name", ""))
    db().add(row)
    db().commit()
    return token_dict(row, raw)


@bp.delete("/tokens/<int:token_id>")
@api_auth()
@bp.output(EmptyOut, status_code=204)
@bp.doc(summary="Revoke one of your tokens", responses=E401 | E404, **AUTH)
def revoke_token(token_id):
    row = db().get(ApiToken, token_id)
    if row is None or row.user_id != _user().id:
        abort(404, f"no token {token_id}")
    row.revoked_at = row.revoked_at or utcnow()
    db().commit()
    return ""


def user_dict(user: User) -> dict:
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role.value,
        "created_at": user.created_at,
        "disabled_at": user.disabled_at,
        "source_prefixes": list(user.source_prefixes or []),
    }


@bp.get("/me")
@api_auth()
@bp.output(UserOut)
@bp.doc(summary="Who the token belongs to", responses=E401, **AUTH)
def me():
    return user_dict(_user())


@bp.get("/users")
@api_auth("admin")
@bp.output(UserListOut)
@bp.doc(summary="All users (admin)", responses=E401 | E403, **AUTH)
def list_users():
    return {"items": [user_dict(u) for u in db().scalars(select(User).order_by(User.id))]}


@bp.post("/users")
@api_auth("admin")
@bp.input(UserIn, arg_name="data")
@bp.output(UserOut, status_code=201)
@bp.doc(summary="Create a user (admin)", responses=E401 | E403 | E409, **AUTH)
def create_user_view(data):
    if find_user(db(), data["email"]) is not None:
        abort(409, "a user with this email exists")
    user = create_user(db(), data["email"], data["password"], role=data["role"], name=data["name"])
    db().commit()
    return user_dict(user)


@bp.patch("/users/<int:user_id>")
@api_auth("admin")
@bp.input(UserPatchIn, arg_name="data")
@bp.output(UserOut)
@bp.doc(
    summary="Change a user's name, role, password or source locations (admin)",
    description="A new password ends every login session of the user and revokes their API "
    "tokens, except the session or token making the change.",
    responses=E401 | E403 | E404 | E422,
    **AUTH,
)
def update_user(user_id, data):
    user = _user_or_404(user_id)
    if "source_prefixes" in data:
        try:
            user.source_prefixes = check_grants(data["source_prefixes"])
        except SubmissionRejected as exc:
            abort(422, exc.reason)
    if "name" in data:
        user.name = data["name"]
    if "role" in data:
        user.role = UserRole(data["role"])
        user.is_admin = user.role == UserRole.ADMIN
    if "password" in data:
        change_password(db(), user, data["password"], keep_token_id=token_in_use(user))
    db().commit()
    if "password" in data:
        keep_this_session(user)
    return user_dict(user)


def _user_or_404(user_id: int) -> User:
    user = db().get(User, user_id)
    if user is None:
        abort(404, f"no user {user_id}")
    return user


@bp.post("/users/<int:user_id>/disable")
@api_auth("admin")
@bp.output(UserOut)
@bp.doc(
    summary="Disable a user (admin): no login, no tokens",
    description="Ends every login session of the user and revokes all their API tokens; login "
    "and tokens are refused like a wrong password until the user is enabled. 422 for yourself.",
    responses=E401 | E403 | E404 | E422,
    **AUTH,
)
def disable_user_view(user_id):
    user = _user_or_404(user_id)
    if user.id == _user().id:
        abort(422, "you cannot disable your own account")
    disable_user(db(), user)
    db().commit()
    return user_dict(user)


@bp.post("/users/<int:user_id>/enable")
@api_auth("admin")
@bp.output(UserOut)
@bp.doc(
    summary="Enable a disabled user (admin); their old tokens stay revoked",
    responses=E401 | E403 | E404,
    **AUTH,
)
def enable_user_view(user_id):
    user = _user_or_404(user_id)
    enable_user(user)
    db().commit()
    return user_dict(user)


@bp.post("/users/<int:user_id>/tokens/revoke")
@api_auth("admin")
@bp.output(RevokedOut)
@bp.doc(
    summary="Revoke all of a user's API tokens (admin)",
    description="Login sessions go on. Revoking your own keeps the token making the request.",
    responses=E401 | E403 | E404,
    **AUTH,
)
def revoke_user_tokens(user_id):
    user = _user_or_404(user_id)
    revoked = revoke_tokens(db(), user, keep_token_id=token_in_use(user))
    db().commit()
    return {"revoked": revoked}


def webhook_dict(hook: Webhook, with_secret: bool = False) -> dict:
    data = {
        "id": hook.id,
        "url": hook.url,
        "events": list(hook.events or []),
        "created_at": hook.created_at,
        "previous_secret_expires_at": hook.previous_secret_expires_at,
    }
    if with_secret:
        data["secret"] = hook.secret
    return data


@bp.get("/webhooks")
@api_auth()
@bp.output(WebhookListOut)
@bp.doc(summary="Your webhooks", responses=E401, **AUTH)
def list_webhooks():
    rows = db().scalars(
        select(Webhook)
        .where(Webhook.owner_id == _user().id, Webhook.active.is_(True))
        .order_by(Webhook.id)
    )
    return {"items": [webhook_dict(h) for h in rows]}


@bp.post("/webhooks")
@api_auth()
@bp.input(WebhookIn, arg_name="data")
@bp.output(WebhookOut, status_code=201)
@bp.doc(
    summary="Register a URL for job.completed / job.failed events (signed; secret shown once)",
    responses=E401 | E422,
    **AUTH,
)
def create_webhook(data):
    settings = current_app.extensions["captioner"].settings
    try:
        url = webhooks.check_receiver_url(data["url"], settings)
    except SubmissionRejected as exc:
        abort(422, exc.reason)
    hook = Webhook(
        owner_id=_user().id, url=url, secret=webhooks.new_secret(), events=data["events"]
    )
    db().add(hook)
    db().commit()
    return webhook_dict(hook, with_secret=True)


@bp.delete("/webhooks/<int:webhook_id>")
@api_auth()
@bp.output(EmptyOut, status_code=204)
@bp.doc(summary="Remove one of your webhooks", responses=E401 | E404, **AUTH)
def delete_webhook(webhook_id):
    hook = db().get(Webhook, webhook_id)
    if hook is None or hook.owner_id != _user().id or not hook.active:
        abort(404, f"no webhook {webhook_id}")
    hook.active = False
    db().commit()
    return ""


@bp.post("/webhooks/<int:webhook_id>/rotate")
@api_auth()
@bp.output(WebhookOut)
@bp.doc(
    summary="Give one of your webhooks a new signing secret (shown once)",
    description="Until `previous_secret_expires_at` (`CAPTIONER_WEBHOOK_SECRET_GRACE_HOURS`) "
    "deliveries carry two signatures, made with the new and the previous secret.",
    responses=E401 | E404,
    **AUTH,
)
def rotate_webhook_secret(webhook_id):
    hook = db().get(Webhook, webhook_id)
    if hook is None or hook.owner_id != _user().id or not hook.active:
        abort(404, f"no webhook {webhook_id}")
    settings = current_app.extensions["captioner"].settings
    webhooks.rotate_secret(db(), hook, settings=settings)
    db().commit()
    return webhook_dict(hook, with_secret=True)
