"""Reviews: add, undo, bulk approve, current, history, and the review queue. History is
appended, never rewritten.

Every function takes a `Session` and never commits: the caller owns the transaction. Every
review keeps the image's review-queue key (`Image.review_score`: set while the image awaits
review) and its job's `unreviewed_count` in the same transaction.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, insert, literal, select, tuple_, update
from sqlalchemy.orm import Session, aliased

from captioner.state.images import awaiting_review, newest_caption_score
from captioner.state.jobs import CounterDeltas, LifecycleError, TransitionRefused
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
# A queue total that needs counting rows (score or text filters, reviewed statuses) stops here.
QUEUE_COUNT_CAP = 10_000


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


_CURSOR = struct.Struct(">dq")


@dataclass(frozen=True)
class QueueCursor:
    """Where a page of the review queue ended: the (score, image id) of its last row. The next
    page starts after it, so rows reviewed or added meanwhile never shift the walk."""

    score: float
    image_id: int

    def encode(self) -> str:
        """An opaque, URL-safe string (the exact float, no rounding)."""
        raw = _CURSOR.pack(self.score, self.image_id)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, value: str) -> QueueCursor:
        """The cursor `encode` gave; `LifecycleError` for anything else."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            score, image_id = _CURSOR.unpack(raw)
        except (binascii.Error, struct.error, ValueError, TypeError) as exc:
            raise LifecycleError("not a review queue cursor") from exc
        if not math.isfinite(score) or image_id < 1:
            raise LifecycleError("not a review queue cursor")
        return cls(score, image_id)


@dataclass(frozen=True)
class QueuePage:
    """One page of the review queue: rows of (image, newest caption, current review or None),
    the number of rows the filters match (`total`; when that needs counting rows it stops at
    `QUEUE_COUNT_CAP` and `total_exact` is False), and the cursor of the next page (None on
    the last one)."""

    total: int
    rows: list[Any]
    next_cursor: QueueCursor | None = None
    total_exact: bool = True


# --- reviews --------------------------------------------------------------------------------


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
    job_id = _lock_image(session, image_id)
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
    _keep_queue_key(session, image_id, job_id, review.decision)
    return review


def _lock_image(session: Session, image_id: int) -> int:
    """Lock the image row (PostgreSQL: FOR NO KEY UPDATE) so reviews of one image are added one
    at a time, each seeing the one before; returns its job id."""
    job_id = session.scalar(
        select(Image.job_id).where(Image.id == image_id).with_for_update(key_share=True)
    )
    if job_id is None:
        raise LifecycleError(f"no image with id {image_id}")
    return job_id


def _keep_queue_key(session: Session, image_id: int, job_id: int, current: ReviewDecision) -> None:
    """The image's current review is now `current`: it awaits review again (`undone`, and it
    has a caption) or no longer; the job's unreviewed_count follows the key."""
    if current == ReviewDecision.UNDONE:
        changed = update(Image).where(Image.review_score.is_(None), awaiting_review())
        changed, step = changed.values(review_score=newest_caption_score()), 1
    else:
        changed = update(Image).where(Image.review_score.is_not(None))
        changed, step = changed.values(review_score=None), -1
    rows = session.execute(
        changed.where(Image.id == image_id)
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    if rows.first() is not None:
        deltas = CounterDeltas()
        deltas.add(job_id, "unreviewed_count", step)
        deltas.apply(session)


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
    job_id = _lock_image(session, image_id)
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
    _keep_queue_key(session, image_id, job_id, review.decision)
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

    One INSERT ... SELECT over the job's review-queue index: whether an image is still
    unreviewed is decided inside the statement that adds its approval, so an image reviewed
    meanwhile is skipped, not overruled. Then the approved images leave the queue.
    """
    approval = (
        Image.id,
        Caption.id,
        literal(reviewer_id, Review.__table__.c.reviewer_id.type),
        literal(ReviewDecision.APPROVED, Review.__table__.c.decision.type),
        Caption.text,
        literal(now or utcnow(), Review.__table__.c.created_at.type),
    )
    rows = (
        select(*approval)
        .select_from(Image)
        .join(Caption, Caption.id == _newest_caption_id())
        .where(
            Image.job_id == job_id,
            Image.review_score.is_not(None),
            Image.review_score >= min_score,
        )
        .order_by(Image.review_score, Image.id)
        .limit(BULK_APPROVE_LIMIT)
    )
    columns = ["image_id", "caption_id", "reviewer_id", "decision", "text", "created_at"]
    approved = list(
        session.scalars(insert(Review).from_select(columns, rows).returning(Review.image_id))
    )
    deltas = CounterDeltas()
    for start in range(0, len(approved), 500):
        left = session.execute(
            update(Image)
            .where(Image.id.in_(approved[start : start + 500]), Image.review_score.is_not(None))
            .values(review_score=None)
            .returning(Image.job_id)
            .execution_options(synchronize_session=False)
        )
        for job in left.scalars():
            deltas.add(job, "unreviewed_count", -1)
    deltas.apply(session)
    return len(approved)


def _newest_caption_id():
    newer = aliased(Caption)
    return (
        select(func.max(newer.id))
        .where(newer.image_id == Image.id)
        .correlate(Image)
        .scalar_subquery()
    )


# --- the review queue -----------------------------------------------------------------------


def review_queue(
    session: Session,
    filters: QueueFilter,
    *,
    limit: int = 50,
    after: QueueCursor | str | None = None,
    offset: int = 0,
) -> QueuePage:
    """One page of the review queue, least confident first (by the newest caption's score, then
    image id): rows of (image, newest caption, current review or None), the total, and the
    cursor to pass as `after` for the next page.

    The unreviewed queue walks the partial index on `Image.review_score` from the cursor and
    takes its total from the job counters: its cost does not grow with the table. It never
    uses `offset` (LifecycleError); the other statuses accept it, or a cursor.
    """
    if isinstance(after, str):
        after = QueueCursor.decode(after)
    if filters.status == QueueStatus.UNREVIEWED:
        if offset:
            raise LifecycleError("the unreviewed queue pages by cursor (after=...), not offset")
        return _unreviewed_page(session, filters, limit, after)
    return _reviewed_page(session, filters, limit, after, offset)


def _unreviewed_page(
    session: Session, filters: QueueFilter, limit: int, after: QueueCursor | None
) -> QueuePage:
    keys = select(Image.id, Image.review_score).where(*_unreviewed_conditions(filters))
    page = keys
    if after is not None:
        page = page.where(
            tuple_(Image.review_score, Image.id) > tuple_(literal(after.score), after.image_id)
        )
    found = session.execute(page.order_by(Image.review_score, Image.id).limit(limit + 1)).all()
    more = len(found) > limit
    found = found[:limit]
    rows = _queue_rows(session, [image_id for image_id, _ in found])
    next_cursor = QueueCursor(found[-1][1], found[-1][0]) if more else None
    if _counters_answer(filters):
        total, exact = _unreviewed_total(session, filters), True
    else:
        total, exact = _capped_count(session, keys)
    return QueuePage(total=total, rows=rows, next_cursor=next_cursor, total_exact=exact)


def _unreviewed_conditions(filters: QueueFilter) -> list[ColumnElement[bool]]:
    """The filters on the unreviewed queue, in terms the partial indexes serve."""
    conditions = [Image.review_score.is_not(None)]
    if filters.job_id is not None:
        conditions.append(Image.job_id == filters.job_id)
    if filters.owner_id is not None:
        conditions.append(Image.job_id.in_(select(Job.id).where(Job.owner_id == filters.owner_id)))
    if filters.min_score is not None:
        conditions.append(Image.review_score >= filters.min_score)
    if filters.max_score is not None:
        conditions.append(Image.review_score <= filters.max_score)
    if filters.text:
        # An unreviewed image has no current review text: its caption's or its file name.
        newer = aliased(Caption)
        newest_text = (
            select(newer.text)
            .where(newer.image_id == Image.id)
            .order_by(newer.id.desc())
            .limit(1)
            .correlate(Image)
            .scalar_subquery()
        )
        pattern = _like_pattern(filters.text)
        conditions.append(
            newest_text.ilike(pattern, escape="\\")
            | Image.original_name.ilike(pattern, escape="\\")
        )
    return conditions


def _counters_answer(filters: QueueFilter) -> bool:
    """Whether the job counters give the total: no score or text filter."""
    return filters.min_score is None and filters.max_score is None and not filters.text


def _unreviewed_total(session: Session, filters: QueueFilter) -> int:
    """Images awaiting review in the visible jobs: a sum of job counters, never a COUNT."""
    query = select(func.coalesce(func.sum(Job.unreviewed_count), 0))
    if filters.job_id is not None:
        query = query.where(Job.id == filters.job_id)
    if filters.owner_id is not None:
        query = query.where(Job.owner_id == filters.owner_id)
    return int(session.scalar(query) or 0)


def _capped_count(session: Session, query: Select) -> tuple[int, bool]:
    """(rows `query` matches, up to `QUEUE_COUNT_CAP`; whether that is all of them)."""
    capped = query.order_by(None).limit(QUEUE_COUNT_CAP + 1).subquery()
    n = session.scalar(select(func.count()).select_from(capped)) or 0
    return min(n, QUEUE_COUNT_CAP), n <= QUEUE_COUNT_CAP


def _queue_rows(session: Session, image_ids: list[int]) -> list[tuple[Image, Caption, Any]]:
    """(image, newest caption, current review or None) of these images, in this order."""
    if not image_ids:
        return []
    newest = (
        select(Caption.image_id, func.max(Caption.id).label("caption_id"))
        .where(Caption.image_id.in_(image_ids))
        .group_by(Caption.image_id)
        .subquery("newest_caption")
    )
    current = (
        select(Review.image_id, func.max(Review.id).label("review_id"))
        .where(Review.image_id.in_(image_ids))
        .group_by(Review.image_id)
        .subquery("current_review")
    )
    query = (
        select(Image, Caption, Review)
        .join(newest, newest.c.image_id == Image.id)
        .join(Caption, Caption.id == newest.c.caption_id)
        .outerjoin(current, current.c.image_id == Image.id)
        .outerjoin(Review, Review.id == current.c.review_id)
        .where(Image.id.in_(image_ids))
    )
    by_id = {
        image.id: (image, caption, review) for image, caption, review in session.execute(query)
    }
    return [by_id[i] for i in image_ids if i in by_id]


def _reviewed_page(
    session: Session, filters: QueueFilter, limit: int, after: QueueCursor | None, offset: int
) -> QueuePage:
    """Any other status: a join over each image's newest caption and current review."""
    query = _queue_select((Image, Caption, Review), filters)
    total, exact = _capped_count(session, query)
    if after is not None:
        query = query.where(
            tuple_(Caption.score, Image.id) > tuple_(literal(after.score), after.image_id)
        )
    found = session.execute(query.limit(limit + 1).offset(offset)).all()
    more = len(found) > limit
    rows = [tuple(row) for row in found[:limit]]
    next_cursor = QueueCursor(rows[-1][1].score, rows[-1][0].id) if more else None
    return QueuePage(total=total, rows=rows, next_cursor=next_cursor, total_exact=exact)


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
    return query.order_by(Caption.score.asc(), Image.id)


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
        pattern = _like_pattern(filters.text)
        conditions.append(
            Caption.text.ilike(pattern, escape="\\")
            | Review.text.ilike(pattern, escape="\\")
            | Image.original_name.ilike(pattern, escape="\\")
        )
    return conditions


def _status_condition(status: QueueStatus) -> ColumnElement[bool] | None:
    if status == QueueStatus.REVIEWED:
        return and_(Review.id.is_not(None), Review.decision != ReviewDecision.UNDONE)
    if status == QueueStatus.ANY:
        return None
    return Review.decision == ReviewDecision(status.value)


def _like_pattern(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
