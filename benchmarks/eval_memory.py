"""Peak host memory of a Flickr30K-sized evaluation at paper sizes, on synthetic features.

1,000 images x 5,000 captions, three levels (784/196/49 regions, 768-d), captions of
realistic lengths, tokens stored once in the storage dtype (float16 by default), then
scored with the exact scorer. On a CPU the full 5M-pair scoring takes long, so
``--captions`` scores all images against the first captions only; the feature store
(the part that grows with the dataset) is always full size, and the scorer's own
memory is bounded by its block budget whatever the number of pairs.

    .venv/bin/python benchmarks/eval_memory.py [--captions 5000] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from hat.config import get_preset
from hat.features import ImageFeatures, TextFeatures
from hat.scorer import Scorer

REGIONS = (784, 196, 49)
MAX_WORDS = 32
GENERATE_SLICE = 50


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_tokens(shape: tuple[int, int, int], dtype: torch.dtype, g: torch.Generator):
    """Random tokens made straight in the storage dtype, a slice at a time, so that the
    measurement is not inflated by float32 temporaries of the generator."""
    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], GENERATE_SLICE):
        part = out[start : start + GENERATE_SLICE]
        part.copy_(torch.randn(part.shape, generator=g))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions-total", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=50, help="captions actually scored")
    parser.add_argument("--storage", default="float16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = get_preset("paper").model
    d = cfg.embed_dim
    storage = getattr(torch, args.storage)
    base = peak_rss_gib()
    g = torch.Generator().manual_seed(0)
    lengths = torch.normal(16.0, 4.0, (args.captions_total,), generator=g).round().long()
    lengths = lengths.clamp(7, MAX_WORDS)
    images = ImageFeatures(
        [random_tokens((args.images, r, d), storage, g) for r in REGIONS],
        torch.zeros(args.images, cfg.global_dim, dtype=storage),
    )
    captions = TextFeatures(
        [random_tokens((args.captions_total, MAX_WORDS, d), storage, g) for _ in REGIONS],
        lengths,
        torch.zeros(args.captions_total, cfg.global_dim, dtype=storage),
    )
    store = sum(t.nbytes for t in images.levels) + sum(t.nbytes for t in captions.levels)
    after_store = peak_rss_gib()
    start = time.perf_counter()
    scores = Scorer(cfg, device).all_pairs(
        images, captions[: args.captions], out=torch.device("cpu")
    )
    seconds = time.perf_counter() - start
    pairs = args.images * args.captions
    print(
        f"feature store: {store / 2**30:.2f} GiB ({args.storage}); peak RSS before features "
        f"{base:.2f} GiB, after {after_store:.2f} GiB, after scoring {peak_rss_gib():.2f} GiB"
    )
    print(
        f"scored {pairs:,} pairs x {len(REGIONS)} levels in {seconds:.1f} s on {device} "
        f"({pairs / seconds:,.0f} pairs/s); full {args.images}x{args.captions_total} "
        f"extrapolates to {seconds * args.captions_total / args.captions / 60:.1f} min; "
        f"scores {tuple(scores.total.shape)}"
    )


if __name__ == "__main__":
    main()
