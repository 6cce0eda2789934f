"""A caption's confidence: the decoder's signals -> the probability, in [0, 1], that it is right.

The mean token log-probability (`Hypothesis.score`) is a poor detector of wrong captions: a
caption with one doubtful word among several sure ones still averages near 0. The decoder also
reports, per hypothesis, its least likely token and its smallest lead over a runner-up token;
a logistic mix of these, fitted on captions whose truth is known (`bench/confidence.py`, on the
synthetic world), gives a number a person can read as "87% likely right" and that ranks wrong
captions first.

    signals = Signals.of(hypothesis)                 # or Signals(mean, least, margin, tokens)
    DEFAULT_CALIBRATION.confidence(signals)          # -> 0.87
    calibration = fit_calibration(signals_list, wrong_list)   # torch, for the bench

Every feature is oriented so that larger means more confident and every weight is >= 0, so the
confidence never falls when a signal improves. Pure Python at run time (no torch needed);
fitting uses torch.

Where the coefficients live: `DEFAULT_CALIBRATION` (fitted by `bench/confidence.py` on the demo
model) unless a checkpoint's config.json carries its own under "confidence"
(`Calibration.from_meta`), as a fine-tuned or larger model should.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_LOGIT_CAP = 16.0  # |logit| bound: probabilities within ~1e-7 of 0 or 1 are told apart no further
_MARGIN_CAP = 20.0  # |log-probability lead| bound (nats)


@dataclass(frozen=True)
class Signals:
    """What the decoder reports about one caption."""

    mean_logprob: float  # mean token log-probability (EOS included), <= 0
    min_token_logprob: float  # the least likely chosen token's log-probability, <= 0
    min_token_margin: float  # smallest log-prob lead of a chosen token over the best other one
    tokens: int  # generated tokens, EOS excluded

    @classmethod
    def of(cls, hyp: Any) -> Signals:
        """The signals of a `core_model.model.Hypothesis`."""
        return cls(hyp.score, hyp.min_token_logprob, hyp.min_token_margin, len(hyp.tokens))


def logprob_logit(logprob: float) -> float:
    """log(p / (1 - p)) of p = exp(logprob), bounded: spreads the values near p = 1 that a
    probability (or a log-probability printed to 3 decimals) shows as equal."""
    lp = min(float(logprob), -1e-12)
    if lp < -50.0:
        return -_LOGIT_CAP
    value = lp - math.log(-math.expm1(lp))
    return max(-_LOGIT_CAP, min(_LOGIT_CAP, value))


def _margin(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return max(-_MARGIN_CAP, min(_MARGIN_CAP, float(value)))


# Each feature: name -> its value from the signals, oriented so that larger is more confident.
FEATURES: dict[str, Callable[[Signals], float]] = {
    "mean_logit": lambda s: logprob_logit(s.mean_logprob),
    "min_token_logit": lambda s: logprob_logit(s.min_token_logprob),
    "min_token_margin": lambda s: _margin(s.min_token_margin),
    "shortness": lambda s: -float(s.tokens),  # every extra word is one more chance to be wrong
}


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Calibration:
    """confidence = sigmoid(bias + sum of weight * feature), every weight >= 0."""

    bias: float
    weights: dict[str, float] = field(default_factory=dict)  # feature name -> weight

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown confidence features: {sorted(unknown)}")
        if any(not w >= 0 for w in self.weights.values()):
            raise ValueError("confidence weights must be >= 0 (a better signal never lowers it)")

    def confidence(self, signals: Signals) -> float:
        """The probability, in [0, 1], that the caption is right."""
        z = self.bias + sum(w * FEATURES[name](signals) for name, w in self.weights.items() if w)
        return _sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        return {"bias": self.bias, "weights": dict(self.weights)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(float(d["bias"]), {str(k): float(v) for k, v in d["weights"].items()})

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Calibration:
        """A checkpoint's own calibration (config.json "confidence"), else the default."""
        own = (meta or {}).get("confidence")
        return cls.from_dict(own) if own else DEFAULT_CALIBRATION


# Fitted by `python bench/confidence.py` on the demo model (2,400 steps; beam 3, n-best 3) over
# 1,000 images of the synthetic test split and 1,000 of the unseen compositions; see
# bench/RESULTS.md. The mean log-probability and the length add nothing there (weight 0).
DEFAULT_CALIBRATION = Calibration(
    bias=-0.7045,
    weights={
        "mean_logit": 0.0,
        "min_token_logit": 0.1084,
        "min_token_margin": 0.1965,
        "shortness": 0.0,
    },
)


def fit_calibration(
    signals: Sequence[Signals],
    wrong: Sequence[bool],
    use: Sequence[str] | None = None,
    l2: float = 1e-3,
    steps: int = 500,
) -> Calibration:
    """Logistic regression of "right" on the features `use` (default: all), weights kept >= 0
    (L-BFGS on clamped weights: a weight the data would make negative ends at 0)."""
    import torch

    names = list(use or FEATURES)
    if not signals or len(signals) != len(wrong):
        raise ValueError("fit_calibration needs one `wrong` flag per signals row, and rows")
    x = torch.tensor([[FEATURES[n](s) for n in names] for s in signals], dtype=torch.float64)
    y = torch.tensor([0.0 if w else 1.0 for w in wrong], dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)  # fit on standard scores, then undo
    z = (x - mean) / std
    # Start every weight positive: a clamped weight at 0 passes no gradient, so one the data
    # pushes below 0 stays there (counts as 0), and the others are free to grow.
    w = torch.full((len(names),), 0.1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w.clamp(min=0) + b, y)
        loss = loss + l2 * (w.clamp(min=0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = (w.detach().clamp(min=0) / std).tolist()
    bias = float(b.detach() - (w.detach().clamp(min=0) / std * mean).sum())
    return Calibration(bias, {n: float(v) for n, v in zip(names, weights, strict=True)})


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for `positive` (higher score = more likely positive),
    by the rank formula with tied scores sharing their mean rank. NaN without both classes."""
    n_pos = sum(1 for p in positive if p)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # 1-based mean rank of the tie group
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
