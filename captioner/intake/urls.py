"""URL safety and pinned HTTP without a DNS-rebinding window, for URL submissions
(`captioner.intake.fetch`) and webhook deliveries (`captioner.webhooks`).

Rules enforced here, each with a test: http or https only; the host must resolve only to public
addresses (private, loopback, link-local, multicast, reserved are refused) unless the operator
listed it in `url_allow_hosts`; every redirect is checked again; size and time limits apply.

`check_url` resolves a host name and refuses it unless every address is public (or the operator
allow-listed it). If `requests` were then left to connect on its own it would resolve the name
a second time, and a hostile DNS server could answer 127.0.0.1 the second time. Here the name is
resolved once per hop, every address is checked, and the connection goes to one of those checked
addresses: `PinnedAdapter` rewrites only the TCP target. The request keeps the original Host
header and, for https, the original name for SNI and certificate verification. Each redirect hop
is checked and pinned the same way. Webhook deliveries (`captioner.webhooks`) post through the
same pin.

The dashboard checks submitted URLs without DNS (`check_url(..., resolve=False)`); a worker
then fetches them (`captioner.intake.fetch.run_fetch_urls`).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError

from captioner.intake.errors import SubmissionRejected, TooLarge, UnsafeURL
from captioner.settings import get_settings

if TYPE_CHECKING:
    from captioner.settings import Settings


Resolver = Callable[[str, int], list[str]]
# URLs fetched per transaction by the background task.


# --- URL safety -------------------------------------------------------------------------------


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


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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
) -> str:
    """`url` if it is http(s) to a public address (or an allow-listed host); else UnsafeURL.

    With `resolve=False` only the scheme and a literal IP host are checked (fast, for a
    submit of thousands of URLs); the fetch checks again with DNS before connecting.
    """
    target = _http_target(url)
    literal = _literal_address(target.host)
    if literal is None and not resolve:
        _refuse_loopback_name(url, target.host, allow_hosts)
        return url.strip()
    addresses = literal or (resolver or resolve_host)(target.host, target.port)
    if _allowed_by_operator(target.host, addresses, allow_hosts):
        return url.strip()
    bad = [a for a in addresses if not _is_public(a)]
    if bad or not addresses:
        raise UnsafeURL(
            f"refused URL {url!r}: {target.host} resolves to a private, loopback or link-local "
            f"address ({', '.join(bad) or 'none'})"
        )
    return url.strip()


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
        raise UnsafeURL(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"refused URL {url!r}: only http and https are allowed")
    if not parts.hostname:
        raise UnsafeURL(f"refused URL {url!r}: no host")
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
        raise UnsafeURL(f"refused URL {url!r}: {host} is a loopback name")


# --- pinned HTTP ------------------------------------------------------------------------------


class PinnedAdapter(HTTPAdapter):
    """An adapter that sends requests for `hostname` to the already checked `address`.

    Only the socket's target changes: the pool is keyed on (scheme, address, port), the Host
    header names `hostname` (and the port when it is not the default), and for https the TLS
    server name (SNI) and the certificate check use `hostname`, never the IP. A request for any
    other host is refused, so a redirect followed by mistake cannot escape the pin.
    """

    def __init__(self, hostname: str, address: str, **kwargs: Any) -> None:
        self.hostname = hostname.lower().rstrip(".")
        self.address = str(ipaddress.ip_address(address.split("%", 1)[0]))
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


def checked_addresses(
    url: str, *, allow_hosts: Sequence[str] = (), resolver: Resolver | None = None
) -> list[str]:
    """Check `url` like `check_url` (same errors) and return the addresses it checked.

    The host is resolved exactly once; the caller must connect only to what is returned.
    """
    seen: list[str] = []

    def recording(host: str, port: int) -> list[str]:
        addresses = list((resolver or resolve_host)(host, port))
        seen[:] = addresses
        return addresses

    check_url(url, allow_hosts=allow_hosts, resolver=recording)
    host = urlsplit(url.strip()).hostname or ""
    try:
        return [str(ipaddress.ip_address(host))]  # a literal: check_url did not resolve
    except ValueError:
        pass
    if not seen:  # cannot happen with a name check_url accepted; refuse rather than re-resolve
        raise UnsafeURL(f"refused URL {url!r}: {host} resolves to no address")
    return seen


def _connect_failed(exc: requests.RequestException) -> bool:
    """True when nothing was sent: the TCP connect itself failed (refused, unreachable, timed out)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError) or not exc.args:
        return False
    return isinstance(getattr(exc.args[0], "reason", None), ConnectTimeoutError)


def fetch_url(
    url: str, settings: Settings | None = None, *, resolver: Resolver | None = None
) -> bytes:
    """GET `url`: every hop checked and pinned to a checked address, a total time limit and a
    size cap; returns the body. Raises UnsafeURL for a refused hop, TooLarge past the size
    limit and SubmissionRejected for any other failure (with the reason)."""
    settings = settings or get_settings()
    deadline = time.monotonic() + settings.url_fetch_timeout_seconds
    limit = settings.max_image_bytes

    def timeout() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SubmissionRejected(f"{url}: timed out")
        return min(remaining, 30)

    current = url
    with requests.Session() as http:
        http.trust_env = False  # no proxies from the environment: we connect to the checked IP
        for _hop in range(settings.url_fetch_max_redirects + 1):
            addresses = checked_addresses(
                current, allow_hosts=settings.url_allow_hosts, resolver=resolver
            )
            try:
                prepared = http.prepare_request(requests.Request("GET", current.strip()))
                response = _send(http, prepared, addresses, timeout, stream=True)
            except requests.RequestException as exc:
                raise SubmissionRejected(f"{url}: fetch failed: {type(exc).__name__}") from None
            with response:
                if not response.is_redirect:
                    return _read_body(url, response, limit, deadline)
                current = urljoin(current, response.headers.get("Location", ""))
        raise SubmissionRejected(f"{url}: more than {settings.url_fetch_max_redirects} redirects")


def post(url: str, addresses: Sequence[str], **kwargs: Any) -> requests.Response:
    """POST to `url`, connecting only to `addresses` (from `checked_addresses`). No redirects
    are followed; the response body is read."""
    kwargs.pop("allow_redirects", None)
    limit = kwargs.pop("timeout", None)
    with requests.Session() as http:
        http.trust_env = False
        request = requests.Request(
            "POST", url.strip(), data=kwargs.pop("data", None), headers=kwargs.pop("headers", None)
        )
        return _send(http, http.prepare_request(request), addresses, lambda: limit, **kwargs)


def _send(
    http: requests.Session,
    prepared: requests.PreparedRequest,
    addresses: Sequence[str],
    timeout: Callable[[], float | None],
    **kwargs: Any,
) -> requests.Response:
    """Send `prepared` (no redirects followed) through a `PinnedAdapter` to the first of the
    checked `addresses` that accepts the connection; `timeout()` is asked before each try.
    The adapter stays mounted for the response; the session closes it."""
    hostname = urlsplit(prepared.url or "").hostname or ""
    for index, address in enumerate(addresses):
        wait = timeout()
        previous = http.adapters.get("https://")
        if isinstance(previous, PinnedAdapter):
            previous.close()
        adapter = PinnedAdapter(hostname, address)
        http.mount("http://", adapter)
        http.mount("https://", adapter)
        try:
            return http.send(prepared, allow_redirects=False, timeout=wait, **kwargs)
        except requests.RequestException as exc:
            if not (_connect_failed(exc) and index + 1 < len(addresses)):
                raise
    raise requests.exceptions.ConnectionError(f"{prepared.url}: no address to connect to")


def _read_body(url: str, response: requests.Response, limit: int, deadline: float) -> bytes:
    if response.status_code != 200:
        raise SubmissionRejected(f"{url}: HTTP {response.status_code}")
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{url}: {declared} bytes > limit {limit}")
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body.extend(chunk)
        if len(body) > limit:
            raise TooLarge(f"{url}: larger than {limit} bytes")
        if time.monotonic() > deadline:
            raise SubmissionRejected(f"{url}: timed out")
    return bytes(body)
