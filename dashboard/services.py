"""What the API and the pages both do: submit, look up with visibility rules, review, undo.

Functions here take the request's session and the acting user; they commit when the work is
done and publish after the commit (never before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import select

from captioner import tasks
from captioner.intake import submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.prefixes import check_keys, prefix_within_store
from captioner.intake.uploads import store_files
from captioner.intake.urls import check_url
from captioner.state import jobs, reviews
from captioner.state.models import (
    Caption,
    Image,
    Job,
    Review,
    ReviewDecision,
    User,
    UserRole,
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
    """Files already checked (`captioner.intake.uploads.check_uploads`): store, queue, publish."""
    job = _new_job(session, user, opts, source)
    ids = store_files(session, _ext().store, job.id, files)
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
    keys = check_keys(keys)
    job = _new_job(session, user, opts, source=f"keys ({len(keys)})")
    ids = jobs.submit_images(session, job.id, keys)
    session.commit()
    session.refresh(job)
    _ext().publisher.captions(job.id, ids, interactive=opts.interactive)
    return job


def submit_prefix(session, user: User, opts: JobOptions, prefix: str) -> Job:
    key_prefix = prefix_within_store(prefix, _ext().settings.storage_url)
    job = _new_job(session, user, opts, source=prefix, extra={"prefix": key_prefix})
    session.commit()
    _ext().publisher.task(tasks.TASK_ENUMERATE_PREFIX, job.id)
    return job


def submit_urls(session, user: User, opts: JobOptions, urls: list[str]) -> Job:
    allow = _ext().settings.url_allow_hosts
    checked = [check_url(u, allow_hosts=allow, resolve=False) for u in urls if u.strip()]
    if not checked:
        raise SubmissionRejected("no URLs given")
    job = _new_job(session, user, opts, source=f"urls ({len(checked)})", extra={"urls": checked})
    session.commit()
    _ext().publisher.task(tasks.TASK_FETCH_URLS, job.id)
    return job


# --- job actions ---------------------------------------------------------------------------


def cancel_job(session, job: Job) -> Job:
    """Cancel the job (its queued images fail); Conflict when it is already finished or
    cancelled."""
    try:
        jobs.cancel_job(session, job.id)
    except jobs.TransitionRefused as exc:
        raise Conflict(str(exc)) from exc
    session.commit()
    session.refresh(job)
    return job


def retry_failed(session, job: Job) -> int:
    """Re-queue a job's failed images (attempts reset) and publish them; returns how many."""
    retried = jobs.retry_failed(session, job.id)
    if not retried.image_ids:
        return 0
    session.commit()
    session.refresh(job)
    interactive = bool((job.options or {}).get("interactive"))
    _ext().publisher.captions(job.id, retried.image_ids, interactive=interactive)
    return len(retried.image_ids)


# --- captions and reviews ------------------------------------------------------------------

REVIEW_DECISIONS = (ReviewDecision.APPROVED, ReviewDecision.CORRECTED, ReviewDecision.REJECTED)


def latest_caption(session, image_id: int) -> Caption | None:
    return session.scalar(
        select(Caption).where(Caption.image_id == image_id).order_by(Caption.id.desc()).limit(1)
    )


def review_image(
    session, user: User, image: Image, decision: str, text: str | None, caption_id: int | None
) -> Review:
    """Record the user's decision on the image's caption (the newest one unless `caption_id`)."""
    if decision not in REVIEW_DECISIONS:
        raise jobs.LifecycleError("decision must be approved, corrected or rejected")
    chosen = ReviewDecision(decision)
    caption = latest_caption(session, image.id)
    if caption_id is None and caption is not None:
        caption_id = caption.id
    if chosen == ReviewDecision.APPROVED and text is None and caption_id is None:
        raise Conflict("this image has no caption to approve yet")
    review = reviews.add_review(
        session,
        image_id=image.id,
        decision=chosen,
        text=text,
        caption_id=caption_id,
        reviewer_id=user.id,
    )
    session.commit()
    return review


def undo_review(session, user: User, image: Image) -> Review:
    """Take back the image's current decision (see `reviews.undo_review`); Conflict when there
    is nothing to undo."""
    try:
        review = reviews.undo_review(session, image.id, user.id)
    except jobs.TransitionRefused as exc:
        raise Conflict(str(exc)) from exc
    session.commit()
    return review


def bulk_approve(session, user: User, job: Job, min_score: float) -> int:
    """Approve every unreviewed caption of the job scoring at least `min_score`."""
    count = reviews.bulk_approve(session, job_id=job.id, min_score=min_score, reviewer_id=user.id)
    session.commit()
    return count


def review_queue(
    session, user: User, *, status: str = "unreviewed", limit: int = 50, offset: int = 0, **filters
) -> reviews.QueuePage:
    """The review queue as `user` may see it: only their own jobs' images unless they see all."""
    owner_id = None if sees_all_jobs(user) else user.id
    queue_filter = reviews.QueueFilter(
        status=reviews.QueueStatus(status), owner_id=owner_id, **filters
    )
    return reviews.review_queue(session, queue_filter, limit=limit, offset=offset)
