"""Images behind http(s) URLs: a worker fetches a job's URLs (`run_fetch_urls`, sent by task
name) in chunks, each chunk stored, queued and published in its own transaction, through the
checked and pinned HTTP of `captioner.intake.urls`. A URL that cannot be fetched becomes a failed
image with the reason (naming the URL redacted to scheme, host and path).

A job's URLs may carry the submitter's external id for each image, and in a caption import the
caption that comes with it (`UrlEntry`): such an image is captioned by the import once its
bytes are stored, and is never sent to a worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import select

from captioner.intake import submit
from captioner.intake.errors import SubmissionRejected
from captioner.intake.uploads import check_image_bytes, owned_key
from captioner.intake.urls import Resolver, check_url, fetch_url, redact
from captioner.settings import get_settings
from captioner.state import images, imports, jobs
from captioner.state.models import Image, Job, ReviewDecision

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from captioner.settings import Settings
    from captioner.storage import ObjectStore

CHUNK_SIZE = 50  # URLs fetched, stored and published per transaction


@dataclass(frozen=True)
class UrlEntry:
    """One URL of a job's options (`options["urls"]`): a plain string, or an object with the
    URL, the submitter's external id and, in an import, the caption that comes with it
    (`{"text", "score", "candidates", "decision", "review_text"}`)."""

    url: str
    external_id: str | None = None
    caption: dict[str, Any] | None = None

    @classmethod
    def from_option(cls, item: str | Mapping[str, Any]) -> UrlEntry:
        if isinstance(item, str):
            return cls(item)
        return cls(item["url"], item.get("external_id"), item.get("caption"))

    def as_option(self) -> str | dict[str, Any]:
        """The entry as the job's options keep it: a plain URL stays a string."""
        if self.external_id is None and self.caption is None:
            return self.url
        entry: dict[str, Any] = {"url": self.url}
        if self.external_id is not None:
            entry["external_id"] = self.external_id
        if self.caption is not None:
            entry["caption"] = self.caption
        return entry


def check_url_items(
    items: Iterable[str | Mapping[str, Any]], *, allow_hosts: Sequence[str]
) -> list[str | dict[str, Any]]:
    """URLs as given, each a string or `{"url": ..., "external_id": ...}`, checked for a
    submission (`check_url` without DNS: the fetch checks again before connecting; every
    external id as `submit.check_external_id`), as the job's options keep them. Blank URLs are
    left out; raises SubmissionRejected."""
    entries: list[str | dict[str, Any]] = []
    for item in items:
        external_id = None
        if isinstance(item, Mapping):
            external_id = submit.check_external_id(item.get("external_id"))
            item = item.get("url")
        if not isinstance(item, str):
            raise SubmissionRejected("each URL is a string or an object with a string `url`")
        if not item.strip():
            continue
        url = check_url(item, allow_hosts=allow_hosts, resolve=False)
        entries.append(UrlEntry(url, external_id).as_option())
    return entries


def fetched_key(sha256: str, url: str, *, owner_id: int | None) -> str:
    """The object key of fetched bytes, under the job owner's namespace `urls/<owner id>/`."""
    return owned_key("urls", owner_id, sha256, urlsplit(url).path)


def url_key(url: str) -> str:
    """The object key recorded for a URL that could not be fetched (nothing is stored there)."""
    return "urls/" + hashlib.sha256(url.encode("utf-8")).hexdigest()


def fetch_urls(
    session: Session,
    job_id: int,
    urls: Sequence[str | Mapping[str, Any]],
    *,
    store: ObjectStore,
    settings: Settings | None = None,
    resolver: Resolver | None = None,
) -> list[int]:
    """Fetch each URL of a job (entries as `UrlEntry.from_option` reads them) into the store and
    queue it; a URL that fails becomes a failed image with the reason. An entry that carries an
    imported caption is captioned with it at once (`imports.import_captioned`, reviewed by the
    job's owner) instead of being queued for a worker. Idempotent: URLs already in the job are
    skipped. Returns the ids queued for a worker."""
    settings = settings or get_settings()
    owner_id = session.scalar(select(Job.owner_id).where(Job.id == job_id))
    done = set(session.scalars(select(Image.original_name).where(Image.job_id == job_id)))
    queued: list[int] = []
    for entry in map(UrlEntry.from_option, urls):
        if entry.url in done:
            continue
        done.add(entry.url)
        try:
            data = fetch_url(entry.url, settings, resolver=resolver)
            check_image_bytes(redact(entry.url), data, settings)
        except SubmissionRejected as exc:
            _fail_url(session, job_id, entry, exc.reason)
            continue
        spec = _store_fetched(store, entry, data, owner_id)
        [image_id] = jobs.submit_images(session, job_id, [spec])
        if entry.caption is None:
            queued.append(image_id)
        else:
            imports.import_captioned(
                session, [imported_caption(image_id, entry.caption)], reviewer_id=owner_id
            )
    return queued


def imported_caption(image_id: int, caption: Mapping[str, Any]) -> imports.ImportedCaption:
    """The imported caption a URL entry carries, for the image its bytes became."""
    decision = caption.get("decision")
    return imports.ImportedCaption(
        image_id=image_id,
        text=caption["text"],
        score=float(caption["score"]),
        candidates=list(caption.get("candidates") or []),
        decision=ReviewDecision(decision) if decision else None,
        review_text=caption.get("review_text"),
    )


def _fail_url(session: Session, job_id: int, entry: UrlEntry, reason: str) -> None:
    """Record a URL that could not be fetched as a failed image of the job."""
    spec = jobs.ImageSpec(
        storage_key=url_key(entry.url), original_name=entry.url, external_id=entry.external_id
    )
    [image_id] = jobs.submit_images(session, job_id, [spec])
    images.fail_image(session, image_id, reason)


def _store_fetched(
    store: ObjectStore, entry: UrlEntry, data: bytes, owner_id: int | None
) -> jobs.ImageSpec:
    """Store fetched bytes under their content key in the owner's namespace; the image to
    queue for them."""
    digest = hashlib.sha256(data).hexdigest()
    key = fetched_key(digest, entry.url, owner_id=owner_id)
    if not store.exists(key):
        store.put(key, data)
    return jobs.ImageSpec(
        storage_key=key,
        original_name=entry.url,
        content_sha256=digest,
        size_bytes=len(data),
        external_id=entry.external_id,
    )


def _fetch_chunk(run: submit.JobRun, urls: list[str | dict[str, Any]]) -> submit.AddImages:
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
