"""`captioner db ...`: database migration commands (registered into the main CLI)."""

from __future__ import annotations

import click

from captioner.state import jobs, migrate
from captioner.state.db import make_engine, session_scope


@click.group("db")
def db() -> None:
    """Database schema: upgrade, show the current revision, check against the models."""


@db.command("upgrade")
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade_command(url: str | None, revision: str) -> None:
    """Migrate the database up to REVISION (creating it on first use)."""
    migrate.upgrade(url, revision)
    click.echo(f"database at revision {migrate.current_revision(url)}")


@db.command("current")
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
def current_command(url: str | None) -> None:
    """Print the database's revision and whether it is the newest."""
    current = migrate.current_revision(url)
    head = migrate.head_revision()
    state = "up to date" if current == head else f"behind head {head}"
    click.echo(f"{current or 'empty (no revision)'} ({state})")


@db.command("check")
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
@click.option("--repair", is_flag=True, help="Correct job counters that differ from the rows.")
def check_command(url: str | None, repair: bool) -> None:
    """Exit 1 if the database schema differs from the models, or a job counter from a recount
    of its rows (with --repair: correct the counters, and say so)."""
    diffs = migrate.check(url)
    for diff in diffs:
        click.echo(f"differs: {diff}")
    if diffs:
        raise SystemExit(1)
    click.echo("schema matches the models")
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            drifts = jobs.recount(session, repair=repair)
    finally:
        engine.dispose()
    for drift in drifts:
        click.echo(f"{'repaired' if repair else 'drift'}: {drift}")
    if drifts and not repair:
        raise SystemExit(1)
    if drifts:
        click.echo(f"repaired {len(drifts)} job counters")
    else:
        click.echo("job counters match the rows")
