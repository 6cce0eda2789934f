"""Schema migrations (Alembic), callable from code, the CLI and tests.

The Alembic environment is the package `migrations` (its `env.py`, `alembic.ini`,
`script.py.mako` and `versions/` are package data), found through `importlib.resources`: the
same code works from the source tree and from an installed wheel, from any working directory.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from captioner.state.db import make_engine

MIGRATIONS_PACKAGE = "migrations"


class MigrationsNotFound(RuntimeError):
    """The `migrations` package (Alembic's environment) is not installed or is incomplete."""


@functools.cache
def migrations_dir() -> Path:
    """The folder of the installed `migrations` package, with its env.py and alembic.ini."""
    try:
        root = resources.files(MIGRATIONS_PACKAGE)
    except ModuleNotFoundError:
        raise MigrationsNotFound(
            f"the package {MIGRATIONS_PACKAGE!r} is not installed: reinstall captioner"
        ) from None
    # Alembic reads its scripts from a real folder; a wheel installs the package as one.
    folder = Path(str(root))
    for needed in ("env.py", "alembic.ini", "script.py.mako", "versions"):
        if not (folder / needed).exists():
            raise MigrationsNotFound(f"no Alembic {needed} in {folder}")
    return folder


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for `url` (default: `Settings.database_url`, resolved by env.py)."""
    folder = migrations_dir()
    config = Config(str(folder / "alembic.ini"))
    config.set_main_option("script_location", str(folder))
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
