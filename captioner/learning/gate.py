"""The promotion gate: the candidate against the active version, and the decision.

Both are evaluated on the held-out set and on the anchor set (the held-out approvals -- captions
the model already got right -- plus `anchor_data`: a regression guard). The candidate is
promoted only if it beats the active version on the held-out set by `promote_margin` and is at
most `anchor_tolerance` worse on the anchor set; otherwise it is kept as a rejected candidate
with the reason.

torch is imported only inside `evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.learning.snapshot import dataset_records, image_reader

if TYPE_CHECKING:
    from captioner.settings import Settings
    from captioner.storage import ObjectStore

GATE_METRICS_KEPT = ("exact_match", "bleu_4", "rouge_l", "cider", "n_images")

Scores = dict[str, float]  # metric -> value on one evaluation set


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate goes live, and why (or why not)."""

    promote: bool
    reason: str


@dataclass(frozen=True)
class Evaluation:
    """The scores of the active version and the candidate ("active", "candidate") on the
    held-out and anchor sets; a set with no example has empty scores."""

    holdout: dict[str, Scores]
    anchor: dict[str, Scores]


def anchor_set(
    settings: Settings, base_meta: dict[str, Any], holdout_approved: Sequence[tuple[str, str]]
) -> list[Any]:
    """The anchor examples: the held-out approvals, then up to `anchor_size` records of
    `anchor_data`; at most `anchor_size` in all unless the approvals alone are more."""
    records: list[Any] = list(holdout_approved)
    if settings.anchor_data:
        extra = dataset_records(settings.anchor_data, settings.anchor_split, base_meta)
        records += list(extra[: settings.anchor_size])
    return records[: max(settings.anchor_size, len(holdout_approved))]


def score(model, records: Sequence, read_bytes: Callable[[str], bytes], metric: str) -> Scores:
    """The gate's metrics (and `metric`) of a model on records; empty for no records."""
    from core_model.evaluate import evaluate_model

    if not records:
        return {}
    metrics, _ = evaluate_model(model, records, batch_size=64, read_bytes=read_bytes, meteor=False)
    kept = {k: round(float(metrics[k]), 5) for k in GATE_METRICS_KEPT if k in metrics}
    kept.setdefault(metric, round(float(metrics[metric]), 5))
    return kept


@dataclass(frozen=True)
class EvaluationJob:
    """What `evaluate` compares: two checkpoints on the held-out and anchor sets."""

    active_checkpoint: Path
    candidate_checkpoint: Path
    holdout: Sequence[Any]
    anchor: Sequence[Any]
    store: ObjectStore


def evaluate(
    job: EvaluationJob, settings: Settings, say: Callable[[str], None] = lambda _: None
) -> Evaluation:
    """Score the active version and the candidate on both sets, one model in memory at a time."""
    from core_model.checkpoint import load_checkpoint
    from core_model.inference import resolve_device

    metric = settings.gate_metric
    device = resolve_device(settings.training_device or "auto")
    read = image_reader(job.store)
    holdout: dict[str, Scores] = {}
    anchor: dict[str, Scores] = {}
    for who, path in (("active", job.active_checkpoint), ("candidate", job.candidate_checkpoint)):
        model, _ = load_checkpoint(path, device)
        holdout[who] = score(model, job.holdout, read, metric)
        anchor[who] = score(model, job.anchor, read, metric)
        del model
        say(
            f"{who}: held-out {holdout[who].get(metric, 'n/a')}, "
            f"anchor {anchor[who].get(metric, 'n/a')} ({metric})"
        )
    return Evaluation(holdout, anchor)


_METRIC_NAMES = {"bleu_4": "BLEU-4", "rouge_l": "ROUGE-L", "cider": "CIDEr"}


def _result(metric: str, value: float, which: str) -> str:
    """How a model did on one set, in words: "got 93.8% of held-out captions exactly right"."""
    if metric == "exact_match":
        return f"got {value:.1%} of {which} captions exactly right"
    return f"scored {_METRIC_NAMES.get(metric, metric)} {value:.3f} on {which} captions"


def _amount(metric: str, value: float) -> str:
    """A score or a margin as the sentence shows it: points of a percentage, or the score."""
    return f"{value:.1%}" if metric == "exact_match" else f"{value:.3f}"


def _verdict(promote: bool) -> str:
    return "promoted the new model" if promote else "kept the current one"


def gate(
    metric: str,
    holdout: dict[str, Scores],
    anchor: dict[str, Scores],
    margin: float,
    tolerance: float,
) -> GateDecision:
    """Promote only if the candidate beats the active version on the held-out set by `margin`
    and is no more than `tolerance` worse on the anchor set. The reason is one plain sentence:
    "the new model got 93.8% of held-out captions exactly right, the current one 94.6%: kept
    the current one"."""
    if not holdout.get("candidate"):
        return GateDecision(
            False, "no held-out captions to compare the models on: kept the current one"
        )
    h_c, h_a = holdout["candidate"][metric], holdout["active"][metric]
    gain = h_c - h_a
    said = (
        f"the new model {_result(metric, h_c, 'held-out')}, the current one {_amount(metric, h_a)}"
    )
    if not (gain > 0 and gain >= margin):
        short = f" (a gain of at least {_amount(metric, margin)} is needed)" if gain > 0 else ""
        return GateDecision(False, f"{said}{short}: {_verdict(False)}")
    if anchor.get("candidate"):
        a_c, a_a = anchor["candidate"][metric], anchor["active"][metric]
        on_anchor = f"it {_result(metric, a_c, 'the anchor')}"
        if a_c < a_a - tolerance:
            return GateDecision(
                False,
                f"{said}, but {on_anchor} against {_amount(metric, a_a)} for the current one "
                f"(more than {_amount(metric, tolerance)} worse): {_verdict(False)}",
            )
        return GateDecision(
            True,
            f"{said}, and {on_anchor} (the current one {_amount(metric, a_a)}): {_verdict(True)}",
        )
    return GateDecision(True, f"{said}: {_verdict(True)}")


def decide(evaluation: Evaluation, settings: Settings) -> GateDecision:
    """The gate with the settings' metric, margin and tolerance."""
    return gate(
        settings.gate_metric,
        evaluation.holdout,
        evaluation.anchor,
        settings.promote_margin,
        settings.anchor_tolerance,
    )


def gate_record(decision: GateDecision, settings: Settings) -> dict[str, Any]:
    """The decision as kept in the run's and the candidate's metrics."""
    return {
        "metric": settings.gate_metric,
        "decision": "promoted" if decision.promote else "rejected",
        "reason": decision.reason,
        "promote_margin": settings.promote_margin,
        "anchor_tolerance": settings.anchor_tolerance,
    }
