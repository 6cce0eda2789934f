"""What every task of one worker process shares: the database engine and its session factory,
the object store, the model runtime and the fetch thread pool, built once per (database,
storage) pair; and the retry rules the tasks have in common.

A pipelined worker (Celery's `threads` pool) runs several batches at once in one process, so
everything here is thread-safe: `resources()` builds under a lock, the engine's connection pool
and the object store clients are thread-safe, each step opens its own session.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, OperationalError

from captioner.settings import Settings, get_settings
from captioner.state.db import make_engine, make_sessionmaker
from captioner.storage import open_store
from workers.model_runtime import ModelRuntime


class WorkerResources:
    """Engine, session factory, object store, model runtime and fetch pool of one worker
    process, shared by every task it runs at once (each is thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.store = open_store(settings.storage_url, settings)
        self.runtime = ModelRuntime(settings)
        self.fetch_pool = ThreadPoolExecutor(
            max_workers=settings.fetch_threads, thread_name_prefix="fetch"
        )


@dataclass(frozen=True)
class _ResourcesKey:
    """Which database and object store a `WorkerResources` talks to."""

    database_url: str
    storage_url: str


_resources_lock = threading.Lock()
_resources_by_key: dict[_ResourcesKey, WorkerResources] = {}


def resources(settings: Settings | None = None) -> WorkerResources:
    """This process's resources for `settings` (default: the environment's), built once."""
    settings = settings or get_settings()
    key = _ResourcesKey(settings.database_url, settings.storage_url)
    with _resources_lock:
        res = _resources_by_key.get(key)
        if res is None:
            res = _resources_by_key[key] = WorkerResources(settings)
        return res


def worker_id(task) -> str:
    """The lease owner name of this worker process: `<celery hostname>/<pid>`."""
    hostname = getattr(task.request, "hostname", None) or socket.gethostname()
    return f"{hostname}/{os.getpid()}"


def backoff(retries: int) -> float:
    """Seconds before retry number `retries + 1`: 1, 2, 4, ... up to 60, with jitter."""
    return min(60.0, 2.0**retries) * random.uniform(0.75, 1.25)


def is_transient_db_error(exc: BaseException) -> bool:
    """A database error worth retrying: the server went away or the connection broke."""
    return isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )
