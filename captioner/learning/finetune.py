"""Fine-tuning a run's candidate: the active version trained further on the snapshot.

The reviewed examples are joined by replayed original training examples (`replay_data`, about
`replay_ratio` of them per reviewed example, against forgetting) and shuffled. While
`core_model.train.fine_tune` runs, a thread copies its metrics.jsonl (loss curve, step) to the
run's row every few seconds, so the dashboard can show progress.

torch is imported only inside `fine_tune_run`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.learning import runs
from captioner.learning.snapshot import dataset_records, image_reader
from captioner.state.db import session_scope

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from captioner.settings import Settings
    from captioner.storage import ObjectStore

log = logging.getLogger("captioner.learning.finetune")

VALIDATION_EXAMPLES = 32  # the first examples (after shuffling) the trainer validates on


@dataclass(frozen=True)
class TrainingSet:
    """The (image reference, caption) examples a run fine-tunes on, shuffled, and how many of
    them were replayed from the original training data."""

    examples: list[tuple[Any, str]]
    replayed: int


@dataclass(frozen=True)
class Finetuned:
    """A finished fine-tune: the best checkpoint, the trainer's own metrics (JSON-safe), and the
    final progress and loss curve as written to the run."""

    checkpoint: Path
    metrics: dict[str, Any]
    progress: dict[str, Any]


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


def replay_enabled(settings: Settings) -> bool:
    """Whether runs replay original training examples (`replay_data` set, `replay_ratio` > 0)."""
    return bool(settings.replay_data) and settings.replay_ratio > 0


def replay_examples(
    settings: Settings, base_meta: dict[str, Any], n_reviewed: int, seed: int
) -> list[tuple[Any, str]]:
    """Original training examples replayed beside `n_reviewed` reviewed ones (none when
    `replay_data` is unset or `replay_ratio` is 0)."""
    if not replay_enabled(settings):
        return []
    records = dataset_records(settings.replay_data, "train", base_meta)
    return [_pair(r) for r in _sample(records, round(settings.replay_ratio * n_reviewed), seed)]


def training_set(
    reviewed: Sequence[tuple[str, str]], replayed: Sequence[tuple[Any, str]], seed: int
) -> TrainingSet:
    """Reviewed and replayed examples, shuffled by the run's seed."""
    examples: list[tuple[Any, str]] = [*reviewed, *replayed]
    random.Random(seed).shuffle(examples)
    return TrainingSet(examples, len(replayed))


def finetune_config(settings: Settings, out_dir: Path, seed: int) -> dict[str, Any]:
    """The `core_model.train.TrainConfig` fields of a run's fine-tune."""
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


def total_steps(cfg: dict[str, Any], n_examples: int) -> int:
    """Optimizer steps the fine-tune will take: `max_steps`, else epochs of full batches."""
    if cfg["max_steps"]:
        return int(cfg["max_steps"])
    per_epoch = n_examples // cfg["batch_size"] if n_examples >= cfg["batch_size"] else 1
    return int(cfg["epochs"]) * per_epoch


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


def progress_record(metrics_path: Path, total: int) -> dict[str, Any]:
    """The run's loss curve and progress as read from the trainer's metrics.jsonl."""
    curve = read_loss_curve(metrics_path)
    step = curve[-1][0] if curve else 0
    return {
        "loss_curve": curve,
        "progress": {
            "step": step,
            "total_steps": total,
            "fraction": round(min(1.0, step / max(1, total)), 4),
        },
    }


class _ProgressWatcher(threading.Thread):
    """Copies the trainer's metrics.jsonl to the run row every few seconds while it trains."""

    def __init__(
        self, sessions, run_id: int, metrics_path: Path, total_steps: int, every: float = 3.0
    ):
        super().__init__(name=f"run-{run_id}-progress", daemon=True)
        self.sessions, self.run_id, self.path = sessions, run_id, metrics_path
        self.total, self.every = total_steps, every
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                with session_scope(self.sessions) as s:
                    runs.merge_metrics(s, self.run_id, progress_record(self.path, self.total))
            except Exception as exc:  # progress is best effort; the run goes on
                log.warning("run %s: could not record progress: %s", self.run_id, exc)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=float))


@dataclass(frozen=True)
class FinetuneJob:
    """What `fine_tune_run` needs: the run, the checkpoint it starts from, its examples, and
    where to read their images."""

    sessions: sessionmaker
    run_id: int
    settings: Settings
    base_checkpoint: Path
    training: TrainingSet
    store: ObjectStore


def _start_progress(job: FinetuneJob, metrics_path: Path, total: int, log_text: str):
    """Record step 0 on the run, then start copying the trainer's progress to it."""
    with session_scope(job.sessions) as s:
        runs.merge_metrics(
            s,
            job.run_id,
            {"progress": {"step": 0, "total_steps": total, "fraction": 0.0}},
            log_text,
        )
    if metrics_path.exists():
        metrics_path.unlink()  # a re-delivered run starts its curve afresh
    watcher = _ProgressWatcher(job.sessions, job.run_id, metrics_path, total)
    watcher.start()
    return watcher


def fine_tune_run(job: FinetuneJob, runlog: runs.RunLog) -> Finetuned:
    """Fine-tune the base checkpoint on the training set, copying progress and the loss curve
    to the run row meanwhile."""
    from core_model import train as core_train

    examples = job.training.examples
    out_dir = Path(job.settings.checkpoint_dir or ".") / "runs" / f"run-{job.run_id}"
    cfg = finetune_config(job.settings, out_dir, seed=job.run_id)
    total = total_steps(cfg, len(examples))
    metrics_path = out_dir / "metrics.jsonl"
    watcher = _start_progress(job, metrics_path, total, runlog.text)
    runlog(
        f"training {total} steps (batch {cfg['batch_size']}, lr {cfg['lr']}) on {len(examples)} examples"
    )
    try:
        best_path, metrics = core_train.fine_tune(
            job.base_checkpoint,
            examples,
            cfg,
            val_examples=examples[:VALIDATION_EXAMPLES],
            read_bytes=image_reader(job.store),
        )
    finally:
        watcher.stop.set()
        watcher.join(timeout=10)
    progress = progress_record(metrics_path, total)
    progress["progress"]["fraction"] = 1.0
    return Finetuned(Path(best_path), _jsonable(metrics), progress)
