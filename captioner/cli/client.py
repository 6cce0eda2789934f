"""`captioner submit`, `captioner export` (HTTP clients of the dashboard API) and
`captioner user create` (direct to the database, for the first admin).

The token comes from `--token`, `CAPTIONER_TOKEN`, or `~/.config/captioner/token`.
"""

from __future__ import annotations

import io
import os
import sys
import time
import zipfile
from pathlib import Path

import click

from captioner.intake.uploads import IMAGE_SUFFIXES

TOKEN_FILE = Path("~/.config/captioner/token")


def _token(explicit: str | None) -> str:
    token = explicit or os.environ.get("CAPTIONER_TOKEN")
    path = TOKEN_FILE.expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise click.ClickException(f"no API token: set CAPTIONER_TOKEN or write it to {TOKEN_FILE}")
    return token


class Client:
    """The dashboard API over HTTP; every failure becomes one readable line (a ClickException):
    the status and message, a validation error's reasons, or a server it cannot reach."""

    def __init__(self, server: str, token: str) -> None:
        import requests

        self.server = server.rstrip("/")
        self.base = self.server + "/api/v1"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kwargs):
        import requests

        try:
            response = self.http.request(method, self.base + path, timeout=600, **kwargs)
        except requests.ConnectionError:
            raise click.ClickException(f"cannot reach the server at {self.server}") from None
        except requests.Timeout:
            raise click.ClickException(f"the server at {self.server} did not answer") from None
        except requests.RequestException as exc:
            raise click.ClickException(f"request to {self.server} failed: {exc}") from None
        if response.status_code >= 400:
            raise click.ClickException(error_line(response))
        return response


def _reasons(detail, where: str = "") -> list[str]:
    """A validation error's reasons ("field: message"), flattened from its nested detail."""
    if isinstance(detail, dict):
        out: list[str] = []
        for key, value in detail.items():
            # The first level names where the input was read (json, query, form_and_files).
            inner = key if where or key not in _LOCATIONS else ""
            out += _reasons(value, f"{where}.{inner}".strip(".") if inner else where)
        return out
    if isinstance(detail, list | tuple):
        return [r for item in detail for r in _reasons(item, where)]
    text = str(detail).strip()
    return [f"{where}: {text}" if where else text] if text else []


_LOCATIONS = {"json", "query", "form", "files", "form_and_files", "headers", "cookies", "path"}


def error_line(response) -> str:
    """One line for an error response: "422: Validation error: num_beams: Must be ..."."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = " ".join((response.text or response.reason or "").split())[:300]
        return f"{response.status_code}: {text}"
    message = str(body.get("message") or response.reason or "error")
    reasons = _reasons(body.get("detail") or {})
    return f"{response.status_code}: {message}" + (f": {'; '.join(reasons)}" if reasons else "")


def refused_lines(job: dict) -> list[str]:
    """One line per item the server refused while accepting the rest (`refused` in a job)."""
    out = []
    for item in job.get("refused") or []:
        if isinstance(item, dict):
            name = item.get("name") or item.get("file") or item.get("url") or "?"
            out.append(f"refused: {name}: {item.get('reason') or item.get('message') or ''}")
        else:
            out.append(f"refused: {item}")
    return out


def zip_folder(folder: Path) -> bytes:
    """A stored (uncompressed) zip of the images under `folder`, paths relative to it; symlinks
    and files that are not images by their suffix are left out. What `submit` uploads for a
    folder, and how the embedded stack submits its sample collection."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.suffix.lower() in IMAGE_SUFFIXES:
                archive.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


@click.command("submit")
@click.argument("source")
@click.option(
    "--server", envvar="CAPTIONER_SERVER", default="http://127.0.0.1:5000", show_default=True
)
@click.option(
    "--token", default=None, help="API token (default: CAPTIONER_TOKEN or the config file)."
)
@click.option("--name", default=None, help="Job name (default: the source).")
@click.option("--priority", default=0, show_default=True)
@click.option("--beams", "num_beams", default=3, show_default=True)
@click.option("--n-best", default=3, show_default=True)
@click.option("--recaption", is_flag=True, help="Caption again even images already captioned.")
@click.option("--wait", is_flag=True, help="Show a progress bar until the job finishes.")
def submit(source, server, token, name, priority, num_beams, n_best, recaption, wait):
    """Submit SOURCE: a folder, a .zip, one image file, s3://bucket/prefix or a .txt of URLs
    (one per line)."""
    client = Client(server, _token(token))
    options = {
        "name": name or source[-200:],
        "priority": priority,
        "num_beams": num_beams,
        "n_best": n_best,
        "recaption": recaption,
    }
    job = _submit(client, source, options)
    click.echo(f"job {job['id']} submitted")
    refused = refused_lines(job)
    for line in refused:
        click.echo(line, err=True)
    if wait:
        job = _wait(client, job["id"])
        p = job["progress"]
        click.echo(
            f"job {job['id']} {job['status']}: {p['captioned']} captioned, {p['failed']} failed"
        )
        if job["status"] != "finished" or p["failed"]:
            sys.exit(1)
    if refused:
        sys.exit(1)


def _form(options: dict) -> dict[str, str]:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}


def _submit(client: Client, source: str, options: dict) -> dict:
    """Send SOURCE as the kind of submission it is; returns the job."""
    path = Path(source)
    if source.startswith("s3://"):
        return client.call("POST", "/jobs", json=options | {"prefix": source}).json()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip"):
        data = zip_folder(path) if path.is_dir() else path.read_bytes()
        files = {
            "archive": (path.name + (".zip" if path.is_dir() else ""), data, "application/zip")
        }
        return client.call("POST", "/jobs/upload", data=_form(options), files=files).json()
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        files = [("files", (path.name, path.read_bytes(), "application/octet-stream"))]
        return client.call("POST", "/jobs/upload", data=_form(options), files=files).json()
    if path.is_file():
        return client.call("POST", "/jobs", json=options | {"urls": _url_list(path)}).json()
    raise click.ClickException(f"{source}: not a folder, zip, image, URL list or s3:// prefix")


def _url_list(path: Path) -> list[str]:
    """The URLs of a text file, one per line (# comments and blank lines left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(
            f"{path}: not a folder, zip, image ({', '.join(sorted(IMAGE_SUFFIXES))}) "
            "or text list of URLs"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _wait(client: Client, job_id: int, poll_seconds: float = 1.0) -> dict:
    from tqdm import tqdm

    with tqdm(desc=f"job {job_id}", unit="img", file=sys.stderr, disable=None) as bar:
        while True:
            job = client.call("GET", f"/jobs/{job_id}").json()
            p = job["progress"]
            bar.total = p["total"]
            bar.n = p["done"]
            bar.set_postfix(failed=p["failed"])
            bar.refresh()
            if job["status"] in ("finished", "cancelled"):
                return job
            time.sleep(poll_seconds)


@click.command("export")
@click.argument("job", required=False, type=int)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "coco"]),
    default="jsonl",
    show_default=True,
)
@click.option(
    "--which", type=click.Choice(["model", "reviewed", "both"]), default="both", show_default=True
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File (default: stdout).",
)
@click.option(
    "--server", envvar="CAPTIONER_SERVER", default="http://127.0.0.1:5000", show_default=True
)
@click.option("--token", default=None)
def export(job, fmt, which, out, server, token):
    """Export captions of JOB (or of every job you can see)."""
    client = Client(server, _token(token))
    params = {"format": fmt, "which": which} | ({"job_id": job} if job else {})
    response = client.call("GET", "/export", params=params, stream=True)
    target = out.open("wb") if out else sys.stdout.buffer
    try:
        for chunk in response.iter_content(64 * 1024):
            target.write(chunk)
    finally:
        if out:
            target.close()


@click.group("user")
def user() -> None:
    """Accounts (direct to the database)."""


@user.command("create")
@click.argument("email")
@click.option(
    "--role",
    type=click.Choice(["admin", "reviewer", "submitter"]),
    default="submitter",
    show_default=True,
)
@click.option("--name", default="")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
def user_create(email, role, name, password, url):
    """Create a user who can log in to the dashboard."""
    from captioner.accounts import MIN_PASSWORD_LENGTH, create_user, find_user
    from captioner.state.db import make_engine, session_scope

    if len(password) < MIN_PASSWORD_LENGTH:
        raise click.ClickException(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            if find_user(session, email) is not None:
                raise click.ClickException(f"user {email} exists")
            create_user(session, email, password, role=role, name=name)
    finally:
        engine.dispose()
    click.echo(f"created {role} {email}")
