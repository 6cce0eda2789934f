"""Reviews: add, undo, bulk approve (previewed, and undone as one batch), approve a chosen
set, one review per image content, current, history, and the review queue. History is
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
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
# The most captions a bulk approval's preview shows, and one "approve these" call takes.
APPROVAL_SAMPLE_LIMIT = 100
APPROVE_IMAGES_LIMIT = 500
# Images locked and undone per statement group when a bulk approval is undone.
UNDO_CHUNK = 500
# A queue total that needs counting rows (score or text filters, reviewed statuses) stops here.
QUEUE_COUNT_CAP = 10_000
# When the unreviewed queue leaves some keys out (`skip`): keys read past the page's size in
# one go, and reads at most, before a page is answered with what it has.
SKIP_SLACK = 16
SKIP_ROUNDS = 4
# The decisions one review per image content passes on to the other images of that content.
SHARED_DECISIONS = (ReviewDecision.APPROVED, ReviewDecision.CORRECTED, ReviewDecision.REJECTED)


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
    deltas = CounterDeltas()
    review = _append_review(
        session,
        image_id=image_id,
        decision=decision,
        text=text,
        caption_id=caption_id,
        reviewer_id=reviewer_id,
        deltas=deltas,
    )
    deltas.apply(session)
    return review


def _append_review(
    session: Session,
    *,
    image_id: int,
    decision: ReviewDecision | str,
    text: str | None,
    caption_id: int | None,
    reviewer_id: int | None,
    deltas: CounterDeltas,
) -> Review:
    """`add_review`, its counter change gathered in `deltas` (the caller applies them)."""
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
    _keep_queue_key(session, image_id, job_id, review.decision, deltas)
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


def _keep_queue_key(
    session: Session,
    image_id: int,
    job_id: int,
    current: ReviewDecision,
    deltas: CounterDeltas | None = None,
) -> None:
    """The image's current review is now `current`: it awaits review again (`undone`, and it
    has a caption) or no longer; the job's unreviewed_count follows the key (gathered in
    `deltas` when given, else applied now)."""
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
        gathered = deltas if deltas is not None else CounterDeltas()
        gathered.add(job_id, "unreviewed_count", step)
        if deltas is None:
            gathered.apply(session)


def _keep_queue_keys(
    session: Session,
    image_ids: Sequence[int],
    awaiting: bool,
    deltas: CounterDeltas | None = None,
) -> None:
    """`_keep_queue_key` for many images at once, 500 per statement: they await review again
    (`awaiting`: their current review is `undone`) or no longer; their jobs' unreviewed_count
    follows the keys that changed (gathered in `deltas` when given, else applied now)."""
    if awaiting:
        changed = update(Image).where(Image.review_score.is_(None), awaiting_review())
        changed, step = changed.values(review_score=newest_caption_score()), 1
    else:
        changed = update(Image).where(Image.review_score.is_not(None))
        changed, step = changed.values(review_score=None), -1
    gathered = deltas if deltas is not None else CounterDeltas()
    ids = list(image_ids)
    for start in range(0, len(ids), 500):
        jobs_of_changed = session.scalars(
            changed.where(Image.id.in_(ids[start : start + 500]))
            .returning(Image.job_id)
            .execution_options(synchronize_session=False)
        )
        for job_id in jobs_of_changed:
            gathered.add(job_id, "unreviewed_count", step)
    if deltas is None:
        gathered.apply(session)


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
    deltas = CounterDeltas()
    review = _append_undo(session, image_id, reviewer_id, deltas)
    deltas.apply(session)
    return review


def _append_undo(
    session: Session, image_id: int, reviewer_id: int | None, deltas: CounterDeltas
) -> Review:
    """`undo_review`, its counter change gathered in `deltas` (the caller applies them)."""
    job_id = _lock_image(session, image_id)
    stack = effective_stack(review_history(session, image_id))
    if not stack:
        raise TransitionRefused("nothing to undo")
    review = _undo_row(image_id, stack, reviewer_id)
    session.add(review)
    session.flush()
    _keep_queue_key(session, image_id, job_id, review.decision, deltas)
    return review


def _undo_row(image_id: int, stack: Sequence[Review], reviewer_id: int | None) -> Review:
    """The row that takes back the top of an image's effective stack: it restores the decision
    below it, or is `undone` when none remains."""
    target = stack[-1]
    restored = stack[-2] if len(stack) > 1 else None
    return Review(
        image_id=image_id,
        caption_id=restored.caption_id if restored else target.caption_id,
        reviewer_id=reviewer_id,
        decision=restored.decision if restored else ReviewDecision.UNDONE,
        text=restored.text if restored else None,
        undoes_id=target.id,
    )


def bulk_approve(
    session: Session,
    *,
    job_id: int,
    min_score: float,
    reviewer_id: int | None = None,
    now: datetime | None = None,
) -> int:
    """Approve the newest caption of every unreviewed image of a job scoring at least
    `min_score`; returns how many approvals were added (see `approve_batch`)."""
    batch = approve_batch(
        session, job_id=job_id, min_score=min_score, reviewer_id=reviewer_id, now=now
    )
    return batch.count


_BATCH = struct.Struct(">qqqqq")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ApprovalBatch:
    """The approvals one `approve_batch` added (`count` of them): review rows with ids from
    `first_review_id` to `last_review_id`, all approvals by `reviewer_id` made at `created_at`,
    of images of `job_id`. `encode()` names the batch for `undo_approval_batch`; rows of
    other reviews that fall in the id range (concurrent ones) never match all of it."""

    job_id: int
    reviewer_id: int | None
    first_review_id: int
    last_review_id: int
    created_at: datetime
    count: int = 0

    def encode(self) -> str:
        """An opaque, URL-safe string (the exact time, to the microsecond)."""
        micros = (self.created_at - _EPOCH) // timedelta(microseconds=1)
        raw = _BATCH.pack(
            self.job_id, self.reviewer_id or 0, self.first_review_id, self.last_review_id, micros
        )
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, value: str) -> ApprovalBatch:
        """The batch `encode` gave (its count unknown: 0); `LifecycleError` for anything else."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            job_id, reviewer_id, first, last, micros = _BATCH.unpack(raw)
            created_at = _EPOCH + timedelta(microseconds=micros)
        except (binascii.Error, struct.error, ValueError, TypeError, OverflowError) as exc:
            raise LifecycleError("not an approval batch") from exc
        if min(job_id, first) < 1 or reviewer_id < 0 or last < first:
            raise LifecycleError("not an approval batch")
        return cls(job_id, reviewer_id or None, first, last, created_at)


def approve_batch(
    session: Session,
    *,
    job_id: int,
    min_score: float,
    reviewer_id: int | None = None,
    now: datetime | None = None,
) -> ApprovalBatch:
    """Approve the newest caption of every unreviewed image of a job scoring at least
    `min_score` (at most `BULK_APPROVE_LIMIT`, least confident first); returns the batch of
    approvals added, which `undo_approval_batch` takes back as one action.

    One INSERT ... SELECT over the job's review-queue index: whether an image is still
    unreviewed is decided inside the statement that adds its approval, so an image reviewed
    meanwhile is skipped, not overruled. Then the approved images leave the queue.
    """
    now = now or utcnow()
    approval = (
        Image.id,
        Caption.id,
        literal(reviewer_id, Review.__table__.c.reviewer_id.type),
        literal(ReviewDecision.APPROVED, Review.__table__.c.decision.type),
        Caption.text,
        literal(now, Review.__table__.c.created_at.type),
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
    added = session.execute(
        insert(Review).from_select(columns, rows).returning(Review.id, Review.image_id)
    ).all()
    _keep_queue_keys(session, [image_id for _, image_id in added], awaiting=False)
    review_ids = [review_id for review_id, _ in added]
    return ApprovalBatch(
        job_id=job_id,
        reviewer_id=reviewer_id,
        first_review_id=min(review_ids, default=0),
        last_review_id=max(review_ids, default=0),
        created_at=now,
        count=len(added),
    )


@dataclass(frozen=True)
class ApprovalPreview:
    """What `approve_batch` would do now, without doing it: how many captions it would
    approve (`count`; `count_exact` False when more match than the `BULK_APPROVE_LIMIT` it
    takes) and a sample of them, (image, newest caption) of the lowest scoring: the ones
    closest to the threshold, the likeliest to be wrong."""

    count: int
    count_exact: bool
    sample: list[tuple[Image, Caption]]


def preview_bulk_approve(
    session: Session, *, job_id: int, min_score: float, sample: int = 12
) -> ApprovalPreview:
    """The approvals `approve_batch(job_id, min_score)` would add now; writes nothing. Reads
    the job's review-queue index: at most `BULK_APPROVE_LIMIT` + 1 entries counted."""
    keys = select(Image.id).where(
        Image.job_id == job_id, Image.review_score.is_not(None), Image.review_score >= min_score
    )
    count, exact = _capped_count(session, keys, BULK_APPROVE_LIMIT)
    first = session.scalars(keys.order_by(Image.review_score, Image.id).limit(sample))
    rows = [(image, caption) for image, caption, _ in _queue_rows(session, list(first))]
    return ApprovalPreview(count, exact, rows)


def undo_approval_batch(
    session: Session, batch: ApprovalBatch, *, reviewer_id: int | None = None
) -> int:
    """Take back, as one action, every approval of `batch` that is still its image's current
    review: each gets the row `undo_review` would append (by `reviewer_id`), and its image
    awaits review again. An image reviewed since the batch keeps that review. Returns how many
    approvals were taken back; a second call finds none left (0).

    Walks the batch's review ids by keyset, `UNDO_CHUNK` at a time: per chunk the images are
    locked (in id order), their histories read and the undo rows added.
    """
    undone, after = 0, batch.first_review_id - 1
    while True:
        chunk = _batch_chunk(session, batch, after)
        if not chunk:
            return undone
        after = chunk[-1][0]
        undone += len(_undo_if_current(session, chunk, reviewer_id))


def _batch_chunk(session: Session, batch: ApprovalBatch, after: int) -> list[tuple[int, int]]:
    """(review id, image id) of the batch's next approvals after review id `after`."""
    reviewer = (
        Review.reviewer_id.is_(None)
        if batch.reviewer_id is None
        else Review.reviewer_id == batch.reviewer_id
    )
    query = (
        select(Review.id, Review.image_id)
        .join(Image, Image.id == Review.image_id)
        .where(
            Review.id > after,
            Review.id <= batch.last_review_id,
            reviewer,
            Review.created_at == batch.created_at,
            Review.decision == ReviewDecision.APPROVED,
            Review.undoes_id.is_(None),
            Image.job_id == batch.job_id,
        )
        .order_by(Review.id)
        .limit(UNDO_CHUNK)
    )
    return [(review_id, image_id) for review_id, image_id in session.execute(query)]


def _undo_if_current(
    session: Session,
    chunk: Sequence[tuple[int, int]],
    reviewer_id: int | None,
    deltas: CounterDeltas | None = None,
) -> list[int]:
    """Undo each (review id, image id) whose review is still the image's newest row; returns
    the ids of the images undone. Counter changes go to `deltas` when given, else applied."""
    image_ids = sorted({image_id for _, image_id in chunk})
    session.execute(
        select(Image.id)
        .where(Image.id.in_(image_ids))
        .order_by(Image.id)
        .with_for_update(key_share=True)
    ).all()
    histories: dict[int, list[Review]] = defaultdict(list)
    found = select(Review).where(Review.image_id.in_(image_ids))
    for review in session.scalars(found.order_by(Review.image_id, Review.id)):
        histories[review.image_id].append(review)
    rows = [
        _undo_row(image_id, effective_stack(histories[image_id]), reviewer_id)
        for review_id, image_id in chunk
        if histories[image_id] and histories[image_id][-1].id == review_id
    ]
    session.add_all(rows)
    session.flush()
    gathered = deltas if deltas is not None else CounterDeltas()
    awaiting = [r.image_id for r in rows if r.decision == ReviewDecision.UNDONE]
    _keep_queue_keys(session, awaiting, awaiting=True, deltas=gathered)
    decided = [r.image_id for r in rows if r.decision != ReviewDecision.UNDONE]
    _keep_queue_keys(session, decided, awaiting=False, deltas=gathered)
    if deltas is None:
        gathered.apply(session)
    return [r.image_id for r in rows]


@dataclass
class ApprovedPicks:
    """What `approve_images` did: the approvals added, the picks skipped (reviewed meanwhile)
    and the other images of the same content that got the decision too."""

    added: list[Review] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)


def approve_images(
    session: Session, picks: Sequence[tuple[int, int]], *, reviewer_id: int | None = None
) -> ApprovedPicks:
    """Approve the caption shown for each (image id, caption id) pick, in order, each shared
    with the other images of its content as a single review is (`add_content_review`).
    An image that no longer awaits review (reviewed by someone meanwhile, or just now by
    sharing) is skipped, not overruled. `LifecycleError` for an image that does not exist or a
    caption that is not the image's."""
    if len(picks) > APPROVE_IMAGES_LIMIT:
        raise LifecycleError(f"at most {APPROVE_IMAGES_LIMIT} images per call")
    done = ApprovedPicks()
    seen: set[int] = set()
    for image_id, caption_id in picks:
        if image_id in seen:
            continue
        seen.add(image_id)
        _lock_image(session, image_id)
        current = current_review(session, image_id)
        if current is not None and current.decision != ReviewDecision.UNDONE:
            done.skipped.append(image_id)
            continue
        review, shared = add_content_review(
            session,
            image_id=image_id,
            decision=ReviewDecision.APPROVED,
            caption_id=caption_id,
            reviewer_id=reviewer_id,
        )
        done.added.append(review)
        done.shared += shared
        seen.update(shared)  # a pick of the same content got its approval just now
    return done


# --- one review per image content -----------------------------------------------------------
#
# The same bytes submitted in two jobs of one owner are two images with one `content_sha256`.
# A decision on one of them is the decision on that content: it is added to each of the others
# still awaiting review, in the same transaction; an undo of it takes it back from each of them
# where it is still the current review. Never across owners: an image of a job without an owner
# shares nothing.


def add_content_review(
    session: Session,
    *,
    image_id: int,
    decision: ReviewDecision | str,
    text: str | None = None,
    caption_id: int | None = None,
    reviewer_id: int | None = None,
) -> tuple[Review, list[int]]:
    """`add_review`, and the same decision for every other image of the same content in the
    same owner's jobs that still awaits review: returns the review and the ids of the images
    that got it too. An approval of a text the other image's newest caption does not have is a
    correction there (the reviewer settled the text of that content)."""
    group = _lock_content_group(session, image_id)
    deltas = CounterDeltas()
    review = _append_review(
        session,
        image_id=image_id,
        decision=decision,
        text=text,
        caption_id=caption_id,
        reviewer_id=reviewer_id,
        deltas=deltas,
    )
    shared: list[int] = []
    if review.decision in SHARED_DECISIONS:
        waiting = [other for other, awaits in group if awaits and other != image_id]
        for start in range(0, len(waiting), UNDO_CHUNK):
            shared += _share_decision(session, review, waiting[start : start + UNDO_CHUNK], deltas)
    deltas.apply(session)
    return review, shared


def undo_content_review(
    session: Session, image_id: int, reviewer_id: int | None = None
) -> tuple[Review, list[int]]:
    """`undo_review`, and the same for the other images of the same content (same owner) that
    got the decision it takes back from the same action (`add_content_review`), where that is
    still their current review: returns the undo row and the ids of the other images undone.
    `TransitionRefused` when nothing is left to undo."""
    group = _lock_content_group(session, image_id)
    deltas = CounterDeltas()
    undo = _append_undo(session, image_id, reviewer_id, deltas)
    taken_back = session.get(Review, undo.undoes_id)
    others = [other for other, _ in group if other != image_id]
    undone: list[int] = []
    for start in range(0, len(others), UNDO_CHUNK):
        pairs = _same_action(session, taken_back, others[start : start + UNDO_CHUNK])
        if pairs:
            undone += _undo_if_current(session, pairs, reviewer_id, deltas)
    deltas.apply(session)
    return undo, undone


def _lock_content_group(session: Session, image_id: int) -> list[tuple[int, bool]]:
    """Lock every image of the image's content in its owner's jobs, in id order (so two
    decisions on one content never wait on each other crosswise), the image included:
    (image id, whether it awaits review) of each. Empty when the image has no content hash or
    its job no owner. `LifecycleError` when there is no such image."""
    found = session.execute(
        select(Image.content_sha256, Job.owner_id)
        .join(Job, Job.id == Image.job_id)
        .where(Image.id == image_id)
    ).first()
    if found is None:
        raise LifecycleError(f"no image with id {image_id}")
    sha256, owner_id = found
    if sha256 is None or owner_id is None:
        return []
    rows = session.execute(
        select(Image.id, Image.review_score)
        .join(Job, Job.id == Image.job_id)
        .where(Image.content_sha256 == sha256, Job.owner_id == owner_id)
        .order_by(Image.id)
        .with_for_update(of=Image, key_share=True)
    )
    return [(other, score is not None) for other, score in rows]


def _share_decision(
    session: Session, review: Review, image_ids: Sequence[int], deltas: CounterDeltas
) -> list[int]:
    """Add `review`'s decision to these images (each on its newest caption, by the same
    reviewer at the same instant); they leave the review queue. Returns their ids."""
    newest = (
        select(func.max(Caption.id))
        .where(Caption.image_id.in_(image_ids))
        .group_by(Caption.image_id)
    )
    captions = session.execute(
        select(Caption.image_id, Caption.id, Caption.text)
        .where(Caption.id.in_(newest))
        .order_by(Caption.image_id)
    ).all()
    rows = []
    for image_id, caption_id, caption_text in captions:
        decision = review.decision
        if decision == ReviewDecision.APPROVED and caption_text != review.text:
            decision = ReviewDecision.CORRECTED
        rows.append(
            Review(
                image_id=image_id,
                caption_id=caption_id,
                reviewer_id=review.reviewer_id,
                decision=decision,
                text=review.text,
                created_at=review.created_at,
            )
        )
    session.add_all(rows)
    session.flush()
    shared = [row.image_id for row in rows]
    _keep_queue_keys(session, shared, awaiting=False, deltas=deltas)
    return shared


def _same_action(
    session: Session, review: Review, image_ids: Sequence[int]
) -> list[tuple[int, int]]:
    """(review id, image id) of these images' reviews made in the same action as `review`: by
    the same reviewer at the same instant, decisions (not undo rows)."""
    reviewer = (
        Review.reviewer_id.is_(None)
        if review.reviewer_id is None
        else Review.reviewer_id == review.reviewer_id
    )
    found = session.execute(
        select(Review.id, Review.image_id)
        .where(
            Review.image_id.in_(image_ids),
            Review.created_at == review.created_at,
            reviewer,
            Review.undoes_id.is_(None),
            Review.decision != ReviewDecision.UNDONE,
        )
        .order_by(Review.id)
    )
    return [(review_id, image_id) for review_id, image_id in found]


def _newest_caption_id():
    newer = aliased(Caption)
    return (
        select(func.max(newer.id))
        .where(newer.image_id == Image.id)
        .correlate(Image)
        .scalar_subquery()
    )


# --- the review queue -----------------------------------------------------------------------


# Given the ids of a page of queue keys, the ones to leave out (e.g. claimed by someone else).
SkipFn = Callable[[list[int]], Collection[int]]


def review_queue(
    session: Session,
    filters: QueueFilter,
    *,
    limit: int = 50,
    after: QueueCursor | str | None = None,
    offset: int = 0,
    skip: SkipFn | None = None,
) -> QueuePage:
    """One page of the review queue, least confident first (by the newest caption's score, then
    image id): rows of (image, newest caption, current review or None), the total, and the
    cursor to pass as `after` for the next page.

    The unreviewed queue walks the partial index on `Image.review_score` from the cursor and
    takes its total from the job counters: its cost does not grow with the table. It never
    uses `offset` (LifecycleError); the other statuses accept it, or a cursor. `skip` (the
    unreviewed queue only) names the keys of a page to leave out; the walk reads on past them,
    at most `SKIP_ROUNDS` reads, and the total still counts them.
    """
    if isinstance(after, str):
        after = QueueCursor.decode(after)
    if filters.status == QueueStatus.UNREVIEWED:
        if offset:
            raise LifecycleError("the unreviewed queue pages by cursor (after=...), not offset")
        return _unreviewed_page(session, filters, limit, after, skip)
    return _reviewed_page(session, filters, limit, after, offset)


def _unreviewed_page(
    session: Session,
    filters: QueueFilter,
    limit: int,
    after: QueueCursor | None,
    skip: SkipFn | None,
) -> QueuePage:
    keys = select(Image.id, Image.review_score).where(*_unreviewed_conditions(filters))
    found, next_cursor = _walk_keys(session, keys, limit, after, skip)
    rows = _queue_rows(session, [image_id for image_id, _ in found])
    if _counters_answer(filters):
        total, exact = _unreviewed_total(session, filters), True
    else:
        total, exact = _capped_count(session, keys)
    return QueuePage(total=total, rows=rows, next_cursor=next_cursor, total_exact=exact)


def _walk_keys(
    session: Session, keys: Select, limit: int, after: QueueCursor | None, skip: SkipFn | None
) -> tuple[list[Any], QueueCursor | None]:
    """The next `limit` (image id, score) keys after `after`, without those `skip` names, and
    the cursor after the last one (None when no key follows). Keyset reads of `limit` + 1 keys
    (plus `SKIP_SLACK` when skipping), at most `SKIP_ROUNDS` of them: when every round was
    skipped away the page is short, and its cursor is after the last key read."""
    kept: list[Any] = []
    cursor = after
    for _ in range(SKIP_ROUNDS if skip else 1):
        want = limit + 1 - len(kept) + (SKIP_SLACK if skip else 0)
        page = keys
        if cursor is not None:
            page = page.where(
                tuple_(Image.review_score, Image.id)
                > tuple_(literal(cursor.score), cursor.image_id)
            )
        found = session.execute(page.order_by(Image.review_score, Image.id).limit(want)).all()
        left_out = set(skip([image_id for image_id, _ in found])) if skip and found else set()
        kept += [row for row in found if row[0] not in left_out]
        if len(kept) > limit:
            return kept[:limit], QueueCursor(kept[limit - 1][1], kept[limit - 1][0])
        if len(found) < want:
            return kept, None  # the end of the queue
        cursor = QueueCursor(found[-1][1], found[-1][0])
    return kept, cursor


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


def _capped_count(session: Session, query: Select, cap: int = QUEUE_COUNT_CAP) -> tuple[int, bool]:
    """(rows `query` matches, up to `cap`; whether that is all of them): at most `cap` + 1 rows
    (index entries) read, whatever the table's size."""
    capped = query.order_by(None).limit(cap + 1).subquery()
    n = session.scalar(select(func.count()).select_from(capped)) or 0
    return min(n, cap), n <= cap


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
