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
    def __init__(self, server: str, token: str) -> None:
        import requests

        self.base = server.rstrip("/") + "/api/v1"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kwargs):
        response = self.http.request(method, self.base + path, timeout=600, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise click.ClickException(f"{response.status_code}: {message}")
        return response


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
    """Submit SOURCE: a folder, a .zip, s3://bucket/prefix or a .txt of URLs (one per line)."""
    client = Client(server, _token(token))
    options = {
        "name": name or source[-200:],
        "priority": priority,
        "num_beams": num_beams,
        "n_best": n_best,
        "recaption": recaption,
    }
    path = Path(source)
    if source.startswith("s3://"):
        job = client.call("POST", "/jobs", json=options | {"prefix": source}).json()
    elif path.is_dir() or path.suffix.lower() == ".zip":
        data = zip_folder(path) if path.is_dir() else path.read_bytes()
        form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
        files = {
            "archive": (path.name + (".zip" if path.is_dir() else ""), data, "application/zip")
        }
        job = client.call("POST", "/jobs/upload", data=form, files=files).json()
    elif path.is_file():
        urls = [
            line.strip()
            for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        job = client.call("POST", "/jobs", json=options | {"urls": urls}).json()
    else:
        raise click.ClickException(f"{source}: not a folder, zip, URL list or s3:// prefix")
    click.echo(f"job {job['id']} submitted")
    if wait:
        job = _wait(client, job["id"])
        p = job["progress"]
        click.echo(
            f"job {job['id']} {job['status']}: {p['captioned']} captioned, {p['failed']} failed"
        )
        if job["status"] != "finished" or p["failed"]:
            sys.exit(1)


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
