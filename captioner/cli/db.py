"""`captioner db ...`: database migration commands (registered into the main CLI)."""

from __future__ import annotations

import click

from captioner.state import migrate


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
def check_command(url: str | None) -> None:
    """Exit 1 if the database schema differs from the models."""
    diffs = migrate.check(url)
    for diff in diffs:
        click.echo(f"differs: {diff}")
    if diffs:
        raise SystemExit(1)
    click.echo("schema matches the models")
