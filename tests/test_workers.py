"""Workers against the real thing: Redis (the session's private redis-server), real
`captioner worker` processes (celery, solo pool), an SQLite file (PostgreSQL for the two-worker
race), a file:// object store and the tiny untrained model.

One worker process serves most tests (module scope: starting one costs seconds); the kill -9,
Redis-wipe and two-worker tests start their own.
"""

from __future__ import annotations

import base64
import json
import sys

import pytest
from sqlalchemy import select, update

from captioner.state import images, jobs, reviews
from captioner.state.db import session_scope
from captioner.state.models import (
    Caption,
    Image,
    ImageStatus,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Review,
    ReviewDecision,
    utcnow,
)
from tests.conftest import (
    _create_postgres_database,
    _drop_postgres_database,
    _postgres_url_for,
    free_port,
)
from tests.workers_fixtures import (
    Stack,
    WorkerProcess,
    png,
    wait_for,
    write_checkpoint,
)


def _migrated_sqlite(path) -> str:
    from captioner.state import migrate

    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {"a": write_checkpoint(root / "a", seed=0), "b": write_checkpoint(root / "b", seed=1)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoints, redis_dbs):
    root = tmp_path_factory.mktemp("stack")
    s = Stack(
        root=root,
        database_url=_migrated_sqlite(root / "captioner.db"),
        redis_url=redis_dbs.flushed("main"),  # the shared worker's; per-test stacks use "scratch"
        checkpoint=checkpoints["a"],
        extra_env={"CAPTIONER_METRICS_PORT": str(free_port())},
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def worker(stack):
    w = WorkerProcess(stack, "shared").wait_ready()
    yield w
    w.stop()


@pytest.fixture
def env(stack, monkeypatch):
    """This process's settings point at the shared stack (for the in-process sweeper)."""
    stack.apply_env(monkeypatch)
    return stack


def _done(stack: Stack, job_id: int):
    p = stack.progress(job_id)
    return p if p.is_complete else None


def _finish_job(stack: Stack, job_id: int) -> None:
    with session_scope(stack.sessions) as s:
        jobs.finish_completed_jobs(s)


# --- 1. a 200-image job ---------------------------------------------------------------------


def test_200_images_each_captioned_exactly_once(stack, worker, env):
    job_id, ids = stack.submit_pngs(200, name="two-hundred")
    progress = wait_for(lambda: _done(stack, job_id), 120, what="200 images captioned")
    assert progress.captioned == 200 and progress.failed == 0
    assert set(stack.caption_counts(ids).values()) == {1} and len(stack.caption_counts(ids)) == 200
    by_key = stack.images(ids)
    # Claimed once each: no message ran an image twice.
    assert {im.attempts for im in by_key.values()} == {1}
    assert all(im.width == 32 and im.height == 32 for im in by_key.values())
    with stack.sessions() as s:
        captions = s.scalars(select(Caption).where(Caption.image_id.in_(ids))).all()
        assert all(c.created_at == c.updated_at for c in captions)  # never re-written
        assert all(c.text and c.candidates for c in captions)
        job = s.get(jobs.Job, job_id)
        assert job.status == JobStatus.FINISHED
        assert (job.captioned_count, job.failed_count, job.image_count) == (200, 0, 200)
    assert worker.alive()
    assert "batch done" in worker.log()


# --- messages carry ids only -----------------------------------------------------------------


def test_message_carries_ids_only(stack, redis_dbs):
    # A Redis db no worker listens on, so the message stays there to be read raw.
    settings = stack.settings().model_copy(
        update={"redis_url": redis_dbs.flushed("scratch"), "batch_size": 4}
    )
    from captioner.tasks import publish_caption_batches

    assert publish_caption_batches(7, [1, 2, 3, 4, 5], settings=settings) == 2
    assert publish_caption_batches(8, [9], interactive=True, settings=settings) == 1
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    bulk = [json.loads(m) for m in client.lrange("caption", 0, -1)]
    interactive = [json.loads(m) for m in client.lrange("caption.interactive", 0, -1)]
    client.flushdb()
    assert len(bulk) == 2 and len(interactive) == 1
    bodies = []
    for envelope in bulk + interactive:
        assert envelope["content-type"] == "application/json"
        assert envelope["headers"]["task"] == "captioner.caption_batch"
        body = json.loads(base64.b64decode(envelope["body"]))
        args, kwargs, _embed = body
        assert kwargs == {}
        bodies.append(args)
        assert len(envelope["body"]) < 400  # ids, not bytes
    assert sorted(bodies) == [[7, [1, 2, 3, 4]], [7, [5]], [8, [9]]]
    for args in bodies:
        assert all(isinstance(i, int) for i in args[1])


# --- 5. bad inputs fail alone -----------------------------------------------------------------


def test_bad_inputs_fail_alone_with_reasons(stack, worker, env, bad_inputs):
    items = [(f"mixed/good-{i}.png", png(i)) for i in range(10)]
    expected = {}
    for name, (data, exp) in bad_inputs.items():
        key = f"mixed/corpus/{name}"
        items.append((key, data))
        expected[key] = exp
    items.append(("mixed/missing.png", None))  # never stored
    job_id, ids = stack.submit(items, name="mixed")
    wait_for(lambda: _done(stack, job_id), 90, what="mixed job done")
    by_key = {im.storage_key: im for im in stack.images(ids).values()}
    for i in range(10):
        assert by_key[f"mixed/good-{i}.png"].status == ImageStatus.CAPTIONED
    for key, exp in expected.items():
        im = by_key[key]
        if exp.error is None:
            assert im.status == ImageStatus.CAPTIONED, (key, im.failure_reason)
        else:
            assert im.status == ImageStatus.FAILED, key
            assert im.failure_reason, key
            assert exp.reason_contains.lower() in im.failure_reason.lower(), (
                key,
                im.failure_reason,
            )
    missing = by_key["mixed/missing.png"]
    assert missing.status == ImageStatus.FAILED and "not found" in missing.failure_reason
    counts = stack.caption_counts(ids)
    assert all(
        counts.get(im.id) == (1 if im.status == ImageStatus.CAPTIONED else None)
        for im in by_key.values()
    )
    # The worker stays up and keeps working.
    assert worker.alive()
    job2, _ = stack.submit_pngs(3, name="after-bad")
    wait_for(lambda: _done(stack, job2), 60, what="job after the bad inputs")


# --- idempotency and reviews (the task run in-process) ----------------------------------------


def _run_batch_in_process(job_id, ids):
    from workers.caption import caption_batch

    return caption_batch.apply(args=(job_id, ids)).get()


def _snapshot(stack, ids):
    with stack.sessions() as s:
        caps = s.execute(
            select(
                Caption.id,
                Caption.image_id,
                Caption.model_version_id,
                Caption.text,
                Caption.score,
                Caption.updated_at,
            )
            .where(Caption.image_id.in_(ids))
            .order_by(Caption.id)
        ).all()
        imgs = s.execute(
            select(Image.id, Image.status, Image.failure_reason, Image.attempts)
            .where(Image.id.in_(ids))
            .order_by(Image.id)
        ).all()
    return caps, imgs


def test_task_run_twice_gives_the_same_rows(stack, env):
    job_id, ids = stack.submit_pngs(5, name="twice", publish=False)
    first = _run_batch_in_process(job_id, ids)
    assert first["captioned"] == 5
    before = _snapshot(stack, ids)
    second = _run_batch_in_process(job_id, ids)
    assert second == {"outcome": "nothing_to_claim"}
    assert _snapshot(stack, ids) == before
    # A redelivery after the images were handed out again (e.g. a lease expired): same rows.
    with session_scope(stack.sessions) as s:
        s.execute(update(Image).where(Image.id.in_(ids)).values(status=ImageStatus.QUEUED))
    _run_batch_in_process(job_id, ids)
    caps_after, _ = _snapshot(stack, ids)
    assert [(c.id, c.image_id, c.model_version_id, c.text) for c in caps_after] == [
        (c.id, c.image_id, c.model_version_id, c.text) for c in before[0]
    ]


def test_model_caption_never_overwrites_a_review(stack, env):
    job_id, ids = stack.submit_pngs(2, name="reviewed", publish=False)
    _run_batch_in_process(job_id, ids)
    reviewed, other = ids
    with session_scope(stack.sessions) as s:
        caption = s.scalars(select(Caption).where(Caption.image_id == reviewed)).one()
        caption.text = "a red square on a table"  # the text the reviewer approved
        reviews.add_review(
            s, image_id=reviewed, decision=ReviewDecision.APPROVED, caption_id=caption.id
        )
        other_caption = s.scalars(select(Caption).where(Caption.image_id == other)).one()
        other_caption.text = "stale text, not reviewed"
        s.execute(update(Image).where(Image.id.in_(ids)).values(status=ImageStatus.QUEUED))
    rerun = _run_batch_in_process(job_id, ids)
    assert rerun["captioned"] == 2, rerun
    with stack.sessions() as s:
        kept = s.scalars(select(Caption).where(Caption.image_id == reviewed)).one()
        assert kept.text == "a red square on a table"
        review = s.scalars(select(Review).where(Review.image_id == reviewed)).one()
        assert review.text == "a red square on a table" and review.caption_id == kept.id
        redone = s.scalars(select(Caption).where(Caption.image_id == other)).one()
        assert redone.text != "stale text, not reviewed"  # unreviewed: the model may rewrite it


def _set_job_options(stack, job_id, options):
    from captioner.state.models import Job

    with session_scope(stack.sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(options=options))


def _candidate_counts(stack, ids):
    with stack.sessions() as s:
        return sorted(
            len(c.candidates) for c in s.scalars(select(Caption).where(Caption.image_id.in_(ids)))
        )


def test_a_batch_decodes_with_its_jobs_beams_and_n_best(stack, env):
    job_id, ids = stack.submit_pngs(3, name="beams", publish=False)
    _set_job_options(stack, job_id, {"num_beams": 3, "n_best": 3})
    assert _run_batch_in_process(job_id, ids)["captioned"] == 3
    assert _candidate_counts(stack, ids) == [3, 3, 3]
    with stack.sessions() as s:
        for c in s.scalars(select(Caption).where(Caption.image_id.in_(ids))):
            assert c.text == c.candidates[0]["text"]
            scores = [cand["score"] for cand in c.candidates]
            assert scores == sorted(scores, reverse=True)

    greedy_job, greedy_ids = stack.submit_pngs(2, name="greedy", publish=False)
    _set_job_options(stack, greedy_job, {"num_beams": 1, "n_best": 1})
    _run_batch_in_process(greedy_job, greedy_ids)
    assert _candidate_counts(stack, greedy_ids) == [1, 1]


def test_a_job_without_options_gets_three_alternatives(stack, env):
    job_id, ids = stack.submit_pngs(2, name="bulk-default", publish=False)
    _run_batch_in_process(job_id, ids)
    assert _candidate_counts(stack, ids) == [3, 3]


def test_decode_options_are_bounded():
    from captioner.settings import Settings
    from workers.model_runtime import MAX_NUM_BEAMS, ModelRuntime

    runtime = ModelRuntime(Settings())
    huge = runtime.decode_options({"num_beams": 500, "n_best": 900})
    assert (huge.num_beams, huge.n_best) == (MAX_NUM_BEAMS, MAX_NUM_BEAMS)
    narrow = runtime.decode_options({"num_beams": 2, "n_best": 5})
    assert (narrow.num_beams, narrow.n_best) == (2, 2)
    junk = runtime.decode_options({"num_beams": "x", "n_best": 0})
    assert (junk.num_beams, junk.n_best) == (3, 1)
    default = runtime.decode_options({})
    assert (default.num_beams, default.n_best) == (3, 3)
    pinned = ModelRuntime(Settings(caption_num_beams=1)).decode_options(None)
    assert (pinned.num_beams, pinned.n_best) == (1, 1)


# --- 3. Redis wiped while a job is half done --------------------------------------------------


def test_redis_wiped_midway_sweeper_recovers(tmp_path, checkpoints, monkeypatch, redis_dbs):
    root = tmp_path / "wipe"
    root.mkdir()
    stack = Stack(
        root=root,
        database_url=_migrated_sqlite(root / "captioner.db"),
        redis_url=redis_dbs.flushed("scratch"),
        checkpoint=checkpoints["a"],
        extra_env={
            "CAPTIONER_QUEUED_TIMEOUT_SECONDS": "2",
            "CAPTIONER_CAPTION_MAX_NEW_TOKENS": "12",
        },
    )
    stack.apply_env(monkeypatch)
    job_id, ids = stack.submit_pngs(200, name="wipe", publish=False)
    from captioner.tasks import publish_caption_batches

    publish_caption_batches(job_id, ids, settings=stack.settings())
    w = WorkerProcess(stack, "wipe").wait_ready()
    try:
        wait_for(
            lambda: stack.progress(job_id).captioned >= 16, 60, interval=0.05, what="first batches"
        )
        stack.redis.flushdb()  # every key of this Redis db, as FLUSHALL would
        # The batch in flight at the wipe finishes; then the worker holds nothing and nothing
        # is left in Redis to wake it (asked of the worker itself, not guessed from a pause).
        from captioner.tasks import publisher

        control = publisher(stack.settings()).control

        def idle() -> bool:
            inspect = control.inspect(destination=["wipe@test"], timeout=2)
            active, reserved = inspect.active() or {}, inspect.reserved() or {}
            return (
                active.get("wipe@test") == []
                and reserved.get("wipe@test") == []
                and stack.statuses(job_id).get("running", 0) == 0
            )

        wait_for(idle, 60, interval=0.2, what="the worker idle after the wipe")
        stalled = stack.progress(job_id)
        assert not stalled.is_complete, "the wipe should have lost the queued messages"
        assert idle() and stack.progress(job_id).captioned == stalled.captioned

        from workers.sweep import run_sweep

        summary = run_sweep()
        assert summary["stale"] == stalled.queued and summary["messages"] >= 1
        wait_for(lambda: _done(stack, job_id), 120, what="job to complete after the sweep")
        assert stack.progress(job_id).captioned == 200
        assert set(stack.caption_counts(ids).values()) == {1}
        assert w.alive()
    finally:
        w.stop()
        stack.redis.flushdb()
        stack.close()


# --- 2. kill -9 mid-batch ----------------------------------------------------------------------


def test_kill_9_mid_batch_then_new_worker(tmp_path, checkpoints, monkeypatch, redis_dbs):
    root = tmp_path / "kill"
    root.mkdir()
    stack = Stack(
        root=root,
        database_url=_migrated_sqlite(root / "captioner.db"),
        redis_url=redis_dbs.flushed("scratch"),
        checkpoint=checkpoints["a"],
        # Slower batches (longer captions, bigger batch) so the kill lands inside one; a short
        # lease so the sweeper hands the dead worker's images out again quickly.
        extra_env={
            "CAPTIONER_LEASE_SECONDS": "4",
            "CAPTIONER_BATCH_SIZE": "32",
            "CAPTIONER_CAPTION_MAX_NEW_TOKENS": "24",
        },
    )
    stack.apply_env(monkeypatch)
    job_id, ids = stack.submit_pngs(96, name="kill", publish=False)
    from captioner.tasks import publish_caption_batches

    publish_caption_batches(job_id, ids, settings=stack.settings())

    def running():
        return stack.statuses(job_id).get("running", 0)

    first = second = None
    try:
        # The kill lands inside a batch unless that batch finished between the poll and the
        # kill (a starved test process): then the next doomed worker takes the next batch.
        held = {}
        for attempt in range(3):
            first = WorkerProcess(stack, f"doomed{attempt}").wait_ready()
            wait_for(running, 60, interval=0.01, what="a batch in flight")
            first.kill9()
            held = {
                i: im for i, im in stack.images(ids).items() if im.status == ImageStatus.RUNNING
            }
            if held:
                break
        assert held, "no kill landed inside a batch in three tries"
        assert {im.lease_owner.split("/")[0] for im in held.values()} == {f"doomed{attempt}@test"}

        second = WorkerProcess(stack, "rescuer").wait_ready()
        from workers.sweep import run_sweep

        def swept_and_done():
            run_sweep()
            return _done(stack, job_id)

        progress = wait_for(swept_and_done, 120, interval=1, what="job done after the kill")
        assert progress.captioned == 96
        counts = stack.caption_counts(ids)
        assert len(counts) == 96 and set(counts.values()) == {1}
        images = stack.images(ids)
        # The killed claim, then the rescue (more than one if a loaded machine let the short
        # lease run out mid-batch: still one caption each, above).
        assert all(images[i].attempts >= 2 for i in held)
        with stack.sessions() as s:
            assert jobs.recount(s) == []  # the job counters survived the kill exactly
    finally:
        if second is not None:
            second.stop()
        if first is not None and first.alive():
            first.kill9()
        stack.redis.flushdb()
        stack.close()


# --- 4. two workers, duplicate messages, PostgreSQL -------------------------------------------


def test_two_workers_never_caption_an_image_twice(tmp_path, checkpoints, monkeypatch, redis_dbs):
    from captioner.state import migrate

    name = _create_postgres_database()
    url = _postgres_url_for(name)
    migrate.upgrade(url)
    root = tmp_path / "pair"
    root.mkdir()
    stack = Stack(
        root=root,
        database_url=url,
        redis_url=redis_dbs.flushed("scratch"),
        checkpoint=checkpoints["a"],
    )
    stack.apply_env(monkeypatch)
    workers = [WorkerProcess(stack, f"twin{i}") for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        job_id, ids = stack.submit_pngs(160, name="pair")
        # Every chunk published twice: both workers race for the same ids.
        from captioner.tasks import publish_caption_batches

        publish_caption_batches(job_id, ids, settings=stack.settings())
        wait_for(lambda: _done(stack, job_id), 120, what="pair job done")
        counts = stack.caption_counts(ids)
        assert len(counts) == 160 and set(counts.values()) == {1}
        by_key = stack.images(ids)
        assert {im.attempts for im in by_key.values()} == {1}  # no image claimed twice
        with stack.sessions() as s:
            captions = s.scalars(select(Caption).where(Caption.image_id.in_(ids))).all()
            assert all(c.created_at == c.updated_at for c in captions)
        # Which worker took which message is up to the broker and the machine's load; what
        # matters is above: each image claimed once and captioned once.
    finally:
        for w in workers:
            w.stop()
        stack.redis.flushdb()
        stack.close()
        _drop_postgres_database(name)


# --- the model switches without a restart ------------------------------------------------------


def test_worker_switches_to_newly_activated_model_version(stack, worker, env, checkpoints):
    pid = worker.pid
    with session_scope(stack.sessions) as s:
        s.execute(update(ModelVersion).values(status=ModelStatus.RETIRED))
        s.flush()
        v1 = ModelVersion(
            name="v1", checkpoint_uri=str(checkpoints["a"]), status=ModelStatus.ACTIVE
        )
        s.add(v1)
        s.flush()
        v1_id = v1.id
    job1, ids1 = stack.submit_pngs(20, name="v1-job")
    wait_for(lambda: _done(stack, job1), 60, what="v1 job")
    with session_scope(stack.sessions) as s:
        s.execute(
            update(ModelVersion)
            .where(ModelVersion.id == v1_id)
            .values(status=ModelStatus.RETIRED, retired_at=utcnow())
        )
        s.flush()
        v2 = ModelVersion(
            name="v2",
            checkpoint_uri=f"file://{checkpoints['b']}",
            status=ModelStatus.ACTIVE,
            parent_id=v1_id,
            promoted_at=utcnow(),
        )
        s.add(v2)
        s.flush()
        v2_id = v2.id
    job2, ids2 = stack.submit_pngs(20, name="v2-job")
    wait_for(lambda: _done(stack, job2), 60, what="v2 job")
    with stack.sessions() as s:
        v1_rows = set(s.scalars(select(Caption.model_version_id).where(Caption.image_id.in_(ids1))))
        v2_rows = set(s.scalars(select(Caption.model_version_id).where(Caption.image_id.in_(ids2))))
    assert v1_rows == {v1_id} and v2_rows == {v2_id}
    assert worker.alive() and worker.pid == pid
    assert "model switched" in worker.log()
    with session_scope(stack.sessions) as s:  # back to the settings checkpoint for later tests
        s.execute(
            update(ModelVersion).where(ModelVersion.id == v2_id).values(status=ModelStatus.RETIRED)
        )


# --- 6. interactive before bulk ----------------------------------------------------------------


def test_interactive_image_overtakes_a_bulk_job(stack, worker, env):
    bulk_id, bulk_ids = stack.submit_pngs(2000, name="bulk")
    wait_for(lambda: stack.progress(bulk_id).captioned >= 32, 60, what="bulk under way")
    one_id, one_ids = stack.submit_pngs(1, name="interactive", interactive=True, priority=1)
    wait_for(lambda: _done(stack, one_id), 60, interval=0.05, what="interactive image")
    bulk = stack.progress(bulk_id)
    assert not bulk.is_complete, "the bulk job finished first"
    (image,) = stack.images(one_ids).values()
    with stack.sessions() as s:
        from sqlalchemy import func

        bulk_left_after = s.scalar(
            select(func.count()).where(
                Image.job_id == bulk_id,
                (Image.finished_at.is_(None)) | (Image.finished_at > image.finished_at),
            )
        )
    assert bulk_left_after > 1000  # it overtook most of the bulk job, not just the tail
    # Stop the rest of the bulk job: drop its messages and fail what is left.
    stack.redis.delete("caption")
    with session_scope(stack.sessions) as s:
        for image_id in bulk_ids:
            images.fail_image(s, image_id, "cancelled by the test")
    assert worker.alive()


def test_sweep_is_in_the_beat_schedule(stack, env):
    from workers.celery_app import create_celery_app

    app = create_celery_app()
    entry = app.conf.beat_schedule["sweep"]
    assert entry["task"] == "captioner.sweep" and entry["schedule"] == 60.0
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.accept_content == ["json"]
    assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit
    assert [q.name for q in app.conf.task_queues][:2] == ["caption.interactive", "caption"]


def test_queue_module_does_not_import_torch_or_workers():
    import subprocess

    code = (
        "import sys, captioner.tasks, captioner.cli;"
        "bad=[m for m in ('torch','workers','workers.caption') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_endpoint(stack, worker, env):
    import urllib.request

    port = stack.env["CAPTIONER_METRICS_PORT"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    captioned = [
        line for line in body.splitlines() if line.startswith("captioner_images_captioned_total ")
    ]
    assert captioned and float(captioned[0].split()[1]) > 0
    assert 'captioner_queue_depth{queue="caption.interactive"}' in body
    assert "captioner_batch_seconds_bucket" in body
    assert 'captioner_images_failed_total{reason="not_found"}' in body
