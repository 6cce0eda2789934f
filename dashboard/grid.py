"""The JSON API behind the review grid, the two-step bulk approval and "Try one image" (under
`/api/v1`, in the same OpenAPI document as `dashboard.api`):

- `GET /jobs/<id>/approve-above`: what `POST /jobs/<id>/approve-above` would approve now (how
  many, and a sample of the lowest scoring), writing nothing; the POST returns a `batch`, and
  `POST /jobs/<id>/approve-undo` takes that batch back as one action;
- `POST /review/approve`: approve the captions picked in the grid, skipping images reviewed
  meanwhile;
- `POST /try`: one image on the interactive queue, in a job the jobs lists leave out.
"""

from __future__ import annotations

from apiflask import APIBlueprint, Schema, abort
from apiflask.fields import Boolean, File, Float, Integer, List, Nested, String
from apiflask.validators import Length, Range
from flask import current_app

from captioner.intake.errors import SubmissionRejected
from captioner.intake.uploads import check_uploads
from captioner.state import jobs, reviews
from dashboard import MAX_ID, services
from dashboard.api import (
    AUTH,
    E401,
    E403,
    E404,
    E413,
    E422,
    E429,
    ImageOut,
    JobOut,
    ReviewOut,
    _job_or_404,
    image_dict,
    job_dict,
    review_dict,
)
from dashboard.auth import api_auth, current_user, db, limiter, submit_limit

bp = APIBlueprint("grid", __name__, url_prefix="/api/v1", tag="Captioner")


class ApprovalPreviewIn(Schema):
    min_score = Float(required=True, allow_nan=False)
    sample = Integer(
        load_default=12,
        validate=Range(0, reviews.APPROVAL_SAMPLE_LIMIT),
        metadata={"description": "How many of them to show, the lowest scoring first"},
    )


class ApprovalPreviewOut(Schema):
    min_score = Float()
    count = Integer(metadata={"description": "Captions the approval would take now"})
    count_exact = Boolean(
        metadata={"description": "False when more match than one approval takes (`count`)"}
    )
    sample = List(
        Nested(ImageOut),
        metadata={"description": "The lowest scoring of them (the closest to the threshold)"},
    )


class ApprovalUndoIn(Schema):
    batch = String(
        required=True,
        validate=Length(1, 100),
        metadata={"description": "The `batch` that `POST /jobs/{job_id}/approve-above` returned"},
    )


class UndoneOut(Schema):
    count = Integer(metadata={"description": "Approvals taken back (reviewed-since ones stay)"})


class PickIn(Schema):
    image_id = Integer(required=True, validate=Range(1, MAX_ID))
    caption_id = Integer(
        required=True,
        validate=Range(1, MAX_ID),
        metadata={"description": "The caption shown: the one approved"},
    )


class ApproveImagesIn(Schema):
    items = List(Nested(PickIn), required=True, validate=Length(1, reviews.APPROVE_IMAGES_LIMIT))


class ApproveImagesOut(Schema):
    items = List(Nested(ReviewOut), metadata={"description": "The approvals added"})
    skipped = List(
        Integer(),
        metadata={"description": "Images that no longer awaited review (reviewed meanwhile)"},
    )
    shared = List(
        Integer(),
        metadata={
            "description": "Other images of the same content (the same bytes in another of "
            "the owner's jobs) that got the approval too"
        },
    )


class TryIn(Schema):
    file = File(required=True, metadata={"description": "One image"})


@bp.get("/jobs/<int:job_id>/approve-above")
@api_auth("reviewer")
@bp.input(ApprovalPreviewIn, location="query", arg_name="query")
@bp.output(ApprovalPreviewOut)
@bp.doc(
    summary="Preview a bulk approval: how many captions it would approve, and a sample",
    description="Writes nothing. The sample is the lowest scoring of them, the closest to the "
    "threshold. Confirm with `POST` on the same path.",
    responses=E401 | E403 | E404,
    **AUTH,
)
def preview_approve_above(job_id, query):
    session = db()
    job = _job_or_404(job_id)
    preview = services.preview_approval(session, job, query["min_score"], query["sample"])
    return {
        "min_score": query["min_score"],
        "count": preview.count,
        "count_exact": preview.count_exact,
        "sample": [image_dict(session, image, caption, None) for image, caption in preview.sample],
    }


@bp.post("/jobs/<int:job_id>/approve-undo")
@api_auth("reviewer")
@bp.input(ApprovalUndoIn, arg_name="data")
@bp.output(UndoneOut)
@bp.doc(
    summary="Undo a bulk approval as one action",
    description="Each approval of the batch that is still its image's current review is taken "
    "back (the image awaits review again); an image reviewed since keeps that review. The "
    "reviewer who approved the batch, or an admin. Undoing twice takes back nothing more.",
    responses=E401 | E403 | E404 | E422,
    **AUTH,
)
def undo_approve_above(job_id, data):
    session = db()
    job = _job_or_404(job_id)
    try:
        count = services.undo_approval(session, current_user(), job, data["batch"])
    except jobs.LifecycleError as exc:
        session.rollback()
        abort(422, str(exc))
    except services.Forbidden as exc:
        session.rollback()
        abort(403, str(exc))
    return {"count": count}


@bp.post("/review/approve")
@api_auth("reviewer")
@bp.input(ApproveImagesIn, arg_name="data")
@bp.output(ApproveImagesOut)
@bp.doc(
    summary="Approve the captions picked (the review grid's selection)",
    description="Each image's given caption is approved if the image still awaits review; "
    "images reviewed meanwhile are listed in `skipped`, not overruled.",
    responses=E401 | E403 | E404 | E422,
    **AUTH,
)
def approve_images(data):
    session = db()
    picks = [(item["image_id"], item["caption_id"]) for item in data["items"]]
    try:
        done = services.approve_images(session, current_user(), picks)
    except services.NotFound as exc:
        session.rollback()
        abort(404, str(exc))
    except jobs.LifecycleError as exc:
        session.rollback()
        abort(422, str(exc))
    return {
        "items": [review_dict(review) for review in done.added],
        "skipped": done.skipped,
        "shared": done.shared,
    }


@bp.post("/try")
@api_auth()
@limiter.limit(submit_limit)
@bp.input(TryIn, location="form_and_files", arg_name="data")
@bp.output(JobOut, status_code=202)
@bp.doc(
    summary="Try one image: caption it on the interactive queue",
    description='The job is marked as a try (source `try`, options `{"try": true}`): it is '
    "left out of the jobs lists, and read with `GET /jobs/{job_id}/images`.",
    responses=E401 | E413 | E422 | E429,
    **AUTH,
)
def try_one(data):
    settings = current_app.extensions["captioner"].settings
    try:
        upload = check_uploads([data["file"]], None, settings)
        job = services.submit_try(db(), current_user(), upload.files)
    except SubmissionRejected as exc:
        db().rollback()
        abort(exc.status_code, exc.reason)
    return job_dict(job)
