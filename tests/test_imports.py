"""Caption imports (`POST /api/v1/imports`, `captioner import`) and external ids at submission,
on SQLite and PostgreSQL: imported captions are reviewed and exported like model captions,
a bad file is refused as a whole with the line of each problem, and keys outside the user's
source locations are refused."""

from __future__ import annotations

import csv
import io
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from dashboard_helpers import fake_caption, make_user, make_zip, png
from sqlalchemy import func, select

from captioner import tasks
from captioner.intake import fetch, imports, prefixes
from captioner.settings import Settings
from captioner.state import images, jobs
from captioner.state.db import session_scope
from captioner.state.models import (
    Caption,
    CaptionSource,
    Image,
    ImageStatus,
    Job,
    JobStatus,
    Review,
    ReviewDecision,
)

SHARED = "datasets/"  # every submitter may read keys under it


@pytest.fixture
def http_images():
    """A loopback server: /<name>.png serves a small PNG (a colour per name: different bytes),
    anything else 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if not self.path.endswith(".png"):
                self.send_response(404)
                self.end_headers()
                return
            body = png((zlib.crc32(self.path.encode()) % 256, 40, 90))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def app(migrated_url, tmp_path, publisher):
    """The dashboard on a migrated database, once per backend."""
    from dashboard import create_app

    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=migrated_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        secret_key="test-secret",
        submit_rate_limit="1000/minute",
        login_rate_limit="1000/minute",
        source_prefixes=[SHARED],
        url_allow_hosts=["127.0.0.1"],
    )
    app = create_app(settings, publisher=publisher)
    app.config["TESTING"] = True
    yield app
    app.extensions["captioner"].engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def users(app):
    accounts = {
        "admin": make_user(app, "admin@example.com", "admin"),
        "reviewer": make_user(app, "rev@example.com", "reviewer"),
        "alice": make_user(app, "alice@example.com", "submitter"),
        "bob": make_user(app, "bob@example.com", "submitter"),
    }
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        from captioner.state.models import User

        session.get(User, accounts["bob"].id).source_prefixes = ["bob/"]
    return accounts


def sessions(app):
    return app.extensions["captioner"].sessionmaker


def put(app, *keys: str) -> None:
    """Objects in the store under these keys (an import's keys must name objects)."""
    for n, key in enumerate(keys):
        app.extensions["captioner"].store.put(key, png((n * 40 % 256, 90, 160)))


COCO_KEYS = [f"val/{name}.jpg" for name in ("397133", "037777", "252219")]


def post_file(client, account, filename: str, content: str | bytes, **form):
    data = {k: str(v) for k, v in form.items()}
    raw = content.encode() if isinstance(content, str) else content
    data["file"] = (io.BytesIO(raw), filename)
    return client.post(
        "/api/v1/imports", data=data, headers=account.headers, content_type="multipart/form-data"
    )


def post_json(client, account, body):
    return client.post("/api/v1/imports", json=body, headers=account.headers)


def job_images(client, account, job_id: int) -> list[dict]:
    response = client.get(f"/api/v1/jobs/{job_id}/images?limit=1000", headers=account.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def queue(client, account, job_id: int) -> dict:
    response = client.get(f"/api/v1/review/queue?job_id={job_id}", headers=account.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def export_jsonl(client, account, job_id: int) -> list[dict]:
    response = client.get(f"/api/v1/export?format=jsonl&job_id={job_id}", headers=account.headers)
    assert response.status_code == 200
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def counts(app) -> tuple[int, int, int, int]:
    """(jobs, images, captions, reviews) in the database."""
    with sessions(app)() as session:
        return tuple(
            session.scalar(select(func.count()).select_from(model))
            for model in (Job, Image, Caption, Review)
        )


def assert_counters_match_the_rows(app) -> None:
    with sessions(app)() as session:
        assert jobs.recount(session) == []


COCO = {
    "info": {"description": "three images"},
    "images": [
        {"id": 397133, "file_name": COCO_KEYS[0], "width": 640, "height": 427},
        {"id": 37777, "file_name": COCO_KEYS[1]},
        {"id": 252219, "file_name": COCO_KEYS[2]},
    ],
    "annotations": [
        {"id": 1, "image_id": 397133, "caption": "A man in a kitchen.", "score": -2.5},
        {"id": 2, "image_id": 37777, "caption": "A dining table with food."},
        {"id": 3, "image_id": 397133, "caption": "A person cooking at a stove."},
        {"id": 4, "image_id": 252219, "caption": "People crossing a street."},
    ],
}


def test_a_coco_import_is_reviewed_through_the_api_and_exported_with_the_reviews(
    app, client, users, publisher
):
    reviewer = users["reviewer"]
    put(app, *(SHARED + "coco/" + key for key in COCO_KEYS))
    response = post_file(
        client, reviewer, "captions_val.json", json.dumps(COCO), key_prefix=SHARED + "coco/"
    )
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["source"] == "import:captions_val.json" and job["rows"] == 3
    assert job["status"] == "finished" and job["progress"]["captioned"] == 3
    # Captioned by the import: nothing was sent to a caption worker or fetched.
    assert publisher.sent == [] and publisher.tasks == []

    items = job_images(client, reviewer, job["id"])
    assert [i["external_id"] for i in items] == ["397133", "37777", "252219"]
    assert [i["original_name"] for i in items] == ["397133.jpg", "037777.jpg", "252219.jpg"]
    first = items[0]
    assert first["status"] == "captioned" and first["review"] is None
    assert first["caption"]["source"] == "import" and first["caption"]["model_version_id"] is None
    assert first["caption"]["text"] == "A man in a kitchen." and first["caption"]["score"] == -2.5
    assert [c["text"] for c in first["caption"]["candidates"]] == [
        "A man in a kitchen.",
        "A person cooking at a stove.",
    ]
    detail = client.get(f"/api/v1/images/{first['id']}", headers=reviewer.headers).get_json()
    assert detail["external_id"] == "397133" and detail["caption"]["source"] == "import"

    # In the review queue: the scored caption first, the unscored ones after it in file order.
    waiting = queue(client, reviewer, job["id"])
    assert waiting["total"] == 3
    assert [i["id"] for i in waiting["items"]] == [i["id"] for i in items]
    # A duplicate caption message for an imported image finds nothing to claim.
    with session_scope(sessions(app)) as session:
        ids = [i["id"] for i in items]
        assert images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=ids) == []

    decisions = [
        {"decision": "approved"},
        {"decision": "corrected", "text": "A table set with plates of food."},
        {"decision": "rejected"},
    ]
    for item, body in zip(items, decisions, strict=True):
        response = client.post(
            f"/api/v1/images/{item['id']}/reviews", json=body, headers=reviewer.headers
        )
        assert response.status_code == 201, response.get_json()
    assert queue(client, reviewer, job["id"])["total"] == 0
    assert_counters_match_the_rows(app)

    rows = {r["image_id"]: r for r in export_jsonl(client, reviewer, job["id"])}
    assert len(rows) == 3
    kitchen, table, street = (rows[i["id"]] for i in items)
    assert kitchen["model_caption"] == "A man in a kitchen." and kitchen["model_score"] == -2.5
    assert (kitchen["review_decision"], kitchen["reviewed_caption"]) == (
        "approved",
        "A man in a kitchen.",
    )
    assert (table["review_decision"], table["reviewed_caption"]) == (
        "corrected",
        "A table set with plates of food.",
    )
    assert (street["review_decision"], street["reviewed_caption"]) == ("rejected", None)
    assert kitchen["reviewer"] == reviewer.email
    assert [kitchen["external_id"], table["external_id"], street["external_id"]] == [
        "397133",
        "37777",
        "252219",
    ]


def test_jsonl_and_csv_imports_carry_scores_external_ids_and_reviews(app, client, users):
    reviewer = users["reviewer"]
    put(app, *(f"{SHARED}{name}.png" for name in "abcdefgh"))
    lines = [
        {"key": SHARED + "a.png", "caption": "a red circle", "score": -0.5, "external_id": "A"},
        {"key": SHARED + "b.png", "caption": "a blue square", "review": "approved"},
        {
            "key": SHARED + "c.png",
            "caption": "a green thing",
            "review": {"decision": "corrected", "text": "a green triangle"},
        },
        # A line of `captioner export` imports as it is (its other columns are ignored).
        {
            "image_id": 7,
            "storage_key": SHARED + "d.png",
            "model_caption": "a yellow square",
            "model_score": -1.5,
            "review_decision": "rejected",
            "reviewed_caption": None,
        },
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    response = post_file(client, reviewer, "mine.jsonl", text, name="from jsonl")
    assert response.status_code == 202, response.get_json()
    jsonl_job = response.get_json()
    assert jsonl_job["name"] == "from jsonl" and jsonl_job["source"] == "import:from jsonl"
    items = {i["original_name"]: i for i in job_images(client, reviewer, jsonl_job["id"])}
    assert items["a.png"]["external_id"] == "A" and items["a.png"]["caption"]["score"] == -0.5
    assert items["a.png"]["review"] is None
    assert items["b.png"]["review"]["decision"] == "approved"
    assert items["b.png"]["review"]["text"] == "a blue square"
    assert items["b.png"]["review"]["reviewer"] == reviewer.email
    assert items["b.png"]["review"]["caption_id"] == items["b.png"]["caption"]["id"]
    assert items["c.png"]["review"]["decision"] == "corrected"
    assert items["c.png"]["review"]["text"] == "a green triangle"
    assert items["d.png"]["review"]["decision"] == "rejected"
    assert items["d.png"]["caption"]["score"] == -1.5
    waiting = queue(client, reviewer, jsonl_job["id"])
    assert [i["original_name"] for i in waiting["items"]] == ["a.png"] and waiting["total"] == 1

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["key", "caption", "score", "external_id", "review", "review_text"])
    writer.writerow([SHARED + "e.png", "a photo, with a comma", "", "E-1", "", ""])
    writer.writerow([SHARED + "f.png", "a cat", "-3", "", "corrected", "a cat on a mat"])
    writer.writerow([SHARED + "g.png", 'a "quoted" dog', "-1", "G", "", ""])
    response = post_file(client, reviewer, "mine.csv", buffer.getvalue())
    assert response.status_code == 202, response.get_json()
    csv_job = response.get_json()
    items = {i["original_name"]: i for i in job_images(client, reviewer, csv_job["id"])}
    assert items["e.png"]["caption"]["text"] == "a photo, with a comma"
    assert items["e.png"]["external_id"] == "E-1" and items["f.png"]["external_id"] is None
    assert items["f.png"]["review"]["text"] == "a cat on a mat"
    assert items["g.png"]["caption"]["text"] == 'a "quoted" dog'
    # Least confident first: g (-1), then e (unscored: 1.0, after every model confidence).
    assert [i["original_name"] for i in queue(client, reviewer, csv_job["id"])["items"]] == [
        "g.png",
        "e.png",
    ]

    # The same rows as a JSON body.
    body = {"name": "rows", "rows": [{"key": SHARED + "h.png", "caption": "a horse"}]}
    response = post_json(client, reviewer, body)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["progress"]["captioned"] == 1
    assert_counters_match_the_rows(app)
    with sessions(app)() as session:
        sources = set(session.scalars(select(Caption.source)))
        assert sources == {CaptionSource.IMPORT}
        assert (
            session.scalar(select(func.count()).where(Caption.model_version_id.is_not(None))) == 0
        )


def test_a_bad_file_is_422_with_line_numbers_and_creates_nothing(app, client, users):
    reviewer = users["reviewer"]
    before = counts(app)
    lines = [
        json.dumps({"key": SHARED + "ok.png", "caption": "fine"}),
        json.dumps({"key": SHARED + "x.png"}),
        "",
        "{not json",
        json.dumps({"key": SHARED + "y.png", "url": "https://example.com/y.png", "caption": "c"}),
        json.dumps({"key": SHARED + "z.png", "caption": "c", "review": "corrected"}),
        json.dumps({"key": SHARED + "ok.png", "caption": "again"}),
        json.dumps({"key": SHARED + "s.png", "caption": "c", "score": "high"}),
        json.dumps({"key": SHARED + "e.png", "caption": "c", "external_id": "x" * 513}),
    ]
    response = post_file(client, reviewer, "bad.jsonl", "\n".join(lines))
    assert response.status_code == 422
    body = response.get_json()
    errors = body["detail"]["errors"]
    assert [e["line"] for e in errors] == [2, 4, 5, 6, 7, 8, 9]
    assert "caption missing" in errors[0]["message"]
    assert "not JSON" in errors[1]["message"]
    assert "exactly one of key or url" in errors[2]["message"]
    assert "corrected review needs its text" in errors[3]["message"]
    assert "same image as line 1" in errors[4]["message"]
    assert "score must be a number" in errors[5]["message"]
    assert "external_id too long" in errors[6]["message"]
    assert body["message"].startswith("nothing imported: 7 problems: line 2: caption missing")

    bad_csv = "key,caption,score\n" + SHARED + "a.png,a caption,-1\n" + SHARED + "b.png,,0\n"
    response = post_file(client, reviewer, "bad.csv", bad_csv)
    assert response.status_code == 422
    assert response.get_json()["detail"]["errors"] == [
        {"where": "line 3", "line": 3, "message": "caption missing"}
    ]
    no_header = SHARED + "a.png,a caption\n"
    response = post_file(client, reviewer, "nohead.csv", no_header)
    assert response.status_code == 422 and "name the columns" in response.get_json()["message"]

    coco = {
        "images": [
            {"id": 1, "file_name": SHARED + "1.png"},
            {"id": 2, "file_name": SHARED + "2.png"},
        ],
        "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 9, "caption": "nine"}],
    }
    response = post_json(client, reviewer, {"coco": coco})
    assert response.status_code == 422
    wheres = [e["where"] for e in response.get_json()["detail"]["errors"]]
    assert wheres == ["images[1]", "annotations[1]"]
    response = post_file(client, reviewer, "broken.json", '{"images": [\n  {"id": 1},\n')
    assert response.status_code == 422 and "not JSON" in response.get_json()["message"]
    response = post_file(
        client, reviewer, "latin1.jsonl", '{"caption": "caf\xe9"}'.encode("latin-1")
    )
    assert response.status_code == 422 and "not UTF-8" in response.get_json()["message"]
    response = post_file(client, reviewer, "notes.txt", "hello")
    assert (
        response.status_code == 422 and "cannot tell the format" in response.get_json()["message"]
    )
    response = post_file(client, reviewer, "empty.jsonl", "\n\n")
    assert response.status_code == 422 and "no rows" in response.get_json()["message"]
    response = post_json(
        client, reviewer, {"rows": [{"key": SHARED + "a", "caption": "c"}], "coco": {}}
    )
    assert response.status_code == 422
    # A key with no object behind it: nothing would read it before a reviewer or training.
    put(app, SHARED + "here.png")
    rows = [
        {"key": SHARED + "here.png", "caption": "c"},
        {"key": SHARED + "missing.png", "caption": "c"},
    ]
    response = post_json(client, reviewer, {"rows": rows})
    assert response.status_code == 422
    assert response.get_json()["detail"]["errors"] == [
        {
            "where": "line 2",
            "line": 2,
            "message": f"no object at key '{SHARED}missing.png' in the store",
        }
    ]
    # A URL a URL submission would refuse (a private address) refuses the import too.
    rows = [{"url": "http://10.0.0.8/a.png", "caption": "c"}]
    response = post_json(client, reviewer, {"rows": rows})
    assert response.status_code == 422 and "line 1" in response.get_json()["message"]
    assert counts(app) == before


def test_keys_outside_the_users_source_locations_are_refused(app, client, users):
    alice, bob = users["alice"], users["bob"]
    before = counts(app)
    # Another user's uploads, the other user's granted location, and a key nobody shares.
    for key in (f"uploads/{bob.id}/ab/cd/photo.png", "bob/photo.png", "private/photo.png"):
        rows = [{"key": SHARED + "fine.png", "caption": "ok"}, {"key": key, "caption": "theirs"}]
        response = post_json(client, alice, {"rows": rows})
        assert response.status_code == 403, (key, response.get_json())
        [error] = response.get_json()["detail"]["errors"]
        assert error["line"] == 2 and repr(key) in error["message"]
        assert "nothing imported" in response.get_json()["message"]
    # Reviews in an import need the reviewer role.
    rows = [{"key": SHARED + "a.png", "caption": "c", "review": "approved"}]
    response = post_json(client, alice, {"rows": rows})
    assert response.status_code == 403 and "reviewer role" in response.get_json()["message"]
    assert counts(app) == before

    # Bob reads his own location; without reviews a submitter imports.
    put(app, "bob/photo.png")
    response = post_json(client, bob, {"rows": [{"key": "bob/photo.png", "caption": "mine"}]})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=alice.headers).status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bob.headers).status_code == 200


def test_url_imports_are_fetched_and_captioned_by_the_import_never_by_a_worker(
    app, client, users, publisher, http_images
):
    reviewer = users["reviewer"]
    rows = [
        {"url": http_images + "/one.png", "caption": "first", "external_id": "U1"},
        {"url": http_images + "/two.png", "caption": "second", "score": -4, "review": "approved"},
        {"url": http_images + "/gone", "caption": "never fetched", "external_id": "U3"},
        {"key": SHARED + "k.png", "caption": "a key beside the URLs"},
    ]
    put(app, SHARED + "k.png")
    response = post_json(client, reviewer, {"rows": rows, "name": "web"})
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert "urls" not in job["options"]
    # The key image is captioned now; the URLs wait for the background fetch.
    assert job["status"] == "queued" and job["progress"]["captioned"] == 1
    assert publisher.tasks == [(tasks.TASK_FETCH_URLS, (job["id"],))]

    published: list[tuple[int, list[int]]] = []
    ext = app.extensions["captioner"]
    fetch.run_fetch_urls(
        job["id"],
        session_factory=ext.sessionmaker,
        store=ext.store,
        settings=ext.settings,
        publish=lambda job_id, ids: published.append((job_id, ids)),
        publish_deliveries=lambda ids: None,
    )
    assert published == []  # imported images never go to a caption worker
    items = {
        i["caption"]["text"] if i["caption"] else "-": i
        for i in job_images(client, reviewer, job["id"])
    }
    one, two, gone = items["first"], items["second"], items["-"]
    assert one["status"] == "captioned" and one["external_id"] == "U1"
    assert one["original_name"] == http_images + "/one.png"
    assert one["caption"]["source"] == "import" and one["caption"]["model_version_id"] is None
    assert two["review"]["decision"] == "approved" and two["review"]["reviewer"] == reviewer.email
    assert (
        gone["status"] == "failed"
        and gone["external_id"] == "U3"
        and "404" in gone["failure_reason"]
    )
    content = client.get(one["content_url"], headers=reviewer.headers)
    assert content.status_code == 200 and content.data.startswith(b"\x89PNG")
    detail = client.get(f"/api/v1/jobs/{job['id']}", headers=reviewer.headers).get_json()
    assert detail["status"] == "finished"
    assert detail["progress"] | {} == detail["progress"] and detail["progress"]["captioned"] == 3
    assert detail["progress"]["failed"] == 1
    # Run again (a redelivered task): nothing is added twice.
    fetch.run_fetch_urls(
        job["id"],
        session_factory=ext.sessionmaker,
        store=ext.store,
        settings=ext.settings,
        publish=lambda job_id, ids: published.append((job_id, ids)),
        publish_deliveries=lambda ids: None,
    )
    assert published == [] and counts(app)[1:] == (4, 3, 1)
    waiting = queue(client, reviewer, job["id"])
    assert {i["caption"]["text"] for i in waiting["items"]} == {"first", "a key beside the URLs"}
    assert_counters_match_the_rows(app)


def test_external_ids_round_trip_through_submission_and_export(
    app, client, users, publisher, http_images
):
    alice = users["alice"]
    keys = [{"key": SHARED + "x.png", "external_id": "sku-1"}, SHARED + "y.png"]
    response = client.post("/api/v1/jobs", json={"keys": keys}, headers=alice.headers)
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    fake_caption(app, job_id)
    items = job_images(client, alice, job_id)
    assert [(i["original_name"], i["external_id"]) for i in items] == [
        ("x.png", "sku-1"),
        ("y.png", None),
    ]
    assert items[0]["caption"]["source"] == "model"
    assert items[0]["caption"]["model_version_id"] is not None
    exported = export_jsonl(client, alice, job_id)
    assert [(r["file_name"], r["external_id"]) for r in exported] == [
        ("x.png", "sku-1"),
        ("y.png", None),
    ]

    # URLs: the external id is kept with the URL until the fetch makes the image.
    urls = [{"url": http_images + "/u.png", "external_id": "url-1"}, http_images + "/v.png"]
    response = client.post("/api/v1/jobs", json={"urls": urls}, headers=alice.headers)
    assert response.status_code == 202, response.get_json()
    url_job = response.get_json()["id"]
    ext = app.extensions["captioner"]
    fetch.run_fetch_urls(
        url_job,
        session_factory=ext.sessionmaker,
        store=ext.store,
        settings=ext.settings,
        publish=lambda job_id, ids: None,
        publish_deliveries=lambda ids: None,
    )
    by_name = {i["original_name"]: i["external_id"] for i in job_images(client, alice, url_job)}
    assert by_name == {http_images + "/u.png": "url-1", http_images + "/v.png": None}

    # A prefix's keys: the key is the external id.
    store = ext.store
    store.put(SHARED + "p/1.png", png())
    store.put(SHARED + "p/2.png", png((1, 2, 3)))
    response = client.post("/api/v1/jobs", json={"prefix": SHARED + "p/"}, headers=alice.headers)
    assert response.status_code == 202
    prefix_job = response.get_json()["id"]
    prefixes.run_enumerate_prefix(
        prefix_job,
        session_factory=ext.sessionmaker,
        store=store,
        settings=ext.settings,
        publish=lambda job_id, ids: None,
        publish_deliveries=lambda ids: None,
    )
    assert sorted(i["external_id"] for i in job_images(client, alice, prefix_job)) == [
        SHARED + "p/1.png",
        SHARED + "p/2.png",
    ]

    # Uploads: the file name, a zip member's path.
    files = {"files": [(io.BytesIO(png((5, 5, 5))), "up.png")]}
    response = client.post(
        "/api/v1/jobs/upload",
        data=files | {"archive": (io.BytesIO(make_zip({"dir/in.png": png((6, 6, 6))})), "z.zip")},
        headers=alice.headers,
        content_type="multipart/form-data",
    )
    assert response.status_code == 202, response.get_json()
    uploaded = job_images(client, alice, response.get_json()["id"])
    assert sorted(i["external_id"] for i in uploaded) == ["dir/in.png", "up.png"]

    # Too long, empty, or an unknown field: 422 before anything is created.
    before = counts(app)
    for bad in (
        {"keys": [{"key": SHARED + "z.png", "external_id": "x" * 513}]},
        {"keys": [{"key": SHARED + "z.png", "external_id": ""}]},
        {"keys": [{"key": SHARED + "z.png", "id": "1"}]},
        {"urls": [{"url": http_images + "/z.png", "external_id": "x" * 513}]},
    ):
        response = client.post("/api/v1/jobs", json=bad, headers=alice.headers)
        assert response.status_code == 422, (bad, response.get_json())
        assert response.get_json()["detail"]["json"], response.get_json()
    assert counts(app) == before


def test_the_document_states_both_shapes_of_a_key_or_url(client):
    spec = client.get("/api/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    for shape, name in (("JobFromKeysIn", "key"), ("JobFromUrlsIn", "url")):
        plain, with_id = schemas[shape]["properties"][name + "s"]["items"]["oneOf"]
        assert plain["type"] == "string"
        assert with_id["required"] == [name] and with_id["additionalProperties"] is False
        assert with_id["properties"]["external_id"]["maxLength"] == 512
    assert schemas["ImageOut"]["properties"]["external_id"]
    operation = spec["paths"]["/api/v1/imports"]["post"]
    assert set(operation["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"202", "403", "422"} <= set(operation["responses"])


def test_the_parser_reads_the_formats_alike():
    """The same three images in JSONL, CSV and COCO parse to the same rows."""
    jsonl = "\n".join(
        json.dumps(r)
        for r in (
            {"key": "a.png", "caption": "one", "score": -1, "external_id": "1"},
            {"key": "b.png", "caption": "two", "external_id": "2", "review": "rejected"},
            {"url": "https://example.com/c.png", "caption": "three", "external_id": "3"},
        )
    )
    csv_text = (
        "key,url,caption,score,external_id,review\n"
        "a.png,,one,-1,1,\n"
        "b.png,,two,,2,rejected\n"
        ",https://example.com/c.png,three,,3,\n"
    )
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "b.png", "review": "rejected"},
            {"id": 3, "file_name": "https://example.com/c.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "one", "score": -1},
            {"image_id": 2, "caption": "two"},
            {"image_id": 3, "caption": "three"},
        ],
    }

    def essence(rows):
        return [
            (r.key, r.url, r.caption, r.score, r.external_id, r.decision, r.review_text)
            for r in rows
        ]

    expected = [
        ("p/a.png", None, "one", -1.0, "1", None, None),
        ("p/b.png", None, "two", imports.UNSCORED, "2", ReviewDecision.REJECTED, None),
        (None, "https://example.com/c.png", "three", imports.UNSCORED, "3", None, None),
    ]
    assert essence(imports.parse(jsonl, "jsonl", key_prefix="p/")) == expected
    assert essence(imports.parse(csv_text.encode(), "csv", key_prefix="p/")) == expected
    assert essence(imports.parse(json.dumps(coco), "coco", key_prefix="p/")) == expected
    assert imports.guess_format("x/captions.JSON") == "coco"
    assert imports.guess_format("a.ndjson") == "jsonl" and imports.guess_format("a.txt") is None


def test_importing_twice_into_one_job_adds_nothing(session):
    """`import_captioned` only takes queued images: run again, the same rows."""
    from captioner.state import imports as state_imports

    job = jobs.create_job(session, "j", source="import:j")
    ids = jobs.submit_images(session, job.id, ["a.png", "b.png"])
    rows = [
        state_imports.ImportedCaption(ids[0], "a", -1.0),
        state_imports.ImportedCaption(ids[1], "b", 0.0, decision=ReviewDecision.APPROVED),
    ]
    assert state_imports.import_captioned(session, rows, reviewer_id=None) == sorted(ids)
    assert state_imports.import_captioned(session, rows, reviewer_id=None) == []
    session.expire_all()
    job = session.get(Job, job.id)
    assert (job.image_count, job.captioned_count, job.queued_count, job.unreviewed_count) == (
        2,
        2,
        0,
        1,
    )
    assert session.scalar(select(func.count()).select_from(Caption)) == 2
    assert session.scalar(select(func.count()).select_from(Review)) == 1
    assert {i.status for i in session.scalars(select(Image))} == {ImageStatus.CAPTIONED}
    assert job.status == JobStatus.QUEUED  # finishing is the caller's (finish_completed_jobs)
    assert jobs.recount(session) == []
    with pytest.raises(ValueError, match="corrected review needs"):
        state_imports.import_captioned(
            session,
            [state_imports.ImportedCaption(ids[0], "a", 0.0, decision=ReviewDecision.CORRECTED)],
            reviewer_id=None,
        )


def test_the_client_and_the_cli_import_and_name_each_bad_line(app, users, tmp_path):
    from click.testing import CliRunner
    from werkzeug.serving import make_server

    from captioner.cli import cli
    from captioner.client import CaptionerClient, Refused

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    token = users["reviewer"].token
    put(app, *(f"{SHARED}{n}.png" for n in range(1, 6)), *(SHARED + key for key in COCO_KEYS))
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"key": SHARED + "1.png", "caption": "one", "external_id": "e1"})
        + "\n"
        + json.dumps({"key": SHARED + "2.png", "caption": "two", "review": "approved"})
        + "\n"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text(f"key,caption\n{SHARED}3.png,three\n{SHARED}4.png,\n")
    try:
        with CaptionerClient(url, token) as client:
            job = client.import_captions(good)
            assert job.source == "import:good.jsonl" and job.progress.captioned == 2
            first, second = client.images(job.id)
            assert first.external_id == "e1" and first.caption.source == "import"
            assert first.caption.model_version_id is None and first.review is None
            assert second.review.decision == ReviewDecision.APPROVED
            rows = [{"key": SHARED + "5.png", "caption": "five"}]
            assert client.import_captions(rows, name="rows").name == "rows"
            coco = client.import_captions(COCO, key_prefix=SHARED)
            assert coco.image_count == 3
            with pytest.raises(Refused) as refused:
                client.import_captions(bad)
            assert refused.value.status == 422
            assert refused.value.reasons == {"line 3": ["caption missing"]}

        result = CliRunner().invoke(
            cli, ["import", str(good), "--name", "again", "--server", url, "--token", token]
        )
        assert result.exit_code == 0, result.output
        assert "imported: 2 captioned, finished" in result.output
        result = CliRunner().invoke(cli, ["import", str(bad), "--server", url, "--token", token])
        assert result.exit_code == 1
        assert "line 3: caption missing" in result.output
        assert "Error: 422: nothing imported: 1 problem" in result.output
    finally:
        server.shutdown()
