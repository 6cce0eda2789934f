"""Celery tasks: `caption_batch` (the caption path), `sweep` (the safety net) and the maintenance
tasks `enumerate_prefix`, `fetch_urls` (submissions too big for a request) and `deliver_webhook`.

`caption_batch(job_id, image_ids)`, step by step; each step's way out is named and logged:

1. resolve the model version that should caption now (swap models between batches if a new one
   was promoted) -- `model unavailable` if there is none: nothing is claimed, the task retries;
2. claim the images (queued -> running, with a lease) -- `nothing to claim` if another worker or
   an earlier delivery of this message already took or finished them (a duplicate is a no-op);
3. fetch their bytes from the object store on a thread pool, decode them safely and preprocess;
   a missing or undecodable image is failed alone with its reason; a transient storage error
   gives that image back for a retry;
4. run the model once on the whole batch (on CUDA its CPU-decoded pixels go through one pinned
   buffer and a non-blocking copy) -- a model error gives the batch back for a retry;
5. in one transaction: keep only images whose lease this worker still holds (`lost lease`
   otherwise: the sweeper handed them to someone else), upsert captions (never over a reviewed
   one), mark images captioned / failed, finish the job if it is done -- `batch done`;
6. transient errors (database, storage, model) retry with exponential backoff up to
   `Settings.task_max_retries` -- `gave up` after that, leaving the images to the sweeper; every
   claim counts an attempt, and images past `Settings.max_attempts` are failed, so nothing
   loops forever.

A pipelined worker (`CAPTIONER_WORKER_PIPELINE_DEPTH`, default 2 on CUDA: Celery's `threads`
pool, prefetching one message per slot) runs that many batches at once in one process, sharing
one model: while one batch is in step 4, the next one claims, fetches and decodes (step 3)
and the previous one saves (step 5). What they share is thread-safe: `resources()` is built
once under a lock; every step opens its own SQLAlchemy session (the engine's pool is
thread-safe); the fetch pool, the object store clients and the prometheus metrics are
thread-safe. Steps 2 to 4 hold the model through `ModelRuntime.use` (a switch to a newly
promoted version waits until no batch holds the old one, and batches wait while a model
loads), and step 4 -- every device call: the nvJPEG decode, the pinned host-to-device copy,
the model -- runs under `ModelRuntime.model_lock`, one batch at a time. A batch is still one
message with its own leases, so retries, kill -9 recovery and duplicates work as before.

`sweep()` re-publishes images whose lease expired or that sat queued too long (their message was
lost: Redis flushed, worker killed), fails images past the attempt cap, finishes jobs whose
images are all done, and re-sends webhook deliveries that are overdue (their message was lost).
SQL is the source of truth, so sweeping is always safe to repeat.

Whoever finishes jobs (a batch, the sweeper, an ingest step) records their webhook events in
the same transaction (`webhooks.record_job_events`, an outbox) and publishes the deliveries
after the commit; a delivery whose message is lost is re-sent by the sweeper.

torch is imported only when a batch first needs the model (`workers.model_runtime`).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError

from captioner import webhooks
from captioner.intake import submit
from captioner.intake.decode import ImageRejected, decode_image, open_image
from captioner.settings import Settings, get_settings
from captioner.state import images, jobs
from captioner.state.db import make_engine, make_sessionmaker, session_scope
from captioner.state.models import Image, Job, utcnow
from captioner.storage import InvalidKey, ObjectNotFound, open_store
from captioner.tasks import (
    TASK_CAPTION_BATCH,
    TASK_DELIVER_WEBHOOK,
    TASK_ENUMERATE_PREFIX,
    TASK_FETCH_URLS,
    TASK_SWEEP,
    publish_caption_batches,
    publish_deliveries,
)
from workers import metrics
from workers.model_runtime import ModelRuntime, ModelUnavailable

log = logging.getLogger("captioner.worker")

NOT_FOUND_REASON = "image file not found in storage"
STORAGE_GAVE_UP_REASON = "could not read the image from storage after {attempts} attempts: {error}"
MODEL_REJECTED_REASON = "could not prepare the image for the model: {error}"


class TransientError(RuntimeError):
    """A failure worth retrying (database, storage or model); `image_ids` to retry."""

    def __init__(self, message: str, image_ids: list[int]) -> None:
        super().__init__(message)
        self.image_ids = image_ids


# --- per-process resources ------------------------------------------------------------------


class _Resources:
    """Engine, session factory, object store and model runtime of one worker process, shared
    by every batch it runs at once (each is thread-safe; see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.store = open_store(settings.storage_url, settings)
        self.runtime = ModelRuntime(settings)
        self.fetch_pool = ThreadPoolExecutor(
            max_workers=settings.fetch_threads, thread_name_prefix="fetch"
        )


_resources_lock = threading.Lock()
_resources_by_key: dict[tuple[str, str], _Resources] = {}


def resources(settings: Settings | None = None) -> _Resources:
    settings = settings or get_settings()
    key = (settings.database_url, settings.storage_url)
    with _resources_lock:
        res = _resources_by_key.get(key)
        if res is None:
            res = _resources_by_key[key] = _Resources(settings)
        return res


def _worker_id(task) -> str:
    hostname = getattr(task.request, "hostname", None) or socket.gethostname()
    return f"{hostname}/{os.getpid()}"


def _backoff(retries: int) -> float:
    """Seconds before retry number `retries + 1`: 1, 2, 4, ... up to 60, with jitter."""
    return min(60.0, 2.0**retries) * random.uniform(0.75, 1.25)


def _is_transient_db_error(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


# --- caption_batch --------------------------------------------------------------------------


@dataclass
class _Prepared:
    """What came of fetching and decoding one image."""

    pixels: Any = None  # a preprocessed tensor (3, H, W)
    jpeg: bytes | None = None  # bytes left for the batched device decoder
    width: int | None = None
    height: int | None = None
    reason: str | None = None  # permanent failure, for people
    reason_kind: str = ""  # metrics label
    transient: str | None = None  # transient failure: retry


@dataclass
class BatchOutcome:
    claimed: list[int] = field(default_factory=list)
    captioned: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    retry: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    model_version_id: int | None = None
    finished_jobs: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)  # webhook deliveries recorded


def _prepare(
    store, key: str, settings: Settings, preprocess, device_jpeg: bool = False
) -> _Prepared:
    try:
        data = store.get(key)
    except (ObjectNotFound, InvalidKey) as exc:
        kind = "not_found" if isinstance(exc, ObjectNotFound) else "invalid_key"
        reason = NOT_FOUND_REASON if kind == "not_found" else f"invalid storage key: {exc}"
        return _Prepared(reason=reason, reason_kind=kind)
    except Exception as exc:  # network, throttling, disk: retried, never swallowed
        return _Prepared(transient=f"{type(exc).__name__}: {exc}")
    header = _device_decodable(data, settings) if device_jpeg else None
    if header is not None:
        return _Prepared(jpeg=data, width=header.width, height=header.height)
    return _decode_on_cpu(data, settings, preprocess)


def _device_decodable(data: bytes, settings: Settings):
    """The header of a plain RGB or greyscale JPEG, within limits and not rotated by EXIF
    (nvJPEG gives the same pixels as the CPU path); None sends it to the CPU path."""
    try:
        header = open_image(
            data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
        )
    except ImageRejected:
        return None  # the CPU path names the reason
    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
        return None
    return header if header.getexif().get(0x0112, 1) == 1 else None


def _decode_on_cpu(data: bytes, settings: Settings, preprocess) -> _Prepared:
    try:
        image = decode_image(
            data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
        )
    except ImageRejected as exc:
        return _Prepared(reason=exc.reason, reason_kind=type(exc).__name__)
    try:
        pixels = preprocess(image)
    except (OSError, ValueError, RuntimeError) as exc:
        return _Prepared(reason=MODEL_REJECTED_REASON.format(error=exc), reason_kind="preprocess")
    return _Prepared(pixels=pixels, width=image.width, height=image.height)


def _decode_jpegs_on_device(prepared: dict[int, _Prepared], captioner, settings: Settings) -> None:
    """Decode the batch's device-decodable JPEGs in one nvJPEG call; fall back per image."""
    from core_model.tensor_preprocess import decode_jpegs

    ids = [i for i, p in prepared.items() if p.jpeg is not None]
    if not ids:
        return
    decoded = decode_jpegs([prepared[i].jpeg for i in ids], captioner.device)
    ok = [(i, t) for i, t in zip(ids, decoded, strict=True) if t is not None]
    if ok:
        pixels = captioner.tensor_preprocessor([t for _, t in ok])
        for (i, _), px in zip(ok, pixels, strict=True):
            prepared[i].pixels, prepared[i].jpeg = px, None
    for i in ids:
        if prepared[i].jpeg is not None:  # nvJPEG refused it: the CPU path decides
            p = _decode_on_cpu(prepared[i].jpeg, settings, captioner.preprocess)
            prepared[i] = p


def _claim_prepare_and_caption(
    res: _Resources,
    loaded,
    job_id: int,
    ids: list[int],
    out: BatchOutcome,
    *,
    worker_id: str,
    settings: Settings,
    retrying: bool,
) -> tuple[dict[int, _Prepared], dict[int, int], dict[int, list]] | None:
    """Steps 2 to 4 of a batch with the model `loaded`: (prepared, attempts, results), or None
    when there was nothing to claim."""
    # 2. Claim. On a retry, first give back what this worker still holds from the last try.
    try:
        with session_scope(res.sessions) as s:
            if retrying:
                images.requeue_images(s, ids, worker_id=worker_id)
            out.claimed = images.claim_images(
                s,
                worker_id=worker_id,
                lease_seconds=settings.lease_seconds,
                image_ids=ids,
                job_id=job_id,
                max_attempts=settings.max_attempts,
            )
            rows = s.execute(
                select(Image.id, Image.storage_key, Image.attempts).where(
                    Image.id.in_(out.claimed or [-1])
                )
            ).all()
    except OperationalError as exc:
        raise TransientError(f"database unavailable while claiming: {exc}", ids) from exc
    if not out.claimed:
        return None
    keys = {image_id: key for image_id, key, _ in rows}
    attempts = {image_id: n for image_id, _, n in rows}

    # 3. Fetch, decode and preprocess concurrently; each image's trouble stays its own. In a
    # pipelined worker this overlaps with another batch's model step.
    preprocess = loaded.captioner.preprocess
    device_jpeg = settings.gpu_decode and loaded.captioner.device.type == "cuda"
    futures = {
        image_id: res.fetch_pool.submit(
            _prepare, res.store, keys[image_id], settings, preprocess, device_jpeg
        )
        for image_id in out.claimed
    }
    prepared = {image_id: future.result() for image_id, future in futures.items()}

    # 4. Device work and the model, once for the whole batch, one batch at a time.
    results: dict[int, list] = {}
    failure: Exception | None = None
    with res.runtime.model_lock:
        if device_jpeg:
            _decode_jpegs_on_device(prepared, loaded.captioner, settings)
        good = [i for i in out.claimed if prepared[i].pixels is not None]
        if good:
            started = time.perf_counter()
            try:
                pixels = _device_batch([prepared[i].pixels for i in good], loaded.captioner.device)
                hyps = loaded.captioner.caption_tensors(pixels, res.runtime.decode_options())
            except (RuntimeError, ValueError) as exc:  # e.g. CUDA out of memory
                failure = exc
            else:
                metrics.MODEL_SECONDS.observe(time.perf_counter() - started)
                results = dict(zip(good, hyps, strict=True))
    if failure is not None:
        _give_back(res, out.claimed, worker_id)
        raise TransientError(f"model failed on the batch: {failure}", ids) from failure
    return prepared, attempts, results


def _device_batch(tensors: list, device):
    """One (B, 3, H, W) batch of preprocessed pixels on `device`, in the order given.

    On CUDA the CPU-decoded tensors are stacked straight into one pinned (page-locked) buffer
    and sent with one `non_blocking` copy (a copy from pageable memory is synchronous), while
    those nvJPEG decoded are already there. On the CPU: one `torch.stack`, as always.
    """
    import torch

    if device.type != "cuda":
        return torch.stack([t.to(device, non_blocking=True) for t in tensors])
    on_host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    if not on_host:
        return torch.stack(tensors)
    first = tensors[on_host[0]]
    staging = torch.empty((len(on_host), *first.shape), dtype=first.dtype, pin_memory=True)
    torch.stack([tensors[i] for i in on_host], out=staging)
    # The caching host allocator keeps `staging` alive until the copy is done.
    moved = staging.to(device, non_blocking=True)
    if len(on_host) == len(tensors):
        return moved
    merged = list(tensors)
    for row, i in enumerate(on_host):
        merged[i] = moved[row]
    return torch.stack(merged)


def run_caption_batch(
    job_id: int, image_ids: list[int], *, worker_id: str, settings: Settings, retrying: bool
) -> BatchOutcome:
    """One batch, start to end (see the module docstring). Raises TransientError to retry.

    Safe to run from several threads at once (a pipelined worker): each call has its own
    sessions; the model is held through `runtime.use` and run under `runtime.model_lock`.
    """
    res = resources(settings)
    out = BatchOutcome()
    ids = sorted({int(i) for i in image_ids})

    # 1. The model that should caption now (a new promotion is picked up here).
    as_of = time.monotonic()
    try:
        with session_scope(res.sessions) as s:
            wanted = res.runtime.wanted(s)
    except OperationalError as exc:
        raise TransientError(f"database unavailable resolving the model: {exc}", ids) from exc
    # Held until the model step is over: a switch to another version waits for it.
    with res.runtime.use(wanted, as_of) as loaded:
        out.model_version_id = loaded.version_id
        claimed = _claim_prepare_and_caption(
            res,
            loaded,
            job_id,
            ids,
            out,
            worker_id=worker_id,
            settings=settings,
            retrying=retrying,
        )
    if claimed is None:
        return out
    prepared, attempts, results = claimed

    # 5. Save, fenced by the lease: only images this worker still holds are written.
    try:
        with session_scope(res.sessions) as s:
            held = set(
                images.extend_lease(
                    s, out.claimed, worker_id=worker_id, lease_seconds=settings.lease_seconds
                )
            )
            out.lost = [i for i in out.claimed if i not in held]
            give_back = []
            rows: list[images.CaptionRow] = []
            for image_id in out.claimed:
                if image_id not in held:
                    continue
                p = prepared[image_id]
                if image_id in results and results[image_id]:
                    cands = results[image_id]
                    rows.append(
                        images.CaptionRow(
                            image_id=image_id,
                            text=cands[0].text,
                            score=float(cands[0].score),
                            candidates=[{"text": c.text, "score": float(c.score)} for c in cands],
                            width=p.width,
                            height=p.height,
                        )
                    )
                    out.captioned.append(image_id)
                elif p.transient is not None:
                    if attempts[image_id] >= settings.max_attempts:
                        reason = STORAGE_GAVE_UP_REASON.format(
                            attempts=attempts[image_id], error=p.transient
                        )
                        images.fail_image(s, image_id, reason)
                        out.failed[image_id] = reason
                        metrics.IMAGES_FAILED.labels(reason="storage").inc()
                    else:
                        give_back.append(image_id)
                else:
                    reason = p.reason or "the model produced no caption"
                    if images.fail_image(s, image_id, reason):
                        out.failed[image_id] = reason
                        metrics.IMAGES_FAILED.labels(reason=p.reason_kind or "no_caption").inc()
            images.complete_images(
                s, out.model_version_id, rows
            )  # one upsert + one update per batch
            if give_back:
                out.retry = images.requeue_images(s, give_back, worker_id=worker_id)
            if jobs.job_progress(s, job_id).is_complete:
                out.finished_jobs = jobs.finish_completed_jobs(s)
                out.deliveries = webhooks.record_job_events(s, out.finished_jobs)
    except OperationalError as exc:
        raise TransientError(f"database unavailable while saving: {exc}", ids) from exc
    _publish_deliveries(out.deliveries, settings)
    metrics.IMAGES_CAPTIONED.inc(len(out.captioned))
    return out


def _publish_deliveries(delivery_ids: list[int], settings: Settings) -> None:
    """Send the webhook deliveries just committed. If the broker is down they stay pending in
    SQL and the sweeper re-sends them once they are overdue."""
    if not delivery_ids:
        return
    try:
        publish_deliveries(delivery_ids, settings=settings)
    except (OSError, KombuOperationalError) as exc:
        log.warning(
            "could not publish %d webhook deliveries (the sweeper re-sends them): %s",
            len(delivery_ids),
            exc,
        )


def _give_back(res: _Resources, image_ids: list[int], worker_id: str) -> None:
    """Release this worker's claims (best effort: if the database is down, leases expire)."""
    try:
        with session_scope(res.sessions) as s:
            images.requeue_images(s, image_ids, worker_id=worker_id)
    except OperationalError:
        log.warning("could not give back %d images; their leases will expire", len(image_ids))


@shared_task(name=TASK_CAPTION_BATCH, bind=True, max_retries=None, acks_late=True)
def caption_batch(self, job_id: int, image_ids: list[int]) -> dict[str, Any]:
    """Caption one chunk of a job's images. Messages carry ids only; running twice is a no-op."""
    settings = get_settings()
    worker_id = _worker_id(self)
    retries = self.request.retries or 0
    started = time.perf_counter()
    try:
        out = run_caption_batch(
            job_id, image_ids, worker_id=worker_id, settings=settings, retrying=retries > 0
        )
    except (TransientError, ModelUnavailable) as exc:
        retry_ids = exc.image_ids if isinstance(exc, TransientError) else list(image_ids)
        if retries >= settings.task_max_retries:
            metrics.BATCHES.labels(outcome="gave_up").inc()
            log.error(
                "gave up: job %s, %d images after %d retries (%s); the sweeper re-publishes them",
                job_id,
                len(retry_ids),
                retries,
                exc,
            )
            return {"outcome": "gave_up", "error": str(exc)}
        countdown = _backoff(retries)
        metrics.BATCHES.labels(outcome="retry").inc()
        log.warning(
            "retrying: job %s, %d images in %.1fs (retry %d of %d): %s",
            job_id,
            len(retry_ids),
            countdown,
            retries + 1,
            settings.task_max_retries,
            exc,
        )
        raise self.retry(args=(job_id, retry_ids), countdown=countdown, exc=exc) from None
    except SoftTimeLimitExceeded:
        _give_back(resources(settings), list(image_ids), worker_id)
        metrics.BATCHES.labels(outcome="time_limit").inc()
        log.error("time limit: job %s, gave %d images back", job_id, len(image_ids))
        raise
    except Exception as exc:
        if _is_transient_db_error(exc) and retries < settings.task_max_retries:
            metrics.BATCHES.labels(outcome="retry").inc()
            log.warning("retrying: job %s, database error: %s", job_id, exc)
            raise self.retry(countdown=_backoff(retries), exc=exc) from None
        metrics.BATCHES.labels(outcome="error").inc()
        log.exception("error: job %s batch failed; leases expire and the sweeper retries", job_id)
        raise
    elapsed = time.perf_counter() - started
    metrics.BATCH_SECONDS.observe(elapsed)
    if not out.claimed:
        metrics.BATCHES.labels(outcome="nothing_to_claim").inc()
        log.info("nothing to claim: job %s, %d ids already taken or done", job_id, len(image_ids))
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
        if retries < settings.task_max_retries:
            self.retry(args=(job_id, out.retry), countdown=_backoff(retries), throw=False)
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


# --- sweep ----------------------------------------------------------------------------------


def run_sweep(settings: Settings | None = None) -> dict[str, int]:
    """One sweep (see the module docstring); publishes only after its transaction commits."""
    settings = settings or get_settings()
    res = resources(settings)
    with session_scope(res.sessions) as s:
        expired = images.release_expired_leases(s, max_attempts=settings.max_attempts)
        capped = images.fail_queued_past_cap(s, settings.max_attempts)
        stale = images.requeue_stale_queued(s, older_than_seconds=settings.queued_timeout_seconds)
        groups = jobs.group_by_job(s, sorted(set(expired) | set(stale)))
        priorities = dict(
            s.execute(select(Job.id, Job.priority).where(Job.id.in_(list(groups) or [-1]))).all()
        )
        finished = jobs.finish_completed_jobs(s)
        recorded = webhooks.record_job_events(s, finished)
        # Deliveries whose attempt is overdue by a grace period (so one whose retry message is
        # merely waiting out its countdown is not sent twice): their message was lost.
        grace = timedelta(seconds=max(settings.sweep_interval_seconds, 30))
        overdue = webhooks.due_deliveries(s, now=utcnow() - grace)
    published = 0
    for job_id, ids in groups.items():
        published += publish_caption_batches(
            job_id, ids, interactive=priorities.get(job_id, 0) > 0, settings=settings
        )
    deliveries = sorted(set(recorded) | set(overdue))
    _publish_deliveries(deliveries, settings)
    summary = {
        "expired": len(expired),
        "stale": len(stale),
        "failed_past_cap": len(capped),
        "messages": published,
        "jobs_finished": len(finished),
        "webhooks_recorded": len(recorded),
        "webhooks_resent": len(set(overdue) - set(recorded)),
    }
    if any(summary.values()):
        log.info("sweep: %s", summary)
    return summary


@shared_task(name=TASK_SWEEP)
def sweep() -> dict[str, int]:
    return run_sweep()


# --- maintenance: background ingestion and webhook deliveries --------------------------------


def _run_ingest(task, job_id: int, what: str, done: str, run) -> dict[str, Any]:
    """One ingest step (`run(job_id, session_factory=, store=, settings=, publish_deliveries=)`),
    retried on transient database errors; every other failure is logged and raised. A job the
    step finishes has its webhook events recorded; their deliveries are published here."""
    settings = get_settings()
    res = resources(settings)
    retries = task.request.retries or 0
    try:
        n = run(
            job_id,
            session_factory=res.sessions,
            store=res.store,
            settings=settings,
            publish_deliveries=lambda ids: _publish_deliveries(ids, settings),
        )
    except Exception as exc:
        if _is_transient_db_error(exc) and retries < settings.task_max_retries:
            log.warning("retrying: %s of job %s, database error: %s", what, job_id, exc)
            raise task.retry(countdown=_backoff(retries), exc=exc) from None
        log.exception("error: %s of job %s failed", what, job_id)
        raise
    log.info("%s: job %s, %d images queued", done, job_id, n)
    return {"outcome": "done", "images": n}


@shared_task(name=TASK_ENUMERATE_PREFIX, bind=True, max_retries=None, acks_late=True)
def enumerate_prefix(self, job_id: int) -> dict[str, Any]:
    """List a job's S3 prefix page by page, queuing and publishing each page (idempotent:
    keys already in the job are not added twice)."""
    return _run_ingest(
        self, job_id, "enumerating the prefix", "prefix enumerated", submit.run_enumerate_prefix
    )


@shared_task(name=TASK_FETCH_URLS, bind=True, max_retries=None, acks_late=True)
def fetch_urls(self, job_id: int) -> dict[str, Any]:
    """Fetch a job's URLs into the store, queuing and publishing them in chunks (idempotent:
    URLs already in the job are skipped)."""
    return _run_ingest(self, job_id, "fetching the URLs", "URLs fetched", submit.run_fetch_urls)


def run_deliver_webhook(delivery_id: int, settings: Settings | None = None) -> webhooks.Attempt:
    """One delivery attempt, committed."""
    settings = settings or get_settings()
    res = resources(settings)
    with session_scope(res.sessions) as s:
        return webhooks.deliver(s, delivery_id, settings=settings)


@shared_task(name=TASK_DELIVER_WEBHOOK, bind=True, max_retries=None, acks_late=True)
def deliver_webhook(self, delivery_id: int) -> dict[str, Any]:
    """POST one signed webhook event; a failed attempt retries after the delivery's backoff,
    until `Settings.webhook_max_attempts` (counted in SQL, so a re-sent message changes nothing)."""
    attempt = run_deliver_webhook(delivery_id)
    log.info(
        "webhook delivery %s: %s%s",
        delivery_id,
        attempt.status.value,
        f" ({attempt.error})" if attempt.error else "",
    )
    if attempt.retry_in_seconds is not None:
        raise self.retry(countdown=attempt.retry_in_seconds) from None
    return {"outcome": attempt.status.value, "error": attempt.error}


# --- worker lifecycle: every exit path named and logged --------------------------------------


@worker_ready.connect
def _on_worker_ready(sender=None, **_kwargs) -> None:
    settings = get_settings()
    port = metrics.start_metrics_server(settings.metrics_port)
    log.info(
        "worker ready: %s pid %d, device %s, batch size %d, metrics %s",
        getattr(sender, "hostname", "?"),
        os.getpid(),
        settings.device,
        settings.batch_size,
        f"on port {port}" if port else "off",
    )


@worker_shutting_down.connect
def _on_worker_shutting_down(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    log.info("worker stopping: signal %s, %s shutdown, exit code %s", sig, how, exitcode)


@worker_shutdown.connect
def _on_worker_shutdown(**_kwargs) -> None:
    log.info("worker stopped: pid %d", os.getpid())
