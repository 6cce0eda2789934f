"""Uploads taken file by file: zip members streamed to the object store one at a time, and an
upload that keeps its good files while listing each refused one with its reason (API, form,
CLI)."""

from __future__ import annotations

import io
import os
import threading
import tracemalloc
import zipfile

import pytest
from click.testing import CliRunner
from dashboard_helpers import csrf, image_ids, login, make_user, make_zip, png
from PIL import Image as PILImage
from sqlalchemy import func, select
from werkzeug.datastructures import FileStorage

from captioner.intake import uploads
from captioner.settings import Settings
from captioner.state import jobs
from captioner.state.db import session_scope
from captioner.state.models import Image, Job
from captioner.storage import LocalObjectStore


def noise_png(size: int = 256) -> bytes:
    """A PNG of random pixels: it does not compress, so its zip member is as large as it is."""
    buf = io.BytesIO()
    PILImage.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buf, "PNG")
    return buf.getvalue()


def settings(**overrides) -> Settings:
    return Settings(secret_key="test-secret", **overrides)


def _symlink_member(z: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo("link.png")
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    z.writestr(info, "/etc/passwd")


def mixed_zip() -> bytes:
    """Two good images and four members each refused for its own reason."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("good/one.png", png())
        z.writestr("../evil.png", png((1, 1, 1)))
        _symlink_member(z)
        z.writestr("bomb.png", b"\0" * (4 * 1024 * 1024))
        z.writestr("notes.txt", b"hello")
        z.writestr("good/two.png", png((0, 0, 255)))
    return buf.getvalue()


MIXED_REFUSED = {
    "../evil.png": "path escapes the archive",
    "link.png": "symbolic link member",
    "bomb.png": "compression ratio",
    "notes.txt": "not an image",
}


def _assert_reasons(refused: list[dict], expected: dict[str, str]) -> None:
    assert [r["name"] for r in refused] == list(expected)
    for item in refused:
        assert expected[item["name"]] in item["reason"], item


# --- zips streamed to storage ------------------------------------------------------------------


def test_a_zip_far_larger_than_one_member_is_stored_a_member_at_a_time(tmp_path):
    """60 members of about 200 KB each (12 MB in all, 48 times the per-file cap): every one is
    stored, and the memory allocated while taking the upload stays within a few members."""
    cap = 256 * 1024
    members = {f"photos/{i:02d}.png": noise_png() for i in range(60)}
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    total = sum(map(len, members.values()))
    assert max(map(len, members.values())) < cap and total > 40 * cap
    del members  # the expected digests are computed from the archive afterwards
    store = LocalObjectStore(tmp_path / "objects")
    s = settings(max_image_bytes=cap)
    with path.open("rb") as stream:
        archive = FileStorage(stream=stream, filename="big.zip")
        tracemalloc.start()
        try:
            with uploads.open_upload([], archive, s) as pending:
                assert pending.count == 60
                upload = pending.store(store, owner_id=7)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 4 * cap, f"peak {peak} bytes while storing {total} bytes"
    assert upload.refused == [] and len(upload.files) == 60
    with zipfile.ZipFile(path) as z:
        for stored in upload.files:
            assert store.get(stored.key) == z.read(stored.name)
            assert (
                stored.key.startswith("uploads/7/")
                and stored.size == z.getinfo(stored.name).file_size
            )


def test_refused_members_are_left_out_and_the_rest_stored(object_store):
    archive = FileStorage(stream=io.BytesIO(mixed_zip()), filename="mixed.zip")
    loose = FileStorage(stream=io.BytesIO(b"%PDF-1.4 not an image"), filename="doc.jpg")
    with uploads.open_upload([loose], archive, settings()) as pending:
        upload = pending.store(object_store, owner_id=3)
    assert [f.name for f in upload.files] == ["good/one.png", "good/two.png"]
    assert upload.source == "zip:mixed.zip"
    _assert_reasons(
        [r.as_dict() for r in upload.refused],
        {"doc.jpg": "unsupported format PDF", **MIXED_REFUSED},
    )
    assert sorted(object_store.list("uploads/")) == sorted(f.key for f in upload.files)


def test_an_upload_of_only_refused_files_stores_nothing(object_store):
    files = [
        FileStorage(stream=io.BytesIO(b"<html>"), filename="page.png"),
        FileStorage(stream=io.BytesIO(png() + b"\0" * 100), filename="big.png"),
    ]
    with uploads.open_upload(files, None, settings(max_image_bytes=len(png()) + 50)) as pending:
        with pytest.raises(uploads.UploadRefused) as refused:
            pending.store(object_store, owner_id=1)
    error = refused.value
    assert error.status_code == 422 and [r.name for r in error.refused] == ["page.png", "big.png"]
    assert error.reason.startswith("every file was refused (2): page.png: ")
    assert "big.png: larger than" in error.reason
    assert list(object_store.list("")) == []


def test_every_file_too_large_is_413(tmp_path):
    files = [FileStorage(stream=io.BytesIO(png()), filename=f"{i}.png") for i in range(2)]
    with uploads.open_upload(files, None, settings(max_image_bytes=20)) as pending:
        with pytest.raises(uploads.UploadRefused) as refused:
            pending.store(LocalObjectStore(tmp_path / "o"), owner_id=1)
    assert refused.value.status_code == 413


def test_members_past_the_total_really_read_are_refused_unread():
    """The reader counts the bytes members really inflate to (whatever their headers say):
    the member that crosses `zip_max_total_bytes` and every later one are refused, the earlier
    ones kept."""
    data = make_zip({"a.png": png(), "b.png": png((1, 2, 3)), "c.png": png((4, 5, 6))})
    s = settings(zip_max_total_bytes=len(png()) + 10)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        reader = uploads._MemberReader(z, s)
        outcomes = [reader.read(info) for info in z.infolist()]
    assert outcomes[0] == png()
    assert [o.name for o in outcomes[1:]] == ["b.png", "c.png"]
    assert all("uncompresses to more than" in o.reason for o in outcomes[1:])


def test_stored_files_become_the_jobs_images(session, object_store):
    """The files stored while the upload was checked are the job's images: keys, hashes and
    sizes as stored (SQLite and PostgreSQL, file and S3 stores)."""
    from captioner.accounts import create_user

    owner = create_user(session, "owner@example.com", "a password!")
    files = [FileStorage(stream=io.BytesIO(png((i, 0, 0))), filename=f"{i}.png") for i in range(3)]
    files.append(FileStorage(stream=io.BytesIO(b"nope"), filename="x.png"))
    with uploads.open_upload(files, None, settings()) as pending:
        upload = pending.store(object_store, owner_id=owner.id)
    job = jobs.create_job(session, "partial", owner_id=owner.id)
    ids = uploads.store_files(session, object_store, job.id, upload.files, owner_id=owner.id)
    rows = [session.get(Image, i) for i in ids]
    assert [r.original_name for r in rows] == ["0.png", "1.png", "2.png"]
    for row, stored in zip(rows, upload.files, strict=True):
        assert (row.storage_key, row.content_sha256) == (stored.key, stored.sha256)
        assert object_store.get(row.storage_key) == png((int(row.original_name[0]), 0, 0))
    session.refresh(job)
    assert job.image_count == 3


# --- the API -----------------------------------------------------------------------------------


@pytest.fixture
def alice(app):
    return make_user(app, "alice@example.com", "submitter")


def _upload(client, account, files=(), archive=None, **form):
    data = {k: str(v) for k, v in form.items()}
    data["files"] = [(io.BytesIO(content), name) for name, content in files]
    if archive is not None:
        data["archive"] = (io.BytesIO(archive), "photos.zip")
    return client.post(
        "/api/v1/jobs/upload",
        data=data,
        headers=account.headers,
        content_type="multipart/form-data",
    )


def _count(app, model) -> int:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_one_bad_file_among_five_is_listed_and_the_four_make_the_job(
    app, client, alice, publisher, bad_inputs
):
    pdf = bad_inputs["document.pdf.jpg"][0]
    files = [(f"{i}.png", png((i, 9, 9))) for i in range(4)]
    files.insert(2, ("doc.jpg", pdf))
    r = _upload(client, alice, files=files, name="five")
    assert r.status_code == 202, r.json
    job = r.json
    assert job["image_count"] == 4 and job["progress"]["queued"] == 4
    assert job["refused"] == [{"name": "doc.jpg", "reason": "unsupported format PDF"}]
    assert publisher.ids_for(job["id"]) == image_ids(app, job["id"])
    assert len(list(app.extensions["captioner"].store.list("uploads/"))) == 4
    # A clean upload lists nothing refused.
    r = _upload(client, alice, files=[("ok.png", png((5, 5, 5)))])
    assert r.status_code == 202 and r.json["refused"] == []


def test_zip_members_are_refused_one_by_one(app, client, alice):
    r = _upload(client, alice, files=[("loose.png", png((7, 7, 7)))], archive=mixed_zip())
    assert r.status_code == 202, r.json
    assert r.json["image_count"] == 3 and r.json["source"] == "zip:photos.zip"
    _assert_reasons(r.json["refused"], MIXED_REFUSED)
    images = client.get(f"/api/v1/jobs/{r.json['id']}/images", headers=alice.headers).json
    assert {i["original_name"] for i in images["items"]} == {"loose.png", "one.png", "two.png"}


def test_every_file_bad_is_422_listing_every_reason(app, client, alice, bad_inputs):
    files = [
        ("doc.jpg", bad_inputs["document.pdf.jpg"][0]),
        ("page.png", b"<html>not an image</html>"),
        ("bomb.png", bad_inputs["bomb_40000x40000.png"][0]),
    ]
    r = _upload(client, alice, files=files, archive=make_zip({"../x.png": png()}))
    assert r.status_code == 422
    body = r.json
    assert body["message"].startswith("every file was refused (4): doc.jpg: unsupported format")
    for name in ("page.png: not an image", "bomb.png: image too large", "../x.png: path escapes"):
        assert name in body["message"]
    assert [item["name"] for item in body["detail"]["refused"]] == [
        "doc.jpg",
        "page.png",
        "bomb.png",
        "../x.png",
    ]
    assert _count(app, Job) == 0 and _count(app, Image) == 0
    assert list(app.extensions["captioner"].store.list("")) == []


def test_an_interactive_upload_too_large_stores_nothing(app, client, alice, publisher):
    """The job's options are checked against the upload's size before anything is stored."""
    most = app.extensions["captioner"].settings.interactive_max_images
    archive = make_zip({f"{i}.png": png((i, 1, 1)) for i in range(most + 1)})
    r = _upload(client, alice, archive=archive, interactive="true")
    assert r.status_code == 422 and "interactive" in r.json["message"]
    assert list(app.extensions["captioner"].store.list("")) == [] and publisher.sent == []


# --- the form ----------------------------------------------------------------------------------


def test_the_form_lists_refused_files_keeps_its_values_and_makes_the_job(app, client, alice):
    login(client, "alice@example.com")
    data = {
        "csrf_token": csrf(client),
        "name": "holiday",
        "num_beams": "5",
        "recaption": "1",
        "files": [
            (io.BytesIO(png()), "a.png"),
            (io.BytesIO(b"<html>not an image</html>"), "bad.png"),
            (io.BytesIO(png((3, 3, 3))), "b.png"),
        ],
    }
    r = client.post("/jobs/new", data=data, content_type="multipart/form-data")
    assert r.status_code == 200
    page = r.data.decode()
    [job] = client.get("/api/v1/jobs", headers=alice.headers).json["items"]
    assert job["image_count"] == 2 and job["name"] == "holiday"
    assert f'href="/jobs/{job["id"]}"' in page and "submitted with 2 images" in page
    refused = page.split('id="refused-files"')[1].split("</div>")[0]
    assert "<code>bad.png</code>: not an image" in refused
    assert "a.png" not in refused and "b.png" not in refused
    assert 'name="name" value="holiday"' in page and 'name="num_beams" value="5"' in page
    assert 'name="recaption" value="1" checked' in page


def test_the_form_with_every_file_refused_makes_nothing_and_keeps_its_values(app, client, alice):
    login(client, "alice@example.com")
    data = {
        "csrf_token": csrf(client),
        "name": "<b>mine</b>",
        "archive": (io.BytesIO(make_zip({"../x.png": png(), "y.txt": b"y"})), "bad.zip"),
    }
    r = client.post("/jobs/new", data=data, content_type="multipart/form-data")
    assert r.status_code == 422
    page = r.data.decode()
    refused = page.split('id="refused-files"')[1].split("</div>")[0]
    assert "<code>../x.png</code>: path escapes the archive" in refused
    assert "<code>y.txt</code>: not an image" in refused
    assert 'value="&lt;b&gt;mine&lt;/b&gt;"' in page and "<b>mine</b>" not in page
    assert client.get("/api/v1/jobs", headers=alice.headers).json["items"] == []


# --- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def served(app):
    """The test app on a loopback port (werkzeug in a thread), with a submitter's token."""
    from werkzeug.serving import make_server

    user = make_user(app, "cli@example.com", "submitter")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", user.token
    server.shutdown()
    thread.join(10)


def test_the_cli_prints_each_refused_file(served, tmp_path):
    from captioner.cli import cli

    server, token = served
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png())
    (folder / "junk.png").write_bytes(b"<html>not an image</html>")
    result = CliRunner().invoke(cli, ["submit", str(folder), "--server", server, "--token", token])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("job ") and result.stdout.strip().endswith(" submitted")
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("refused: junk.png: not an image")
    # Every file refused: one line, the refusals in it once.
    (folder / "a.png").unlink()
    result = CliRunner().invoke(cli, ["submit", str(folder), "--server", server, "--token", token])
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: 422: junk.png: not an image") and line.count("junk.png") == 1
