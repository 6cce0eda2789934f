"""`captioner submit`, `captioner export` (through `captioner.client`, the dashboard API over
HTTP) and `captioner user create` (direct to the database, for the first admin).

The token comes from `--token`, `CAPTIONER_TOKEN`, or `~/.config/captioner/token`. A
`CaptionerError` of the client becomes one readable line and exit status 1 in one place,
`readable_errors`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from captioner.client import (
    CaptionerClient,
    CaptionerError,
    Export,
    Job,
    Refused,
    SubmitOptions,
    zip_folder,
)
from captioner.export import BACKGROUND_FORMATS, FORMATS
from captioner.intake.uploads import IMAGE_SUFFIXES
from captioner.state.models import JobStatus

__all__ = ["Client", "export", "import_captions", "refused_lines", "submit", "user", "zip_folder"]

TOKEN_FILE = Path("~/.config/captioner/token")

# Uploads of large folders take long: the CLI waits for an answer up to this many seconds.
CLI_TIMEOUT = 600


def _token(explicit: str | None) -> str:
    token = explicit or os.environ.get("CAPTIONER_TOKEN")
    path = TOKEN_FILE.expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise click.ClickException(f"no API token: set CAPTIONER_TOKEN or write it to {TOKEN_FILE}")
    return token


@contextlib.contextmanager
def readable_errors() -> Iterator[None]:
    """A `CaptionerError` inside becomes a ClickException: one line ("Error: 422: ..."), exit 1."""
    try:
        yield
    except CaptionerError as exc:
        raise click.ClickException(str(exc)) from None


class ClientCommand(click.Command):
    """A command that calls the API: its client errors are one readable line."""

    def invoke(self, ctx: click.Context) -> Any:
        with readable_errors():
            return super().invoke(ctx)


class Client(CaptionerClient):
    """The client the embedded stack uses (`captioner run` submits its sample collection and
    follows it): `call` is `request` with its errors as one readable line."""

    def __init__(self, server: str, token: str) -> None:
        super().__init__(server, token, timeout=CLI_TIMEOUT)

    def call(self, method: str, path: str, **kwargs: Any):
        with readable_errors():
            return self.request(method, path, **kwargs)


def refused_lines(job: dict | Job) -> list[str]:
    """One line per item the server refused while accepting the rest (`refused` in a job)."""
    out = []
    for item in (job.get("refused") if isinstance(job, dict) else job.refused) or []:
        if isinstance(item, dict):
            name = item.get("name") or item.get("file") or item.get("url") or "?"
            out.append(f"refused: {name}: {item.get('reason') or item.get('message') or ''}")
        else:
            out.append(f"refused: {item}")
    return out


@click.command("submit", cls=ClientCommand)
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
    client = CaptionerClient(server, _token(token), timeout=CLI_TIMEOUT)
    options = SubmitOptions(
        name=name or source[-200:],
        priority=priority,
        num_beams=num_beams,
        n_best=n_best,
        recaption=recaption,
    )
    job = _submit(client, source, options)
    click.echo(f"job {job.id} submitted")
    for line in refused_lines(job):
        click.echo(line, err=True)
    if wait:
        job = _wait(client, job.id)
        p = job.progress
        click.echo(f"job {job.id} {job.status}: {p.captioned} captioned, {p.failed} failed")
        if job.status != JobStatus.FINISHED or p.failed:
            sys.exit(1)


def _submit(client: CaptionerClient, source: str, options: SubmitOptions) -> Job:
    """Send SOURCE as the kind of submission it is; returns the job."""
    path = Path(source)
    if source.startswith("s3://"):
        return client.submit_prefix(source, options)
    if path.is_dir():
        return client.submit_folder(path, options)
    if path.is_file() and path.suffix.lower() == ".zip":
        return client.submit_zip(path, options)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return client.submit_files([path], options)
    if path.is_file():
        return client.submit_urls(_url_list(path), options)
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


def _wait(client: CaptionerClient, job_id: int, poll_seconds: float = 1.0) -> Job:
    """The job once it ended, with a progress bar on stderr meanwhile."""
    from tqdm import tqdm

    with tqdm(desc=f"job {job_id}", unit="img", file=sys.stderr, disable=None) as bar:

        def show(job: Job) -> None:
            bar.total = job.progress.total
            bar.n = job.progress.done
            bar.set_postfix(failed=job.progress.failed)
            bar.refresh()

        return client.wait(job_id, poll=poll_seconds, progress=show)


@click.command("export", cls=ClientCommand)
@click.argument("job", required=False, type=int)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(BACKGROUND_FORMATS)),
    default="jsonl",
    show_default=True,
    help="imagefolder: a zip for `datasets.load_dataset('imagefolder', ...)`; webdataset: a "
    "tar of WebDataset shards.",
)
@click.option(
    "--which", type=click.Choice(["model", "reviewed", "both"]), default="both", show_default=True
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path, allow_dash=True),
    default=None,
    help="File or folder to write, - for stdout (default: the export's file name in the "
    "current folder; with --stream, stdout).",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Stream it within one request instead (jsonl, csv, coco only; for small jobs).",
)
@click.option(
    "--server", envvar="CAPTIONER_SERVER", default="http://127.0.0.1:5000", show_default=True
)
@click.option("--token", default=None)
def export(job, fmt, which, out, stream, server, token):
    """Export captions of JOB (or of every job you can see): the server writes the file in the
    background (a progress bar meanwhile), then it is downloaded."""
    client = CaptionerClient(server, _token(token), timeout=CLI_TIMEOUT)
    if stream:
        if fmt not in FORMATS:
            raise click.ClickException(f"--stream takes {', '.join(FORMATS)}, not {fmt}")
        to = sys.stdout.buffer if out is None or str(out) == "-" else out
        client.export(fmt, job_id=job or None, which=which, to=to)
        return
    started = client.create_export(fmt, job_id=job or None, which=which)
    click.echo(f"export {started.id} started", err=True)
    done = _wait_export(client, started.id)
    if out is not None and str(out) == "-":
        client.download_export(done.id, sys.stdout.buffer)
        return
    target = out if out is not None else Path(done.file_name)
    if target.is_dir():
        target = target / done.file_name
    written = client.download_export(done.id, target)
    click.echo(f"export {done.id}: {done.rows_done} rows, {written} bytes in {target}", err=True)
    if done.missing_images:
        click.echo(f"{done.missing_images} images were not in the object store: left out", err=True)


def _wait_export(client: CaptionerClient, export_id: int, poll_seconds: float = 1.0) -> Export:
    """The export once done, with a progress bar of its rows on stderr meanwhile; a failed one
    raises `ExportFailed` (one readable line)."""
    from tqdm import tqdm

    with tqdm(desc=f"export {export_id}", unit="row", file=sys.stderr, disable=None) as bar:

        def show(export: Export) -> None:
            bar.total = max(export.rows_total, export.rows_done) or None
            bar.n = export.rows_done
            bar.set_postfix(status=export.status.value)
            bar.refresh()

        return client.wait_export(export_id, poll=poll_seconds, progress=show)


@click.command("import", cls=ClientCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "coco"]),
    default=None,
    help="Default: from the file's suffix (.jsonl, .csv, .json = coco).",
)
@click.option("--name", default=None, help="Job name (default: the file's name).")
@click.option("--key-prefix", default="", help="Put before every key (COCO file names).")
@click.option(
    "--server", envvar="CAPTIONER_SERVER", default="http://127.0.0.1:5000", show_default=True
)
@click.option("--token", default=None)
def import_captions(file, fmt, name, key_prefix, server, token):
    """Import the captions in FILE (JSONL, CSV or COCO captions) as a job whose images are
    already captioned. Each row: key or url, caption, and optionally score, external_id and
    review. One bad row refuses the whole file; every problem is listed with its line."""
    client = CaptionerClient(server, _token(token), timeout=CLI_TIMEOUT)
    try:
        job = client.import_captions(file, fmt, name=name, key_prefix=key_prefix)
    except Refused as exc:
        # Each refused row on its own line, then the refusal itself as the error line.
        for where, messages in exc.reasons.items():
            for message in messages:
                click.echo(f"{where}: {message}" if where else message, err=True)
        raise click.ClickException(f"{exc.status}: {exc.message}") from None
    click.echo(f"job {job.id} imported: {job.progress.captioned} captioned, {job.status}")


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
