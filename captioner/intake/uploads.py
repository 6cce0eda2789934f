"""Uploaded files and zip archives: their checks, shared by the API and the UI, and their storage.

An upload is taken one file at a time: each file, and each zip member, is read within its
limits, checked and put in the object store before the next is read, so memory holds one file
(at most `max_image_bytes`) however large the archive. A file or member that fails a check is
left out with its reason (`Refusal`) and the rest make the job; only an upload with nothing
acceptable is refused as a whole (`UploadRefused`, which lists every reason).

Rules enforced here, each with a test:
- every file: at most `max_image_bytes`, a supported format, at most `max_image_pixels`;
- zip members: no absolute paths, no `..`, no links or devices, and at most `zip_max_ratio` per
  member whatever its size (declared, and counted while inflating): such a member is refused
  alone; at most `zip_max_members` members and at most `zip_max_total_bytes` declared
  uncompressed, or the archive is refused; the total is counted while reading too (a lying
  header does not help: the members past it are refused);
- one upload: at least one file and at most `max_submit_items` images, counted from the files
  and the zip's directory before anything is read or stored (`PendingUpload.count`).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import stat
import zipfile
from collections.abc import Iterator, Sequence
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

# Refusals named one by one in an error message; the response lists them all.
MESSAGE_REFUSALS = 10


@dataclass(frozen=True)
class IncomingFile:
    """One checked file of a submission: its name as given and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class StoredFile:
    """One checked file already in the object store: its name as given, its key, the SHA-256 of
    its bytes and their length."""

    name: str
    key: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Refusal:
    """A file or zip member left out of an upload, and why (`too_large`: over a size limit)."""

    name: str
    reason: str
    too_large: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


class UploadRefused(SubmissionRejected):
    """An upload with no acceptable file: `refused` lists each file with its reason. 413 when
    every one was over a size limit, else 422."""

    def __init__(self, refused: Sequence[Refusal]) -> None:
        self.refused = list(refused)
        if self.refused and all(r.too_large for r in self.refused):
            self.status_code = 413
        super().__init__(refusal_summary(self.refused))


def refusal_summary(refused: Sequence[Refusal]) -> str:
    """One line naming the refused files with their reasons (the first `MESSAGE_REFUSALS`)."""
    if len(refused) == 1:
        return f"{refused[0].name}: {refused[0].reason}"
    named = "; ".join(f"{r.name}: {r.reason}" for r in refused[:MESSAGE_REFUSALS])
    more = len(refused) - MESSAGE_REFUSALS
    return f"every file was refused ({len(refused)}): {named}" + (
        f"; and {more} more" if more > 0 else ""
    )


@dataclass(frozen=True)
class CheckedUpload:
    """The files (and zip members) of one upload that passed every check (stored by
    `PendingUpload.store`, in memory from `check_uploads`); those left out with their reasons;
    and the job source they name (`upload` or `zip:<archive name>`)."""

    files: Sequence[StoredFile | IncomingFile]
    refused: list[Refusal]
    source: str


class UploadedFile(Protocol):
    """A file part of a form post (a werkzeug `FileStorage`). A zip archive is read from its
    `stream` when it has one (seekable: werkzeug spools large parts to disk), else from itself."""

    filename: str | None

    def read(self, size: int = -1, /) -> bytes: ...


def check_image_bytes(name: str, data: bytes, settings: Settings | None = None) -> None:
    """Header-only check of one file (format, pixel count, size); raises SubmissionRejected."""
    settings = settings or get_settings()
    if len(data) > settings.max_image_bytes:
        raise TooLarge(
            f"{name}: file too large: {len(data)} bytes > limit {settings.max_image_bytes}"
        )
    problem = _image_problem(data, settings)
    if problem is not None:
        raise SubmissionRejected(f"{name}: {problem.reason}")


def _image_problem(data: bytes, settings: Settings, name: str = "") -> Refusal | None:
    """Why `data` is not an acceptable image (size, format, pixel count), or None."""
    if len(data) > settings.max_image_bytes:
        return Refusal(name, f"larger than {settings.max_image_bytes} bytes", too_large=True)
    try:
        open_image(data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)
    except ImageRejected as exc:
        return Refusal(name, exc.reason)
    return None


# --- one upload, file by file -------------------------------------------------------------------


class PendingUpload:
    """An upload whose size is known and of which nothing is read or stored yet: its files, its
    zip's directory (checked), and what was refused so far. `count` is the most images it can
    hold, for checks of the job's options before anything is stored."""

    def __init__(
        self,
        files: Sequence[UploadedFile],
        archive: UploadedFile | None,
        settings: Settings,
    ) -> None:
        self.settings = settings
        self.files = list(files)
        self.source = f"zip:{archive.filename}" if archive is not None else "upload"
        self.archive_refused: Refusal | None = None  # the zip as a whole
        self.zip: zipfile.ZipFile | None = None
        self.entries: list[zipfile.ZipInfo | Refusal] = []  # its members, in archive order
        if archive is not None:
            name = archive.filename or "archive.zip"
            try:
                self.zip = _open_zip(getattr(archive, "stream", archive))
                self.entries = zip_entries(self.zip.infolist(), settings)
            except SubmissionRejected as exc:
                self.close()
                self.archive_refused = Refusal(name, exc.reason, isinstance(exc, TooLarge))
        members = sum(not isinstance(entry, Refusal) for entry in self.entries)
        self.count = len(self.files) + members

    def checked(self) -> Iterator[tuple[str, bytes | Refusal]]:
        """Each file, then each zip member, read within its limits and checked: its name and
        its bytes, or why it is refused. One is read at a time: a caller that lets go of each
        before asking for the next holds one in memory."""
        settings = self.settings
        for upload in self.files:
            # Read no further than one byte past the size limit.
            content = upload.read(settings.max_image_bytes + 1)
            yield _checked(upload.filename or "upload", content, settings)
            del content
        if self.archive_refused is not None:
            yield self.archive_refused.name, self.archive_refused
        if self.zip is not None:
            reader = _MemberReader(self.zip, settings)
            for entry in self.entries:
                if isinstance(entry, Refusal):
                    yield entry.name, entry
                else:
                    yield _checked(entry.filename, reader.read(entry), settings)

    def store(self, store: ObjectStore, *, owner_id: int | None) -> CheckedUpload:
        """Read, check and store each file and zip member in turn, one in memory at a time,
        under `owner_id`'s namespace; UploadRefused when none passes."""
        stored: list[StoredFile] = []
        refused: list[Refusal] = []
        try:
            for name, data in self.checked():
                if isinstance(data, Refusal):
                    refused.append(data)
                else:
                    stored.append(put_file(store, name, data, owner_id=owner_id))
                del data
        finally:
            self.close()
        if not stored:
            raise UploadRefused(refused)
        return CheckedUpload(files=stored, refused=refused, source=self.source)

    def __enter__(self) -> PendingUpload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()  # the archive's stream stays open: its owner closes it
            self.zip = None


def open_upload(
    files: Sequence[UploadedFile], archive: UploadedFile | None, settings: Settings
) -> PendingUpload:
    """The upload of `files` and the zip `archive`, its size counted and nothing stored;
    raises SubmissionRejected for no file at all and for more than `max_submit_items` images.
    The dashboard's API and its form both call this, then check the job's options against
    `count`, then `store` it."""
    if not files and archive is None:
        raise SubmissionRejected("no files uploaded")
    pending = PendingUpload(files, archive, settings)
    if pending.count > settings.max_submit_items:
        pending.close()
        raise SubmissionRejected(f"more than {settings.max_submit_items} images")
    return pending


def check_uploads(
    files: Sequence[UploadedFile], archive: UploadedFile | None, settings: Settings
) -> CheckedUpload:
    """The files of a small upload (one image to try), checked and held in memory, all or
    nothing: UploadRefused lists every refused file. An upload of many images goes through
    `open_upload` and is stored file by file instead."""
    pending = open_upload(files, archive, settings)
    kept: list[IncomingFile] = []
    refused: list[Refusal] = []
    try:
        for name, data in pending.checked():
            if isinstance(data, Refusal):
                refused.append(data)
            else:
                kept.append(IncomingFile(name, data))
    finally:
        pending.close()
    if refused:
        raise UploadRefused(refused)
    return CheckedUpload(files=kept, refused=[], source=pending.source)


def _checked(name: str, data: bytes | Refusal, settings: Settings) -> tuple[str, bytes | Refusal]:
    if isinstance(data, Refusal):
        return name, data
    return name, _image_problem(data, settings, name) or data


# --- zip archives -----------------------------------------------------------------------------


def read_zip(data: bytes | IO[bytes], settings: Settings | None = None) -> list[IncomingFile]:
    """Every image member of a zip archive in memory, all or nothing: raises SubmissionRejected
    for the first refused member. (An upload stores member by member instead: `open_upload`.)"""
    settings = settings or get_settings()
    with _open_zip(data) as archive:
        entries = zip_entries(archive.infolist(), settings)
        reader, files = _MemberReader(archive, settings), []
        for info in entries:
            if isinstance(info, Refusal):
                raise _refused_member(info)
            content = reader.read(info)
            if not isinstance(content, Refusal):
                content = _image_problem(content, settings, info.filename) or content
            if isinstance(content, Refusal):
                raise _refused_member(content)
            files.append(IncomingFile(info.filename, content))
    return files


def _refused_member(refusal: Refusal) -> SubmissionRejected:
    kind = TooLarge if refusal.too_large else SubmissionRejected
    return kind(f"zip member {refusal.name!r} refused: {refusal.reason}")


def _open_zip(data: bytes | IO[bytes]) -> zipfile.ZipFile:
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        return zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SubmissionRejected(f"not a valid zip archive: {exc}") from None


def zip_entries(
    infos: Sequence[zipfile.ZipInfo], settings: Settings
) -> list[zipfile.ZipInfo | Refusal]:
    """The checks the central directory allows before anything is decompressed: in archive
    order, each member to read, or the Refusal of one its header refuses (path, kind, declared
    ratio); directories and platform litter (`__MACOSX/`, dot files) left out. Raises
    SubmissionRejected for the archive as a whole: too many members, too large declared, no
    image member."""
    if len(infos) > settings.zip_max_members:
        raise SubmissionRejected(f"zip has {len(infos)} members > limit {settings.zip_max_members}")
    declared = sum(info.file_size for info in infos)
    if declared > settings.zip_max_total_bytes:
        raise SubmissionRejected(
            f"zip uncompresses to {declared} bytes > limit {settings.zip_max_total_bytes}"
        )
    entries: list[zipfile.ZipInfo | Refusal] = []
    for info in infos:
        # Every member, directories and platform litter too, before either is skipped.
        problem = _member_problem(info) or _ratio_problem(info, settings)
        if problem:
            entries.append(Refusal(info.filename, problem))
        elif not (info.is_dir() or _is_litter(info.filename)):
            entries.append(info)
    if not entries:
        raise SubmissionRejected("zip archive contains no images")
    return entries


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


class _MemberReader:
    """Reads members of one archive within the size budgets, counting the bytes they really
    inflate to: past `zip_max_total_bytes` the rest are refused unread."""

    def __init__(self, archive: zipfile.ZipFile, settings: Settings) -> None:
        self.archive = archive
        self.settings = settings
        self.total = 0

    def read(self, info: zipfile.ZipInfo) -> bytes | Refusal:
        """The member's bytes, or why it is refused."""
        settings = self.settings
        over_total = f"zip uncompresses to more than {settings.zip_max_total_bytes} bytes"
        if self.total > settings.zip_max_total_bytes:
            return Refusal(info.filename, over_total)
        budget = min(
            settings.max_image_bytes,
            settings.zip_max_total_bytes - self.total,
            _ratio_budget(info, settings),
        )
        content = _read_member(self.archive, info, budget + 1)
        if isinstance(content, Refusal):
            return content
        self.total += len(content)
        problem = _ratio_problem(info, settings, size=len(content))
        if problem:
            return Refusal(info.filename, problem)
        if self.total > settings.zip_max_total_bytes:
            return Refusal(info.filename, over_total)
        if len(content) > settings.max_image_bytes:
            reason = f"larger than {settings.max_image_bytes} bytes"
            return Refusal(info.filename, reason, too_large=True)
        return content


# A member is inflated this many bytes at a time (zipfile's one large read copies its buffers
# several times over; the steps keep a member's bytes to about twice its size).
READ_STEP = 64 * 1024


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes | Refusal:
    """At most `budget` bytes of one member: a lying header cannot inflate us."""
    content = bytearray()
    try:
        with archive.open(info) as member:
            while len(content) < budget:
                step = member.read(min(READ_STEP, budget - len(content)))
                if not step:
                    break
                content += step
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as exc:
        return Refusal(info.filename, f"unreadable: {exc}")
    return bytes(content)


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


def put_file(store: ObjectStore, name: str, data: bytes, *, owner_id: int | None) -> StoredFile:
    """Put checked bytes in the object store under `owner_id`'s namespace (once: the key is
    their hash)."""
    digest = hashlib.sha256(data).hexdigest()
    key = upload_key(digest, name, owner_id=owner_id)
    if not store.exists(key):
        store.put(key, data)
    return StoredFile(name=name, key=key, sha256=digest, size=len(data))


def store_files(
    session: Session,
    store: ObjectStore,
    job_id: int,
    files: Sequence[IncomingFile | StoredFile],
    *,
    owner_id: int | None,
) -> list[int]:
    """Queue checked files as images of the job (those still in memory put in the object store
    under `owner_id`'s namespace first); returns ids."""
    specs = []
    for f in files:
        if isinstance(f, IncomingFile):
            f = put_file(store, f.name, f.data, owner_id=owner_id)
        specs.append(
            jobs.ImageSpec(
                storage_key=f.key,
                original_name=f.name.rsplit("/", 1)[-1][:1024],
                content_sha256=f.sha256,
                size_bytes=f.size,
                # The file name (a zip member's path) is the image's external id.
                external_id=f.name if len(f.name) <= 512 else None,
            )
        )
    return jobs.submit_images(session, job_id, specs)
