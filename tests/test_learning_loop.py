"""The learning loop: registry (promote / rollback), starting runs (one at a time), the snapshot
(held-out set, reviewer cap and exclusion), executing a run (fine-tune, gate, crash), the Celery
wiring and the dashboard's API and pages.

Models are the `tiny` preset (random weights), so a "good" model is defined by the captions it
produces: reviews that approve model A's own captions make A score 1.0 on them and any other
model (almost surely) 0.0. Runs fine-tune a few steps on the CPU.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from captioner import tasks
from captioner.learning import gate, registry, retrain, runs, snapshot
from captioner.settings import Settings
from captioner.state import jobs, reviews
from captioner.state.db import make_engine, make_sessionmaker, session_scope
from captioner.state.models import (
    Caption,
    Image,
    ModelStatus,
    ModelVersion,
    Review,
    ReviewDecision,
    Split,
    TrainingRun,
    TrainingStatus,
    User,
    UserRole,
    utcnow,
)
from captioner.storage import LocalObjectStore
from tests.workers_fixtures import png, write_checkpoint

# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ll-checkpoints")
    return {"a": write_checkpoint(root / "a", seed=0), "b": write_checkpoint(root / "b", seed=1)}


@pytest.fixture(scope="module")
def captions_of(checkpoints):
    """{model: [greedy caption of png(i) for i in range(40)]} for the two tiny checkpoints."""
    from core_model.checkpoint import load_checkpoint
    from core_model.evaluate import evaluate_model

    out = {}
    for name, path in checkpoints.items():
        model, _ = load_checkpoint(path)
        _, rows = evaluate_model(model, [(png(i), "x") for i in range(40)], meteor=False)
        out[name] = [r["prediction"].strip() for r in rows]
    assert all(out["a"]) and all(out["b"]), "a tiny model produced an empty caption"
    return out


@dataclass
class Loop:
    settings: Settings
    sessions: object
    store: LocalObjectStore
    engine: object

    def user(self, email: str, role: str = "reviewer") -> int:
        with session_scope(self.sessions) as s:
            u = User(email=email, role=UserRole(role), is_admin=role == "admin")
            s.add(u)
            s.flush()
            return u.id

    def images(self, indices, name: str = "job") -> list[int]:
        for i in indices:
            self.store.put(f"{name}/{i:04d}.png", png(i))
        with session_scope(self.sessions) as s:
            job = jobs.create_job(s, name)
            return jobs.submit_images(s, job.id, [f"{name}/{i:04d}.png" for i in indices])

    def review(self, image_ids, texts, reviewer_id=None, decision="corrected") -> list[int]:
        with session_scope(self.sessions) as s:
            return [
                reviews.add_review(
                    s, image_id=i, decision=decision, text=t, reviewer_id=reviewer_id
                ).id
                for i, t in zip(image_ids, texts, strict=True)
            ]

    def register(
        self, checkpoint: Path, name: str, *, promote: bool = False, parent_id=None
    ) -> int:
        with session_scope(self.sessions) as s:
            v = registry.register(s, checkpoint, name=name, store=self.store, parent_id=parent_id)
            if promote:
                registry.promote(s, v.id)
            return v.id

    def start(self, **kw) -> int | None:
        with session_scope(self.sessions) as s:
            run = runs.maybe_start_run(s, self.settings, **kw)
            return run.id if run is not None else None

    def run(self, run_id: int) -> TrainingRun:
        retrain.execute_run(self.sessions, run_id, self.settings, store=self.store)
        return self.get(TrainingRun, run_id)

    def get(self, cls, id_):
        with self.sessions() as s:
            row = s.get(cls, id_)
            s.expunge_all()
            return row

    def active(self) -> tuple[int, str] | None:
        with self.sessions() as s:
            v = registry.active_version(s)
            return (v.id, v.name) if v else None


def _settings(root: Path, url: str, **overrides) -> Settings:
    fields = dict(
        data_dir=root / "var",
        database_url=url,
        storage_url=f"file://{root / 'objects'}",
        device="cpu",
        training_device="cpu",
        batch_size=16,
        caption_max_new_tokens=4,
        min_new_reviews=5,
        holdout_share=0.0,
        max_reviewer_share=1.0,
        finetune_steps=3,
        finetune_batch_size=8,
        finetune_lr=1e-2,
        finetune_warmup_steps=1,
        promote_margin=0.05,
        anchor_tolerance=0.0,
    )
    fields.update(overrides)
    return Settings(**fields)


def _loop(root: Path, url: str, **overrides) -> Loop:
    settings = _settings(root, url, **overrides)
    engine = make_engine(url)
    return Loop(settings, make_sessionmaker(engine), LocalObjectStore(root / "objects"), engine)


@pytest.fixture
def sqlite_loop(tmp_path, sqlite_url, _sqlite_template):
    shutil.copyfile(_sqlite_template, sqlite_url.removeprefix("sqlite:///"))
    loop = _loop(tmp_path, sqlite_url)
    yield loop
    loop.engine.dispose()


@pytest.fixture
def any_loop(tmp_path, migrated_url):
    """A loop on each backend (SQLite and PostgreSQL)."""
    loop = _loop(tmp_path, migrated_url)
    yield loop
    loop.engine.dispose()


# --- starting runs: one at a time -----------------------------------------------------------


def test_two_beat_ticks_at_once_start_one_run(any_loop, monkeypatch):
    loop = any_loop
    reviewer = loop.user("r@example.com")
    ids = loop.images(range(8))
    loop.review(ids, [f"caption {i}" for i in range(8)], reviewer)

    counted = runs.count_new_reviews
    if loop.engine.dialect.name == "postgresql":
        # Both ticks pass the "enough new reviews, no open run" checks before either inserts:
        # only the unique open_lock stops the second. (SQLite has one writer at a time, so
        # there the second tick waits for the first one's commit and sees its run.)
        barrier = threading.Barrier(2, timeout=30)

        def count_then_wait(session, after):
            n = counted(session, after)
            barrier.wait()
            return n

        monkeypatch.setattr(runs, "count_new_reviews", count_then_wait)
    results, errors = [], []

    def tick():
        try:
            results.append(loop.start(trigger="beat"))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    started = [r for r in results if r is not None]
    assert len(results) == 2 and len(started) == 1
    with loop.sessions() as s:
        rows = s.scalars(select(TrainingRun)).all()
        assert [r.id for r in rows] == started
        assert rows[0].status == TrainingStatus.QUEUED and rows[0].open_lock == 1
    # While it is open, further ticks start nothing; "retrain now" says why.
    monkeypatch.setattr(runs, "count_new_reviews", counted)
    assert loop.start() is None
    with pytest.raises(runs.RunAlreadyOpen), session_scope(loop.sessions) as s:
        runs.maybe_start_run(s, loop.settings, force=True)


def test_min_new_reviews_since_the_last_finished_run(sqlite_loop):
    loop = sqlite_loop
    ids = loop.images(range(12))
    loop.review(ids[:4], ["a"] * 4)
    assert loop.start() is None  # 4 < 5
    loop.review(ids[4:6], ["b"] * 2)
    run_id = loop.start()
    assert run_id is not None
    with session_scope(loop.sessions) as s:  # pretend it finished
        run = s.get(TrainingRun, run_id)
        run.status, run.open_lock = TrainingStatus.REJECTED, None
    assert loop.start() is None  # nothing new since its high-water mark
    loop.review(ids[6:11], ["c"] * 5)
    second = loop.start()
    assert second is not None
    # The snapshot is cumulative: every current review, not only the new ones.
    assert len(loop.get(TrainingRun, second).train_review_ids) == 11


def test_a_run_whose_worker_was_lost_is_failed_after_the_timeout(sqlite_loop):
    loop = sqlite_loop
    ids = loop.images(range(6))
    loop.review(ids, ["x"] * 6)
    run_id = loop.start()
    with session_scope(loop.sessions) as s:
        from datetime import timedelta

        s.get(TrainingRun, run_id).created_at = utcnow() - timedelta(days=2)
    loop.review(ids[:5], ["y"] * 5)
    second = loop.start()
    assert second is not None and second != run_id
    old = loop.get(TrainingRun, run_id)
    assert (
        old.status == TrainingStatus.FAILED and "worker lost" in old.error and old.open_lock is None
    )


# --- the snapshot ---------------------------------------------------------------------------


def test_snapshot_caps_each_reviewer_share_and_leaves_out_excluded_reviewers(sqlite_loop):
    loop = sqlite_loop
    loop.settings.max_reviewer_share = 0.5
    heavy, r2, r3, bad = (loop.user(f"{n}@example.com") for n in ("heavy", "r2", "r3", "bad"))
    ids = loop.images(range(50))
    heavy_reviews = loop.review(ids[:30], [f"h{i}" for i in range(30)], heavy)
    r2_reviews = loop.review(ids[30:35], ["r2"] * 5, r2)
    r3_reviews = loop.review(ids[35:40], ["r3"] * 5, r3)
    loop.review(ids[40:50], ["spam"] * 10, bad)
    # The current review is what counts: a later rejection takes an image out.
    loop.review([ids[34]], [None], r2, decision="rejected")
    with session_scope(loop.sessions) as s:
        s.get(User, bad).training_excluded_at = utcnow()

    run = loop.get(TrainingRun, loop.start())
    train = set(run.train_review_ids)
    # 4 (r2) + 5 (r3) from the others: heavy may keep c with c <= 0.5 * (c + 9) -> 9, its newest.
    assert train == set(heavy_reviews[-9:]) | set(r2_reviews[:4]) | set(r3_reviews)
    assert run.params["dropped_by_reviewer_cap"] == {str(heavy): 21}
    assert run.params["excluded_reviewers"] == [bad]
    counts = run.params["reviewers"]
    assert max(counts.values()) <= 0.5 * sum(counts.values())


def test_cap_reviewer_share_pure():
    ex = [
        snapshot.Example(i, i, "k", "t", Split.TRAIN, i % 2, ReviewDecision.CORRECTED)
        for i in range(10)
    ]
    capped = snapshot.cap_reviewer_share(ex, 0.5)
    assert len(capped.kept) == 10 and capped.dropped == {}
    one = [
        snapshot.Example(i, i, "k", "t", Split.TRAIN, 7, ReviewDecision.CORRECTED) for i in range(5)
    ]
    capped = snapshot.cap_reviewer_share(one, 0.5)
    # A sole reviewer is not capped: the share applies once two or more reviewers contributed.
    assert capped.kept == one and capped.dropped == {}
    assert snapshot.cap_reviewer_share(one, 1.0).kept == one
    # Reviews without a reviewer are nobody's: they do not make a second reviewer.
    anonymous = [
        snapshot.Example(i, i, "k", "t", Split.TRAIN, None, ReviewDecision.CORRECTED)
        for i in range(5, 7)
    ]
    assert snapshot.cap_reviewer_share(one + anonymous, 0.5).kept == one + anonymous
    second = [snapshot.Example(9, 9, "k", "t", Split.TRAIN, 8, ReviewDecision.CORRECTED)]
    capped = snapshot.cap_reviewer_share(one + second, 0.5)
    # With a second reviewer, 7 may keep c with c <= 0.5 * (c + 1) -> 1, its newest.
    assert [e.review_id for e in capped.kept] == [4, 9] and capped.dropped == {"7": 4}


def test_a_runs_params_account_for_every_review(sqlite_loop):
    loop = sqlite_loop
    loop.settings.max_reviewer_share = 0.5
    loop.settings.retrain_max_examples = 10
    heavy, other, bad = (loop.user(f"{n}@example.com") for n in ("heavy", "other", "bad"))
    ids = loop.images(range(20))
    loop.review(ids[:12], ["h"] * 12, heavy)
    loop.review(ids[12:16], ["o"] * 4, other)
    loop.review(ids[16:20], ["b"] * 4, bad)
    with session_scope(loop.sessions) as s:
        s.get(User, bad).training_excluded_at = utcnow()
    run = loop.get(TrainingRun, loop.start())
    counts = run.params["reviews"]
    # 16 kept reviews, the newest 10 taken (6 heavy, 4 other); heavy capped at 4 (4 <= 0.5 * 8).
    assert counts["considered"] == 20 and counts["held_out"] == 0
    assert counts["used_for_training"] == len(run.train_review_ids) == 8
    assert counts["left_out"] == {
        "excluded_reviewer": 4,
        "reviewer_cap": 2,
        "over_max_training_examples": 6,
        "over_max_held_out": 0,
    }
    assert counts["considered"] == (
        counts["used_for_training"] + counts["held_out"] + sum(counts["left_out"].values())
    )
    lines = snapshot.left_out_lines(counts)
    assert len(lines) == 3 and lines[0].startswith("4 reviews: written by a reviewer")


def test_held_out_images_are_fixed_grow_and_never_train(sqlite_loop):
    loop = sqlite_loop
    loop.settings.holdout_share = 0.3
    ids = loop.images(range(60))
    first = loop.review(ids[:30], [f"t{i}" for i in range(30)])
    run1 = loop.get(TrainingRun, loop.start())
    held1 = set(run1.holdout_review_ids)
    assert held1 and not held1 & set(run1.train_review_ids)
    assert held1 | set(run1.train_review_ids) == set(first)
    expected = {i for i in ids[:30] if snapshot.holdout_bucket(i) < 0.3}
    with loop.sessions() as s:
        held_images = set(s.scalars(select(Image.id).where(Image.split == Split.HOLDOUT)))
    assert held_images == expected
    with session_scope(loop.sessions) as s:
        run = s.get(TrainingRun, run1.id)
        run.status, run.open_lock = TrainingStatus.PROMOTED, None
    # A re-review of a training image does not move it; new images join the set by the same rule.
    loop.review(ids[:30], [f"again {i}" for i in range(30)])
    loop.review(ids[30:], [f"n{i}" for i in range(30)])
    run2 = loop.get(TrainingRun, loop.start())
    with loop.sessions() as s:
        held_images2 = set(s.scalars(select(Image.id).where(Image.split == Split.HOLDOUT)))
        train_images2 = set(
            s.scalars(
                select(Image.id)
                .join(Review, Review.image_id == Image.id)
                .where(Review.id.in_(run2.train_review_ids))
            )
        )
    assert held_images <= held_images2
    assert held_images2 == {i for i in ids if snapshot.holdout_bucket(i) < 0.3}
    assert not held_images2 & train_images2
    assert len(run2.holdout_review_ids) == len(held_images2)


# --- executing a run: crash, gate ----------------------------------------------------------


def test_a_crash_mid_run_marks_it_failed_and_leaves_the_active_version(
    sqlite_loop, checkpoints, monkeypatch
):
    loop = sqlite_loop
    active = loop.register(checkpoints["a"], "v1", promote=True)
    ids = loop.images(range(6))
    loop.review(ids, ["a red circle"] * 6)
    run_id = loop.start()
    import core_model.train

    def crash(base, examples, config, val_examples=None, read_bytes=None):
        out = Path(config["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 3.0}\n')
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(core_model.train, "fine_tune", crash)
    run = loop.run(run_id)
    assert run.status == TrainingStatus.FAILED and run.open_lock is None
    assert "out of memory" in run.error and "FAILED" in run.log and "Traceback" in run.log
    assert run.finished_at is not None and run.candidate_model_version_id is None
    assert loop.active() == (active, "v1")
    with loop.sessions() as s:
        assert s.scalars(select(ModelVersion.name)).all() == ["v1"]
    # The lock is free: the next run can start (a failed run does not move the high-water mark).
    assert loop.start(force=True) is not None


def test_a_worse_candidate_is_not_promoted_and_kept_with_the_reason(
    sqlite_loop, checkpoints, captions_of
):
    """Real fine-tuning: reviewers approved what v1 says on the held-out images and taught it
    nonsense on the training images; the candidate scores worse and is rejected."""
    loop = sqlite_loop
    loop.settings.holdout_share = 0.5
    v1 = loop.register(checkpoints["a"], "v1", promote=True)
    ids = loop.images(range(40))
    held = [i for i in ids if snapshot.holdout_bucket(i) < 0.5]
    train = [i for i in ids if i not in held]
    loop.review(held, [captions_of["a"][ids.index(i)] for i in held], decision="approved")
    loop.review(train, ["zebra zebra zebra"] * len(train))
    run = loop.run(loop.start())

    assert run.status == TrainingStatus.REJECTED, run.log
    assert loop.active() == (v1, "v1")
    m = run.metrics
    assert m["holdout"]["active"]["exact_match"] == 1.0
    assert m["holdout"]["candidate"]["exact_match"] < 1.0
    assert m["gate"]["decision"] == "rejected" and "held-out" in m["gate"]["reason"]
    assert run.error == m["gate"]["reason"]
    # The run recorded its curve, progress, log and snapshot.
    assert (
        len(m["loss_curve"]) == 3
        and m["progress"]["step"] == 3
        and m["progress"]["fraction"] == 1.0
    )
    assert "PROMOTE" not in run.log and "REJECT" in run.log
    # The candidate is kept: registered, uploaded to the store, not active.
    cand = loop.get(ModelVersion, run.candidate_model_version_id)
    assert cand.status == ModelStatus.CANDIDATE and cand.parent_id == v1
    assert cand.metrics["gate"]["decision"] == "rejected"
    assert cand.checkpoint_uri.startswith("file://")
    assert loop.store.exists(f"models/{cand.name}/config.json")
    assert loop.store.exists(f"models/{cand.name}/model.safetensors")


def _fake_fine_tune_returning(path: Path):
    def fake(base, examples, config, val_examples=None, read_bytes=None):
        out = Path(config["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text(
            "".join(f'{{"event": "train", "step": {s}, "loss": {4.0 / s}}}\n' for s in (1, 2, 3))
        )
        assert examples and all(read_bytes(k) for k, _ in examples)
        return path, {"examples": len(examples), "steps": 3, "train_loss": 1.3}

    return fake


def test_a_better_candidate_is_promoted_unless_the_anchor_set_regresses(
    sqlite_loop, checkpoints, captions_of, monkeypatch, tmp_path
):
    """The gate itself: candidate = checkpoint b, held-out reviews are b's captions; an anchor
    set of a's captions then vetoes it."""
    import core_model.train

    loop = sqlite_loop
    loop.settings.holdout_share = 0.5
    monkeypatch.setattr(core_model.train, "fine_tune", _fake_fine_tune_returning(checkpoints["b"]))
    v1 = loop.register(checkpoints["a"], "v1", promote=True)
    ids = loop.images(range(20))
    loop.review(ids, [captions_of["b"][k] for k in range(20)])

    # With an anchor set the candidate ruins (a's own captions): rejected by the anchor.
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    lines = []
    for k in range(20, 30):
        (anchor / f"{k}.png").write_bytes(png(k))
        lines.append(
            json.dumps(
                {"image": str(anchor / f"{k}.png"), "caption": captions_of["a"][k], "split": "test"}
            )
        )
    (anchor / "anchor.jsonl").write_text("\n".join(lines) + "\n")
    loop.settings.anchor_data = f"jsonl:{anchor / 'anchor.jsonl'}"
    loop.settings.anchor_split = "test"
    first = loop.run(loop.start())
    assert first.status == TrainingStatus.REJECTED, first.log
    assert "anchor" in first.metrics["gate"]["reason"]
    assert first.metrics["holdout"]["candidate"]["exact_match"] == 1.0
    assert first.metrics["anchor"]["active"]["exact_match"] == 1.0
    assert loop.active() == (v1, "v1")

    # Without it, the same candidate goes live.
    loop.settings.anchor_data = ""
    second = loop.run(loop.start(force=True))
    assert second.status == TrainingStatus.PROMOTED, second.log
    assert second.metrics["gate"]["decision"] == "promoted"
    assert loop.active() == (second.candidate_model_version_id, f"finetune-{second.id}")
    assert loop.get(ModelVersion, v1).status == ModelStatus.RETIRED
    assert second.metrics["loss_curve"] == [[1, 4.0], [2, 2.0], [3, 1.33333]]


def test_gate_verdict_is_one_plain_sentence():
    h = {"active": {"exact_match": 0.9464}, "candidate": {"exact_match": 0.9375}}
    assert gate.gate("exact_match", h, {}, margin=0.01, tolerance=0.0).reason == (
        "the new model got 93.8% of held-out captions exactly right, the current one 94.6%: "
        "kept the current one"
    )
    better = {"active": {"cider": 0.5}, "candidate": {"cider": 0.75}}
    decision = gate.gate("cider", better, {}, margin=0.01, tolerance=0.0)
    assert decision.promote and decision.reason == (
        "the new model scored CIDEr 0.750 on held-out captions, the current one 0.500: "
        "promoted the new model"
    )


def test_gate_rules():
    h = {"active": {"exact_match": 0.5}, "candidate": {"exact_match": 0.54}}
    a = {"active": {"exact_match": 0.9}, "candidate": {"exact_match": 0.89}}
    assert not gate.gate("exact_match", h, a, margin=0.05, tolerance=0.02).promote
    assert gate.gate("exact_match", h, a, margin=0.04, tolerance=0.02).promote
    assert not gate.gate("exact_match", h, a, margin=0.04, tolerance=0.005).promote
    same = {"active": {"exact_match": 0.5}, "candidate": {"exact_match": 0.5}}
    assert not gate.gate("exact_match", same, {}, margin=0.0, tolerance=0.0).promote
    assert not gate.gate("exact_match", {"active": {}, "candidate": {}}, {}, 0.0, 0.0).promote


# --- registry: promote, rollback, and the worker's next batch -------------------------------


def test_rollback_restores_the_previous_version_and_the_worker_uses_it_next_batch(
    sqlite_loop, checkpoints, monkeypatch
):
    from workers.caption import run_caption_batch

    loop = sqlite_loop
    v1 = loop.register(checkpoints["a"], "v1", promote=True)
    v2 = loop.register(checkpoints["b"], "v2", parent_id=v1)
    with session_scope(loop.sessions) as s:
        assert registry.promote(s, "v2").id == v2
    assert loop.get(ModelVersion, v1).status == ModelStatus.RETIRED

    def caption_batch(name: str) -> set[int]:
        ids = loop.images(range(3), name=name)
        with loop.sessions() as s:
            job_id = s.get(Image, ids[0]).job_id
        run_caption_batch(job_id, ids, worker_id="w1", settings=loop.settings, retrying=False)
        with loop.sessions() as s:
            return set(s.scalars(select(Caption.model_version_id).where(Caption.image_id.in_(ids))))

    assert caption_batch("before") == {v2}
    with session_scope(loop.sessions) as s:
        back = registry.rollback(s)
    assert back.id == v1
    assert loop.active() == (v1, "v1")
    assert loop.get(ModelVersion, v2).status == ModelStatus.RETIRED
    # The same (in-process) worker runtime switches on its next batch, without a restart.
    assert caption_batch("after") == {v1}
    # Rolling back from v1 (no parent) goes to the version active before it: v2.
    with session_scope(loop.sessions) as s:
        assert registry.rollback(s).id == v2


def test_promote_keeps_exactly_one_active_version(any_loop, checkpoints):
    loop = any_loop
    ids = [loop.register(checkpoints["a"], f"v{k}") for k in range(3)]
    errors = []

    def promote(ref):
        try:
            with session_scope(loop.sessions) as s:
                registry.promote(s, ref)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with loop.sessions() as s:
        statuses = [ModelStatus(v) for v in s.scalars(select(ModelVersion.status))]
    assert statuses.count(ModelStatus.ACTIVE) == 1
    with pytest.raises(registry.VersionNotFound), session_scope(loop.sessions) as s:
        registry.promote(s, "nope")


def test_rollback_with_nothing_to_go_back_to_is_refused(sqlite_loop, checkpoints):
    loop = sqlite_loop
    with (
        pytest.raises(registry.RegistryError, match="no active"),
        session_scope(loop.sessions) as s,
    ):
        registry.rollback(s)
    loop.register(checkpoints["a"], "only", promote=True)
    with (
        pytest.raises(registry.RegistryError, match="no parent"),
        session_scope(loop.sessions) as s,
    ):
        registry.rollback(s)
    assert loop.active()[1] == "only"


# --- Celery wiring --------------------------------------------------------------------------


def test_beat_schedule_and_routes(sqlite_loop):
    from workers.celery_app import create_celery_app, retrain_schedule

    settings = sqlite_loop.settings.model_copy(update={"retrain_schedule": "30 3 * * 1"})
    app = create_celery_app(settings)
    entry = app.conf.beat_schedule["maybe-retrain"]
    assert entry["task"] == tasks.TASK_MAYBE_RETRAIN
    assert entry["schedule"] == retrain_schedule("30 3 * * 1")
    assert app.conf.task_routes[tasks.TASK_TRAIN_RUN]["queue"] == "train"
    assert {tasks.TASK_MAYBE_RETRAIN, tasks.TASK_TRAIN_RUN} <= set(app.tasks.keys()) | {
        name for name in app.conf.task_routes
    }
    with pytest.raises(ValueError, match="five"):
        retrain_schedule("nightly")


def test_maybe_retrain_task_starts_and_dispatches_once(sqlite_loop):
    from workers.training import run_maybe_retrain

    loop = sqlite_loop
    ids = loop.images(range(6))
    loop.review(ids, ["x"] * 6)
    sent = []
    out = run_maybe_retrain(loop.settings, publish=lambda run_id, settings: sent.append(run_id))
    assert out["started"] is not None and sent == [out["started"]]
    again = run_maybe_retrain(loop.settings, publish=lambda run_id, settings: sent.append(run_id))
    assert again == {"started": None, "dispatched": []} and len(sent) == 1


# --- dashboard: API and pages ---------------------------------------------------------------


@pytest.fixture
def seeded_app(app, checkpoints):
    """The dashboard app with v1 (active) and v2 (child of v1, candidate) registered."""
    from tests.dashboard_helpers import make_user

    ext = app.extensions["captioner"]
    with session_scope(ext.sessionmaker) as s:
        v1 = registry.register(s, checkpoints["a"], name="v1", store=ext.store)
        registry.promote(s, v1.id)
        v2 = registry.register(s, checkpoints["b"], name="v2", store=ext.store, parent_id=v1.id)
        ids = {"v1": v1.id, "v2": v2.id}
    users = {r: make_user(app, f"{r}@example.com", r) for r in ("admin", "reviewer", "submitter")}
    return app, ids, users


def test_api_models_promote_rollback_and_their_errors(seeded_app, client):
    app, ids, users = seeded_app
    admin, reviewer = users["admin"].headers, users["reviewer"].headers
    listed = client.get("/api/v1/models", headers=users["submitter"].headers)
    assert listed.status_code == 200
    assert listed.json["active_id"] == ids["v1"] and {v["name"] for v in listed.json["items"]} == {
        "v1",
        "v2",
    }
    assert client.get("/api/v1/models").status_code == 401

    assert client.post(f"/api/v1/models/{ids['v2']}/promote", headers=reviewer).status_code == 403
    assert client.post("/api/v1/models/rollback", headers=reviewer).status_code == 403
    assert client.post("/api/v1/models/99999/promote", headers=admin).status_code == 404
    r = client.post(f"/api/v1/models/{ids['v2']}/promote", headers=admin)
    assert r.status_code == 200 and r.json["status"] == "active"
    r = client.post("/api/v1/models/rollback", headers=admin)
    assert r.status_code == 200 and r.json["name"] == "v1"
    assert client.get("/api/v1/models", headers=admin).json["active_id"] == ids["v1"]
    r = client.post("/api/v1/models/rollback", headers=admin)  # v1 has no parent: back to v2
    assert r.status_code == 200 and r.json["name"] == "v2"


def test_api_training_runs_retrain_now_and_exclusion(seeded_app, client, publisher):
    app, ids, users = seeded_app
    admin, reviewer = users["admin"].headers, users["reviewer"].headers
    assert client.post("/api/v1/training-runs", headers=reviewer).status_code == 403
    r = client.post("/api/v1/training-runs", headers=admin)
    assert r.status_code == 422 and "no reviewed" in r.json["message"]

    ext = app.extensions["captioner"]
    ext.settings.max_reviewer_share = 1.0  # one reviewer here
    ext.settings.holdout_share = 0.0
    with session_scope(ext.sessionmaker) as s:
        job = jobs.create_job(s, "j")
        image_ids = jobs.submit_images(s, job.id, [f"k/{i}.png" for i in range(4)])
        for i in image_ids:
            reviews.add_review(
                s, image_id=i, decision="corrected", text="a cat", reviewer_id=users["reviewer"].id
            )
    r = client.post("/api/v1/training-runs", headers=admin)
    assert r.status_code == 202 and r.json["status"] == "queued" and r.json["train_examples"] == 4
    assert publisher.tasks == [(tasks.TASK_MAYBE_RETRAIN, ())]
    assert client.post("/api/v1/training-runs", headers=admin).status_code == 409
    run_id = r.json["id"]
    assert (
        client.get("/api/v1/training-runs", headers=users["submitter"].headers).status_code == 403
    )
    listed = client.get("/api/v1/training-runs", headers=reviewer).json
    assert listed["total"] == 1 and listed["items"][0]["trigger"] == "manual"
    detail = client.get(f"/api/v1/training-runs/{run_id}", headers=reviewer).json
    assert (
        len(detail["train_review_ids"]) == 4
        and detail["params"]["requested_by"] == users["admin"].id
    )
    assert client.get("/api/v1/training-runs/99999", headers=reviewer).status_code == 404

    path = f"/api/v1/reviewers/{users['reviewer'].id}/exclude"
    assert client.post(path, headers=reviewer, json={}).status_code == 403
    assert client.post("/api/v1/reviewers/99999/exclude", headers=admin, json={}).status_code == 404
    r = client.post(path, headers=admin, json={})
    assert r.status_code == 200 and r.json["excluded"] is True
    with session_scope(ext.sessionmaker) as s:  # the excluded reviewer's reviews are out now
        run = s.get(TrainingRun, run_id)
        run.status, run.open_lock = TrainingStatus.FAILED, None
    assert client.post("/api/v1/training-runs", headers=admin).status_code == 422
    r = client.post(path, headers=admin, json={"excluded": False})
    assert r.status_code == 200 and r.json["excluded"] is False


def test_pages_show_runs_loss_chart_and_versions_with_csrf_forms(seeded_app, client):
    from tests.dashboard_helpers import csrf, login

    app, ids, users = seeded_app
    ext = app.extensions["captioner"]
    with session_scope(ext.sessionmaker) as s:
        run = TrainingRun(
            status=TrainingStatus.REJECTED,
            base_model_version_id=ids["v1"],
            candidate_model_version_id=ids["v2"],
            train_review_ids=[1, 2],
            holdout_review_ids=[3],
            metrics={
                "loss_curve": [[1, 3.2], [2, 2.5], [3, 1.9]],
                "progress": {"step": 3, "total_steps": 3, "fraction": 1.0},
                "holdout": {"active": {"exact_match": 0.5}, "candidate": {"exact_match": 0.25}},
                "gate": {"decision": "rejected", "reason": "held-out exact_match went down"},
            },
            log="line one\n<script>x</script>\n",
            params={"trigger": "manual"},
            error="held-out exact_match went down",
        )
        s.add(run)
        s.flush()
        run_id = run.id
    login(client, "reviewer@example.com")
    page = client.get("/training").get_data(as_text=True)
    assert f'data-run-id="{run_id}"' in page and "held-out exact_match went down" in page
    assert "Retrain now" not in page  # admin only
    detail = client.get(f"/training/{run_id}").get_data(as_text=True)
    assert '<svg id="loss-chart"' in detail and "<polyline" in detail
    assert detail.count("held-out exact_match went down") == 1  # the verdict, shown once
    assert "0.5000" in detail and "0.2500" in detail and "-0.2500" in detail
    assert "&lt;script&gt;" in detail and "<script>x" not in detail
    assert client.get("/training/99999").status_code == 404
    assert "Promote" not in client.get("/models").get_data(as_text=True)
    assert (
        client.post(f"/models/{ids['v2']}/promote", data={"csrf_token": csrf(client)}).status_code
        == 403
    )

    client.post("/logout", data={"csrf_token": csrf(client)})
    login(client, "admin@example.com")
    models = client.get("/models").get_data(as_text=True)
    # v1 is active with no parent and nothing was active before it: nothing to roll back to.
    assert "Promote" in models and "Roll back" not in models
    assert client.post(f"/models/{ids['v2']}/promote").status_code == 400  # no CSRF token
    r = client.post(f"/models/{ids['v2']}/promote", data={"csrf_token": csrf(client)})
    assert r.status_code == 303
    models = client.get("/models").get_data(as_text=True)
    assert "Roll back to v1" in models
    with ext.sessionmaker() as s:
        assert registry.active_version(s).id == ids["v2"]
    client.post("/models/rollback", data={"csrf_token": csrf(client)})
    with ext.sessionmaker() as s:
        assert registry.active_version(s).id == ids["v1"]


def test_a_sole_reviewers_reviews_all_train_and_the_run_page_accounts_for_them(
    seeded_app, client, publisher
):
    """A team of one: 50 reviews by the only reviewer, the default reviewer share cap, and
    "retrain now" starts a run that trains on them."""
    from tests.dashboard_helpers import csrf, login

    app, ids, users = seeded_app
    ext = app.extensions["captioner"]
    ext.settings.max_reviewer_share = 0.5
    ext.settings.holdout_share = 0.2
    with session_scope(ext.sessionmaker) as s:
        job = jobs.create_job(s, "solo")
        image_ids = jobs.submit_images(s, job.id, [f"solo/{i}.png" for i in range(50)])
        for i in image_ids:
            reviews.add_review(
                s, image_id=i, decision="corrected", text="a cat", reviewer_id=users["admin"].id
            )
    login(client, "admin@example.com")
    r = client.post("/training/retrain", data={"csrf_token": csrf(client)})
    assert r.status_code == 303 and "/training/" in r.headers["Location"], r.get_data(as_text=True)
    with ext.sessionmaker() as s:
        run = s.scalars(select(TrainingRun)).one()
        counts = run.params["reviews"]
        train, held = len(run.train_review_ids), len(run.holdout_review_ids)
    assert publisher.tasks == [(tasks.TASK_MAYBE_RETRAIN, ())]
    assert train > 0 and train + held == 50 and held == counts["held_out"]
    assert counts["considered"] == 50 and counts["used_for_training"] == train
    assert sum(counts["left_out"].values()) == 0 and run.params["dropped_by_reviewer_cap"] == {}
    page = client.get(r.headers["Location"]).get_data(as_text=True)
    assert f"50 considered: {train} used for training, {held} held out" in page
    assert "none left out" in page and "no reviewed training examples" not in page


def test_web_process_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from dashboard import training; "
        "from captioner.learning import finetune, gate, registry, retrain, runs, snapshot; "
        "import workers.training; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False", out.stderr


def test_cli_model_promote_and_rollback(sqlite_loop, checkpoints):
    from click.testing import CliRunner

    from captioner.cli import cli

    v1 = sqlite_loop.register(checkpoints["a"], "v1", promote=True)
    v2 = sqlite_loop.register(checkpoints["b"], "v2", parent_id=v1)
    url = ["--url", sqlite_loop.settings.database_url]
    result = CliRunner().invoke(cli, ["model", "promote", "v2", *url])
    assert result.exit_code == 0 and f"v2 (id {v2}) is now active" in result.output
    assert sqlite_loop.active() == (v2, "v2")
    result = CliRunner().invoke(cli, ["model", "rollback", *url])
    assert result.exit_code == 0 and f"v1 (id {v1}) is active again" in result.output
    assert sqlite_loop.active() == (v1, "v1")
    result = CliRunner().invoke(cli, ["model", "promote", "no-such-version", *url])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Error:" in result.output
    assert sqlite_loop.active() == (v1, "v1")
