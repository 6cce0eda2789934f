"""The TLS handshake of an outbound https request is bounded by the request's one deadline.

A loopback server accepts the TCP connection and never answers the ClientHello. The request
must end with the deadline's error (`RequestFailed`, "timed out"), and the handshake must get
only the time left after the connect: a slow connect is simulated by a clock that jumps while
connecting, so no test waits out a long timeout or asserts a duration.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from types import SimpleNamespace

import pytest
import urllib3.util.connection

from captioner.intake import urls


class StallingServer:
    """Accepts TCP connections on loopback and never writes a byte; records what each client
    sent before it hung up (`received`, one entry per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:  # closed before anyone connected
            return
        got = b""
        with conn:
            conn.settimeout(30)
            try:
                while chunk := conn.recv(65536):
                    got += chunk
            except OSError:
                pass
        self.received.append(got)
        self.done.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stalling():
    server = StallingServer()
    yield server
    server.close()


def _get(port: int, seconds: float) -> None:
    limits = urls.Limits(seconds=seconds, max_bytes=1024)
    urls.request("GET", f"https://127.0.0.1:{port}/x", allow_hosts=["127.0.0.1"], limits=limits)


class JumpingClock:
    """`time.monotonic` for the urls module that jumps `jump` seconds while a TCP connect is
    made: a connect that took that long, without waiting for it."""

    def __init__(self, monkeypatch, jump: float) -> None:
        self.offset = 0.0
        real_connect = urllib3.util.connection.create_connection

        def slow_connect(*args, **kwargs):
            sock = real_connect(*args, **kwargs)
            self.offset += jump
            return sock

        monkeypatch.setattr(urllib3.util.connection, "create_connection", slow_connect)
        clock = SimpleNamespace(monotonic=lambda: time.monotonic() + self.offset)
        monkeypatch.setattr(urls, "time", clock)


def test_a_handshake_that_never_answers_ends_with_the_deadline_error(stalling):
    with pytest.raises(urls.RequestFailed, match="timed out"):
        _get(stalling.port, seconds=1.0)
    assert stalling.done.wait(10)
    assert stalling.received[0][:1] == b"\x16"  # the ClientHello (a TLS handshake record)


def test_no_handshake_starts_once_the_connect_used_up_the_deadline(monkeypatch, stalling):
    JumpingClock(monkeypatch, jump=60.0)
    with pytest.raises(urls.RequestFailed, match="timed out"):
        _get(stalling.port, seconds=30.0)
    assert stalling.done.wait(10)
    assert stalling.received == [b""]  # hung up without sending a ClientHello


def test_the_handshake_gets_only_the_time_left_after_the_connect(monkeypatch, stalling):
    """30 s in all, 29 of them spent connecting: the handshake may wait 1 s, not 30."""
    JumpingClock(monkeypatch, jump=29.0)
    handshake_timeouts: list[float | None] = []
    real_wrap = ssl.SSLContext.wrap_socket

    def wrap_socket(self, sock, *args, **kwargs):
        handshake_timeouts.append(sock.gettimeout())
        return real_wrap(self, sock, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "wrap_socket", wrap_socket)
    with pytest.raises(urls.RequestFailed, match="timed out"):
        _get(stalling.port, seconds=30.0)
    [timeout] = handshake_timeouts
    assert timeout is not None and 0 < timeout <= 1.0
