"""The caption path: the `captioner.caption_batch(job_id, image_ids)` task.

A batch, step by step (`run_caption_batch`); each step is a function that returns what it
made, and each way out is named and logged by the task:

1. `_wanted_model`: the model version that should caption now (a newly promoted one is swapped
   in between batches) -- `model unavailable` if there is none: nothing is claimed, the task
   retries;
2. `_claim`: claim the images (queued -> running, with a lease) -- `nothing to claim` if another
   worker or an earlier delivery of this message already took or finished them (a duplicate is
   a no-op);
3. `_fetch_and_decode`: fetch their bytes from the object store on a thread pool, decode them
   safely and preprocess (`workers.pixels`); a missing or undecodable image is failed alone
   with its reason; a transient storage error gives that image back for a retry;
4. `_caption`: run the model once on the whole batch (on CUDA its CPU-decoded pixels go through
   one pinned buffer and a non-blocking copy) -- a model error gives the batch back for a retry;
5. `_save`, in one transaction: keep only images whose lease this worker still holds (`lost
   lease` otherwise: the sweeper handed them to someone else), upsert captions (never over a
   reviewed one; `Caption.score` is the best candidate's confidence in [0, 1]), mark images captioned / failed, finish the job if it is done -- `batch done`;
   then publish the webhook deliveries of the jobs it finished;
6. transient errors (database, storage, model) retry with exponential backoff up to
   `Settings.task_max_retries` -- `gave up` after that, leaving the images to the sweeper; every
   claim counts an attempt, and images past `Settings.max_attempts` are failed, so nothing
   loops forever.

A pipelined worker (`CAPTIONER_WORKER_PIPELINE_DEPTH`, default 2 on CUDA: Celery's `threads`
pool, prefetching one message per slot) runs that many batches at once in one process, sharing
one model: while one batch is in step 4, the next one claims, fetches and decodes (step 3)
and the previous one saves (step 5). What they share is thread-safe (`workers.resources`):
every step opens its own SQLAlchemy session, the fetch pool, the object store clients and the
prometheus metrics are thread-safe. Steps 2 to 4 hold the model through `ModelRuntime.use` (a
switch to a newly promoted version waits until no batch holds the old one, and batches wait
while a model loads), and step 4 -- every device call: the nvJPEG decode, the pinned
host-to-device copy, the model -- runs under `ModelRuntime.model_lock`, one batch at a time. A
batch is still one message with its own leases, so retries, kill -9 recovery and duplicates
work as before.

torch is imported only when a batch first needs the model (`workers.model_runtime`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from captioner.settings import Settings, get_settings
from captioner.state import images, jobs, outbox
from captioner.state.db import session_scope
from captioner.state.models import Image, Job
from captioner.tasks import TASK_CAPTION_BATCH
from workers import metrics
from workers.deliveries import publish_committed_deliveries
from workers.model_runtime import LoadedModel, ModelUnavailable, WantedModel
from workers.pixels import (
    Prepared,
    batch_pixels,
    decode_jpegs_on_device,
    device_batch,
    prepare_image,
    split_preprocess,
)
from workers.resources import WorkerResources, backoff, is_transient_db_error, resources, worker_id

log = logging.getLogger("captioner.worker")

STORAGE_GAVE_UP_REASON = "could not read the image from storage after {attempts} attempts: {error}"
NO_CAPTION_REASON = "the model produced no caption"


class TransientError(RuntimeError):
    """A failure worth retrying (database, storage or model); `image_ids` to retry."""

    def __init__(self, message: str, image_ids: list[int]) -> None:
        super().__init__(message)
        self.image_ids = image_ids


# --- what each step makes ------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One `caption_batch` message as this worker runs it."""

    job_id: int
    image_ids: list[int]  # sorted, each once
    worker_id: str  # the lease owner
    settings: Settings
    retrying: bool  # a retry: first give back what this worker still holds from the last try


@dataclass(frozen=True)
class Wanted:
    """Step 1: the model that should caption now, and when that was read."""

    model: WantedModel
    as_of: float  # `time.monotonic()` before the read (see `ModelRuntime.use`)


@dataclass(frozen=True)
class Claimed:
    """Step 2: the images this batch claimed, with their storage keys and attempts (this claim
    counted)."""

    image_ids: list[int]
    keys: dict[int, str]
    attempts: dict[int, int]
    job_options: dict[str, Any] = field(default_factory=dict)  # decoding options of the job


@dataclass(frozen=True)
class Fetched:
    """Step 3: each claimed image fetched and decoded, or its trouble."""

    prepared: dict[int, Prepared]
    device_jpeg: bool  # plain JPEGs were left for the device decoder


@dataclass(frozen=True)
class ModelRun:
    """Step 4: each image after the device (pixels or trouble) and the model's candidates for
    those that had pixels; `error` when the model failed on the batch."""

    prepared: dict[int, Prepared]
    candidates: dict[int, list] = field(default_factory=dict)
    error: Exception | None = None


@dataclass(frozen=True)
class Failure:
    """An image to mark failed, with its reason for people and its metrics label."""

    image_id: int
    reason: str
    metric_reason: str


@dataclass(frozen=True)
class SavePlan:
    """What step 5 writes for the images this worker still holds."""

    captions: list[images.CaptionRow]
    failures: list[Failure]
    give_back: list[int]  # transient storage errors under the attempt cap: retried


@dataclass(frozen=True)
class JobsFinished:
    """Jobs a save finished and the webhook deliveries recorded for them (to publish)."""

    job_ids: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Saved:
    """Step 5: what the save transaction committed."""

    captioned: list[int]
    failed: dict[int, str]
    retry: list[int]
    lost: list[int]
    finished: JobsFinished


@dataclass(frozen=True)
class BatchOutcome:
    """What became of one batch: the ids claimed, and of those, captioned, failed (with the
    reason), given back for a retry, or lost (another worker holds them now)."""

    claimed: list[int] = field(default_factory=list)
    captioned: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    retry: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    model_version_id: int | None = None
    finished_jobs: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)  # webhook deliveries recorded


# --- the steps ------------------------------------------------------------------------------


def _wanted_model(res: WorkerResources, batch: Batch) -> Wanted:
    """Step 1: the model that should caption now (a new promotion is picked up here)."""
    as_of = time.monotonic()
    try:
        with session_scope(res.sessions) as s:
            return Wanted(model=res.runtime.wanted(s), as_of=as_of)
    except OperationalError as exc:
        raise TransientError(
            f"database unavailable resolving the model: {exc}", batch.image_ids
        ) from exc


def _claim(res: WorkerResources, batch: Batch) -> Claimed:
    """Step 2: claim the batch's claimable images (on a retry, first give back what this worker
    still holds from the last try)."""
    settings = batch.settings
    try:
        with session_scope(res.sessions) as s:
            if batch.retrying:
                images.requeue_images(s, batch.image_ids, worker_id=batch.worker_id)
            claimed = images.claim_images(
                s,
                worker_id=batch.worker_id,
                lease_seconds=settings.lease_seconds,
                image_ids=batch.image_ids,
                job_id=batch.job_id,
                max_attempts=settings.max_attempts,
            )
            rows = s.execute(
                select(Image.id, Image.storage_key, Image.attempts).where(Image.id.in_(claimed))
            ).all()
            job_options = (
                s.scalar(select(Job.options).where(Job.id == batch.job_id)) if rows else {}
            )
    except OperationalError as exc:
        raise TransientError(
            f"database unavailable while claiming: {exc}", batch.image_ids
        ) from exc
    return Claimed(
        image_ids=claimed,
        keys={image_id: key for image_id, key, _ in rows},
        attempts={image_id: n for image_id, _, n in rows},
        job_options=dict(job_options or {}),
    )


def _fetch_and_decode(
    res: WorkerResources, batch: Batch, claimed: Claimed, loaded: LoadedModel
) -> Fetched:
    """Step 3: fetch, decode and preprocess concurrently; each image's trouble stays its own.
    In a pipelined worker this overlaps with another batch's model step."""
    captioner = loaded.captioner
    device_jpeg = batch.settings.gpu_decode and captioner.device.type == "cuda"
    preprocess = split_preprocess(captioner.preprocess)  # to-tensor and normalise per batch
    futures = {
        image_id: res.fetch_pool.submit(
            prepare_image,
            res.store,
            claimed.keys[image_id],
            batch.settings,
            preprocess,
            device_jpeg,
        )
        for image_id in claimed.image_ids
    }
    return Fetched(
        prepared={image_id: future.result() for image_id, future in futures.items()},
        device_jpeg=device_jpeg,
    )


def _run_on_device(
    res: WorkerResources, batch: Batch, claimed: Claimed, fetched: Fetched, loaded: LoadedModel
) -> ModelRun:
    """Device work and the model, once for the whole batch; the caller holds the model lock."""
    captioner = loaded.captioner
    prepared = fetched.prepared
    if fetched.device_jpeg:
        prepared = decode_jpegs_on_device(prepared, captioner, batch.settings)
    good = [i for i in claimed.image_ids if prepared[i].pixels is not None]
    if not good:
        return ModelRun(prepared=prepared)
    started = time.perf_counter()
    try:
        items = [prepared[i].pixels for i in good]
        tensors = batch_pixels(items, split_preprocess(captioner.preprocess))
        pixels = device_batch(tensors, captioner.device)
        hyps = captioner.caption_tensors(pixels, res.runtime.decode_options(claimed.job_options))
    except (RuntimeError, ValueError) as exc:  # e.g. CUDA out of memory
        return ModelRun(prepared=prepared, error=exc)
    metrics.MODEL_SECONDS.observe(time.perf_counter() - started)
    return ModelRun(prepared=prepared, candidates=dict(zip(good, hyps, strict=True)))


def _caption(
    res: WorkerResources, batch: Batch, claimed: Claimed, fetched: Fetched, loaded: LoadedModel
) -> ModelRun:
    """Step 4: the device step under the model lock, one batch at a time. A model error gives
    the claimed images back and raises TransientError."""
    with res.runtime.model_lock:
        run = _run_on_device(res, batch, claimed, fetched, loaded)
    if run.error is not None:
        give_back(res, claimed.image_ids, batch.worker_id)
        raise TransientError(
            f"model failed on the batch: {run.error}", batch.image_ids
        ) from run.error
    return run


def _finite(value: Any) -> float | None:
    """A number for the candidates JSON, or None where there is none (JSON has no inf/NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _confidence(candidate: Any) -> float:
    """The candidate's confidence in [0, 1]; 0 (reviewed first) when the captioner gave none."""
    value = _finite(getattr(candidate, "confidence", None))
    return 0.0 if value is None else min(1.0, max(0.0, value))


def candidate_json(candidate: Any) -> dict[str, Any]:
    """One alternative as `Caption.candidates` keeps it: its text, its mean token log-probability
    ("score", as the decoder ranks alternatives), its confidence in [0, 1] and the decoder's
    signals behind it."""
    return {
        "text": candidate.text,
        "score": float(candidate.score),
        "confidence": _confidence(candidate),
        "min_token_logprob": _finite(getattr(candidate, "min_token_logprob", None)),
        "min_token_margin": _finite(getattr(candidate, "min_token_margin", None)),
        "tokens": getattr(candidate, "tokens", None),
    }


def _caption_row(image_id: int, prepared: Prepared, candidates: list) -> images.CaptionRow:
    """The caption of one image: the best candidate, scored by its confidence in [0, 1] (the
    review queue's key: least confident first), with every alternative kept."""
    best = candidates[0]
    return images.CaptionRow(
        image_id=image_id,
        text=best.text,
        score=_confidence(best),
        candidates=[candidate_json(c) for c in candidates],
        width=prepared.width,
        height=prepared.height,
    )


def _plan_save(claimed: Claimed, held: set[int], run: ModelRun, settings: Settings) -> SavePlan:
    """What to write for each image this worker still holds: its caption, its failure, or
    (a transient storage error under the attempt cap) give it back for a retry."""
    captions: list[images.CaptionRow] = []
    failures: list[Failure] = []
    give_back_ids: list[int] = []
    for image_id in (i for i in claimed.image_ids if i in held):
        p = run.prepared[image_id]
        candidates = run.candidates.get(image_id)
        if candidates:
            captions.append(_caption_row(image_id, p, candidates))
        elif p.transient is None:
            reason = p.reason or NO_CAPTION_REASON
            failures.append(Failure(image_id, reason, p.reason_kind or "no_caption"))
        elif claimed.attempts[image_id] >= settings.max_attempts:
            attempts = claimed.attempts[image_id]
            reason = STORAGE_GAVE_UP_REASON.format(attempts=attempts, error=p.transient)
            failures.append(Failure(image_id, reason, "storage"))
        else:
            give_back_ids.append(image_id)
    return SavePlan(captions=captions, failures=failures, give_back=give_back_ids)


def _fail_images(session, failures: list[Failure]) -> dict[int, str]:
    """Mark each image failed (a caption another worker saved wins); returns those failed."""
    failed: dict[int, str] = {}
    for f in failures:
        if images.fail_image(session, f.image_id, f.reason):
            failed[f.image_id] = f.reason
            metrics.IMAGES_FAILED.labels(reason=f.metric_reason).inc()
    return failed


def _finish_if_complete(session, job_id: int) -> JobsFinished:
    """Finish the job if all its images are done, recording the webhook events of every job
    finished now."""
    if not jobs.job_progress(session, job_id).is_complete:
        return JobsFinished()
    finished = jobs.finish_completed_jobs(session)
    return JobsFinished(job_ids=finished, deliveries=outbox.record_job_events(session, finished))


def _save(
    res: WorkerResources, batch: Batch, claimed: Claimed, run: ModelRun, version_id: int
) -> Saved:
    """Step 5, in one transaction, fenced by the lease: only images this worker still holds
    are written."""
    settings = batch.settings
    try:
        with session_scope(res.sessions) as s:
            held = set(
                images.extend_lease(
                    s,
                    claimed.image_ids,
                    worker_id=batch.worker_id,
                    lease_seconds=settings.lease_seconds,
                )
            )
            plan = _plan_save(claimed, held, run, settings)
            failed = _fail_images(s, plan.failures)
            images.complete_images(s, version_id, plan.captions)  # one upsert + one update
            retry = (
                images.requeue_images(s, plan.give_back, worker_id=batch.worker_id)
                if plan.give_back
                else []
            )
            finished = _finish_if_complete(s, batch.job_id)
    except OperationalError as exc:
        raise TransientError(f"database unavailable while saving: {exc}", batch.image_ids) from exc
    return Saved(
        captioned=[row.image_id for row in plan.captions],
        failed=failed,
        retry=retry,
        lost=[i for i in claimed.image_ids if i not in held],
        finished=finished,
    )


def give_back(res: WorkerResources, image_ids: list[int], worker_id: str) -> None:
    """Release this worker's claims (best effort: if the database is down, leases expire)."""
    try:
        with session_scope(res.sessions) as s:
            images.requeue_images(s, image_ids, worker_id=worker_id)
    except OperationalError:
        log.warning("could not give back %d images; their leases will expire", len(image_ids))


class LeaseKeeper:
    """Renews this worker's lease on its claimed images every third of the lease while the
    batch is fetched and captioned, so a batch slower than the lease (a busy machine, a big
    model) keeps its images as long as its worker lives; a killed worker stops renewing and
    the sweeper hands its images out once the lease runs out. Best effort: a renewal the
    database refuses is logged and tried again at the next tick (the save is fenced by the
    lease either way)."""

    def __init__(self, res: WorkerResources, batch: Batch, image_ids: list[int]) -> None:
        self.res, self.batch, self.image_ids = res, batch, image_ids
        self.every = max(0.5, batch.settings.lease_seconds / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with session_scope(self.res.sessions) as s:
                    images.extend_lease(
                        s,
                        self.image_ids,
                        worker_id=self.batch.worker_id,
                        lease_seconds=self.batch.settings.lease_seconds,
                    )
            except OperationalError as exc:
                log.warning("could not renew the lease on %d images: %s", len(self.image_ids), exc)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def run_caption_batch(
    job_id: int, image_ids: list[int], *, worker_id: str, settings: Settings, retrying: bool
) -> BatchOutcome:
    """One batch, start to end (see the module docstring). Raises TransientError to retry.

    Safe to run from several threads at once (a pipelined worker): each call has its own
    sessions; the model is held through `runtime.use` and run under `runtime.model_lock`.
    """
    res = resources(settings)
    batch = Batch(
        job_id=job_id,
        image_ids=sorted({int(i) for i in image_ids}),
        worker_id=worker_id,
        settings=settings,
        retrying=retrying,
    )
    wanted = _wanted_model(res, batch)
    # Held until the model step is over: a switch to another version waits for it.
    with res.runtime.use(wanted.model, wanted.as_of) as loaded:
        claimed = _claim(res, batch)
        if not claimed.image_ids:
            return BatchOutcome(model_version_id=loaded.version_id)
        with LeaseKeeper(res, batch, claimed.image_ids):
            fetched = _fetch_and_decode(res, batch, claimed, loaded)
            run = _caption(res, batch, claimed, fetched, loaded)
    saved = _save(res, batch, claimed, run, loaded.version_id)
    publish_committed_deliveries(saved.finished.deliveries, settings)
    metrics.IMAGES_CAPTIONED.inc(len(saved.captioned))
    return BatchOutcome(
        claimed=claimed.image_ids,
        captioned=saved.captioned,
        failed=saved.failed,
        retry=saved.retry,
        lost=saved.lost,
        model_version_id=loaded.version_id,
        finished_jobs=saved.finished.job_ids,
        deliveries=saved.finished.deliveries,
    )


# --- the task: retries and the log line of each way out ------------------------------------


@dataclass(frozen=True)
class _Attempt:
    """One delivery of a `caption_batch` message: which retry it is, under which settings."""

    job_id: int
    image_ids: list[int]
    retries: int
    settings: Settings


def _retry_or_give_up(
    task, attempt: _Attempt, exc: TransientError | ModelUnavailable, retry_ids: list[int]
) -> dict[str, Any]:
    """A transient failure: retry `retry_ids` after a backoff (raises Celery's Retry), or give
    up after `Settings.task_max_retries`, leaving the images to the sweeper."""
    max_retries = attempt.settings.task_max_retries
    if attempt.retries >= max_retries:
        metrics.BATCHES.labels(outcome="gave_up").inc()
        log.error(
            "gave up: job %s, %d images after %d retries (%s); the sweeper re-publishes them",
            attempt.job_id,
            len(retry_ids),
            attempt.retries,
            exc,
        )
        return {"outcome": "gave_up", "error": str(exc)}
    countdown = backoff(attempt.retries)
    metrics.BATCHES.labels(outcome="retry").inc()
    log.warning(
        "retrying: job %s, %d images in %.1fs (retry %d of %d): %s",
        attempt.job_id,
        len(retry_ids),
        countdown,
        attempt.retries + 1,
        max_retries,
        exc,
    )
    raise task.retry(args=(attempt.job_id, retry_ids), countdown=countdown, exc=exc) from None


def _retry_on_database_error(task, attempt: _Attempt, exc: Exception) -> None:
    """An unexpected error: retried if the database went away (raises Celery's Retry),
    otherwise logged; the caller re-raises it and the leases expire for the sweeper."""
    if is_transient_db_error(exc) and attempt.retries < attempt.settings.task_max_retries:
        metrics.BATCHES.labels(outcome="retry").inc()
        log.warning("retrying: job %s, database error: %s", attempt.job_id, exc)
        raise task.retry(countdown=backoff(attempt.retries), exc=exc) from None
    metrics.BATCHES.labels(outcome="error").inc()
    log.exception(
        "error: job %s batch failed; leases expire and the sweeper retries", attempt.job_id
    )


def _report(task, attempt: _Attempt, out: BatchOutcome, elapsed: float) -> dict[str, Any]:
    """Log and count a batch that ran to the end; send a retry message for images given back
    after transient storage errors."""
    job_id = attempt.job_id
    if not out.claimed:
        metrics.BATCHES.labels(outcome="nothing_to_claim").inc()
        log.info(
            "nothing to claim: job %s, %d ids already taken or done", job_id, len(attempt.image_ids)
        )
        return {"outcome": "nothing_to_claim"}
    if out.lost:
        log.warning(
            "lost lease: job %s, %d images now held by another worker", job_id, len(out.lost)
        )
    if out.retry:
        # The images are back in the queue (SQL); a new message for them, after a pause.
        log.warning(
            "retrying: job %s, %d images had transient storage errors", job_id, len(out.retry)
        )
        if attempt.retries < attempt.settings.task_max_retries:
            task.retry(args=(job_id, out.retry), countdown=backoff(attempt.retries), throw=False)
    metrics.BATCHES.labels(outcome="done").inc()
    log.info(
        "batch done: job %s, %d claimed, %d captioned, %d failed, %d retried, %d lost, "
        "model version %s, %.2fs",
        job_id,
        len(out.claimed),
        len(out.captioned),
        len(out.failed),
        len(out.retry),
        len(out.lost),
        out.model_version_id,
        elapsed,
    )
    return {
        "outcome": "done",
        "captioned": len(out.captioned),
        "failed": len(out.failed),
        "retried": len(out.retry),
        "lost": len(out.lost),
    }


@shared_task(name=TASK_CAPTION_BATCH, bind=True, max_retries=None, acks_late=True)
def caption_batch(self, job_id: int, image_ids: list[int]) -> dict[str, Any]:
    """Caption one chunk of a job's images. Messages carry ids only; running twice is a no-op."""
    attempt = _Attempt(job_id, list(image_ids), self.request.retries or 0, get_settings())
    owner = worker_id(self)
    started = time.perf_counter()
    try:
        out = run_caption_batch(
            job_id,
            image_ids,
            worker_id=owner,
            settings=attempt.settings,
            retrying=attempt.retries > 0,
        )
    except TransientError as exc:
        return _retry_or_give_up(self, attempt, exc, exc.image_ids)
    except ModelUnavailable as exc:
        return _retry_or_give_up(self, attempt, exc, attempt.image_ids)
    except SoftTimeLimitExceeded:
        give_back(resources(attempt.settings), attempt.image_ids, owner)
        metrics.BATCHES.labels(outcome="time_limit").inc()
        log.error("time limit: job %s, gave %d images back", job_id, len(attempt.image_ids))
        raise
    except Exception as exc:
        _retry_on_database_error(self, attempt, exc)
        raise
    elapsed = time.perf_counter() - started
    metrics.BATCH_SECONDS.observe(elapsed)
    return _report(self, attempt, out, elapsed)
