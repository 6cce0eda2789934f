"""The learning loop: when to retrain, on what, and whether the result goes live.

    run = maybe_start_run(session, settings)           # beat tick or "retrain now"; commit, then
    status = execute_run(sessionmaker, run.id, settings)   # on the train queue, its own process

`maybe_start_run` starts a run when at least `min_new_reviews` reviews arrived since the last
finished run (or always, with `force=True`). Only one run is open (queued or running) at a time,
even when two beat processes tick at once: the run row is inserted with `open_lock = 1` under a
UNIQUE constraint, so the second insert fails (on PostgreSQL it waits for the first transaction,
then fails) and that caller starts nothing. A run whose worker was lost is failed after
`training_run_timeout_seconds`, which frees the lock.

The snapshot, taken when the run starts and recorded on it (review ids, high-water mark):
- only the current review of an image counts, and only approvals and corrections;
- reviews by reviewers an admin excluded (`User.training_excluded_at`) are left out;
- the held-out set: every newly reviewed image goes, by a hash of its id, to the held-out set
  with probability `holdout_share` (`Image.split = holdout`) and stays there; held-out images are
  evaluated on, never trained on, so the set is fixed and grows with every run;
- no reviewer supplies more than `max_reviewer_share` of the reviewed training examples (their
  oldest reviews beyond the cap are dropped, and the run's params say how many).

`execute_run` fine-tunes from the active version (`core_model.train.fine_tune`) on the snapshot
plus, optionally, replayed original training examples (`replay_data`, against forgetting), then
evaluates the candidate and the active version on the held-out set and on the anchor set (the
held-out approvals -- captions the model already got right -- plus `anchor_data`: a regression
guard). The candidate is promoted only if it beats the active version on the held-out set by
`promote_margin` and is at most `anchor_tolerance` worse on the anchor set; otherwise it is kept
as a rejected candidate with the reason. The run's log, loss curve, progress and metrics are
written to its row. Any exception marks the run failed with the error; the active version is
only ever changed by the final transaction, so a crash leaves it untouched.

torch is imported only inside `execute_run`, so the dashboard and beat can import this module.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from captioner.learning import registry
from captioner.state.db import session_scope
from captioner.state.models import (
    Image,
    ModelStatus,
    ModelVersion,
    Review,
    ReviewDecision,
    Split,
    TrainingRun,
    TrainingStatus,
    User,
    utcnow,
)

if TYPE_CHECKING:
    from captioner.settings import Settings
    from captioner.storage import ObjectStore

log = logging.getLogger("captioner.learning.retrain")


OPEN_STATUSES = (TrainingStatus.QUEUED, TrainingStatus.RUNNING)
FINISHED_STATUSES = (TrainingStatus.PROMOTED, TrainingStatus.REJECTED)
GATE_METRICS_KEPT = ("exact_match", "bleu_4", "rouge_l", "cider", "n_images")


class NothingToTrain(RuntimeError):
    """A forced run was asked for, but the snapshot holds no training example."""


class RunAlreadyOpen(RuntimeError):
    """A run is already queued or running."""


# --- the snapshot ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One reviewed caption: the current review of an image, with who wrote it."""

    review_id: int
    image_id: int
    storage_key: str
    text: str
    split: Split
    reviewer_id: int | None
    decision: ReviewDecision


@dataclass
class Snapshot:
    train: list[Example]
    holdout: list[Example]
    max_review_id: int
    dropped_by_cap: dict[str, int] = field(default_factory=dict)  # reviewer id -> dropped
    excluded_reviewers: list[int] = field(default_factory=list)


def holdout_bucket(image_id: int) -> float:
    """A fixed pseudo-random number in [0, 1) per image: below `holdout_share` means held out."""
    return (zlib.crc32(f"holdout:{image_id}".encode()) % 10_000) / 10_000


def assign_holdout(session: Session, share: float, after_review_id: int) -> list[int]:
    """Put newly reviewed images (first review after `after_review_id`) whose hash bucket is
    under `share` into the held-out set. Images reviewed before stay where they are, so an image
    a run trained on never moves to the held-out set. Returns the ids moved."""
    if share <= 0:
        return []
    first_review = (
        select(Review.image_id)
        .group_by(Review.image_id)
        .having(func.min(Review.id) > after_review_id)
    )
    candidates = session.scalars(
        select(Image.id).where(Image.split == Split.TRAIN, Image.id.in_(first_review))
    ).all()
    chosen = [i for i in candidates if holdout_bucket(i) < share]
    for start in range(0, len(chosen), 500):
        session.execute(
            update(Image)
            .where(Image.id.in_(chosen[start : start + 500]), Image.split == Split.TRAIN)
            .values(split=Split.HOLDOUT)
            .execution_options(synchronize_session=False)
        )
    return chosen


def current_examples(session: Session, up_to_review_id: int | None = None) -> list[Example]:
    """Every image's current review that approves or corrects a caption, excluded reviewers
    left out, oldest review first."""
    newest = select(Review.image_id, func.max(Review.id).label("review_id"))
    if up_to_review_id is not None:
        newest = newest.where(Review.id <= up_to_review_id)
    current = newest.group_by(Review.image_id).subquery("current_reviews")
    query = (
        select(
            Review.id,
            Review.image_id,
            Image.storage_key,
            Review.text,
            Image.split,
            Review.reviewer_id,
            Review.decision,
        )
        .join(current, current.c.review_id == Review.id)
        .join(Image, Image.id == Review.image_id)
        .outerjoin(User, User.id == Review.reviewer_id)
        .where(
            Review.decision.in_([ReviewDecision.APPROVED, ReviewDecision.CORRECTED]),
            Review.text.is_not(None),
            or_(Review.reviewer_id.is_(None), User.training_excluded_at.is_(None)),
        )
        .order_by(Review.id)
    )
    return [
        Example(rid, iid, key, text, Split(sp), reviewer, ReviewDecision(decision))
        for rid, iid, key, text, sp, reviewer, decision in session.execute(query)
        if text and text.strip()
    ]


def cap_reviewer_share(
    examples: Sequence[Example], share: float
) -> tuple[list[Example], dict[str, int]]:
    """Keep at most `share` of the kept examples from any one reviewer (their newest ones).

    The cap c is the largest count with c <= share * sum(min(n_r, c)) over reviewers r, so
    after capping every reviewer holds at most `share` of what is kept. Reviews without a
    reviewer count as one more "reviewer". Returns (kept, {reviewer: dropped}).
    """
    counts = Counter(e.reviewer_id for e in examples)
    if share >= 1.0 or not counts:
        return list(examples), {}
    cap = 0
    for c in range(max(counts.values()), -1, -1):
        if c <= share * sum(min(n, c) for n in counts.values()):
            cap = c
            break
    kept_ids: set[int] = set()
    by_reviewer: dict[int | None, list[Example]] = {}
    for e in examples:
        by_reviewer.setdefault(e.reviewer_id, []).append(e)
    dropped: dict[str, int] = {}
    for reviewer, items in by_reviewer.items():
        newest = sorted(items, key=lambda e: e.review_id, reverse=True)[:cap]
        kept_ids.update(e.review_id for e in newest)
        if len(items) > cap:
            dropped[str(reviewer)] = len(items) - cap
    return [e for e in examples if e.review_id in kept_ids], dropped


def take_snapshot(session: Session, settings: Settings, after_review_id: int) -> Snapshot:
    """Assign new held-out images, then split the current reviews into train and held-out."""
    assign_holdout(session, settings.holdout_share, after_review_id)
    examples = current_examples(session)
    train = [e for e in examples if e.split == Split.TRAIN]
    train = train[-settings.retrain_max_examples :]  # the newest
    train, dropped = cap_reviewer_share(train, settings.max_reviewer_share)
    holdout = sorted((e for e in examples if e.split == Split.HOLDOUT), key=lambda e: e.image_id)[
        : settings.holdout_max_images
    ]
    excluded = list(session.scalars(select(User.id).where(User.training_excluded_at.is_not(None))))
    max_review_id = session.scalar(select(func.max(Review.id))) or 0
    return Snapshot(train, holdout, int(max_review_id), dropped, excluded)


# --- starting a run -------------------------------------------------------------------------


def open_run(session: Session) -> TrainingRun | None:
    return session.scalars(
        select(TrainingRun).where(TrainingRun.status.in_(OPEN_STATUSES)).limit(1)
    ).first()


def last_finished_run(session: Session) -> TrainingRun | None:
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
    last = last_finished_run(session)
    after = (last.max_review_id or 0) if last is not None else 0
    new = count_new_reviews(session, after)
    if not force and new < settings.min_new_reviews:
        log.info(
            "no run: %d new reviews since review %d (need %d)", new, after, settings.min_new_reviews
        )
        return None
    snapshot = take_snapshot(session, settings, after)
    if not snapshot.train:
        if force:
            raise NothingToTrain("no reviewed training examples (approve or correct some captions)")
        log.info("no run: %d new reviews but no training example", new)
        return None
    run = TrainingRun(
        status=TrainingStatus.QUEUED,
        open_lock=1,
        train_review_ids=[e.review_id for e in snapshot.train],
        holdout_review_ids=[e.review_id for e in snapshot.holdout],
        max_review_id=snapshot.max_review_id,
        params={
            "trigger": trigger,
            "requested_by": requested_by,
            "new_reviews": new,
            "since_review_id": after,
            "train_examples": len(snapshot.train),
            "holdout_examples": len(snapshot.holdout),
            "reviewers": dict(Counter(str(e.reviewer_id) for e in snapshot.train)),
            "dropped_by_reviewer_cap": snapshot.dropped_by_cap,
            "max_reviewer_share": settings.max_reviewer_share,
            "excluded_reviewers": snapshot.excluded_reviewers,
        },
        metrics={},
        log="",
    )
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
        len(snapshot.train),
        len(snapshot.holdout),
    )
    return run


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


# --- running it ------------------------------------------------------------------------------


def _claim(session: Session, run_id: int) -> bool:
    row = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == TrainingStatus.QUEUED)
        .values(status=TrainingStatus.RUNNING, started_at=utcnow())
        .returning(TrainingRun.id)
        .execution_options(synchronize_session=False)
    ).first()
    return row is not None


class _RunLog:
    """Timestamped lines, flushed to the run's row when asked."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {message}"
        self.lines.append(line)
        log.info("%s", message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _update_run(sessions, run_id: int, **values: Any) -> None:
    with session_scope(sessions) as s:
        s.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )


def _merge_metrics(
    sessions, run_id: int, extra: dict[str, Any], log_text: str | None = None
) -> None:
    with session_scope(sessions) as s:
        run = s.get(TrainingRun, run_id)
        if run is None:
            return
        run.metrics = {**(run.metrics or {}), **extra}
        if log_text is not None:
            run.log = log_text


def read_loss_curve(metrics_path: Path) -> list[list[float]]:
    """[[step, loss], ...] from a run directory's metrics.jsonl (train events)."""
    if not metrics_path.exists():
        return []
    curve = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if row.get("event") == "train" and "loss" in row:
            curve.append([int(row["step"]), round(float(row["loss"]), 5)])
    return curve


class _ProgressWatcher(threading.Thread):
    """Copies the trainer's metrics.jsonl to the run row every few seconds while it trains."""

    def __init__(
        self, sessions, run_id: int, metrics_path: Path, total_steps: int, every: float = 3.0
    ):
        super().__init__(name=f"run-{run_id}-progress", daemon=True)
        self.sessions, self.run_id, self.path = sessions, run_id, metrics_path
        self.total, self.every = total_steps, every
        self.stop = threading.Event()

    def snapshot(self) -> dict[str, Any]:
        curve = read_loss_curve(self.path)
        step = curve[-1][0] if curve else 0
        return {
            "loss_curve": curve,
            "progress": {
                "step": step,
                "total_steps": self.total,
                "fraction": round(min(1.0, step / max(1, self.total)), 4),
            },
        }

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                _merge_metrics(self.sessions, self.run_id, self.snapshot())
            except Exception as exc:  # progress is best effort; the run goes on
                log.warning("run %s: could not record progress: %s", self.run_id, exc)


def _records(spec: str, split: str, base_meta: dict[str, Any]) -> Sequence:
    """Records of a data spec; a synthetic world is the base checkpoint's own (or the default)."""
    from core_model.datasets import load_records

    world = None
    if spec == "synthetic":
        from core_model.synthetic import SyntheticWorld, world_config_from_dict

        world_cfg = (base_meta.get("provenance") or {}).get("world")
        world = SyntheticWorld(world_config_from_dict(world_cfg)) if world_cfg else SyntheticWorld()
    return load_records(spec, split, world=world)


def _sample(records: Sequence, n: int, seed: int) -> list:
    n = min(n, len(records))
    if n <= 0:
        return []
    picks = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in picks]


def _pair(record: Any) -> tuple[Any, str]:
    """(image, caption) of a record: a SyntheticExample / CaptionRecord / tuple."""
    if isinstance(record, tuple):
        return record[0], record[1] if isinstance(record[1], str) else record[1][0]
    return record.image, record.captions[0]


def finetune_config(settings: Settings, out_dir: Path, seed: int) -> dict[str, Any]:
    return {
        "out_dir": str(out_dir),
        "epochs": settings.finetune_epochs,
        "max_steps": settings.finetune_steps,
        "batch_size": settings.finetune_batch_size,
        "lr": settings.finetune_lr,
        "warmup_steps": settings.finetune_warmup_steps,
        "device": settings.training_device,
        "progress": False,
        "seed": seed,
        "log_every": 1,
        "val_max_images": 64,
    }


def _total_steps(cfg: dict[str, Any], n_examples: int) -> int:
    if cfg["max_steps"]:
        return int(cfg["max_steps"])
    per_epoch = n_examples // cfg["batch_size"] if n_examples >= cfg["batch_size"] else 1
    return int(cfg["epochs"]) * per_epoch


def _reader(store: ObjectStore) -> Callable[[str], bytes]:
    """Image bytes by reference: object-store keys (reviews), absolute file paths (replay and
    anchor data sets)."""

    def read(ref: str) -> bytes:
        if Path(ref).is_absolute():
            return Path(ref).read_bytes()
        return store.get(ref)

    return read


def _score(model, records: Sequence, read_bytes, metric: str) -> dict[str, float]:
    from core_model.evaluate import evaluate_model

    if not records:
        return {}
    metrics, _ = evaluate_model(model, records, batch_size=64, read_bytes=read_bytes, meteor=False)
    kept = {k: round(float(metrics[k]), 5) for k in GATE_METRICS_KEPT if k in metrics}
    kept.setdefault(metric, round(float(metrics[metric]), 5))
    return kept


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def gate(
    metric: str,
    holdout: dict[str, dict[str, float]],
    anchor: dict[str, dict[str, float]],
    margin: float,
    tolerance: float,
) -> GateDecision:
    """Promote only if the candidate beats the active version on the held-out set by `margin`
    and is no more than `tolerance` worse on the anchor set."""
    if not holdout.get("candidate"):
        return GateDecision(False, "no held-out examples to compare on")
    h_c, h_a = holdout["candidate"][metric], holdout["active"][metric]
    gain = h_c - h_a
    if not (gain > 0 and gain >= margin):
        return GateDecision(
            False,
            f"held-out {metric} {h_c:.4f} vs active {h_a:.4f}: gain {gain:+.4f} is below the "
            f"promote margin {margin:.4f}",
        )
    if anchor.get("candidate"):
        a_c, a_a = anchor["candidate"][metric], anchor["active"][metric]
        if a_c < a_a - tolerance:
            return GateDecision(
                False,
                f"anchor {metric} {a_c:.4f} vs active {a_a:.4f}: dropped {a_a - a_c:.4f}, more "
                f"than the tolerance {tolerance:.4f}",
            )
        anchor_note = f"; anchor {a_c:.4f} vs {a_a:.4f} (tolerance {tolerance:.4f})"
    else:
        anchor_note = "; no anchor set"
    return GateDecision(
        True,
        f"held-out {metric} {h_c:.4f} vs active {h_a:.4f} (gain {gain:+.4f} >= {margin:.4f})"
        + anchor_note,
    )


def _examples_by_ids(session: Session, review_ids: Sequence[int]) -> list[tuple[int, str, str]]:
    """(review id, storage_key, text) of the given reviews, in id order."""
    out = []
    ids = list(review_ids)
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(Review.id, Image.storage_key, Review.text)
            .join(Image, Image.id == Review.image_id)
            .where(Review.id.in_(ids[start : start + 500]))
        ).all()
        out += rows
    return [(rid, key, text) for rid, key, text in sorted(out)]


def _approved_ids(session: Session, review_ids: Sequence[int]) -> set[int]:
    ids = list(review_ids)
    found: set[int] = set()
    for start in range(0, len(ids), 500):
        found.update(
            session.scalars(
                select(Review.id).where(
                    Review.id.in_(ids[start : start + 500]),
                    Review.decision == ReviewDecision.APPROVED,
                )
            )
        )
    return found


def execute_run(
    sessions,
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
        if not _claim(s, run_id):
            run = s.get(TrainingRun, run_id)
            return TrainingStatus(run.status).value if run is not None else "missing"
    runlog = _RunLog()

    def say(message: str) -> None:
        runlog(message)
        if on_log is not None:
            on_log(message)

    t0 = time.perf_counter()
    try:
        return _execute(sessions, run_id, settings, store, say, runlog, t0)
    except Exception as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
        runlog.lines.append(traceback.format_exc())
        with session_scope(sessions) as s:
            run = s.get(TrainingRun, run_id)
            if run is not None:
                run.status = TrainingStatus.FAILED
                run.open_lock = None
                run.finished_at = utcnow()
                run.error = f"{type(exc).__name__}: {exc}"[:2000]
                run.log = runlog.text
                run.metrics = {**(run.metrics or {}), "wall_s": round(time.perf_counter() - t0, 2)}
        log.exception("training run %s failed", run_id)
        return TrainingStatus.FAILED.value


def _execute(sessions, run_id, settings, store, say, runlog, t0):
    from captioner.storage import open_store

    store = store or open_store(settings.storage_url, settings)
    metric = settings.gate_metric

    # 1. What to train from and on.
    with session_scope(sessions) as s:
        run = s.get(TrainingRun, run_id)
        base = registry.baseline_version(s, settings)
        if base is None:
            raise RuntimeError(
                "no model to fine-tune: no active model version and no checkpoint at "
                f"{settings.model_checkpoint}"
            )
        run.base_model_version_id = base.id
        base_id, base_name, base_uri = base.id, base.name, base.checkpoint_uri
        train_pairs = [(k, t) for _, k, t in _examples_by_ids(s, run.train_review_ids or [])]
        holdout_rows = _examples_by_ids(s, run.holdout_review_ids or [])
        approved = _approved_ids(s, [rid for rid, _, _ in holdout_rows])
        holdout_pairs = [(k, t) for _, k, t in holdout_rows]
        anchor_pairs = [(k, t) for rid, k, t in holdout_rows if rid in approved]
    say(
        f"run {run_id}: fine-tuning {base_name} (version {base_id}) on {len(train_pairs)} reviewed "
        f"examples; {len(holdout_pairs)} held-out, {len(anchor_pairs)} held-out approvals"
    )
    if not train_pairs:
        raise RuntimeError(
            "the snapshot holds no training example (reviews rejected or deleted since)"
        )

    from core_model import train as core_train
    from core_model.checkpoint import load_checkpoint, read_meta

    base_path = registry.local_checkpoint(base_uri, settings, base_name)
    base_meta = read_meta(base_path)
    examples: list[tuple[Any, str]] = list(train_pairs)
    if settings.replay_data and settings.replay_ratio > 0:
        replay_records = _records(settings.replay_data, "train", base_meta)
        replay = _sample(
            replay_records, round(settings.replay_ratio * len(train_pairs)), seed=run_id
        )
        examples += [_pair(r) for r in replay]
        say(f"replaying {len(replay)} original training examples from {settings.replay_data}")
    anchor_records: list[Any] = list(anchor_pairs)
    if settings.anchor_data:
        extra = _records(settings.anchor_data, settings.anchor_split, base_meta)
        anchor_records += list(extra[: settings.anchor_size])
    anchor_records = anchor_records[: max(settings.anchor_size, len(anchor_pairs))]
    random.Random(run_id).shuffle(examples)

    # 2. Fine-tune, copying progress and the loss curve to the run row meanwhile.
    out_dir = Path(settings.checkpoint_dir or ".") / "runs" / f"run-{run_id}"
    cfg = finetune_config(settings, out_dir, seed=run_id)
    total = _total_steps(cfg, len(examples))
    val = examples[: min(32, len(examples))]
    _merge_metrics(
        sessions,
        run_id,
        {"progress": {"step": 0, "total_steps": total, "fraction": 0.0}},
        runlog.text,
    )
    metrics_path = out_dir / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()  # a re-delivered run starts its curve afresh
    watcher = _ProgressWatcher(sessions, run_id, metrics_path, total)
    watcher.start()
    say(
        f"training {total} steps (batch {cfg['batch_size']}, lr {cfg['lr']}) on {len(examples)} examples"
    )
    try:
        best_path, ft_metrics = core_train.fine_tune(
            base_path, examples, cfg, val_examples=val, read_bytes=_reader(store)
        )
    finally:
        watcher.stop.set()
        watcher.join(timeout=10)
    train_s = time.perf_counter() - t0
    progress = watcher.snapshot()
    progress["progress"]["fraction"] = 1.0
    say(f"trained in {train_s:.0f} s; final loss {ft_metrics.get('train_loss', float('nan')):.4f}")
    _merge_metrics(sessions, run_id, {**progress, "finetune": _jsonable(ft_metrics)}, runlog.text)

    # 3. Evaluate candidate and active on the held-out and anchor sets.
    device = core_train.select_device(settings.training_device)
    holdout_records = list(holdout_pairs)
    scores: dict[str, dict[str, dict[str, float]]] = {"holdout": {}, "anchor": {}}
    for who, path in (("active", base_path), ("candidate", Path(best_path))):
        model, _ = load_checkpoint(path, device)
        scores["holdout"][who] = _score(model, holdout_records, _reader(store), metric)
        scores["anchor"][who] = _score(model, anchor_records, _reader(store), metric)
        del model
        say(
            f"{who}: held-out {scores['holdout'][who].get(metric, 'n/a')}, "
            f"anchor {scores['anchor'][who].get(metric, 'n/a')} ({metric})"
        )
    decision = gate(
        metric,
        scores["holdout"],
        scores["anchor"],
        settings.promote_margin,
        settings.anchor_tolerance,
    )
    say(("PROMOTE: " if decision.promote else "REJECT: ") + decision.reason)

    # 4. Register the candidate (uploaded to the store), promote it if it passed, finish the run:
    # one transaction, so a failure here leaves the active version as it was.
    gate_info = {
        "metric": metric,
        "decision": "promoted" if decision.promote else "rejected",
        "reason": decision.reason,
        "promote_margin": settings.promote_margin,
        "anchor_tolerance": settings.anchor_tolerance,
    }
    wall = round(time.perf_counter() - t0, 2)
    with session_scope(sessions) as s:
        name = _candidate_name(s, run_id)
        version = registry.register(
            s,
            Path(best_path),
            name=name,
            store=store,
            parent_id=base_id,
            metrics={
                "holdout": scores["holdout"]["candidate"],
                "anchor": scores["anchor"]["candidate"],
                "training_run_id": run_id,
                "gate": gate_info,
            },
        )
        base_row = s.get(ModelVersion, base_id)
        if base_row is not None and not (base_row.metrics or {}).get("holdout"):
            # The base's own scores, for the side-by-side view (filled once).
            base_row.metrics = {
                **(base_row.metrics or {}),
                "holdout": scores["holdout"]["active"],
                "anchor": scores["anchor"]["active"],
            }
        if decision.promote:
            registry.promote(s, version.id)
        run = s.get(TrainingRun, run_id)
        run.candidate_model_version_id = version.id
        run.status = TrainingStatus.PROMOTED if decision.promote else TrainingStatus.REJECTED
        run.open_lock = None
        run.finished_at = utcnow()
        run.error = None if decision.promote else decision.reason
        run.metrics = {
            **(run.metrics or {}),
            **progress,
            "finetune": _jsonable(ft_metrics),
            "holdout": scores["holdout"],
            "anchor": scores["anchor"],
            "gate": gate_info,
            "train_s": round(train_s, 2),
            "wall_s": wall,
        }
        say(f"candidate registered as {name} ({version.checkpoint_uri}); run took {wall:.0f} s")
        run.log = runlog.text
        status = TrainingStatus(run.status).value
    return status


def _candidate_name(session: Session, run_id: int) -> str:
    name = f"finetune-{run_id}"
    taken = session.scalars(select(ModelVersion.id).where(ModelVersion.name == name)).first()
    return name if taken is None else f"{name}-{int(time.time())}"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=float))


def version_summary(version: ModelVersion | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {"id": version.id, "name": version.name, "status": ModelStatus(version.status).value}
