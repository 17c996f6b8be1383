"""Search at paper size on one machine: encoding rate, bytes per image, two-stage text
query latency at 10K and 100K images, the exhaustive cost, peak memory.

    .venv/bin/python benchmarks/paper_scale.py [--galleries 10000 100000] [--queries 20]
        [--codec pq] [--encode-batches 3] [--threads 0] [--device cpu] [--out DIR]

What runs, all at the ``paper`` preset's shapes, read off a random-weight model built
from that preset (Swin-B at 224 px and BERT-base; no weights are needed):

1. **Encoding**: images/s of :meth:`hat.encoder.Encoder.encode_pixels` on random
   224-px batches (``--encode-batch`` images, after one warm-up batch), and captions/s
   of the text tower on random token ids of :data:`CAPTION_TOKENS` tokens.
2. **Bytes per image** per level for every codec of :mod:`hat.index.codec`, as an
   index stores them (token codes plus the float32 global embedding).
3. **Two-stage text queries** over galleries of ``--galleries`` images, one query at a
   time, as ``hat search`` runs one: the global embeddings in the index's own faiss
   index (:func:`hat.search.global_index`: flat up to ``index.exact_max_items``, IVF
   above), each level's token codes memory-mapped from a file under ``--out`` and
   decoded for the shortlisted images only (:class:`hat.index.codec.CodedLevel`, as an
   index does), reranked by the :class:`hat.search.Searcher` with the paper
   :class:`hat.scorer.Scorer`. The codes are random bytes (every byte is a valid pq or
   int8 code) and the embeddings random unit vectors: decode and rerank cost do not
   depend on the values (token_codec.py measures quality). Prints p50 / p95 of the
   whole query and of its shortlist, decode and rerank parts.
4. **Exhaustive**: :meth:`Scorer.all_pairs` over ``EXHAUSTIVE_IMAGES`` decoded images and
   ``EXHAUSTIVE_CAPTIONS`` captions: seconds per text query per 1,000 images.
5. **Peak memory**: the process's peak resident set (``ru_maxrss``).

The code files are written once per gallery size (19.8 GB for pq at 100K images) and
deleted at the end; a gallery whose codes would not fit in the free disk space under
``--out`` is skipped, and said so.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hat.config import IndexConfig, get_preset
from hat.encoder import Encoder
from hat.features import ImageFeatures, TextFeatures
from hat.index.codec import CODECS, PQ_MIN_TRAIN, CodedLevel, TokenCodec, codec_bytes_per_token
from hat.model import HAT
from hat.scorer import Scorer
from hat.search import Searcher, global_index

CAPTION_TOKENS = 16  # a Flickr30K caption's typical token count
VOCAB_LOW, VOCAB_HIGH = 1000, 30000  # random token ids: BERT-base's ordinary word pieces
CAPTION_RANGE = (12, 32)  # query caption lengths, drawn uniformly
EXHAUSTIVE_IMAGES = 64
EXHAUSTIVE_CAPTIONS = 16
CODE_BLOCK = 1024  # images of random codes written at once (then tiled)
FLOAT32_BYTES = 4
SEED = 0
K = 10  # results per query
DISK_MARGIN = 2**30  # free bytes left on the disk after writing the codes


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class CodedGallery:
    """A :class:`hat.search.Gallery` of ``n`` images: a faiss index of global
    embeddings and, per level, memory-mapped ``(n, T_k, c)`` codes decoded on demand.
    Times its shortlist and decode calls (:attr:`seconds`)."""

    kind = "image"

    def __init__(self, folder: Path, size: int, tokens: tuple[int, ...], codec: TokenCodec,
                 global_dim: int, cfg: IndexConfig) -> None:  # fmt: skip
        rng = np.random.default_rng(SEED)
        self.levels = []
        for k, t in enumerate(tokens):
            path = folder / f"level{k}.npy"
            block = rng.integers(0, 256, (min(CODE_BLOCK, size), t, codec.code_size), np.uint8)
            # Written through a file, not a memory map, so that the written pages do not
            # count in this process's resident memory (what a reader of an index pays).
            with open(path, "wb") as handle:
                header = {"descr": "|u1", "fortran_order": False,
                          "shape": (size, t, codec.code_size)}  # fmt: skip
                np.lib.format.write_array_header_2_0(handle, header)
                for start in range(0, size, len(block)):
                    handle.write(block[: min(len(block), size - start)].tobytes())
            codes = np.load(path, mmap_mode="r")  # (n, T_k, c)
            self.levels.append(CodedLevel(codes, codec))
        embeddings = _unit(rng.standard_normal((size, global_dim), dtype=np.float32))  # (n, g)
        start = time.perf_counter()
        self.faiss = global_index(embeddings, np.arange(size), cfg)
        self.build_seconds = time.perf_counter() - start
        self.size = size
        self.item_bytes = sum(tokens) * codec.dim * FLOAT32_BYTES  # decoded, as an index counts
        self.seconds = {"shortlist": 0.0, "decode": 0.0}

    def __len__(self) -> int:
        return self.size

    def shortlist(self, queries: Tensor, count: int) -> Tensor:
        start = time.perf_counter()
        _, found = self.faiss.search(np.ascontiguousarray(queries.float().numpy()), count)
        self.seconds["shortlist"] += time.perf_counter() - start
        return torch.from_numpy(found)  # (Q, c) positions (ids are positions)

    def features(self, positions: Tensor) -> ImageFeatures:
        start = time.perf_counter()
        rows = positions.numpy()  # in the caller's order: its indices into them depend on it
        levels = [torch.from_numpy(level[rows]) for level in self.levels]  # (m, T_k, d)
        glob = torch.zeros(len(rows), 1)  # the rerank reads tokens only
        self.seconds["decode"] += time.perf_counter() - start
        return ImageFeatures(levels, glob)


def encoding_rates(
    encoder: Encoder, batch: int, batches: int, image_size: int
) -> tuple[float, float]:
    """Images/s and captions/s of the encoder's model, median of ``batches`` batches
    after a warm-up batch (features copied back to the CPU, as an index stores them)."""
    pixels = torch.randn(batch, 3, image_size, image_size)  # (B, 3, H, W)
    ids = torch.randint(VOCAB_LOW, VOCAB_HIGH, (batch, CAPTION_TOKENS), device=encoder.device)
    mask = torch.ones_like(ids)  # (B, L)
    encoder.model.eval()

    def rate(action) -> float:
        action()
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
        return batch / statistics.median(times)

    with torch.no_grad():
        images = rate(lambda: encoder.encode_pixels(pixels))
        captions = rate(lambda: encoder.model.encode_text(ids, mask).to("cpu"))
    return images, captions


def text_queries(count: int, dim: int, global_dim: int, levels: int) -> TextFeatures:
    """``count`` random caption queries of paper width, lengths in :data:`CAPTION_RANGE`."""
    rng = np.random.default_rng(SEED + 1)
    lengths = rng.integers(CAPTION_RANGE[0], CAPTION_RANGE[1] + 1, count)  # (Q,)
    longest = int(lengths.max())
    words = []
    for _ in range(levels):
        w = _unit(rng.standard_normal((count, longest, dim), dtype=np.float32))  # (Q, L, d)
        w[np.arange(longest)[None, :] >= lengths[:, None]] = 0
        words.append(torch.from_numpy(w))
    glob = torch.from_numpy(_unit(rng.standard_normal((count, global_dim), dtype=np.float32)))
    return TextFeatures(words, torch.from_numpy(lengths), glob)


def _peak_gib() -> float:
    """The process's peak resident memory so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _percentiles(values: list[float]) -> str:
    p50, p95 = np.percentile(values, [50, 95])
    return f"{p50 * 1e3:,.0f} / {p95 * 1e3:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--galleries", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--codec", default=IndexConfig().token_codecs[0], choices=CODECS)
    parser.add_argument("--encode-batch", type=int, default=8)
    parser.add_argument("--encode-batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/paper_scale")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = get_preset("paper").model
    index_cfg = IndexConfig()
    encoder = Encoder(HAT(cfg, pretrained=False), device)
    probe = encoder.encode_pixels(torch.zeros(1, 3, cfg.image.image_size, cfg.image.image_size))
    tokens = tuple(t.shape[1] for t in probe.levels)
    dim, global_dim = probe.levels[0].shape[2], probe.global_embedding.shape[1]
    print(f"paper_scale {date.today()}, {platform.machine()} {platform.processor() or ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"tokens {tokens} x {dim}, global {global_dim}")  # fmt: skip

    images_s, captions_s = encoding_rates(
        encoder, args.encode_batch, args.encode_batches, cfg.image.image_size
    )
    print(f"\n1. encoding (random weights, batch {args.encode_batch}): {images_s:.2f} images/s, "
          f"{captions_s:.1f} captions/s ({CAPTION_TOKENS} tokens); peak memory so far "
          f"{_peak_gib():.2f} GiB")  # fmt: skip

    print("\n2. bytes per image (token codes per level + float32 global embedding):\n")
    print("| codec | " + " | ".join(f"level {k + 1} ({t})" for k, t in enumerate(tokens))
          + " | global | total | x float16 |")  # fmt: skip
    print("|---|" + "---:|" * (len(tokens) + 3))
    dims_per_byte = index_cfg.codec_dims_per_byte
    float16_total = None
    for name in CODECS:
        per_level = [t * codec_bytes_per_token(name, dim, dims_per_byte) for t in tokens]
        total = sum(per_level) + global_dim * FLOAT32_BYTES
        float16_total = float16_total or total
        cells = [f"{b:,}" for b in per_level] + [f"{global_dim * FLOAT32_BYTES:,}", f"{total:,}"]
        print(f"| {name} | " + " | ".join(cells) + f" | {total / float16_total:.3f} |")

    codec = TokenCodec(args.codec, dim, dims_per_byte)
    train_seconds = 0.0
    if codec.name != "float16":
        rng = np.random.default_rng(SEED)
        start = time.perf_counter()
        codec.train(_unit(rng.standard_normal((1, PQ_MIN_TRAIN, dim), dtype=np.float32)))
        train_seconds = time.perf_counter() - start
    scorer = Scorer(cfg, device)
    searcher = Searcher(scorer, index_cfg.shortlist)
    queries = text_queries(args.queries, dim, global_dim, len(tokens))
    out = Path(args.out)
    print(f"\n3. two-stage text queries, codec {args.codec} (trained on {PQ_MIN_TRAIN:,} tokens "
          f"in {train_seconds:.1f} s), shortlist {index_cfg.shortlist}, one query at a time, "
          f"{args.queries} queries; ms p50 / p95:\n")  # fmt: skip
    print("| images | codes on disk | faiss build s | query | shortlist | decode | rerank "
          "| peak memory so far GiB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.galleries:
        folder = out / f"gallery-{size}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        need = size * sum(tokens) * codec.code_size
        free = shutil.disk_usage(folder).free
        if need + DISK_MARGIN > free:
            print(f"| {size:,} | {need / 1e9:.1f} GB | skipped: {free / 1e9:.1f} GB free |")
            continue
        gallery = CodedGallery(folder, size, tokens, codec, global_dim, index_cfg)
        searcher.search(queries[:1], gallery, K)  # warm-up
        parts: dict[str, list[float]] = {"query": [], "shortlist": [], "decode": []}
        for q in range(len(queries)):
            gallery.seconds = {"shortlist": 0.0, "decode": 0.0}
            start = time.perf_counter()
            searcher.search(queries[q : q + 1], gallery, K)
            parts["query"].append(time.perf_counter() - start)
            for name, seconds in gallery.seconds.items():
                parts[name].append(seconds)
        rerank = [q - s - d for q, s, d in zip(parts["query"], parts["shortlist"], parts["decode"])]
        cells = [_percentiles(parts[n]) for n in ("query", "shortlist", "decode")]
        print(f"| {size:,} | {need / 1e9:.1f} GB | {gallery.build_seconds:.1f} | "
              + " | ".join(cells) + f" | {_percentiles(rerank)} | {_peak_gib():.2f} |",
              flush=True)  # fmt: skip
        del gallery
        shutil.rmtree(folder, ignore_errors=True)

    images = ImageFeatures(
        [torch.from_numpy(_unit(np.random.default_rng(SEED).standard_normal(
            (EXHAUSTIVE_IMAGES, t, dim), dtype=np.float32))) for t in tokens],
        torch.zeros(EXHAUSTIVE_IMAGES, 1),
    )  # fmt: skip
    captions = text_queries(EXHAUSTIVE_CAPTIONS, dim, global_dim, len(tokens))
    scorer.all_pairs(images[:2], captions[:2])  # warm-up
    start = time.perf_counter()
    scorer.all_pairs(images, captions)
    seconds = time.perf_counter() - start
    per_query_1k = seconds / EXHAUSTIVE_CAPTIONS * 1000 / EXHAUSTIVE_IMAGES
    print(f"\n4. exhaustive: {EXHAUSTIVE_IMAGES} images x {EXHAUSTIVE_CAPTIONS} captions in "
          f"{seconds:.2f} s: {per_query_1k:.2f} s per text query per 1,000 images")  # fmt: skip
    print(f"\n5. peak resident memory: {_peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
