"""A real dashboard HTTP server process for end-to-end and browser tests.

`DashboardProcess(env)` runs `flask --app dashboard:create_app run` (werkzeug, threaded) on a
free loopback port with the given CAPTIONER_* environment, logging to a file, and waits until
it answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without CAPTIONER_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.update(extra)
    env["PYTHONPATH"] = str(REPO)
    return env


class DashboardProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        args = [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "dashboard:create_app",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-reload",
            "--no-debugger",
            "--with-threads",
        ]
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=clean_env(env), stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> DashboardProcess:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/login", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"dashboard did not answer in {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
