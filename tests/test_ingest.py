"""Ingest rules: zip checks, URL address rules (every redirect re-checked), fetch, prefix."""

from __future__ import annotations

import functools
import io
import itertools
import json
import threading
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from conftest import PUBLIC_IP
from dashboard_helpers import ReadCountingStore, make_zip, png

from captioner import webhooks
from captioner.intake import errors, fetch, prefixes, uploads, urls
from captioner.settings import Settings
from captioner.state import jobs
from captioner.state.db import make_sessionmaker, session_scope
from captioner.state.models import (
    Image,
    ImageStatus,
    Job,
    JobStatus,
    User,
    Webhook,
    WebhookDelivery,
    WebhookStatus,
)
from captioner.storage import LocalObjectStore


@pytest.fixture
def http_server():
    """A loopback HTTP server: /img.png serves a PNG, /to?u=URL redirects there, /big is big."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/img.png":
                body = png()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path.startswith("/to?u="):
                self.send_response(302)
                self.send_header("Location", self.path[len("/to?u=") :])
                self.end_headers()
            elif self.path == "/big":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * 5000)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def settings(**kw) -> Settings:
    return Settings(**kw)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://169.254.169.254/latest",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://192.168.1.1/",
        "http://[fe80::1]/",
        "ftp://example.com/x",
    ],
)
def test_unsafe_urls_refused(url):
    with pytest.raises(errors.UnsafeURL):
        urls.check_url(url)


def test_names_resolving_to_private_addresses_refused():
    with pytest.raises(errors.UnsafeURL, match="private, loopback or link-local"):
        urls.check_url("http://metadata.example/", resolver=lambda h, p: ["169.254.169.254"])
    assert urls.check_url("http://public.example/a.png", resolver=lambda h, p: ["93.184.215.14"])
    with pytest.raises(errors.UnsafeURL):  # one bad address among good ones is enough
        urls.check_url("http://mixed.example/", resolver=lambda h, p: ["93.184.215.14", "10.0.0.1"])


def test_loopback_fetch_refused_unless_allow_listed(http_server):
    with pytest.raises(errors.UnsafeURL):
        urls.fetch_url(http_server + "/img.png", settings())
    data = urls.fetch_url(http_server + "/img.png", settings(url_allow_hosts=["127.0.0.1"]))
    assert data == png()


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.5/x.png", "file:///etc/passwd"],
)
def test_redirect_to_private_address_refused(http_server, target):
    s = settings(url_allow_hosts=["127.0.0.1"])
    with pytest.raises(errors.UnsafeURL):
        urls.fetch_url(f"{http_server}/to?u={target}", s)


def test_fetch_size_limit_and_redirect_cap(http_server):
    s = settings(url_allow_hosts=["127.0.0.1"], max_image_bytes=1000)
    with pytest.raises(errors.TooLarge):
        urls.fetch_url(http_server + "/big", s)
    s = settings(url_allow_hosts=["127.0.0.1"], url_fetch_max_redirects=0)
    with pytest.raises(errors.SubmissionRejected, match="redirects"):
        urls.fetch_url(f"{http_server}/to?u={http_server}/img.png", s)


def test_fetch_urls_stores_good_and_fails_bad_with_reason(session, tmp_path, http_server):
    store = LocalObjectStore(tmp_path / "objects")
    job = jobs.create_job(session, "urls")
    s = settings(url_allow_hosts=["127.0.0.1"])
    job_urls = [
        http_server + "/img.png",
        http_server + "/missing.png",
        f"{http_server}/to?u=http://169.254.169.254/",
    ]
    queued = fetch.fetch_urls(session, job.id, job_urls, store=store, settings=s)
    assert len(queued) == 1
    rows = {i.original_name: i for i in session.query(Image).filter_by(job_id=job.id)}
    assert (
        rows[job_urls[0]].status == ImageStatus.QUEUED
        and store.get(rows[job_urls[0]].storage_key) == png()
    )
    assert rows[job_urls[1]].failure_reason.endswith("HTTP 404")
    assert "refused URL" in rows[job_urls[2]].failure_reason
    # Idempotent: a second run adds nothing.
    assert fetch.fetch_urls(session, job.id, job_urls, store=store, settings=s) == []


def test_enumerate_prefix_pages_and_publishes(engine, object_store, monkeypatch):
    store = object_store  # a directory, and a bucket on the S3 server (listed in a child)
    for i in range(5):
        store.put(f"photos/{i}.jpg", b"x")
    store.put("photos/readme.txt", b"x")
    store.put("other/9.jpg", b"x")
    factory = make_sessionmaker(engine)
    with session_scope(factory) as session:
        job_id = jobs.create_job(session, "p", options={"prefix": "photos/"}).id
    monkeypatch.setattr(prefixes, "PAGE_SIZE", 2)
    sent = []
    total = prefixes.run_enumerate_prefix(
        job_id,
        session_factory=factory,
        store=store,
        settings=settings(),
        publish=lambda j, ids: sent.append(ids),
    )
    assert total == 5 and [len(ids) for ids in sent] == [2, 2, 1]
    with factory() as session:
        stored = session.query(Image.storage_key, Image.external_id).filter_by(job_id=job_id)
        keys = [f"photos/{i}.jpg" for i in range(5)]
        assert sorted(stored) == [(key, key) for key in keys]


def _owner_with_hook(factory, url: str) -> int:
    with session_scope(factory) as session:
        user = User(email="owner@example.com")
        session.add(user)
        session.flush()
        session.add(Webhook(owner_id=user.id, url=url, secret="s3cret", events=[]))
        return user.id


def _deliver(factory, delivery_ids, s: Settings) -> list[tuple[str, dict]]:
    """Deliver published ids as the webhook task does; returns (event header, body) per POST."""
    posts = []

    def post(url, data, headers, **kw):
        posts.append((headers[webhooks.EVENT_HEADER], json.loads(data)))
        return SimpleNamespace(status=200)

    for delivery_id in delivery_ids:
        assert (
            webhooks.deliver(factory, delivery_id, settings=s, post=post).status
            == WebhookStatus.DELIVERED
        )
    return posts


def test_url_job_where_every_url_fails_is_finished_with_a_job_failed_webhook(
    engine, tmp_path, http_server
):
    factory = make_sessionmaker(engine)
    owner_id = _owner_with_hook(factory, http_server + "/hook")
    job_urls = [http_server + "/missing.png", f"{http_server}/to?u=http://169.254.169.254/"]
    with session_scope(factory) as session:
        job_id = jobs.create_job(session, "urls", owner_id=owner_id, options={"urls": job_urls}).id
    s = settings(url_allow_hosts=["127.0.0.1"])
    sent, published = [], []
    total = fetch.run_fetch_urls(
        job_id,
        session_factory=factory,
        store=LocalObjectStore(tmp_path / "o"),
        settings=s,
        publish=lambda j, ids: sent.append(ids),
        publish_deliveries=published.extend,
    )
    assert total == 0 and sent == []
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.FINISHED and (job.image_count, job.failed_count) == (2, 2)
        [delivery] = session.query(WebhookDelivery).filter_by(job_id=job_id).all()
        assert delivery.event == "job.failed" and published == [delivery.id]
    [(event, body)] = _deliver(factory, published, s)
    assert (
        event == "job.failed" and body["job"]["id"] == job_id and body["job"]["failed_count"] == 2
    )
    # The same task again (a redelivery) records and publishes nothing more.
    fetch.run_fetch_urls(
        job_id,
        session_factory=factory,
        store=LocalObjectStore(tmp_path / "o"),
        settings=s,
        publish=lambda j, ids: sent.append(ids),
        publish_deliveries=published.extend,
    )
    assert len(published) == 1 and sent == []


def test_url_job_is_not_finished_while_urls_are_left_to_fetch(engine, tmp_path, http_server):
    factory = make_sessionmaker(engine)
    owner_id = _owner_with_hook(factory, http_server + "/hook")
    job_urls = [f"{http_server}/missing{i}.png" for i in range(50)] + [http_server + "/img.png"]
    with session_scope(factory) as session:
        job_id = jobs.create_job(session, "urls", owner_id=owner_id, options={"urls": job_urls}).id
    sent, published = [], []
    total = fetch.run_fetch_urls(
        job_id,
        session_factory=factory,
        store=LocalObjectStore(tmp_path / "o"),
        settings=settings(url_allow_hosts=["127.0.0.1"]),
        publish=lambda j, ids: sent.append(ids),
        publish_deliveries=published.extend,
    )
    # The first chunk failed entirely, but the job goes on: no premature job.failed.
    assert total == 1 and len(sent) == 1 and published == []
    with factory() as session:
        assert session.get(Job, job_id).status != JobStatus.FINISHED
        assert session.query(WebhookDelivery).count() == 0


def test_empty_prefix_job_is_finished_with_a_webhook(engine, tmp_path):
    factory = make_sessionmaker(engine)
    owner_id = _owner_with_hook(factory, "http://127.0.0.1:9/hook")
    store = LocalObjectStore(tmp_path / "objects")
    store.put("photos/readme.txt", b"x")
    with session_scope(factory) as session:
        job_id = jobs.create_job(session, "p", owner_id=owner_id, options={"prefix": "photos/"}).id
    s = settings(url_allow_hosts=["127.0.0.1"])
    published = []
    total = prefixes.run_enumerate_prefix(
        job_id,
        session_factory=factory,
        store=store,
        settings=s,
        publish=lambda j, ids: None,
        publish_deliveries=published.extend,
    )
    assert total == 0
    with factory() as session:
        assert session.get(Job, job_id).status == JobStatus.FINISHED
        [delivery] = session.query(WebhookDelivery).filter_by(job_id=job_id).all()
        assert published == [delivery.id]
    [(event, body)] = _deliver(factory, published, s)
    assert event == "job.completed" and body["job"]["image_count"] == 0


def test_zip_total_size_cap():
    archive = make_zip({"a.png": png(), "b.png": png((1, 1, 1))})
    with pytest.raises(errors.SubmissionRejected, match="uncompresses to"):
        uploads.read_zip(archive, settings(zip_max_total_bytes=50))


def test_prefix_within_store():
    assert prefixes.prefix_within_store("s3://b/base/photos/", "s3://b/base") == "photos/"
    with pytest.raises(errors.SubmissionRejected):
        prefixes.prefix_within_store("s3://b/elsewhere/", "s3://b/base")
    with pytest.raises(errors.SubmissionRejected):
        prefixes.prefix_within_store("../x", "file:///tmp/o")


# --- DNS rebinding: the fetch connects only to the address that was checked -------------------


def _logging_handler(seen: list[tuple[str, str]]) -> type[BaseHTTPRequestHandler]:
    """Serves a PNG (or redirects /to?u=URL) and records (path, Host header) of each request."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Host", "")))
            if self.path.startswith("/to?u="):
                self.send_response(302)
                self.send_header("Location", self.path[len("/to?u=") :])
                self.end_headers()
                return
            body = png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def logged_server():
    """A loopback HTTP server; yields (port, [(path, Host header) of each request])."""
    seen: list[tuple[str, str]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _logging_handler(seen))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port, seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("via_redirect", [False, True], ids=["direct", "redirect-hop"])
def test_dns_rebinding_cannot_reach_loopback(logged_server, rebinding_dns, via_redirect):
    port, seen = logged_server
    lookups, connects = rebinding_dns
    target = f"http://rebind.example:{port}/img.png"
    url = f"http://127.0.0.1:{port}/to?u={target}" if via_redirect else target
    s = settings(url_allow_hosts=["127.0.0.1"] if via_redirect else [])
    with pytest.raises(errors.SubmissionRejected, match="fetch failed"):
        urls.fetch_url(url, s)
    # The name was resolved once (for the check) and the connect went to that checked address.
    assert lookups == ["rebind.example"]
    assert connects[-1] == PUBLIC_IP and "rebind.example" not in connects
    assert [path for path, _ in seen] == (["/to?u=" + target] if via_redirect else [])


def test_pinned_fetch_keeps_host_header_and_checks_every_hop(logged_server):
    port, seen = logged_server
    names = {"pinned.example": ["127.0.0.1"], "inner.example": ["10.0.0.5"]}
    resolver = lambda host, _port: names[host]  # noqa: E731
    s = settings(url_allow_hosts=["pinned.example"])
    assert urls.fetch_url(f"http://pinned.example:{port}/img.png", s, resolver=resolver) == png()
    assert seen == [("/img.png", f"pinned.example:{port}")]
    with pytest.raises(errors.UnsafeURL, match="private, loopback or link-local"):
        urls.fetch_url(
            f"http://pinned.example:{port}/to?u=http://inner.example/x.png", s, resolver=resolver
        )


def test_pinned_adapter_connects_to_the_ip_but_keeps_the_name_for_host_sni_and_cert():
    import requests

    from captioner.intake.urls import PinnedAdapter

    adapter = PinnedAdapter("pinned.example", PUBLIC_IP)
    request = requests.Request("GET", "https://Pinned.Example:8443/a.png").prepare()
    pool = adapter.get_connection_with_tls_context(request, verify=True)
    assert (pool.scheme, pool.host, pool.port) == ("https", PUBLIC_IP, 8443)
    assert pool.conn_kw["server_hostname"] == "pinned.example"  # SNI
    assert pool.assert_hostname == "pinned.example"  # certificate must name the host, not the IP
    adapter.add_headers(request)
    assert request.headers["Host"] == "pinned.example:8443"
    plain = requests.Request("GET", "http://pinned.example/a.png").prepare()
    pool = adapter.get_connection_with_tls_context(plain, verify=True)
    assert (pool.scheme, pool.host, pool.port) == ("http", PUBLIC_IP, 80)
    assert "server_hostname" not in pool.conn_kw
    adapter.add_headers(plain)
    assert plain.headers["Host"] == "pinned.example"
    with pytest.raises(requests.exceptions.InvalidURL, match="pinned"):
        adapter.send(requests.Request("GET", "https://other.example/").prepare())
    adapter.close()


def _tls_files(tmp_path, name: str):
    """A throwaway CA and a server certificate for `name` only (no IP in it)."""
    import datetime

    cryptography = pytest.importorskip("cryptography")  # noqa: F841 (comes with moto)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, key, issuer, issuer_key, *, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    leaf = cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key, ca_name, ca_key, ca=False
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"


def test_pinned_https_verifies_the_name_not_the_ip(tmp_path):
    import ssl

    import requests

    from captioner.intake.urls import PinnedAdapter

    ca, cert, key = _tls_files(tmp_path, "pinned.example")
    seen: list[tuple[str, str]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _logging_handler(seen))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_port
        with requests.Session() as http:
            http.trust_env = False
            http.mount("https://", PinnedAdapter("pinned.example", "127.0.0.1"))
            response = http.get(
                f"https://pinned.example:{port}/img.png", verify=str(ca), timeout=10
            )
            assert response.status_code == 200 and response.content == png()
            assert seen == [("/img.png", f"pinned.example:{port}")]
            # A name the certificate does not cover fails verification although the IP is the same.
            http.mount("https://", PinnedAdapter("other.example", "127.0.0.1"))
            with pytest.raises(requests.exceptions.SSLError):
                http.get(f"https://other.example:{port}/img.png", verify=str(ca), timeout=10)
    finally:
        server.shutdown()
        server.server_close()


# --- bounded outbound HTTP: one deadline per request, a capped body, a redirect cap ----------


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """About 260 KB of gzip that inflates to 256 MiB of zeros (compressed a MiB at a time)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    block = b"\0" * (1024 * 1024)
    return b"".join(packer.compress(block) for _ in range(256)) + packer.flush()


class HostileServer:
    """A loopback HTTP server for GET and POST: `/drip` answers one byte every `DRIP_SECONDS`
    (status line, headers and a long body, until the client hangs up), `/bomb` answers 200 with
    `gzip_bomb()` as a gzip Content-Encoding, `/hop/N` redirects to `/hop/N+1` forever.
    `paths` records every request's path (without its query)."""

    DRIP_SECONDS = 0.2

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.stop = threading.Event()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                path = self.path.split("?", 1)[0]
                hostile.paths.append(path)
                if path == "/drip":
                    self._drip()
                elif path == "/bomb":
                    body = gzip_bomb()
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.startswith("/hop/"):
                    self.send_response(302)
                    self.send_header("Location", f"/hop/{int(self.path[5:]) + 1}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_error(404)

            def _drip(self) -> None:
                data = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000
                for i in range(len(data)):
                    if hostile.stop.wait(HostileServer.DRIP_SECONDS):
                        return
                    try:
                        self.wfile.write(data[i : i + 1])
                    except OSError:  # the client gave up
                        return

            def do_GET(self):  # noqa: N802
                self._answer()

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile():
    server = HostileServer()
    yield server
    server.close()


def test_fetch_from_a_drip_server_ends_at_the_total_deadline(hostile):
    """The server sends a byte before any per-read timeout could fire, forever: only a total
    deadline ends the fetch, and the reason says so."""
    s = settings(url_allow_hosts=["127.0.0.1"], url_fetch_timeout_seconds=1.0)
    with pytest.raises(errors.SubmissionRejected, match="timed out"):
        urls.fetch_url(hostile.url + "/drip", s)
    assert hostile.paths == ["/drip"]


def test_fetch_of_a_gzip_bomb_stops_at_the_decoded_size_cap(hostile):
    cap = 1024 * 1024
    s = settings(url_allow_hosts=["127.0.0.1"], max_image_bytes=cap)
    tracemalloc.start()
    try:
        with pytest.raises(errors.TooLarge, match=f"larger than {cap} bytes"):
            urls.fetch_url(hostile.url + "/bomb", s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * cap  # 256 MiB were on offer


def test_raw_capped_read_never_inflates_a_gzip_bomb(hostile):
    """Webhook replies: raw bytes, cut at the cap, never decompressed."""
    limits = urls.Limits(seconds=10, max_bytes=4096, truncate=True)
    reply = urls.request(
        "POST", hostile.url + "/bomb", allow_hosts=["127.0.0.1"], limits=limits, data=b"{}"
    )
    assert reply.status == 200 and len(reply.body) == 4096
    assert reply.body == gzip_bomb()[:4096]  # the compressed bytes as sent


def test_redirect_chain_is_cut_at_the_redirect_cap(hostile):
    s = settings(url_allow_hosts=["127.0.0.1"], url_fetch_max_redirects=3)
    with pytest.raises(errors.SubmissionRejected, match="more than 3 redirects"):
        urls.fetch_url(hostile.url + "/hop/0", s)
    assert hostile.paths == ["/hop/0", "/hop/1", "/hop/2", "/hop/3"]


# --- SSRF: IPv6 forms of private addresses, separate allow-lists, redacted URLs ---------------


@pytest.mark.parametrize(
    "address",
    [
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:5db8:d70e::1",  # 6to4 of a public address: a tunnel all the same
        "fec0::1",  # site-local
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "::ffff:10.0.0.1",  # IPv4-mapped private
        "::ffff:192.168.1.1",
    ],
)
def test_ipv6_forms_of_private_addresses_are_private(address):
    with pytest.raises(errors.UnsafeURL, match="private, loopback or link-local"):
        urls.check_url("http://tricky.example/a.png", resolver=lambda h, p: [address])
    with pytest.raises(errors.UnsafeURL):
        urls.check_url(f"http://[{address}]/a.png", resolve=False)


@pytest.mark.parametrize("address", ["2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.215.14"])
def test_public_ipv6_addresses_pass(address):
    assert urls.check_url("http://v6.example/a.png", resolver=lambda h, p: [address])


def test_url_allow_list_does_not_open_webhooks_and_back(http_server):
    only_urls = settings(url_allow_hosts=["127.0.0.1"])
    only_hooks = settings(webhook_allow_hosts=["127.0.0.1"])
    assert urls.fetch_url(http_server + "/img.png", only_urls) == png()
    with pytest.raises(errors.UnsafeURL):
        urls.fetch_url(http_server + "/img.png", only_hooks)
    assert webhooks.check_receiver_url(http_server + "/hook", only_hooks)
    with pytest.raises(errors.UnsafeURL):
        webhooks.check_receiver_url(http_server + "/hook", only_urls)


def test_urls_are_redacted_in_stored_failure_reasons(session, tmp_path, http_server):
    host = http_server.removeprefix("http://")
    job = jobs.create_job(session, "urls")
    job_urls = [
        f"http://user:pw@{host}/missing.png?token=SECRET1#frag",
        f"http://{host}/to?u=http://169.254.169.254/latest?token=SECRET2",
        "http://10.0.0.1/inner.png?sig=SECRET3",
    ]
    s = settings(url_allow_hosts=["127.0.0.1"])
    store = LocalObjectStore(tmp_path / "objects")
    assert fetch.fetch_urls(session, job.id, job_urls, store=store, settings=s) == []
    reasons = [i.failure_reason for i in session.query(Image).filter_by(job_id=job.id)]
    assert len(reasons) == 3 and not any("SECRET" in r or "pw" in r for r in reasons), reasons
    assert f"http://{host}/missing.png: HTTP 404" in reasons
    assert urls.redact("https://u:p@Example.com:8443/a/b.png?x=1#y") == (
        "https://example.com:8443/a/b.png"
    )


# --- inputs validated to what the database stores ---------------------------------------------


def test_url_longer_than_the_column_is_refused_at_submit():
    limit = Image.__table__.c.original_name.type.length
    url = "https://example.com/" + "a" * (limit - len("https://example.com/"))
    assert urls.check_url(url, resolve=False) == url
    with pytest.raises(errors.SubmissionRejected, match=f"URL too long: {limit + 1} characters"):
        urls.check_url(url + "b", resolve=False)


@pytest.mark.parametrize(
    "prefix", ["./x", "a//b", "../x", "x/./y", "x/../y", "/abs", "x/.", "a\\b"]
)
def test_malformed_prefixes_are_refused_at_submit(prefix):
    with pytest.raises(errors.SubmissionRejected, match="invalid prefix"):
        prefixes.prefix_within_store(prefix, "file:///tmp/o")


@pytest.mark.parametrize("prefix", ["", "photos/", "photos/2024", "a/b/c_", "x/.hidden"])
def test_plain_prefixes_pass(prefix):
    assert prefixes.prefix_within_store(prefix, "file:///tmp/o") == prefix


def test_keys_longer_than_the_column_are_refused():
    limit = Image.__table__.c.storage_key.type.length
    assert prefixes.check_keys(["k" * limit]) == ["k" * limit]
    with pytest.raises(errors.SubmissionRejected, match=f"{limit + 1} characters > limit"):
        prefixes.check_keys(["k" * (limit + 1)])


# --- zip: the compression ratio of every member ------------------------------------------------


def _bmp(size=(512, 512)) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", size, (0, 0, 0)).save(buf, "BMP")  # 768 KiB, deflates about 1000x
    return buf.getvalue()


def test_zip_ratio_checked_on_members_under_a_mebibyte():
    archive = make_zip({f"{i}.bmp": _bmp() for i in range(4)})
    assert len(archive) < 10_000 and len(_bmp()) < 1024 * 1024
    with pytest.raises(
        errors.SubmissionRejected, match="refused: compression ratio .* > limit 200"
    ):
        uploads.read_zip(archive, settings())
    # A member that compresses within the limit passes.
    assert [f.name for f in uploads.read_zip(make_zip({"a.png": png()}), settings())] == ["a.png"]


def test_the_worker_refuses_an_oversize_object_without_reading_it(tmp_path):
    from workers.pixels import prepare_image

    store = ReadCountingStore(tmp_path / "objects")
    s = settings(max_image_bytes=2000)
    store.put("big.png", png() + b"\0" * 2000)
    prepared = prepare_image(store, "big.png", s, preprocess=lambda image: image)
    assert prepared.reason_kind == "too_large" and "> limit 2000" in prepared.reason
    assert prepared.transient is None and store.bytes_read == {}
    store.put("small.png", png())
    prepared = prepare_image(store, "small.png", s, preprocess=lambda image: image)
    assert prepared.reason is None and store.bytes_read == {"small.png": len(png())}


def test_uploads_and_fetched_urls_live_in_their_owners_namespace(session, tmp_path, http_server):
    from captioner.accounts import create_user

    store = LocalObjectStore(tmp_path / "objects")
    owner = create_user(session, "owner@example.com", "a password!")
    job = jobs.create_job(session, "urls", owner_id=owner.id)
    s = settings(url_allow_hosts=["127.0.0.1"])
    [image_id] = fetch.fetch_urls(
        session, job.id, [http_server + "/img.png"], store=store, settings=s
    )
    key = session.get(Image, image_id).storage_key
    assert key.startswith(f"urls/{owner.id}/") and store.get(key) == png()
    [image_id] = uploads.store_files(
        session, store, job.id, [uploads.IncomingFile("a.png", png())], owner_id=owner.id
    )
    assert session.get(Image, image_id).storage_key.startswith(f"uploads/{owner.id}/")


def test_read_ahead_keeps_pages_in_order_lists_one_ahead_and_passes_errors_on():
    drawn = []

    def pages():
        for i in range(4):
            drawn.append(i)
            yield [f"k{i}"]
        raise OSError("listing failed on page 5")

    ahead = prefixes.read_ahead(pages())
    assert next(ahead) == ["k0"]
    # While the caller holds a page, the thread lists at most the one after it.
    assert next(ahead) == ["k1"] and len(drawn) <= 3
    assert list(itertools.islice(ahead, 2)) == [["k2"], ["k3"]]
    with pytest.raises(OSError, match="page 5"):
        next(ahead)


def test_read_ahead_closed_early_stops_listing():
    drawn = []

    def pages():
        for i in range(100):
            drawn.append(i)
            yield [str(i)]

    ahead = prefixes.read_ahead(pages())
    assert next(ahead) == ["0"]
    ahead.close()
    assert len(drawn) <= 2
