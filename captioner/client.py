"""`captioner.client`: the dashboard API (`/api/v1`) from Python.

    from captioner.client import CaptionerClient, SubmitOptions

    with CaptionerClient("http://127.0.0.1:5000", token) as client:
        job = client.submit_folder("photos", SubmitOptions(name="photos"))
        job = client.wait(job.id, progress=lambda j: print(j.progress.percent))
        client.export("jsonl", job_id=job.id, to="captions.jsonl")

Every failure is a `CaptionerError`: `ServerUnreachable` (no answer), `AuthError` (401, 403),
`NotFound` (404), `Refused` (400, 413, 422: the API's message and its reasons per field), or
the base class for any other status (409 conflict, 429, 5xx). `str()` of each is one line a
person can read. What comes back is a frozen dataclass with the fields the API returns.
"""

from __future__ import annotations

import io
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import requests

from captioner.intake.uploads import IMAGE_SUFFIXES
from captioner.state.models import ExportStatus, ImageStatus, JobStatus, ReviewDecision

__all__ = [
    "AuthError",
    "CaptionerClient",
    "CaptionerError",
    "Export",
    "ExportFailed",
    "Candidate",
    "Caption",
    "Image",
    "Job",
    "NotFound",
    "Progress",
    "Refused",
    "Review",
    "ServerUnreachable",
    "SubmitOptions",
    "WaitTimeout",
    "zip_folder",
]

ENDED = frozenset({JobStatus.FINISHED, JobStatus.CANCELLED})

# --- errors --------------------------------------------------------------------------------


class CaptionerError(Exception):
    """Any failure of a call; `status` is the HTTP status (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.status else self.message


class ServerUnreachable(CaptionerError):
    """No answer: the server is down, the address is wrong, or it did not answer in time."""


class AuthError(CaptionerError):
    """401 (missing, invalid or revoked token) or 403 (the role does not allow it)."""


class NotFound(CaptionerError):
    """404: no such job or image, or not one the token's user may see."""


class Refused(CaptionerError):
    """400, 413 or 422: the input was refused. `reasons` maps each field (a dotted path for a
    nested one, `_schema` for the input as a whole) to the server's messages about it."""

    def __init__(
        self, message: str, status: int, reasons: dict[str, list[str]] | None = None
    ) -> None:
        super().__init__(message, status)
        self.reasons = reasons or {}

    def __str__(self) -> str:
        lines = [f"{k}: {m}" if k else m for k, msgs in self.reasons.items() for m in msgs]
        return super().__str__() + (f": {'; '.join(lines)}" if lines else "")


class WaitTimeout(CaptionerError, TimeoutError):
    """`wait` gave up before the job ended; `job` is the last state seen."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


# Where the API read a refused input (the first level of a validation error's detail).
_LOCATIONS = {"json", "query", "form", "files", "form_and_files", "headers", "cookies", "path"}


def _reasons(detail: Any, where: str = "") -> dict[str, list[str]]:
    """A validation error's detail, nested by location and field, as {field path: messages};
    a refused row of an import (`{"where": "line 3", "message": ...}`) as {where: [message]}."""
    if isinstance(detail, dict) and isinstance(detail.get("where"), str) and "message" in detail:
        return {detail["where"]: [str(detail["message"])]}
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = key if where or key not in _LOCATIONS else ""
            path = f"{where}.{inner}".strip(".") if inner else where
            for name, messages in _reasons(value, path).items():
                out.setdefault(name, []).extend(messages)
    elif isinstance(detail, list | tuple):
        for item in detail:
            for name, messages in _reasons(item, where).items():
                out.setdefault(name, []).extend(messages)
    elif str(detail).strip():
        out[where] = [str(detail).strip()]
    return out


def error_for(response: requests.Response) -> CaptionerError:
    """The error an error response means, with the API's `message` and `detail`."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or response.reason or "error")
        detail = body.get("detail") or {}
        if isinstance(detail, dict):  # an upload's refused files: `message` names them already
            detail = {k: v for k, v in detail.items() if k != "refused"}
        reasons = _reasons(detail)
    else:
        message = " ".join((response.text or response.reason or "").split())[:300]
        reasons = {}
    if status in (400, 413, 422):
        return Refused(message, status, reasons)
    kind = {401: AuthError, 403: AuthError, 404: NotFound}.get(status, CaptionerError)
    return kind(message, status)


# --- what comes back -----------------------------------------------------------------------


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class Progress:
    queued: int
    running: int
    captioned: int
    failed: int
    total: int
    done: int
    percent: float

    @classmethod
    def from_api(cls, data: dict) -> Progress:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Candidate:
    text: str
    score: float | None  # mean token log-probability
    confidence: float | None = None  # in [0, 1]; None for imported or older captions


@dataclass(frozen=True)
class Caption:
    id: int
    text: str
    score: float
    candidates: tuple[Candidate, ...]
    model_version_id: int | None  # None for an imported caption
    source: str = "model"  # "model", or "import" (a caption import)

    @classmethod
    def from_api(cls, data: dict) -> Caption:
        return cls(
            id=data["id"],
            text=data["text"],
            score=data["score"],
            candidates=tuple(
                Candidate(c["text"], c.get("score"), c.get("confidence"))
                for c in data["candidates"]
            ),
            model_version_id=data.get("model_version_id"),
            source=data.get("source") or "model",
        )


@dataclass(frozen=True)
class Review:
    id: int
    image_id: int
    decision: ReviewDecision
    text: str | None
    caption_id: int | None
    reviewer: str | None
    created_at: datetime
    undoes_id: int | None

    @classmethod
    def from_api(cls, data: dict) -> Review:
        return cls(
            id=data["id"],
            image_id=data["image_id"],
            decision=ReviewDecision(data["decision"]),
            text=data.get("text"),
            caption_id=data.get("caption_id"),
            reviewer=data.get("reviewer"),
            created_at=datetime.fromisoformat(data["created_at"]),
            undoes_id=data.get("undoes_id"),
        )


@dataclass(frozen=True)
class Image:
    id: int
    job_id: int
    original_name: str
    status: ImageStatus
    failure_reason: str | None
    width: int | None
    height: int | None
    content_url: str
    caption: Caption | None
    review: Review | None
    external_id: str | None = None  # the submitter's id, given at submission or import

    @classmethod
    def from_api(cls, data: dict) -> Image:
        caption, review = data.get("caption"), data.get("review")
        return cls(
            id=data["id"],
            job_id=data["job_id"],
            original_name=data["original_name"],
            status=ImageStatus(data["status"]),
            failure_reason=data.get("failure_reason"),
            width=data.get("width"),
            height=data.get("height"),
            content_url=data["content_url"],
            caption=Caption.from_api(caption) if caption else None,
            review=Review.from_api(review) if review else None,
            external_id=data.get("external_id"),
        )


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    source: str
    status: JobStatus
    priority: int
    options: dict[str, Any]
    owner: str | None
    image_count: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    failures: tuple[Image, ...] = ()  # `job(id)` only: its first failed images
    # An upload only: the files and zip members left out, each `{"name", "reason"}`.
    refused: tuple[dict[str, str], ...] = ()

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @classmethod
    def from_api(cls, data: dict) -> Job:
        return cls(
            id=data["id"],
            name=data["name"],
            source=data["source"],
            status=JobStatus(data["status"]),
            priority=data["priority"],
            options=dict(data.get("options") or {}),
            owner=data.get("owner"),
            image_count=data["image_count"],
            created_at=datetime.fromisoformat(data["created_at"]),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            progress=Progress.from_api(data["progress"]),
            failures=tuple(Image.from_api(i) for i in data.get("failures") or ()),
            refused=tuple(data.get("refused") or ()),
        )


@dataclass(frozen=True)
class SubmitOptions:
    """How a submission is captioned. `name` None: the server's default. `priority` above 0
    needs the admin role; `interactive` is for small submissions a person waits for."""

    name: str | None = None
    priority: int = 0
    num_beams: int = 3
    n_best: int = 3
    recaption: bool = False
    interactive: bool = False

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def as_form(self) -> dict[str, str]:
        return {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self.as_json().items()
        }


def zip_folder(folder: str | Path) -> bytes:
    """A stored (uncompressed) zip of the images under `folder`, paths relative to it; symlinks
    and files that are not images by their suffix are left out."""
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.suffix.lower() in IMAGE_SUFFIXES:
                archive.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


@dataclass(frozen=True)
class Export:
    """A background export (`create_export`): its progress, then where to download it."""

    id: int
    job_id: int | None
    format: str
    which: str
    status: ExportStatus
    rows_done: int
    rows_total: int
    progress: float  # percent of rows_total
    size_bytes: int | None
    file_name: str
    content_type: str
    download_url: str | None  # set once done
    error: str | None  # why it failed
    missing_images: int  # left out of an image archive: not in the object store
    shards: int | None  # WebDataset shards in the tar
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def ended(self) -> bool:
        return self.status in (ExportStatus.DONE, ExportStatus.FAILED)

    @classmethod
    def from_api(cls, data: dict) -> Export:
        return cls(
            id=data["id"],
            job_id=data.get("job_id"),
            format=data["format"],
            which=data["which"],
            status=ExportStatus(data["status"]),
            rows_done=data["rows_done"],
            rows_total=data["rows_total"],
            progress=data["progress"],
            size_bytes=data.get("size_bytes"),
            file_name=data["file_name"],
            content_type=data["content_type"],
            download_url=data.get("download_url"),
            error=data.get("error"),
            missing_images=data.get("missing_images") or 0,
            shards=data.get("shards"),
            created_at=datetime.fromisoformat(data["created_at"]),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
        )


class ExportFailed(CaptionerError):
    """`wait_export`: the export ended failed; `export` is its last state, `message` its error."""

    def __init__(self, export: Export) -> None:
        super().__init__(f"export {export.id} failed: {export.error or 'no reason given'}")
        self.export = export


# --- the client ----------------------------------------------------------------------------


class CaptionerClient:
    """The dashboard API over HTTP with one API token. `timeout` (seconds) bounds each request;
    `session` is a `requests.Session` to reuse (its adapters, proxies, certificates)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = session if session is not None else requests.Session()
        self._owns_session = session is None
        self._auth = {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        if self._owns_session:
            self.http.close()

    def __enter__(self) -> CaptionerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One call to `/api/v1{path}`; an error status or no answer raises `CaptionerError`.
        For endpoints without a method here (tokens, users, webhooks)."""
        headers = self._auth | kwargs.pop("headers", {})
        try:
            response = self.http.request(
                method,
                f"{self.base_url}/api/v1{path}",
                headers=headers,
                timeout=kwargs.pop("timeout", self.timeout),
                **kwargs,
            )
        except requests.ConnectionError:
            raise ServerUnreachable(f"cannot reach the server at {self.base_url}") from None
        except requests.Timeout:
            raise ServerUnreachable(f"the server at {self.base_url} did not answer") from None
        except requests.RequestException as exc:
            raise CaptionerError(f"request to {self.base_url} failed: {exc}") from None
        if response.status_code >= 400:
            error = error_for(response)
            response.close()
            raise error
        return response

    # --- submit ----------------------------------------------------------------------------

    def submit_files(
        self, paths: Iterable[str | Path], options: SubmitOptions | None = None
    ) -> Job:
        """Upload image files (every one is checked before anything is stored)."""
        files = [
            ("files", (Path(p).name, Path(p).read_bytes(), "application/octet-stream"))
            for p in paths
        ]
        return self._upload(files, options)

    def submit_folder(self, folder: str | Path, options: SubmitOptions | None = None) -> Job:
        """Upload the images under `folder` (subfolders too) as one zip."""
        folder = Path(folder)
        archive = ("archive", (folder.name + ".zip", zip_folder(folder), "application/zip"))
        return self._upload([archive], options)

    def submit_zip(self, path: str | Path, options: SubmitOptions | None = None) -> Job:
        """Upload a zip archive of images."""
        path = Path(path)
        archive = ("archive", (path.name, path.read_bytes(), "application/zip"))
        return self._upload([archive], options)

    def submit_keys(
        self, keys: Iterable[str | dict[str, str]], options: SubmitOptions | None = None
    ) -> Job:
        """Submit object keys already in the store: each a key, or `{"key": ..., "external_id":
        ...}` with your own id for the image (kept with it and exported)."""
        return self._create({"keys": list(keys)}, options)

    def submit_prefix(self, prefix: str, options: SubmitOptions | None = None) -> Job:
        """Submit every image under a store prefix (`s3://bucket/p/` or a bare key prefix);
        the server lists it in the background."""
        return self._create({"prefix": prefix}, options)

    def submit_urls(
        self, urls: Iterable[str | dict[str, str]], options: SubmitOptions | None = None
    ) -> Job:
        """Submit http(s) URLs, each a URL or `{"url": ..., "external_id": ...}`; the server
        fetches them in the background."""
        return self._create({"urls": list(urls)}, options)

    def _upload(self, files: list, options: SubmitOptions | None) -> Job:
        form = (options or SubmitOptions()).as_form()
        return Job.from_api(self.request("POST", "/jobs/upload", data=form, files=files).json())

    def _create(self, source: dict[str, Any], options: SubmitOptions | None) -> Job:
        body = (options or SubmitOptions()).as_json() | source
        return Job.from_api(self.request("POST", "/jobs", json=body).json())

    # --- jobs and images -------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        """A job with its live progress and its first failed images (`failures`)."""
        return Job.from_api(self.request("GET", f"/jobs/{job_id}").json())

    def jobs(self, *, page_size: int = 50) -> Iterator[Job]:
        """Every job the token's user can see, newest first."""
        offset = 0
        while True:
            page = self.request(
                "GET", "/jobs", params={"limit": page_size, "offset": offset}
            ).json()
            yield from (Job.from_api(item) for item in page["items"])
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return

    def wait(
        self,
        job_id: int,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll the job every `poll` seconds until it is finished or cancelled and return it;
        `progress` is called with each state read. After `timeout` seconds: `WaitTimeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if progress is not None:
                progress(job)
            if job.ended:
                return job
            if deadline is not None and time.monotonic() + poll > deadline:
                raise WaitTimeout(f"job {job_id} still {job.status} after {timeout} s", job)
            time.sleep(poll)

    def image(self, image_id: int) -> Image:
        return Image.from_api(self.request("GET", f"/images/{image_id}").json())

    def images(
        self, job_id: int, *, status: ImageStatus | None = None, page_size: int = 100
    ) -> Iterator[Image]:
        """A job's images by id, page after page (each page starts after the last id seen)."""
        params: dict[str, Any] = {"limit": page_size}
        if status is not None:
            params["status"] = ImageStatus(status).value
        while True:
            page = self.request("GET", f"/jobs/{job_id}/images", params=params).json()
            yield from (Image.from_api(item) for item in page["items"])
            if page.get("next_after") is None:
                return
            params["after"] = page["next_after"]

    # --- review ----------------------------------------------------------------------------

    def review_queue(
        self,
        *,
        job_id: int | None = None,
        status: str = "unreviewed",
        min_score: float | None = None,
        max_score: float | None = None,
        text: str | None = None,
        page_size: int = 50,
    ) -> Iterator[Image]:
        """Captioned images to review, least confident first, page after page. `status`:
        unreviewed, reviewed, approved, corrected, rejected or any; `text` searches captions."""
        given = {"job_id": job_id, "min_score": min_score, "max_score": max_score, "q": text}
        params = {k: v for k, v in given.items() if v is not None}
        params |= {"status": status, "limit": page_size}
        while True:
            page = self.request("GET", "/review/queue", params=params).json()
            yield from (Image.from_api(item) for item in page["items"])
            if not page.get("next_cursor"):
                return
            params["after"] = page["next_cursor"]

    def review(
        self,
        image_id: int,
        decision: ReviewDecision | str,
        text: str | None = None,
        *,
        caption_id: int | None = None,
    ) -> Review:
        """Approve, correct (with `text`) or reject an image's caption (the reviewer role)."""
        body: dict[str, Any] = {"decision": ReviewDecision(decision).value}
        if text is not None:
            body["text"] = text
        if caption_id is not None:
            body["caption_id"] = caption_id
        return Review.from_api(
            self.request("POST", f"/images/{image_id}/reviews", json=body).json()
        )

    def undo(self, image_id: int) -> Review:
        """Take back the image's current review (a restoring review row is appended)."""
        return Review.from_api(self.request("POST", f"/images/{image_id}/reviews/undo").json())

    def reviews(self, image_id: int) -> list[Review]:
        """Every review of the image, oldest first."""
        items = self.request("GET", f"/images/{image_id}/reviews").json()["items"]
        return [Review.from_api(item) for item in items]

    # --- import ----------------------------------------------------------------------------

    def import_captions(
        self,
        path_or_rows: str | Path | Iterable[dict[str, Any]] | dict[str, Any],
        format: str | None = None,
        *,
        name: str | None = None,
        key_prefix: str = "",
    ) -> Job:
        """Import captions as a job whose images are already captioned: a file (JSONL, CSV or
        COCO captions JSON; `format` defaults to what its suffix says), a list of rows
        (`{"key" or "url", "caption", "score", "external_id", "review"}`) or a COCO document
        (a dict with `images` and `annotations`). One bad row refuses the whole import:
        `Refused`, its reasons naming each bad row's line."""
        options = {"name": name, "key_prefix": key_prefix or None}
        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(path_or_rows, str | Path):
            path = Path(path_or_rows)
            form = options | ({"format": format} if format else {})
            upload = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
            response = self.request("POST", "/imports", data=form, files=upload)
        elif isinstance(path_or_rows, dict):
            response = self.request("POST", "/imports", json=options | {"coco": path_or_rows})
        else:
            rows = list(path_or_rows)
            response = self.request("POST", "/imports", json=options | {"rows": rows})
        return Job.from_api(response.json())

    # --- export ----------------------------------------------------------------------------

    def export(
        self,
        fmt: str = "jsonl",
        *,
        job_id: int | None = None,
        which: str = "both",
        to: str | Path | IO[bytes],
        chunk_size: int = 64 * 1024,
    ) -> int:
        """Stream the captions of a job (or of every job the user can see) into `to`, a path
        or a binary file; returns the bytes written. `fmt`: jsonl, csv or coco; `which`:
        model, reviewed or both."""
        params: dict[str, Any] = {"format": fmt, "which": which}
        if job_id is not None:
            params["job_id"] = job_id
        with self.request("GET", "/export", params=params, stream=True) as response:
            if isinstance(to, str | Path):
                with Path(to).open("wb") as out:
                    return _copy(response, out, chunk_size)
            return _copy(response, to, chunk_size)

    # --- background exports ----------------------------------------------------------------

    def create_export(
        self, fmt: str = "jsonl", *, job_id: int | None = None, which: str = "both"
    ) -> Export:
        """Start a background export of a job (or of every job the user can see); returns it
        queued. `fmt`: jsonl, csv, coco, parquet, imagefolder (a zip for `datasets`) or
        webdataset (a tar of shards); `which`: model, reviewed or both."""
        body: dict[str, Any] = {"format": fmt, "which": which}
        if job_id is not None:
            body["job_id"] = job_id
        return Export.from_api(self.request("POST", "/exports", json=body).json())

    def get_export(self, export_id: int) -> Export:
        return Export.from_api(self.request("GET", f"/exports/{export_id}").json())

    def exports(self, *, page_size: int = 20) -> Iterator[Export]:
        """The user's exports, newest first, page after page."""
        params: dict[str, Any] = {"limit": page_size}
        while True:
            page = self.request("GET", "/exports", params=params).json()
            yield from (Export.from_api(item) for item in page["items"])
            if page.get("next_before") is None:
                return
            params["before"] = page["next_before"]

    def wait_export(
        self,
        export_id: int,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        progress: Callable[[Export], None] | None = None,
    ) -> Export:
        """Poll the export every `poll` seconds until it is done and return it; `progress` is
        called with each state read. A failed export raises `ExportFailed` (with its error);
        after `timeout` seconds, `WaitTimeout` (its `job` is the export's last state)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            export = self.get_export(export_id)
            if progress is not None:
                progress(export)
            if export.status == ExportStatus.FAILED:
                raise ExportFailed(export)
            if export.status == ExportStatus.DONE:
                return export
            if deadline is not None and time.monotonic() + poll > deadline:
                message = f"export {export_id} still {export.status} after {timeout} s"
                raise WaitTimeout(message, export)  # type: ignore[arg-type]
            time.sleep(poll)

    def download_export(
        self, export_id: int, to: str | Path | IO[bytes], *, chunk_size: int = 1024 * 1024
    ) -> int:
        """Download a done export's file into `to`: a binary file, a path, or a folder (the
        file then keeps the export's name). Returns the bytes written."""
        with self.request("GET", f"/exports/{export_id}/download", stream=True) as response:
            if isinstance(to, str | Path):
                path = Path(to)
                if path.is_dir():
                    path = path / _attachment_name(response, f"export-{export_id}")
                with path.open("wb") as out:
                    return _copy(response, out, chunk_size)
            return _copy(response, to, chunk_size)


def _attachment_name(response: requests.Response, default: str) -> str:
    """The file name a download's Content-Disposition gives, cut to its last path segment."""
    found = re.search(r'filename="([^"]+)"', response.headers.get("Content-Disposition", ""))
    name = found.group(1).replace("\\", "/").rpartition("/")[2] if found else ""
    return name if name not in ("", ".", "..") else default


def _copy(response: requests.Response, out: IO[bytes], chunk_size: int) -> int:
    written = 0
    try:
        for chunk in response.iter_content(chunk_size):
            out.write(chunk)
            written += len(chunk)
    except requests.RequestException as exc:
        raise ServerUnreachable(f"the export stopped: {exc}") from None
    return written
