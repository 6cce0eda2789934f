"""Export captions: JSONL, CSV (spreadsheet-formula safe) or COCO captions JSON.

`export_rows` yields one `ExportRow` per image (of a job, or of every job a user may see)
with the model's caption (the newest version that captioned it) and the current review.
`which` picks what goes out: `model` captions, `reviewed` captions (approved or corrected
only), or `both`.

The images are read through a server-side cursor (`stream_results`) in chunks of
`EXPORT_CHUNK`; each chunk's captions and current reviews are loaded in one query each, so memory
holds one chunk and the queries grow with the chunks, not with the rows. The writers emit text
in blocks of many rows (one write per block when streamed over HTTP).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session

from captioner.state.models import Caption, Image, Job, Review, ReviewDecision, User

Which = Literal["model", "reviewed", "both"]
FORMATS = ("jsonl", "csv", "coco")
WHICH = ("model", "reviewed", "both")
CONTENT_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "coco": "application/json",
}
# Images per chunk read from the cursor (and per caption / review query).
EXPORT_CHUNK = 2000
# A chunk's ids are looked up as a range when it spans at most this many ids per image.
DENSE_FACTOR = 4
# Rows per block of text the JSONL and CSV writers yield.
BLOCK_ROWS = 500
# Cells starting with these are formulas to spreadsheet programs (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The text columns: the only cells that can look like a formula.
_TEXT_FIELDS = frozenset(
    ("file_name", "storage_key", "model_caption", "review_decision", "reviewed_caption", "reviewer")
)
_ACCEPTED = (ReviewDecision.APPROVED, ReviewDecision.CORRECTED)


@dataclass(frozen=True, slots=True)
class ExportRow:
    image_id: int
    job_id: int
    file_name: str
    storage_key: str
    width: int | None
    height: int | None
    model_caption: str | None
    model_score: float | None
    review_decision: str | None
    reviewed_caption: str | None
    reviewer: str | None


def export_rows(
    session: Session,
    *,
    job_id: int | None = None,
    owner_id: int | None = None,
    which: Which = "both",
    chunk_size: int = EXPORT_CHUNK,
) -> Iterator[ExportRow]:
    """Rows for the images of `job_id` (or all jobs; only `owner_id`'s if given), by image id,
    streamed: a server-side cursor over the images, and per chunk one query for the captions
    and one for the current reviews."""
    query = select(
        Image.id, Image.job_id, Image.original_name, Image.storage_key, Image.width, Image.height
    ).order_by(Image.id)
    if job_id is not None:
        query = query.where(Image.job_id == job_id)
    if owner_id is not None:
        query = query.where(Image.job_id.in_(select(Job.id).where(Job.owner_id == owner_id)))
    result = session.execute(query.execution_options(stream_results=True, yield_per=chunk_size))
    try:
        for chunk in result.partitions():
            yield from _chunk_rows(session, chunk, which)
    finally:
        result.close()


def _chunk_rows(session: Session, chunk: Sequence[Any], which: Which) -> Iterator[ExportRow]:
    ids = [image[0] for image in chunk]
    captions = _model_captions(session, ids)
    current = _current_reviews(session, ids)
    for image_id, job, name, key, width, height in chunk:
        caption = captions.get(image_id)
        decision, text, reviewer = current.get(image_id, (None, None, None))
        accepted = decision in _ACCEPTED
        if which == "model" and caption is None:
            continue
        if which == "reviewed" and not (accepted and text is not None):
            continue
        yield ExportRow(
            image_id=image_id,
            job_id=job,
            file_name=name,
            storage_key=key,
            width=width,
            height=height,
            model_caption=caption[0] if caption else None,
            model_score=round(caption[1], 6) if caption else None,
            review_decision=None if decision in (None, ReviewDecision.UNDONE) else decision.value,
            reviewed_caption=text if accepted else None,
            reviewer=reviewer if accepted else None,
        )


def _among(column, ids: list[int]) -> ColumnElement[bool]:
    """`column` is one of `ids` (sorted): as an id range when they are dense (a job's images
    usually are; a range binds two values instead of thousands, and rows of other images in it
    are simply not looked up), else as a list."""
    if ids[-1] - ids[0] < DENSE_FACTOR * len(ids):
        return and_(column >= ids[0], column <= ids[-1])
    return column.in_(ids)


def _model_captions(session: Session, ids: list[int]) -> dict[int, tuple[str, float]]:
    """{image id: (text, score)} of the caption by the newest model version of each image."""
    rows = session.execute(
        select(Caption.image_id, Caption.text, Caption.score)
        .where(_among(Caption.image_id, ids))
        .order_by(Caption.model_version_id)
    )
    # Newest model version last, so it wins.
    return {image_id: (text, score) for image_id, text, score in rows}


def _current_reviews(
    session: Session, ids: list[int]
) -> dict[int, tuple[ReviewDecision, str | None, str | None]]:
    """{image id: (decision, text, reviewer's email)} of the current review of each image."""
    current = (
        select(func.max(Review.id)).where(_among(Review.image_id, ids)).group_by(Review.image_id)
    )
    rows = session.execute(
        select(Review.image_id, Review.decision, Review.text, User.email)
        .outerjoin(User, User.id == Review.reviewer_id)
        .where(Review.id.in_(current))
    )
    return {image_id: (decision, text, email) for image_id, decision, text, email in rows}


def _fields(which: Which) -> list[str]:
    base = ["image_id", "job_id", "file_name", "storage_key", "width", "height"]
    model = ["model_caption", "model_score"]
    reviewed = ["review_decision", "reviewed_caption", "reviewer"]
    return base + (model if which != "reviewed" else []) + (reviewed if which != "model" else [])


def escape_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: formula-looking strings get a leading quote."""
    if value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)  # numbers are data, not formulas
    text = str(value)
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def _blocks(rows: Iterable[ExportRow], size: int = BLOCK_ROWS) -> Iterator[list[ExportRow]]:
    block: list[ExportRow] = []
    for row in rows:
        block.append(row)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


def to_jsonl(rows: Iterable[ExportRow], which: Which = "both") -> Iterator[str]:
    """One JSON object per line; yields blocks of `BLOCK_ROWS` lines."""
    fields = _fields(which)
    encode = json.JSONEncoder(ensure_ascii=False).encode
    for block in _blocks(rows):
        yield "".join(encode({k: getattr(row, k) for k in fields}) + "\n" for row in block)


def to_csv(rows: Iterable[ExportRow], which: Which = "both") -> Iterator[str]:
    """A header line, then one line per row; yields blocks of `BLOCK_ROWS` lines."""
    fields = _fields(which)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(fields)
    yield buffer.getvalue()
    values = attrgetter(*fields)
    texts = [i for i, name in enumerate(fields) if name in _TEXT_FIELDS]
    for block in _blocks(rows):
        buffer.seek(0)
        buffer.truncate()
        for row in block:
            cells = list(values(row))  # None is written as an empty cell, numbers as str()
            for i in texts:
                cell = cells[i]
                if cell and cell.startswith(_FORMULA_START):
                    cells[i] = "'" + cell
            writer.writerow(cells)
        yield buffer.getvalue()


def to_coco(rows: Iterable[ExportRow], which: Which = "both") -> Iterator[str]:
    """COCO captions: `images` and `annotations` ({id, image_id, caption}); with `both`, each
    annotation says its `source` (model or reviewed)."""
    images, annotations = [], []
    for row in rows:
        images.append(
            {
                "id": row.image_id,
                "file_name": row.file_name,
                "width": row.width,
                "height": row.height,
                "job_id": row.job_id,
                "storage_key": row.storage_key,
            }
        )
        texts = []
        if which in ("reviewed", "both") and row.reviewed_caption is not None:
            texts.append(("reviewed", row.reviewed_caption))
        if which in ("model", "both") and row.model_caption is not None:
            texts.append(("model", row.model_caption))
        for source, text in texts:
            annotation = {"id": len(annotations) + 1, "image_id": row.image_id, "caption": text}
            if which == "both":
                annotation["source"] = source
            annotations.append(annotation)
    document = {
        "info": {"description": "Captioner export", "caption_source": which},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    yield json.dumps(document, ensure_ascii=False)


WRITERS = {"jsonl": to_jsonl, "csv": to_csv, "coco": to_coco}


def render(rows: Iterable[ExportRow], fmt: str, which: Which = "both") -> Iterator[str]:
    if fmt not in WRITERS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    return WRITERS[fmt](rows, which)
