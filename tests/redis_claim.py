"""Redis databases of its own for each test session (and bench run) on a shared Redis server.

The tests that need Redis use the real server at CAPTIONER_TEST_REDIS_URL (default
redis://127.0.0.1:6379; a database number in it is ignored) and FLUSHDB the databases they use.
So that two runs on one machine (two checkouts, CI beside a developer) never flush each other's
queues, a run first claims whole databases: an atomic `SET captioner-test-lock:<db> <owner> NX EX
3600` in database 0, trying databases 15 down to 1 (so the low numbers, where an application is
likelier to live, come last). A run renews its claims while it holds them and releases them at
its end (FLUSHDB, then delete the lock key if it is still its own); a crashed run's claims expire
after an hour. When every database is claimed, the claim fails saying by whom.

Only runs that claim are kept apart: anything else using one of these databases without a claim
(an old checkout with fixed numbers) can still be flushed.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
import warnings
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

TEST_REDIS_URL = os.environ.get("CAPTIONER_TEST_REDIS_URL", "redis://127.0.0.1:6379")
LOCK_PREFIX = "captioner-test-lock:"
LOCK_DB = 0  # where the lock keys live; never claimed, never flushed
LOCK_TTL = 3600  # seconds: how long a crashed run's claim outlives it
RENEW_EVERY = 300  # seconds between renewals of a live run's claims

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class NoFreeRedisDb(RuntimeError):
    """Every candidate database is claimed by another run."""


def redis_url_for(base_url: str, db: int) -> str:
    """`base_url` pointing at database `db` (path for redis://, `?db=` for unix://)."""
    parts = urlsplit(base_url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        return f"unix://{parts.netloc}{parts.path}?{urlencode(query)}"  # urlunsplit drops the //
    return urlunsplit(parts._replace(path=f"/{db}"))


def lock_key(db: int) -> str:
    return f"{LOCK_PREFIX}{db}"


def _lock_client(base_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url_for(base_url, LOCK_DB), decode_responses=True)


def _database_count(client: redis.Redis) -> int:
    try:
        return int(client.config_get("databases").get("databases", 16))
    except redis.ResponseError:  # CONFIG disabled on this server: assume the default
        return 16


def default_owner() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} in {os.getcwd()}"


def claim_redis_db(
    base_url: str = TEST_REDIS_URL,
    owner: str | None = None,
    *,
    candidates: Iterable[int] | None = None,
    ttl: int = LOCK_TTL,
) -> tuple[int, str]:
    """Claim a free database: returns (db, token); give both to `release_redis_db`."""
    token = f"{owner or default_owner()} #{uuid.uuid4().hex[:12]}"
    client = _lock_client(base_url)
    try:
        if candidates is None:
            candidates = range(_database_count(client) - 1, LOCK_DB, -1)
        candidates = [db for db in candidates if db != LOCK_DB]
        for db in candidates:
            if client.set(lock_key(db), token, nx=True, ex=ttl):
                return db, token
        holders = {db: client.get(lock_key(db)) for db in candidates}
    finally:
        client.close()
    listed = "\n".join(f"  db {db}: {who or '(just released)'}" for db, who in holders.items())
    raise NoFreeRedisDb(
        f"no free Redis database for this test run on {base_url}: every candidate is claimed "
        f"by another run (lock keys {LOCK_PREFIX}<db> in db {LOCK_DB}):\n{listed}\n"
        f"Wait for those runs to finish, delete the keys of runs that are gone (they expire "
        f"{ttl}s after their last renewal), or set CAPTIONER_TEST_REDIS_URL to another server."
    )


def renew_redis_db(base_url: str, db: int, token: str, ttl: int = LOCK_TTL) -> bool:
    """Push the claim's expiry back; False if it is no longer ours."""
    client = _lock_client(base_url)
    try:
        return bool(client.eval(_RENEW, 1, lock_key(db), token, ttl))
    finally:
        client.close()


def release_redis_db(base_url: str, db: int, token: str, *, flush: bool = True) -> bool:
    """Flush the database (if `flush`) and drop the claim, only while it is still ours."""
    client = _lock_client(base_url)
    try:
        if client.get(lock_key(db)) != token:
            return False
        if flush:
            data = redis.Redis.from_url(redis_url_for(base_url, db))
            try:
                data.flushdb()
            finally:
                data.close()
        return bool(client.eval(_RELEASE, 1, lock_key(db), token))
    finally:
        client.close()


class RedisDbs:
    """The databases one run has claimed, by slot name, each claimed on its first use.

    Tests that run one after another share a slot (each flushes it first); a slot is only needed
    for Redis use that overlaps another's in time (a module's worker still listening on "main"
    while a test runs its own stack on "scratch").
    """

    def __init__(self, base_url: str = TEST_REDIS_URL, owner: str | None = None) -> None:
        self.base_url = base_url
        self.owner = owner
        self.claims: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def db(self, slot: str = "main") -> int:
        with self._lock:
            if slot not in self.claims:
                self.claims[slot] = claim_redis_db(self.base_url, self.owner)
                if self._renewer is None:
                    self._renewer = threading.Thread(
                        target=self._renew, name="redis-claim-renewer", daemon=True
                    )
                    self._renewer.start()
            return self.claims[slot][0]

    def url(self, slot: str = "main") -> str:
        """The URL of this run's database for `slot`."""
        return redis_url_for(self.base_url, self.db(slot))

    def flushed(self, slot: str = "main") -> str:
        """`url(slot)` after a FLUSHDB of that database (this run's own)."""
        url = self.url(slot)
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
        return url

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY):
            with self._lock:
                claims = list(self.claims.values())
            for db, token in claims:
                try:
                    renew_redis_db(self.base_url, db, token)
                except redis.RedisError:
                    pass  # the server is away: the next round tries again

    def release(self) -> None:
        """Flush and give back every database claimed; safe to call twice."""
        self._stop.set()
        with self._lock:
            claims, self.claims = list(self.claims.values()), {}
        for db, token in claims:
            try:
                release_redis_db(self.base_url, db, token)
            except redis.RedisError as exc:  # the claim expires on its own
                warnings.warn(
                    f"could not release Redis db {db} on {self.base_url}: {exc}", stacklevel=2
                )

    def __enter__(self) -> RedisDbs:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
