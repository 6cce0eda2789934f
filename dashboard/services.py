"""What the API and the pages both do: submit, look up with visibility rules, review, undo.

Functions here take the request's session and the acting user; they commit when the work is
done and publish after the commit (never before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import and_, func, or_, select, update

from captioner import tasks
from captioner.intake import submit
from captioner.state import jobs, reviews
from captioner.state.models import (
    Caption,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    Review,
    ReviewDecision,
    User,
    UserRole,
    utcnow,
)


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


def _ext():
    return current_app.extensions["captioner"]


def sees_all_jobs(user: User) -> bool:
    return user.role in (UserRole.ADMIN, UserRole.REVIEWER)


def visible_jobs(user: User):
    query = select(Job)
    if not sees_all_jobs(user):
        query = query.where(Job.owner_id == user.id)
    return query


def get_job(session, user: User, job_id: int) -> Job:
    """The job if the user may see it; another submitter's job is NotFound (not 403)."""
    job = session.get(Job, job_id)
    if job is None or (not sees_all_jobs(user) and job.owner_id != user.id):
        raise NotFound(f"no job {job_id}")
    return job


def get_image(session, user: User, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(f"no image {image_id}")
    get_job(session, user, image.job_id)
    return image


# --- submit --------------------------------------------------------------------------------


@dataclass
class JobOptions:
    name: str
    priority: int = 0
    num_beams: int = 3
    n_best: int = 3
    recaption: bool = False
    interactive: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_beams": self.num_beams,
            "n_best": self.n_best,
            "recaption": self.recaption,
            "interactive": self.interactive,
        }


def _new_job(session, user: User, opts: JobOptions, source: str, extra: dict | None = None) -> Job:
    options = opts.as_dict() | (extra or {})
    return jobs.create_job(
        session, opts.name, source=source, options=options, priority=opts.priority, owner_id=user.id
    )


def submit_files(session, user: User, opts: JobOptions, files, source: str) -> Job:
    """Files already checked (submit.check_image_bytes / read_zip): store, queue, publish."""
    job = _new_job(session, user, opts, source)
    ids = submit.store_files(session, _ext().store, job.id, files)
    to_publish = submit.ids_to_publish(session, job, ids)
    # Every image a known caption: the job is finished now, so its webhook events are
    # recorded in this transaction and published after the commit (as the workers do).
    deliveries = submit.record_job_events(session, job.id, finish=False)
    session.commit()
    session.refresh(job)
    _ext().publisher.captions(job.id, to_publish, interactive=opts.interactive)
    for delivery_id in deliveries:
        _ext().publisher.task(tasks.TASK_DELIVER_WEBHOOK, delivery_id)
    return job


def submit_keys(session, user: User, opts: JobOptions, keys: list[str]) -> Job:
    keys = submit.check_keys(keys)
    job = _new_job(session, user, opts, source=f"keys ({len(keys)})")
    ids = jobs.submit_images(session, job.id, keys)
    session.commit()
    session.refresh(job)
    _ext().publisher.captions(job.id, ids, interactive=opts.interactive)
    return job


def submit_prefix(session, user: User, opts: JobOptions, prefix: str) -> Job:
    key_prefix = submit.prefix_within_store(prefix, _ext().settings.storage_url)
    job = _new_job(session, user, opts, source=prefix, extra={"prefix": key_prefix})
    session.commit()
    _ext().publisher.task(tasks.TASK_ENUMERATE_PREFIX, job.id)
    return job


def submit_urls(session, user: User, opts: JobOptions, urls: list[str]) -> Job:
    allow = _ext().settings.url_allow_hosts
    checked = [submit.check_url(u, allow_hosts=allow, resolve=False) for u in urls if u.strip()]
    if not checked:
        raise submit.SubmissionRejected("no URLs given")
    job = _new_job(session, user, opts, source=f"urls ({len(checked)})", extra={"urls": checked})
    session.commit()
    _ext().publisher.task(tasks.TASK_FETCH_URLS, job.id)
    return job


# --- job actions ---------------------------------------------------------------------------

CANCEL_REASON = "job cancelled"


def cancel_job(session, job: Job) -> Job:
    if job.status in (JobStatus.FINISHED, JobStatus.CANCELLED):
        raise Conflict(f"job {job.id} is already {job.status.value}")
    session.execute(
        update(Image)
        .where(Image.job_id == job.id, Image.status == ImageStatus.QUEUED)
        .values(status=ImageStatus.FAILED, failure_reason=CANCEL_REASON, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    job.status = JobStatus.CANCELLED
    job.finished_at = utcnow()
    session.commit()
    session.refresh(job)
    return job


def retry_failed(session, job: Job) -> int:
    """Re-queue a job's failed images (attempts reset); returns how many."""
    ids = list(
        session.scalars(
            select(Image.id).where(Image.job_id == job.id, Image.status == ImageStatus.FAILED)
        )
    )
    if not ids:
        return 0
    now = utcnow()
    for start in range(0, len(ids), 500):
        session.execute(
            update(Image)
            .where(Image.id.in_(ids[start : start + 500]), Image.status == ImageStatus.FAILED)
            .values(
                status=ImageStatus.QUEUED,
                failure_reason=None,
                attempts=0,
                queued_at=now,
                finished_at=None,
            )
            .execution_options(synchronize_session=False)
        )
    job.status = JobStatus.RUNNING if job.started_at else JobStatus.QUEUED
    job.finished_at = None
    session.commit()
    _ext().publisher.captions(job.id, ids, interactive=bool((job.options or {}).get("interactive")))
    return len(ids)


# --- captions and reviews ------------------------------------------------------------------


def latest_caption(session, image_id: int) -> Caption | None:
    return session.scalar(
        select(Caption).where(Caption.image_id == image_id).order_by(Caption.id.desc()).limit(1)
    )


def effective_stack(history: list[Review]) -> list[Review]:
    """Replay an image's reviews: an undo row takes back the one on top, others push."""
    stack: list[Review] = []
    for review in history:
        if review.undoes_id is not None:
            if stack:
                stack.pop()
        else:
            stack.append(review)
    return stack


def review_image(
    session, user: User, image: Image, decision: str, text: str | None, caption_id: int | None
) -> Review:
    if decision not in ("approved", "corrected", "rejected"):
        raise jobs.LifecycleError("decision must be approved, corrected or rejected")
    caption = latest_caption(session, image.id)
    if caption_id is None and caption is not None:
        caption_id = caption.id
    if decision == "approved" and text is None and caption_id is None:
        raise Conflict("this image has no caption to approve yet")
    review = reviews.add_review(
        session,
        image_id=image.id,
        decision=decision,
        text=text,
        caption_id=caption_id,
        reviewer_id=user.id,
    )
    session.commit()
    return review


def undo_review(session, user: User, image: Image) -> Review:
    """Take back the image's current decision by appending a row that restores the one before
    it (or `undone` when none remains). History is never rewritten."""
    history = reviews.review_history(session, image.id)
    stack = effective_stack(history)
    if not stack:
        raise Conflict("nothing to undo")
    target = stack.pop()
    restored = stack[-1] if stack else None
    review = Review(
        image_id=image.id,
        caption_id=restored.caption_id if restored else target.caption_id,
        reviewer_id=user.id,
        decision=restored.decision if restored else ReviewDecision.UNDONE,
        text=restored.text if restored else None,
        undoes_id=target.id,
    )
    session.add(review)
    session.commit()
    return review


def bulk_approve(session, user: User, job: Job, min_score: float) -> int:
    """Approve every unreviewed caption of the job scoring at least `min_score`."""
    rows = _queue_query(status="unreviewed", job_id=job.id, min_score=min_score, user=None)
    count = 0
    for image, caption, _review in session.execute(rows.limit(100_000)).all():
        reviews.add_review(
            session,
            image_id=image.id,
            decision=ReviewDecision.APPROVED,
            caption_id=caption.id,
            reviewer_id=user.id,
        )
        count += 1
    session.commit()
    return count


def _queue_query(
    *,
    status: str = "unreviewed",
    job_id: int | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    text: str | None = None,
    user: User | None = None,
):
    newest_caption = (
        select(Caption.image_id, func.max(Caption.id).label("caption_id"))
        .group_by(Caption.image_id)
        .subquery("newest_caption")
    )
    current = reviews.current_review_ids()
    query = (
        select(Image, Caption, Review)
        .join(newest_caption, newest_caption.c.image_id == Image.id)
        .join(Caption, Caption.id == newest_caption.c.caption_id)
        .outerjoin(current, current.c.image_id == Image.id)
        .outerjoin(Review, Review.id == current.c.review_id)
    )
    if user is not None and not sees_all_jobs(user):
        query = query.join(Job, Job.id == Image.job_id).where(Job.owner_id == user.id)
    if job_id is not None:
        query = query.where(Image.job_id == job_id)
    if status == "unreviewed":
        query = query.where(or_(Review.id.is_(None), Review.decision == ReviewDecision.UNDONE))
    elif status in ("approved", "corrected", "rejected"):
        query = query.where(Review.decision == status)
    elif status == "reviewed":
        query = query.where(and_(Review.id.is_not(None), Review.decision != ReviewDecision.UNDONE))
    if min_score is not None:
        query = query.where(Caption.score >= min_score)
    if max_score is not None:
        query = query.where(Caption.score <= max_score)
    if text:
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(
            or_(
                Caption.text.ilike(pattern, escape="\\"),
                Review.text.ilike(pattern, escape="\\"),
                Image.original_name.ilike(pattern, escape="\\"),
            )
        )
    return query.order_by(Caption.score.asc(), Caption.id)


def review_queue(session, user: User, *, limit: int = 50, offset: int = 0, **filters):
    """(image, caption, current review) rows, least confident first."""
    query = _queue_query(user=user, **filters)
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = session.execute(query.limit(limit).offset(offset)).all()
    return total, rows
