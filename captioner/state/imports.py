"""Imports: captions (and reviews) written elsewhere, brought in for images of an import job.

An imported image is born queued (`jobs.submit_images`) and, in the same transaction, gets its
caption (`CaptionSource.IMPORT`, no model version) and is marked captioned
(`images.import_captions`), so no worker is ever sent it and no model caption can land over
the imported one. An imported review is a `Review` row like any other (the importer is its
reviewer): the image leaves the review queue as it would after a review in the dashboard.

Every function takes a `Session` and never commits: the caller owns the transaction. The job
counters (image_count, captioned_count, unreviewed_count) move in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from captioner.state import images
from captioner.state.jobs import CounterDeltas
from captioner.state.models import Image, Review, ReviewDecision, utcnow

# Images per statement group (SQLite caps the bound parameters of one statement).
IMPORT_CHUNK = 1000
# What an import may say about a caption.
IMPORT_DECISIONS = (ReviewDecision.APPROVED, ReviewDecision.CORRECTED, ReviewDecision.REJECTED)


@dataclass(frozen=True)
class ImportedCaption:
    """One queued image's imported caption, and the review that came with it (if any)."""

    image_id: int
    text: str
    score: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    decision: ReviewDecision | None = None
    review_text: str | None = None  # corrected: required; approved: the caption unless given


def import_captioned(
    session: Session,
    rows: Sequence[ImportedCaption],
    *,
    reviewer_id: int | None,
    now: datetime | None = None,
) -> list[int]:
    """Caption queued images by import, with their reviews (written by `reviewer_id`); returns
    the ids of the images captioned. Images not queued are left alone (see
    `images.import_captions`), so running it twice adds nothing. `ValueError` for a corrected
    review without text or a decision an import cannot make (checked before any write)."""
    for row in rows:
        _check_review(row)
    captioned: list[int] = []
    for start in range(0, len(rows), IMPORT_CHUNK):
        chunk = rows[start : start + IMPORT_CHUNK]
        captioned += _import_chunk(session, chunk, reviewer_id, now or utcnow())
    return sorted(captioned)


def _check_review(row: ImportedCaption) -> None:
    if row.decision is None:
        return
    if row.decision not in IMPORT_DECISIONS:
        raise ValueError(f"an import cannot record a review {row.decision.value!r}")
    if row.decision == ReviewDecision.CORRECTED and not (row.review_text or "").strip():
        raise ValueError("a corrected review needs the corrected text")


def _import_chunk(
    session: Session, rows: Sequence[ImportedCaption], reviewer_id: int | None, now: datetime
) -> list[int]:
    caption_rows = [
        images.CaptionRow(r.image_id, r.text, r.score, list(r.candidates)) for r in rows
    ]
    captions = images.import_captions(session, caption_rows)
    reviewed = [r for r in rows if r.decision is not None and r.image_id in captions]
    if reviewed:
        _add_reviews(session, reviewed, captions, reviewer_id, now)
    return list(captions)


def _add_reviews(
    session: Session,
    rows: Sequence[ImportedCaption],
    captions: dict[int, int],
    reviewer_id: int | None,
    now: datetime,
) -> None:
    """Append the imported reviews (one executemany), then take their images out of the review
    queue, counted in their jobs."""
    values = [
        {
            "image_id": r.image_id,
            "caption_id": captions[r.image_id],
            "reviewer_id": reviewer_id,
            "decision": r.decision,
            "text": _review_text(r),
            "created_at": now,
        }
        for r in rows
    ]
    session.execute(insert(Review), values)
    left = session.execute(
        update(Image)
        .where(Image.id.in_([r.image_id for r in rows]), Image.review_score.is_not(None))
        .values(review_score=None)
        .returning(Image.job_id)
        .execution_options(synchronize_session=False)
    )
    deltas = CounterDeltas()
    for job in left.scalars():
        deltas.add(job, "unreviewed_count", -1)
    deltas.apply(session)


def _review_text(row: ImportedCaption) -> str | None:
    """The text as the review settled it (as `reviews.add_review` records it)."""
    if row.decision == ReviewDecision.REJECTED:
        return None
    text = (row.review_text or "").strip()
    return text or row.text
