"""Reviews: add, current, history, queue. History is appended, never rewritten.

Every function takes a `Session` and never commits: the caller owns the transaction.
"""

from __future__ import annotations

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from captioner.state.jobs import LifecycleError
from captioner.state.models import (
    Caption,
    Image,
    Review,
    ReviewDecision,
)


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


def review_queue(
    session: Session, *, model_version_id: int, limit: int = 50, job_id: int | None = None
) -> list[Caption]:
    """Unreviewed captions of one model version, least confident first."""
    query = (
        select(Caption)
        .where(
            Caption.model_version_id == model_version_id,
            ~exists().where(Review.image_id == Caption.image_id),
        )
        .order_by(Caption.score.asc(), Caption.id)
        .limit(limit)
    )
    if job_id is not None:
        query = query.join(Image, Image.id == Caption.image_id).where(Image.job_id == job_id)
    return list(session.scalars(query))
