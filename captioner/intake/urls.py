"""URL safety and the one bounded, pinned outbound HTTP path, for URL submissions
(`captioner.intake.fetch`) and webhook deliveries (`captioner.webhooks`).

Rules enforced here, each with a test: http or https only; at most `URL_MAX_LENGTH` characters
at submit (what `Image.original_name` stores); the host must resolve only to public addresses
(private, loopback, link-local, site-local, 6to4, multicast, reserved, and IPv4-mapped or NAT64
forms of private IPv4 are refused) unless the operator listed it in the caller's allow-list
(`url_allow_hosts` for URL fetches, `webhook_allow_hosts` for webhooks); every redirect is
checked again; a total time limit and a body cap apply to every request (`request`).

`check_url` resolves a host name and refuses it unless every address is public (or the operator
allow-listed it). If `requests` were then left to connect on its own it would resolve the name
a second time, and a hostile DNS server could answer 127.0.0.1 the second time. Here the name is
resolved once per hop, every address is checked, and the connection goes to one of those checked
addresses: `PinnedAdapter` rewrites only the TCP target. The request keeps the original Host
header and, for https, the original name for SNI and certificate verification. Each redirect hop
is checked and pinned the same way.

Bounds (`Limits`): one deadline for the whole request (connect, TLS handshake, every redirect
hop, headers and body): every socket read and write waits at most until the deadline
(`DeadlineSocket`), so a server that drips one byte at a time is cut at the deadline, not after
one timeout per read; a TLS handshake gets only the time left after the connect, so a server
that accepts and never answers the ClientHello is cut at the deadline too.
The body read is capped: URL fetches decode `Content-Encoding` as the bytes stream and refuse
past `max_image_bytes` of decoded bytes; webhook replies are read raw (never decompressed) and
cut at a few KiB.

The dashboard checks submitted URLs without DNS (`check_url(..., resolve=False)`); a worker
then fetches them (`captioner.intake.fetch.run_fetch_urls`). URLs in error messages and logs
are redacted to scheme, host and path (`redact`): no credentials, query or fragment.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError

from captioner.intake.errors import SubmissionRejected, TooLarge, UnsafeURL
from captioner.settings import get_settings
from captioner.state.models import Image

if TYPE_CHECKING:
    from captioner.settings import Settings


Resolver = Callable[[str, int], list[str]]

# A submitted URL is stored as the image's original name: no longer than that column.
URL_MAX_LENGTH: int = Image.__table__.c.original_name.type.length
# Bytes read from a response per step of the body loop.
READ_STEP = 64 * 1024
# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local use): the IPv4 address is the last 32 bits.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# IPv6 ranges that are not public although Python's `is_global` says they are.
_NOT_PUBLIC_V6 = (
    ipaddress.ip_network("2002::/16"),  # 6to4: tunnels to any IPv4, private ones included
    ipaddress.ip_network("fec0::/10"),  # site-local (deprecated, still routed on some LANs)
)


# --- URL safety -------------------------------------------------------------------------------


def redact(url: str) -> str:
    """`url` with only its scheme, host (and port) and path: no userinfo, query or fragment,
    which may carry credentials. For logs and stored error messages."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _allowed_by_operator(host: str, addresses: Sequence[str], allow: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    networks = []
    for entry in allow:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == host:
            return True
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    if not networks or not addresses:
        return False
    return all(any(ipaddress.ip_address(a) in n for n in networks) for a in addresses)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not _is_public(str(embedded)):
            return False
        if ip.ipv4_mapped is not None:
            return True  # judged by its IPv4 address alone
        if any(ip in net for net in _NOT_PUBLIC_V6):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURL(f"cannot resolve host {host!r}: {exc}") from None
    return sorted({info[4][0].split("%", 1)[0] for info in infos})


def check_url(
    url: str,
    *,
    allow_hosts: Sequence[str] = (),
    resolve: bool = True,
    resolver: Resolver | None = None,
    max_length: int | None = URL_MAX_LENGTH,
) -> str:
    """`url` if it is http(s) to a public address (or an allow-listed host); else UnsafeURL.
    A URL longer than `max_length` (what the database stores) is refused (SubmissionRejected).

    With `resolve=False` only the scheme and a literal IP host are checked (fast, for a
    submit of thousands of URLs); the fetch checks again with DNS before connecting.
    """
    url = url.strip()
    if max_length is not None and len(url) > max_length:
        raise SubmissionRejected(
            f"URL too long: {len(url)} characters > limit {max_length} ({redact(url)[:80]!r}...)"
        )
    target = _http_target(url)
    literal = _literal_address(target.host)
    if literal is None and not resolve:
        _refuse_loopback_name(url, target.host, allow_hosts)
        return url
    addresses = literal or (resolver or resolve_host)(target.host, target.port)
    if _allowed_by_operator(target.host, addresses, allow_hosts):
        return url
    bad = [a for a in addresses if not _is_public(a)]
    if bad or not addresses:
        raise UnsafeURL(
            f"refused URL {redact(url)!r}: {target.host} resolves to a private, loopback or "
            f"link-local address ({', '.join(bad) or 'none'})"
        )
    return url


@dataclass(frozen=True)
class HttpTarget:
    """Where an http(s) URL points: its host (a name or a literal address) and TCP port."""

    host: str
    port: int


def _http_target(url: str) -> HttpTarget:
    """The host and port of an http(s) URL; UnsafeURL for anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeURL(f"invalid URL {redact(url)!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"refused URL {redact(url)!r}: only http and https are allowed")
    if not parts.hostname:
        raise UnsafeURL(f"refused URL {redact(url)!r}: no host")
    return HttpTarget(host=parts.hostname, port=port)


def _literal_address(host: str) -> list[str] | None:
    """`[host]` when the host is an IP address, else None (a name)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        return None


def _refuse_loopback_name(url: str, host: str, allow_hosts: Sequence[str]) -> None:
    """Without DNS, at least `localhost` names are refused unless allow-listed."""
    name = host.lower().rstrip(".")
    if (name == "localhost" or host.lower().endswith(".localhost")) and not _allowed_by_operator(
        host, [], allow_hosts
    ):
        raise UnsafeURL(f"refused URL {redact(url)!r}: {host} is a loopback name")


def checked_addresses(
    url: str, *, allow_hosts: Sequence[str] = (), resolver: Resolver | None = None
) -> list[str]:
    """Check `url` like `check_url` (same errors, no length limit: a redirect may be long)
    and return the addresses it checked.

    The host is resolved exactly once; the caller must connect only to what is returned.
    """
    seen: list[str] = []

    def recording(host: str, port: int) -> list[str]:
        addresses = list((resolver or resolve_host)(host, port))
        seen[:] = addresses
        return addresses

    check_url(url, allow_hosts=allow_hosts, resolver=recording, max_length=None)
    host = urlsplit(url.strip()).hostname or ""
    try:
        return [str(ipaddress.ip_address(host))]  # a literal: check_url did not resolve
    except ValueError:
        pass
    if not seen:  # cannot happen with a name check_url accepted; refuse rather than re-resolve
        raise UnsafeURL(f"refused URL {redact(url)!r}: {host} resolves to no address")
    return seen


# --- a deadline on every socket operation -----------------------------------------------------


class DeadlineSocket:
    """A connected socket whose every read and write waits at most until `deadline`
    (a `time.monotonic()` value): the per-operation timeout is the time left, so however slowly
    a peer drips bytes, the request ends at the deadline with a socket timeout."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._cap = sock.gettimeout()

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left if self._cap is None else min(self._cap, left))

    def settimeout(self, value: float | None) -> None:
        self._cap = value
        self._arm()

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return self._sock.recv(bufsize, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._arm()
        return self._sock.send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        self._sock.sendall(data, flags)

    def makefile(self, mode: str = "r", buffering: int | None = None, **_: Any) -> io.IOBase:
        """A buffered reader whose reads go through `recv_into` above (http.client reads the
        status line, headers and body through it)."""
        if set(mode) - {"r", "b"}:
            raise ValueError(f"only reading is supported, not mode {mode!r}")
        self._sock._io_refs += 1  # type: ignore[attr-defined]  # as socket.makefile does
        raw = socket.SocketIO(self, "r")  # type: ignore[arg-type]
        size = io.DEFAULT_BUFFER_SIZE if buffering in (None, -1, 0) else buffering
        return io.BufferedReader(raw, size)

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineConnection(HTTPConnection):
    def __init__(self, *args: Any, deadline: float, **kwargs: Any) -> None:
        self.deadline = deadline
        super().__init__(*args, **kwargs)

    def connect(self) -> None:
        super().connect()
        self.sock = DeadlineSocket(self.sock, self.deadline)  # type: ignore[assignment]


class _DeadlineHTTPSConnection(HTTPSConnection):
    def __init__(self, *args: Any, deadline: float, **kwargs: Any) -> None:
        self.deadline = deadline
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        """The TCP connection, its timeout then cut to the time left: the TLS handshake that
        follows is one operation in CPython's ssl, bounded as a whole by the socket's timeout
        when it starts, so a server that accepts and never answers the ClientHello (or drips
        its reply) is left at the deadline. Past the deadline already, no handshake starts."""
        sock = super()._new_conn()
        left = self.deadline - time.monotonic()
        if left <= 0:
            sock.close()
            raise TimeoutError("timed out before the TLS handshake")
        cap = sock.gettimeout()
        sock.settimeout(left if cap is None else min(cap, left))
        return sock

    def connect(self) -> None:
        super().connect()
        self.sock = DeadlineSocket(self.sock, self.deadline)  # type: ignore[assignment]


# --- pinned HTTP ------------------------------------------------------------------------------


class PinnedAdapter(HTTPAdapter):
    """An adapter that sends requests for `hostname` to the already checked `address`.

    Only the socket's target changes: the pool is keyed on (scheme, address, port), the Host
    header names `hostname` (and the port when it is not the default), and for https the TLS
    server name (SNI) and the certificate check use `hostname`, never the IP. A request for any
    other host is refused, so a redirect followed by mistake cannot escape the pin. With a
    `deadline`, every socket read and write of its connections ends by then (`DeadlineSocket`),
    and so does an https connection's TLS handshake.
    """

    def __init__(
        self, hostname: str, address: str, *, deadline: float | None = None, **kwargs: Any
    ) -> None:
        self.hostname = hostname.lower().rstrip(".")
        self.address = str(ipaddress.ip_address(address.split("%", 1)[0]))
        self.deadline = deadline
        super().__init__(max_retries=0, **kwargs)

    def _check_host(self, request: requests.PreparedRequest) -> None:
        host = (urlsplit(request.url or "").hostname or "").lower().rstrip(".")
        if host != self.hostname:
            raise requests.exceptions.InvalidURL(
                f"pinned to {self.hostname!r}, refused a request for {host!r}", request=request
            )

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        self._check_host(request)
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        name = host_params["host"]
        host_params["host"] = self.address
        if host_params["scheme"] == "https":
            # urllib3 drops these for plain http pools; they are part of the pool key.
            pool_kwargs["server_hostname"] = name
            pool_kwargs["assert_hostname"] = name if verify is not False else False
        return host_params, pool_kwargs

    def get_connection_with_tls_context(self, request: Any, verify: Any, *args: Any, **kw: Any):  # type: ignore[override]
        pool = super().get_connection_with_tls_context(request, verify, *args, **kw)
        if self.deadline is not None:
            https = pool.scheme == "https"
            pool.ConnectionCls = _DeadlineHTTPSConnection if https else _DeadlineConnection
            pool.conn_kw["deadline"] = self.deadline
        return pool

    def add_headers(self, request: requests.PreparedRequest, **kwargs: Any) -> None:
        super().add_headers(request, **kwargs)
        request.headers["Host"] = host_header(request.url or "")

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any):  # type: ignore[override]
        self._check_host(request)
        if kwargs.get("proxies"):
            # A proxy would connect on its own and resolve the name again.
            kwargs["proxies"] = {}
        return super().send(request, *args, **kwargs)


def host_header(url: str) -> str:
    """The Host header a client would send for `url` (port only when not the default)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    if parts.port is not None and parts.port != default:
        host = f"{host}:{parts.port}"
    return host


# --- the bounded request ----------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The bounds of one outbound request."""

    seconds: float  # total: connect, every redirect hop, headers and body
    max_bytes: int  # most response body bytes kept
    decode: bool = False  # decode Content-Encoding as it streams (the cap counts decoded bytes)
    truncate: bool = False  # past `max_bytes`: keep the first bytes (else TooLarge)
    max_redirects: int = 0  # redirects followed, each checked and pinned again; 0: none


@dataclass(frozen=True)
class Reply:
    """A response: its status, the body read (2xx only, within the limits) and the URL that
    answered (after redirects)."""

    status: int
    body: bytes
    url: str


class RequestFailed(SubmissionRejected):
    """An outbound request that got no usable response: timed out, connection failed, too many
    redirects. `reason` names the redacted URL."""


def request(
    method: str,
    url: str,
    *,
    allow_hosts: Sequence[str],
    limits: Limits,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    resolver: Resolver | None = None,
) -> Reply:
    """One outbound request within `limits`: every hop checked and pinned to a checked address,
    one deadline for all of it, the body capped. Raises UnsafeURL for a refused hop, TooLarge
    past the cap (unless `limits.truncate`) and RequestFailed for anything else."""
    deadline = time.monotonic() + limits.seconds
    current = url.strip()
    sent_headers = {"Accept-Encoding": "identity", **(headers or {})}
    with requests.Session() as http:
        http.trust_env = False  # no proxies from the environment: we connect to the checked IP
        for _hop in range(limits.max_redirects + 1):
            addresses = checked_addresses(current, allow_hosts=allow_hosts, resolver=resolver)
            prepared = http.prepare_request(
                requests.Request(method, current, data=data, headers=sent_headers)
            )
            try:
                response = _send(http, prepared, addresses, deadline)
                with response:
                    if not (limits.max_redirects and response.is_redirect):
                        return Reply(response.status_code, _body(response, limits), current)
                    location = response.headers.get("Location", "")
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise RequestFailed(_failure(method, url, exc, deadline)) from None
            current = urljoin(current, location)
            if method == "POST":
                method, data = "GET", None  # as browsers do after 301/302/303
    raise RequestFailed(f"{redact(url)}: more than {limits.max_redirects} redirects")


def _failure(method: str, url: str, exc: BaseException, deadline: float) -> str:
    """Why a request failed, for people: `timed out` or the exception's kind (never its text,
    which may repeat the URL with its query)."""
    if time.monotonic() >= deadline or _timed_out(exc):
        return f"{redact(url)}: timed out"
    what = "fetch" if method == "GET" else method
    return f"{redact(url)}: {what} failed: {type(exc).__name__}"


def _timed_out(exc: BaseException | None) -> bool:
    """True when `exc` or one of the exceptions it wraps is a timeout."""
    kinds = (TimeoutError, requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)
    for _ in range(10):
        if exc is None:
            return False
        # urllib3's NewConnectionError (connection refused, unreachable) subclasses its
        # TimeoutError; only its cause says whether it timed out.
        if isinstance(exc, kinds) and not isinstance(exc, urllib3.exceptions.NewConnectionError):
            return True
        inner = [exc.__cause__, exc.__context__, getattr(exc, "reason", None), *exc.args]
        exc = next((e for e in inner if isinstance(e, BaseException)), None)
    return False


def _connect_failed(exc: requests.RequestException) -> bool:
    """True when nothing was sent: the TCP connect itself failed (refused, unreachable, timed out)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError) or not exc.args:
        return False
    return isinstance(getattr(exc.args[0], "reason", None), ConnectTimeoutError)


def _send(
    http: requests.Session,
    prepared: requests.PreparedRequest,
    addresses: Sequence[str],
    deadline: float,
) -> requests.Response:
    """Send `prepared` (no redirects followed, body not read yet) through a `PinnedAdapter` to
    the first of the checked `addresses` that accepts the connection, all within `deadline`.
    The adapter stays mounted for the response; the session closes it."""
    hostname = urlsplit(prepared.url or "").hostname or ""
    for index, address in enumerate(addresses):
        left = deadline - time.monotonic()
        if left <= 0:
            raise requests.exceptions.Timeout("timed out")
        previous = http.adapters.get("https://")
        if isinstance(previous, PinnedAdapter):
            previous.close()
        adapter = PinnedAdapter(hostname, address, deadline=deadline)
        http.mount("http://", adapter)
        http.mount("https://", adapter)
        try:
            return http.send(prepared, allow_redirects=False, timeout=left, stream=True)
        except requests.RequestException as exc:
            if not (_connect_failed(exc) and index + 1 < len(addresses)):
                raise
    raise requests.exceptions.ConnectionError("no address to connect to")


def _body(response: requests.Response, limits: Limits) -> bytes:
    """The body of a 2xx response within `limits` (b"" for any other status: not read)."""
    if not 200 <= response.status_code < 300:
        return b""
    declared = response.headers.get("Content-Length", "")
    if not limits.truncate and declared.isdigit() and int(declared) > limits.max_bytes:
        raise TooLarge(f"{redact(response.url)}: {declared} bytes > limit {limits.max_bytes}")
    body = bytearray()
    while len(body) <= limits.max_bytes:
        # urllib3 decodes at most the bytes asked for, so a compressed bomb never inflates
        # past the cap; without `decode` the raw (possibly compressed) bytes are kept.
        chunk = response.raw.read(
            min(READ_STEP, limits.max_bytes + 1 - len(body)), decode_content=limits.decode
        )
        if not chunk:
            return bytes(body)
        body += chunk
    if limits.truncate:
        return bytes(body[: limits.max_bytes])
    raise TooLarge(f"{redact(response.url)}: larger than {limits.max_bytes} bytes")


def fetch_url(
    url: str, settings: Settings | None = None, *, resolver: Resolver | None = None
) -> bytes:
    """GET an image URL within `url_fetch_timeout_seconds` (in total) and `max_image_bytes`
    (decoded), following at most `url_fetch_max_redirects` checked redirects; the body.
    Raises UnsafeURL for a refused hop, TooLarge past the size limit and SubmissionRejected for
    any other failure (with the reason)."""
    settings = settings or get_settings()
    limits = Limits(
        seconds=settings.url_fetch_timeout_seconds,
        max_bytes=settings.max_image_bytes,
        decode=True,
        max_redirects=settings.url_fetch_max_redirects,
    )
    reply = request(
        "GET", url, allow_hosts=settings.url_allow_hosts, limits=limits, resolver=resolver
    )
    if reply.status == 200:
        return reply.body
    if 300 <= reply.status < 400 and limits.max_redirects == 0:
        raise SubmissionRejected(f"{redact(url)}: more than 0 redirects")
    raise SubmissionRejected(f"{redact(url)}: HTTP {reply.status}")
