"""Shared fixtures: databases (SQLite and the PostgreSQL server on loopback), sessions, an S3 API
server (moto) on loopback, object stores over both backends, and the bad-image corpus.

PostgreSQL tests each get a fresh database, created and dropped here. They need the server at
CAPTIONER_TEST_POSTGRES_URL (default: postgres on 127.0.0.1:5432, database `test`); if it is
not reachable the tests fail.

Redis tests use a private `redis-server` started for the session by pytest-redis
(`redis_server`), through `redis_dbs` (tests/redis_server.py): no other run and no deployment
shares it, so flushing its databases is always safe.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_redis import factories
from redis_server import RedisDbs, redis_executable
from sqlalchemy.engine import make_url

from captioner.settings import reset_settings
from captioner.state.db import make_engine, make_sessionmaker

ADMIN_URL = os.environ.get(
    "CAPTIONER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _psycopg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _postgres_admin():
    import psycopg

    try:
        return psycopg.connect(_psycopg_dsn(ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {ADMIN_URL} not reachable: {exc}")


def _create_postgres_database(template: str | None = None) -> str:
    name = f"captioner_test_{uuid.uuid4().hex[:12]}"
    with _postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return name


def _drop_postgres_database(name: str) -> None:
    with _postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postgres_url_for(name: str) -> str:
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = _create_postgres_database()
    try:
        yield _postgres_url_for(name)
    finally:
        _drop_postgres_database(name)


# This session's own redis-server on a free port (pytest-redis), stopped when the session ends.
redis_server = factories.redis_proc(
    executable=redis_executable(), host="127.0.0.1", port=None, db_count=len(RedisDbs.SLOTS) + 1
)


@pytest.fixture(scope="session")
def redis_dbs(redis_server) -> RedisDbs:
    """The session's Redis databases: `.url(slot)`, `.flushed(slot)` (slot "main" unless a test
    needs a second one at the same time)."""
    return RedisDbs(f"redis://{redis_server.host}:{redis_server.port}")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'captioner.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """An empty database URL, once per backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session")
def _postgres_template() -> Iterator[str]:
    """A PostgreSQL database migrated once per session, copied for each test (much faster)."""
    from captioner.state import migrate

    name = _create_postgres_database()
    try:
        migrate.upgrade(_postgres_url_for(name))
        yield name
    finally:
        _drop_postgres_database(name)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> Path:
    from captioner.state import migrate

    path = tmp_path_factory.mktemp("sqlite-template") / "captioner.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request, tmp_path) -> Iterator[str]:
    """A database at the newest revision, once per backend (a copy of a migrated template)."""
    if request.param == "sqlite":
        path = tmp_path / "migrated.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    name = _create_postgres_database(template=request.getfixturevalue("_postgres_template"))
    try:
        yield _postgres_url_for(name)
    finally:
        _drop_postgres_database(name)


@pytest.fixture
def engine(migrated_url):
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine):
    return make_sessionmaker(engine)


@pytest.fixture
def session(session_factory):
    """A session on a migrated database; whatever the test leaves uncommitted is rolled back."""
    with session_factory() as session:
        yield session
        session.rollback()


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch, tmp_path):
    """Each test reads settings afresh, with its embedded state under its own tmp dir."""
    for name in list(os.environ):
        if name.startswith("CAPTIONER_") and not name.startswith("CAPTIONER_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CAPTIONER_DATA_DIR", str(tmp_path / "var"))
    reset_settings()
    yield
    reset_settings()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3 API server (moto) on loopback for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # One log line per request would dominate the listing test's time.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    saved = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)  # fake credentials: never reach a real account
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the loopback S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3"])
def object_store(request, tmp_path):
    """An empty ObjectStore, once per backend (the S3 one under a key prefix)."""
    from captioner.storage import LocalObjectStore, S3ObjectStore

    if request.param == "file":
        return LocalObjectStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3ObjectStore(
        bucket, "some/prefix", endpoint_url=endpoint, region="us-east-1", max_attempts=3
    )


@pytest.fixture(scope="session")
def bad_inputs():
    """{file name: (bytes, Expected)}: see tests.bad_inputs.bad_input_corpus."""
    from tests.bad_inputs import bad_input_corpus

    return bad_input_corpus()


# --- dashboard: app, client, runner (used by test_api, test_ui, test_openapi, test_browser) ---


@pytest.fixture
def dashboard_settings(tmp_path, sqlite_url, _sqlite_template, redis_dbs):
    """Settings for a dashboard on a migrated SQLite database and a local object store, with
    the session's private Redis (review claims, /health)."""
    from captioner.settings import Settings

    shutil.copyfile(_sqlite_template, sqlite_url.removeprefix("sqlite:///"))
    return Settings(
        data_dir=tmp_path / "var",
        database_url=sqlite_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        redis_url=redis_dbs.url("extra"),
        secret_key="test-secret",
        submit_rate_limit="1000/minute",
        login_rate_limit="1000/minute",
    )


@pytest.fixture
def publisher():
    """A fake publisher: `.captions` and `.tasks` list what the app would have sent."""

    class Fake:
        def __init__(self) -> None:
            self.sent: list[tuple[int, list[int], bool]] = []
            self.tasks: list[tuple[str, tuple]] = []

        def captions(self, job_id, image_ids, *, interactive=False):
            self.sent.append((job_id, list(image_ids), interactive))

        def task(self, name, *args):
            self.tasks.append((name, args))

        def ids_for(self, job_id):
            return sorted(i for j, ids, _ in self.sent if j == job_id for i in ids)

    return Fake()


@pytest.fixture
def app(dashboard_settings, publisher):
    from dashboard import create_app

    app = create_app(dashboard_settings, publisher=publisher)
    app.config["TESTING"] = True
    yield app
    app.extensions["captioner"].engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


# --- DNS rebinding ---------------------------------------------------------------------------

PUBLIC_IP = "93.184.215.14"  # passes the address check; connects to it are refused by the fixture


@pytest.fixture
def rebinding_dns(monkeypatch):
    """`rebind.example` answers PUBLIC_IP the first time and 127.0.0.1 after that; a connect to
    PUBLIC_IP is refused at once. Returns (names looked up, connect targets)."""
    import socket

    import urllib3.util.connection

    lookups: list[str] = []
    connects: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = urllib3.util.connection.create_connection

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "rebind.example":
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        address = PUBLIC_IP if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]

    def create_connection(address, *args, **kwargs):
        connects.append(address[0])
        if address[0] == PUBLIC_IP:
            raise ConnectionRefusedError(111, "refused (test)")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)
    return lookups, connects
