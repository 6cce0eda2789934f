"""Images already in object storage: lists of keys, and prefixes listed in the background.

The dashboard checks keys (`check_keys`) and a prefix (`prefix_within_store`) while it handles
the request; the prefix is then listed by a worker (`run_enumerate_prefix`, sent by task name),
page by page, each page queued and published in its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from captioner.intake import submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.uploads import IMAGE_SUFFIXES
from captioner.state import jobs
from captioner.storage import InvalidKey, check_key, check_prefix

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


def _queue_keys(job_id: int, keys: list[str]) -> submit.AddImages:
    """The step that queues one page of listed keys as images of the job."""
    return lambda session: jobs.submit_images(session, job_id, keys)


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
    for page in image_pages(run.store, prefix, PAGE_SIZE):
        added = submit.add_chunk(run, _queue_keys(job_id, page), last=False)
        if not added.accepted:
            return total
        total += added.queued
    if total == 0:
        # Nothing matched: finish the job now instead of leaving it queued forever.
        submit.finish_empty_job(run)
    return total
