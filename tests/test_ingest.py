"""Ingest rules: zip checks, URL address rules (every redirect re-checked), fetch, prefix."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from dashboard_helpers import make_zip, png

from captioner import ingest, jobs
from captioner.models import Image, ImageStatus
from captioner.settings import Settings
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
                self.send_header("Location", self.path[len("/to?u="):])
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
    "url", ["http://127.0.0.1/", "http://169.254.169.254/latest", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/",
            "http://192.168.1.1/", "http://[fe80::1]/", "ftp://example.com/x"],
)
def test_unsafe_urls_refused(url):
    with pytest.raises(ingest.UnsafeURL):
        ingest.check_url(url)


def test_names_resolving_to_private_addresses_refused():
    with pytest.raises(ingest.UnsafeURL, match="private, loopback or link-local"):
        ingest.check_url("http://metadata.example/", resolver=lambda h, p: ["169.254.169.254"])
    assert ingest.check_url("http://public.example/a.png", resolver=lambda h, p: ["93.184.215.14"])
    with pytest.raises(ingest.UnsafeURL):  # one bad address among good ones is enough
        ingest.check_url("http://mixed.example/", resolver=lambda h, p: ["93.184.215.14", "10.0.0.1"])


def test_loopback_fetch_refused_unless_allow_listed(http_server):
    with pytest.raises(ingest.UnsafeURL):
        ingest.fetch_url(http_server + "/img.png", settings())
    data = ingest.fetch_url(http_server + "/img.png", settings(url_allow_hosts=["127.0.0.1"]))
    assert data == png()


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.5/x.png", "file:///etc/passwd"])
def test_redirect_to_private_address_refused(http_server, target):
    s = settings(url_allow_hosts=["127.0.0.1"])
    with pytest.raises(ingest.UnsafeURL):
        ingest.fetch_url(f"{http_server}/to?u={target}", s)


def test_fetch_size_limit_and_redirect_cap(http_server):
    s = settings(url_allow_hosts=["127.0.0.1"], max_image_bytes=1000)
    with pytest.raises(ingest.TooLarge):
        ingest.fetch_url(http_server + "/big", s)
    s = settings(url_allow_hosts=["127.0.0.1"], url_fetch_max_redirects=0)
    with pytest.raises(ingest.SubmissionRejected, match="redirects"):
        ingest.fetch_url(f"{http_server}/to?u={http_server}/img.png", s)


def test_fetch_urls_stores_good_and_fails_bad_with_reason(session, tmp_path, http_server):
    store = LocalObjectStore(tmp_path / "objects")
    job = jobs.create_job(session, "urls")
    s = settings(url_allow_hosts=["127.0.0.1"])
    urls = [http_server + "/img.png", http_server + "/missing.png", f"{http_server}/to?u=http://169.254.169.254/"]
    queued = ingest.fetch_urls(session, job.id, urls, store=store, settings=s)
    assert len(queued) == 1
    rows = {i.original_name: i for i in session.query(Image).filter_by(job_id=job.id)}
    assert rows[urls[0]].status == ImageStatus.QUEUED and store.get(rows[urls[0]].storage_key) == png()
    assert rows[urls[1]].failure_reason.endswith("HTTP 404")
    assert "refused URL" in rows[urls[2]].failure_reason
    # Idempotent: a second run adds nothing.
    assert ingest.fetch_urls(session, job.id, urls, store=store, settings=s) == []


def test_enumerate_prefix_pages_and_publishes(engine, tmp_path, monkeypatch):
    from captioner.db import make_sessionmaker, session_scope

    store = LocalObjectStore(tmp_path / "objects")
    for i in range(5):
        store.put(f"photos/{i}.jpg", b"x")
    store.put("photos/readme.txt", b"x")
    store.put("other/9.jpg", b"x")
    factory = make_sessionmaker(engine)
    with session_scope(factory) as session:
        job_id = jobs.create_job(session, "p", options={"prefix": "photos/"}).id
    monkeypatch.setattr(ingest, "PAGE_SIZE", 2)
    sent = []
    total = ingest.run_enumerate_prefix(job_id, session_factory=factory, store=store, settings=settings(),
                                        publish=lambda j, ids: sent.append(ids))
    assert total == 5 and [len(ids) for ids in sent] == [2, 2, 1]


def test_zip_total_size_cap():
    archive = make_zip({"a.png": png(), "b.png": png((1, 1, 1))})
    with pytest.raises(ingest.SubmissionRejected, match="uncompresses to"):
        ingest.read_zip(archive, settings(zip_max_total_bytes=50))


def test_prefix_within_store():
    assert ingest.prefix_within_store("s3://b/base/photos/", "s3://b/base") == "photos/"
    with pytest.raises(ingest.SubmissionRejected):
        ingest.prefix_within_store("s3://b/elsewhere/", "s3://b/base")
    with pytest.raises(ingest.SubmissionRejected):
        ingest.prefix_within_store("../x", "file:///tmp/o")
