"""The learning loop end to end on a CPU: teach the demo model a colour it never saw.

    python bench/learning_loop.py [--checkpoint var/models/demo] [--workdir var/bench-learning-loop]

The demo model is trained on the synthetic world without the colour purple (its held-out
concept). This bench, through the dashboard's JSON API (Flask test client, real app, SQLite and
a local object store; the "workers" are the real task functions run in this process):

1. registers the demo checkpoint as the active model version;
2. uploads 300 images of the "concept" split (each shows something purple) as a job; the worker
   captions them with the active model;
3. four reviewers correct 200 of those captions to the true caption (50 each);
4. an admin presses "retrain now" (POST /api/v1/training-runs); the maintenance task dispatches
   the run, the train task fine-tunes (reviews + replayed original examples), evaluates the
   candidate against the active version on the held-out reviews and on the anchor set, and the
   gate decides;
5. 100 concept images that were never submitted are captioned before the run (by the demo model)
   and after it (by whatever the gate left active), through the same API and worker path.

It prints exact-match on those 100 concept images before and after, exact-match on the original
test split before and after (the checkpoints scored directly), and the wall time of the run.
Bar: concept < 10% -> >= 80%, test split drops by at most 2 points, run <= 10 minutes.

When the checkpoint does not exist it is trained first with the demo preset (like
`captioner train --preset demo`), unless another process is training it right now
(`<checkpoint>.run/metrics.jsonl` recently written), in which case this waits for it.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_BEFORE, TARGET_AFTER, MAX_DROP, MAX_RUN_MIN = 0.10, 0.80, 0.02, 10.0

# Fine-tuning recipe for the demo model (also the defaults a deployment of the demo would use).
RECIPE = dict(
    finetune_steps=160,
    finetune_batch_size=32,
    finetune_lr=3e-4,
    finetune_warmup_steps=10,
    replay_data="synthetic",
    replay_ratio=3.0,
    anchor_data="synthetic",
    anchor_split="val",
    anchor_size=300,
    holdout_share=0.2,
    max_reviewer_share=0.5,
    promote_margin=0.05,
    anchor_tolerance=0.02,
)


def ensure_checkpoint(path: Path) -> None:
    if (path / "config.json").exists():
        return
    metrics = path.with_name(path.name + ".run") / "metrics.jsonl"
    if metrics.exists() and time.time() - metrics.stat().st_mtime < 600:
        print(f"{path} is being trained by another process; waiting for it ...", flush=True)
        while not (path / "config.json").exists():
            time.sleep(15)
        return
    from core_model.config import preset
    from core_model.train import RECIPES, TrainConfig, run_training

    print(f"no checkpoint at {path}: training the demo model first (demo preset)", flush=True)
    cfg = TrainConfig(out_dir=str(path) + ".run", progress=False, **RECIPES["demo"])
    run_training(preset("demo"), "synthetic", path, cfg)


def png_bytes(example) -> bytes:
    buf = io.BytesIO()
    example.image.save(buf, "PNG")
    return buf.getvalue()


class InlineWorkers:
    """The dashboard's publisher, replaced by the worker code run in this process: caption
    batches and tasks are queued by the app and run by `drain()`, as workers would."""

    def __init__(self, settings):
        self.settings = settings
        self.pending: list[tuple] = []

    def captions(self, job_id, image_ids, *, interactive=False):
        self.pending.append(("caption", job_id, list(image_ids)))

    def task(self, name, *args):
        self.pending.append(("task", name, args))

    def drain(self) -> None:
        from captioner import tasks
        from workers.caption import run_caption_batch
        from workers.training import run_maybe_retrain, run_train

        while self.pending:
            kind, a, b = self.pending.pop(0)
            if kind == "caption":
                for start in range(0, len(b), self.settings.batch_size):
                    run_caption_batch(
                        a,
                        b[start : start + self.settings.batch_size],
                        worker_id="bench/worker",
                        settings=self.settings,
                        retrying=False,
                    )
            elif a == tasks.TASK_MAYBE_RETRAIN:
                run_maybe_retrain(
                    self.settings,
                    publish=lambda run_id, _s: self.pending.append(
                        ("task", tasks.TASK_TRAIN_RUN, (run_id,))
                    ),
                )
            elif a == tasks.TASK_TRAIN_RUN:
                run_train(b[0], self.settings)
            else:
                raise RuntimeError(f"unexpected task {a}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="var/models/demo", type=Path)
    ap.add_argument("--workdir", default="var/bench-learning-loop", type=Path)
    ap.add_argument("--submit", type=int, default=300, help="concept images submitted")
    ap.add_argument("--correct", type=int, default=200, help="of which reviewers correct")
    ap.add_argument("--eval", type=int, default=100, help="unseen concept images re-captioned")
    ap.add_argument("--test-size", type=int, default=1000, help="test-split images scored")
    ap.add_argument("--steps", type=int, default=RECIPE["finetune_steps"])
    ap.add_argument("--lr", type=float, default=RECIPE["finetune_lr"])
    ap.add_argument("--replay-ratio", type=float, default=RECIPE["replay_ratio"])
    args = ap.parse_args()
    os.chdir(REPO)
    ensure_checkpoint(args.checkpoint)

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from sqlalchemy import select

    from captioner.accounts import create_user
    from captioner.learning import registry
    from captioner.settings import Settings
    from captioner.state import migrate
    from captioner.state.db import session_scope
    from captioner.state.models import ApiToken, TrainingRun
    from core_model.checkpoint import load_checkpoint
    from core_model.evaluate import evaluate_model, normalize
    from core_model.synthetic import SyntheticWorld, world_config_from_dict
    from dashboard import create_app

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    url = f"sqlite:///{work / 'captioner.db'}"
    migrate.upgrade(url)
    recipe = {
        **RECIPE,
        "finetune_steps": args.steps,
        "finetune_lr": args.lr,
        "replay_ratio": args.replay_ratio,
    }
    settings = Settings(
        data_dir=work,
        database_url=url,
        storage_url=f"file://{work / 'objects'}",
        secret_key="bench",
        device="cpu",
        training_device="cpu",
        batch_size=50,
        submit_rate_limit="100000/minute",
        min_new_reviews=100,
        **recipe,
    )
    workers = InlineWorkers(settings)
    app = create_app(settings, publisher=workers)
    client = app.test_client()
    ext = app.extensions["captioner"]

    # Accounts and the active model.
    tokens = {}
    with session_scope(ext.sessionmaker) as s:
        for name, role in [("admin", "admin")] + [(f"reviewer{k}", "reviewer") for k in range(4)]:
            user = create_user(s, f"{name}@example.com", None, role=role)
            raw, row = ApiToken.issue(user.id, "bench")
            s.add(row)
            tokens[name] = {"Authorization": f"Bearer {raw}"}
        demo = registry.register(s, args.checkpoint, name="demo", store=ext.store)
        registry.promote(s, demo.id)
    _, meta = load_checkpoint(args.checkpoint)
    world_cfg = (meta.get("provenance") or {}).get("world")
    world = SyntheticWorld(world_config_from_dict(world_cfg)) if world_cfg else SyntheticWorld()
    concept = world.split("concept", 100_000)

    def submit(examples, name: str, recaption=False) -> tuple[int, dict[int, str]]:
        files = [
            (io.BytesIO(png_bytes(ex)), f"{name}-{k:04d}.png") for k, ex in enumerate(examples)
        ]
        r = client.post(
            "/api/v1/jobs/upload",
            headers=tokens["admin"],
            content_type="multipart/form-data",
            data={
                "files": files,
                "name": name,
                "num_beams": "1",
                "n_best": "1",
                "recaption": "true" if recaption else "false",
            },
        )
        assert r.status_code == 202, r.get_data(as_text=True)
        job_id = r.json["id"]
        workers.drain()
        items = client.get(f"/api/v1/jobs/{job_id}/images?limit=500", headers=tokens["admin"]).json[
            "items"
        ]
        truth = {f"{name}-{k:04d}.png": ex.caption for k, ex in enumerate(examples)}
        return job_id, {it["id"]: (it, truth[it["original_name"]]) for it in items}

    def exact(images: dict) -> float:
        hits = sum(
            normalize((it["caption"] or {}).get("text", "")) == normalize(t)
            for it, t in images.values()
        )
        return hits / max(1, len(images))

    print(
        f"demo model: {args.checkpoint}; world held-out concepts: {world.cfg.held_out_concepts}",
        flush=True,
    )
    eval_set = [concept[100_000 - 1 - k] for k in range(args.eval)]  # never submitted for review
    _, before_eval = submit(eval_set, "eval-before")
    concept_before = exact(before_eval)
    print(
        f"concept exact-match before: {concept_before:.3f} ({len(before_eval)} images)", flush=True
    )

    # 300 concept images captioned by the demo model; 200 corrected by four reviewers.
    t_submit = time.perf_counter()
    _, submitted = submit([concept[k] for k in range(args.submit)], "concept")
    print(
        f"submitted and captioned {len(submitted)} images in {time.perf_counter() - t_submit:.0f} s; "
        f"their exact-match: {exact(submitted):.3f}",
        flush=True,
    )
    for n, (image_id, (item, truth)) in enumerate(sorted(submitted.items())[: args.correct]):
        r = client.post(
            f"/api/v1/images/{image_id}/reviews",
            headers=tokens[f"reviewer{n % 4}"],
            json={
                "decision": "corrected",
                "text": truth,
                "caption_id": (item["caption"] or {}).get("id"),
            },
        )
        assert r.status_code == 201, r.get_data(as_text=True)

    # Retrain now; the inline workers dispatch and run it.
    t0 = time.perf_counter()
    r = client.post("/api/v1/training-runs", headers=tokens["admin"])
    assert r.status_code == 202, r.get_data(as_text=True)
    run_id = r.json["id"]
    print(
        f"run {run_id}: {r.json['train_examples']} training reviews, {r.json['holdout_examples']} held-out",
        flush=True,
    )
    workers.drain()
    run_s = time.perf_counter() - t0
    run = client.get(f"/api/v1/training-runs/{run_id}", headers=tokens["admin"]).json
    print(run["log"])

    _, after_eval = submit(eval_set, "eval-after", recaption=True)
    concept_after = exact(after_eval)

    # The original test split, before (demo) and after (whatever is active now).
    with session_scope(ext.sessionmaker) as s:
        active = registry.active_version(s)
        active_name, active_uri = active.name, active.checkpoint_uri
        status = s.scalar(select(TrainingRun.status).where(TrainingRun.id == run_id))
    test = world.split("test", args.test_size)
    demo_model, _ = load_checkpoint(args.checkpoint)
    test_before = evaluate_model(demo_model, test, meteor=False)[0]["exact_match"]
    after_model, _ = load_checkpoint(registry.local_checkpoint(active_uri, settings, active_name))
    test_after = evaluate_model(after_model, test, meteor=False)[0]["exact_match"]

    print()
    print(f"run {run_id}: {status}; gate: {run['gate'].get('reason', run.get('error'))}")
    print(f"active model now: {active_name}")
    print(f"{'':<34}{'before':>8}{'after':>8}")
    print(
        f"{'concept (purple), ' + str(len(after_eval)) + ' unseen images':<34}{concept_before:8.3f}{concept_after:8.3f}"
    )
    print(
        f"{'original test split, ' + str(args.test_size) + ' images':<34}{test_before:8.3f}{test_after:8.3f}"
    )
    print(
        f"run wall time: {run_s:.0f} s ({run_s / 60:.1f} min; training {run['metrics'].get('train_s', 0):.0f} s)"
    )
    ok = (
        concept_before < TARGET_BEFORE
        and concept_after >= TARGET_AFTER
        and test_before - test_after <= MAX_DROP
        and run_s <= MAX_RUN_MIN * 60
    )
    print(
        f"bar {'MET' if ok else 'NOT MET'}: concept {concept_before:.3f} (< {TARGET_BEFORE}) -> "
        f"{concept_after:.3f} (>= {TARGET_AFTER}); test drop {100 * (test_before - test_after):+.1f} points "
        f"(<= {100 * MAX_DROP:.0f}); run {run_s / 60:.1f} min (<= {MAX_RUN_MIN:.0f})"
    )


if __name__ == "__main__":
    main()
