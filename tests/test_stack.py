"""Acceptance test of `captioner run` (what `make run` starts): the whole embedded stack as a
subprocess in a temp data dir on non-default ports, with the tiny untrained model (no training).

It must answer, let the printed admin log in, caption the bundled sample collection, stop every
process it started on SIGINT (and SIGTERM), reuse what exists on a second start, and refuse a
port in use with one line naming the port and the setting.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

SAMPLE_IMAGES = len(list((Path(__file__).resolve().parents[1] / "captioner" / "sample").iterdir()))
START_DEADLINE = 240  # seconds: failure deadlines on a loaded machine, not timing assertions
CAPTION_DEADLINE = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RunningStack:
    """`captioner run` as a subprocess, its output collected line by line."""

    def __init__(self, data_dir: Path, port: int, redis_port: int, *extra: str) -> None:
        env = dict(os.environ)
        env.update(
            CAPTIONER_DEVICE="cpu", CAPTIONER_CAPTION_MAX_NEW_TOKENS="8", PYTHONUNBUFFERED="1"
        )
        argv = [
            sys.executable,
            "-m",
            "captioner.cli",
            "run",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--redis-port",
            str(redis_port),
            "--untrained",
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.started: list[psutil.Process] = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, deadline: float) -> re.Match:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader drain
                pytest.fail(f"`captioner run` exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.2)
        pytest.fail(f"no line matching {pattern!r}:\n{self.output}")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=90)
        self._reader.join(timeout=5)
        return code

    def kill_leftovers(self) -> None:
        """After a failed test: nothing may outlive it."""
        procs = self.started + ([] if self.proc.poll() is not None else self.children())
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def still_running(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return left


def login(base: str, email: str, password: str) -> requests.Session:
    http = requests.Session()
    page = http.get(f"{base}/login", timeout=30)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = http.post(
        f"{base}/login",
        data={"email": email, "password": password, "csrf_token": csrf},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 302, r.text[:500]
    me = http.get(f"{base}/api/v1/me", timeout=30)
    assert me.status_code == 200 and me.json()["email"] == email
    return http


def wait_captioned(http: requests.Session, base: str) -> dict:
    jobs = http.get(f"{base}/api/v1/jobs", timeout=30).json()["items"]
    sample = [j for j in jobs if j["name"] == "sample collection"]
    assert len(sample) == 1, jobs
    end = time.monotonic() + CAPTION_DEADLINE
    while time.monotonic() < end:
        job = http.get(f"{base}/api/v1/jobs/{sample[0]['id']}", timeout=30).json()
        if job["status"] == "finished":
            return job
        time.sleep(1)
    pytest.fail(f"sample job not finished: {job}")


def test_run_serves_captions_and_stops_everything_then_reuses_what_exists(tmp_path):
    data_dir = tmp_path / "data"
    port, redis_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"

    stack = RunningStack(data_dir, port, redis_port)
    try:
        creds = stack.wait_for_line(r"login: (\S+)\s+password: (\S+)", START_DEADLINE)
        assert f"Captioner is running: {base}/" in stack.output
        assert "UNTRAINED" in stack.output  # the untrained model is said plainly
        email, password = creds.group(1), creds.group(2)
        stack.started = stack.children()
        commands = [" ".join(p.cmdline()) for p in stack.started]
        for part in (
            "redis-server",
            "captioner.cli serve",
            "captioner.cli worker",
            "captioner.cli beat",
        ):
            assert any(part in c for c in commands), commands
        # Maintenance (sweeper, ingestion, webhooks) on a worker of its own, under time limits.
        maintenance = [c for c in commands if "captioner.cli worker" in c and "maintenance" in c]
        assert maintenance and all("caption" not in c.split("-Q")[1] for c in maintenance)
        assert any(f":{redis_port}" in c or str(redis_port) in c for c in commands)

        http = login(base, email, password)
        job = wait_captioned(http, base)
        assert job["progress"]["captioned"] == SAMPLE_IMAGES and job["progress"]["failed"] == 0
        images = http.get(
            f"{base}/api/v1/jobs/{job['id']}/images", params={"per_page": 50}, timeout=30
        ).json()
        assert len(images["items"]) == SAMPLE_IMAGES
        assert all(
            i["status"] == "captioned" and i["caption"]["text"] is not None for i in images["items"]
        )

        assert requests.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        metrics = requests.get(f"{base}/metrics", timeout=30).text
        assert f'captioner_images{{status="captioned"}} {float(SAMPLE_IMAGES)}' in metrics

        assert stack.stop(signal.SIGINT) == 0, stack.output
        assert still_running(stack.started) == []
        assert not listening(port) and not listening(redis_port)
        assert "stopped" in stack.output
    finally:
        stack.kill_leftovers()

    # A second start reuses the database, the admin account, the model and the sample job.
    again = RunningStack(data_dir, port, redis_port)
    try:
        creds = again.wait_for_line(r"login: (\S+)\s+password: (\S+)", START_DEADLINE)
        assert (creds.group(1), creds.group(2)) == (email, password)
        assert "kept from an earlier run" in again.output
        assert "submitted the sample collection" not in again.output
        again.started = again.children()
        http = login(base, email, password)
        assert len(http.get(f"{base}/api/v1/jobs", timeout=30).json()["items"]) == 1
        assert again.stop(signal.SIGTERM) == 0, again.output
        assert still_running(again.started) == []
        assert not listening(port) and not listening(redis_port)
    finally:
        again.kill_leftovers()


@pytest.mark.parametrize("which", ["dashboard", "redis"])
def test_a_port_in_use_is_refused_with_one_line_naming_port_and_setting(tmp_path, which):
    port, redis_port = free_port(), free_port()
    busy = port if which == "dashboard" else redis_port
    setting = (
        "CAPTIONER_DASHBOARD_PORT" if which == "dashboard" else "CAPTIONER_EMBEDDED_REDIS_PORT"
    )
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "captioner.cli",
                "run",
                "--data-dir",
                str(tmp_path / "d"),
                "--port",
                str(port),
                "--redis-port",
                str(redis_port),
                "--untrained",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    assert out.returncode == 1
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"port {busy}" in lines[0] and setting in lines[0]
    assert not (tmp_path / "d" / "models").exists()  # refused before doing anything


def test_serve_refuses_the_default_secret_key_with_one_line_naming_the_setting(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONER_SECRET_KEY"}
    env["CAPTIONER_DATA_DIR"] = str(tmp_path / "d")
    out = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "serve", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode != 0
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "CAPTIONER_SECRET_KEY" in lines[0], lines
    assert not listening(port)


def test_the_app_factory_gunicorn_loads_refuses_the_default_secret_key(monkeypatch):
    from captioner.settings import DEFAULT_SECRET_KEY, Settings
    from dashboard import InsecureSecretKey, create_app

    monkeypatch.setenv("CAPTIONER_SECRET_KEY", DEFAULT_SECRET_KEY)
    with pytest.raises(InsecureSecretKey, match="CAPTIONER_SECRET_KEY"):
        create_app()
    with pytest.raises(InsecureSecretKey):
        create_app(Settings())


def test_run_generates_a_private_secret_key_once_and_reuses_it(tmp_path, monkeypatch):
    from captioner.cli.stack import session_key
    from captioner.settings import DEFAULT_SECRET_KEY

    monkeypatch.delenv("CAPTIONER_SECRET_KEY", raising=False)
    key = session_key(tmp_path / "d")
    path = tmp_path / "d" / "secret_key"
    assert len(key) >= 32 and key != DEFAULT_SECRET_KEY
    assert path.read_text() == key and (path.stat().st_mode & 0o777) == 0o600
    assert session_key(tmp_path / "d") == key
    # The built-in default in the environment counts as unset; a real key is passed on as is.
    monkeypatch.setenv("CAPTIONER_SECRET_KEY", DEFAULT_SECRET_KEY)
    assert session_key(tmp_path / "d") == key
    monkeypatch.setenv("CAPTIONER_SECRET_KEY", "an operator's own key")
    assert session_key(tmp_path / "d") == "an operator's own key"
