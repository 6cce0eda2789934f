"""Celery tasks of the learning loop (see `captioner.learning.runs`, `.retrain`).

- `captioner.maybe_retrain` (maintenance queue; Celery beat sends it on `retrain_schedule`, the
  dashboard's "retrain now" after inserting a run): start a run if one is due, then send
  `train_run` for every queued run whose message was not sent yet (or was lost).
- `captioner.train_run(run_id)` (train queue, its own worker process: `captioner worker -Q train`):
  fine-tune, evaluate, gate, register and maybe promote. A second delivery is a no-op.

torch is imported only by `train_run`, inside `captioner.learning.retrain.execute_run`.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from captioner.learning import retrain, runs
from captioner.settings import Settings, get_settings
from captioner.state.db import session_scope
from captioner.tasks import TASK_MAYBE_RETRAIN, TASK_TRAIN_RUN, publish_train_run

log = logging.getLogger("captioner.worker.training")


def run_maybe_retrain(
    settings: Settings | None = None, *, publish=publish_train_run
) -> dict[str, Any]:
    """One beat tick: start a due run (committed), then dispatch queued runs to the train queue."""
    from workers.resources import resources

    settings = settings or get_settings()
    res = resources(settings)
    with session_scope(res.sessions) as s:
        run = runs.maybe_start_run(s, settings, trigger="schedule")
        started = run.id if run is not None else None
    with session_scope(res.sessions) as s:
        dispatch = runs.runs_to_dispatch(s, settings)
    for run_id in dispatch:
        publish(run_id, settings)
    if started or dispatch:
        log.info("retrain tick: started run %s, dispatched %s", started, dispatch)
    return {"started": started, "dispatched": dispatch}


def run_train(run_id: int, settings: Settings | None = None) -> str:
    from workers.resources import resources

    settings = settings or get_settings()
    res = resources(settings)
    return retrain.execute_run(res.sessions, run_id, settings, store=res.store)


@shared_task(name=TASK_MAYBE_RETRAIN)
def maybe_retrain() -> dict[str, Any]:
    return run_maybe_retrain()


# Training runs for minutes to hours: the caption batch time limits do not apply. A crash is
# recorded on the run (failed), not retried; a lost worker's run is failed by the timeout.
@shared_task(name=TASK_TRAIN_RUN, acks_late=True, soft_time_limit=None, time_limit=None)
def train_run(run_id: int) -> dict[str, Any]:
    status = run_train(int(run_id))
    log.info("training run %s: %s", run_id, status)
    return {"run_id": int(run_id), "status": status}
