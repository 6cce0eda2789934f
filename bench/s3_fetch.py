"""The S3 client path's own cost: concurrent GETs per second against an S3 API server on
loopback (moto's), and the worker's per-image overhead on top of the raw GET (header check,
safe decode, preprocess), measured in one run.

moto's server answers on the order of a hundred requests a second (FACTS.md), so this is a
measure of our client path against a slow server, not of S3's throughput:

    python bench/s3_fetch.py                 # 300 JPEGs of 256 px, 1, 8 and 16 threads
    python bench/s3_fetch.py --endpoint URL  # any other S3 API endpoint (credentials from env)
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_throughput import make_jpegs  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rate(fn, keys: list[str], threads: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(fn, keys):
            pass
    return len(keys) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", default="1,8,16")
    ap.add_argument(
        "--endpoint", default="", help="S3 API endpoint (default: start moto on loopback)"
    )
    args = ap.parse_args()

    from captioner.settings import Settings
    from captioner.storage import S3ObjectStore
    from core_model.config import preset
    from core_model.model import build_encoder
    from core_model.preprocess import Preprocessor
    from workers.pixels import prepare_image

    server = None
    endpoint = args.endpoint
    if not endpoint:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    store = S3ObjectStore(bucket, "images", endpoint_url=endpoint, region="us-east-1")
    store.client.create_bucket(Bucket=bucket)
    jpegs = make_jpegs(args.images, args.image_size)
    keys = [f"{i:06d}.jpg" for i in range(len(jpegs))]
    for key, data in zip(keys, jpegs, strict=True):
        store.put(key, data)

    settings = Settings()
    preprocess = Preprocessor.for_encoder(build_encoder(preset("tiny")))
    print(
        f"{len(keys)} JPEGs of {args.image_size} px on {'moto (loopback)' if server else endpoint}"
    )
    print("overhead: wall time per image of the worker path (GET + header check + safe decode +")
    print("preprocess) minus that of the raw GET, at the same concurrency")
    print(f"{'threads':>7} {'raw GET/s':>10} {'worker path img/s':>18} {'overhead ms/img':>16}")
    for threads in [int(t) for t in args.threads.split(",")]:
        raw = rate(store.get, keys, threads)
        worker = rate(lambda k: prepare_image(store, k, settings, preprocess), keys, threads)
        overhead_ms = (1 / worker - 1 / raw) * 1000
        print(f"{threads:>7} {raw:>10.1f} {worker:>18.1f} {overhead_ms:>16.2f}", flush=True)
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
