"""Executing a training run: the learning loop's steps, in order.

    run = runs.maybe_start_run(session, settings)               # beat tick or "retrain now"
    status = retrain.execute_run(sessionmaker, run.id, settings)  # train queue, its own process

`execute_run` claims the queued run (`runs.claim`), then:

1. `load_inputs`: the version to fine-tune from (the active one) and the examples the run's
   snapshot names (`snapshot.run_examples`);
2. `prepare_training`: replayed original examples joined and shuffled (`finetune`), and the
   anchor set (`gate.anchor_set`);
3. `fine_tune`: the candidate, with progress and the loss curve on the run row (`finetune`);
4. `evaluate`: candidate and active version on the held-out and anchor sets (`gate`);
5. `decide`: the promotion gate (`gate`);
6. `publish`: register the candidate (uploaded to the store), promote it if it passed, finish
   the run (`registry`, `runs.finish_run`).

The run's log, loss curve, progress and metrics are written to its row. Any exception marks the
run failed with the error (`runs.fail_run`); the active version is only ever changed by the
final transaction, so a crash leaves it untouched.

torch is imported only inside `execute_run`, so the dashboard and beat can import this module.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from captioner.learning import finetune, gate, registry, runs, snapshot
from captioner.state.db import session_scope
from captioner.state.models import ModelVersion, TrainingStatus

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from captioner.settings import Settings
    from captioner.storage import ObjectStore

log = logging.getLogger("captioner.learning.retrain")


@dataclass(frozen=True)
class RunContext:
    """A run being executed: where its rows and images are, its settings, its log, and when it
    began (`t0`, from `time.perf_counter`)."""

    sessions: sessionmaker
    run_id: int
    settings: Settings
    store: ObjectStore
    runlog: runs.RunLog
    t0: float

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


@dataclass(frozen=True)
class BaseVersion:
    """The model version a run fine-tunes from, with its local checkpoint and metadata."""

    version_id: int
    name: str
    checkpoint: Path
    meta: dict[str, Any]


@dataclass(frozen=True)
class RunInputs:
    """Step 1: what the run trains from and on."""

    base: BaseVersion
    examples: snapshot.RunExamples


@dataclass(frozen=True)
class PreparedData:
    """Step 2: the shuffled training set (reviews and replay) and the anchor set."""

    training: finetune.TrainingSet
    anchor: list[Any]


@dataclass(frozen=True)
class Outcome:
    """Steps 3 to 5: what the final transaction records."""

    base: BaseVersion
    finetuned: finetune.Finetuned
    evaluation: gate.Evaluation
    decision: gate.GateDecision
    train_s: float


def execute_run(
    sessions: sessionmaker,
    run_id: int,
    settings: Settings,
    *,
    store: ObjectStore | None = None,
    on_log: Callable[[str], None] | None = None,
) -> str:
    """Run a queued training run to its end; returns its final status (see the module doc).

    A second delivery of the same run (already claimed or finished) returns its status and
    does nothing.
    """
    with session_scope(sessions) as s:
        if not runs.claim(s, run_id):
            return runs.status_of(s, run_id)
    runlog = runs.RunLog(echo=on_log)
    t0 = time.perf_counter()
    try:
        from captioner.storage import open_store

        store = store or open_store(settings.storage_url, settings)
        return _execute(RunContext(sessions, run_id, settings, store, runlog, t0)).value
    except Exception as exc:
        _record_failure(sessions, run_id, runlog, t0, exc)
        return TrainingStatus.FAILED.value


def _execute(ctx: RunContext) -> TrainingStatus:
    inputs = load_inputs(ctx)
    prepared = prepare_training(ctx, inputs)
    finetuned = fine_tune(ctx, inputs, prepared)
    train_s = ctx.elapsed()
    evaluation = evaluate(ctx, inputs, prepared, finetuned)
    decision = decide(ctx, evaluation)
    return publish(ctx, Outcome(inputs.base, finetuned, evaluation, decision, train_s))


def _record_failure(
    sessions: sessionmaker, run_id: int, runlog: runs.RunLog, t0: float, exc: Exception
) -> None:
    """Log the error with its traceback and fail the run (called while handling `exc`)."""
    error = f"{type(exc).__name__}: {exc}"
    runlog(f"FAILED: {error}")
    runlog.attach(traceback.format_exc())
    with session_scope(sessions) as s:
        runs.fail_run(s, run_id, error, runlog.text, round(time.perf_counter() - t0, 2))
    log.exception("training run %s failed", run_id)


def load_inputs(ctx: RunContext) -> RunInputs:
    """Step 1: the version to fine-tune from (recorded on the run) and the snapshot's examples."""
    from core_model.checkpoint import read_meta

    with session_scope(ctx.sessions) as s:
        base = registry.baseline_version(s, ctx.settings)
        if base is None:
            raise RuntimeError(
                "no model to fine-tune: no active model version and no checkpoint at "
                f"{ctx.settings.model_checkpoint}"
            )
        run = runs.record_base(s, ctx.run_id, base.id)
        examples = snapshot.run_examples(
            s, run.train_review_ids or [], run.holdout_review_ids or []
        )
        base_id, base_name, base_uri = base.id, base.name, base.checkpoint_uri
    ctx.runlog(
        f"run {ctx.run_id}: fine-tuning {base_name} (version {base_id}) on "
        f"{len(examples.train)} reviewed examples; {len(examples.holdout)} held-out, "
        f"{len(examples.holdout_approved)} held-out approvals"
    )
    if not examples.train:
        raise RuntimeError(
            "the snapshot holds no training example (reviews rejected or deleted since)"
        )
    path = registry.local_checkpoint(base_uri, ctx.settings, base_name)
    return RunInputs(BaseVersion(base_id, base_name, path, read_meta(path)), examples)


def prepare_training(ctx: RunContext, inputs: RunInputs) -> PreparedData:
    """Step 2: join replayed original examples to the reviewed ones, shuffle; the anchor set."""
    settings, meta = ctx.settings, inputs.base.meta
    replayed = finetune.replay_examples(settings, meta, len(inputs.examples.train), ctx.run_id)
    if finetune.replay_enabled(settings):
        ctx.runlog(
            f"replaying {len(replayed)} original training examples from {settings.replay_data}"
        )
    return PreparedData(
        training=finetune.training_set(inputs.examples.train, replayed, seed=ctx.run_id),
        anchor=gate.anchor_set(settings, meta, inputs.examples.holdout_approved),
    )


def fine_tune(ctx: RunContext, inputs: RunInputs, prepared: PreparedData) -> finetune.Finetuned:
    """Step 3: fine-tune the base version; record the curve, progress and trainer metrics."""
    job = finetune.FinetuneJob(
        ctx.sessions, ctx.run_id, ctx.settings, inputs.base.checkpoint, prepared.training, ctx.store
    )
    done = finetune.fine_tune_run(job, ctx.runlog)
    final_loss = done.metrics.get("train_loss", float("nan"))
    ctx.runlog(f"trained in {ctx.elapsed():.0f} s; final loss {final_loss:.4f}")
    with session_scope(ctx.sessions) as s:
        runs.merge_metrics(
            s, ctx.run_id, {**done.progress, "finetune": done.metrics}, ctx.runlog.text
        )
    return done


def evaluate(
    ctx: RunContext, inputs: RunInputs, prepared: PreparedData, finetuned: finetune.Finetuned
) -> gate.Evaluation:
    """Step 4: the candidate and the active version on the held-out and anchor sets."""
    job = gate.EvaluationJob(
        active_checkpoint=inputs.base.checkpoint,
        candidate_checkpoint=finetuned.checkpoint,
        holdout=inputs.examples.holdout,
        anchor=prepared.anchor,
        store=ctx.store,
    )
    return gate.evaluate(job, ctx.settings, say=ctx.runlog)


def decide(ctx: RunContext, evaluation: gate.Evaluation) -> gate.GateDecision:
    """Step 5: the promotion gate, its decision written to the log."""
    decision = gate.decide(evaluation, ctx.settings)
    ctx.runlog(("PROMOTE: " if decision.promote else "REJECT: ") + decision.reason)
    return decision


def publish(ctx: RunContext, outcome: Outcome) -> TrainingStatus:
    """Step 6: register the candidate (uploaded to the store), promote it if it passed, finish
    the run: one transaction, so a failure here leaves the active version as it was."""
    gate_info = gate.gate_record(outcome.decision, ctx.settings)
    wall = round(ctx.elapsed(), 2)
    with session_scope(ctx.sessions) as s:
        version = _register_candidate(s, ctx, outcome, gate_info)
        _record_base_scores(s, outcome.base.version_id, outcome.evaluation)
        if outcome.decision.promote:
            registry.promote(s, version.id)
        ctx.runlog(
            f"candidate registered as {version.name} ({version.checkpoint_uri}); "
            f"run took {wall:.0f} s"
        )
        result = runs.RunResult(
            candidate_version_id=version.id,
            promoted=outcome.decision.promote,
            reason=outcome.decision.reason,
            metrics={
                **outcome.finetuned.progress,
                "finetune": outcome.finetuned.metrics,
                "holdout": outcome.evaluation.holdout,
                "anchor": outcome.evaluation.anchor,
                "gate": gate_info,
                "train_s": round(outcome.train_s, 2),
                "wall_s": wall,
            },
            log_text=ctx.runlog.text,
        )
        return runs.finish_run(s, ctx.run_id, result)


def _register_candidate(
    session: Session, ctx: RunContext, outcome: Outcome, gate_info: dict[str, Any]
) -> ModelVersion:
    """The candidate as a new model version, child of the base, with its scores."""
    return registry.register(
        session,
        outcome.finetuned.checkpoint,
        name=_candidate_name(session, ctx.run_id),
        store=ctx.store,
        parent_id=outcome.base.version_id,
        metrics={
            "holdout": outcome.evaluation.holdout["candidate"],
            "anchor": outcome.evaluation.anchor["candidate"],
            "training_run_id": ctx.run_id,
            "gate": gate_info,
        },
    )


def _record_base_scores(session: Session, base_id: int, evaluation: gate.Evaluation) -> None:
    """The base's own scores, for the side-by-side view (filled once)."""
    base = session.get(ModelVersion, base_id)
    if base is None or (base.metrics or {}).get("holdout"):
        return
    base.metrics = {
        **(base.metrics or {}),
        "holdout": evaluation.holdout["active"],
        "anchor": evaluation.anchor["active"],
    }


def _candidate_name(session: Session, run_id: int) -> str:
    name = f"finetune-{run_id}"
    taken = session.scalars(select(ModelVersion.id).where(ModelVersion.name == name)).first()
    return name if taken is None else f"{name}-{int(time.time())}"
