"""Getting images in: uploads, zip archives, object keys, S3 prefixes and http(s) URLs.

Everything here runs outside Flask: the dashboard calls the checks and `store_files` while it
handles a request; a background worker calls `enumerate_prefix` and `fetch_urls` (sent by
task name, see `captioner.tasks.send_task`). Functions take a `Session` and leave the commit to the caller,
except the two `run_*` entry points, which own their transactions because they publish
caption batches after each commit. A job they finish (every URL failed, an empty prefix, every
image a known caption) gets its webhook events recorded in the transaction that finishes it
(`record_job_events`), and the deliveries are published after the commit, as the caption
worker does; the dashboard's upload does the same.

Rules enforced here, each with a test:
- zip members: no absolute paths, no `..`, no links or devices, at most `zip_max_members`
  members, at most `zip_max_total_bytes` uncompressed (counted while reading, so a lying
  header does not help) and at most `zip_max_ratio` per member. A rejected archive stores
  nothing.
- URLs: http or https only; the host must resolve only to public addresses (private,
  loopback, link-local, multicast, reserved are refused) unless the operator listed it in
  `url_allow_hosts`; every redirect is checked again; size and time limits apply.
- dedupe: an image whose content hash matches one the active model already captioned reuses
  that caption (copied to the new image) unless the job's options say `recaption`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import posixpath
import socket
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from captioner.intake.decode import ImageRejected, open_image
from captioner.state import images, jobs
from captioner.state.models import Caption, Image, ImageStatus, Job, ModelStatus, ModelVersion
from captioner.storage import InvalidKey, ObjectStore, check_key

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from captioner.settings import Settings

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Rows per transaction when a background task submits a long listing.
PAGE_SIZE = 1000


class SubmissionRejected(ValueError):
    """A submission (or one part of it) that is refused; `reason` is for people."""

    status_code = 422

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TooLarge(SubmissionRejected):
    status_code = 413


class UnsafeURL(SubmissionRejected):
    """A URL whose scheme or address is not allowed."""


# --- files and zips ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IncomingFile:
    name: str
    data: bytes


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from captioner.settings import get_settings

    return get_settings()


def check_image_bytes(name: str, data: bytes, settings: Settings | None = None) -> None:
    """Header-only check of one file (format, pixel count, size); raises SubmissionRejected."""
    settings = _settings(settings)
    if len(data) > settings.max_image_bytes:
        raise TooLarge(
            f"{name}: file too large: {len(data)} bytes > limit {settings.max_image_bytes}"
        )
    try:
        open_image(data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)
    except ImageRejected as exc:
        raise SubmissionRejected(f"{name}: {exc.reason}") from None


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


def read_zip(data: bytes | Any, settings: Settings | None = None) -> list[IncomingFile]:
    """The image members of a zip archive, after checking every member; raises SubmissionRejected.

    Directories and platform litter (`__MACOSX/`, dot files) are skipped; any other member
    must be an acceptable image. Nothing is returned unless the whole archive passes.
    """
    import io

    settings = _settings(settings)
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SubmissionRejected(f"not a valid zip archive: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > settings.zip_max_members:
            raise SubmissionRejected(
                f"zip has {len(infos)} members > limit {settings.zip_max_members}"
            )
        declared = 0
        for info in infos:
            problem = _member_problem(info)
            if problem:
                raise SubmissionRejected(f"zip member {info.filename!r} refused: {problem}")
            declared += info.file_size
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > 1024 * 1024 and ratio > settings.zip_max_ratio:
                raise SubmissionRejected(
                    f"zip member {info.filename!r} refused: compression ratio {ratio:.0f} > "
                    f"limit {settings.zip_max_ratio:g} (zip bomb?)"
                )
        if declared > settings.zip_max_total_bytes:
            raise SubmissionRejected(
                f"zip uncompresses to {declared} bytes > limit {settings.zip_max_total_bytes}"
            )
        files: list[IncomingFile] = []
        total = 0
        for info in infos:
            if info.is_dir() or _is_litter(info.filename):
                continue
            budget = min(settings.max_image_bytes, settings.zip_max_total_bytes - total) + 1
            try:
                with archive.open(info) as member:
                    content = member.read(budget)  # bounded: a lying header cannot inflate us
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
                raise SubmissionRejected(
                    f"zip member {info.filename!r} unreadable: {exc}"
                ) from None
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
        if not files:
            raise SubmissionRejected("zip archive contains no images")
        return files


def _is_litter(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts if p)


def upload_key(sha256: str, name: str) -> str:
    """Content-addressed object key for uploaded bytes (identical files are stored once)."""
    suffix = posixpath.splitext(name.lower())[1]
    suffix = suffix if suffix in IMAGE_SUFFIXES else ""
    return f"uploads/{sha256[:2]}/{sha256}{suffix}"


def store_files(
    session: Session, store: ObjectStore, job_id: int, files: Sequence[IncomingFile]
) -> list[int]:
    """Put checked files in the object store and queue them as images of the job; returns ids."""
    specs = []
    for f in files:
        digest = hashlib.sha256(f.data).hexdigest()
        key = upload_key(digest, f.name)
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


def check_keys(keys: Iterable[str]) -> list[str]:
    """Object keys as given, each checked for safety; raises SubmissionRejected."""
    checked = []
    for key in keys:
        try:
            checked.append(check_key(str(key).strip()))
        except InvalidKey as exc:
            raise SubmissionRejected(str(exc)) from None
    return checked


def prefix_within_store(prefix: str, storage_url: str) -> str:
    """A key prefix relative to the store, from `s3://bucket/p/...` or a bare key prefix."""
    prefix = prefix.strip()
    if prefix.startswith("s3://"):
        if not storage_url.startswith("s3://"):
            raise SubmissionRejected("an s3:// prefix needs S3 object storage configured")
        store_bucket, _, store_prefix = storage_url[5:].partition("/")
        bucket, _, key_prefix = prefix[5:].partition("/")
        store_prefix = store_prefix.strip("/") + "/" if store_prefix.strip("/") else ""
        if bucket != store_bucket or not key_prefix.startswith(store_prefix):
            raise SubmissionRejected(
                f"prefix {prefix!r} is outside the configured storage s3://{store_bucket}/{store_prefix}"
            )
        prefix = key_prefix[len(store_prefix) :]
    if prefix.startswith("/") or ".." in prefix.split("/") or "\\" in prefix or "\x00" in prefix:
        raise SubmissionRejected(f"invalid prefix {prefix!r}")
    return prefix


# --- dedupe -----------------------------------------------------------------------------------


def active_model_version_id(session: Session) -> int | None:
    return session.scalar(select(ModelVersion.id).where(ModelVersion.status == ModelStatus.ACTIVE))


def reuse_known_captions(session: Session, image_ids: Sequence[int]) -> list[int]:
    """Caption queued images whose content the active model already captioned; returns those ids.

    The caption (text, score, n-best) is copied to the new image under the active version, and
    the image is marked captioned, so it is never sent to a worker.
    """
    version_id = active_model_version_id(session)
    if version_id is None or not image_ids:
        return []
    reused: list[int] = []
    for start in range(0, len(image_ids), 500):
        chunk = list(image_ids[start : start + 500])
        wanted = dict(
            session.execute(
                select(Image.id, Image.content_sha256).where(
                    Image.id.in_(chunk),
                    Image.status == ImageStatus.QUEUED,
                    Image.content_sha256.is_not(None),
                )
            ).all()
        )
        if not wanted:
            continue
        known: dict[str, Caption] = {}
        rows = session.execute(
            select(Image.content_sha256, Caption)
            .join(Caption, Caption.image_id == Image.id)
            .where(
                Caption.model_version_id == version_id,
                Image.content_sha256.in_(set(wanted.values())),
                Image.status == ImageStatus.CAPTIONED,
            )
            .order_by(Caption.id)
        )
        for digest, caption in rows:
            known.setdefault(digest, caption)
        for image_id, digest in wanted.items():
            caption = known.get(digest)
            if caption is None or caption.image_id == image_id:
                continue
            images.complete_image(
                session,
                image_id=image_id,
                model_version_id=version_id,
                text=caption.text,
                score=caption.score,
                candidates=list(caption.candidates or []),
            )
            reused.append(image_id)
    return sorted(reused)


def wants_recaption(job: Job) -> bool:
    return bool((job.options or {}).get("recaption"))


def ids_to_publish(session: Session, job: Job, image_ids: Sequence[int]) -> list[int]:
    """After queuing: reuse known captions (unless the job says recaption); the rest to publish."""
    reused = set() if wants_recaption(job) else set(reuse_known_captions(session, image_ids))
    if reused:
        jobs.finish_completed_jobs(session)
    return sorted(set(image_ids) - reused)


# --- URLs -------------------------------------------------------------------------------------


def _allowed_by_operator(host: str, addresses: Sequence[str], allow: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    networks = []
    for entry in allow:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == host:
            return True
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    if not networks or not addresses:
        return False
    return all(any(ipaddress.ip_address(a) in n for n in networks) for a in addresses)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURL(f"cannot resolve host {host!r}: {exc}") from None
    return sorted({info[4][0].split("%", 1)[0] for info in infos})


def check_url(
    url: str,
    *,
    allow_hosts: Sequence[str] = (),
    resolve: bool = True,
    resolver: Resolver | None = None,
) -> str:
    """`url` if it is http(s) to a public address (or an allow-listed host); else UnsafeURL.

    With `resolve=False` only the scheme and a literal IP host are checked (fast, for a
    submit of thousands of URLs); the fetch checks again with DNS before connecting.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeURL(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"refused URL {url!r}: only http and https are allowed")
    host = parts.hostname
    if not host:
        raise UnsafeURL(f"refused URL {url!r}: no host")
    try:
        literal = [str(ipaddress.ip_address(host))]
    except ValueError:
        literal = None
    if literal is None and not resolve:
        if host.lower().rstrip(".") in ("localhost",) or host.lower().endswith(".localhost"):
            if not _allowed_by_operator(host, [], allow_hosts):
                raise UnsafeURL(f"refused URL {url!r}: {host} is a loopback name")
        return url.strip()
    addresses = literal or (resolver or resolve_host)(host, port)
    if _allowed_by_operator(host, addresses, allow_hosts):
        return url.strip()
    bad = [a for a in addresses if not _is_public(a)]
    if bad or not addresses:
        raise UnsafeURL(
            f"refused URL {url!r}: {host} resolves to a private, loopback or link-local "
            f"address ({', '.join(bad) or 'none'})"
        )
    return url.strip()


def fetch_url(
    url: str, settings: Settings | None = None, *, resolver: Resolver | None = None
) -> bytes:
    """GET `url` with every hop checked, a total time limit and a size cap; returns the body.

    Each hop's host is resolved once and the connection goes to one of the checked addresses
    (no DNS-rebinding window); see `captioner.intake.urls`.
    """
    from captioner.intake.urls import fetch_url as fetch_pinned

    return fetch_pinned(url, _settings(settings), resolver=resolver)


def url_key(url: str) -> str:
    return "urls/" + hashlib.sha256(url.encode("utf-8")).hexdigest()


def fetch_urls(
    session: Session,
    job_id: int,
    urls: Sequence[str],
    *,
    store: ObjectStore,
    settings: Settings | None = None,
    resolver: Resolver | None = None,
) -> list[int]:
    """Fetch each URL of a job into the store and queue it; a URL that fails becomes a failed
    image with the reason. Idempotent: URLs already in the job are skipped. Returns queued ids."""
    settings = _settings(settings)
    done = set(session.scalars(select(Image.original_name).where(Image.job_id == job_id)))
    queued: list[int] = []
    for url in urls:
        if url in done:
            continue
        done.add(url)
        try:
            data = fetch_url(url, settings, resolver=resolver)
            check_image_bytes(url, data, settings)
        except SubmissionRejected as exc:
            [image_id] = jobs.submit_images(
                session, job_id, [jobs.ImageSpec(storage_key=url_key(url), original_name=url)]
            )
            images.fail_image(session, image_id, exc.reason)
            continue
        digest = hashlib.sha256(data).hexdigest()
        key = upload_key(digest, urlsplit(url).path)
        if not store.exists(key):
            store.put(key, data)
        queued += jobs.submit_images(
            session,
            job_id,
            [
                jobs.ImageSpec(
                    storage_key=key, original_name=url, content_sha256=digest, size_bytes=len(data)
                )
            ],
        )
    return queued


# --- background entry points (called by worker tasks, by name) --------------------------------


Publish = Callable[[int, list[int]], Any]
PublishDeliveries = Callable[[list[int]], Any]


def _default_publish(settings: Settings) -> Publish:
    from captioner.tasks import publish_caption_batches

    return lambda job_id, ids: publish_caption_batches(job_id, ids, settings=settings)


def _default_publish_deliveries(settings: Settings) -> PublishDeliveries:
    from captioner.tasks import publish_deliveries

    return lambda delivery_ids: publish_deliveries(delivery_ids, settings=settings)


def record_job_events(session: Session, job_id: int, *, finish: bool) -> list[int]:
    """Webhook events for the jobs finished now (`finish`) and for `job_id` if it is finished
    (`ids_to_publish` may have finished it), in the caller's transaction; returns the new
    delivery ids, to publish after the commit. Recording twice is a no-op. Every submission
    path that calls `ids_to_publish` calls this before its commit (the `run_*` entry points
    here, `dashboard.services.submit_files`)."""
    from captioner.webhooks import record_job_events

    finished = jobs.finish_completed_jobs(session) if finish else []
    return record_job_events(session, sorted(set(finished) | {job_id}))


def run_fetch_urls(
    job_id: int,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore | None = None,
    settings: Settings | None = None,
    publish: Publish | None = None,
    publish_deliveries: PublishDeliveries | None = None,
    resolver: Resolver | None = None,
) -> int:
    """Task body for `captioner.fetch_urls(job_id)`: the URLs are in the job's options. The job
    is finished (if all its images are done) only after the last chunk."""
    from captioner.state.db import session_scope
    from captioner.storage import open_store

    settings = _settings(settings)
    store = store or open_store(settings=settings)
    publish = publish or _default_publish(settings)
    publish_deliveries = publish_deliveries or _default_publish_deliveries(settings)
    with session_scope(session_factory) as session:
        job = session.get(Job, job_id)
        urls = list((job.options or {}).get("urls", [])) if job else []
    total = 0
    for start in range(0, len(urls), 50):
        with session_scope(session_factory) as session:
            job = session.get(Job, job_id)
            if not jobs.accepts_images(job):
                return total
            ids = fetch_urls(
                session,
                job_id,
                urls[start : start + 50],
                store=store,
                settings=settings,
                resolver=resolver,
            )
            ids = ids_to_publish(session, job, ids)
            deliveries = record_job_events(session, job_id, finish=start + 50 >= len(urls))
        if ids:
            publish(job_id, ids)
        if deliveries:
            publish_deliveries(deliveries)
        total += len(ids)
    return total


def run_enumerate_prefix(
    job_id: int,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore | None = None,
    settings: Settings | None = None,
    publish: Publish | None = None,
    publish_deliveries: PublishDeliveries | None = None,
) -> int:
    """Task body for `captioner.enumerate_prefix(job_id)`: list the job's prefix page by page,
    committing and publishing each page, so any size of listing streams into the queue."""
    from captioner.state.db import session_scope
    from captioner.storage import open_store

    settings = _settings(settings)
    store = store or open_store(settings=settings)
    publish = publish or _default_publish(settings)
    publish_deliveries = publish_deliveries or _default_publish_deliveries(settings)
    with session_scope(session_factory) as session:
        job = session.get(Job, job_id)
        prefix = (job.options or {}).get("prefix") if job else None
    if prefix is None:
        return 0
    total = 0
    page: list[str] = []

    def flush(keys: list[str]) -> int:
        with session_scope(session_factory) as session:
            job = session.get(Job, job_id)
            if not jobs.accepts_images(job):
                return -1
            ids = jobs.submit_images(session, job_id, keys)
            ids = ids_to_publish(session, job, ids)
            deliveries = record_job_events(session, job_id, finish=False)
        if ids:
            publish(job_id, ids)
        if deliveries:
            publish_deliveries(deliveries)
        return len(keys)

    for key in store.list(prefix):
        if not key.lower().endswith(IMAGE_SUFFIXES):
            continue
        page.append(key)
        if len(page) >= PAGE_SIZE:
            n = flush(page)
            if n < 0:
                return total
            total += n
            page = []
    if page and (n := flush(page)) > 0:
        total += n
    if total == 0:
        with session_scope(session_factory) as session:
            # Nothing matched: finish the job now instead of leaving it queued forever.
            deliveries = []
            if jobs.finish_if_empty(session, job_id):
                deliveries = record_job_events(session, job_id, finish=False)
        if deliveries:
            publish_deliveries(deliveries)
    return total
