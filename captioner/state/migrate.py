"""Schema migrations (Alembic), callable from code, the CLI and tests.

The Alembic environment lives in `migrations/` at the repository root; it is found relative
to this package, so `captioner db upgrade` works from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from captioner.state.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
ALEMBIC_INI = MIGRATIONS_DIR / "alembic.ini"


class MigrationsNotFound(RuntimeError):
    """The migrations directory is not where the package expects it."""


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for `url` (default: `Settings.database_url`, resolved by env.py)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise MigrationsNotFound(f"no Alembic environment at {MIGRATIONS_DIR}")
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["configure_logging"] = False
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None, revision: str) -> None:
    """Migrate the database at `url` down to `revision` (`base` empties it)."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    """The newest revision in migrations/versions."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(url: str | None = None) -> str | None:
    """The revision the database at `url` is at (None for an unmigrated database)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def check(url: str | None = None) -> list[Any]:
    """Differences between the database at `url` and the models (Alembic's autogenerate diff).

    Empty means the migrated schema is exactly what `captioner.state.models` describes; this is
    what `alembic check` tests, without needing a revision to be written.
    """
    from captioner.state.models import Base

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
