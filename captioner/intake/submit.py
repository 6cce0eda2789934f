"""What every way of submitting images shares: caption reuse, the ids left to publish, webhook
events for the jobs a submission finishes, and the background step that adds one chunk of
images to a job.

The dashboard queues uploads and keys while it handles a request (`dashboard.services`); a
background worker lists a prefix (`captioner.intake.prefixes`) or fetches URLs
(`captioner.intake.urls`), chunk by chunk, each chunk in its own transaction through
`add_chunk`, publishing caption batches after each commit. A job a submission finishes (every
URL failed, an empty prefix, every image a known caption) gets its webhook events recorded in
the transaction that finishes it (`record_job_events`), and the deliveries are published after
the commit, as the caption worker does.

Dedupe: an image whose content hash matches one the active model already captioned reuses that
caption (copied to the new image) unless the job's options say `recaption`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from captioner import tasks
from captioner.intake.errors import SubmissionRejected
from captioner.settings import get_settings
from captioner.state import images, jobs, outbox
from captioner.state.db import session_scope
from captioner.state.models import Caption, Image, ImageStatus, Job, ModelStatus, ModelVersion
from captioner.storage import open_store

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from captioner.settings import Settings
    from captioner.storage import ObjectStore


# --- external ids -----------------------------------------------------------------------------

# The longest external id the database stores (`Image.external_id`).
EXTERNAL_ID_MAX_LENGTH = 512


def check_external_id(value: Any) -> str | None:
    """The submitter's own id for an image as the database stores it: None when not given,
    else text of 1 to `EXTERNAL_ID_MAX_LENGTH` characters (a whole number is taken as its
    digits); SubmissionRejected for anything else."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise SubmissionRejected("external_id must be a non-empty string")
    if len(value) > EXTERNAL_ID_MAX_LENGTH:
        raise SubmissionRejected(
            f"external_id too long: {len(value)} characters > limit {EXTERNAL_ID_MAX_LENGTH}"
        )
    return value


# --- dedupe -----------------------------------------------------------------------------------


def active_model_version_id(session: Session) -> int | None:
    """The id of the model version that captions new images, if one is active."""
    return session.scalar(select(ModelVersion.id).where(ModelVersion.status == ModelStatus.ACTIVE))


def reuse_known_captions(session: Session, image_ids: Sequence[int]) -> list[int]:
    """Caption queued images whose content the active model already captioned; returns those ids.

    The caption (text, score, n-best) is copied to the new image under the active version, and
    the image is marked captioned, so it is never sent to a worker.
    """
    version_id = active_model_version_id(session)
    if version_id is None or not image_ids:
        return []
    reused: list[int] = []
    for start in range(0, len(image_ids), 500):
        chunk = list(image_ids[start : start + 500])
        reused += _reuse_in_chunk(session, version_id, chunk)
    return sorted(reused)


def _reuse_in_chunk(session: Session, version_id: int, chunk: list[int]) -> list[int]:
    wanted = dict(
        session.execute(
            select(Image.id, Image.content_sha256).where(
                Image.id.in_(chunk),
                Image.status == ImageStatus.QUEUED,
                Image.content_sha256.is_not(None),
            )
        ).all()
    )
    if not wanted:
        return []
    known = _known_captions(session, version_id, set(wanted.values()))
    reused: list[int] = []
    for image_id, digest in wanted.items():
        caption = known.get(digest)
        if caption is None or caption.image_id == image_id:
            continue
        images.complete_image(
            session,
            image_id=image_id,
            model_version_id=version_id,
            text=caption.text,
            score=caption.score,
            candidates=list(caption.candidates or []),
        )
        reused.append(image_id)
    return reused


def _known_captions(session: Session, version_id: int, digests: set[str]) -> dict[str, Caption]:
    """The first caption `version_id` gave to a captioned image of each content hash."""
    known: dict[str, Caption] = {}
    rows = session.execute(
        select(Image.content_sha256, Caption)
        .join(Caption, Caption.image_id == Image.id)
        .where(
            Caption.model_version_id == version_id,
            Image.content_sha256.in_(digests),
            Image.status == ImageStatus.CAPTIONED,
        )
        .order_by(Caption.id)
    )
    for digest, caption in rows:
        known.setdefault(digest, caption)
    return known


def wants_recaption(job: Job) -> bool:
    """Whether the job asked for fresh captions even of content already captioned."""
    return bool((job.options or {}).get("recaption"))


def ids_to_publish(session: Session, job: Job, image_ids: Sequence[int]) -> list[int]:
    """After queuing: reuse known captions (unless the job says recaption); the rest to publish."""
    reused = set() if wants_recaption(job) else set(reuse_known_captions(session, image_ids))
    if reused:
        jobs.finish_completed_jobs(session)
    return sorted(set(image_ids) - reused)


def record_job_events(session: Session, job_id: int, *, finish: bool) -> list[int]:
    """Webhook events for the jobs finished now (`finish`) and for `job_id` if it is finished
    (`ids_to_publish` may have finished it), in the caller's transaction; returns the new
    delivery ids, to publish after the commit. Recording twice is a no-op. Every submission
    path that calls `ids_to_publish` calls this before its commit (`add_chunk` here,
    `dashboard.services.submit_files`)."""
    finished = jobs.finish_completed_jobs(session) if finish else []
    return outbox.record_job_events(session, sorted(set(finished) | {job_id}))


# --- background submission, chunk by chunk (called by worker tasks, by name) ------------------


Publish = Callable[[int, list[int]], Any]
PublishDeliveries = Callable[[list[int]], Any]
# Queues a chunk's images in the given session (the job is known to accept images); their ids.
AddImages = Callable[[Session], list[int]]


@dataclass(frozen=True)
class JobRun:
    """What a background submission of one job works with: its sessions, the object store, the
    settings and where caption batches and webhook deliveries are published."""

    job_id: int
    session_factory: sessionmaker[Session]
    store: ObjectStore
    settings: Settings
    publish: Publish
    publish_deliveries: PublishDeliveries


@dataclass(frozen=True)
class ChunkAdded:
    """What `add_chunk` did: `accepted` is False when the job no longer accepts images
    (cancelled or gone) and nothing was added; else `queued` images were added to the job and
    `published` of them were sent to the workers (the others reused a known caption)."""

    accepted: bool
    queued: int = 0
    published: int = 0


def job_run(
    job_id: int,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore | None = None,
    settings: Settings | None = None,
    publish: Publish | None = None,
    publish_deliveries: PublishDeliveries | None = None,
) -> JobRun:
    """A `JobRun`, with the configured store and task queue for what the caller left out."""
    settings = settings or get_settings()
    return JobRun(
        job_id=job_id,
        session_factory=session_factory,
        store=store or open_store(settings=settings),
        settings=settings,
        publish=publish
        or (lambda job_id, ids: tasks.publish_caption_batches(job_id, ids, settings=settings)),
        publish_deliveries=publish_deliveries
        or (lambda delivery_ids: tasks.publish_deliveries(delivery_ids, settings=settings)),
    )


def job_options(run: JobRun) -> dict[str, Any]:
    """The options the job was submitted with (empty for a job that is gone)."""
    with session_scope(run.session_factory) as session:
        job = session.get(Job, run.job_id)
        return dict(job.options or {}) if job else {}


def add_chunk(run: JobRun, add: AddImages, *, last: bool) -> ChunkAdded:
    """One chunk of a background submission, in its own transaction: `add` queues the images
    (unless the job no longer accepts any), known captions are reused, webhook events are
    recorded (finishing the job if this is the `last` chunk and all its images are done); after
    the commit the rest are published with the deliveries."""
    with session_scope(run.session_factory) as session:
        job = session.get(Job, run.job_id)
        if not jobs.accepts_images(job):
            return ChunkAdded(accepted=False)
        queued = add(session)
        ids = ids_to_publish(session, job, queued)
        deliveries = record_job_events(session, run.job_id, finish=last)
    if ids:
        run.publish(run.job_id, ids)
    if deliveries:
        run.publish_deliveries(deliveries)
    return ChunkAdded(accepted=True, queued=len(queued), published=len(ids))


def finish_empty_job(run: JobRun) -> None:
    """Finish a job that holds no images at all (so it is not left queued forever), recording
    and publishing its webhook events."""
    with session_scope(run.session_factory) as session:
        finished = jobs.finish_if_empty(session, run.job_id)
        deliveries = record_job_events(session, run.job_id, finish=False) if finished else []
    if deliveries:
        run.publish_deliveries(deliveries)
