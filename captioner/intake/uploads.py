"""Uploaded files and zip archives: their checks, shared by the API and the UI, and their storage.

Everything is checked before anything is stored: one refused file or zip member refuses the
whole upload with its reason (`SubmissionRejected`, `TooLarge`).

Rules enforced here, each with a test:
- every file: at most `max_image_bytes`, a supported format, at most `max_image_pixels`;
- zip members: no absolute paths, no `..`, no links or devices, at most `zip_max_members`
  members, at most `zip_max_total_bytes` uncompressed (counted while reading, so a lying
  header does not help) and at most `zip_max_ratio` per member, whatever its size (declared, and
  counted while inflating);
- one upload: at least one image and at most `max_submit_items`.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Protocol

from captioner.intake.decode import ImageRejected, open_image
from captioner.intake.errors import SubmissionRejected, TooLarge
from captioner.settings import get_settings
from captioner.state import jobs

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from captioner.settings import Settings
    from captioner.storage import ObjectStore


IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".avif",
    ".heic",
    ".heif",
)


@dataclass(frozen=True)
class IncomingFile:
    """One checked file of a submission: its name as given and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class CheckedUpload:
    """The files (and zip members) of one upload that passed every check, and the job source
    they name (`upload` or `zip:<archive name>`)."""

    files: list[IncomingFile]
    source: str


class UploadedFile(Protocol):
    """A file part of a form post (a werkzeug `FileStorage`)."""

    filename: str | None

    def read(self, size: int = -1, /) -> bytes: ...


def check_image_bytes(name: str, data: bytes, settings: Settings | None = None) -> None:
    """Header-only check of one file (format, pixel count, size); raises SubmissionRejected."""
    settings = settings or get_settings()
    if len(data) > settings.max_image_bytes:
        raise TooLarge(
            f"{name}: file too large: {len(data)} bytes > limit {settings.max_image_bytes}"
        )
    try:
        open_image(data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)
    except ImageRejected as exc:
        raise SubmissionRejected(f"{name}: {exc.reason}") from None


def check_uploads(
    uploads: Sequence[UploadedFile], archive: UploadedFile | None, settings: Settings
) -> CheckedUpload:
    """The checked files of one upload: each of `uploads` and the members of the zip `archive`;
    raises SubmissionRejected for a refused file or member, for no image at all and for more
    than `max_submit_items` images. The dashboard's API and its form both call this."""
    files = [_check_upload(storage, settings) for storage in uploads]
    if archive is not None:
        files += read_zip(archive.read(), settings)
    if not files:
        raise SubmissionRejected("no files uploaded")
    if len(files) > settings.max_submit_items:
        raise SubmissionRejected(f"more than {settings.max_submit_items} images")
    source = f"zip:{archive.filename}" if archive is not None else "upload"
    return CheckedUpload(files=files, source=source)


def _check_upload(storage: UploadedFile, settings: Settings) -> IncomingFile:
    """One uploaded file, read no further than one byte past the size limit, and checked."""
    content = storage.read(settings.max_image_bytes + 1)
    name = storage.filename or "upload"
    if len(content) > settings.max_image_bytes:
        raise TooLarge(f"{name}: larger than {settings.max_image_bytes} bytes")
    check_image_bytes(name, content, settings)
    return IncomingFile(name, content)


# --- zip archives -----------------------------------------------------------------------------


def read_zip(data: bytes | IO[bytes], settings: Settings | None = None) -> list[IncomingFile]:
    """The image members of a zip archive, after checking every member; raises SubmissionRejected.

    Directories and platform litter (`__MACOSX/`, dot files) are skipped; any other member
    must be an acceptable image. Nothing is returned unless the whole archive passes.
    """
    settings = settings or get_settings()
    with _open_zip(data) as archive:
        infos = archive.infolist()
        _check_members(infos, settings)
        files = _read_members(archive, infos, settings)
    if not files:
        raise SubmissionRejected("zip archive contains no images")
    return files


def _open_zip(data: bytes | IO[bytes]) -> zipfile.ZipFile:
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        return zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SubmissionRejected(f"not a valid zip archive: {exc}") from None


def _check_members(infos: Sequence[zipfile.ZipInfo], settings: Settings) -> None:
    """The checks the central directory allows before anything is decompressed."""
    if len(infos) > settings.zip_max_members:
        raise SubmissionRejected(f"zip has {len(infos)} members > limit {settings.zip_max_members}")
    for info in infos:
        problem = _member_problem(info) or _ratio_problem(info, settings)
        if problem:
            raise SubmissionRejected(f"zip member {info.filename!r} refused: {problem}")
    declared = sum(info.file_size for info in infos)
    if declared > settings.zip_max_total_bytes:
        raise SubmissionRejected(
            f"zip uncompresses to {declared} bytes > limit {settings.zip_max_total_bytes}"
        )


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if "\x00" in name:
        return "NUL byte in member name"
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # made on Unix: the high bits are st_mode
        kind = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            return "symbolic link member"
        if kind and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "special file member"
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        return "absolute path"
    if ".." in normalised.split("/"):
        return "path escapes the archive ('..')"
    return None


def _ratio_problem(
    info: zipfile.ZipInfo, settings: Settings, size: int | None = None
) -> str | None:
    """Every member, whatever its size, is held to `zip_max_ratio`: by its declared size, and
    (`size`) by the bytes it really inflated to."""
    ratio = (info.file_size if size is None else size) / max(info.compress_size, 1)
    if ratio > settings.zip_max_ratio:
        return f"compression ratio {ratio:.0f} > limit {settings.zip_max_ratio:g} (zip bomb?)"
    return None


def _ratio_budget(info: zipfile.ZipInfo, settings: Settings) -> int:
    """The most bytes a member may inflate to within `zip_max_ratio` (a lying header does not
    raise it)."""
    return int(max(info.compress_size, 1) * settings.zip_max_ratio)


def _read_members(
    archive: zipfile.ZipFile, infos: Sequence[zipfile.ZipInfo], settings: Settings
) -> list[IncomingFile]:
    """Every image member, read within the size budgets and checked."""
    files: list[IncomingFile] = []
    total = 0
    for info in infos:
        if info.is_dir() or _is_litter(info.filename):
            continue
        budget = min(
            settings.max_image_bytes,
            settings.zip_max_total_bytes - total,
            _ratio_budget(info, settings),
        )
        content = _read_member(archive, info, budget + 1)
        problem = _ratio_problem(info, settings, size=len(content))
        if problem:
            raise SubmissionRejected(f"zip member {info.filename!r} refused: {problem}")
        total += len(content)
        if total > settings.zip_max_total_bytes:
            raise SubmissionRejected(
                f"zip uncompresses to more than {settings.zip_max_total_bytes} bytes"
            )
        if len(content) > settings.max_image_bytes:
            raise TooLarge(
                f"zip member {info.filename!r}: larger than {settings.max_image_bytes} bytes"
            )
        check_image_bytes(info.filename, content, settings)
        files.append(IncomingFile(info.filename, content))
    return files


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """At most `budget` bytes of one member: a lying header cannot inflate us."""
    try:
        with archive.open(info) as member:
            return member.read(budget)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
        raise SubmissionRejected(f"zip member {info.filename!r} unreadable: {exc}") from None


def _is_litter(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts if p)


# --- storing ----------------------------------------------------------------------------------


def owned_key(namespace: str, owner_id: int | None, sha256: str, name: str) -> str:
    """Content-addressed object key for bytes the system stores for one owner:
    `<namespace>/<owner id>/<sha[:2]>/<sha><ext>` (an owner's identical files are stored once;
    owner 0 for a job without one, made from the command line)."""
    suffix = posixpath.splitext(name.lower())[1]
    suffix = suffix if suffix in IMAGE_SUFFIXES else ""
    return f"{namespace}/{owner_id or 0}/{sha256[:2]}/{sha256}{suffix}"


def upload_key(sha256: str, name: str, *, owner_id: int | None) -> str:
    """The object key of uploaded bytes, under their owner's namespace `uploads/<owner id>/`."""
    return owned_key("uploads", owner_id, sha256, name)


def store_files(
    session: Session,
    store: ObjectStore,
    job_id: int,
    files: Sequence[IncomingFile],
    *,
    owner_id: int | None,
) -> list[int]:
    """Put checked files in the object store under `owner_id`'s namespace and queue them as
    images of the job; returns ids."""
    specs = []
    for f in files:
        digest = hashlib.sha256(f.data).hexdigest()
        key = upload_key(digest, f.name, owner_id=owner_id)
        if not store.exists(key):
            store.put(key, f.data)
        specs.append(
            jobs.ImageSpec(
                storage_key=key,
                original_name=f.name.rsplit("/", 1)[-1][:1024],
                content_sha256=digest,
                size_bytes=len(f.data),
            )
        )
    return jobs.submit_images(session, job_id, specs)
