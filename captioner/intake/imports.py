"""Caption imports: captions written elsewhere (another model, a data set, an earlier export)
brought in as a job whose images are already captioned, ready for review and training.

The input is JSONL, CSV or COCO captions; each row names one image (an object `key` in the
store, or an http(s) `url`) and its `caption`, with an optional `score`, `external_id` and
`review` (`approved`, `corrected` with its text, or `rejected`). `parse` reads every row and
checks it; one bad row refuses the whole import (`ImportRefused`: the first `MAX_ERRORS`
problems, each with its line), so nothing is created from a file with mistakes in it.

`create_import_job` then checks what the user may do (keys only inside their source locations,
as a key submission; reviews only with the reviewer role; URLs as a URL submission) and that
every key names an object in the store (nothing else would read it before a reviewer or a
training run needs its bytes), creates the
job (source `import:<name>`) and, in the caller's transaction, the key images, captioned by the
import (`captioner.state.imports`). URL images are fetched by the background URL fetch, which
captions each with its imported caption once its bytes are stored (`captioner.intake.fetch`):
an imported image is never sent to a caption worker, so no model caption lands over it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from captioner.intake import fetch, submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.prefixes import SourceRefused, check_keys, check_readable, readable_locations
from captioner.intake.urls import check_url
from captioner.state import imports, jobs
from captioner.state.models import ReviewDecision, User, UserRole

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from captioner.settings import Settings
    from captioner.state.models import Job
    from captioner.storage import ObjectStore

FORMATS = ("jsonl", "csv", "coco")
# The most rows one import takes (as many as one key or URL submission).
MAX_ROWS = 100_000
# The most problems a refusal lists.
MAX_ERRORS = 20
# The longest caption or review text an import takes (as a review in the dashboard).
TEXT_MAX_LENGTH = 2000
# The score of an imported caption that comes without one. The review queue shows the least
# confident captions first, by score; a model's scores are confidences in [0, 1]. So unscored
# imports come after every model caption, in the order of the file.
UNSCORED = 1.0
# Each field and the other names it is read under: the columns of `captioner export` too, so an
# export can be imported again.
ALIASES = {
    "key": ("key", "storage_key"),
    "url": ("url",),
    "caption": ("caption", "model_caption"),
    "score": ("score", "model_score"),
    "external_id": ("external_id",),
    "review": ("review", "review_decision"),
    "review_text": ("review_text", "reviewed_caption"),
}
# Object lookups (`ObjectStore.exists`) in flight at once when an import's keys are checked.
OBJECT_CHECK_THREADS = 16
_DECISIONS = {d.value: d for d in imports.IMPORT_DECISIONS}
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "coco"}


# --- what a file says -------------------------------------------------------------------------


@dataclass(frozen=True)
class RowError:
    """A problem with one row: where (`line 3`, `annotations[7]`), the line when the format
    has lines, and what is wrong."""

    where: str
    message: str
    line: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"where": self.where, "line": self.line, "message": self.message}

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ImportRefused(SubmissionRejected):
    """An import refused as a whole: `errors` are its first problems, `total` how many there
    were. `status_code` 422, or 403 for keys outside the user's source locations."""

    def __init__(self, errors: Sequence[RowError], *, status_code: int = 422) -> None:
        self.errors = list(errors[:MAX_ERRORS])
        self.total = len(errors)
        self.status_code = status_code
        first = "; ".join(str(e) for e in self.errors[:3])
        more = f" (and {self.total - 3} more)" if self.total > 3 else ""
        problems = "problem" if self.total == 1 else "problems"
        super().__init__(f"nothing imported: {self.total} {problems}: {first}{more}")


@dataclass(frozen=True)
class ImportRow:
    """One image of an import and its caption, checked."""

    where: str
    line: int | None
    key: str | None
    url: str | None
    caption: str
    score: float
    external_id: str | None = None
    candidates: tuple[dict[str, Any], ...] = ()
    decision: ReviewDecision | None = None
    review_text: str | None = None

    @property
    def location(self) -> str:
        return self.key if self.key is not None else f"url:{self.url}"


def guess_format(filename: str | None) -> str | None:
    """The format a file name's suffix says (`.jsonl`/`.ndjson`, `.csv`, `.json` = COCO)."""
    if not filename:
        return None
    return _SUFFIXES.get(PurePosixPath(filename).suffix.lower())


def parse(data: bytes | str, fmt: str, *, key_prefix: str = "") -> list[ImportRow]:
    """Every row of an import file, checked; `ImportRefused` listing the problems otherwise.
    `key_prefix` is put before every key (COCO file names are often bare)."""
    if fmt not in FORMATS:
        raise SubmissionRejected(f"unknown import format {fmt!r}: use one of {', '.join(FORMATS)}")
    text = _text(data)
    readers = {"jsonl": _jsonl_fields, "csv": _csv_fields, "coco": _coco_fields}
    return _checked(readers[fmt](text), key_prefix)


def parse_rows(rows: Sequence[Any], *, key_prefix: str = "") -> list[ImportRow]:
    """Rows given as JSON objects (an API body), each as one JSONL line; row n is `line n`."""
    fields = (_object_fields(item, f"line {n}", n) for n, item in enumerate(rows, 1))
    return _checked(fields, key_prefix)


def parse_coco(document: Any, *, key_prefix: str = "") -> list[ImportRow]:
    """A COCO captions document given as a JSON object (an API body)."""
    return _checked(_coco_document_fields(document), key_prefix)


def _text(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportRefused([RowError(f"byte {exc.start}", "the file is not UTF-8 text")]) from None


# Each reader yields (where, line, fields) per row, or a RowError for a row it cannot read.
Fields = tuple[str, int | None, Mapping[str, Any]]


def _checked(found: Iterator[Fields | RowError], key_prefix: str) -> list[ImportRow]:
    rows: list[ImportRow] = []
    errors: list[RowError] = []
    seen: dict[str, str] = {}
    for item in found:
        if len(rows) + len(errors) >= MAX_ROWS:
            raise ImportRefused([RowError(item_where(item), f"more than {MAX_ROWS} rows")])
        if isinstance(item, RowError):
            errors.append(item)
            continue
        where, line, fields = item
        try:
            row = _row(where, line, fields, key_prefix)
        except SubmissionRejected as exc:
            errors.append(RowError(where, exc.reason, line))
            continue
        if row.location in seen:
            errors.append(RowError(where, f"the same image as {seen[row.location]}", line))
            continue
        seen[row.location] = where
        rows.append(row)
    if errors:
        raise ImportRefused(errors)
    if not rows:
        raise ImportRefused([RowError("file", "no rows to import")])
    return rows


def item_where(item: Fields | RowError) -> str:
    return item.where if isinstance(item, RowError) else item[0]


# --- one row ----------------------------------------------------------------------------------


def _get(fields: Mapping[str, Any], name: str) -> Any:
    """The field under its name or an alias; None when absent or empty (an empty CSV cell)."""
    for alias in ALIASES.get(name, (name,)):
        value = fields.get(alias)
        if value is not None and value != "":
            return value
    return None


def _row(where: str, line: int | None, fields: Mapping[str, Any], key_prefix: str) -> ImportRow:
    key, url = _location(fields, key_prefix)
    caption = _text_field(_get(fields, "caption"), "caption", required=True)
    score = _score(_get(fields, "score"))
    decision, review_text = _review(fields)
    candidates = _candidates(fields.get("candidates"), caption, score)
    return ImportRow(
        where=where,
        line=line,
        key=key,
        url=url,
        caption=caption,
        score=UNSCORED if score is None else score,
        external_id=submit.check_external_id(_get(fields, "external_id")),
        candidates=tuple(candidates),
        decision=decision,
        review_text=review_text,
    )


def _location(fields: Mapping[str, Any], key_prefix: str) -> tuple[str | None, str | None]:
    """(key, None) or (None, url): exactly one of them."""
    key, url = _get(fields, "key"), _get(fields, "url")
    if (key is None) == (url is None):
        raise SubmissionRejected("give exactly one of key or url")
    if url is not None:
        if not isinstance(url, str):
            raise SubmissionRejected("url must be a string")
        return None, url.strip()
    if not isinstance(key, str):
        raise SubmissionRejected("key must be a string")
    [checked] = check_keys([key_prefix + key.strip()])
    return checked, None


def _text_field(value: Any, name: str, *, required: bool = False) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise SubmissionRejected(f"{name} missing")
        return None
    if not isinstance(value, str):
        raise SubmissionRejected(f"{name} must be a string")
    value = value.strip()
    if len(value) > TEXT_MAX_LENGTH:
        raise SubmissionRejected(
            f"{name} too long: {len(value)} characters > limit {TEXT_MAX_LENGTH}"
        )
    return value


def _score(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SubmissionRejected("score must be a number")
    try:
        score = float(value)
    except ValueError:
        raise SubmissionRejected(f"score must be a number, not {str(value)[:40]!r}") from None
    if not math.isfinite(score):
        raise SubmissionRejected("score must be a finite number")
    return score


def _candidates(value: Any, caption: str, score: float | None) -> list[dict[str, Any]]:
    """The n-best list: as given (`[{"text", "score"}, ...]`, best first), else the caption."""
    if value is None:
        return [{"text": caption, "score": score}]
    if not isinstance(value, list) or not value:
        raise SubmissionRejected("candidates must be a list of {text, score}")
    out = []
    for item in value:
        if not isinstance(item, Mapping):
            raise SubmissionRejected("candidates must be a list of {text, score}")
        text = _text_field(item.get("text"), "a candidate's text", required=True)
        out.append({"text": text, "score": _score(item.get("score"))})
    return out


def _review(fields: Mapping[str, Any]) -> tuple[ReviewDecision | None, str | None]:
    """(decision, text) of the row's review: `review` is a decision (its text in
    `review_text`) or an object `{"decision": ..., "text": ...}`."""
    review, text = _get(fields, "review"), _get(fields, "review_text")
    if isinstance(review, Mapping):
        review, text = review.get("decision"), review.get("text", text)
    if review is None:
        if text is not None:
            raise SubmissionRejected("review_text without a review decision")
        return None, None
    decision = _DECISIONS.get(str(review).strip().lower())
    if decision is None:
        raise SubmissionRejected(
            f"review must be one of {', '.join(_DECISIONS)}, not {str(review)[:40]!r}"
        )
    text = _text_field(text, "review text")
    if decision == ReviewDecision.CORRECTED and text is None:
        raise SubmissionRejected("a corrected review needs its text (review_text)")
    return decision, None if decision == ReviewDecision.REJECTED else text


# --- the formats --------------------------------------------------------------------------------


def _object_fields(item: Any, where: str, line: int) -> Fields | RowError:
    if not isinstance(item, dict):
        return RowError(where, "not a JSON object", line)
    return where, line, item


def _jsonl_fields(text: str) -> Iterator[Fields | RowError]:
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as exc:
            yield RowError(f"line {n}", f"not JSON: {exc}", n)
            continue
        yield _object_fields(item, f"line {n}", n)


def _csv_fields(text: str) -> Iterator[Fields | RowError]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        yield RowError("line 1", f"not CSV: {exc}", 1)
        return
    named = {name for names in ALIASES.values() for name in names}
    if not named & set(header):
        yield RowError("line 1", "the first line must name the columns (key or url, caption)", 1)
        return
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RowError(f"line {reader.line_num}", f"not CSV: {exc}", reader.line_num)
            return
        fields = {k: v for k, v in record.items() if k is not None}
        yield f"line {reader.line_num}", reader.line_num, fields


def _coco_fields(text: str) -> Iterator[Fields | RowError]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", 1)
        yield RowError(f"line {line}", f"not JSON: {exc}", line)
        return
    yield from _coco_document_fields(document)


def _coco_document_fields(document: Any) -> Iterator[Fields | RowError]:
    """A COCO captions document: `images` ({id, file_name | key | url | coco_url, optional
    external_id and review}) and `annotations` ({image_id, caption, optional score and
    review}). An image's first annotation is its caption; all of them are its candidates. The
    external id is the image's `external_id`, else its COCO id."""
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        yield RowError("document", "a COCO captions document has a list of images")
        return
    annotations = document.get("annotations")
    if not isinstance(annotations, list):
        yield RowError("document", "a COCO captions document has a list of annotations")
        return
    captions: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
    for n, note in enumerate(annotations):
        if not isinstance(note, dict) or not _is_coco_id(note.get("image_id")):
            yield RowError(f"annotations[{n}]", "an annotation is an object with an image_id")
            continue
        captions.setdefault(note["image_id"], []).append((n, note))
    known: set[Any] = set()
    for n, image in enumerate(document["images"]):
        if isinstance(image, dict) and image.get("id") in known:
            yield RowError(f"images[{n}]", f"image id {image['id']!r} given twice")
            continue
        item = _coco_image(n, image, captions)
        if not isinstance(item, RowError):
            known.add(image["id"])
        yield item
    for image_id, notes in captions.items():
        if image_id not in known:
            where = f"annotations[{notes[0][0]}]"
            yield RowError(where, f"image_id {image_id!r} is not one of the images")


def _is_coco_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _coco_image(
    n: int, image: Any, captions: Mapping[Any, list[tuple[int, dict[str, Any]]]]
) -> Fields | RowError:
    where = f"images[{n}]"
    if not isinstance(image, dict) or not _is_coco_id(image.get("id")):
        return RowError(where, "an image is an object with an id")
    notes = [note for _, note in captions.get(image["id"], [])]
    if not notes:
        return RowError(where, f"no annotation gives image {image['id']!r} a caption")
    reviewed = [note for note in [image, *notes] if note.get("review") is not None]
    if len(reviewed) > 1:
        return RowError(where, "more than one review for the image")
    first = notes[0]
    fields = {
        "caption": first.get("caption"),
        "score": first.get("score"),
        "external_id": image.get("external_id", image["id"]),
        "candidates": [{"text": note.get("caption"), "score": note.get("score")} for note in notes],
        **({"review": reviewed[0]["review"]} if reviewed else {}),
        **_coco_location(image),
    }
    return where, None, fields


def _coco_location(image: Mapping[str, Any]) -> dict[str, Any]:
    """`key` or `url` as given, else the file name (a URL when it is one), else `coco_url`."""
    for name in ("key", "url"):
        if image.get(name):
            return {name: image[name]}
    where = image.get("file_name") or image.get("coco_url")
    if isinstance(where, str) and where.lower().startswith(("http://", "https://")):
        return {"url": where}
    return {"key": where}


# --- the job ----------------------------------------------------------------------------------


@dataclass
class ImportedJob:
    """What `create_import_job` did: the job, whether its URLs are to be fetched (send
    `captioner.fetch_urls` after the commit) and webhook deliveries to publish after it."""

    job: Job
    fetch_urls: bool = False
    deliveries: list[int] = field(default_factory=list)


def check_permissions(user: User, settings: Settings, rows: Sequence[ImportRow]) -> None:
    """Reviews in an import need the reviewer role (403); every key must lie in the user's
    source locations (403, as a key submission); every URL must be one a URL submission
    takes (422). Each refusal names its rows."""
    if user.role not in (UserRole.ADMIN, UserRole.REVIEWER):
        reviewed = [r for r in rows if r.decision is not None]
        if reviewed:
            message = "a review in an import needs the reviewer role"
            raise ImportRefused(
                [RowError(r.where, message, r.line) for r in reviewed], status_code=403
            )
    _check_locations(user, settings, rows)


def _check_locations(user: User, settings: Settings, rows: Sequence[ImportRow]) -> None:
    locations = readable_locations(user, settings)
    refused: list[RowError] = []
    unsafe: list[RowError] = []
    for row in rows:
        try:
            if row.key is not None:
                check_readable(row.key, locations, is_prefix=False)
            else:
                check_url(row.url or "", allow_hosts=settings.url_allow_hosts, resolve=False)
        except SourceRefused as exc:
            refused.append(RowError(row.where, exc.reason, row.line))
        except SubmissionRejected as exc:
            unsafe.append(RowError(row.where, exc.reason, row.line))
    if unsafe:
        raise ImportRefused(unsafe)
    if refused:
        raise ImportRefused(refused, status_code=403)


def check_objects(store: ObjectStore, rows: Sequence[ImportRow]) -> None:
    """Every key names an object in the store (a review and a training run need the image's
    bytes, and no worker will read them to find out); ImportRefused naming the rows whose key
    has nothing behind it. The lookups run `OBJECT_CHECK_THREADS` at a time."""
    keyed = [r for r in rows if r.key is not None]
    if not keyed:
        return
    with ThreadPoolExecutor(max_workers=OBJECT_CHECK_THREADS) as pool:
        found = list(pool.map(store.exists, [r.key for r in keyed]))
    missing = [
        RowError(r.where, f"no object at key {r.key!r} in the store", r.line)
        for r, there in zip(keyed, found, strict=True)
        if not there
    ]
    if missing:
        raise ImportRefused(missing)


def create_import_job(
    session: Session,
    user: User,
    settings: Settings,
    store: ObjectStore,
    rows: Sequence[ImportRow],
    *,
    name: str,
    fmt: str,
) -> ImportedJob:
    """Check the rows against the user (`check_permissions`) and the store (`check_objects`),
    then create the job and its key images, captioned and reviewed by the import, in the
    caller's transaction (nothing is committed). A job with URLs keeps them with their
    captions in its options, for the background fetch; one without is finished now, its
    webhook events recorded."""
    check_permissions(user, settings, rows)
    check_objects(store, rows)
    url_rows = [r for r in rows if r.url is not None]
    options: dict[str, Any] = {"import": {"format": fmt, "rows": len(rows)}}
    if url_rows:
        options["urls"] = [_url_entry(r).as_option() for r in url_rows]
    job = jobs.create_job(session, name, source=f"import:{name}", options=options, owner_id=user.id)
    key_rows = [r for r in rows if r.key is not None]
    for start in range(0, len(key_rows), jobs.SUBMIT_CHUNK):
        _import_keys(session, job.id, key_rows[start : start + jobs.SUBMIT_CHUNK], user.id)
    if url_rows:
        return ImportedJob(job, fetch_urls=True)
    deliveries = submit.record_job_events(session, job.id, finish=True)
    return ImportedJob(job, deliveries=deliveries)


def _import_keys(session: Session, job_id: int, rows: Sequence[ImportRow], reviewer: int) -> None:
    specs = [jobs.ImageSpec(storage_key=r.key or "", external_id=r.external_id) for r in rows]
    ids = jobs.submit_images(session, job_id, specs)
    captions = [_imported(image_id, row) for image_id, row in zip(ids, rows, strict=True)]
    imports.import_captioned(session, captions, reviewer_id=reviewer)


def _imported(image_id: int, row: ImportRow) -> imports.ImportedCaption:
    return imports.ImportedCaption(
        image_id=image_id,
        text=row.caption,
        score=row.score,
        candidates=list(row.candidates),
        decision=row.decision,
        review_text=row.review_text,
    )


def _url_entry(row: ImportRow) -> fetch.UrlEntry:
    """The URL row as the job's options keep it for the fetch (`fetch.imported_caption` reads
    the caption back)."""
    caption = {
        "text": row.caption,
        "score": row.score,
        "candidates": list(row.candidates),
        "decision": row.decision.value if row.decision else None,
        "review_text": row.review_text,
    }
    return fetch.UrlEntry(row.url or "", row.external_id, caption)
