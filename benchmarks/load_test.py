"""Bounded load test of ``hat serve`` on loopback: N concurrent clients, a fixed number
of mixed requests, zero errors expected; prints p50/p99 latency per request kind.

    .venv/bin/python benchmarks/load_test.py [--index runs/demo/index] [--clients 8]
                                             [--requests 400]

Without ``--index`` (or if it does not exist) a small index of generated scenes is
built with a random-weight ``cpu`` preset model. The server runs as a separate
process (``hat serve``), so clients and server do not share an interpreter.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import hat
from hat.checkpoint import save_model
from hat.data import generate_scenes
from hat.index import Index

MIX = {"text": 0.5, "thumbnail": 0.25, "healthz": 0.1, "image": 0.1, "explain": 0.05}
SCENES = 200
SCENE_SIZE = 96
READY_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_index(work: Path) -> tuple[Path, list[str]]:
    save_model(hat.create_model("cpu"), work / "model")
    data = work / "scenes"
    generate_scenes(data, n_train=SCENES - 6, n_val=3, n_test=3, image_size=SCENE_SIZE)
    root = work / "index"
    Index.create(root, work / "model").close()
    with Index.open(root, writable=True) as index:
        index.add_images(data / "images", progress=False)
    dataset = json.loads((data / "dataset_synth.json").read_text())
    return root, [img["sentences"][0]["raw"] for img in dataset["images"]]


def query_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", default="runs/demo/index")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hat-load-"))
    root = Path(args.index)
    queries = ["a red circle", "a small blue square above a green star", "a purple triangle"]
    if not (root / "manifest.json").is_file():
        print(f"{root} not found: building a {SCENES}-image index with a random cpu model")
        root, queries = small_index(work)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hat", "serve", str(root), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
            deadline = time.time() + READY_TIMEOUT_S
            while True:
                try:
                    health = client.get("/healthz").json()
                    break
                except httpx.TransportError:
                    if time.time() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.2)
            ids = [h["id"] for h in client.post("/search/text", json={"query": "a", "k": 50})
                   .json()["hits"]]  # fmt: skip
        print(f"server: {health}; {args.clients} clients, {args.requests} requests, mix {MIX}")
        rng = random.Random(args.seed)
        kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=args.requests)
        picture = query_image()

        def one(kind: str) -> tuple[str, float, int]:
            with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as c:
                start = time.perf_counter()
                if kind == "text":
                    body = {"query": rng.choice(queries), "k": 10}
                    r = c.post("/search/text", json=body)
                elif kind == "thumbnail":
                    r = c.get(f"/images/{rng.choice(ids)}")
                elif kind == "healthz":
                    r = c.get("/healthz")
                elif kind == "image":
                    r = c.post("/search/image", files={"file": ("q.png", picture)}, data={"k": "5"})
                else:
                    params = {"q": rng.choice(queries), "format": "json"}
                    r = c.get(f"/explain/{rng.choice(ids)}", params=params)
                return kind, (time.perf_counter() - start) * 1e3, r.status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, kinds))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    errors = [(k, s) for k, _, s in results if s != 200]
    by_kind = defaultdict(list)
    for kind, ms, _ in results:
        by_kind[kind].append(ms)
    print(f"{len(results)} requests in {wall:.1f} s = {len(results) / wall:.1f} req/s; "
          f"errors: {len(errors)} {errors[:5]}")  # fmt: skip
    for kind, times in [("all", [ms for _, ms, _ in results]), *sorted(by_kind.items())]:
        p50, p99 = np.percentile(times, [50, 99])
        print(f"  {kind:10s} n={len(times):4d}  p50 {p50:8.1f} ms  p99 {p99:8.1f} ms")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
