"""The learning loop in the dashboard: model versions and training runs.

JSON under `/api/v1` (blueprint `training_api`):
    GET  /models                      versions, newest first, with metrics (any signed-in user)
    POST /models/<id>/promote         make a version the active one (admin)
    POST /models/rollback             re-activate the active version's parent (admin)
    GET  /training-runs               runs, newest first (reviewer)
    GET  /training-runs/<id>          one run with its log, loss curve and metrics (reviewer)
    POST /training-runs               "retrain now" (admin)
    POST /reviewers/<id>/exclude      leave (or, with {"excluded": false}, bring back) a
                                      reviewer's reviews out of future runs (admin)

Pages (blueprint `training_ui`): /training (runs), /training/<id> (status, progress, loss curve
as a server-rendered SVG, candidate vs active metrics, log), /models (versions side by side with
promote and roll-back buttons). Forms carry the session's CSRF token.

Workers pick up a promotion or rollback on their next batch (`workers.model_runtime`). "Retrain
now" inserts the run and sends `captioner.maybe_retrain`, which forwards it to the train queue.
"""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint, Schema, abort
from apiflask.fields import Boolean, DateTime, Dict, Integer, List, Nested, String
from apiflask.validators import Range
from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from sqlalchemy import func, select

from captioner import tasks
from captioner.learning import gate, registry, runs, snapshot
from captioner.state.models import (
    ModelStatus,
    ModelVersion,
    TrainingRun,
    TrainingStatus,
    User,
    UserRole,
    utcnow,
)
from dashboard.api import AUTH, E401, E403, E409, E422
from dashboard.auth import api_auth, current_user, db, login_required

api_bp = APIBlueprint("training_api", __name__, url_prefix="/api/v1", tag="Learning loop")
ui_bp = Blueprint("training_ui", __name__)

E404 = {404: "Not found"}  # admin resources: no "(or not yours)" as in dashboard.api


# --- schemas -------------------------------------------------------------------------------


class VersionOut(Schema):
    id = Integer()
    name = String()
    status = String()
    parent_id = Integer(allow_none=True)
    checkpoint_uri = String()
    metrics = Dict()
    created_at = DateTime()
    promoted_at = DateTime(allow_none=True)
    retired_at = DateTime(allow_none=True)


class VersionListOut(Schema):
    items = List(Nested(VersionOut))
    active_id = Integer(allow_none=True)
    serving_id = Integer(allow_none=True)
    serving_source = String()
    can_roll_back = Boolean()


class RunOut(Schema):
    id = Integer()
    status = String()
    trigger = String(allow_none=True)
    base_model_version_id = Integer(allow_none=True)
    candidate_model_version_id = Integer(allow_none=True)
    train_examples = Integer()
    holdout_examples = Integer()
    progress = Dict()
    gate = Dict()
    error = String(allow_none=True)
    created_at = DateTime()
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)


class RunListOut(Schema):
    items = List(Nested(RunOut))
    total = Integer()


class RunDetailOut(RunOut):
    params = Dict()
    metrics = Dict()
    log = String()
    train_review_ids = List(Integer())
    holdout_review_ids = List(Integer())
    max_review_id = Integer(allow_none=True)


class RunsQuery(Schema):
    limit = Integer(load_default=50, validate=Range(1, 500))
    offset = Integer(load_default=0, validate=Range(0, 10_000_000))


class ExcludeIn(Schema):
    excluded = Boolean(load_default=True)


class ExcludeOut(Schema):
    id = Integer()
    email = String()
    excluded = Boolean()
    excluded_at = DateTime(allow_none=True)


# --- serialising ---------------------------------------------------------------------------


def version_dict(v: ModelVersion) -> dict[str, Any]:
    return {
        "id": v.id,
        "name": v.name,
        "status": ModelStatus(v.status).value,
        "parent_id": v.parent_id,
        "checkpoint_uri": v.checkpoint_uri,
        "metrics": dict(v.metrics or {}),
        "created_at": v.created_at,
        "promoted_at": v.promoted_at,
        "retired_at": v.retired_at,
    }


def run_dict(run: TrainingRun, detail: bool = False) -> dict[str, Any]:
    params, metrics = dict(run.params or {}), dict(run.metrics or {})
    out = {
        "id": run.id,
        "status": TrainingStatus(run.status).value,
        "trigger": params.get("trigger"),
        "base_model_version_id": run.base_model_version_id,
        "candidate_model_version_id": run.candidate_model_version_id,
        "train_examples": len(run.train_review_ids or []),
        "holdout_examples": len(run.holdout_review_ids or []),
        "progress": metrics.get("progress") or {},
        "gate": metrics.get("gate") or {},
        "error": run.error,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }
    if detail:
        out.update(
            params=params,
            metrics=metrics,
            log=run.log or "",
            train_review_ids=list(run.train_review_ids or []),
            holdout_review_ids=list(run.holdout_review_ids or []),
            max_review_id=run.max_review_id,
        )
    return out


def _run_or_404(run_id: int) -> TrainingRun:
    run = db().get(TrainingRun, run_id)
    if run is None:
        abort(404, f"no training run {run_id}")
    return run


# --- actions shared by the API and the pages -------------------------------------------------


def _retrain_now() -> TrainingRun:
    """Insert a run (raises runs.RunAlreadyOpen / NothingToTrain), commit, dispatch."""
    ext = current_app.extensions["captioner"]
    session = db()
    try:
        run = runs.maybe_start_run(
            session, ext.settings, force=True, trigger="manual", requested_by=current_user().id
        )
    except (runs.RunAlreadyOpen, runs.NothingToTrain):
        session.rollback()
        raise
    session.commit()
    ext.publisher.task(tasks.TASK_MAYBE_RETRAIN)
    return run


def _promote(ref: int | str) -> ModelVersion:
    session = db()
    try:
        version = registry.promote(session, ref)
    except registry.RegistryError:
        session.rollback()
        raise
    session.commit()
    return version


def _rollback() -> ModelVersion:
    session = db()
    try:
        version = registry.rollback(session)
    except registry.RegistryError:
        session.rollback()
        raise
    session.commit()
    return version


# --- API -----------------------------------------------------------------------------------


@api_bp.get("/models")
@api_auth()
@api_bp.output(VersionListOut)
@api_bp.doc(summary="Model versions, newest first, with metrics and status", responses=E401, **AUTH)
def list_models():
    session = db()
    versions = registry.list_versions(session)
    active = next((v.id for v in versions if v.status == ModelStatus.ACTIVE), None)
    serving = registry.serving(session, current_app.extensions["captioner"].settings)
    # Where the weights are stored is for admins only.
    admin = current_user().role == UserRole.ADMIN
    items = [version_dict(v) for v in versions]
    if not admin:
        for item in items:
            del item["checkpoint_uri"]
    return {
        "items": items,
        "active_id": active,
        "serving_id": serving.version.id if serving.version is not None else None,
        "serving_source": serving.source,
        "can_roll_back": serving.rollback_to is not None,
    }


@api_bp.post("/models/<int:version_id>/promote")
@api_auth("admin")
@api_bp.output(VersionOut)
@api_bp.doc(
    summary="Make a version the active one; workers use it from their next batch",
    responses=E401 | E403 | E404 | E409,
    **AUTH,
)
def promote_model(version_id):
    try:
        return version_dict(_promote(version_id))
    except registry.RegistryError as exc:
        abort(exc.status, str(exc))


@api_bp.post("/models/rollback")
@api_auth("admin")
@api_bp.output(VersionOut)
@api_bp.doc(
    summary="Re-activate the active version's parent (or the previous active one)",
    responses=E401 | E403 | E409,
    **AUTH,
)
def rollback_model():
    try:
        return version_dict(_rollback())
    except registry.RegistryError as exc:
        abort(exc.status, str(exc))


@api_bp.get("/training-runs")
@api_auth("reviewer")
@api_bp.input(RunsQuery, location="query", arg_name="query")
@api_bp.output(RunListOut)
@api_bp.doc(summary="Training runs, newest first", responses=E401 | E403, **AUTH)
def list_runs(query):
    session = db()
    total = session.scalar(select(func.count(TrainingRun.id)))
    rows = session.scalars(
        select(TrainingRun)
        .order_by(TrainingRun.id.desc())
        .limit(query["limit"])
        .offset(query["offset"])
    )
    return {"items": [run_dict(r) for r in rows], "total": total}


@api_bp.get("/training-runs/<int:run_id>")
@api_auth("reviewer")
@api_bp.output(RunDetailOut)
@api_bp.doc(
    summary="A training run: snapshot, progress, loss curve, metrics, gate, log",
    responses=E401 | E403 | E404,
    **AUTH,
)
def get_run(run_id):
    return run_dict(_run_or_404(run_id), detail=True)


@api_bp.post("/training-runs")
@api_auth("admin")
@api_bp.output(RunOut, status_code=202)
@api_bp.doc(
    summary="Retrain now: snapshot the reviews and queue a run (one at a time)",
    responses=E401 | E403 | E409 | E422,
    **AUTH,
)
def start_run():
    try:
        return run_dict(_retrain_now())
    except runs.RunAlreadyOpen as exc:
        abort(409, str(exc))
    except runs.NothingToTrain as exc:
        abort(422, str(exc))


@api_bp.post("/reviewers/<int:user_id>/exclude")
@api_auth("admin")
@api_bp.input(ExcludeIn, arg_name="data")
@api_bp.output(ExcludeOut)
@api_bp.doc(
    summary="Leave a reviewer's reviews out of future training runs (or bring them back)",
    responses=E401 | E403 | E404,
    **AUTH,
)
def exclude_reviewer(user_id, data):
    session = db()
    user = session.get(User, user_id)
    if user is None:
        abort(404, f"no user {user_id}")
    user.training_excluded_at = (
        (user.training_excluded_at or utcnow()) if data["excluded"] else None
    )
    session.commit()
    return {
        "id": user.id,
        "email": user.email,
        "excluded": user.training_excluded_at is not None,
        "excluded_at": user.training_excluded_at,
    }


# --- pages ---------------------------------------------------------------------------------


def loss_chart(
    curve: list, width: int = 640, height: int = 220, pad: int = 36
) -> dict[str, Any] | None:
    """Coordinates for an inline SVG line chart of [[step, loss], ...] (None when empty)."""
    points = [(float(s), float(v)) for s, v in curve if v == v]  # drop NaN
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1.0)
    sy = (height - 2 * pad) / ((y1 - y0) or 1.0)

    def xy(x: float, y: float) -> tuple[float, float]:
        return round(pad + (x - x0) * sx, 1), round(height - pad - (y - y0) * sy, 1)

    ticks = [y0 + (y1 - y0) * k / 4 for k in range(5)]
    return {
        "width": width,
        "height": height,
        "pad": pad,
        "points": " ".join(f"{a},{b}" for a, b in (xy(x, y) for x, y in points)),
        "yticks": [{"y": xy(x0, t)[1], "label": f"{t:.3g}"} for t in ticks],
        "xlabels": [{"x": xy(x, y0)[0], "label": f"{int(x)}"} for x in (x0, x1)],
        "last": f"{ys[-1]:.4f}",
        "n": len(points),
    }


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (set, metric, active, candidate) from a run's holdout/anchor scores."""
    rows = []
    for which in ("holdout", "anchor"):
        scores = metrics.get(which) or {}
        active, candidate = scores.get("active") or {}, scores.get("candidate") or {}
        for key in gate.GATE_METRICS_KEPT:
            if key in active or key in candidate:
                rows.append(
                    {
                        "set": which,
                        "metric": key,
                        "active": active.get(key),
                        "candidate": candidate.get(key),
                    }
                )
    return rows


@ui_bp.get("/training")
@login_required("reviewer")
def runs_page():
    session = db()
    rows = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(100))
    reviewers = session.scalars(
        select(User).where(User.role.in_([UserRole.REVIEWER, UserRole.ADMIN])).order_by(User.email)
    )
    return render_template(
        "training.html", runs=[run_dict(r) for r in rows], reviewers=list(reviewers)
    )


@ui_bp.get("/training/<int:run_id>")
@login_required("reviewer")
def run_page(run_id: int):
    run = db().get(TrainingRun, run_id)
    if run is None:
        abort(404)
    data = run_dict(run, detail=True)
    versions = {v.id: v for v in (run.base_model_version, run.candidate_model_version) if v}
    accounting = data["params"].get("reviews") or {}
    return render_template(
        "training_run.html",
        run=data,
        reviews=accounting,
        left_out=snapshot.left_out_lines(accounting),
        # A rejected run's error is the gate's reason: shown once, as the verdict.
        error=None if data["error"] == data["gate"].get("reason") else data["error"],
        chart=loss_chart(data["metrics"].get("loss_curve") or []),
        rows=metric_rows(data["metrics"]),
        versions=versions,
        open=data["status"] in ("queued", "running"),
    )


@ui_bp.post("/training/retrain")
@login_required("admin")
def retrain_now_form():
    try:
        run = _retrain_now()
    except (runs.RunAlreadyOpen, runs.NothingToTrain) as exc:
        flash(str(exc), "error")
        return redirect(url_for("training_ui.runs_page"), 303)
    flash(f"Training run {run.id} queued.", "ok")
    return redirect(url_for("training_ui.run_page", run_id=run.id), 303)


@ui_bp.get("/models")
@login_required()
def models_page():
    session = db()
    settings = current_app.extensions["captioner"].settings
    versions = [version_dict(v) for v in registry.list_versions(session)]
    serving = registry.serving(session, settings)
    return render_template(
        "models.html",
        versions=versions,
        metric=settings.gate_metric,
        serving=serving,
        serving_id=serving.version.id if serving.version is not None else None,
        sources=registry.ServingSource,
        is_admin=current_user().role == UserRole.ADMIN,  # checkpoint locations: admins only
    )


@ui_bp.post("/models/<int:version_id>/promote")
@login_required("admin")
def promote_form(version_id: int):
    try:
        version = _promote(version_id)
        flash(f"{version.name} is now the active model; workers switch on their next batch.", "ok")
    except registry.VersionNotFound:
        abort(404)
    except registry.RegistryError as exc:
        flash(str(exc), "error")
    return redirect(url_for("training_ui.models_page"), 303)


@ui_bp.post("/models/rollback")
@login_required("admin")
def rollback_form():
    try:
        version = _rollback()
        flash(f"Rolled back: {version.name} is the active model again.", "ok")
    except registry.RegistryError as exc:
        flash(str(exc), "error")
    return redirect(url_for("training_ui.models_page"), 303)


@ui_bp.post("/reviewers/<int:user_id>/exclude")
@login_required("admin")
def exclude_form(user_id: int):
    session = db()
    user = session.get(User, user_id)
    if user is None:
        abort(404)
    excluded = request.form.get("excluded", "1") == "1"
    user.training_excluded_at = (user.training_excluded_at or utcnow()) if excluded else None
    session.commit()
    flash(
        f"{user.email}: reviews {'left out of' if excluded else 'used in'} future training runs.",
        "ok",
    )
    return redirect(url_for("training_ui.runs_page"), 303)
