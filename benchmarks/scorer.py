"""Throughput of the exact all-pairs scorer against the machine's GEMM peak and against a
reference-style loop (one caption at a time against all images, contexts materialised as
in SCAN/HAT's evaluation code), in one run, for each thread count.

    .venv/bin/python benchmarks/scorer.py [--threads 1 2] [--levels 1 2 3] [--busy]
        [--device cuda --dtype bfloat16] [--images 48 --captions 240]

Throughput counts only the region-word products: 2 * R * L * d flops per pair and level,
with the captions' actual lengths (12-32 tokens). The peak is a large square GEMM
(2048 x 768 by 768 x 2048) timed in the same run, just before each thread count's
levels. ``--busy`` repeats every measurement with one busy process (a Python spin loop)
beside it, to show which thread count keeps its speed on a loaded machine; the process
is killed at the end. Timings are the best of ``--repeat`` calls. Prints the measured
ratios; never pass/fail.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from hat.align import EPS, LEAKY_SLOPE, similarity

PAPER_REGIONS = (784, 196, 49)  # Swin-B stages 2/3/4 at 224 px
PAPER_DIM = 768
MIN_WORDS, MAX_WORDS = 12, 32
MEAN_WORDS = 18.0  # typical Flickr30K caption length with [CLS]/[SEP]
PEAK_SIZE = {"cpu": 2048, "cuda": 4096}
BUSY_LOOP = "while True: pass"


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
    return lengths.clamp(MIN_WORDS, MAX_WORDS)


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


@contextmanager
def busy_process(enabled: bool) -> Iterator[None]:
    """One CPU-bound process beside the measurement while enabled (killed on exit)."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # let it start spinning
        yield
    finally:
        proc.kill()
        proc.wait()


def measure_levels(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, lengths: torch.Tensor
) -> list[tuple[int, float, float]]:
    """Per level: R, scorer seconds per flop, loop seconds per flop."""
    rows = []
    for level in args.levels:
        r = PAPER_REGIONS[level - 1]
        g = torch.Generator().manual_seed(level)
        images = (0.05 * torch.randn(args.images, r, PAPER_DIM, generator=g)).to(device, dtype)
        captions = 0.05 * torch.randn(args.captions, MAX_WORDS, PAPER_DIM, generator=g)
        captions, lens = captions.to(device, dtype), lengths.to(device)
        flops = 2.0 * r * PAPER_DIM * float(lengths.sum()) * args.images
        t_scorer = timed(partial(similarity, images, captions, lens), device, args.repeat)
        loop_caps, loop_lens = captions[: args.loop_captions], lens[: args.loop_captions]
        loop_flops = 2.0 * r * PAPER_DIM * float(loop_lens.sum()) * args.images
        loop = partial(reference_loop, images, loop_caps, loop_lens, 9.0)
        t_loop = timed(loop, device, max(1, args.repeat - 1))
        rows.append((r, t_scorer / flops, t_loop / loop_flops))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--captions", type=int, default=240)
    parser.add_argument("--loop-captions", type=int, default=20, help="captions for the loop")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="also with one busy process beside")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the hat command does; denormals slow both sides on x86
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lengths = caption_lengths(args.captions, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    print(
        f"device {device} ({name}), dtype {args.dtype}, torch {torch.__version__}, "
        f"{args.images} images x {args.captions} captions of {MIN_WORDS}-{MAX_WORDS} tokens"
    )
    print(
        "| load | threads | GEMM peak GFLOP/s | level | R | scorer GFLOP/s | % of peak | "
        "loop GFLOP/s | scorer / loop |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for busy in (False, True) if args.busy else (False,):
        with busy_process(busy):
            for threads in args.threads:
                torch.set_num_threads(threads)
                size = PEAK_SIZE.get(device.type, PEAK_SIZE["cpu"])
                peak = gemm_flops(device, dtype, size, args.repeat)
                rows = measure_levels(args, device, dtype, lengths)
                load = "1 busy process" if busy else "as found"
                for level, (r, scorer, loop) in zip(args.levels, rows):
                    print(
                        f"| {load} | {threads} | {peak / 1e9:.1f} | {level} | {r} | "
                        f"{1e-9 / scorer:.1f} | {100 / scorer / peak:.0f}% | "
                        f"{1e-9 / loop:.1f} | {loop / scorer:.1f}x |",
                        flush=True,
                    )
                if len(rows) > 1:
                    weights = [PAPER_REGIONS[level - 1] for level in args.levels]
                    scorer = sum(w * s for w, (_, s, _) in zip(weights, rows)) / sum(weights)
                    loop = sum(w * lp for w, (_, _, lp) in zip(weights, rows)) / sum(weights)
                    print(
                        f"| {load} | {threads} | {peak / 1e9:.1f} | all | | {1e-9 / scorer:.1f} | "
                        f"{100 / scorer / peak:.0f}% | {1e-9 / loop:.1f} | {loop / scorer:.1f}x |",
                        flush=True,
                    )
    r = PAPER_REGIONS[args.levels[-1] - 1]
    g = torch.Generator().manual_seed(99)
    images = (0.05 * torch.randn(4, r, PAPER_DIM, generator=g)).to(device, dtype)
    captions = (0.05 * torch.randn(8, MAX_WORDS, PAPER_DIM, generator=g)).to(device, dtype)
    lens = lengths[:8].to(device)
    diff = similarity(images, captions, lens).float() - reference_loop(images, captions, lens, 9.0)
    print(f"max |scorer - loop| on a sample: {float(diff.abs().max()):.2e}")


if __name__ == "__main__":
    main()
