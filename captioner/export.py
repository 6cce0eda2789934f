"""Export captions: JSONL, CSV (spreadsheet-formula safe) or COCO captions JSON.

`export_rows` yields one `ExportRow` per image (of a job, or of every job a user may see)
with the model's caption (the newest version that captioned it) and the current review.
`which` picks what goes out: `model` captions, `reviewed` captions (approved or corrected
only), or `both`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from captioner.state.models import Caption, Image, Job, Review, ReviewDecision, User
from captioner.state.reviews import current_review_ids

Which = Literal["model", "reviewed", "both"]
FORMATS = ("jsonl", "csv", "coco")
WHICH = ("model", "reviewed", "both")
CONTENT_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "coco": "application/json",
}
# Cells starting with these are formulas to spreadsheet programs (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
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
) -> Iterator[ExportRow]:
    """Rows for the images of `job_id` (or all jobs; only `owner_id`'s if given), by image id."""
    current = current_review_ids()
    query = (
        select(Image, Review, User.email)
        .join(Job, Job.id == Image.job_id)
        .outerjoin(current, current.c.image_id == Image.id)
        .outerjoin(Review, Review.id == current.c.review_id)
        .outerjoin(User, User.id == Review.reviewer_id)
        .order_by(Image.id)
    )
    if job_id is not None:
        query = query.where(Image.job_id == job_id)
    if owner_id is not None:
        query = query.where(Job.owner_id == owner_id)
    for chunk in _chunks(session.execute(query.execution_options(yield_per=500)), 500):
        ids = [image.id for image, _, _ in chunk]
        captions: dict[int, Caption] = {}
        for caption in session.scalars(
            select(Caption).where(Caption.image_id.in_(ids)).order_by(Caption.model_version_id)
        ):
            captions[caption.image_id] = caption  # newest model version last, so it wins
        for image, review, reviewer in chunk:
            caption = captions.get(image.id)
            accepted = review is not None and review.decision in (
                ReviewDecision.APPROVED,
                ReviewDecision.CORRECTED,
            )
            row = ExportRow(
                image_id=image.id,
                job_id=image.job_id,
                file_name=image.original_name,
                storage_key=image.storage_key,
                width=image.width,
                height=image.height,
                model_caption=caption.text if caption else None,
                model_score=round(caption.score, 6) if caption else None,
                review_decision=review.decision.value
                if review is not None and review.decision != ReviewDecision.UNDONE
                else None,
                reviewed_caption=review.text if accepted else None,
                reviewer=reviewer if accepted else None,
            )
            if which == "model" and row.model_caption is None:
                continue
            if which == "reviewed" and row.reviewed_caption is None:
                continue
            yield row


def _chunks(iterable: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in iterable:
        chunk.append(tuple(item))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


def to_jsonl(rows: Iterable[ExportRow], which: Which = "both") -> Iterator[str]:
    fields = _fields(which)
    for row in rows:
        data = asdict(row)
        yield json.dumps({k: data[k] for k in fields}, ensure_ascii=False) + "\n"


def to_csv(rows: Iterable[ExportRow], which: Which = "both") -> Iterator[str]:
    fields = _fields(which)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(fields)
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        data = asdict(row)
        writer.writerow([escape_cell(data[k]) for k in fields])
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
