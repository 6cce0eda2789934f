"""What the API and the pages both do: submit, look up with visibility rules, review, undo.

Functions here take the request's session and the acting user; they commit when the work is
done and publish after the commit (never before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from captioner import tasks
from captioner.intake import submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.prefixes import (
    check_keys,
    check_readable,
    prefix_within_store,
    readable_locations,
)
from captioner.intake.uploads import store_files
from captioner.intake.urls import check_url
from captioner.state import jobs, reviews
from captioner.state.models import (
    Caption,
    Image,
    ImageStatus,
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


class Forbidden(PermissionError):
    """The user may see this, but not do that to it (403)."""


class OptionRefused(SubmissionRejected):
    """A job option the user's role does not allow (403)."""

    status_code = 403


def _ext():
    return current_app.extensions["captioner"]


def sees_all_jobs(user: User) -> bool:
    return user.role in (UserRole.ADMIN, UserRole.REVIEWER)


def visible_jobs(user: User):
    query = select(Job)
    if not sees_all_jobs(user):
        query = query.where(Job.owner_id == user.id)
    return query


def jobs_page(session, user: User, *, limit: int, offset: int = 0) -> list[Job]:
    """The jobs the user may see, newest first, each with its owner (one query for all the
    owners, not one per job). The jobs table holds one row per submission: small."""
    query = visible_jobs(user).options(selectinload(Job.owner))
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit).offset(offset)))


def progress_of(job: Job) -> jobs.JobProgress:
    """The job's live progress, from the counters on its row (no query over its images)."""
    return jobs.JobProgress(
        job.id, job.queued_count, job.running_count, job.captioned_count, job.failed_count
    )


def get_job(session, user: User, job_id: int) -> Job:
    """The job if the user may see it; another submitter's job is NotFound (not 403)."""
    job = session.get(Job, job_id)
    if job is None or (not sees_all_jobs(user) and job.owner_id != user.id):
        raise NotFound(f"no job {job_id}")
    return job


def may_act_on(user: User, job: Job) -> bool:
    """Whether the user may cancel or retry the job: its owner or an admin."""
    return user.role == UserRole.ADMIN or job.owner_id == user.id


def get_own_job(session, user: User, job_id: int) -> Job:
    """The job if the user may act on it (cancel, retry): its owner or an admin. NotFound when
    they cannot see it, Forbidden when they see it (a reviewer) but do not own it."""
    job = get_job(session, user, job_id)
    if not may_act_on(user, job):
        raise Forbidden("only the job's owner or an admin may cancel or retry it")
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


def check_options(user: User, opts: JobOptions, n_images: int | None) -> None:
    """Refuse what the user may not ask for: a priority above 0 without the admin role (403),
    `interactive` for more than `interactive_max_images` images, or for a submission whose size
    is not known yet (`n_images` None: a prefix) (422)."""
    if opts.priority > 0 and user.role != UserRole.ADMIN:
        raise OptionRefused("a priority above 0 needs the admin role")
    if not opts.interactive:
        return
    most = _ext().settings.interactive_max_images
    if n_images is None:
        raise SubmissionRejected(
            f"interactive is for submissions of at most {most} images; a prefix's size is not "
            "known when it is submitted: submit it without interactive"
        )
    if n_images > most:
        raise SubmissionRejected(
            f"interactive is for submissions of at most {most} images, not {n_images}: "
            "submit it without interactive"
        )


def _new_job(session, user: User, opts: JobOptions, source: str, extra: dict | None = None) -> Job:
    options = opts.as_dict() | (extra or {})
    return jobs.create_job(
        session, opts.name, source=source, options=options, priority=opts.priority, owner_id=user.id
    )


def submit_files(session, user: User, opts: JobOptions, files, source: str) -> Job:
    """Files already checked (`captioner.intake.uploads.check_uploads`): store, queue, publish."""
    check_options(user, opts, len(files))
    job = _new_job(session, user, opts, source)
    ids = store_files(session, _ext().store, job.id, files, owner_id=user.id)
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
    check_options(user, opts, len(keys))
    locations = readable_locations(user, _ext().settings)
    for key in keys:
        check_readable(key, locations, is_prefix=False)
    job = _new_job(session, user, opts, source=f"keys ({len(keys)})")
    ids = jobs.submit_images(session, job.id, keys)
    session.commit()
    session.refresh(job)
    _ext().publisher.captions(job.id, ids, interactive=opts.interactive)
    return job


def submit_prefix(session, user: User, opts: JobOptions, prefix: str) -> Job:
    check_options(user, opts, None)
    key_prefix = prefix_within_store(prefix, _ext().settings.storage_url)
    check_readable(key_prefix, readable_locations(user, _ext().settings), is_prefix=True)
    job = _new_job(session, user, opts, source=prefix, extra={"prefix": key_prefix})
    session.commit()
    _ext().publisher.task(tasks.TASK_ENUMERATE_PREFIX, job.id)
    return job


def submit_urls(session, user: User, opts: JobOptions, urls: list[str]) -> Job:
    allow = _ext().settings.url_allow_hosts
    checked = [check_url(u, allow_hosts=allow, resolve=False) for u in urls if u.strip()]
    if not checked:
        raise SubmissionRejected("no URLs given")
    check_options(user, opts, len(checked))
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
    session,
    user: User,
    *,
    status: str = "unreviewed",
    limit: int = 50,
    after: str | None = None,
    offset: int = 0,
    **filters,
) -> reviews.QueuePage:
    """One page of the review queue as `user` may see it (only their own jobs' images unless
    they see all), after the opaque cursor `after` of the page before. `LifecycleError` for a
    cursor that is not one, or an offset into the unreviewed queue (it pages by cursor only)."""
    owner_id = None if sees_all_jobs(user) else user.id
    queue_filter = reviews.QueueFilter(
        status=reviews.QueueStatus(status), owner_id=owner_id, **filters
    )
    page = reviews.review_queue(session, queue_filter, limit=limit, after=after, offset=offset)
    preload_reviewers(session, [review for _, _, review in page.rows])
    return page


# --- pages of images -----------------------------------------------------------------------


@dataclass
class ImagePage:
    """A page of a job's images by id: the images, how many the filter matches (from the job's
    counters) and the id to pass as `after` for the next page (None on the last one)."""

    images: list[Image]
    total: int
    next_after: int | None


def job_images(
    session,
    job: Job,
    *,
    status: ImageStatus | str | None = None,
    limit: int = 100,
    after: int | None = None,
    offset: int = 0,
) -> ImagePage:
    """A job's images in id order, from just after image id `after` (keyset: no deep OFFSET;
    a small `offset` on top still works). The total is the job's counter, never a COUNT."""
    query = select(Image).where(Image.job_id == job.id)
    if status is not None:
        query = query.where(Image.status == ImageStatus(status))
    if after is not None:
        query = query.where(Image.id > after)
    found = list(session.scalars(query.order_by(Image.id).offset(offset).limit(limit + 1)))
    images = found[:limit]
    next_after = images[-1].id if len(found) > limit else None
    return ImagePage(images, job_image_total(job, status), next_after)


def job_image_total(job: Job, status: ImageStatus | str | None = None) -> int:
    """How many images the job holds (in `status`, if given): its counters."""
    if status is None:
        return job.image_count
    return getattr(job, jobs.STATUS_COUNTERS[ImageStatus(status)])


def newest_captions(session, image_ids: Sequence[int]) -> dict[int, Caption]:
    """{image id: its newest caption} for these images, in one query."""
    ids = list(image_ids)
    if not ids:
        return {}
    newest = (
        select(func.max(Caption.id)).where(Caption.image_id.in_(ids)).group_by(Caption.image_id)
    )
    rows = session.scalars(select(Caption).where(Caption.id.in_(newest)))
    return {caption.image_id: caption for caption in rows}


def current_reviews(session, image_ids: Sequence[int]) -> dict[int, Review]:
    """{image id: its current review} for these images (with their reviewers), two queries."""
    ids = list(image_ids)
    if not ids:
        return {}
    current = select(func.max(Review.id)).where(Review.image_id.in_(ids)).group_by(Review.image_id)
    found = list(session.scalars(select(Review).where(Review.id.in_(current))))
    preload_reviewers(session, found)
    return {review.image_id: review for review in found}


def preload_reviewers(session, found: Sequence[Review | None]) -> None:
    """Load the reviewers of these reviews in one query, so `review.reviewer` is read from the
    session instead of one query per review."""
    ids = {r.reviewer_id for r in found if r is not None and r.reviewer_id is not None}
    if ids:
        session.scalars(select(User).where(User.id.in_(ids))).all()
