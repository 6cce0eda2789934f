"""The webhook outbox: one `WebhookDelivery` row per (webhook, event, finished job), written in
the transaction that finished the job, so an event is never lost and never recorded twice.
Delivering the rows (signing, HTTP, retries) is `captioner.webhooks`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from captioner.state.models import Job, JobStatus, Webhook, WebhookDelivery, WebhookStatus, utcnow

EVENTS = ("job.completed", "job.failed")


def job_event(job: Job) -> str:
    """`job.failed` for a finished job that failed (`Job.failure_reason`, set by
    `jobs.fail_job`) or of which no image was captioned, else `job.completed`."""
    if job.status == JobStatus.FINISHED and job.failure_reason is not None:
        return "job.failed"
    if job.status == JobStatus.FINISHED and job.captioned_count == 0 and job.failed_count > 0:
        return "job.failed"
    return "job.completed"


def job_payload(job: Job, event: str) -> dict[str, Any]:
    return {
        "event": event,
        "job": {
            "id": job.id,
            "name": job.name,
            "status": job.status.value,
            "image_count": job.image_count,
            "captioned_count": job.captioned_count,
            "failed_count": job.failed_count,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "failure_reason": job.failure_reason,
        },
    }


def record_job_events(session: Session, job_ids: list[int]) -> list[int]:
    """Outbox rows for finished jobs' owners' webhooks; returns the new delivery ids."""
    created: list[int] = []
    for job_id in job_ids:
        # Fresh from the database: `finish_completed_jobs` updates jobs in bulk, so a Job
        # already in this session's identity map would still show its old status.
        job = session.get(Job, job_id, populate_existing=True)
        if job is None or job.owner_id is None or job.status != JobStatus.FINISHED:
            continue
        event = job_event(job)
        hooks = session.scalars(
            select(Webhook).where(Webhook.owner_id == job.owner_id, Webhook.active.is_(True))
        )
        for hook in hooks:
            if hook.events and event not in hook.events:
                continue
            exists = session.scalar(
                select(WebhookDelivery.id).where(
                    WebhookDelivery.webhook_id == hook.id,
                    WebhookDelivery.event == event,
                    WebhookDelivery.job_id == job.id,
                )
            )
            if exists is not None:
                continue
            delivery = WebhookDelivery(
                webhook_id=hook.id,
                event=event,
                job_id=job.id,
                payload=job_payload(job, event),
                status=WebhookStatus.PENDING,
                next_attempt_at=utcnow(),
            )
            session.add(delivery)
            session.flush()
            created.append(delivery.id)
    return created
