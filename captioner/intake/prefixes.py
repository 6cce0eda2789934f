"""Images already in object storage: lists of keys, and prefixes listed in the background.

The dashboard checks keys (`check_keys`) and a prefix (`prefix_within_store`) while it handles
the request, and that the user may read them (`check_readable`): a submitter only within the
source locations an admin grants (`Settings.source_prefixes` for everyone, `User.source_prefixes`
per user), an admin anywhere; nobody in the namespaces the system writes (`SYSTEM_PREFIXES`:
every user's uploads, fetched URLs, model checkpoints, exports, previews). The prefix is then listed by a
worker (`run_enumerate_prefix`, sent by task name), page by page, each page queued and published
in its own transaction while a forked child process lists the next ones (`listed_in_child`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn

from captioner.intake import submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.uploads import IMAGE_SUFFIXES
from captioner.state import jobs
from captioner.state.models import User, UserRole
from captioner.storage import (
    SYSTEM_PREFIXES,
    InvalidKey,
    StorageError,
    check_key,
    check_prefix,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from captioner.settings import Settings
    from captioner.storage import ObjectStore

# Rows per transaction when a background task submits a long listing.
PAGE_SIZE = 1000


def check_keys(keys: Iterable[str]) -> list[str]:
    """Object keys as given, each checked for safety and for what the database stores (at most
    `KEY_MAX_LENGTH` characters); raises SubmissionRejected."""
    checked = []
    for key in keys:
        try:
            checked.append(check_key(str(key).strip()))
        except InvalidKey as exc:
            raise SubmissionRejected(str(exc)) from None
    return checked


def key_specs(items: Iterable[str | Mapping[str, Any]]) -> list[jobs.ImageSpec]:
    """Keys as given, each a string or `{"key": ..., "external_id": ...}`, as images to queue:
    every key checked as `check_keys` does and every external id as
    `submit.check_external_id`; raises SubmissionRejected. A plain key has no external id."""
    specs = []
    for item in items:
        external_id = None
        if isinstance(item, Mapping):
            external_id = submit.check_external_id(item.get("external_id"))
            item = item.get("key")
        if not isinstance(item, str):
            raise SubmissionRejected("each key is a string or an object with a string `key`")
        [key] = check_keys([item])
        specs.append(jobs.ImageSpec(storage_key=key, external_id=external_id))
    return specs


class SourceRefused(SubmissionRejected):
    """A key or prefix the user may not read (403)."""

    status_code = 403


def readable_locations(user: User, settings: Settings) -> list[str]:
    """The key prefixes `user` may submit keys and prefixes within: everything (`""`) for an
    admin, else the locations shared with every submitter and the user's own grants."""
    if user.role == UserRole.ADMIN:
        return [""]
    return list(settings.source_prefixes) + list(user.source_prefixes or [])


def _system_namespace(location: str, *, is_prefix: bool) -> str | None:
    """The system namespace `location` reaches into: a key or prefix under it, or a prefix whose
    listing would cover it (`""`, `mod`)."""
    for namespace in SYSTEM_PREFIXES:
        if location.startswith(namespace) or (is_prefix and namespace.startswith(location)):
            return namespace
    return None


def check_readable(location: str, locations: Sequence[str], *, is_prefix: bool) -> None:
    """Raise SourceRefused unless every key under `location` (a key, or a prefix) is outside
    the system's namespaces and within one of `locations` (see `readable_locations`)."""
    what = f"{'prefix' if is_prefix else 'key'} {location!r}"
    namespace = _system_namespace(location, is_prefix=is_prefix)
    if namespace is not None:
        raise SourceRefused(
            f"{what} refused: {namespace} is written by the system (uploads, fetched URLs, "
            "model checkpoints, exports, previews) and is never read by key or prefix, not even by admins"
        )
    if not any(location.startswith(allowed) for allowed in locations):
        granted = ", ".join(repr(p) for p in locations) or "none"
        raise SourceRefused(
            f"{what} is outside your source locations ({granted}): keys and prefixes must lie "
            "under a location an admin grants (CAPTIONER_SOURCE_PREFIXES for every submitter, "
            "or the user's source_prefixes)"
        )


def check_grants(prefixes: Iterable[str]) -> list[str]:
    """Source locations an admin grants, each a valid prefix (`check_prefix`) outside the
    system's namespaces (`""` is the whole store but them); raises SubmissionRejected."""
    checked = []
    for prefix in prefixes:
        try:
            prefix = check_prefix(str(prefix).strip())
        except InvalidKey as exc:
            raise SubmissionRejected(str(exc)) from None
        namespace = _system_namespace(prefix, is_prefix=False)
        if namespace is not None:
            raise SubmissionRejected(
                f"source location {prefix!r} refused: {namespace} is written by the system "
                "and never granted"
            )
        checked.append(prefix)
    return checked


def prefix_within_store(prefix: str, storage_url: str) -> str:
    """A key prefix relative to the store, from `s3://bucket/p/...` or a bare key prefix; refused
    (SubmissionRejected) unless every key under it could be listed and stored (`check_prefix`:
    no `./x`, `a//b`, `../x`, `x/./y`, nothing longer than a key)."""
    prefix = prefix.strip()
    if prefix.startswith("s3://"):
        prefix = _s3_prefix_within_store(prefix, storage_url)
    try:
        return check_prefix(prefix)
    except InvalidKey as exc:
        raise SubmissionRejected(str(exc)) from None


def _s3_prefix_within_store(prefix: str, storage_url: str) -> str:
    """The part of `s3://bucket/p/...` below the configured S3 storage URL."""
    if not storage_url.startswith("s3://"):
        raise SubmissionRejected("an s3:// prefix needs S3 object storage configured")
    store_bucket, _, store_prefix = storage_url[5:].partition("/")
    bucket, _, key_prefix = prefix[5:].partition("/")
    store_prefix = store_prefix.strip("/") + "/" if store_prefix.strip("/") else ""
    if bucket != store_bucket or not key_prefix.startswith(store_prefix):
        raise SubmissionRejected(
            f"prefix {prefix!r} is outside the configured storage s3://{store_bucket}/{store_prefix}"
        )
    return key_prefix[len(store_prefix) :]


def image_pages(store: ObjectStore, prefix: str, size: int) -> Iterator[list[str]]:
    """The image keys under `prefix` (by suffix), in pages of at most `size` keys."""
    page: list[str] = []
    for key in store.list(prefix):
        if not key.lower().endswith(IMAGE_SUFFIXES):
            continue
        page.append(key)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def read_ahead(pages: Iterator[list[str]]) -> Iterator[list[str]]:
    """`pages`, with the next one listed by a thread while the caller registers this one: a
    listing (one store round trip per page) and its registration (one database transaction)
    overlap instead of adding up. The pages are still drawn one at a time, in order."""
    with ThreadPoolExecutor(1, thread_name_prefix="list-ahead") as pool:
        ahead = pool.submit(next, pages, None)
        while (page := ahead.result()) is not None:
            ahead = pool.submit(next, pages, None)
            yield page


def listed_in_child(store: ObjectStore, prefix: str, size: int) -> Iterator[list[str]]:
    """`image_pages(store, prefix, size)`, listed by a forked child process that sends the
    pages down a pipe while the caller registers them: the listing (parsing each page's XML
    costs the client more than registering its keys) runs on another core, and no longer
    contends with the registration for the interpreter lock, as `read_ahead`'s thread does.
    The pipe holds a few pages, so the child lists at most that far ahead. An error in the
    child is raised here; closing the generator early (a cancelled job, a time limit) ends the
    child. Where a process cannot be forked, or the store has no copy a child may use
    (`ObjectStore.for_child_process`), `read_ahead` lists in a thread instead."""
    own = store.for_child_process()
    pid = -1
    if own is not None and hasattr(os, "fork"):
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:  # no process to be had: list here
            os.close(read_end)
            os.close(write_end)
    if pid < 0:
        yield from read_ahead(image_pages(store, prefix, size))
        return
    if pid == 0:  # the child: never returns
        _list_into(read_end, write_end, own, prefix, size)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            while True:
                try:
                    kind, value = pickle.load(pipe)
                except EOFError:
                    raise StorageError(
                        f"listing {prefix!r}: the listing process ended before the listing did"
                    ) from None
                if kind == "page":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
    finally:
        # Done, failed or closed early: the child is ended (it may still be listing) and reaped.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _list_into(
    read_end: int, write_end: int, store: ObjectStore, prefix: str, size: int
) -> NoReturn:
    """The listing child: the pages, then ("end", None) or ("error", exception), pickled down
    the pipe's `write_end`. It exits without unwinding into the parent's code or running its
    cleanup (the database connections and sockets it inherited are the parent's); a parent
    gone (killed at its hard time limit) ends it at its next write."""
    code = 1
    try:
        os.close(read_end)
        # What the parent holds is never collected here: freeing one of its database
        # connections would close the connection for the parent too.
        gc.freeze()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
        with os.fdopen(write_end, "wb") as pipe:
            message: tuple[str, Any] = ("end", None)
            try:
                for page in image_pages(store, prefix, size):
                    pickle.dump(("page", page), pipe, pickle.HIGHEST_PROTOCOL)
                    pipe.flush()
            except Exception as exc:  # handed to the parent, which raises it
                message = ("error", _picklable(exc))
            pickle.dump(message, pipe, pickle.HIGHEST_PROTOCOL)
        code = 0
    finally:
        os._exit(code)


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a StorageError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return StorageError(f"{type(exc).__name__}: {exc}")
    return exc


def listed_spec(key: str) -> jobs.ImageSpec:
    """A listed key as an image to queue: its external id is the key (none for a key longer
    than an external id may be)."""
    fits = len(key) <= submit.EXTERNAL_ID_MAX_LENGTH
    return jobs.ImageSpec(storage_key=key, external_id=key if fits else None)


def _queue_keys(job_id: int, keys: list[str]) -> submit.AddImages:
    """The step that queues one page of listed keys as images of the job."""
    return lambda session: jobs.submit_images(session, job_id, [listed_spec(k) for k in keys])


def run_enumerate_prefix(
    job_id: int,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore | None = None,
    settings: Settings | None = None,
    publish: submit.Publish | None = None,
    publish_deliveries: submit.PublishDeliveries | None = None,
) -> int:
    """Task body for `captioner.enumerate_prefix(job_id)`: list the job's prefix page by page,
    committing and publishing each page, so any size of listing streams into the queue.
    Returns how many images were added; a job cancelled meanwhile stops the listing."""
    run = submit.job_run(
        job_id,
        session_factory=session_factory,
        store=store,
        settings=settings,
        publish=publish,
        publish_deliveries=publish_deliveries,
    )
    prefix = submit.job_options(run).get("prefix")
    if prefix is None:
        return 0
    total = 0
    for page in listed_in_child(run.store, prefix, PAGE_SIZE):
        added = submit.add_chunk(run, _queue_keys(job_id, page), last=False)
        if not added.accepted:
            return total
        total += added.queued
    if total == 0:
        # Nothing matched: finish the job now instead of leaving it queued forever.
        submit.finish_empty_job(run)
    return total
