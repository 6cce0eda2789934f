"""The sweeper, `captioner.sweep` (sent by Celery beat every `Settings.sweep_interval_seconds`):
the safety net under the caption path.

One sweep re-publishes images whose lease expired or that sat queued too long (their message
was lost: Redis flushed, worker killed), fails images past the attempt cap, finishes jobs whose
images are all done (recording their webhook events), and re-sends webhook deliveries that are
overdue (their message was lost) and exports left queued too long or running past every time
limit. SQL is the source of truth, so sweeping is always safe to repeat.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from sqlalchemy import select

from captioner import webhooks
from captioner.settings import Settings, get_settings
from captioner.state import exports, images, jobs, outbox
from captioner.state.db import session_scope
from captioner.state.models import Job, utcnow
from captioner.tasks import TASK_EXPORT, TASK_SWEEP, publish_caption_batches, send_task
from workers.deliveries import publish_committed_deliveries
from workers.resources import resources

log = logging.getLogger("captioner.worker")


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
            s.execute(select(Job.id, Job.priority).where(Job.id.in_(list(groups)))).all()
        )
        finished = jobs.finish_completed_jobs(s)
        recorded = outbox.record_job_events(s, finished)
        # Deliveries whose attempt is overdue by a grace period (so one whose retry message is
        # merely waiting out its countdown is not sent twice): their message was lost.
        grace = timedelta(seconds=max(settings.sweep_interval_seconds, 30))
        overdue = webhooks.due_deliveries(s, now=utcnow() - grace)
        # Exports whose message was lost: queued too long, or running past every time limit.
        stalled = exports.stalled_exports(
            s,
            queued_before=utcnow() - timedelta(seconds=settings.queued_timeout_seconds),
            running_before=utcnow() - timedelta(seconds=settings.task_time_limit_seconds) - grace,
        )
    published = 0
    for job_id, ids in groups.items():
        published += publish_caption_batches(
            job_id, ids, interactive=priorities.get(job_id, 0) > 0, settings=settings
        )
    deliveries = sorted(set(recorded) | set(overdue))
    publish_committed_deliveries(deliveries, settings)
    for export_id in stalled:
        send_task(TASK_EXPORT, export_id, settings=settings)
    summary = {
        "expired": len(expired),
        "stale": len(stale),
        "failed_past_cap": len(capped),
        "messages": published,
        "jobs_finished": len(finished),
        "webhooks_recorded": len(recorded),
        "webhooks_resent": len(set(overdue) - set(recorded)),
        "exports_resent": len(stalled),
    }
    if any(summary.values()):
        log.info("sweep: %s", summary)
    return summary


@shared_task(name=TASK_SWEEP)
def sweep() -> dict[str, int]:
    """One sweep of the process's database (see the module docstring)."""
    return run_sweep()
