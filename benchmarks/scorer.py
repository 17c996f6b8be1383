"""Throughput of the exact all-pairs scorer against the machine's GEMM peak and against a
reference-style loop (one caption at a time against all images, contexts materialised as
in SCAN/HAT's evaluation code).

    .venv/bin/python benchmarks/scorer.py [--device cuda --dtype bfloat16] [--images 64]

Throughput counts only the region-word products: 2 * R * L * d flops per pair and level,
with the captions' actual lengths. Prints the measured ratios; never pass/fail.
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial

import torch
import torch.nn.functional as F

from hat.align import EPS, LEAKY_SLOPE, similarity

PAPER_REGIONS = (784, 196, 49)  # Swin-B stages 2/3/4 at 224 px
PAPER_DIM = 768
MAX_WORDS = 32
MEAN_WORDS = 16.0  # typical Flickr30K caption length with [CLS]/[SEP]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_flops(device: torch.device, dtype: torch.dtype, size: int, repeat: int) -> float:
    a = torch.randn(size, PAPER_DIM, device=device, dtype=dtype)
    b = torch.randn(PAPER_DIM, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeat)
    return 2 * size * size * PAPER_DIM / seconds


def caption_lengths(m: int, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.normal(MEAN_WORDS, 4.0, (m,), generator=generator).round().long()
    return lengths.clamp(7, MAX_WORDS)


def reference_loop(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, lam: float):
    """One caption at a time against all images: SCAN-style i2t with materialised contexts."""
    n = images.shape[0]
    out = torch.empty(n, captions.shape[0], device=images.device, dtype=torch.float32)
    for j in range(captions.shape[0]):
        cap = captions[j, : int(lengths[j])].unsqueeze(0).expand(n, -1, -1)  # (N, L, d)
        attn = torch.bmm(cap, images.transpose(1, 2)).float()  # (N, L, R)
        attn = F.leaky_relu(attn, LEAKY_SLOPE)
        attn = attn / (attn.norm(dim=2, keepdim=True) + EPS)
        attn = torch.softmax(lam * attn.transpose(1, 2), dim=2)  # (N, R, L)
        context = torch.bmm(attn, cap.float())  # (N, R, d)
        out[:, j] = F.cosine_similarity(images.float(), context, dim=2, eps=EPS).mean(dim=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--captions", type=int, default=160)
    parser.add_argument("--loop-captions", type=int, default=20, help="captions for the loop")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the hat command does; denormals slow both sides on x86
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    lengths = caption_lengths(args.captions, g)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    print(
        f"device {device} ({name}), dtype {args.dtype}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    peak = gemm_flops(device, dtype, 4096 if device.type == "cuda" else 2048, args.repeat)
    print(f"GEMM peak ({PAPER_DIM}-deep, square): {peak / 1e9:.1f} GFLOP/s")
    print("| level | R | scorer GFLOP/s | % of GEMM | loop GFLOP/s | scorer / loop |")
    print("|---|---:|---:|---:|---:|---:|")
    total_flops = total_scorer = total_loop = 0.0
    for level, r in enumerate(PAPER_REGIONS, start=1):
        images = torch.randn(args.images, r, PAPER_DIM, generator=g).to(device, dtype)
        captions = torch.randn(args.captions, MAX_WORDS, PAPER_DIM, generator=g).to(device, dtype)
        images, captions = images * 0.05, captions * 0.05
        lens = lengths.to(device)
        flops = 2.0 * r * PAPER_DIM * float(lengths.sum()) * args.images
        t_scorer = timed(partial(similarity, images, captions, lens), device, args.repeat)
        loop_caps = captions[: args.loop_captions]
        loop_flops = 2.0 * r * PAPER_DIM * float(lengths[: args.loop_captions].sum()) * args.images
        t_loop = timed(
            partial(reference_loop, images, loop_caps, lens[: args.loop_captions], 9.0),
            device, max(1, args.repeat - 1),
        )  # fmt: skip
        scorer_rate, loop_rate = flops / t_scorer, loop_flops / t_loop
        total_flops += flops
        total_scorer += t_scorer
        total_loop += t_loop * flops / loop_flops
        print(
            f"| {level} | {r} | {scorer_rate / 1e9:.1f} | {100 * scorer_rate / peak:.0f}% | "
            f"{loop_rate / 1e9:.1f} | {scorer_rate / loop_rate:.1f}x |"
        )
    rate = total_flops / total_scorer
    print(
        f"all levels: scorer {rate / 1e9:.1f} GFLOP/s = {100 * rate / peak:.0f}% of GEMM peak, "
        f"{total_loop / total_scorer:.1f}x the caption loop"
    )
    check = similarity(images[:4], captions[:8], lens[:8]).float()
    ref = reference_loop(images[:4], captions[:8], lens[:8], 9.0)
    print(f"max |scorer - loop| on a sample: {float((check - ref).abs().max()):.2e}")


if __name__ == "__main__":
    main()
