"""Per-pair cost of reranking shortlists (``hat.align.grouped_similarity``) against the
per-pair cost of the all-pairs blocks (``hat.align.similarity``) at the same level shapes,
in one run, and the two-stage speed-up they imply.

    .venv/bin/python benchmarks/rerank.py [--shapes demo paper] [--directions i2t t2i]
        [--threads 1 2] [--repeat 5]

For each shape set (levels summed) and direction it times, interleaved and as medians:

- all pairs: ``similarity`` of ``--images`` images x ``--captions`` captions;
- image queries: ``--queries`` images, each with its own ``--caption-k`` captions (A = 1);
- caption queries: ``--queries`` captions, each with its own ``--image-k`` images (B = 1);

and prints microseconds per pair (best of ``--repeat`` calls, median over ``--rounds``
interleaved rounds) and the ratio rerank / all-pairs. The candidates are
gathered from the gallery tensors inside the timed call, as a grouped rerank must
(the gather alone is printed too); and ``--pair-queries`` caption queries scored as
listed pairs with ``pair_similarity`` (grouped by image, or by caption at levels whose
images have fewer tokens than the captions: the smaller side is gathered), the path
:meth:`hat.scorer.Scorer.rerank` (so every Searcher) takes. Then the
two-stage estimate for text queries on a gallery of ``--gallery`` images and 5 captions
each with a ``--share`` shortlist: exhaustive = all pairs x all-pairs cost; two-stage =
faiss shortlist (measured) + the shortlisted pairs x the caption-query cost (grouped
B = 1, and as pairs). Prints measurements; never pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hat.align import grouped_similarity, pair_similarity, similarity
from hat.search import exact_inner_product

CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class Shapes:
    """Level shapes of a model: regions per level, joint width, caption lengths."""

    regions: tuple[int, ...]
    dim: int
    min_words: int
    max_words: int
    mean_words: float
    global_dim: int


SHAPES = {
    # The demo's `cpu` preset: 8x8, 4x4, 2x2 regions, d = 128, ~14-token captions.
    "demo": Shapes((64, 16, 4), 128, 8, 20, 14.0, 64),
    # The paper: Swin-B stages 2-4 at 224 px, d = 768, BERT captions of 12-32 tokens.
    "paper": Shapes((784, 196, 49), 768, 12, 32, 18.0, 256),
}


def caption_lengths(shapes: Shapes, m: int, generator: torch.Generator) -> torch.Tensor:
    """``(m,)`` caption lengths ~ N(mean, 4) clipped to the shapes' range."""
    lengths = torch.normal(shapes.mean_words, 4.0, (m,), generator=generator).round().long()
    return lengths.clamp(shapes.min_words, shapes.max_words)


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` timed calls after a warm-up (the least disturbed by load)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gallery(shapes: Shapes, n: int, m: int, seed: int) -> tuple[list, list, torch.Tensor]:
    """Random per-level image ``(n, R, d)`` and caption ``(m, L, d)`` tokens and lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = caption_lengths(shapes, m, g)
    images = [0.05 * torch.randn(n, r, shapes.dim, generator=g) for r in shapes.regions]
    captions = [
        0.05 * torch.randn(m, shapes.max_words, shapes.dim, generator=g) for _ in shapes.regions
    ]
    return images, captions, lengths


def rerank_call(
    images: list[torch.Tensor],
    captions: list[torch.Tensor],
    lengths: torch.Tensor,
    candidates: torch.Tensor,
    queries: str,
    direction: str,
    gather_only: bool = False,
) -> Callable[[], object]:
    """One rerank of every query against its ``candidates`` ``(Q, k)``, all levels, as
    a grouped rerank gathers them (or only the gather)."""
    q = candidates.shape[0]

    def run() -> None:
        for img, cap in zip(images, captions):
            if queries == "image":
                cand_lengths = lengths[candidates]  # (Q, k)
                words = int(cand_lengths.max())
                imgs = img[:q, None]  # (Q, 1, R, d)
                caps = cap[:, :words][candidates]  # (Q, k, L, d)
            else:
                cand_lengths = lengths[:q, None]  # (Q, 1)
                words = int(cand_lengths.max())
                imgs = img[candidates]  # (Q, k, R, d)
                caps = cap[:q, :words][:, None]  # (Q, 1, L, d)
            if not gather_only:
                grouped_similarity(imgs, caps, cand_lengths, direction, 9.0)

    return run


def measure(shapes: Shapes, direction: str, args: argparse.Namespace) -> dict[str, float]:
    """Microseconds per pair, all levels: medians over interleaved rounds."""
    n, m = args.images, args.captions
    pool = max(n, 2 * args.image_k) + args.queries
    m_pool = max(m, args.caption_k, args.pair_queries) + args.queries
    images, captions, lengths = gallery(shapes, pool, m_pool, 0)
    g = torch.Generator().manual_seed(1)
    cap_cands = torch.stack(
        [torch.randperm(len(lengths), generator=g)[: args.caption_k] for _ in range(args.queries)]
    )  # (Q, caption_k)
    img_cands = torch.stack(
        [torch.randperm(pool, generator=g)[: args.image_k] for _ in range(args.queries)]
    )  # (Q, image_k)
    # Caption queries scored as listed pairs: each of --pair-queries captions with its
    # --image-k images drawn from 2 * image-k, so an image is listed by about half of them
    # (250 by default, as text queries at 5% of 1,000 images: 5,000 x 50 / 1,000).
    pair_images = torch.stack(
        [
            torch.randperm(2 * args.image_k, generator=g)[: args.image_k]
            for _ in range(args.pair_queries)
        ]
    ).flatten()  # (pair_queries * image_k,)
    pair_captions = torch.arange(args.pair_queries).repeat_interleave(args.image_k)
    calls = {
        "all pairs": (
            lambda: [
                similarity(i[:n], c[:m], lengths[:m], direction, 9.0)
                for i, c in zip(images, captions)
            ],
            n * m,
        ),
        "image queries (A=1)": (
            rerank_call(images, captions, lengths, cap_cands, "image", direction),
            cap_cands.numel(),
        ),
        "caption queries (B=1)": (
            rerank_call(images, captions, lengths, img_cands, "caption", direction),
            img_cands.numel(),
        ),
        "caption queries as pairs": (
            lambda: [
                pair_similarity(i, c, lengths, pair_images, pair_captions, direction, 9.0)
                for i, c in zip(images, captions)
            ],
            pair_images.numel(),
        ),
        "gather, caption queries": (
            rerank_call(images, captions, lengths, img_cands, "caption", direction, True),
            img_cands.numel(),
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):  # interleaved, so that load changes hit every variant
        for name, (fn, pairs) in calls.items():
            samples[name].append(1e6 * best_seconds(fn, args.repeat) / pairs)
    return {name: statistics.median(values) for name, values in samples.items()}


def shortlist_seconds(shapes: Shapes, args: argparse.Namespace) -> float:
    """Wall time of the faiss shortlist of every caption of the gallery (5 per image)."""
    g = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(args.gallery, shapes.global_dim, generator=g), dim=1)
    texts = F.normalize(
        torch.randn(CAPTIONS_PER_IMAGE * args.gallery, shapes.global_dim, generator=g), dim=1
    )
    k = max(1, round(args.share * args.gallery))
    index = exact_inner_product(images.numpy())  # what a FeatureGallery shortlists with
    return best_seconds(lambda: index.search(texts.numpy(), k), args.repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--directions", nargs="+", default=["i2t", "t2i"])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--images", type=int, default=32, help="all-pairs block: images")
    parser.add_argument("--captions", type=int, default=160, help="all-pairs block: captions")
    parser.add_argument("--queries", type=int, default=8, help="rerank queries per kind")
    parser.add_argument("--image-k", type=int, default=50, help="images per caption query")
    parser.add_argument(
        "--pair-queries", type=int, default=500, help="caption queries scored as pairs"
    )
    parser.add_argument("--caption-k", type=int, default=250, help="captions per image query")
    parser.add_argument("--gallery", type=int, default=1000, help="two-stage estimate: images")
    parser.add_argument("--share", type=float, default=0.05, help="shortlisted share")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls, the best kept")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the hat command does
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}; microseconds per (image, caption) pair, all levels")
    print(
        "| threads | shapes | direction | all pairs | image queries (A=1) | ratio | "
        "caption queries (B=1) | ratio | gather (B=1) | as pairs | ratio | "
        "two-stage speed-up (B=1 / pairs) |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.shapes:
            shapes = SHAPES[name]
            short = shortlist_seconds(shapes, args)
            for direction in args.directions:
                us = measure(shapes, direction, args)
                base = us["all pairs"]
                a1, b1 = us["image queries (A=1)"], us["caption queries (B=1)"]
                as_pairs = us["caption queries as pairs"]
                queries = CAPTIONS_PER_IMAGE * args.gallery
                k = max(1, round(args.share * args.gallery))
                exhaustive = 1e-6 * base * args.gallery * queries
                grouped_speed_up = exhaustive / (short + 1e-6 * b1 * queries * k)
                pairs_speed_up = exhaustive / (short + 1e-6 * as_pairs * queries * k)
                print(
                    f"| {threads} | {name} | {direction} | {base:.1f} | {a1:.1f} | "
                    f"{a1 / base:.2f}x | {b1:.1f} | {b1 / base:.2f}x | "
                    f"{us['gather, caption queries']:.1f} | {as_pairs:.1f} | "
                    f"{as_pairs / base:.2f}x | {grouped_speed_up:.1f}x / {pairs_speed_up:.1f}x |",
                    flush=True,
                )
            queries = CAPTIONS_PER_IMAGE * args.gallery
            print(f"shortlist of {queries} {name} caption queries: {short:.3f} s")
    print(
        f"two-stage: text queries (5 per image) against {args.gallery} images, shortlist "
        f"{args.share:.0%}; exhaustive = every pair at the all-pairs cost"
    )


if __name__ == "__main__":
    main()
