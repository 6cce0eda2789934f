"""Each test session (and bench run) claims Redis databases of its own on the shared server
(tests/redis_claim.py): two claims never get the same database, a claim is released (and its
database flushed) at the end, and a claim with nothing free fails saying who holds what."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from redis_claim import (
    LOCK_DB,
    LOCK_TTL,
    TEST_REDIS_URL,
    NoFreeRedisDb,
    RedisDbs,
    claim_redis_db,
    lock_key,
    redis_url_for,
    release_redis_db,
)

from tests.workers_fixtures import REPO


def _locks() -> redis.Redis:
    return redis.Redis.from_url(redis_url_for(TEST_REDIS_URL, LOCK_DB), decode_responses=True)


def test_redis_url_for_replaces_the_database():
    assert redis_url_for("redis://127.0.0.1:6379/9", 3) == "redis://127.0.0.1:6379/3"
    assert redis_url_for("redis://127.0.0.1:6379", 3) == "redis://127.0.0.1:6379/3"
    assert redis_url_for("redis://:pw@host:1/0?x=1", 12) == "redis://:pw@host:1/12?x=1"
    assert redis_url_for("unix:///tmp/r.sock?db=0", 5) == "unix:///tmp/r.sock?db=5"


def test_claims_in_process_get_distinct_dbs_and_are_released(redis_dbs):
    ours = redis_dbs.db("main")
    locks = _locks()
    first, first_token = claim_redis_db(owner="claim test one")
    second, second_token = claim_redis_db(owner="claim test two")
    try:
        assert len({ours, first, second}) == 3 and LOCK_DB not in {ours, first, second}
        assert locks.get(lock_key(first)) == first_token and "claim test one" in first_token
        assert 0 < locks.ttl(lock_key(first)) <= LOCK_TTL
        data = redis.Redis.from_url(redis_url_for(TEST_REDIS_URL, first))
        data.set("left-behind", "1")

        assert not release_redis_db(TEST_REDIS_URL, first, second_token)  # not its claim
        assert locks.get(lock_key(first)) == first_token and data.exists("left-behind")

        assert release_redis_db(TEST_REDIS_URL, first, first_token)
        assert locks.get(lock_key(first)) is None
        assert not data.exists("left-behind")  # flushed on release
        assert not release_redis_db(TEST_REDIS_URL, first, first_token)  # twice: a no-op
        data.close()
        assert release_redis_db(TEST_REDIS_URL, second, second_token)
        assert locks.get(lock_key(second)) is None
        assert locks.get(lock_key(ours)) is not None  # the session's own claim is untouched
    finally:
        release_redis_db(TEST_REDIS_URL, first, first_token)
        release_redis_db(TEST_REDIS_URL, second, second_token)
        locks.close()


def test_another_process_gets_another_db_while_this_session_holds_its_own(redis_dbs):
    ours = {redis_dbs.db("main"), redis_dbs.db("scratch")}
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from redis_claim import RedisDbs\n"
        "with RedisDbs(owner='other session') as dbs:\n"
        "    print(dbs.db('main'), dbs.db('scratch'), flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = {int(db) for db in out.stdout.split()}
    assert len(theirs) == 2 and not theirs & ours
    locks = _locks()
    try:
        assert all(locks.get(lock_key(db)) is None for db in theirs)  # released at its exit
        assert all(locks.get(lock_key(db)) for db in ours)
    finally:
        locks.close()


def test_no_free_db_fails_naming_the_holder(redis_dbs):
    ours = redis_dbs.db("main")
    with pytest.raises(NoFreeRedisDb) as failure:
        claim_redis_db(owner="latecomer", candidates=[ours])
    message = str(failure.value)
    assert f"db {ours}: " in message and "CAPTIONER_TEST_REDIS_URL" in message
    assert redis_dbs.claims["main"][1] in message  # the holder, as its lock key names it


def test_release_gives_every_slot_back():
    dbs = RedisDbs(owner="release test")
    claimed = [dbs.db("a"), dbs.db("b"), dbs.db("a")]
    assert claimed[0] == claimed[2] != claimed[1]
    dbs.release()
    dbs.release()
    locks = _locks()
    try:
        assert locks.get(lock_key(claimed[0])) is None and locks.get(lock_key(claimed[1])) is None
    finally:
        locks.close()
