"""Helpers for the worker tests: a stack (database, object store, Redis db, tiny checkpoint) and
real `captioner worker` processes started against it.

The Redis server is a real `redis-server` private to the test session (the `redis_dbs` fixture,
tests/redis_server.py, started by pytest-redis).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from PIL import Image as PILImage
from sqlalchemy import func, select

from captioner.settings import Settings
from captioner.state import jobs
from captioner.state.db import make_engine, make_sessionmaker, session_scope
from captioner.state.models import Caption, Image, ImageStatus
from captioner.storage import LocalObjectStore
from captioner.tasks import publish_caption_batches

REPO = Path(__file__).resolve().parents[1]


def png(i: int, size: int = 32) -> bytes:
    """A small, distinct PNG per index."""
    im = PILImage.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    im.putpixel((i % size, (i // size) % size), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch

    from core_model.checkpoint import save_checkpoint
    from core_model.config import preset
    from core_model.model import CaptionModel

    torch.manual_seed(seed)
    save_checkpoint(CaptionModel(preset("tiny")), path, provenance={"trained": False, "seed": seed})
    return path


@dataclass
class Stack:
    """Everything a worker and a test share: URLs, a session factory, the store, Redis."""

    root: Path
    database_url: str
    redis_url: str
    checkpoint: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine = make_engine(self.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.store = LocalObjectStore(self.root / "objects")
        self.redis = redis.Redis.from_url(self.redis_url)

    @property
    def env(self) -> dict[str, str]:
        env = {
            "CAPTIONER_DATA_DIR": str(self.root / "var"),
            "CAPTIONER_DATABASE_URL": self.database_url,
            "CAPTIONER_REDIS_URL": self.redis_url,
            "CAPTIONER_STORAGE_URL": f"file://{self.root / 'objects'}",
            "CAPTIONER_MODEL_CHECKPOINT": str(self.checkpoint),
            "CAPTIONER_DEVICE": "cpu",
            "CAPTIONER_BATCH_SIZE": "16",
            "CAPTIONER_CAPTION_MAX_NEW_TOKENS": "4",
            "CAPTIONER_LEASE_SECONDS": "60",
            "CAPTIONER_QUEUED_TIMEOUT_SECONDS": "600",
            "CAPTIONER_FETCH_THREADS": "4",
        }
        env.update(self.extra_env)
        return env

    def settings(self) -> Settings:
        return Settings(**{k[len("CAPTIONER_") :].lower(): v for k, v in self.env.items()})

    def apply_env(self, monkeypatch) -> None:
        from captioner.settings import reset_settings

        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        reset_settings()

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()

    # --- submitting --------------------------------------------------------------------

    def submit(
        self,
        items: Iterable[tuple[str, bytes | None]],
        *,
        name: str = "job",
        interactive: bool = False,
        publish: bool = True,
        priority: int = 0,
    ) -> tuple[int, list[int]]:
        """Store the bytes (None: leave the object missing), queue the rows, commit, publish."""
        items = list(items)
        for key, data in items:
            if data is not None:
                self.store.put(key, data)
        with session_scope(self.sessions) as s:
            job = jobs.create_job(s, name, priority=priority)
            ids = jobs.submit_images(s, job.id, [key for key, _ in items])
            job_id = job.id
        if publish:
            publish_caption_batches(job_id, ids, interactive=interactive, settings=self.settings())
        return job_id, ids

    def submit_pngs(self, n: int, *, name: str = "job", **kwargs) -> tuple[int, list[int]]:
        prefix = f"{name}-{time.monotonic_ns()}"
        return self.submit(
            ((f"{prefix}/{i:05d}.png", png(i)) for i in range(n)), name=name, **kwargs
        )

    # --- reading -----------------------------------------------------------------------

    def progress(self, job_id: int) -> jobs.JobProgress:
        with self.sessions() as s:
            return jobs.job_progress(s, job_id)

    def caption_counts(self, image_ids: list[int]) -> dict[int, int]:
        with self.sessions() as s:
            rows = s.execute(
                select(Caption.image_id, func.count())
                .where(Caption.image_id.in_(image_ids))
                .group_by(Caption.image_id)
            ).all()
        return dict(rows)

    def images(self, image_ids: list[int]) -> dict[int, Image]:
        with self.sessions() as s:
            rows = s.scalars(select(Image).where(Image.id.in_(image_ids))).all()
            s.expunge_all()
        return {r.id: r for r in rows}

    def statuses(self, job_id: int) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(
                select(Image.status, func.count())
                .where(Image.job_id == job_id)
                .group_by(Image.status)
            ).all()
        return {ImageStatus(k).value: v for k, v in rows}


def wait_for(
    predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = ""
):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class WorkerProcess:
    """A real `captioner worker` process (celery worker, solo pool) with its log in a file."""

    def __init__(self, stack: Stack, name: str, queues: str | None = None, env: dict | None = None):
        self.name = name
        self.log_path = stack.root / f"worker-{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
        full_env.update(stack.env)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(REPO)
        args = [sys.executable, "-m", "captioner.cli", "worker", "-n", f"{name}@test", "-l", "INFO"]
        if queues:
            args += ["-Q", queues]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.log()}")
            return "worker ready" in self.log()

        wait_for(ready, timeout, what=f"worker {self.name} to start")
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the batch, then exit
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
