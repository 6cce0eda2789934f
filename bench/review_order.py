"""Does least-confident-first review teach more per review than review in random order?

    python bench/review_order.py [--checkpoint var/models/demo] [--workdir var/bench-review-order]

The demo model is trained without the colour purple. One pool of images is submitted: 300
ordinary images (the synthetic test split, beyond the 1,000 scored below: the model gets nearly
all right) and 60 concept images (each shows something purple: the model gets them wrong), in a
seeded shuffled order. The same pool goes through two arms, each a fresh stack (SQLite, local
object store, the dashboard's JSON API through Flask's test client, the worker and training code
run in this process as in bench/learning_loop.py) with the demo model active:

- queue: a reviewer takes the first 100 items of `GET /api/v1/review/queue` (least confident
  first: the API's order, whatever the score's scale);
- random: a reviewer takes 100 items of the pool in a seeded random order.

Each item is decided as a careful reviewer would: approved when the caption is right, corrected
to the true caption when it is wrong (both train). Four reviewers share the work. Then "retrain
now" (`POST /api/v1/training-runs`): one fine-tune per arm from the same checkpoint with the same
recipe and seeds (the run id, 1 in both). Each arm's candidate is scored whatever the gate
decided: exact-match on 100 concept images never submitted and on the test split.

Bar: the queue arm's concept accuracy at least 10 points above the random arm's.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.learning_loop import RECIPE, InlineWorkers, ensure_checkpoint, png_bytes  # noqa: E402

TARGET_POINTS = 10.0
ORDINARY_OFFSET = 10_000  # ordinary pool images come from the test split from here on


@dataclass
class ArmResult:
    name: str
    reviewed: int
    reviewed_concept: int
    reviewed_wrong: int
    pool_wrong: int
    train_examples: int
    holdout_examples: int
    status: str
    gate: str
    train_s: float
    checkpoint: Path
    concept: float = 0.0
    test: float = 0.0


class Arm:
    """One fresh stack with the demo model active, reached through the dashboard's API."""

    def __init__(self, root: Path, checkpoint: Path, settings_kwargs: dict) -> None:
        from captioner.accounts import create_user
        from captioner.learning import registry
        from captioner.settings import Settings
        from captioner.state import migrate
        from captioner.state.db import session_scope
        from captioner.state.models import ApiToken
        from dashboard import create_app

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        url = f"sqlite:///{root / 'captioner.db'}"
        migrate.upgrade(url)
        self.settings = Settings(
            data_dir=root,
            database_url=url,
            storage_url=f"file://{root / 'objects'}",
            secret_key="bench",
            device="cpu",
            training_device="cpu",
            batch_size=60,
            submit_rate_limit="100000/minute",
            **settings_kwargs,
        )
        self.workers = InlineWorkers(self.settings)
        self.app = create_app(self.settings, publisher=self.workers)
        self.client = self.app.test_client()
        self.ext = self.app.extensions["captioner"]
        self.tokens: dict[str, dict] = {}
        with session_scope(self.ext.sessionmaker) as s:
            for name, role in [("admin", "admin")] + [(f"r{k}", "reviewer") for k in range(4)]:
                user = create_user(s, f"{name}@example.com", None, role=role)
                raw, row = ApiToken.issue(user.id, "bench")
                s.add(row)
                self.tokens[name] = {"Authorization": f"Bearer {raw}"}
            demo = registry.register(s, checkpoint, name="demo", store=self.ext.store)
            registry.promote(s, demo.id)

    def submit(self, examples, name: str) -> tuple[int, dict[int, tuple[dict, int]]]:
        """Upload the examples as one job, caption them; {image id: (item, index in examples)}."""
        files = [
            (io.BytesIO(png_bytes(ex)), f"{name}-{k:04d}.png") for k, ex in enumerate(examples)
        ]
        r = self.client.post(
            "/api/v1/jobs/upload",
            headers=self.tokens["admin"],
            content_type="multipart/form-data",
            data={"files": files, "name": name},
        )
        assert r.status_code == 202, r.get_data(as_text=True)
        job_id = r.json["id"]
        self.workers.drain()
        r = self.client.get(
            f"/api/v1/jobs/{job_id}/images?limit=1000", headers=self.tokens["admin"]
        )
        index = {f"{name}-{k:04d}.png": k for k in range(len(examples))}
        return job_id, {it["id"]: (it, index[it["original_name"]]) for it in r.json["items"]}

    def queue_order(self, job_id: int, n: int) -> list[int]:
        """The first n image ids of the review queue (least confident first), page by page."""
        ids: list[int] = []
        after = None
        while len(ids) < n:
            query = f"job_id={job_id}&limit={min(100, n - len(ids))}"
            r = self.client.get(
                f"/api/v1/review/queue?{query}" + (f"&after={after}" if after else ""),
                headers=self.tokens["r0"],
            )
            assert r.status_code == 200, r.get_data(as_text=True)
            ids += [it["id"] for it in r.json["items"]]
            after = r.json["next_cursor"]
            if not after:
                break
        return ids[:n]

    def review(self, order: list[int], pool: dict[int, tuple[dict, int]], examples: list) -> int:
        """Decide each image in order: approve a right caption, correct a wrong one. Returns
        how many were corrected."""
        from core_model.evaluate import normalize

        corrected = 0
        for n, image_id in enumerate(order):
            item, k = pool[image_id]
            truth = examples[k].caption
            caption = item["caption"] or {}
            right = normalize(caption.get("text", "")) == normalize(truth)
            body = {"decision": "approved"} if right else {"decision": "corrected", "text": truth}
            corrected += not right
            r = self.client.post(
                f"/api/v1/images/{image_id}/reviews",
                headers=self.tokens[f"r{n % 4}"],
                json={**body, "caption_id": caption.get("id")},
            )
            assert r.status_code == 201, r.get_data(as_text=True)
        return corrected

    def retrain(self) -> tuple[dict, Path]:
        """Retrain now; the run (detail) and the candidate's local checkpoint."""
        from captioner.learning import registry
        from captioner.state.db import session_scope
        from captioner.state.models import ModelVersion

        r = self.client.post("/api/v1/training-runs", headers=self.tokens["admin"])
        assert r.status_code == 202, r.get_data(as_text=True)
        run_id = r.json["id"]
        self.workers.drain()
        run = self.client.get(f"/api/v1/training-runs/{run_id}", headers=self.tokens["admin"]).json
        if not run["candidate_model_version_id"]:
            raise RuntimeError(f"run {run_id} made no candidate: {run['status']} {run['error']}")
        with session_scope(self.ext.sessionmaker) as s:
            version = s.get(ModelVersion, run["candidate_model_version_id"])
            path = registry.local_checkpoint(version.checkpoint_uri, self.settings, version.name)
        return run, path


def build_pool(world, n_ordinary: int, n_concept: int, seed: int) -> list[tuple[object, bool]]:
    """(example, is concept) pairs, shuffled: ordinary test-split images beyond those scored,
    and concept images from the start of the concept split (the scored ones are at its end)."""
    ordinary = world.split("test", ORDINARY_OFFSET + n_ordinary)[ORDINARY_OFFSET:]
    concept = world.split("concept", 100_000)[:n_concept]
    pool = [(ex, False) for ex in ordinary] + [(ex, True) for ex in concept]
    random.Random(seed).shuffle(pool)
    return pool


def run_arm(name: str, args, pool_items: list[tuple[object, bool]]) -> ArmResult:
    from core_model.evaluate import normalize

    recipe = {**RECIPE, "finetune_steps": args.steps, "min_new_reviews": 1}
    arm = Arm(args.workdir.resolve() / name, args.checkpoint, recipe)
    examples = [ex for ex, _ in pool_items]
    t0 = time.perf_counter()
    job_id, pool = arm.submit(examples, "pool")
    print(
        f"[{name}] submitted and captioned {len(pool)} images in {time.perf_counter() - t0:.0f} s"
    )
    if name == "queue":
        order = arm.queue_order(job_id, args.reviews)
    else:
        order = random.Random(args.seed + 1).sample(sorted(pool), args.reviews)
    corrected = arm.review(order, pool, examples)
    pool_wrong = sum(
        normalize((item["caption"] or {}).get("text", "")) != normalize(examples[k].caption)
        for item, k in pool.values()
    )
    run, checkpoint = arm.retrain()
    print(f"[{name}] run {run['id']}: {run['status']}; {run['gate'].get('reason', run['error'])}")
    return ArmResult(
        name=name,
        reviewed=len(order),
        reviewed_concept=sum(pool_items[pool[i][1]][1] for i in order),
        reviewed_wrong=corrected,
        pool_wrong=pool_wrong,
        train_examples=run["train_examples"],
        holdout_examples=run["holdout_examples"],
        status=run["status"],
        gate=run["gate"].get("reason", run["error"] or ""),
        train_s=float(run["metrics"].get("train_s", 0.0)),
        checkpoint=checkpoint,
    )


def score(checkpoint: Path, concept_eval: list, test: list) -> tuple[float, float]:
    from core_model.checkpoint import load_checkpoint
    from core_model.evaluate import evaluate_model

    model, _ = load_checkpoint(checkpoint)
    concept = evaluate_model(model, concept_eval, meteor=False)[0]["exact_match"]
    return concept, evaluate_model(model, test, meteor=False)[0]["exact_match"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="var/models/demo", type=Path)
    ap.add_argument("--workdir", default="var/bench-review-order", type=Path)
    ap.add_argument("--ordinary", type=int, default=300, help="ordinary images in the pool")
    ap.add_argument("--concept", type=int, default=60, help="concept images in the pool")
    ap.add_argument("--reviews", type=int, default=100, help="reviews taken in each arm")
    ap.add_argument("--eval", type=int, default=100, help="unseen concept images scored")
    ap.add_argument("--test-size", type=int, default=1000, help="test-split images scored")
    ap.add_argument("--steps", type=int, default=RECIPE["finetune_steps"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.reviews > args.ordinary + args.concept:
        ap.error("--reviews must not exceed the pool (--ordinary + --concept)")
    if args.ordinary + args.concept > 1000:
        ap.error("the pool (--ordinary + --concept) holds at most 1,000 images (one listing page)")
    os.chdir(REPO)
    ensure_checkpoint(args.checkpoint)
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from core_model.checkpoint import load_checkpoint
    from core_model.synthetic import SyntheticWorld, world_config_from_dict

    _, meta = load_checkpoint(args.checkpoint)
    world_cfg = (meta.get("provenance") or {}).get("world")
    world = SyntheticWorld(world_config_from_dict(world_cfg)) if world_cfg else SyntheticWorld()
    pool = build_pool(world, args.ordinary, args.concept, args.seed)
    concept_eval = [world.split("concept", 100_000)[100_000 - 1 - k] for k in range(args.eval)]
    test = world.split("test", args.test_size)
    print(
        f"pool: {args.ordinary} ordinary + {args.concept} concept images "
        f"(held-out concept: {', '.join(world.cfg.held_out_concepts)}); "
        f"{args.reviews} reviews per arm; fine-tune {args.steps} steps of "
        f"{RECIPE['finetune_batch_size']}",
        flush=True,
    )
    base = score(args.checkpoint, concept_eval, test)
    print(f"demo model: concept {base[0]:.3f}, test split {base[1]:.3f}", flush=True)
    arms = []
    for name in ("queue", "random"):
        result = run_arm(name, args, pool)
        result.concept, result.test = score(result.checkpoint, concept_eval, test)
        print(f"[{name}] concept {result.concept:.3f}, test split {result.test:.3f}", flush=True)
        arms.append(result)
    report(arms, base, args, time.perf_counter() - t_start)


def report(arms: list[ArmResult], base: tuple[float, float], args, wall: float) -> None:
    queue, rand = arms
    print()
    header = f"{'':<44}{'demo':>8}{'queue':>8}{'random':>8}"
    print(header)
    rows = [
        ("reviewed (of the pool)", "", queue.reviewed, rand.reviewed),
        ("  of which concept (purple)", "", queue.reviewed_concept, rand.reviewed_concept),
        ("  of which corrected (caption wrong)", "", queue.reviewed_wrong, rand.reviewed_wrong),
        ("wrong captions in the whole pool", "", queue.pool_wrong, rand.pool_wrong),
        (
            "training examples / held out",
            "",
            f"{queue.train_examples}/{queue.holdout_examples}",
            f"{rand.train_examples}/{rand.holdout_examples}",
        ),
    ]
    for label, a, b, c in rows:
        print(f"{label:<44}{a!s:>8}{b!s:>8}{c!s:>8}")
    print(
        f"{'concept (purple), ' + str(args.eval) + ' unseen images':<44}"
        f"{base[0]:8.3f}{queue.concept:8.3f}{rand.concept:8.3f}"
    )
    print(
        f"{'test split, ' + str(args.test_size) + ' images':<44}"
        f"{base[1]:8.3f}{queue.test:8.3f}{rand.test:8.3f}"
    )
    for arm in arms:
        print(f"gate ({arm.name}): {arm.status}: {arm.gate}; training {arm.train_s:.0f} s")
    points = round(100 * (queue.concept - rand.concept), 1)
    ratio = f"{queue.concept / rand.concept:.2f}" if rand.concept else "- (random arm 0)"
    print(
        f"concept accuracy, queue order vs random: {points:+.1f} points, ratio {ratio}; "
        f"test split {100 * (queue.test - rand.test):+.1f} points"
    )
    print(f"bar {'MET' if points >= TARGET_POINTS else 'NOT MET'}: >= {TARGET_POINTS:.0f} points")
    print(f"whole bench: {wall:.0f} s ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
