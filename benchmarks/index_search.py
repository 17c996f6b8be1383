"""Index build throughput, index size, and text-query latency (two-stage and exhaustive).

    .venv/bin/python benchmarks/index_search.py [--model runs/demo/model] [--large 100000]
        [--token-codecs pq]

1. Real pipeline at 1K images: generated scenes are indexed with the model (the
   demo's by default; ``make demo`` first, else a random-weight ``cpu`` preset model,
   which costs the same), reporting images/s, bytes per image per level, and the
   p50/p95 latency of text queries, two-stage and exhaustive.
2. Large collection with synthetic features: ``--large`` images' worth of random
   float16 tokens of the same model's shapes are written as index segments (no
   encoding), then the same query latencies are measured there (the global index is
   IVF above ``IndexConfig.exact_max_items``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hat
from hat.checkpoint import save_model
from hat.config import IndexConfig
from hat.data import generate_scenes
from hat.index import Index
from hat.index.store import SegmentArrays

SCENE_SIZE = 96
SMALL = 1000
QUERIES = 40
EXHAUSTIVE_QUERIES_LARGE = 5
K = 10
SYNTH_CHUNK = 20_000


def percentiles(samples: list[float]) -> str:
    p50, p95 = np.percentile(samples, [50, 95])
    return f"p50 {p50:8.1f} ms   p95 {p95:8.1f} ms   (n={len(samples)})"


def query_latency(index: Index, queries: list[str], exhaustive: bool) -> list[float]:
    index.search_text(queries[0], K, exhaustive)  # warm-up: snapshot, faiss, page cache
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search_text(q, K, exhaustive)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def level_bytes(root: Path, levels: int) -> list[int]:
    """Bytes of each level's image token files: ``levelK.npy`` (float16) or, once its
    codec is trained, ``levelK.codes.npy``."""
    return [
        sum(f.stat().st_size for f in (root / "segments").glob(f"image-*/level{k + 1}.*npy"))
        for k in range(levels)
    ]


def small_collection(work: Path, model_dir: Path, cfg: IndexConfig, images: int) -> list[str]:
    data = work / "scenes"
    generate_scenes(data, n_train=images - 6, n_val=3, n_test=3, image_size=SCENE_SIZE)
    dataset = json.loads((data / "dataset_synth.json").read_text())
    queries = [img["sentences"][0]["raw"] for img in dataset["images"][:QUERIES]]
    root = work / "index-1k"
    Index.create(root, model_dir, cfg).close()
    with Index.open(root, cfg=cfg, writable=True) as index:
        start = time.perf_counter()
        report = index.add_images(data / "images", progress=False)
        took = time.perf_counter() - start
        n = report.added
        sizes = level_bytes(root, len(index.store.manifest.tokens))
        print(f"\n== {n} images, real pipeline (decode + encode + write), batch {cfg.batch_size}")
        print(f"build: {took:.1f} s = {n / took:.1f} images/s")
        manifest = index.store.manifest
        for k, (size, tokens) in enumerate(zip(sizes, manifest.tokens)):
            print(f"level {k + 1}: {tokens:4d} tokens x {manifest.embed_dim} "
                  f"({manifest.codecs[k]}) = {size / n / 1024:.2f} KiB per image")  # fmt: skip
        total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"whole index: {total / n / 1024:.1f} KiB per image")
        print("two-stage  ", percentiles(query_latency(index, queries, exhaustive=False)))
        print("exhaustive ", percentiles(query_latency(index, queries, exhaustive=True)))
    return queries


def large_collection(work: Path, model_dir: Path, cfg: IndexConfig, n: int, queries) -> None:
    root = work / "index-large"
    Index.create(root, model_dir, cfg).close()
    with Index.open(root, cfg=cfg, writable=True) as index:
        manifest = index.store.manifest
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        with index.store.writer():
            for first in range(0, n, SYNTH_CHUNK):
                count = min(SYNTH_CHUNK, n - first)
                levels = [
                    rng.standard_normal((count, t, manifest.embed_dim), dtype=np.float32)
                    for t in manifest.tokens
                ]  # (n, T_k, d) each
                glob = rng.standard_normal((count, manifest.global_dim), dtype=np.float32)
                glob /= np.linalg.norm(glob, axis=1, keepdims=True)  # (n, g)
                rows = [
                    {"path": f"/synthetic/{first + i:07d}.jpg", "sha256": "0" * 64, "bytes": 0,
                     "mtime_ns": 0, "width": 1, "height": 1}
                    for i in range(count)
                ]  # fmt: skip
                index.store.commit_images(rows, SegmentArrays(levels, glob))
            index.builder.rebuild_faiss("image")
        took = time.perf_counter() - start
        kind = type(index.gallery("image").faiss).__name__
        sizes = level_bytes(root, len(manifest.tokens))
        print(
            f"\n== {n} images, synthetic features (write only: {took:.1f} s); global index {kind}"
        )
        print("bytes per image per level: " + ", ".join(f"{s / n / 1024:.2f} KiB" for s in sizes))
        print("two-stage  ", percentiles(query_latency(index, queries, exhaustive=False)))
        few = queries[:EXHAUSTIVE_QUERIES_LARGE]
        print("exhaustive ", percentiles(query_latency(index, few, exhaustive=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--images", type=int, default=SMALL, help="of the real pipeline")
    parser.add_argument("--large", type=int, default=100_000, help="0: the real part only")
    parser.add_argument("--batch-size", type=int, default=IndexConfig.batch_size)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument(
        "--token-codecs", nargs="+", default=list(IndexConfig.token_codecs),
        help="one codec for every level, or one per level (index.token_codecs)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"torch threads: {torch.get_num_threads()}")
    work = Path(tempfile.mkdtemp(prefix="hat-index-bench-"))
    try:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            print(f"{model_dir} not found: using a random-weight cpu-preset model (same cost)")
            model_dir = work / "model"
            save_model(hat.create_model("cpu"), model_dir)
        cfg = IndexConfig(
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            token_codecs=tuple(args.token_codecs),
        )
        queries = small_collection(work, model_dir, cfg, args.images)
        if args.large:
            large_collection(work, model_dir, cfg, args.large, queries)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
