"""What a training run trains and evaluates on: the review snapshot.

The snapshot is taken when a run starts and recorded on it (review ids, high-water mark):
- only the current review of an image counts, and only approvals and corrections;
- reviews by reviewers an admin excluded (`User.training_excluded_at`) are left out;
- the held-out set: every newly reviewed image goes, by a hash of its id, to the held-out set
  with probability `holdout_share` (`Image.split = holdout`) and stays there; held-out images are
  evaluated on, never trained on, so the set is fixed and grows with every run;
- once two or more reviewers contributed, no reviewer supplies more than `max_reviewer_share`
  of the reviewed training examples (their oldest reviews beyond the cap are dropped, and the
  run's params say how many); a sole reviewer's reviews all train;
- the run's params record the accounting (`Snapshot.accounting`): reviews considered, used for
  training, held out, and how many were left out for each reason.

When the run executes, `run_examples` reads the recorded reviews back, and `dataset_records`
loads the replay and anchor data sets that complete them.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, true, update
from sqlalchemy.orm import Session

from captioner.state.models import Image, Review, ReviewDecision, Split, User

if TYPE_CHECKING:
    from captioner.settings import Settings
    from captioner.storage import ObjectStore

_CHUNK = 500  # ids per IN (...) clause


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
    """The reviews a run is started with: what it trains on, what it is evaluated on, the
    high-water mark, and what the reviewer cap and exclusions left out."""

    train: list[Example]
    holdout: list[Example]
    max_review_id: int
    dropped_by_cap: dict[str, int] = field(default_factory=dict)  # reviewer id -> dropped
    excluded_reviewers: list[int] = field(default_factory=list)
    accounting: dict[str, Any] = field(default_factory=dict)  # see `accounting`


# Why a current review that approves or corrects a caption is in neither set.
LEFT_OUT_REASONS = {
    "excluded_reviewer": "written by a reviewer an admin left out of training",
    "reviewer_cap": "over one reviewer's share of the training examples (max reviewer share)",
    "over_max_training_examples": "older than the newest training examples a run takes",
    "over_max_held_out": "beyond the largest held-out set a run evaluates on",
}


@dataclass(frozen=True)
class Capped:
    """Examples after the reviewer cap: those kept, and how many each reviewer lost."""

    kept: list[Example]
    dropped: dict[str, int]  # reviewer id (as text) -> examples dropped


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
    for start in range(0, len(chosen), _CHUNK):
        session.execute(
            update(Image)
            .where(Image.id.in_(chosen[start : start + _CHUNK]), Image.split == Split.TRAIN)
            .values(split=Split.HOLDOUT)
            .execution_options(synchronize_session=False)
        )
    return chosen


def current_examples(
    session: Session, up_to_review_id: int | None = None, *, include_excluded: bool = False
) -> list[Example]:
    """Every image's current review that approves or corrects a caption, oldest review first;
    reviews by excluded reviewers are left out unless `include_excluded`."""
    newest = select(Review.image_id, func.max(Review.id).label("review_id"))
    if up_to_review_id is not None:
        newest = newest.where(Review.id <= up_to_review_id)
    current = newest.group_by(Review.image_id).subquery("current_reviews")
    kept_reviewers = or_(Review.reviewer_id.is_(None), User.training_excluded_at.is_(None))
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
            true() if include_excluded else kept_reviewers,
        )
        .order_by(Review.id)
    )
    return [
        Example(rid, iid, key, text, Split(sp), reviewer, ReviewDecision(decision))
        for rid, iid, key, text, sp, reviewer, decision in session.execute(query)
        if text and text.strip()
    ]


def reviewer_cap(counts: Counter[int | None], share: float) -> int:
    """The largest count c with c <= share * sum(min(n_r, c)) over reviewers r."""
    for c in range(max(counts.values()), -1, -1):
        if c <= share * sum(min(n, c) for n in counts.values()):
            return c
    return 0


def contributing_reviewers(examples: Sequence[Example]) -> int:
    """How many people wrote the examples (reviews without a reviewer are nobody's)."""
    return len({e.reviewer_id for e in examples if e.reviewer_id is not None})


def cap_reviewer_share(examples: Sequence[Example], share: float) -> Capped:
    """Keep at most `share` of the kept examples from any one reviewer (their newest ones),
    once two or more reviewers contributed: a sole reviewer's examples are all kept.

    With the cap c of `reviewer_cap`, after capping every reviewer holds at most `share` of
    what is kept. Once the cap applies, reviews without a reviewer count as one more
    "reviewer".
    """
    counts = Counter(e.reviewer_id for e in examples)
    if share >= 1.0 or contributing_reviewers(examples) < 2:
        return Capped(list(examples), {})
    cap = reviewer_cap(counts, share)
    by_reviewer: dict[int | None, list[Example]] = {}
    for e in examples:
        by_reviewer.setdefault(e.reviewer_id, []).append(e)
    kept_ids = {
        e.review_id
        for items in by_reviewer.values()
        for e in sorted(items, key=lambda e: e.review_id, reverse=True)[:cap]
    }
    dropped = {str(r): n - cap for r, n in counts.items() if n > cap}
    return Capped([e for e in examples if e.review_id in kept_ids], dropped)


def take_snapshot(session: Session, settings: Settings, after_review_id: int) -> Snapshot:
    """Assign new held-out images, then split the current reviews into train and held-out."""
    assign_holdout(session, settings.holdout_share, after_review_id)
    excluded = list(session.scalars(select(User.id).where(User.training_excluded_at.is_not(None))))
    considered = current_examples(session, include_excluded=True)
    left_out = set(excluded)
    examples = [e for e in considered if e.reviewer_id not in left_out]
    train_all = [e for e in examples if e.split == Split.TRAIN]
    train = train_all[-settings.retrain_max_examples :]  # the newest
    capped = cap_reviewer_share(train, settings.max_reviewer_share)
    holdout_all = sorted(
        (e for e in examples if e.split == Split.HOLDOUT), key=lambda e: e.image_id
    )
    holdout = holdout_all[: settings.holdout_max_images]
    max_review_id = session.scalar(select(func.max(Review.id))) or 0
    counts = {
        "considered": len(considered),
        "used_for_training": len(capped.kept),
        "held_out": len(holdout),
        "reviewers": contributing_reviewers(train),
        "reviewer_cap_applied": contributing_reviewers(train) >= 2
        and settings.max_reviewer_share < 1.0,
        "left_out": {
            "excluded_reviewer": len(considered) - len(examples),
            "reviewer_cap": sum(capped.dropped.values()),
            "over_max_training_examples": len(train_all) - len(train),
            "over_max_held_out": len(holdout_all) - len(holdout),
        },
    }
    return Snapshot(
        capped.kept, holdout, int(max_review_id), capped.dropped, excluded, accounting=counts
    )


def left_out_lines(accounting: dict[str, Any]) -> list[str]:
    """Why reviews were left out of a run, one line per reason that left any out."""
    left = accounting.get("left_out") or {}
    return [
        f"{n} {'review' if n == 1 else 'reviews'}: {LEFT_OUT_REASONS.get(key, key)}"
        for key, n in left.items()
        if n
    ]


# --- reading a run's snapshot back -----------------------------------------------------------


@dataclass(frozen=True)
class ReviewedCaption:
    """A review recorded in a run's snapshot, as read back when the run executes."""

    review_id: int
    storage_key: str
    text: str
    approved: bool

    @property
    def pair(self) -> tuple[str, str]:
        """(image reference, caption): an example as `core_model` takes it."""
        return self.storage_key, self.text


@dataclass(frozen=True)
class RunExamples:
    """The reviews a run's snapshot names, as (image reference, caption) examples: what it
    trains on, the held-out set, and the held-out approvals (captions the model already got
    right: the reviewed part of the anchor set)."""

    train: list[tuple[str, str]]
    holdout: list[tuple[str, str]]
    holdout_approved: list[tuple[str, str]]


def reviewed_captions(session: Session, review_ids: Sequence[int]) -> list[ReviewedCaption]:
    """The given reviews with their image's storage key, in review id order."""
    ids = list(review_ids)
    out: list[ReviewedCaption] = []
    for start in range(0, len(ids), _CHUNK):
        rows = session.execute(
            select(Review.id, Image.storage_key, Review.text, Review.decision)
            .join(Image, Image.id == Review.image_id)
            .where(Review.id.in_(ids[start : start + _CHUNK]))
        ).all()
        out += [
            ReviewedCaption(rid, key, text, ReviewDecision(d) == ReviewDecision.APPROVED)
            for rid, key, text, d in rows
        ]
    return sorted(out, key=lambda r: r.review_id)


def run_examples(
    session: Session, train_review_ids: Sequence[int], holdout_review_ids: Sequence[int]
) -> RunExamples:
    """Read back the reviews a run recorded when it started."""
    held = reviewed_captions(session, holdout_review_ids)
    return RunExamples(
        train=[r.pair for r in reviewed_captions(session, train_review_ids)],
        holdout=[r.pair for r in held],
        holdout_approved=[r.pair for r in held if r.approved],
    )


# --- data sets beside the reviews: replay and anchor ----------------------------------------


def dataset_records(spec: str, split: str, base_meta: dict[str, Any]) -> Sequence:
    """Records of a data spec (replay and anchor data); a synthetic world is the base
    checkpoint's own (or the default)."""
    from core_model.datasets import load_records

    world = None
    if spec == "synthetic":
        from core_model.synthetic import SyntheticWorld, world_config_from_dict

        world_cfg = (base_meta.get("provenance") or {}).get("world")
        world = SyntheticWorld(world_config_from_dict(world_cfg)) if world_cfg else SyntheticWorld()
    return load_records(spec, split, world=world)


def image_reader(store: ObjectStore) -> Callable[[str], bytes]:
    """Image bytes by reference: object-store keys (reviews), absolute file paths (replay and
    anchor data sets)."""

    def read(ref: str) -> bytes:
        if Path(ref).is_absolute():
            return Path(ref).read_bytes()
        return store.get(ref)

    return read
