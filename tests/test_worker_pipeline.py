"""Pipelined caption workers: the next batch is fetched and decoded, and the last one saved,
while the current one runs the model, in one process sharing one model.

- two batches run in-process from two threads, choreographed with events (no timing): batch 2
  fetches while batch 1 is inside the model, batch 1 saves while batch 2 is inside the model,
  and the model calls never overlap (they run under `ModelRuntime.model_lock`);
- `ModelRuntime.use`: a switch to another model version waits for the batches holding the old
  one, and a batch whose `wanted` is stale takes the newer model instead of switching back;
- how `captioner worker` picks its pool (threads on CUDA, solo on the CPU);
- a real `captioner worker` with a pipeline depth of 2 captions every image exactly once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from captioner.settings import Settings
from tests.workers_fixtures import (
    Stack,
    WorkerProcess,
    wait_for,
    write_checkpoint,
)

EVENT_WAIT = 60  # seconds: only ever reached when the choreography is broken


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "a", seed=0)


def _stack(root, checkpoint, redis_url: str) -> Stack:
    """A stack on `redis_url`, a database of this session's that has just been flushed."""
    from captioner.state import migrate

    url = f"sqlite:///{root / 'captioner.db'}"
    migrate.upgrade(url)
    return Stack(root=root, database_url=url, redis_url=redis_url, checkpoint=checkpoint)


@pytest.fixture
def stack(tmp_path, checkpoint, monkeypatch, redis_dbs):
    s = _stack(tmp_path, checkpoint, redis_dbs.flushed("main"))
    s.apply_env(monkeypatch)
    yield s
    s.redis.flushdb()
    s.close()


# --- two batches in two threads ----------------------------------------------------------------


def test_next_batch_is_fetched_while_the_model_runs_and_saved_while_the_next_one_runs(
    stack, monkeypatch
):
    from captioner.state import images
    from core_model.inference import ImageCaptioner
    from workers.caption import run_caption_batch
    from workers.resources import resources

    settings = stack.settings()
    res = resources(settings)
    job_id, ids = stack.submit_pngs(8, name="pipe", publish=False)
    batches = {"b1": ids[:4], "b2": ids[4:]}
    keys_b2 = {im.storage_key for im in stack.images(batches["b2"]).values()}

    b1_in_model = threading.Event()
    b2_fetched = threading.Event()
    b2_in_model = threading.Event()
    events: list[str] = []  # the story, in order
    problems: list[str] = []
    record = threading.Lock()

    def note(what: str) -> None:
        with record:
            events.append(what)

    def wait(event: threading.Event, why: str) -> None:
        if not event.wait(EVENT_WAIT):
            problems.append(why)

    store = res.store

    class Gate:
        """The object store, but batch 2's images are read only while batch 1 runs the model."""

        def get_at_most(self, key, limit):
            if key in keys_b2:
                wait(b1_in_model, "batch 2 was fetched before batch 1 reached the model")
                data = store.get_at_most(key, limit)
                note("b2 fetched")
                b2_fetched.set()
                return data
            return store.get_at_most(key, limit)

        def __getattr__(self, name):
            return getattr(store, name)

    monkeypatch.setattr(res, "store", Gate())

    original_caption = ImageCaptioner.caption_tensors
    inside: list[str] = []

    def caption_tensors(self, pixels, options=None):
        me = threading.current_thread().name
        if not res.runtime.model_lock.locked():
            problems.append(f"{me} ran the model without the model lock")
        with record:
            if inside:
                problems.append(f"{me} entered the model while {inside} was in it")
            inside.append(me)
            events.append(f"{me} model enter")
        if me == "b1":
            b1_in_model.set()
            # Stay in the model until batch 2 has been fetched: that is the overlap.
            wait(b2_fetched, "batch 2 was not fetched while batch 1 ran the model")
        else:
            b2_in_model.set()
        try:
            return original_caption(self, pixels, options)
        finally:
            with record:
                inside.remove(me)
                events.append(f"{me} model exit")

    monkeypatch.setattr(ImageCaptioner, "caption_tensors", caption_tensors)

    original_complete = images.complete_images

    def complete_images(session, model_version_id, rows):
        if rows and {r.image_id for r in rows} <= set(batches["b1"]):
            # Batch 1 saves while batch 2 runs the model: saving is outside the model lock.
            wait(b2_in_model, "batch 1's save did not overlap with batch 2's model run")
            note("b1 saving")
        return original_complete(session, model_version_id, rows)

    monkeypatch.setattr(images, "complete_images", complete_images)

    outcomes: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            outcomes[name] = run_caption_batch(
                job_id, batches[name], worker_id=f"pipe/{name}", settings=settings, retrying=False
            )
        except BaseException as exc:  # reported below, in the test's thread
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("b1", "b2")]
    threads[0].start()
    # Batch 2 arrives while batch 1 is in the model (as the second message of a pipelined
    # worker does); batch 1 stays there until batch 2 has been claimed and fetched.
    wait(b1_in_model, "batch 1 never reached the model")
    threads[1].start()
    for t in threads:
        t.join(EVENT_WAIT * 3)
    assert not any(t.is_alive() for t in threads), "a batch is stuck"
    assert not problems, problems
    for name, outcome in outcomes.items():
        assert not isinstance(outcome, BaseException), (name, outcome)
        assert sorted(outcome.captioned) == sorted(batches[name]), (name, outcome)

    # The model calls never overlapped, and each batch ran it once.
    model_calls = [e for e in events if " model " in e]
    assert model_calls == ["b1 model enter", "b1 model exit", "b2 model enter", "b2 model exit"]
    # Batch 2's fetch happened inside batch 1's model call; batch 1's save inside batch 2's.
    assert (
        events.index("b1 model enter") < events.index("b2 fetched") < events.index("b1 model exit")
    )
    assert events.index("b2 model enter") < events.index("b1 saving")
    counts = stack.caption_counts(ids)
    assert len(counts) == 8 and set(counts.values()) == {1}
    assert {im.attempts for im in stack.images(ids).values()} == {1}


def test_a_batch_slower_than_its_lease_keeps_its_images_while_its_worker_lives(stack, monkeypatch):
    """The worker renews its lease while a batch runs: a sweep after the first lease ran out
    finds it renewed and leaves the batch alone, which then saves every caption on its first
    attempt. (Without renewals the sweep takes the images back and the save loses them.)"""
    from captioner.state.models import ImageStatus, utcnow
    from core_model.inference import ImageCaptioner
    from workers.caption import run_caption_batch
    from workers.sweep import run_sweep

    settings = stack.settings().model_copy(update={"lease_seconds": 2})
    job_id, ids = stack.submit_pngs(4, name="slow", publish=False)
    problems: list[str] = []
    swept: list[dict] = []
    original_caption = ImageCaptioner.caption_tensors

    def slow_caption(self, pixels, options=None):
        first = {i: im.lease_until for i, im in stack.images(ids).items()}
        if {im.status for im in stack.images(ids).values()} != {ImageStatus.RUNNING}:
            problems.append("the batch's images were not claimed")

        def renewed_past_the_first_lease() -> bool:
            now = utcnow()
            held = stack.images(ids)
            return all(now > first[i] and held[i].lease_until > first[i] for i in ids)

        try:
            wait_for(renewed_past_the_first_lease, EVENT_WAIT, interval=0.1, what="a renewal")
        except AssertionError as exc:
            problems.append(str(exc))
        swept.append(run_sweep(settings))
        return original_caption(self, pixels, options)

    monkeypatch.setattr(ImageCaptioner, "caption_tensors", slow_caption)
    outcome = run_caption_batch(job_id, ids, worker_id="slow/1", settings=settings, retrying=False)
    assert not problems, problems
    assert swept and swept[0].get("expired", 0) == 0, swept
    assert sorted(outcome.captioned) == sorted(ids) and not outcome.lost
    assert {im.attempts for im in stack.images(ids).values()} == {1}
    counts = stack.caption_counts(ids)
    assert len(counts) == 4 and set(counts.values()) == {1}


# --- ModelRuntime.use: switching models while batches are in flight ------------------------------


@dataclass(frozen=True)
class _FakeCaptioner:
    name: str


def _runtime(monkeypatch, loads: list[str], alive: set[str]):
    from workers.model_runtime import LoadedModel, ModelRuntime

    runtime = ModelRuntime(Settings(device="cpu"))

    def load(version_id, name, uri):
        runtime._loaded = None  # as the real one: the old model is dropped first
        alive.clear()
        loads.append(name)
        alive.add(name)
        return LoadedModel(version_id, name, uri, _FakeCaptioner(name))

    monkeypatch.setattr(runtime, "_load", load)
    return runtime


def test_a_model_switch_waits_for_the_batches_holding_the_old_model(monkeypatch):
    loads: list[str] = []
    alive: set[str] = set()
    runtime = _runtime(monkeypatch, loads, alive)
    v1, v2 = (1, "v1", "/m/v1"), (2, "v2", "/m/v2")
    switched = threading.Event()
    seen: dict[str, object] = {}

    def switcher():
        with runtime.use(v2, as_of=2.0) as loaded:
            seen["switcher"] = loaded.version_name
            switched.set()

    with runtime.use(v1, as_of=1.0) as held:
        assert held.version_name == "v1"
        t = threading.Thread(target=switcher)
        t.start()
        wait_for(lambda: runtime._switches_waiting == 1, 30, interval=0.01, what="switch to wait")
        assert loads == ["v1"] and not switched.is_set()  # v1 is still in use: no switch yet
        # Meanwhile no new batch takes the old model either (the switch goes first).
        late = threading.Thread(target=lambda: seen.setdefault("late", runtime.ensure(v1, 1.5)))
        late.start()
        assert held.captioner.name == "v1"
    t.join(30)
    late.join(30)
    assert seen["switcher"] == "v2" and loads == ["v1", "v2"] and alive == {"v2"}
    # The late batch read `wanted` before the switcher did: stale, it takes v2, no switch back.
    assert seen["late"].version_name == "v2" and loads == ["v1", "v2"]
    assert runtime._users == 0 and runtime._switches_waiting == 0


def test_a_newer_wanted_switches_and_a_failed_load_lets_the_next_batch_try(monkeypatch):
    loads: list[str] = []
    runtime = _runtime(monkeypatch, loads, set())
    v1, v2 = (1, "v1", "/m/v1"), (2, "v2", "/m/v2")
    assert runtime.ensure(v1, 1.0).version_name == "v1"
    assert runtime.ensure(v1, 2.0).version_name == "v1" and loads == ["v1"]
    assert runtime.ensure(v2, 3.0).version_name == "v2"
    assert runtime.ensure(v1, 4.0).version_name == "v1"  # a rollback read later: switch back
    assert loads == ["v1", "v2", "v1"]

    def broken(*_args):
        runtime._loaded = None
        raise RuntimeError("checkpoint unreadable")

    good = runtime._load
    monkeypatch.setattr(runtime, "_load", broken)
    with pytest.raises(RuntimeError):
        runtime.ensure(v2, 5.0)
    monkeypatch.setattr(runtime, "_load", good)
    assert runtime.ensure(v2, 6.0).version_name == "v2"
    assert runtime._users == 0 and not runtime._switching


# --- choosing the pool --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "pool", "concurrency", "queues", "expected"),
    [
        ({"device": "cpu"}, None, None, "caption.interactive,caption,maintenance", ("solo", 1)),
        ({"device": "cuda:0"}, None, None, "caption.interactive,caption", ("threads", 2)),
        ({"device": "cuda"}, None, None, "caption", ("threads", 2)),
        ({"device": "cpu", "worker_pipeline_depth": 3}, None, None, "caption", ("threads", 3)),
        ({"device": "cuda:1", "worker_pipeline_depth": 1}, None, None, "caption", ("solo", 1)),
        (
            {"device": "cuda:0"},
            None,
            None,
            "train,maintenance",
            ("solo", 1),
        ),  # not a caption worker
        ({"device": "cuda:0"}, "solo", None, "caption", ("solo", 1)),  # what was asked for
        ({"device": "cuda:0"}, "threads", 4, "caption", ("threads", 4)),
        ({"device": "cpu"}, "threads", None, "caption", ("threads", 1)),
        # a maintenance-only worker: prefork (time limits hold) with its default processes
        ({"device": "cuda:0"}, "prefork", None, "maintenance", ("prefork", 4)),
        ({"device": "cuda:0"}, "prefork", 2, "maintenance", ("prefork", 2)),
    ],
)
def test_worker_pool_is_pipelined_on_cuda_and_solo_on_the_cpu(
    env, pool, concurrency, queues, expected
):
    from captioner.cli.worker import choose_pool

    assert choose_pool(pool, concurrency, queues, Settings(**env)) == expected


def test_device_batch_on_the_cpu_is_a_plain_stack():
    from workers.pixels import device_batch

    tensors = [torch.full((3, 4, 4), float(i)) for i in range(3)]
    batch = device_batch(tensors, torch.device("cpu"))
    assert torch.equal(batch, torch.stack(tensors)) and not batch.is_pinned()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_batch_on_cuda_goes_through_pinned_memory(monkeypatch):
    from workers.pixels import device_batch

    dev = torch.device("cuda")
    pinned: list[bool] = []
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if self.device.type == "cpu" and kwargs.get("non_blocking"):
            pinned.append(self.is_pinned())
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    tensors = [torch.full((3, 4, 4), float(i)) for i in range(4)]
    tensors[2] = tensors[2].to(dev)  # decoded on the device already (nvJPEG)
    batch = device_batch(tensors, dev)
    torch.cuda.synchronize()
    assert batch.device.type == "cuda"
    assert torch.equal(batch.cpu(), torch.stack([t.cpu() for t in tensors]))
    assert pinned == [True]  # one copy, from pinned memory


# --- a real pipelined worker process -------------------------------------------------------------


@pytest.mark.slow
def test_pipelined_worker_process_captions_every_image_exactly_once(stack):
    worker = WorkerProcess(stack, "piped", env={"CAPTIONER_WORKER_PIPELINE_DEPTH": "2"})
    try:
        worker.wait_ready()
        job_id, ids = stack.submit_pngs(96, name="piped")  # six batches of 16

        def done():
            p = stack.progress(job_id)
            return p if p.is_complete else None

        progress = wait_for(done, 120, what="pipelined job done")
        assert progress.captioned == 96 and progress.failed == 0
        counts = stack.caption_counts(ids)
        assert len(counts) == 96 and set(counts.values()) == {1}
        assert {im.attempts for im in stack.images(ids).values()} == {1}
        log = worker.log()
        assert "--pool=threads --concurrency=2" in log, log[-2000:]
        assert log.count("batch done") == 6
        # Two messages in hand at once: the second batch arrived before the first was done
        # (its model load alone takes seconds; a solo worker takes the next only after).
        lines = log.splitlines()
        received = [
            n for n, line in enumerate(lines) if "caption_batch[" in line and "received" in line
        ]
        first_done = next(n for n, line in enumerate(lines) if "batch done" in line)
        assert len(received) == 6 and received[1] < first_done, log[-3000:]
        assert "Traceback" not in log and worker.alive()
    finally:
        worker.stop()
