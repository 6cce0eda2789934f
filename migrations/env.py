"""Alembic environment: migrates the database named by Captioner's settings.

No Flask import here: migrations run from the CLI, workers and tests alike. The URL comes from,
in order: `config.attributes["connection"]` (an open connection, used as is),
`config.attributes["url"]`, `sqlalchemy.url` in the ini, then `Settings.database_url`.
"""

from logging.config import fileConfig

from alembic import context

from captioner.state.db import make_engine
from captioner.state.models import Base

config = context.config
target_metadata = Base.metadata

# Programmatic callers (captioner.state.migrate) keep their own logging; plain `alembic` gets the ini's.
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from captioner.settings import get_settings

    return get_settings().database_url


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=kwargs.pop("dialect_name", None) == "sqlite",
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = _database_url()
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        dialect_name=url.split(":", 1)[0].split("+", 1)[0],
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_with(connection) -> None:
    _configure(connection=connection, dialect_name=connection.dialect.name)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            _run_with(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
