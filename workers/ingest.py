"""Background ingestion, for submissions too big for a request: `captioner.enumerate_prefix`
(list an S3-style prefix into a job) and `captioner.fetch_urls` (fetch a job's URLs into the
object store). Both queue and publish their images chunk by chunk, and are idempotent: a
redelivered message adds nothing twice.

The task bodies live where an image is born (`captioner.intake.prefixes`,
`captioner.intake.urls`); here they get the process's resources, a retry on transient database
errors, and the publishing of the webhook deliveries of the jobs they finish. A step that fails
for good (retries exhausted, or any other error: a store error, a bug, the soft time limit) ends
its job with the reason (`jobs.fail_job`: the queued images fail, `job.failed` is recorded) and
the deliveries are published, so no job stays queued forever without its webhook.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import shared_task

from captioner.intake.urls import redact
from captioner.settings import Settings, get_settings
from captioner.state import jobs, outbox
from captioner.state.db import session_scope
from captioner.tasks import TASK_ENUMERATE_PREFIX, TASK_FETCH_URLS, publish_caption_batches
from workers.deliveries import publish_committed_deliveries
from workers.resources import backoff, is_transient_db_error, resources

log = logging.getLogger("captioner.worker")


@dataclass(frozen=True)
class IngestStep:
    """One kind of ingestion, as its log lines name it."""

    doing: str  # "enumerating the prefix": what failed or is retried
    done: str  # "prefix enumerated": the line logged when it is over


ENUMERATE_PREFIX = IngestStep(doing="enumerating the prefix", done="prefix enumerated")
FETCH_URLS = IngestStep(doing="fetching the URLs", done="URLs fetched")


def run_ingest(task, job_id: int, step: IngestStep, body: Callable[..., int]) -> dict[str, Any]:
    """Run one ingest task body (`body(job_id, session_factory=, store=, settings=, publish=,
    publish_deliveries=)`, returning the images queued), retried on transient database errors;
    every other failure is logged and raised. Each chunk's images are published to the caption
    queues; a job the body finishes has its webhook events recorded, and their deliveries are
    published here."""
    settings = get_settings()
    res = resources(settings)
    retries = task.request.retries or 0
    try:
        n = body(
            job_id,
            session_factory=res.sessions,
            store=res.store,
            settings=settings,
            publish=lambda job, ids: publish_caption_batches(job, ids, settings=settings),
            publish_deliveries=lambda ids: publish_committed_deliveries(ids, settings),
        )
    except Exception as exc:
        if is_transient_db_error(exc) and retries < settings.task_max_retries:
            log.warning("retrying: %s of job %s, database error: %s", step.doing, job_id, exc)
            raise task.retry(countdown=backoff(retries), exc=exc) from None
        log.exception("error: %s of job %s failed for good", step.doing, job_id)
        reason = failure_reason(step, exc)
        fail_job(job_id, reason, res.sessions, settings)
        return {"outcome": "failed", "reason": reason}
    log.info("%s: job %s, %d images queued", step.done, job_id, n)
    return {"outcome": "done", "images": n}


# Longest failure reason stored for a job: enough to say what went wrong.
REASON_MAX_CHARS = 500
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def failure_reason(step: IngestStep, exc: BaseException) -> str:
    """What people are told about a step that failed for good: the step, the error's type and
    message, URLs in it redacted to scheme, host and path, at most `REASON_MAX_CHARS`."""
    message = _URL.sub(lambda m: redact(m.group(0)), str(exc)).strip()
    reason = f"{step.doing} failed: {type(exc).__name__}" + (f": {message}" if message else "")
    return reason[:REASON_MAX_CHARS]


def fail_job(job_id: int, reason: str, sessions, settings: Settings) -> None:
    """End the job with `reason` and record its webhook events in one transaction, then publish
    the deliveries. If even that fails (the database is down), it is logged: the job stays
    open, as it would have without this."""
    try:
        with session_scope(sessions) as session:
            ended = jobs.fail_job(session, job_id, reason)
            deliveries = outbox.record_job_events(session, [job_id]) if ended else []
    except Exception:
        log.exception("error: could not mark job %s failed", job_id)
        return
    if ended:
        log.warning("job %s failed: %s", job_id, reason)
    publish_committed_deliveries(deliveries, settings)


@shared_task(name=TASK_ENUMERATE_PREFIX, bind=True, max_retries=None, acks_late=True)
def enumerate_prefix(self, job_id: int) -> dict[str, Any]:
    """List a job's S3 prefix page by page, queuing and publishing each page (idempotent:
    keys already in the job are not added twice)."""
    from captioner.intake.prefixes import run_enumerate_prefix

    return run_ingest(self, job_id, ENUMERATE_PREFIX, run_enumerate_prefix)


@shared_task(name=TASK_FETCH_URLS, bind=True, max_retries=None, acks_late=True)
def fetch_urls(self, job_id: int) -> dict[str, Any]:
    """Fetch a job's URLs into the store, queuing and publishing them in chunks (idempotent:
    URLs already in the job are skipped)."""
    from captioner.intake.fetch import run_fetch_urls

    return run_ingest(self, job_id, FETCH_URLS, run_fetch_urls)
