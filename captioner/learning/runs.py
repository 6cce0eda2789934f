"""The life of a training run, and the only code that sets `TrainingRun.status`.

    queued  -> running                 claim (the train task; a second delivery finds it taken)
    running -> promoted | rejected     finish_run (the gate's decision)
    queued | running -> failed         fail_run (an exception), fail_stale_runs (worker lost)

`maybe_start_run` starts a run when at least `min_new_reviews` reviews arrived since the last
finished run (or always, with `force=True`). Only one run is open (queued or running) at a time,
even when two beat processes tick at once: the run row is inserted with `open_lock = 1` under a
UNIQUE constraint, so the second insert fails (on PostgreSQL it waits for the first transaction,
then fails) and that caller starts nothing. A run whose worker was lost is failed after
`training_run_timeout_seconds`, which frees the lock.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from captioner.learning.snapshot import Snapshot, take_snapshot
from captioner.state.models import Review, TrainingRun, TrainingStatus, User, utcnow

if TYPE_CHECKING:
    from captioner.settings import Settings

log = logging.getLogger("captioner.learning.runs")

OPEN_STATUSES = (TrainingStatus.QUEUED, TrainingStatus.RUNNING)
FINISHED_STATUSES = (TrainingStatus.PROMOTED, TrainingStatus.REJECTED)


class NothingToTrain(RuntimeError):
    """A forced run was asked for, but the snapshot holds no training example."""


class RunAlreadyOpen(RuntimeError):
    """A run is already queued or running."""


# --- starting a run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """The reviews since the last finished run: its high-water mark, and how many came after."""

    after_review_id: int
    new_reviews: int


@dataclass(frozen=True)
class StartRequest:
    """Who or what asked for a run: the beat schedule, the CLI, or an admin's "retrain now"."""

    trigger: str
    requested_by: int | None


def open_run(session: Session) -> TrainingRun | None:
    """The run that is queued or running, if any."""
    return session.scalars(
        select(TrainingRun).where(TrainingRun.status.in_(OPEN_STATUSES)).limit(1)
    ).first()


def last_finished_run(session: Session) -> TrainingRun | None:
    """The newest run that ended with a gate decision (promoted or rejected)."""
    return session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status.in_(FINISHED_STATUSES))
        .order_by(TrainingRun.id.desc())
        .limit(1)
    ).first()


def count_new_reviews(session: Session, after_review_id: int) -> int:
    """Reviews written after the high-water mark whose reviewer is not excluded."""
    return int(
        session.scalar(
            select(func.count(Review.id))
            .outerjoin(User, User.id == Review.reviewer_id)
            .where(
                Review.id > after_review_id,
                or_(Review.reviewer_id.is_(None), User.training_excluded_at.is_(None)),
            )
        )
        or 0
    )


def review_backlog(session: Session) -> Backlog:
    """How many reviews arrived since the last finished run's high-water mark."""
    last = last_finished_run(session)
    after = (last.max_review_id or 0) if last is not None else 0
    return Backlog(after, count_new_reviews(session, after))


def fail_stale_runs(session: Session, settings: Settings) -> list[int]:
    """Open runs older than the run timeout (their worker was lost) are marked failed."""
    cutoff = utcnow() - timedelta(seconds=settings.training_run_timeout_seconds)
    rows = session.execute(
        update(TrainingRun)
        .where(
            TrainingRun.status.in_(OPEN_STATUSES),
            func.coalesce(TrainingRun.started_at, TrainingRun.created_at) < cutoff,
        )
        .values(
            status=TrainingStatus.FAILED,
            open_lock=None,
            finished_at=utcnow(),
            error=f"no result within {settings.training_run_timeout_seconds} s (worker lost?)",
        )
        .returning(TrainingRun.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars())


def _queued_run(
    settings: Settings, snapshot: Snapshot, backlog: Backlog, request: StartRequest
) -> TrainingRun:
    """A new queued run row holding the snapshot (not added to a session yet)."""
    return TrainingRun(
        status=TrainingStatus.QUEUED,
        open_lock=1,
        train_review_ids=[e.review_id for e in snapshot.train],
        holdout_review_ids=[e.review_id for e in snapshot.holdout],
        max_review_id=snapshot.max_review_id,
        params={
            "trigger": request.trigger,
            "requested_by": request.requested_by,
            "new_reviews": backlog.new_reviews,
            "since_review_id": backlog.after_review_id,
            "train_examples": len(snapshot.train),
            "holdout_examples": len(snapshot.holdout),
            "reviewers": dict(Counter(str(e.reviewer_id) for e in snapshot.train)),
            "dropped_by_reviewer_cap": snapshot.dropped_by_cap,
            "max_reviewer_share": settings.max_reviewer_share,
            "excluded_reviewers": snapshot.excluded_reviewers,
            "reviews": snapshot.accounting,
        },
        metrics={},
        log="",
    )


def _insert_open_run(session: Session, run: TrainingRun, force: bool) -> TrainingRun | None:
    """Insert the run under the one-open-run lock; None (or RunAlreadyOpen when forced) when
    another open run got in first."""
    try:
        with session.begin_nested():
            session.add(run)
            session.flush()
    except IntegrityError:
        # Another beat tick (or a "retrain now") inserted its open run first.
        if force:
            raise RunAlreadyOpen("a training run is already queued or running") from None
        return None
    log.info(
        "training run %s queued: %d train, %d held-out examples",
        run.id,
        len(run.train_review_ids),
        len(run.holdout_review_ids),
    )
    return run


def maybe_start_run(
    session: Session,
    settings: Settings,
    *,
    force: bool = False,
    trigger: str = "schedule",
    requested_by: int | None = None,
) -> TrainingRun | None:
    """Start (insert, queued) a training run if one is due; None if not due or one is open.

    With `force=True` ("retrain now") the review count is not checked, and the problems are
    raised instead of answered with None: RunAlreadyOpen, NothingToTrain. The caller commits,
    then dispatches the run (`TASK_MAYBE_RETRAIN` on the maintenance queue forwards it to the
    train queue).
    """
    fail_stale_runs(session, settings)
    if open_run(session) is not None:
        if force:
            raise RunAlreadyOpen("a training run is already queued or running")
        return None
    backlog = review_backlog(session)
    if not force and backlog.new_reviews < settings.min_new_reviews:
        log.info(
            "no run: %d new reviews since review %d (need %d)",
            backlog.new_reviews,
            backlog.after_review_id,
            settings.min_new_reviews,
        )
        return None
    snapshot = take_snapshot(session, settings, backlog.after_review_id)
    if not snapshot.train:
        if force:
            raise NothingToTrain("no reviewed training examples (approve or correct some captions)")
        log.info("no run: %d new reviews but no training example", backlog.new_reviews)
        return None
    run = _queued_run(settings, snapshot, backlog, StartRequest(trigger, requested_by))
    return _insert_open_run(session, run, force)


def runs_to_dispatch(session: Session, settings: Settings) -> list[int]:
    """Queued runs whose train message was never sent, or was sent long ago and not picked up
    (lost from Redis); marks them sent now. The train task's claim makes a duplicate a no-op."""
    now = utcnow()
    stale = settings.queued_timeout_seconds
    out = []
    for run in session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == TrainingStatus.QUEUED)
        .order_by(TrainingRun.id)
    ):
        sent = (run.params or {}).get("dispatched_at")
        if sent is None or now.timestamp() - float(sent) > stale:
            run.params = {**(run.params or {}), "dispatched_at": now.timestamp()}
            out.append(run.id)
    session.flush()
    return out


# --- running and finishing it -----------------------------------------------------------------


def claim(session: Session, run_id: int) -> bool:
    """Move a queued run to running; False when it is not queued (taken, finished, missing)."""
    row = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == TrainingStatus.QUEUED)
        .values(status=TrainingStatus.RUNNING, started_at=utcnow())
        .returning(TrainingRun.id)
        .execution_options(synchronize_session=False)
    ).first()
    return row is not None


def status_of(session: Session, run_id: int) -> str:
    """A run's status as text, "missing" when there is no such run."""
    run = session.get(TrainingRun, run_id)
    return TrainingStatus(run.status).value if run is not None else "missing"


def record_base(session: Session, run_id: int, base_version_id: int) -> TrainingRun:
    """Note the model version the run fine-tunes from; returns the run."""
    run = session.get_one(TrainingRun, run_id)
    run.base_model_version_id = base_version_id
    return run


def merge_metrics(
    session: Session, run_id: int, extra: dict[str, Any], log_text: str | None = None
) -> None:
    """Merge `extra` into the run's metrics (progress, loss curve, scores), and replace its log
    when one is given."""
    run = session.get(TrainingRun, run_id)
    if run is None:
        return
    run.metrics = {**(run.metrics or {}), **extra}
    if log_text is not None:
        run.log = log_text


@dataclass(frozen=True)
class RunResult:
    """How a run that reached the gate ended: the candidate it registered, whether it was
    promoted (the reason either way), the metrics to merge and the final log."""

    candidate_version_id: int
    promoted: bool
    reason: str
    metrics: dict[str, Any]
    log_text: str


def finish_run(session: Session, run_id: int, result: RunResult) -> TrainingStatus:
    """End a run with the gate's decision: promoted or rejected (the reason kept as its error);
    frees the one-open-run lock."""
    run = session.get_one(TrainingRun, run_id)
    run.candidate_model_version_id = result.candidate_version_id
    run.status = TrainingStatus.PROMOTED if result.promoted else TrainingStatus.REJECTED
    run.open_lock = None
    run.finished_at = utcnow()
    run.error = None if result.promoted else result.reason
    run.metrics = {**(run.metrics or {}), **result.metrics}
    run.log = result.log_text
    return TrainingStatus(run.status)


def fail_run(session: Session, run_id: int, error: str, log_text: str, wall_s: float) -> None:
    """End a run that raised: failed with the error; frees the one-open-run lock."""
    run = session.get(TrainingRun, run_id)
    if run is None:
        return
    run.status = TrainingStatus.FAILED
    run.open_lock = None
    run.finished_at = utcnow()
    run.error = error[:2000]
    run.log = log_text
    run.metrics = {**(run.metrics or {}), "wall_s": wall_s}


class RunLog:
    """A run's log: timestamped lines, written to its row when asked, each line also sent to
    the process log and to `echo` (the CLI's --inline output) when given."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.t0 = time.monotonic()
        self.echo = echo

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {message}"
        self.lines.append(line)
        log.info("%s", message)
        if self.echo is not None:
            self.echo(message)

    def attach(self, text: str) -> None:
        """Add text (a traceback) to the log only: no timestamp, not echoed."""
        self.lines.append(text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
