"""What index integrity checks cost: seconds per GB of the checks a reader, a writer and
``hat index verify`` make, on a synthetic index of random features.

The index is written through :class:`hat.index.store.IndexStore` directly (no model):
segments of ``--segment-images`` images at the ``paper`` preset's level shapes (784, 196
and 49 tokens of 768 dims in float16, global embeddings of 1024 dims), ``--gb`` GB in all.
The page cache is warm (the files were just written), as it is for a collection in use;
a cold read adds the disk's own read time.

    .venv/bin/python benchmarks/index_verify.py --gb 1 [--out /tmp/verify-bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from hat.index.store import IndexStore, Manifest, SegmentArrays

TOKENS = (784, 196, 49)
GRIDS = (28, 14, 7)
EMBED_DIM = 768
GLOBAL_DIM = 1024


def _build(root: Path, gb: float, segment_images: int) -> tuple[IndexStore, int]:
    manifest = Manifest("synthetic", "0" * 64, TOKENS, GRIDS, EMBED_DIM, GLOBAL_DIM)
    store = IndexStore.create(root, manifest)
    per_image = sum(TOKENS) * EMBED_DIM * 2 + GLOBAL_DIM * 4
    images = max(1, int(gb * 2**30 / per_image))
    rng = np.random.default_rng(0)
    with store.writer():
        for first in range(0, images, segment_images):
            n = min(segment_images, images - first)
            arrays = SegmentArrays(
                [rng.standard_normal((n, t, EMBED_DIM), dtype=np.float32) for t in TOKENS],
                rng.standard_normal((n, GLOBAL_DIM), dtype=np.float32),
            )
            rows = [
                {"path": f"/photos/{first + i}.jpg", "sha256": "0" * 64, "bytes": 1,
                 "mtime_ns": 0, "width": 1, "height": 1}
                for i in range(n)
            ]  # fmt: skip
            store.commit_images(rows, arrays)
    return store, images


def _median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--segment-images", type=int, default=128)
    parser.add_argument("--out", default="/tmp/hat-verify-bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.out) / "index"
    shutil.rmtree(root, ignore_errors=True)
    store, images = _build(root, args.gb, args.segment_images)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**30
    segments = store.db.execute("SELECT id, kind, count FROM segments")

    def first_use() -> None:
        store._segments.clear()
        for segment, kind, _ in segments:
            store.segment(kind, segment)

    rows = [
        ("open a segment (size + header + shape), every segment", first_use),
        ("writer check (the above + SHA-256 of global.npy)", lambda: store.check()),
        ("hat index verify (SHA-256 of every file + integrity_check)",
         lambda: store.check(full=True)),
    ]  # fmt: skip
    print(f"{images} images in {len(segments)} segments, {size:.2f} GiB on disk")
    print("| check | seconds | seconds per GiB |")
    print("|---|---:|---:|")
    for name, action in rows:
        seconds = _median_seconds(action, args.repeats)
        print(f"| {name} | {seconds:.3f} | {seconds / size:.3f} |")
    store.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
