"""Export captions: JSONL, CSV (spreadsheet-formula safe), COCO captions JSON, Parquet, a
Hugging Face `datasets` image folder (zip) and WebDataset tar shards.

`export_rows` yields one `ExportRow` per image (of a job, or of every job a user may see)
with the model's caption (the newest version that captioned it; an imported caption counts as
older than any model version), the current review and the submitter's `external_id`. `which`
picks what goes out: `model` captions, `reviewed` captions (approved or corrected only), or
`both`.

The images are read through a server-side cursor (`stream_results`) in chunks of
`EXPORT_CHUNK`; each chunk's captions and current reviews are loaded in one query each, so memory
holds one chunk and the queries grow with the chunks, not with the rows. Rows are read through
the session's connection (Core rows, no ORM bookkeeping per row).

Two ways out, both streamed (memory bounded whatever the row count):
- `render(rows, fmt, which)`: the text formats (`FORMATS`: jsonl, csv, coco) as blocks of text,
  what `GET /api/v1/export` sends while it reads;
- `write_export(rows, fmt, out, which, store=...)`: any format (`BACKGROUND_FORMATS`) into a
  binary file, what the background export task writes before it uploads the file. Parquet is
  written in row groups with a schema; the image folder and the WebDataset shards fetch each
  image's bytes from the object store (a few at a time on a thread pool, in row order).
COCO puts its annotations after its images: they wait in a temporary file (spilled to disk past
a few MB), never in a list.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import tarfile
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import IO, TYPE_CHECKING, Any, Literal

import orjson
from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session

from captioner.state.models import Caption, Image, Job, Review, ReviewDecision, User
from captioner.storage import ObjectNotFound

if TYPE_CHECKING:
    from captioner.storage import ObjectStore

Which = Literal["model", "reviewed", "both"]
# The formats streamed as text (over HTTP by `GET /api/v1/export`, or into a file).
FORMATS = ("jsonl", "csv", "coco")
# Every format a background export writes.
BACKGROUND_FORMATS = (*FORMATS, "parquet", "imagefolder", "webdataset")
WHICH = ("model", "reviewed", "both")
CONTENT_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "coco": "application/json",
    "parquet": "application/vnd.apache.parquet",
    "imagefolder": "application/zip",
    "webdataset": "application/x-tar",
}
EXTENSIONS = {
    "jsonl": "jsonl",
    "csv": "csv",
    "coco": "json",
    "parquet": "parquet",
    "imagefolder": "zip",
    "webdataset": "tar",
}
# Images per chunk read from the cursor (and per caption / review query).
EXPORT_CHUNK = 2000
# A chunk's ids are looked up as a range when it spans at most this many ids per image.
DENSE_FACTOR = 4
# Rows per block of text the JSONL and CSV writers yield.
BLOCK_ROWS = 500
# Rows per Parquet row group (one group's columns are in memory at a time).
PARQUET_ROW_GROUP = 20_000
# Samples per WebDataset shard.
SHARD_SAMPLES = 1000
# Images fetched from the object store at once (image folder, WebDataset), in row order.
FETCH_THREADS = 8
FETCH_WINDOW = 32
# COCO annotations kept in memory before they spill to a temporary file.
SPOOL_BYTES = 4 * 1024 * 1024
# Cells starting with these are formulas to spreadsheet programs (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The text columns: the only cells that can look like a formula.
_TEXT_FIELDS = frozenset(
    (
        "file_name",
        "storage_key",
        "external_id",
        "model_caption",
        "review_decision",
        "reviewed_caption",
        "reviewer",
    )
)
_ACCEPTED = (ReviewDecision.APPROVED, ReviewDecision.CORRECTED)
_NO_CAPTION: tuple[None, None] = (None, None)
_NO_REVIEW: tuple[None, None, None] = (None, None, None)


@dataclass(slots=True)
class ExportRow:
    """One image's row. Read-only by convention: not `frozen`, whose `__init__` sets each
    field through `object.__setattr__` and costs about six times as much (one row per image)."""

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
    external_id: str | None = None


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
        Image.id,
        Image.job_id,
        Image.original_name,
        Image.storage_key,
        Image.width,
        Image.height,
        Image.external_id,
    ).order_by(Image.id)
    if job_id is not None:
        query = query.where(Image.job_id == job_id)
    if owner_id is not None:
        query = query.where(Image.job_id.in_(select(Job.id).where(Job.owner_id == owner_id)))
    connection = session.connection()
    result = connection.execute(query.execution_options(stream_results=True, yield_per=chunk_size))
    try:
        for chunk in result.partitions():
            yield from _chunk_rows(connection, chunk, which)
    finally:
        result.close()


def _chunk_rows(connection, chunk: Sequence[Any], which: Which) -> Iterator[ExportRow]:
    ids = [image[0] for image in chunk]
    captions = _model_captions(connection, ids)
    current = _current_reviews(connection, ids)
    model_only, reviewed_only = which == "model", which == "reviewed"
    for image_id, job, name, key, width, height, external_id in chunk:
        text, score = captions.get(image_id, _NO_CAPTION)
        decision, reviewed, reviewer = current.get(image_id, _NO_REVIEW)
        if model_only and text is None:
            continue
        if reviewed_only and reviewed is None:
            continue
        yield ExportRow(
            image_id,
            job,
            name,
            key,
            width,
            height,
            text,
            score,
            decision,
            reviewed,
            reviewer,
            external_id,
        )


def _among(column, ids: list[int]) -> ColumnElement[bool]:
    """`column` is one of `ids` (sorted): as an id range when they are dense (a job's images
    usually are; a range binds two values instead of thousands, and rows of other images in it
    are simply not looked up), else as a list."""
    if ids[-1] - ids[0] < DENSE_FACTOR * len(ids):
        return and_(column >= ids[0], column <= ids[-1])
    return column.in_(ids)


def _model_captions(connection, ids: list[int]) -> dict[int, tuple[str, float]]:
    """{image id: (text, score rounded to 6 places)} of the caption by the newest model version
    of each image (an imported caption, which has no version, only when no model captioned the
    image)."""
    rows = connection.execute(
        select(Caption.image_id, Caption.text, Caption.score)
        .where(_among(Caption.image_id, ids))
        .order_by(Caption.model_version_id.asc().nulls_first())
    )
    # Newest model version last, so it wins.
    return {image_id: (text, round(score, 6)) for image_id, text, score in rows.all()}


def _current_reviews(connection, ids: list[int]) -> dict[int, tuple[str | None, Any, Any]]:
    """{image id: (decision, reviewed text, reviewer's email)} of the current review of each
    image; the text and reviewer only for an accepted (approved or corrected) review, no
    decision for an undone one."""
    current = (
        select(func.max(Review.id)).where(_among(Review.image_id, ids)).group_by(Review.image_id)
    )
    rows = connection.execute(
        select(Review.image_id, Review.decision, Review.text, User.email)
        .outerjoin(User, User.id == Review.reviewer_id)
        .where(Review.id.in_(current))
    )
    out: dict[int, tuple[str | None, Any, Any]] = {}
    for image_id, decision, text, email in rows.all():
        if decision in _ACCEPTED:
            out[image_id] = (decision.value, text, email)
        elif decision != ReviewDecision.UNDONE:
            out[image_id] = (decision.value, None, None)
    return out


def _fields(which: Which) -> list[str]:
    base = ["image_id", "job_id", "file_name", "storage_key", "external_id", "width", "height"]
    model = ["model_caption", "model_score"]
    reviewed = ["review_decision", "reviewed_caption", "reviewer"]
    return base + (model if which != "reviewed" else []) + (reviewed if which != "model" else [])


def best_caption(row: ExportRow, which: Which = "both") -> str | None:
    """The one caption a training set takes from a row: the reviewed text where there is one
    (unless `which` is model), else the model's (unless `which` is reviewed)."""
    if which != "model" and row.reviewed_caption is not None:
        return row.reviewed_caption
    return row.model_caption if which != "reviewed" else None


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


# --- text formats ---------------------------------------------------------------------------


def _jsonl_blocks(rows: Iterable[ExportRow], which: Which) -> Iterator[bytes]:
    """JSON lines as UTF-8, a block of `BLOCK_ROWS` lines at a time."""
    dumps = orjson.dumps
    if which == "both":  # every field: the row itself is the object
        for block in _blocks(rows):
            yield b"\n".join(map(dumps, block)) + b"\n"
        return
    fields = _fields(which)
    values = attrgetter(*fields)
    for block in _blocks(rows):
        yield b"\n".join([dumps(dict(zip(fields, values(row), strict=True))) for row in block])
        yield b"\n"


def to_jsonl(rows: Iterable[ExportRow], which: Which = "both") -> Iterator[str]:
    """One JSON object per line; yields blocks of `BLOCK_ROWS` lines."""
    for block in _jsonl_blocks(rows, which):
        yield block.decode("utf-8")


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


def _coco_image(row: ExportRow) -> dict[str, Any]:
    return {
        "id": row.image_id,
        "file_name": row.file_name,
        "width": row.width,
        "height": row.height,
        "job_id": row.job_id,
        "storage_key": row.storage_key,
        "external_id": row.external_id,
    }


def _coco_texts(row: ExportRow, which: Which) -> list[tuple[str, str]]:
    texts = []
    if which != "model" and row.reviewed_caption is not None:
        texts.append(("reviewed", row.reviewed_caption))
    if which != "reviewed" and row.model_caption is not None:
        texts.append(("model", row.model_caption))
    return texts


def _coco_bytes(rows: Iterable[ExportRow], which: Which) -> Iterator[bytes]:
    """COCO captions as UTF-8, written as the rows come; the annotations wait in a temporary
    file (in memory up to `SPOOL_BYTES`, then on disk) until the images are out."""
    info = {"description": "Captioner export", "caption_source": which}
    yield b'{"info": ' + orjson.dumps(info) + b', "licenses": [], "images": ['
    annotation_id = 0
    first_image = True
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES, mode="w+b") as spool:
        for block in _blocks(rows):
            annotations = []
            for row in block:
                for source, text in _coco_texts(row, which):
                    annotation_id += 1
                    annotation = {"id": annotation_id, "image_id": row.image_id, "caption": text}
                    if which == "both":
                        annotation["source"] = source
                    annotations.append(orjson.dumps(annotation))
            if annotations:
                spool.write((b"," if spool.tell() else b"") + b",".join(annotations))
            images = b",".join([orjson.dumps(_coco_image(row)) for row in block])
            yield images if first_image else b"," + images
            first_image = False
        yield b'], "annotations": ['
        spool.seek(0)
        while chunk := spool.read(1024 * 1024):
            yield chunk
    yield b"]}"


def to_coco(rows: Iterable[ExportRow], which: Which = "both") -> Iterator[str]:
    """COCO captions: `images` and `annotations` ({id, image_id, caption}); with `both`, each
    annotation says its `source` (model or reviewed). Written as the rows come."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for part in _coco_bytes(rows, which):
        text = decoder.decode(part)
        if text:
            yield text


WRITERS = {"jsonl": to_jsonl, "csv": to_csv, "coco": to_coco}


def render(rows: Iterable[ExportRow], fmt: str, which: Which = "both") -> Iterator[str]:
    """The rows as text in one of `FORMATS`, block by block."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    return WRITERS[fmt](rows, which)


def export_file_name(fmt: str, job_id: int | None, which: Which) -> str:
    """The file an export is saved as: `captions-job12-both.parquet`, `captions-all-model.zip`."""
    return f"captions-{'job' + str(job_id) if job_id else 'all'}-{which}.{EXTENSIONS[fmt]}"


# --- into a file: every format ----------------------------------------------------------------


@dataclass
class WriteStats:
    """What `write_export` wrote."""

    rows: int = 0  # rows read from `rows` (for the image formats: including missing images)
    missing_images: list[int] = field(default_factory=list)  # left out: no object in the store
    shards: int = 0  # WebDataset shards


class _Counted:
    """`rows`, counting them into `stats.rows` and calling `report(n)` every `every` rows."""

    def __init__(self, rows, stats: WriteStats, report, every: int) -> None:
        self.rows, self.stats, self.report, self.every = rows, stats, report, every

    def __iter__(self) -> Iterator[ExportRow]:
        stats, report, every = self.stats, self.report, self.every
        n = 0
        for row in self.rows:
            yield row
            n += 1
            if report is not None and n % every == 0:
                stats.rows = n
                report(n)
        stats.rows = n


def write_export(
    rows: Iterable[ExportRow],
    fmt: str,
    out: IO[bytes],
    which: Which = "both",
    *,
    store: ObjectStore | None = None,
    report: Callable[[int], None] | None = None,
    every: int = 5000,
) -> WriteStats:
    """Write the rows into `out` (a binary file) in `fmt`, one of `BACKGROUND_FORMATS`;
    `report(rows read)` is called every `every` rows. The image folder and WebDataset fetch each
    image's bytes from `store`; a row whose object is missing is left out (its id is listed in
    the stats)."""
    if fmt not in BACKGROUND_FORMATS:
        raise ValueError(
            f"unknown export format {fmt!r}: use one of {', '.join(BACKGROUND_FORMATS)}"
        )
    stats = WriteStats()
    counted = _Counted(rows, stats, report, every)
    if fmt in ("imagefolder", "webdataset"):
        if store is None:
            raise ValueError(f"a {fmt} export needs the object store for the image bytes")
        samples = _with_images(counted, store, stats)
        if fmt == "imagefolder":
            _write_imagefolder(samples, out, which)
        else:
            stats.shards = _write_webdataset(samples, out, which)
    elif fmt == "parquet":
        _write_parquet(counted, out, which)
    else:
        parts = {
            "jsonl": _jsonl_blocks,
            "coco": _coco_bytes,
            "csv": lambda r, w: (text.encode("utf-8") for text in to_csv(r, w)),
        }[fmt](counted, which)
        for part in parts:
            out.write(part)
    return stats


_PARQUET_TYPES = {
    "image_id": "int64",
    "job_id": "int64",
    "file_name": "string",
    "original_name": "string",
    "text": "string",
    "storage_key": "string",
    "external_id": "string",
    "width": "int32",
    "height": "int32",
    "model_caption": "string",
    "model_score": "float64",
    "review_decision": "string",
    "reviewed_caption": "string",
    "reviewer": "string",
}


def parquet_schema(which: Which = "both", columns: Sequence[str] | None = None):
    """The Parquet schema of an export: `columns` (default: the fields of `which`), each
    nullable."""
    import pyarrow as pa

    return pa.schema(
        [pa.field(name, _PARQUET_TYPES[name]) for name in columns or _fields(which)],
        metadata={"description": "Captioner export", "caption_source": which},
    )


class ParquetRows:
    """Rows (tuples in the schema's column order) into a Parquet file, one row group per
    `PARQUET_ROW_GROUP` rows: only that group is in memory."""

    def __init__(self, out: IO[bytes], schema) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self.writer = pq.ParquetWriter(out, schema, compression="zstd")
        self.group: list[tuple] = []

    def add(self, values: tuple) -> None:
        self.group.append(values)
        if len(self.group) >= PARQUET_ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.group:
            self.write_columns(list(zip(*self.group, strict=True)))
            self.group = []

    def write_columns(self, columns: Sequence[Sequence[Any]]) -> None:
        """One row group from whole columns, in the schema's order."""
        import pyarrow as pa

        arrays = [pa.array(c, type=f.type) for c, f in zip(columns, self.schema, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self.writer.write_table(table, row_group_size=table.num_rows)

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _write_parquet(rows: Iterable[ExportRow], out: IO[bytes], which: Which) -> None:
    """A row group per `PARQUET_ROW_GROUP` rows, each column read off the rows at once."""
    getters = [attrgetter(name) for name in _fields(which)]
    parquet = ParquetRows(out, parquet_schema(which))
    for group in _blocks(rows, PARQUET_ROW_GROUP):
        parquet.write_columns([list(map(get, group)) for get in getters])
    parquet.close()


# --- image archives ---------------------------------------------------------------------------

# Image suffixes kept from a file name, and the suffix each spelling is written with.
_SUFFIXES = {
    "jpg": "jpg",
    "jpeg": "jpg",
    "png": "png",
    "gif": "gif",
    "webp": "webp",
    "bmp": "bmp",
    "tif": "tiff",
    "tiff": "tiff",
    "heic": "heic",
    "heif": "heif",
    "avif": "avif",
}
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_suffix(row: ExportRow, data: bytes) -> str:
    """The image's suffix (no dot): its name's or key's if that is an image suffix, else the one
    its first bytes say, else `bin`."""
    for name in (row.file_name, row.storage_key):
        suffix = name.rsplit("?", 1)[0].rpartition(".")[2].lower()
        if suffix in _SUFFIXES:
            return _SUFFIXES[suffix]
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        return "avif" if data[8:12] in (b"avif", b"avis") else "heic"
    return "bin"


def member_name(row: ExportRow, data: bytes) -> str:
    """The image's name in an image folder: `images/<image id>-<its file name>`, the name cut
    to its last path segment and to safe characters (the id keeps names unique)."""
    base = row.file_name.rsplit("?", 1)[0].rstrip("/").rpartition("/")[2]
    base = _UNSAFE.sub("_", base).strip("._")[-100:] or "image"
    suffix = image_suffix(row, data)
    stem, dot, own = base.rpartition(".")
    if not (dot and _SUFFIXES.get(own.lower()) == suffix):
        base = f"{base}.{suffix}"
    return f"images/{row.image_id}-{base}"


def _with_images(
    rows: Iterable[ExportRow], store: ObjectStore, stats: WriteStats
) -> Iterator[tuple[ExportRow, bytes]]:
    """(row, image bytes) in row order, fetched `FETCH_WINDOW` ahead on `FETCH_THREADS`
    threads; rows whose object is missing are left out (listed in `stats.missing_images`)."""

    def fetch(key: str) -> bytes | None:
        try:
            return store.get(key)
        except ObjectNotFound:
            return None

    pending: deque = deque()
    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="export-fetch") as pool:
        try:
            for row in rows:
                pending.append((row, pool.submit(fetch, row.storage_key)))
                if len(pending) >= FETCH_WINDOW:
                    yield from _fetched(pending.popleft(), stats)
            while pending:
                yield from _fetched(pending.popleft(), stats)
        finally:
            for _, future in pending:
                future.cancel()


def _fetched(item, stats: WriteStats) -> Iterator[tuple[ExportRow, bytes]]:
    row, future = item
    data = future.result()
    if data is None:
        stats.missing_images.append(row.image_id)
    else:
        yield row, data


def sample_metadata(row: ExportRow, which: Which) -> dict[str, Any]:
    """A sample's metadata in an image archive: `text` (`best_caption`), then the row's fields
    of `which` (the original file name as `original_name`)."""
    data: dict[str, Any] = {"text": best_caption(row, which)}
    for name in _fields(which):
        data["original_name" if name == "file_name" else name] = getattr(row, name)
    return data


# The image folder's metadata columns besides those of `which`.
_IMAGEFOLDER_COLUMNS = ("file_name", "text")


def _metadata_columns(which: Which) -> list[str]:
    own = ["original_name" if name == "file_name" else name for name in _fields(which)]
    return [*_IMAGEFOLDER_COLUMNS, *own]


def _write_imagefolder(samples: Iterable[tuple[ExportRow, bytes]], out: IO[bytes], which) -> None:
    """A zip of `images/...` and `metadata.parquet` (file_name, text, then the row's columns):
    what `datasets.load_dataset("imagefolder", data_files=<the zip>)` reads (or `data_dir=` once
    extracted). The metadata is Parquet, not JSON lines, so that each column keeps one type
    however its first rows look (`datasets` takes a JSON column's type from its first 10 MB:
    a column empty there would refuse the values after). It waits in a temporary file until the
    images are in."""
    columns = _metadata_columns(which)
    fields = attrgetter(*_fields(which))
    with (
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
        tempfile.TemporaryFile() as metadata,
    ):
        parquet = ParquetRows(metadata, parquet_schema(which, columns))
        for row, data in samples:
            name = member_name(row, data)
            archive.writestr(name, data)  # images are compressed already
            parquet.add((name, best_caption(row, which), *fields(row)))
        parquet.close()
        metadata.seek(0)
        info = zipfile.ZipInfo("metadata.parquet", date_time=_zip_time())
        with archive.open(info, "w", force_zip64=True) as member:
            while chunk := metadata.read(1024 * 1024):
                member.write(chunk)


def _zip_time() -> tuple[int, int, int, int, int, int]:
    return time.localtime()[:6]


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes | IO[bytes], size: int, mtime):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    archive.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else data)


def _write_webdataset(
    samples: Iterable[tuple[ExportRow, bytes]],
    out: IO[bytes],
    which: Which,
    shard_samples: int | None = None,
) -> int:
    """A tar of WebDataset shards `shard-000000.tar`, ... of `shard_samples` (default
    `SHARD_SAMPLES`) samples each; a sample is `<key>.<image suffix>`, `<key>.txt`
    (`best_caption`) and `<key>.json` (its metadata), the key being the zero-padded image id.
    Each shard is written to a temporary file, then added. Returns the number of shards."""
    shard_samples = shard_samples or SHARD_SAMPLES
    mtime = int(time.time())
    shards = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as outer:
        shard_file, shard, in_shard = None, None, 0
        for row, data in samples:
            if shard is None:
                shard_file = tempfile.TemporaryFile()
                shard = tarfile.open(fileobj=shard_file, mode="w", format=tarfile.PAX_FORMAT)
            key = f"{row.image_id:010d}"
            text = (best_caption(row, which) or "").encode("utf-8")
            meta = orjson.dumps(sample_metadata(row, which))
            _tar_add(shard, f"{key}.{image_suffix(row, data)}", data, len(data), mtime)
            _tar_add(shard, f"{key}.txt", text, len(text), mtime)
            _tar_add(shard, f"{key}.json", meta, len(meta), mtime)
            in_shard += 1
            if in_shard == shard_samples:
                _close_shard(outer, shard, shard_file, shards, mtime)
                shards, shard, in_shard = shards + 1, None, 0
        if shard is not None:
            _close_shard(outer, shard, shard_file, shards, mtime)
            shards += 1
    return shards


def _close_shard(outer: tarfile.TarFile, shard, shard_file, number: int, mtime: int) -> None:
    shard.close()
    size = shard_file.tell()
    shard_file.seek(0)
    _tar_add(outer, f"shard-{number:06d}.tar", shard_file, size, mtime)
    shard_file.close()
