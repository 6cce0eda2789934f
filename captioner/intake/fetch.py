"""Images behind http(s) URLs: a worker fetches a job's URLs (`run_fetch_urls`, sent by task
name) in chunks, each chunk stored, queued and published in its own transaction, through the
checked and pinned HTTP of `captioner.intake.urls`. A URL that cannot be fetched becomes a failed
image with the reason (naming the URL redacted to scheme, host and path).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sqlalchemy import select

from captioner.intake import submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.uploads import check_image_bytes, owned_key
from captioner.intake.urls import Resolver, fetch_url, redact
from captioner.settings import get_settings
from captioner.state import images, jobs
from captioner.state.models import Image, Job

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from captioner.settings import Settings
    from captioner.storage import ObjectStore

CHUNK_SIZE = 50  # URLs fetched, stored and published per transaction


def fetched_key(sha256: str, url: str, *, owner_id: int | None) -> str:
    """The object key of fetched bytes, under the job owner's namespace `urls/<owner id>/`."""
    return owned_key("urls", owner_id, sha256, urlsplit(url).path)


def url_key(url: str) -> str:
    """The object key recorded for a URL that could not be fetched (nothing is stored there)."""
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
    settings = settings or get_settings()
    owner_id = session.scalar(select(Job.owner_id).where(Job.id == job_id))
    done = set(session.scalars(select(Image.original_name).where(Image.job_id == job_id)))
    queued: list[int] = []
    for url in urls:
        if url in done:
            continue
        done.add(url)
        try:
            data = fetch_url(url, settings, resolver=resolver)
            check_image_bytes(redact(url), data, settings)
        except SubmissionRejected as exc:
            _fail_url(session, job_id, url, exc.reason)
            continue
        spec = _store_fetched(store, url, data, owner_id)
        queued += jobs.submit_images(session, job_id, [spec])
    return queued


def _fail_url(session: Session, job_id: int, url: str, reason: str) -> None:
    """Record a URL that could not be fetched as a failed image of the job."""
    [image_id] = jobs.submit_images(
        session, job_id, [jobs.ImageSpec(storage_key=url_key(url), original_name=url)]
    )
    images.fail_image(session, image_id, reason)


def _store_fetched(
    store: ObjectStore, url: str, data: bytes, owner_id: int | None
) -> jobs.ImageSpec:
    """Store fetched bytes under their content key in the owner's namespace; the image to
    queue for them."""
    digest = hashlib.sha256(data).hexdigest()
    key = fetched_key(digest, url, owner_id=owner_id)
    if not store.exists(key):
        store.put(key, data)
    return jobs.ImageSpec(
        storage_key=key, original_name=url, content_sha256=digest, size_bytes=len(data)
    )


def _fetch_chunk(run: submit.JobRun, urls: list[str]) -> submit.AddImages:
    """The step that fetches one chunk of the job's URLs and queues what arrived."""
    return lambda session: fetch_urls(
        session, run.job_id, urls, store=run.store, settings=run.settings
    )


def run_fetch_urls(
    job_id: int,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore | None = None,
    settings: Settings | None = None,
    publish: submit.Publish | None = None,
    publish_deliveries: submit.PublishDeliveries | None = None,
) -> int:
    """Task body for `captioner.fetch_urls(job_id)`: the URLs are in the job's options. The job
    is finished (if all its images are done) only after the last chunk. Returns how many images
    were published to the workers; a job cancelled meanwhile stops the fetching."""
    run = submit.job_run(
        job_id,
        session_factory=session_factory,
        store=store,
        settings=settings,
        publish=publish,
        publish_deliveries=publish_deliveries,
    )
    urls = list(submit.job_options(run).get("urls", []))
    total = 0
    for start in range(0, len(urls), CHUNK_SIZE):
        chunk = urls[start : start + CHUNK_SIZE]
        added = submit.add_chunk(
            run, _fetch_chunk(run, chunk), last=start + CHUNK_SIZE >= len(urls)
        )
        if not added.accepted:
            return total
        total += added.published
    return total
