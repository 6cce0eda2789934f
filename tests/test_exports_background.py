"""Background exports (`POST /api/v1/exports`, the `captioner.export` task): every format read
back by the library it is meant for (Parquet by pyarrow, the image folder by `datasets`, the
WebDataset shards by `webdataset`, COCO / JSONL / CSV parsed), `external_id` in each, who sees
which export, a task run twice, a failure with its reason, missing images, progress, paging; on
SQLite and PostgreSQL.

The task runs in this process (`workers.exports.run_export` and the Celery task's `apply`)
against the app's own database and object store; the last tests run it in a real `captioner
worker` process behind the API and the `captioner export` command.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
import threading
import zipfile
from types import SimpleNamespace

import pytest
from PIL import Image as PILImage
from sqlalchemy import select, update

from captioner import export as export_module
from captioner.settings import Settings
from captioner.state import exports, jobs, reviews
from captioner.state.db import session_scope
from captioner.state.models import Export, ExportStatus, Image
from captioner.storage import StorageError
from captioner.tasks import TASK_EXPORT
from tests.dashboard_helpers import fake_caption, make_user
from workers import exports as export_worker

N_IMAGES = 5


def _png(i: int, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, ((i * 50) % 256, 20, 200)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(i: int, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, (10, (i * 70) % 256, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def live(migrated_url, tmp_path, publisher):
    """The dashboard over a migrated database (SQLite and PostgreSQL) and a file:// store."""
    from dashboard import create_app

    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=migrated_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        secret_key="test-secret",
        submit_rate_limit="1000/minute",
        login_rate_limit="1000/minute",
    )
    app = create_app(settings, publisher=publisher)
    app.config["TESTING"] = True
    yield app
    app.extensions["captioner"].engine.dispose()


@pytest.fixture
def client(live):
    return live.test_client()


@pytest.fixture
def people(live):
    return {
        "admin": make_user(live, "admin@example.com", "admin"),
        "reviewer": make_user(live, "rev@example.com", "reviewer"),
        "alice": make_user(live, "alice@example.com", "submitter"),
        "bob": make_user(live, "bob@example.com", "submitter"),
    }


def _sessions(app):
    return app.extensions["captioner"].sessionmaker


def _store(app):
    return app.extensions["captioner"].store


def make_job(app, owner, n: int = N_IMAGES, *, missing: tuple[int, ...] = ()) -> list[int]:
    """A job of `owner` with n captioned images (PNG and JPEG, each with an external id; the
    bytes of those in `missing` left out of the store): the image ids."""
    store = _store(app)
    with session_scope(_sessions(app)) as s:
        job = jobs.create_job(s, "to export", owner_id=owner.id)
        keys = []
        for i in range(n):
            key = f"uploads/{owner.id}/{job.id}/{i:03d}" + (".png" if i % 2 == 0 else "")
            if i not in missing:
                store.put(key, _png(i) if i % 2 == 0 else _jpeg(i))
            keys.append(key)
        ids = jobs.submit_images(s, job.id, keys)
        for i, image_id in enumerate(ids):
            name = f"photo {i}.png" if i % 2 == 0 else f"https://example.com/p/{i}?size=large"
            s.execute(
                update(Image)
                .where(Image.id == image_id)
                .values(original_name=name, external_id=f"sku-{i}" if i != 1 else None)
            )
        job_id = job.id
    fake_caption(app, job_id, texts=[f"model caption {i}" for i in range(n)])
    return ids


def review(app, reviewer, image_id: int, decision: str, text: str | None = None) -> None:
    with session_scope(_sessions(app)) as s:
        reviews.add_review(
            s, image_id=image_id, decision=decision, text=text, reviewer_id=reviewer.id
        )


def job_of(app, image_id: int) -> int:
    with _sessions(app)() as s:
        return s.get(Image, image_id).job_id


def start(client, account, fmt: str, **body):
    return client.post("/api/v1/exports", json={"format": fmt, **body}, headers=account.headers)


def run(app, export_id: int) -> dict:
    return export_worker.run_export(export_id, sessions=_sessions(app), store=_store(app))


def export_file(app, client, account, fmt: str, **body) -> tuple[dict, bytes]:
    """Start an export through the API, run its task here, and download it."""
    created = start(client, account, fmt, **body)
    assert created.status_code == 202, created.json
    assert run(app, created.json["id"])["outcome"] == "done"
    meta = client.get(f"/api/v1/exports/{created.json['id']}", headers=account.headers).json
    assert meta["status"] == "done" and meta["progress"] == 100.0, meta
    download = client.get(meta["download_url"], headers=account.headers)
    assert download.status_code == 200
    assert download.headers["Content-Disposition"] == f'attachment; filename="{meta["file_name"]}"'
    assert int(download.headers["Content-Length"]) == meta["size_bytes"] == len(download.data)
    return meta, download.data


@pytest.fixture
def reviewed_job(live, people):
    """Alice's job: image 0 corrected (text with a formula start), image 2 rejected."""
    ids = make_job(live, people["alice"])
    review(live, people["reviewer"], ids[0], "corrected", "=a corrected caption")
    review(live, people["reviewer"], ids[2], "rejected")
    return ids


# --- each format, read back ---------------------------------------------------------------


def test_jsonl_and_csv_carry_external_id(live, client, people, reviewed_job, publisher):
    alice, ids = people["alice"], reviewed_job
    job_id = job_of(live, ids[0])
    meta, data = export_file(live, client, alice, "jsonl", job_id=job_id)
    assert publisher.tasks[-1] == (TASK_EXPORT, (meta["id"],))
    assert meta["rows_total"] == meta["rows_done"] == N_IMAGES
    assert meta["file_name"] == f"captions-job{job_id}-both.jsonl"
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["image_id"] for r in rows] == ids
    assert [r["external_id"] for r in rows] == ["sku-0", None, "sku-2", "sku-3", "sku-4"]
    assert rows[0]["reviewed_caption"] == "=a corrected caption"
    assert rows[2]["review_decision"] == "rejected" and rows[2]["reviewed_caption"] is None
    assert rows[3]["model_caption"] == "model caption 3"

    _, data = export_file(live, client, alice, "csv", job_id=job_id, which="reviewed")
    table = list(csv.DictReader(io.StringIO(data.decode())))
    assert [(r["image_id"], r["external_id"]) for r in table] == [(str(ids[0]), "sku-0")]
    assert table[0]["reviewed_caption"] == "'=a corrected caption"  # formula-safe
    assert "model_caption" not in table[0]

    # The synchronous export carries it too.
    sync = client.get(f"/api/v1/export?job_id={job_id}&format=csv", headers=alice.headers)
    header, *lines = list(csv.reader(io.StringIO(sync.data.decode())))
    assert "external_id" in header and lines[0][header.index("external_id")] == "sku-0"


def test_coco_is_written_streamed_and_parses(live, client, people, reviewed_job):
    job_id = job_of(live, reviewed_job[0])
    _, data = export_file(live, client, people["alice"], "coco", job_id=job_id)
    coco = json.loads(data)
    assert [i["id"] for i in coco["images"]] == reviewed_job
    assert coco["images"][3]["external_id"] == "sku-3"
    sources = [(a["image_id"], a["source"]) for a in coco["annotations"]]
    assert sources[:2] == [(reviewed_job[0], "reviewed"), (reviewed_job[0], "model")]
    assert len(coco["annotations"]) == N_IMAGES + 1
    assert [a["id"] for a in coco["annotations"]] == list(range(1, N_IMAGES + 2))


def test_coco_annotations_spill_to_disk_and_stay_valid(monkeypatch):
    """Past SPOOL_BYTES the annotations wait on disk; the document is still one valid JSON."""
    monkeypatch.setattr(export_module, "SPOOL_BYTES", 64)
    rows = [
        export_module.ExportRow(i, 1, f"{i}.png", f"k/{i}", 1, 1, "é" * 50, -1.0, None, None, None)
        for i in range(1, 1200)
    ]
    out = io.BytesIO()
    export_module.write_export(iter(rows), "coco", out, "model")
    coco = json.loads(out.getvalue())
    assert len(coco["images"]) == len(coco["annotations"]) == 1199
    assert "".join(export_module.render(iter(rows), "coco", "model")) == out.getvalue().decode()


def test_parquet_reads_back_with_its_schema(live, client, people, reviewed_job):
    import pyarrow as pa
    import pyarrow.parquet as pq

    job_id = job_of(live, reviewed_job[0])
    _, data = export_file(live, client, people["alice"], "parquet", job_id=job_id)
    parquet = pq.ParquetFile(io.BytesIO(data))
    table = parquet.read()
    assert table.schema.field("external_id").type == pa.string()
    assert table.schema.field("width").type == pa.int32()
    assert table.schema.field("model_score").type == pa.float64()
    assert table.schema.metadata[b"caption_source"] == b"both"
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == reviewed_job
    assert rows[0]["external_id"] == "sku-0" and rows[1]["external_id"] is None
    assert rows[0]["reviewed_caption"] == "=a corrected caption"
    assert rows[4]["width"] == 24 and rows[4]["model_caption"] == "model caption 4"


def test_parquet_is_written_in_row_groups(monkeypatch, tmp_path):
    import pyarrow.parquet as pq

    monkeypatch.setattr(export_module, "PARQUET_ROW_GROUP", 4)
    rows = [
        export_module.ExportRow(i, 1, "a", "k", None, None, None, None, None, None, None, f"e{i}")
        for i in range(10)
    ]
    path = tmp_path / "x.parquet"
    with path.open("wb") as out:
        assert export_module.write_export(iter(rows), "parquet", out).rows == 10
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 3
    assert parquet.read().column("external_id").to_pylist() == [f"e{i}" for i in range(10)]


def test_image_folder_loads_with_datasets(
    live, client, people, reviewed_job, tmp_path, monkeypatch
):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.disable_progress_bars()
    job_id = job_of(live, reviewed_job[0])
    meta, data = export_file(live, client, people["alice"], "imagefolder", job_id=job_id)
    assert meta["file_name"].endswith(".zip") and meta["missing_images"] == 0
    archive = tmp_path / meta["file_name"]
    archive.write_bytes(data)
    names = zipfile.ZipFile(archive).namelist()
    assert "metadata.parquet" in names
    assert f"images/{reviewed_job[0]}-photo_0.png" in names
    assert f"images/{reviewed_job[1]}-1.jpg" in names  # a URL's name, its bytes' suffix

    direct = datasets.load_dataset(
        "imagefolder", data_files=str(archive), split="train", cache_dir=str(tmp_path / "c1")
    )
    folder = tmp_path / "extracted"
    zipfile.ZipFile(archive).extractall(folder)
    extracted = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c2")
    )
    for ds in (direct, extracted):
        rows = sorted(ds, key=lambda r: r["image_id"])
        assert [r["image_id"] for r in rows] == reviewed_job
        assert [r["external_id"] for r in rows] == ["sku-0", None, "sku-2", "sku-3", "sku-4"]
        assert rows[0]["text"] == "=a corrected caption"  # the reviewed caption wins
        assert rows[2]["text"] == "model caption 2"  # rejected: the model's
        assert rows[0]["image"].size == (24, 16) and rows[1]["image"].size == (20, 12)
        assert rows[1]["original_name"] == "https://example.com/p/1?size=large"


def test_webdataset_shards_read_with_webdataset(
    live, client, people, reviewed_job, tmp_path, monkeypatch
):
    import webdataset as wds

    monkeypatch.setattr(export_module, "SHARD_SAMPLES", 2)
    meta, data = export_file(
        live, client, people["alice"], "webdataset", job_id=job_of(live, reviewed_job[0])
    )
    assert meta["shards"] == 3
    with tarfile.open(fileobj=io.BytesIO(data)) as outer:
        assert outer.getnames() == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
        outer.extractall(tmp_path, filter="data")
    urls = [str(tmp_path / f"shard-{n:06d}.tar") for n in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [int(s["__key__"]) for s in samples] == reviewed_job
    assert [s["json"]["external_id"] for s in samples] == ["sku-0", None, "sku-2", "sku-3", "sku-4"]
    assert samples[0]["txt"] == "=a corrected caption" and samples[3]["txt"] == "model caption 3"
    assert samples[0]["png"].size == (24, 16) and samples[1]["jpg"].size == (20, 12)


# --- who sees what --------------------------------------------------------------------------


def test_another_users_export_is_404(live, client, people):
    alice, bob = people["alice"], people["bob"]
    ids = make_job(live, alice, 2)
    job_id = job_of(live, ids[0])
    created = start(client, alice, "jsonl", job_id=job_id).json
    run(live, created["id"])
    for path in (f"/api/v1/exports/{created['id']}", f"/api/v1/exports/{created['id']}/download"):
        assert client.get(path, headers=bob.headers).status_code == 404, path
        assert client.get(path, headers=people["reviewer"].headers).status_code == 404, path
        assert client.get(path, headers=people["admin"].headers).status_code == 200, path
    assert client.get("/api/v1/exports", headers=bob.headers).json["items"] == []
    # Bob cannot export Alice's job either; a reviewer (who sees every job) can.
    assert start(client, bob, "jsonl", job_id=job_id).status_code == 404
    theirs = start(client, people["reviewer"], "parquet", job_id=job_id)
    assert theirs.status_code == 202 and theirs.json["rows_total"] == 2
    # Without a job: a submitter's export holds only their own jobs.
    make_job(live, bob, 3)
    mine = start(client, bob, "jsonl").json
    assert mine["job_id"] is None and mine["rows_total"] == 3
    run(live, mine["id"])
    got = client.get(f"/api/v1/exports/{mine['id']}/download", headers=bob.headers)
    assert len(got.data.decode().splitlines()) == 3
    assert client.get("/api/v1/exports/99999", headers=bob.headers).status_code == 404


def test_bad_requests_are_refused_with_a_reason(live, client, people):
    alice = people["alice"]
    for body in ({"format": "xml"}, {"format": "jsonl", "which": "some"}, {"job_id": 0}):
        refused = client.post("/api/v1/exports", json=body, headers=alice.headers)
        assert refused.status_code == 422, body
        assert refused.json["detail"], refused.json
    assert client.post("/api/v1/exports", json={"format": "jsonl"}).status_code == 401
    created = start(client, alice, "csv").json
    early = client.get(f"/api/v1/exports/{created['id']}/download", headers=alice.headers)
    assert early.status_code == 409 and "queued" in early.json["message"]


def test_list_is_newest_first_by_keyset(live, client, people):
    alice = people["alice"]
    made = [start(client, alice, fmt).json["id"] for fmt in ("jsonl", "csv", "coco")]
    first = client.get("/api/v1/exports?limit=2", headers=alice.headers).json
    assert [e["id"] for e in first["items"]] == made[::-1][:2]
    assert first["items"][0]["status"] == "queued" and first["items"][0]["download_url"] is None
    rest = client.get(
        f"/api/v1/exports?limit=2&before={first['next_before']}", headers=alice.headers
    ).json
    assert [e["id"] for e in rest["items"]] == [made[0]] and rest["next_before"] is None


# --- the task ----------------------------------------------------------------------------


def test_export_task_run_twice_gives_one_file(live, client, people):
    alice = people["alice"]
    job_id = job_of(live, make_job(live, alice, 3)[0])
    created = start(client, alice, "parquet", job_id=job_id).json
    assert run(live, created["id"])["outcome"] == "done"
    assert run(live, created["id"])["outcome"] == "skipped"  # a redelivered message
    # A worker lost mid-way leaves the export running: the next delivery writes it again.
    with session_scope(_sessions(live)) as s:
        s.execute(update(Export).values(status=ExportStatus.RUNNING))
    assert run(live, created["id"])["outcome"] == "done"
    prefix = f"exports/{alice.id}/{created['id']}/"
    assert list(_store(live).list(prefix)) == [f"{prefix}captions-job{job_id}-both.parquet"]
    meta = client.get(f"/api/v1/exports/{created['id']}", headers=alice.headers).json
    assert (meta["status"], meta["rows_done"]) == ("done", 3)


def test_failed_export_has_a_reason(live, client, people, monkeypatch):
    """The Celery task (run here with `apply`): a store that refuses the upload fails the
    export with a reason a person can read; the download then answers 409."""
    alice = people["alice"]
    ids = make_job(live, alice, 2)
    created = start(client, alice, "jsonl", job_id=job_of(live, ids[0])).json

    class BrokenStore:
        def __init__(self, store):
            self.store = store

        def get(self, key):
            return self.store.get(key)

        def put_file(self, key, path, content_type=None):
            raise StorageError("S3 put 'exports/...' failed: SlowDown reduce your request rate")

    broken = SimpleNamespace(sessions=_sessions(live), store=BrokenStore(_store(live)))
    monkeypatch.setattr(export_worker, "resources", lambda settings=None: broken)
    result = export_worker.export_task.apply(args=(created["id"],)).get()
    assert result["outcome"] == "failed"
    meta = client.get(f"/api/v1/exports/{created['id']}", headers=alice.headers).json
    assert meta["status"] == "failed" and meta["download_url"] is None
    assert meta["error"].startswith("writing the export failed: StorageError: S3 put")
    assert "SlowDown" in meta["error"]
    assert (
        client.get(f"/api/v1/exports/{created['id']}/download", headers=alice.headers).status_code
        == 409
    )
    # A failed export stays failed: the task again changes nothing.
    assert run(live, created["id"])["outcome"] == "skipped"


def test_missing_images_are_left_out_and_counted(live, client, people):
    alice = people["alice"]
    ids = make_job(live, alice, 4, missing=(2,))
    meta, data = export_file(live, client, alice, "imagefolder", job_id=job_of(live, ids[0]))
    assert meta["missing_images"] == 1 and meta["rows_done"] == 4
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert sum(n.startswith("images/") for n in names) == 3
    assert not any(n.startswith(f"images/{ids[2]}-") for n in names)


def test_progress_is_recorded_as_rows_are_written(live, client, people, monkeypatch):
    alice = people["alice"]
    ids = make_job(live, alice, 5)
    created = start(client, alice, "csv", job_id=job_of(live, ids[0])).json
    seen = []
    original = exports.record_progress

    def record(session, export_id, rows_done):
        original(session, export_id, rows_done)
        seen.append(session.scalar(select(Export.rows_done).where(Export.id == export_id)))

    monkeypatch.setattr(export_worker, "PROGRESS_EVERY", 2)
    monkeypatch.setattr(exports, "record_progress", record)
    run(live, created["id"])
    assert seen == [2, 4]


def test_an_imported_caption_is_exported_unless_a_model_captioned_the_image(session):
    """An imported caption (no model version) is the image's caption until a model writes
    one; the same on both backends (NULL sorts first on purpose)."""
    from captioner.export import export_rows
    from captioner.state import images
    from captioner.state.models import Caption, CaptionSource, ModelVersion

    version = ModelVersion(name="v1", checkpoint_uri="x")
    session.add(version)
    session.flush()
    job = jobs.create_job(session, "imported")
    only_imported, both = jobs.submit_images(session, job.id, ["i/1.png", "i/2.png"])
    for image_id in (only_imported, both):
        session.add(
            Caption(
                image_id=image_id,
                model_version_id=None,
                source=CaptionSource.IMPORT,
                text=f"imported {image_id}",
                score=-0.3,
            )
        )
    session.flush()
    images.save_caption(
        session, image_id=both, model_version_id=version.id, text="by the model", score=-1.0
    )
    session.flush()
    rows = list(export_rows(session, job_id=job.id, which="model"))
    assert [(r.image_id, r.model_caption) for r in rows] == [
        (only_imported, f"imported {only_imported}"),
        (both, "by the model"),
    ]


def test_state_transitions_are_conditional(live, people):
    with session_scope(_sessions(live)) as s:
        row = exports.create_export(s, owner_id=people["alice"].id, fmt="jsonl")
        export_id = row.id
    with session_scope(_sessions(live)) as s:
        assert not exports.finish_export(s, export_id, object_key="k", size_bytes=1, rows_done=0)
        assert exports.start_export(s, export_id)
        assert exports.finish_export(s, export_id, object_key="k", size_bytes=1, rows_done=0)
        assert not exports.start_export(s, export_id)
        assert not exports.fail_export(s, export_id, "late")
    with _sessions(live)() as s:
        done = s.get(Export, export_id)
        assert (done.status, done.error, done.object_key) == (ExportStatus.DONE, None, "k")


# --- with a real worker -------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory, redis_dbs):
    """A database, a `captioner worker` process on the maintenance queue, and Redis."""
    from captioner.state import migrate
    from tests.conftest import free_port
    from tests.workers_fixtures import Stack, WorkerProcess

    root = tmp_path_factory.mktemp("exports-worker")
    url = f"sqlite:///{root / 'captioner.db'}"
    migrate.upgrade(url)
    stack = Stack(
        root=root,
        database_url=url,
        redis_url=redis_dbs.flushed("main"),
        checkpoint=root / "no-checkpoint",  # exports need no model
        extra_env={
            "CAPTIONER_METRICS_PORT": str(free_port()),
            "CAPTIONER_SECRET_KEY": "exports-worker-secret",
        },
    )
    worker = WorkerProcess(stack, "exports", queues="maintenance").wait_ready()
    yield stack, worker
    worker.stop()
    stack.close()
    redis_dbs.flushed("main")


@pytest.fixture
def worker_app(worker_stack):
    from dashboard import create_app

    stack, _ = worker_stack
    app = create_app(stack.settings())  # the real publisher: tasks go to Redis
    app.config["TESTING"] = True
    yield app
    app.extensions["captioner"].engine.dispose()


def test_export_through_the_api_with_a_real_worker(worker_stack, worker_app, tmp_path):
    import pyarrow.parquet as pq

    from tests.workers_fixtures import wait_for

    client = worker_app.test_client()
    carol = make_user(worker_app, "carol@example.com", "submitter")
    ids = make_job(worker_app, carol, 4)
    created = start(client, carol, "parquet", job_id=job_of(worker_app, ids[0]))
    assert created.status_code == 202 and created.json["status"] == "queued"

    def done():
        meta = client.get(f"/api/v1/exports/{created.json['id']}", headers=carol.headers).json
        return meta if meta["status"] in ("done", "failed") else None

    meta = wait_for(done, 60, what="the worker wrote the export")
    assert meta["status"] == "done", meta
    data = client.get(meta["download_url"], headers=carol.headers).data
    table = pq.read_table(io.BytesIO(data))
    assert table.column("image_id").to_pylist() == ids
    assert table.column("external_id").to_pylist() == ["sku-0", None, "sku-2", "sku-3"]
    _, worker = worker_stack
    assert f"export {created.json['id']} (parquet): 4 rows" in worker.log()


def test_cli_export_runs_in_the_background_and_downloads(worker_stack, worker_app, tmp_path):
    """`captioner export JOB --format imagefolder` against the app on a real socket and the
    real worker: a progress bar, then the file downloaded; a bad token is one readable line."""
    from click.testing import CliRunner
    from werkzeug.serving import make_server

    from captioner.cli import cli

    dave = make_user(worker_app, "dave@example.com", "submitter")
    ids = make_job(worker_app, dave, 3)
    server = make_server("127.0.0.1", 0, worker_app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    env = {"CAPTIONER_TOKEN": dave.token}
    try:
        job = str(job_of(worker_app, ids[0]))
        out = tmp_path / "downloads"
        out.mkdir()
        args = ["export", job, "--format", "imagefolder", "--server", url, "-o", str(out)]
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code == 0, result.output
        [written] = list(out.iterdir())
        assert written.name == f"captions-job{job}-both.zip"
        assert "metadata.parquet" in zipfile.ZipFile(written).namelist()
        stream = CliRunner().invoke(
            cli, ["export", job, "--stream", "--format", "parquet", "--server", url], env=env
        )
        assert stream.exit_code != 0 and "--stream takes jsonl, csv, coco" in stream.output
        bad = CliRunner().invoke(
            cli, ["export", job, "--server", url], env={"CAPTIONER_TOKEN": "cap_wrong"}
        )
        assert bad.exit_code != 0 and "401" in bad.output
    finally:
        server.shutdown()


def test_put_file_streams_a_file_into_either_store(object_store, tmp_path):
    """Export files are uploaded from disk (`ObjectStore.put_file`): multipart on S3 past its
    8 MB threshold."""
    import os

    data = os.urandom(9 * 1024 * 1024)
    path = tmp_path / "big.parquet"
    path.write_bytes(data)
    object_store.put_file("exports/1/2/big.parquet", path, "application/vnd.apache.parquet")
    assert object_store.size("exports/1/2/big.parquet") == len(data)
    assert object_store.get("exports/1/2/big.parquet") == data


def test_export_page_starts_an_export_and_follows_it(worker_stack, worker_app, tmp_path):
    """In Chromium: the export page starts an export, lists it, follows it until the worker is
    done and links its file; the file downloads through that link."""
    from playwright.sync_api import expect, sync_playwright

    from tests.dashboard_helpers import PASSWORD
    from tests.live_server import DashboardProcess
    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

    stack, _ = worker_stack
    dashboard = DashboardProcess(stack.env, tmp_path / "dashboard.log").wait_ready()
    try:
        erin = make_user(worker_app, "erin@example.com", "submitter")
        job_id = job_of(worker_app, make_job(worker_app, erin, 3)[0])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(dashboard.url + "/login")
            page.fill("#login-form input[name=email]", "erin@example.com")
            page.fill("#login-form input[name=password]", PASSWORD)
            page.click("#login-form button[type=submit]")
            page.goto(dashboard.url + "/export")
            page.select_option("#export-form select[name=job_id]", str(job_id))
            page.select_option("#export-form select[name=format]", "webdataset")
            page.click("#export-form button[type=submit]")
            expect(page.locator("#export-message")).to_contain_text("started")
            row = page.locator("#exports-table tbody tr").first
            expect(row).to_have_attribute("data-status", "done", timeout=60_000)
            expect(row.locator("td.status")).to_have_text("done")
            expect(row.locator(".rows")).to_have_text("3 / 3 rows")
            link = row.locator("a.download")
            expect(link).to_have_text(f"captions-job{job_id}-both.tar")
            page.screenshot(path=str(tmp_path / "export-page.png"), full_page=True)
            with page.expect_download() as download:
                link.click()
            path = download.value.path()
            with tarfile.open(path) as outer:
                assert outer.getnames() == ["shard-000000.tar"]
            browser.close()
        assert not errors, errors
    finally:
        dashboard.stop()
