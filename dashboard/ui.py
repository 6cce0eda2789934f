"""Server-rendered pages. Forms post here (CSRF-checked); live parts of a page (job progress,
the review queue, "try one image") call the JSON API from `static/*.js` with the session and
an `X-CSRF-Token` header. All text goes through Jinja's autoescaping or `textContent`.
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from sqlalchemy import select

from captioner import export, webhooks
from captioner.accounts import (
    change_password,
    create_user,
    disable_user,
    enable_user,
    find_user,
    revoke_tokens,
)
from captioner.intake.errors import SubmissionRejected
from captioner.intake.uploads import Refusal, UploadRefused, open_upload
from captioner.state.models import (
    ApiToken,
    ImageStatus,
    Job,
    User,
    UserRole,
    Webhook,
    utcnow,
)
from dashboard import services
from dashboard.api import image_dicts, job_dict
from dashboard.auth import (
    current_user,
    db,
    keep_this_session,
    limiter,
    login_required,
    submit_limit,
)

bp = Blueprint("ui", __name__)


@bp.get("/")
def index():
    return redirect(url_for("ui.jobs"))


def _int(value: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return max(lo, min(hi, int(value))) if value not in (None, "") else default
    except ValueError:
        return default


@bp.get("/jobs", endpoint="jobs")
@login_required()
def jobs_page():
    session = db()
    page = _int(request.args.get("page"), 1, 1, 100_000)
    rows = services.jobs_page(session, current_user(), limit=50, offset=(page - 1) * 50)
    return render_template("jobs.html", jobs=[job_dict(j) for j in rows], page=page)


@bp.post("/jobs/new")
@login_required()
@limiter.limit(submit_limit)
def submit():
    """A submission from the form. Files it refused are listed on the jobs page again, the
    form keeping its values: with the job the rest made, or with the reason nothing was made."""
    session, user = db(), current_user()
    try:
        job, refused = _submit_form(session, user, _form_options(request.form))
    except UploadRefused as exc:
        session.rollback()
        flash("Refused: none of the files could be used; each is listed with its reason.", "error")
        return _form_again(exc.refused, exc.status_code)
    except SubmissionRejected as exc:
        session.rollback()
        flash(f"Refused: {exc.reason}", "error")
        return _form_again([], exc.status_code)
    if refused:
        return _form_again(refused, 200, submitted=job_dict(job))
    flash(f"Job {job.id} submitted.", "ok")
    return redirect(url_for("ui.job_detail", job_id=job.id), 303)


def _form_again(refused: list[Refusal], status: int, submitted: dict | None = None):
    """The jobs page after a submission that left files out: the form with the values sent,
    the refused files with their reasons, and the job made (`submitted`), if any."""
    rows = services.jobs_page(db(), current_user(), limit=50, offset=0)
    page = render_template(
        "jobs.html",
        jobs=[job_dict(j) for j in rows],
        page=1,
        form=request.form,
        refused=refused,
        submitted=submitted,
    )
    return page, status


def _form_options(form) -> services.JobOptions:
    """The job options of the submit form, each clamped to its range."""
    num_beams = _int(form.get("num_beams"), 3, 1, 16)
    return services.JobOptions(
        name=(form.get("name") or "untitled").strip()[:200] or "untitled",
        priority=_int(form.get("priority"), 0, -100, 100),
        num_beams=num_beams,
        n_best=min(_int(form.get("n_best"), 3, 1, 10), num_beams),
        recaption=bool(form.get("recaption")),
    )


def _submit_form(session, user: User, opts: services.JobOptions) -> tuple[Job, list[Refusal]]:
    """The job the submit form asks for, and the files it left out: uploaded files and/or a
    zip (checked and stored one at a time, as the API does), else object keys, a prefix or
    URLs; SubmissionRejected when it names none."""
    form = request.form
    uploads = [f for f in request.files.getlist("files") if f and f.filename]
    archive = request.files.get("archive")
    archive = archive if archive and archive.filename else None
    if uploads or archive is not None:
        ext = current_app.extensions["captioner"]
        with open_upload(uploads, archive, ext.settings) as pending:
            services.check_options(user, opts, pending.count)  # before anything is stored
            upload = pending.store(ext.store, owner_id=user.id)
        job = services.submit_files(session, user, opts, upload.files, upload.source)
        return job, upload.refused
    if form.get("keys", "").strip():
        return services.submit_keys(session, user, opts, form["keys"].split()), []
    if form.get("prefix", "").strip():
        return services.submit_prefix(session, user, opts, form["prefix"]), []
    if form.get("urls", "").strip():
        return services.submit_urls(session, user, opts, form["urls"].split()), []
    raise SubmissionRejected("choose files, a zip, object keys, a prefix or URLs")


def _job_or_404(job_id: int) -> Job:
    try:
        return services.get_job(db(), current_user(), job_id)
    except services.NotFound:
        abort(404)


def _own_job_or_404(job_id: int) -> Job:
    """The job to cancel or retry: 404 when the user cannot see it, 403 when they see it but
    are neither its owner nor an admin."""
    try:
        return services.get_own_job(db(), current_user(), job_id)
    except services.NotFound:
        abort(404)
    except services.Forbidden:
        abort(403)


@bp.get("/jobs/<int:job_id>")
@login_required()
def job_detail(job_id: int):
    session = db()
    job = _job_or_404(job_id)
    status = request.args.get("status") or None
    if status not in (None, *[s.value for s in ImageStatus]):
        status = None
    # Pages by image id ("More" passes the last id shown as `after`): no deep OFFSET.
    after = _int(request.args.get("after"), 0, 0, 2**63 - 1) or None
    page = services.job_images(session, job, status=status, limit=JOB_PAGE, after=after)
    return render_template(
        "job.html",
        job=job_dict(job),
        may_act=services.may_act_on(current_user(), job),
        images=image_dicts(session, page.images),
        total=page.total,
        next_after=page.next_after,
        status=status,
        after=after,
        page_size=JOB_PAGE,
    )


# Images per page of a job's page (static/job.js refreshes the same page while the job runs).
JOB_PAGE = 100


@bp.post("/jobs/<int:job_id>/cancel")
@login_required()
def cancel(job_id: int):
    job = _own_job_or_404(job_id)
    try:
        services.cancel_job(db(), job)
        flash(f"Job {job.id} cancelled.", "ok")
    except services.Conflict as exc:
        flash(str(exc), "error")
    return redirect(url_for("ui.job_detail", job_id=job_id), 303)


@bp.post("/jobs/<int:job_id>/retry")
@login_required()
def retry(job_id: int):
    job = _own_job_or_404(job_id)
    n = services.retry_failed(db(), job)
    flash(f"{n} failed images queued again.", "ok")
    return redirect(url_for("ui.job_detail", job_id=job_id), 303)


@bp.post("/jobs/<int:job_id>/approve-above")
@login_required("reviewer")
def approve_above(job_id: int):
    job = _job_or_404(job_id)
    try:
        threshold = float(request.form.get("min_score", ""))
    except ValueError:
        flash("Give a number for the score threshold.", "error")
        return redirect(url_for("ui.job_detail", job_id=job_id), 303)
    n = services.bulk_approve(db(), current_user(), job, threshold)
    flash(f"Approved {n} captions scoring {threshold:g} or more.", "ok")
    return redirect(url_for("ui.job_detail", job_id=job_id), 303)


@bp.get("/review")
@login_required("reviewer")
def review():
    args = request.args
    filters = {
        "job_id": args.get("job_id", ""),
        "status": args.get("status", "unreviewed"),
        "min_score": args.get("min_score", ""),
        "max_score": args.get("max_score", ""),
        "q": args.get("q", ""),
    }
    return render_template("review.html", filters=filters)


@bp.get("/grid")
@login_required("reviewer")
def grid():
    """The review grid: pages of thumbnails, least confident first (static/grid.js walks the
    unreviewed queue by cursor and approves the selection)."""
    args = request.args
    filters = {k: args.get(k, "") for k in ("job_id", "min_score", "max_score", "q")}
    one_by_one = url_for("ui.review", **{k: v for k, v in filters.items() if v})
    return render_template("grid.html", filters=filters, one_by_one=one_by_one)


@bp.get("/try")
@login_required()
def try_one():
    return render_template("try.html")


@bp.get("/export")
@login_required()
def export_page():
    """Start a background export and follow your exports (export.js polls the API), or stream
    a small one directly."""
    session = db()
    rows = session.scalars(services.visible_jobs(current_user()).order_by(Job.id.desc()).limit(200))
    return render_template(
        "export.html",
        jobs=list(rows),
        formats=export.BACKGROUND_FORMATS,
        stream_formats=export.FORMATS,
        which=export.WHICH,
    )


@bp.route("/account", methods=["GET"])
@login_required()
def account():
    session, user = db(), current_user()
    tokens = session.scalars(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    )
    hooks = session.scalars(
        select(Webhook).where(Webhook.owner_id == user.id, Webhook.active.is_(True))
    )
    return render_template(
        "account.html", tokens=list(tokens), hooks=list(hooks), new_token=None, new_secret=None
    )


@bp.post("/account/tokens")
@login_required()
def new_token():
    session, user = db(), current_user()
    raw, row = ApiToken.issue(user.id, (request.form.get("name") or "").strip()[:200])
    session.add(row)
    session.commit()
    tokens = session.scalars(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    )
    hooks = session.scalars(
        select(Webhook).where(Webhook.owner_id == user.id, Webhook.active.is_(True))
    )
    # Rendered directly (not redirected): the plain token exists only in this response.
    return render_template(
        "account.html", tokens=list(tokens), hooks=list(hooks), new_token=raw, new_secret=None
    )


@bp.post("/account/tokens/<int:token_id>/revoke")
@login_required()
def revoke_token(token_id: int):
    row = db().get(ApiToken, token_id)
    if row is None or row.user_id != current_user().id:
        abort(404)
    row.revoked_at = row.revoked_at or utcnow()
    db().commit()
    flash("Token revoked.", "ok")
    return redirect(url_for("ui.account"), 303)


@bp.post("/account/webhooks")
@login_required()
def new_webhook():
    session, user = db(), current_user()
    settings = current_app.extensions["captioner"].settings
    try:
        url = webhooks.check_receiver_url(request.form.get("url", ""), settings)
    except SubmissionRejected as exc:
        flash(f"Refused: {exc.reason}", "error")
        return redirect(url_for("ui.account"), 303)
    hook = Webhook(owner_id=user.id, url=url, secret=webhooks.new_secret(), events=[])
    session.add(hook)
    session.commit()
    tokens = session.scalars(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    )
    hooks = session.scalars(
        select(Webhook).where(Webhook.owner_id == user.id, Webhook.active.is_(True))
    )
    return render_template(
        "account.html",
        tokens=list(tokens),
        hooks=list(hooks),
        new_token=None,
        new_secret=hook.secret,
    )


@bp.post("/account/webhooks/<int:webhook_id>/rotate")
@login_required()
def rotate_webhook(webhook_id: int):
    session, user = db(), current_user()
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.owner_id != user.id or not hook.active:
        abort(404)
    settings = current_app.extensions["captioner"].settings
    secret = webhooks.rotate_secret(session, hook, settings=settings)
    session.commit()
    tokens = session.scalars(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    )
    hooks = session.scalars(
        select(Webhook).where(Webhook.owner_id == user.id, Webhook.active.is_(True))
    )
    # Rendered directly (not redirected): the new secret exists only in this response.
    return render_template(
        "account.html", tokens=list(tokens), hooks=list(hooks), new_token=None, new_secret=secret
    )


@bp.route("/admin/users", methods=["GET", "POST"])
@login_required("admin")
def admin_users():
    session = db()
    if request.method == "POST":
        form = request.form
        email, password = form.get("email", "").strip(), form.get("password", "")
        role = form.get("role", "submitter")
        if role not in [r.value for r in UserRole] or "@" not in email or len(password) < 8:
            flash("Give an email, a role and a password of at least 8 characters.", "error")
        elif find_user(session, email) is not None:
            flash("A user with this email exists.", "error")
        else:
            create_user(session, email, password, role=role, name=form.get("name", "")[:200])
            session.commit()
            flash(f"User {email} created.", "ok")
        return redirect(url_for("ui.admin_users"), 303)
    users = session.scalars(select(User).order_by(User.id))
    return render_template("users.html", users=list(users), roles=[r.value for r in UserRole])


@bp.post("/admin/users/<int:user_id>")
@login_required("admin")
def admin_update_user(user_id: int):
    session = db()
    user = _user_or_404(user_id)
    role = request.form.get("role")
    if role in [r.value for r in UserRole]:
        user.role = UserRole(role)
        user.is_admin = user.role == UserRole.ADMIN
    new_password = len(request.form.get("password", "")) >= 8
    if new_password:  # ends the user's sessions and revokes their tokens
        change_password(session, user, request.form["password"])
    session.commit()
    if new_password:
        keep_this_session(user)
    flash(f"User {user.email} updated.", "ok")
    return redirect(url_for("ui.admin_users"), 303)


def _user_or_404(user_id: int) -> User:
    user = db().get(User, user_id)
    if user is None:
        abort(404)
    return user


@bp.post("/admin/users/<int:user_id>/disable")
@login_required("admin")
def admin_disable_user(user_id: int):
    user = _user_or_404(user_id)
    if user.id == current_user().id:
        flash("You cannot disable your own account.", "error")
    else:
        disable_user(db(), user)
        db().commit()
        flash(f"User {user.email} disabled: logged out, tokens revoked.", "ok")
    return redirect(url_for("ui.admin_users"), 303)


@bp.post("/admin/users/<int:user_id>/enable")
@login_required("admin")
def admin_enable_user(user_id: int):
    user = _user_or_404(user_id)
    enable_user(user)
    db().commit()
    flash(f"User {user.email} enabled (old tokens stay revoked).", "ok")
    return redirect(url_for("ui.admin_users"), 303)


@bp.post("/admin/users/<int:user_id>/tokens/revoke")
@login_required("admin")
def admin_revoke_user_tokens(user_id: int):
    user = _user_or_404(user_id)
    revoked = revoke_tokens(db(), user)
    db().commit()
    flash(f"Revoked {revoked} token{'s' if revoked != 1 else ''} of {user.email}.", "ok")
    return redirect(url_for("ui.admin_users"), 303)
