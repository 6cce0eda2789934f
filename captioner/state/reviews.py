"""Reviews: add, undo, bulk approve, current, history, and the review queue. History is
appended, never rewritten.

Every function takes a `Session` and never commits: the caller owns the transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, insert, literal, or_, select
from sqlalchemy.orm import Session

from captioner.state.jobs import LifecycleError, TransitionRefused
from captioner.state.models import (
    Caption,
    Image,
    Job,
    Review,
    ReviewDecision,
    utcnow,
)

# The most captions one bulk approval takes.
BULK_APPROVE_LIMIT = 100_000


class QueueStatus(enum.StrEnum):
    """Which images the review queue lists, by their current review."""

    UNREVIEWED = "unreviewed"  # no review yet, or the last one was undone
    REVIEWED = "reviewed"  # a current decision that is not `undone`
    APPROVED = "approved"
    CORRECTED = "corrected"
    REJECTED = "rejected"
    ANY = "any"


@dataclass(frozen=True)
class QueueFilter:
    """What the review queue lists: each image by its newest caption, filtered."""

    status: QueueStatus = QueueStatus.UNREVIEWED
    job_id: int | None = None
    min_score: float | None = None
    max_score: float | None = None
    text: str | None = None  # a substring of the caption, the reviewed text or the file name
    owner_id: int | None = None  # only jobs of this submitter; None: every job


@dataclass(frozen=True)
class QueuePage:
    """One page of the review queue: rows of (image, newest caption, current review or None)."""

    total: int
    rows: list[Any]


def add_review(
    session: Session,
    *,
    image_id: int,
    decision: ReviewDecision | str,
    text: str | None = None,
    caption_id: int | None = None,
    reviewer_id: int | None = None,
) -> Review:
    """Append a review (never edits an old one). Approved without text keeps the caption's text."""
    decision = ReviewDecision(decision)
    caption = session.get(Caption, caption_id) if caption_id is not None else None
    if caption_id is not None and (caption is None or caption.image_id != image_id):
        raise LifecycleError(f"caption {caption_id} is not a caption of image {image_id}")
    if decision == ReviewDecision.CORRECTED and not (text and text.strip()):
        raise LifecycleError("a corrected review needs the corrected text")
    if decision == ReviewDecision.APPROVED and text is None:
        if caption is None:
            raise LifecycleError("an approval needs the caption it approves, or the text")
        text = caption.text
    if decision == ReviewDecision.REJECTED:
        text = None
    review = Review(
        image_id=image_id,
        caption_id=caption_id,
        reviewer_id=reviewer_id,
        decision=decision,
        text=text.strip() if text else text,
    )
    session.add(review)
    session.flush()
    return review


def current_review_ids():
    """A subquery of the current (newest) review id per image: columns image_id, review_id."""
    return (
        select(Review.image_id, func.max(Review.id).label("review_id"))
        .group_by(Review.image_id)
        .subquery("current_reviews")
    )


def current_review(session: Session, image_id: int) -> Review | None:
    return session.scalars(
        select(Review).where(Review.image_id == image_id).order_by(Review.id.desc()).limit(1)
    ).first()


def review_history(session: Session, image_id: int) -> list[Review]:
    """Every review of an image, oldest first."""
    return list(
        session.scalars(select(Review).where(Review.image_id == image_id).order_by(Review.id))
    )


def effective_stack(history: Sequence[Review]) -> list[Review]:
    """Replay an image's reviews: an undo row takes back the one on top, others push."""
    stack: list[Review] = []
    for review in history:
        if review.undoes_id is None:
            stack.append(review)
        elif stack:
            stack.pop()
    return stack


def undo_review(session: Session, image_id: int, reviewer_id: int | None = None) -> Review:
    """Take back the image's current decision by appending a row that restores the one before
    it (or `undone` when none remains). Raises `TransitionRefused` when nothing is left to undo."""
    stack = effective_stack(review_history(session, image_id))
    if not stack:
        raise TransitionRefused("nothing to undo")
    target = stack[-1]
    restored = stack[-2] if len(stack) > 1 else None
    review = Review(
        image_id=image_id,
        caption_id=restored.caption_id if restored else target.caption_id,
        reviewer_id=reviewer_id,
        decision=restored.decision if restored else ReviewDecision.UNDONE,
        text=restored.text if restored else None,
        undoes_id=target.id,
    )
    session.add(review)
    session.flush()
    return review


def bulk_approve(
    session: Session,
    *,
    job_id: int,
    min_score: float,
    reviewer_id: int | None = None,
    now: datetime | None = None,
) -> int:
    """Approve the newest caption of every unreviewed image of a job scoring at least
    `min_score`; returns how many approvals were added.

    One INSERT ... SELECT: whether an image is still unreviewed is decided inside the statement
    that adds its approval, so an image reviewed meanwhile is skipped, not overruled.
    """
    approval = (
        Image.id,
        Caption.id,
        literal(reviewer_id, Review.__table__.c.reviewer_id.type),
        literal(ReviewDecision.APPROVED, Review.__table__.c.decision.type),
        Caption.text,
        literal(now or utcnow(), Review.__table__.c.created_at.type),
    )
    filters = QueueFilter(job_id=job_id, min_score=min_score)
    rows = _queue_select(approval, filters).limit(BULK_APPROVE_LIMIT)
    columns = ["image_id", "caption_id", "reviewer_id", "decision", "text", "created_at"]
    added = session.scalars(insert(Review).from_select(columns, rows).returning(Review.id))
    return len(added.all())


# --- the review queue -----------------------------------------------------------------------


def _queue_select(columns: Sequence[Any], filters: QueueFilter) -> Select:
    """The review queue's joins and filters, selecting `columns`."""
    newest_caption = (
        select(Caption.image_id, func.max(Caption.id).label("caption_id"))
        .group_by(Caption.image_id)
        .subquery("newest_caption")
    )
    current = current_review_ids()
    query = (
        select(*columns)
        .select_from(Image)
        .join(newest_caption, newest_caption.c.image_id == Image.id)
        .join(Caption, Caption.id == newest_caption.c.caption_id)
        .outerjoin(current, current.c.image_id == Image.id)
        .outerjoin(Review, Review.id == current.c.review_id)
    )
    if filters.owner_id is not None:
        query = query.join(Job, Job.id == Image.job_id).where(Job.owner_id == filters.owner_id)
    query = query.where(*_queue_conditions(filters))
    return query.order_by(Caption.score.asc(), Caption.id)


def review_queue(
    session: Session, filters: QueueFilter, *, limit: int = 50, offset: int = 0
) -> QueuePage:
    """One page of the review queue, least confident first: rows of (image, newest caption,
    current review or None), and the number of rows the filters match."""
    query = _queue_select((Image, Caption, Review), filters)
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = session.execute(query.limit(limit).offset(offset)).all()
    return QueuePage(total=total or 0, rows=list(rows))


def _queue_conditions(filters: QueueFilter) -> list[ColumnElement[bool]]:
    status = _status_condition(filters.status)
    conditions = [] if status is None else [status]
    if filters.job_id is not None:
        conditions.append(Image.job_id == filters.job_id)
    if filters.min_score is not None:
        conditions.append(Caption.score >= filters.min_score)
    if filters.max_score is not None:
        conditions.append(Caption.score <= filters.max_score)
    if filters.text:
        conditions.append(_text_condition(filters.text))
    return conditions


def _status_condition(status: QueueStatus) -> ColumnElement[bool] | None:
    if status == QueueStatus.UNREVIEWED:
        return or_(Review.id.is_(None), Review.decision == ReviewDecision.UNDONE)
    if status == QueueStatus.REVIEWED:
        return and_(Review.id.is_not(None), Review.decision != ReviewDecision.UNDONE)
    if status == QueueStatus.ANY:
        return None
    return Review.decision == ReviewDecision(status.value)


def _text_condition(text: str) -> ColumnElement[bool]:
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return or_(
        Caption.text.ilike(pattern, escape="\\"),
        Review.text.ilike(pattern, escape="\\"),
        Image.original_name.ilike(pattern, escape="\\"),
    )
