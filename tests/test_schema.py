"""The Alembic migrations create exactly the models' schema, on SQLite and PostgreSQL."""

import subprocess
import sys

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from captioner.cli.db import db
from captioner.state import migrate
from captioner.state.db import make_engine
from captioner.state.models import Base


def test_migrated_schema_matches_models(db_url):
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    migrated_url = db_url
    assert migrate.current_revision(migrated_url) == migrate.head_revision()
    assert migrate.check(migrated_url) == []
    engine = make_engine(migrated_url)
    try:
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()
    assert tables == set(Base.metadata.tables)


def test_check_notices_a_difference(migrated_url):
    # Guards the test above against being vacuous: a missing index must show up.
    engine = make_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_images_status_lease_until"))
    engine.dispose()
    diffs = migrate.check(migrated_url)
    assert [d[0] for d in diffs] == ["add_index"]
    assert diffs[0][1].name == "ix_images_status_lease_until"


def test_downgrade_to_base_and_back(migrated_url):
    migrate.downgrade(migrated_url, "base")
    engine = make_engine(migrated_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    migrate.upgrade(migrated_url)
    assert migrate.check(migrated_url) == []


def test_constraint_names_follow_the_convention(engine):
    insp = inspect(engine)
    fks = {fk["name"] for fk in insp.get_foreign_keys("images")}
    assert fks == {"fk_images_job_id_jobs"}
    uniques = {u["name"] for u in insp.get_unique_constraints("captions")}
    assert uniques == {"uq_captions_image_id_model_version_id"}
    assert insp.get_pk_constraint("reviews")["name"] in ("pk_reviews", None)  # SQLite: unnamed


def test_status_check_constraint_enforced(engine):
    with engine.connect() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (name, source, options, priority, status, image_count,"
                " captioned_count, failed_count, created_at) VALUES"
                " ('j', '', '{}', 0, 'queued', 0, 0, 0, CURRENT_TIMESTAMP)"
            )
        )
        with pytest.raises(IntegrityError):
            conn.execute(text("UPDATE jobs SET status = 'exploded'"))


def test_at_most_one_active_model_version(engine):
    insert = text(
        "INSERT INTO model_versions (name, checkpoint_uri, config, metrics, status,"
        " created_at) VALUES (:n, 'file:///x', '{}', '{}', :s, CURRENT_TIMESTAMP)"
    )
    with engine.connect() as conn:
        conn.execute(insert, {"n": "v1", "s": "active"})
        conn.execute(insert, {"n": "v0", "s": "retired"})
        conn.execute(insert, {"n": "v2", "s": "candidate"})
        with pytest.raises(IntegrityError):
            conn.execute(text("UPDATE model_versions SET status = 'active' WHERE name = 'v2'"))


def test_foreign_keys_enforced(engine):
    with engine.connect() as conn, pytest.raises(IntegrityError):
        conn.execute(
            text(
                "INSERT INTO reviews (image_id, decision, created_at)"
                " VALUES (12345, 'approved', CURRENT_TIMESTAMP)"
            )
        )


def test_sqlite_pragmas(sqlite_url):
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    engine.dispose()


def test_cli_upgrade_from_any_directory(db_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the migrations are found relative to the package, not cwd
    runner = CliRunner()
    result = runner.invoke(db, ["upgrade", "--url", db_url])
    assert result.exit_code == 0, result.output
    assert migrate.head_revision() in result.output
    result = runner.invoke(db, ["current", "--url", db_url])
    assert result.exit_code == 0 and "up to date" in result.output
    result = runner.invoke(db, ["check", "--url", db_url])
    assert result.exit_code == 0 and "matches" in result.output


def test_cli_uses_settings_database_url(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("CAPTIONER_DATABASE_URL", url)
    result = CliRunner().invoke(db, ["upgrade"])
    assert result.exit_code == 0, result.output
    assert migrate.current_revision(url) == migrate.head_revision()


def test_migrations_do_not_import_flask(sqlite_url, tmp_path):
    code = (
        "import sys; from captioner.state import migrate; migrate.upgrade(sys.argv[1]); "
        "bad = [m for m in ('flask', 'torch', 'celery') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, sqlite_url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_migrations_are_found_through_their_package(monkeypatch):
    from pathlib import Path

    import migrations

    folder = migrate.migrations_dir()
    assert folder.resolve() == Path(migrations.__file__).resolve().parent
    for needed in ("env.py", "alembic.ini", "script.py.mako"):
        assert (folder / needed).is_file()
    assert sorted(p.name for p in (folder / "versions").glob("0*.py"))[0].startswith("0001_")

    # A missing package, or one without an Alembic environment, is a clear MigrationsNotFound.
    for package, message in (("no_such_migrations", "not installed"), ("json", "no Alembic")):
        migrate.migrations_dir.cache_clear()
        monkeypatch.setattr(migrate, "MIGRATIONS_PACKAGE", package)
        with pytest.raises(migrate.MigrationsNotFound, match=message):
            migrate.head_revision()
    migrate.migrations_dir.cache_clear()
    monkeypatch.undo()
    assert migrate.head_revision() is not None
