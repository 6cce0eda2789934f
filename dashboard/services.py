"""What the API and the pages both do: submit, look up with visibility rules, review, undo.

Functions here take the request's session and the acting user; they commit when the work is
done and publish after the commit (never before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from flask import current_app
from sqlalchemy import func, or_, select
from sqlalchemy.orm import selectinload

from captioner import tasks
from captioner.intake import submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.fetch import check_url_items
from captioner.intake.prefixes import (
    check_readable,
    key_specs,
    prefix_within_store,
    readable_locations,
)
from captioner.intake.uploads import store_files
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
from dashboard.claims import Claim, review_claims


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


# The source of a job made by "Try one image" (its options also say {"try": true}).
TRY_SOURCE = "try"


def not_a_try():
    """Jobs other than "Try one image" ones: those are seen on their own page, not listed. A
    comparison on the row itself (the JSON flag is read only for source "try")."""
    return or_(Job.source != TRY_SOURCE, Job.options["try"].as_boolean().is_not(True))


def listed_jobs(user: User):
    """The jobs lists show: those the user may see, except tries."""
    return visible_jobs(user).where(not_a_try())


def jobs_page(session, user: User, *, limit: int, offset: int = 0) -> list[Job]:
    """The jobs the user may see (tries left out), newest first, each with its owner (one
    query for all the owners, not one per job). The jobs table holds one row per submission:
    small."""
    query = listed_jobs(user).options(selectinload(Job.owner))
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


def submit_files(
    session, user: User, opts: JobOptions, files, source: str, extra: dict | None = None
) -> Job:
    """Files already checked (`captioner.intake.uploads.check_uploads`): store, queue, publish.
    `extra` joins the job's options."""
    check_options(user, opts, len(files))
    job = _new_job(session, user, opts, source, extra)
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


def submit_try(session, user: User, files) -> Job:
    """ "Try one image": one checked file on the interactive queue, in a job marked as a try
    (source `TRY_SOURCE`, options {"try": true}) that the jobs lists leave out."""
    name = f"try: {files[0].name}"[:200] if files else "try"
    opts = JobOptions(name=name, num_beams=3, n_best=3, interactive=True)
    return submit_files(session, user, opts, files, TRY_SOURCE, extra={"try": True})


def submit_keys(session, user: User, opts: JobOptions, keys: list[str | dict]) -> Job:
    """Keys as strings, or `{"key": ..., "external_id": ...}`."""
    specs = key_specs(keys)
    check_options(user, opts, len(specs))
    locations = readable_locations(user, _ext().settings)
    for spec in specs:
        check_readable(spec.storage_key, locations, is_prefix=False)
    job = _new_job(session, user, opts, source=f"keys ({len(specs)})")
    ids = jobs.submit_images(session, job.id, specs)
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


def submit_urls(session, user: User, opts: JobOptions, urls: list[str | dict]) -> Job:
    """URLs as strings, or `{"url": ..., "external_id": ...}`."""
    checked = check_url_items(urls, allow_hosts=_ext().settings.url_allow_hosts)
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
    """Record the user's decision on the image's caption (the newest one unless `caption_id`),
    and on the other images of the same content in the owner's jobs still awaiting review (see
    `reviews.add_content_review`); their claims go."""
    if decision not in REVIEW_DECISIONS:
        raise jobs.LifecycleError("decision must be approved, corrected or rejected")
    chosen = ReviewDecision(decision)
    caption = latest_caption(session, image.id)
    if caption_id is None and caption is not None:
        caption_id = caption.id
    if chosen == ReviewDecision.APPROVED and text is None and caption_id is None:
        raise Conflict("this image has no caption to approve yet")
    review, shared = reviews.add_content_review(
        session,
        image_id=image.id,
        decision=chosen,
        text=text,
        caption_id=caption_id,
        reviewer_id=user.id,
    )
    session.commit()
    review_claims().release([image.id, *shared])
    return review


def undo_review(session, user: User, image: Image) -> Review:
    """Take back the image's current decision, and the same decision its action gave the other
    images of the same content (see `reviews.undo_content_review`); their claims go. Conflict
    when there is nothing to undo."""
    try:
        review, undone = reviews.undo_content_review(session, image.id, user.id)
    except jobs.TransitionRefused as exc:
        raise Conflict(str(exc)) from exc
    session.commit()
    review_claims().release([image.id, *undone])
    return review


def claim_image(user: User, image: Image) -> Claim:
    """Claim the image for the user while they review it (see `dashboard.claims`). Conflict
    when it no longer awaits review or another reviewer holds it; with claims unavailable the
    answer says nothing was claimed, and reviewing goes on."""
    if image.review_score is None:
        raise Conflict(f"image {image.id} does not await review (reviewed meanwhile?)")
    claim = review_claims().claim(image.id, user.id)
    if claim.held_by is not None:
        raise Conflict(f"image {image.id} is being reviewed by another reviewer")
    return claim


def bulk_approve(session, user: User, job: Job, min_score: float) -> int:
    """Approve every unreviewed caption of the job scoring at least `min_score`."""
    return approve_above(session, user, job, min_score).count


def approve_above(session, user: User, job: Job, min_score: float) -> reviews.ApprovalBatch:
    """Approve every unreviewed caption of the job scoring at least `min_score`; the batch
    added, for `undo_approval`."""
    batch = reviews.approve_batch(session, job_id=job.id, min_score=min_score, reviewer_id=user.id)
    session.commit()
    return batch


def preview_approval(session, job: Job, min_score: float, sample: int) -> reviews.ApprovalPreview:
    """What `approve_above` would approve now, with a sample of the lowest scoring; no writes."""
    return reviews.preview_bulk_approve(session, job_id=job.id, min_score=min_score, sample=sample)


def undo_approval(session, user: User, job: Job, token: str) -> int:
    """Take back the approvals of one `approve_above` batch that are still current; how many.
    `jobs.LifecycleError` for a token that names no batch of this job; Forbidden for another
    reviewer's batch unless the user is an admin."""
    batch = reviews.ApprovalBatch.decode(token)
    if batch.job_id != job.id:
        raise jobs.LifecycleError(f"that batch is of job {batch.job_id}, not job {job.id}")
    if batch.reviewer_id != user.id and user.role != UserRole.ADMIN:
        raise Forbidden("only the reviewer who approved a batch (or an admin) may undo it")
    count = reviews.undo_approval_batch(session, batch, reviewer_id=user.id)
    session.commit()
    return count


def approve_images(session, user: User, picks: Sequence[tuple[int, int]]) -> reviews.ApprovedPicks:
    """Approve the caption shown for each (image id, caption id) the user picked; returns the
    approvals, the images skipped (reviewed meanwhile) and those of the same content that got
    the approval too. NotFound for an image the user cannot see; `jobs.LifecycleError` for a
    caption that is not the image's."""
    ids = {image_id for image_id, _ in picks}
    seen = select(Image.id).join(Job, Job.id == Image.job_id).where(Image.id.in_(ids))
    if not sees_all_jobs(user):
        seen = seen.where(Job.owner_id == user.id)
    missing = ids - set(session.scalars(seen))
    if missing:
        raise NotFound(f"no image {min(missing)}")
    done = reviews.approve_images(session, picks, reviewer_id=user.id)
    session.commit()
    preload_reviewers(session, done.added)
    return done


def review_queue(
    session,
    user: User,
    *,
    status: str = "unreviewed",
    limit: int = 50,
    after: str | None = None,
    offset: int = 0,
    skip_claimed: bool = False,
    claim: bool = False,
    **filters,
) -> reviews.QueuePage:
    """One page of the review queue as `user` may see it (only their own jobs' images unless
    they see all), after the opaque cursor `after` of the page before. `LifecycleError` for a
    cursor that is not one, or an offset into the unreviewed queue (it pages by cursor only).

    In the unreviewed queue, `skip_claimed` leaves out the images other reviewers hold, and
    `claim` (which implies it) claims the first image of the page for the user: two reviewers
    opening the queue get different first items."""
    owner_id = None if sees_all_jobs(user) else user.id
    queue_status = reviews.QueueStatus(status)
    queue_filter = reviews.QueueFilter(status=queue_status, owner_id=owner_id, **filters)
    claims = None
    if (skip_claimed or claim) and queue_status == reviews.QueueStatus.UNREVIEWED:
        claims = review_claims()
    skip = None if claims is None else (lambda ids: claims.held_by_others(ids, user.id))
    page = reviews.review_queue(
        session, queue_filter, limit=limit, after=after, offset=offset, skip=skip
    )
    if claim and claims is not None:
        page = _claim_first(claims, page, user)
    preload_reviewers(session, [review for _, _, review in page.rows])
    return page


def _claim_first(claims, page: reviews.QueuePage, user: User) -> reviews.QueuePage:
    """The page with its first row claimed for the user: a row another reviewer claimed since
    the page was read is left out, and the next one tried."""
    rows = list(page.rows)
    while rows and claims.claim(rows[0][0].id, user.id).held_by is not None:
        rows.pop(0)
    return replace(page, rows=rows)


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
