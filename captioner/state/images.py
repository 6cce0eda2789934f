"""Images: claim, extend the lease, complete (save captions), fail, requeue, expire.

Every function takes a `Session` and never commits: the caller owns the transaction, so a
worker's caption and status change land together. Functions that change many rows use single
conditional UPDATEs (with RETURNING) instead of read-modify-write, so concurrent workers cannot
double-claim; ORM objects already loaded in the session are not refreshed by them (call
`session.expire_all()` if you hold any).

Every status change also moves the job counters (`jobs.CounterDeltas`) in the same
transaction, and every caption save keeps the review-queue key `Image.review_score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.visitors import InternalTraversal

from captioner.state.jobs import CounterDeltas, dialect_insert
from captioner.state.models import (
    Caption,
    CaptionSource,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    Review,
    ReviewDecision,
    utcnow,
)

# Failure reasons are shown to people in the dashboard; keep them plain.
LEASE_EXHAUSTED_REASON = "gave up after {attempts} attempts (worker lost or timed out each time)"


# --- statements keyed by id -----------------------------------------------------------------


class _NotIndexed(ColumnElement[Any]):
    """`column`, kept out of SQLite's index choice: rendered `+column` there (SQLite's own way
    to take a term out of index selection), plain elsewhere.

    For statements that pick images by id (`id IN (...)`, a batch): SQLite without statistics
    (nothing runs ANALYZE) guesses that an equality on an index's first column matches about
    ten rows, so beside a list of more ids it chose `status = ?` on a status index and walked
    every image in that status in the whole table -- every captioned image of every job, for
    each caption save -- instead of looking up the ids. The cost of a batch then grew with the
    table. PostgreSQL keeps statistics and is left as it is.
    """

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_NotIndexed)
def _render_plain(element: _NotIndexed, compiler, **kw) -> str:
    return compiler.process(element.column, **kw)


@compiles(_NotIndexed, "sqlite")
def _render_unary_plus(element: _NotIndexed, compiler, **kw) -> str:
    return "+" + compiler.process(element.column, **kw)


def _status(by_id: bool) -> ColumnElement[Any]:
    """`Image.status` for a WHERE clause; `by_id`: the statement picks its rows by id, and the
    status only filters them (see `_NotIndexed`)."""
    return _NotIndexed(Image.status) if by_id else Image.status


# --- claim ----------------------------------------------------------------------------------


def _claimable(now: datetime, max_attempts: int | None, by_id: bool = False):
    """Queued, or running with a lease that has run out (its worker is presumed lost)."""
    status = _status(by_id)
    condition = or_(
        status == ImageStatus.QUEUED,
        and_(status == ImageStatus.RUNNING, Image.lease_until < now),
    )
    if max_attempts is not None:
        condition = and_(condition, Image.attempts < max_attempts)
    return condition


def claim_images(
    session: Session,
    *,
    worker_id: str,
    lease_seconds: int,
    image_ids: Sequence[int] | None = None,
    job_id: int | None = None,
    limit: int | None = None,
    max_attempts: int | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Claim claimable images for `worker_id`: queued -> running with a lease. Returns the ids won.

    The UPDATE repeats the claimable condition, so a row another worker already holds does not
    match: it is skipped, never claimed twice. On PostgreSQL the candidates are locked with
    SELECT ... FOR UPDATE SKIP LOCKED in a materialized CTE of the UPDATE, so concurrent
    claimers split the rows instead of waiting on each other, the LIMIT is applied once, and
    each row's status before the claim comes back for the counters. SQLite has one writer at a
    time: there an UPDATE re-claims the expired leases among the first `limit` candidates, then
    a second takes the rest of the limit from the queued images (the same rows, in the same
    id order, as one pass would).
    """
    if image_ids is not None and not image_ids:
        return []
    now = now or utcnow()
    scope: list[ColumnElement[bool]] = []
    if image_ids is not None:
        scope.append(Image.id.in_(list(image_ids)))
    if job_id is not None:
        scope.append(Image.job_id == job_id)
    values = {
        "status": ImageStatus.RUNNING,
        "lease_owner": worker_id,
        "lease_until": now + timedelta(seconds=lease_seconds),
        "attempts": Image.attempts + 1,
        "failure_reason": None,
    }
    by_id = image_ids is not None
    claimable = [_claimable(now, max_attempts, by_id), *scope]
    if _dialect(session) == "postgresql":
        candidates = (
            select(Image.id, Image.job_id, Image.status)
            .where(*claimable)
            .order_by(Image.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = session.execute(_update_locked(candidates, values, claimable)).all()
    else:
        rows = _claim_sqlite(session, claimable, scope, values, limit, max_attempts, by_id)
    deltas = CounterDeltas()
    for _, job, old in rows:
        deltas.move(job, old, ImageStatus.RUNNING)
    deltas.apply(session)
    _mark_jobs_started({job for _, job, _ in rows}, session, now)
    return sorted(image_id for image_id, _, _ in rows)


def _claim_sqlite(
    session: Session,
    claimable: list[ColumnElement[bool]],
    scope: list[ColumnElement[bool]],
    values: dict[str, Any],
    limit: int | None,
    max_attempts: int | None,
    by_id: bool,
) -> list[tuple[int, int, ImageStatus]]:
    """(id, job, status before) of each image claimed, in two UPDATEs (see `claim_images`)."""
    status = _status(by_id)
    first = select(Image.id).where(*claimable).order_by(Image.id).limit(limit)
    rows = _returning(
        session,
        update(Image).where(
            Image.id.in_(first.scalar_subquery()), *claimable, status == ImageStatus.RUNNING
        ),
        values,
        ImageStatus.RUNNING,
    )
    left = None if limit is None else limit - len(rows)
    if left is not None and left <= 0:
        return rows
    queued = [status == ImageStatus.QUEUED, *scope]
    if max_attempts is not None:
        queued.append(Image.attempts < max_attempts)
    rest = select(Image.id).where(*queued).order_by(Image.id).limit(left)
    statement = update(Image).where(Image.id.in_(rest.scalar_subquery()), *queued)
    return rows + _returning(session, statement, values, ImageStatus.QUEUED)


def _returning(
    session: Session, statement, values: dict[str, Any], old: ImageStatus
) -> list[tuple[int, int, ImageStatus]]:
    """Run an UPDATE of images whose status is `old`: (id, job, old) of each row changed."""
    result = session.execute(
        statement.values(**values)
        .returning(Image.id, Image.job_id)
        .execution_options(synchronize_session=False)
    )
    return [(image_id, job, old) for image_id, job in result]


def _update_locked(candidates: Select, values: dict[str, Any], where: Sequence[Any]):
    """PostgreSQL: UPDATE the rows `candidates` (id, job_id, status) locks, in one statement
    that returns (id, job, status before) of each: the CTE is materialized, so it runs once."""
    before = candidates.cte("old_rows").prefix_with("MATERIALIZED")
    return (
        update(Image)
        .where(Image.id == before.c.id, *where)
        .values(**values)
        .returning(Image.id, before.c.job_id, before.c.status)
        .execution_options(synchronize_session=False)
    )


def _move_images(
    session: Session,
    where: Sequence[ColumnElement[bool]],
    values: dict[str, Any],
    old: Sequence[ImageStatus],
    deltas: CounterDeltas,
    *,
    by_id: bool = False,
) -> list[int]:
    """Set `values` (a new `status` among them) on the images matching `where` whose status is
    one of `old`; counts each move in `deltas` and returns the ids changed. `by_id`: `where`
    picks the images by id, and the status only filters them (see `_NotIndexed`).

    The counters need each row's status before the change. With one `old` status the
    conditional UPDATE says it. With several: on PostgreSQL one UPDATE locks the rows in a CTE
    first and returns their statuses; on SQLite (one writer at a time) one conditional UPDATE
    per old status, the one that keeps the status first.
    """
    new = values["status"]
    if len(old) > 1 and _dialect(session) == "postgresql":
        # From every status (a caption save): no status term, which only offered the planner a
        # status index to walk beside the ids.
        every = set(old) == set(ImageStatus)
        candidates = (
            select(Image.id, Image.job_id, Image.status)
            .where(*where, *([] if every else [Image.status.in_(old)]))
            .with_for_update()
        )
        rows = session.execute(_update_locked(candidates, values, [])).all()
    else:
        rows = []
        for status in sorted(old, key=lambda s: s != new):
            statement = update(Image).where(*where, _status(by_id) == status)
            rows += _returning(session, statement, values, status)
    for _, job, before in rows:
        deltas.move(job, before, new)
    return sorted(image_id for image_id, _, _ in rows)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _mark_jobs_started(job_ids: set[int], session: Session, now: datetime) -> None:
    if not job_ids:
        return
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now)
        .execution_options(synchronize_session=False)
    )


def extend_lease(
    session: Session, image_ids: Sequence[int], *, worker_id: str, lease_seconds: int
) -> list[int]:
    """Push out the lease on images this worker still holds (long batches); returns those ids."""
    rows = session.execute(
        update(Image)
        .where(
            Image.id.in_(list(image_ids)),
            _status(by_id=True) == ImageStatus.RUNNING,
            Image.lease_owner == worker_id,
        )
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars())


# --- finish one image -----------------------------------------------------------------------


def save_caption(
    session: Session,
    *,
    image_id: int,
    model_version_id: int,
    text: str,
    score: float,
    candidates: list[dict[str, Any]] | None = None,
) -> bool:
    """Upsert the caption for (image, model version); returns False if it was left alone.

    A caption row that a review points at is never overwritten: the reviewer judged that
    text, and a model re-run must not change it under them.
    """
    now = utcnow()
    values = {
        "image_id": image_id,
        "model_version_id": model_version_id,
        "text": text,
        "score": score,
        "candidates": candidates or [],
        "created_at": now,
        "updated_at": now,
    }
    statement = _caption_upsert(session, [values]).returning(Caption.id)
    saved = session.execute(statement).first() is not None
    deltas = CounterDeltas()
    _keep_review_scores(session, [image_id], deltas)
    deltas.apply(session)
    return saved


# --- the review-queue key -------------------------------------------------------------------


def newest_caption_score():
    """The score of the image's newest caption (correlated to `Image` in the enclosing query)."""
    newer = aliased(Caption)
    return (
        select(newer.score)
        .where(newer.image_id == Image.id)
        .order_by(newer.id.desc())
        .limit(1)
        .correlate(Image)
        .scalar_subquery()
    )


def awaiting_review() -> ColumnElement[bool]:
    """The image has a caption, and no current review or the current one is `undone`."""
    current = (
        select(Review.decision)
        .where(Review.image_id == Image.id)
        .order_by(Review.id.desc())
        .limit(1)
        .correlate(Image)
        .scalar_subquery()
    )
    has_caption = exists().where(Caption.image_id == Image.id).correlate(Image)
    undone = ReviewDecision.UNDONE.value
    return and_(has_caption, func.coalesce(current, undone) == undone)


def _keep_review_scores(session: Session, image_ids: Sequence[int], deltas: CounterDeltas) -> None:
    """After captions of these images were saved: a key already set takes the newest caption's
    score; an unset one is set if the image awaits review (its first caption), counted."""
    ids = list(image_ids)
    session.execute(
        update(Image)
        .where(Image.id.in_(ids), Image.review_score.is_not(None))
        .values(review_score=newest_caption_score())
        .execution_options(synchronize_session=False)
    )
    entered = session.execute(
        update(Image)
        .where(Image.id.in_(ids), Image.review_score.is_(None), awaiting_review())
        .values(review_score=newest_caption_score())
        .returning(Image.job_id)
        .execution_options(synchronize_session=False)
    )
    for job in entered.scalars():
        deltas.add(job, "unreviewed_count", 1)


def _caption_upsert(session: Session, rows: list[dict[str, Any]]):
    """INSERT captions ... ON CONFLICT (image, model version) DO UPDATE, unless reviewed."""
    insert = dialect_insert(session)(Caption).values(rows)
    # The conflicting (existing) row is `captions` inside ON CONFLICT ... WHERE; a plain
    # `Caption.id` here would add `captions` to the subquery's FROM and match ANY reviewed caption.
    unreviewed = ~exists().where(Review.caption_id == literal_column("captions.id"))
    return insert.on_conflict_do_update(
        index_elements=[Caption.image_id, Caption.model_version_id],
        set_={
            "text": insert.excluded.text,
            "score": insert.excluded.score,
            "candidates": insert.excluded.candidates,
            "updated_at": insert.excluded.updated_at,
        },
        where=unreviewed,
    )


def complete_image(
    session: Session,
    *,
    image_id: int,
    model_version_id: int,
    text: str,
    score: float,
    candidates: list[dict[str, Any]] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> None:
    """Save the caption and mark the image captioned (lease released, any failure cleared)."""
    row = CaptionRow(image_id, text, score, candidates or [], width, height)
    complete_images(session, model_version_id, [row])


@dataclass
class CaptionRow:
    """One image's caption, for `complete_images`."""

    image_id: int
    text: str
    score: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    width: int | None = None
    height: int | None = None


def complete_images(session: Session, model_version_id: int, rows: Sequence[CaptionRow]) -> None:
    """`complete_image` for a whole batch in a fixed number of statements, whatever the size of
    the job: one multi-row caption upsert (never over a reviewed caption), the status change
    (one UPDATE on PostgreSQL), one executemany for the image sizes, two for the review key and
    one for the job counters."""
    if not rows:
        return
    now = utcnow()
    rows_values = [
        {
            "image_id": r.image_id,
            "model_version_id": model_version_id,
            "text": r.text,
            "score": r.score,
            "candidates": r.candidates,
            "created_at": now,
            "updated_at": now,
        }
        for r in rows
    ]
    session.execute(_caption_upsert(session, rows_values))
    ids = [r.image_id for r in rows]
    done = {
        "status": ImageStatus.CAPTIONED,
        "failure_reason": None,
        "lease_owner": None,
        "lease_until": None,
        "finished_at": now,
    }
    deltas = CounterDeltas()
    _move_images(session, [Image.id.in_(ids)], done, list(ImageStatus), deltas, by_id=True)
    _save_sizes(session, rows)
    _keep_review_scores(session, ids, deltas)
    deltas.apply(session)


def import_captions(session: Session, rows: Sequence[CaptionRow]) -> dict[int, int]:
    """Captions brought in by an import (`CaptionSource.IMPORT`, no model version) for queued
    images that no worker was sent: each image gets its caption row and is marked captioned,
    entering the review queue, counted in its job. Returns {image id: caption id}.

    Only queued images are taken: an image already captioned (the same import run twice, two
    URLs with the same bytes) or failed is left alone, so running it again adds nothing. A
    fixed number of statements per call: the status change, one multi-row INSERT of the
    captions, a count and an UPDATE by primary key (executemany) for the review key, one for
    the counters. The caller passes at most a few thousand rows (SQLite binds each id).
    """
    if not rows:
        return {}
    now = utcnow()
    done = {
        "status": ImageStatus.CAPTIONED,
        "failure_reason": None,
        "lease_owner": None,
        "lease_until": None,
        "finished_at": now,
    }
    deltas = CounterDeltas()
    ids = [r.image_id for r in rows]
    queued = [ImageStatus.QUEUED]
    moved = set(_move_images(session, [Image.id.in_(ids)], done, queued, deltas, by_id=True))
    values = [
        {
            "image_id": r.image_id,
            "model_version_id": None,
            "source": CaptionSource.IMPORT,
            "text": r.text,
            "score": r.score,
            "candidates": r.candidates,
            "created_at": now,
            "updated_at": now,
        }
        for r in rows
        if r.image_id in moved
    ]
    captions: dict[int, int] = {}
    if values:
        inserted = session.execute(insert(Caption).returning(Caption.image_id, Caption.id), values)
        captions = {image_id: caption_id for image_id, caption_id in inserted}
    _enter_review_queue(session, [r for r in rows if r.image_id in moved], deltas)
    deltas.apply(session)
    return captions


def _enter_review_queue(
    session: Session, rows: Sequence[CaptionRow], deltas: CounterDeltas
) -> None:
    """Imported images, captioned now with their one caption and never reviewed, wait for
    review keyed by that caption's score: an UPDATE by primary key per image (executemany), and
    one grouped count for the job counters. (`_keep_review_scores` decides the same from the
    rows, with correlated subqueries that cost far more over a large import.)"""
    if not rows:
        return
    ids = [r.image_id for r in rows]
    unreviewed = ~exists().where(Review.image_id == Image.id).correlate(Image)
    waiting = [Image.id.in_(ids), Image.review_score.is_(None), unreviewed]
    counted = session.execute(
        select(Image.job_id, func.count()).where(*waiting).group_by(Image.job_id)
    ).all()
    table = Image.__table__
    never_reviewed = ~exists().where(Review.image_id == table.c.id)
    session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"), table.c.review_score.is_(None), never_reviewed)
        .values(review_score=bindparam("b_score")),
        [{"b_id": r.image_id, "b_score": r.score} for r in rows],
    )
    for job, n in counted:
        deltas.add(job, "unreviewed_count", n)


def _save_sizes(session: Session, rows: Sequence[CaptionRow]) -> None:
    sizes = [
        {"b_id": r.image_id, "b_width": r.width, "b_height": r.height}
        for r in rows
        if r.width is not None and r.height is not None
    ]
    if not sizes:
        return
    table = Image.__table__
    session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(width=bindparam("b_width"), height=bindparam("b_height")),
        sizes,
    )


def fail_image(session: Session, image_id: int, reason: str) -> bool:
    """Mark an image failed with a reason a person can read; returns False if it was captioned.

    A caption that another worker already saved wins over a late failure.
    """
    values = {
        "status": ImageStatus.FAILED,
        "failure_reason": reason,
        "lease_owner": None,
        "lease_until": None,
        "finished_at": utcnow(),
    }
    deltas = CounterDeltas()
    not_captioned = [ImageStatus.QUEUED, ImageStatus.RUNNING, ImageStatus.FAILED]
    changed = _move_images(
        session, [Image.id == image_id], values, not_captioned, deltas, by_id=True
    )
    deltas.apply(session)
    return bool(changed)


def _back_to_queue(session: Session, *where, now: datetime, by_id: bool = False) -> list[int]:
    """Running images matching `where` go back to queued, lease cleared; their sorted ids.
    `by_id`: `where` picks the images by id (see `_move_images`)."""
    values = {
        "status": ImageStatus.QUEUED,
        "lease_owner": None,
        "lease_until": None,
        "queued_at": now,
    }
    deltas = CounterDeltas()
    ids = _move_images(session, where, values, [ImageStatus.RUNNING], deltas, by_id=by_id)
    deltas.apply(session)
    return ids


def requeue_images(session: Session, image_ids: Sequence[int], *, worker_id: str) -> list[int]:
    """Give back images this worker holds but will not finish (shutdown, transient error)."""
    return _back_to_queue(
        session,
        Image.id.in_(list(image_ids)),
        Image.lease_owner == worker_id,
        now=utcnow(),
        by_id=True,
    )


# --- sweeper --------------------------------------------------------------------------------


def release_expired_leases(
    session: Session, *, max_attempts: int, now: datetime | None = None
) -> list[int]:
    """Expired leases go back to queued (ids returned, to re-publish) or, out of attempts, failed."""
    now = now or utcnow()
    expired = Image.lease_until < now
    given_up = {
        "status": ImageStatus.FAILED,
        "failure_reason": LEASE_EXHAUSTED_REASON.format(attempts=max_attempts),
        "lease_owner": None,
        "lease_until": None,
        "finished_at": now,
    }
    deltas = CounterDeltas()
    running = [ImageStatus.RUNNING]
    _move_images(session, [expired, Image.attempts >= max_attempts], given_up, running, deltas)
    deltas.apply(session)
    return _back_to_queue(session, expired, Image.attempts < max_attempts, now=now)


def requeue_stale_queued(
    session: Session, *, older_than_seconds: int, now: datetime | None = None
) -> list[int]:
    """Ids of images queued longer than the timeout (message lost?); their clock is restarted."""
    now = now or utcnow()
    rows = session.execute(
        update(Image)
        .where(
            Image.status == ImageStatus.QUEUED,
            Image.queued_at < now - timedelta(seconds=older_than_seconds),
        )
        .values(queued_at=now)
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars())


def fail_queued_past_cap(session: Session, max_attempts: int) -> list[int]:
    """Queued images already claimed `max_attempts` times can never be claimed again: fail them."""
    values = {
        "status": ImageStatus.FAILED,
        "failure_reason": LEASE_EXHAUSTED_REASON.format(attempts=max_attempts),
        "lease_owner": None,
        "lease_until": None,
        "finished_at": utcnow(),
    }
    deltas = CounterDeltas()
    past_cap = [Image.attempts >= max_attempts]
    ids = _move_images(session, past_cap, values, [ImageStatus.QUEUED], deltas)
    deltas.apply(session)
    return ids
