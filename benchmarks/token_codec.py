"""Token codecs against float16: bytes, HAT score error, ranking changes and two-stage recall.

    .venv/bin/python benchmarks/token_codec.py [--model runs/demo/model] [--gallery 1000]
        [--images 200] [--captions 100] [--shortlist 20]

For each codec of :mod:`hat.index.codec` (trained as an index trains it, on the
gallery's own tokens), on (a) a trained model's features of ``--gallery`` generated
scenes when ``--model`` names a model folder (skipped, and said so, otherwise) and
(b) synthetic paper-size features (784/196/49 tokens x 768): groups of images that
share most of their tokens, each caption a noisy copy of a few tokens of its image,
so that float16 itself does not find every caption's image. Prints one markdown
table per feature set: bytes per image per level, the summed HAT score's error
against float16 over every (caption, image) pair (mean and max abs), the share of
caption queries whose top-10 images (in order) are float16's, and two-stage
(shortlist by global embedding, exact rerank) R@1/5/10 of caption -> image.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from hat.config import get_preset
from hat.features import ImageFeatures, TextFeatures
from hat.index.codec import CODECS, FLOAT16, TokenCodec, codec_bytes_per_token
from hat.scorer import Scorer
from hat.search import FeatureGallery, Searcher

RECALL_AT = (1, 5, 10)
TOP = 10
PAPER_TOKENS = (784, 196, 49)
PAPER_DIM = 768
SCENE_SIZE = 96  # as the demo's scenes
GALLERY_SEED = 12345  # not the demo's seed: scenes the model never saw
CAPTIONS_PER_IMAGE = 5
SEED = 0
# The synthetic gallery: images in groups that share all but UNIQUE_SHARE of their
# tokens; a caption copies CAPTION_WORDS tokens of its image, DISTINCT_WORDS of them
# among its own, each with Gaussian noise of NOISE (tokens are unit vectors).
GROUP = 8
UNIQUE_SHARE = 0.1
CAPTION_WORDS = 8
DISTINCT_WORDS = 1
NOISE = 0.08
GLOBAL_NOISE = 0.3


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic(images: int, captions: int) -> tuple[ImageFeatures, TextFeatures, np.ndarray]:
    """Paper-size hard features: images, captions and each caption's image."""
    rng = np.random.default_rng(SEED)
    levels, words = [], []
    truth = rng.integers(0, images, captions)  # (M,)
    for t in PAPER_TOKENS:
        base = _unit(rng.standard_normal((images // GROUP + 1, t, PAPER_DIM)))  # (groups, T, d)
        tokens = base[np.arange(images) // GROUP].copy()  # (N, T, d)
        unique = max(1, round(UNIQUE_SHARE * t))
        tokens[:, :unique] = _unit(rng.standard_normal((images, unique, PAPER_DIM)))
        levels.append(tokens.astype(np.float32))
        pick = np.concatenate([rng.integers(0, unique, (captions, DISTINCT_WORDS)),
                               rng.integers(unique, t, (captions, CAPTION_WORDS - DISTINCT_WORDS))],
                              axis=1)  # fmt: skip  # (M, L)
        copied = tokens[truth[:, None], pick]  # (M, L, d)
        words.append(_unit(copied + NOISE * rng.standard_normal(copied.shape)).astype(np.float32))
    glob = _unit(levels[-1].mean(axis=1))  # (N, d)
    query_glob = _unit(
        words[-1].mean(axis=1) + GLOBAL_NOISE * rng.standard_normal(glob[truth].shape)
    )
    image_feats = ImageFeatures([torch.from_numpy(t) for t in levels], torch.from_numpy(glob))
    text_feats = TextFeatures(
        [torch.from_numpy(w) for w in words],
        torch.full((captions,), CAPTION_WORDS),
        torch.from_numpy(query_glob.astype(np.float32)),
    )
    return image_feats, text_feats, truth


def real(model_dir: Path, gallery: int) -> tuple[ImageFeatures, TextFeatures, np.ndarray, Scorer]:
    """A trained model's features of ``gallery`` freshly generated scenes."""
    from hat.checkpoint import load_model
    from hat.config import DataConfig
    from hat.data import generate_scenes, load_records, select_split
    from hat.encoder import Encoder

    encoder = Encoder(load_model(model_dir))
    scenes = Path(tempfile.mkdtemp(prefix="hat-codec-gallery-"))
    generate_scenes(scenes, n_train=0, n_val=0, n_test=gallery, image_size=SCENE_SIZE,
                    seed=GALLERY_SEED)  # fmt: skip
    data = DataConfig(annotations=str(scenes / "dataset_synth.json"), image_root=str(scenes))
    test = select_split(load_records(data), "test")
    captions = [(i, c) for i, r in enumerate(test) for c in r.captions[:CAPTIONS_PER_IMAGE]]
    images = encoder.encode_images(test)
    texts = encoder.encode_captions([c for _, c in captions])
    return images, texts, np.array([i for i, _ in captions]), encoder.scorer()


def coded(images: ImageFeatures, name: str, dims_per_byte: int) -> tuple[ImageFeatures, list[str]]:
    """The gallery as an index stores it under codec ``name``, decoded, and the codec
    each level ends in: a level with fewer tokens than the codec trains on stays
    float16, as an index keeps its segments until one is large enough."""
    levels, used = [], []
    for level in images.levels:
        tokens = level.numpy()  # (N, T, d)
        codec = TokenCodec(name, tokens.shape[-1], dims_per_byte)
        if name == FLOAT16 or not codec.can_train(tokens):
            levels.append(torch.from_numpy(tokens.astype(np.float16).astype(np.float32)))
            used.append(FLOAT16)
            continue
        codec.train(tokens)
        levels.append(torch.from_numpy(codec.decode(codec.encode(tokens))))
        used.append(name)
    return ImageFeatures(levels, images.global_embedding), used


def table(images, texts, truth, scorer: Scorer, shortlist: int, dims_per_byte: int) -> str:
    """The markdown table of every codec on these features."""
    head = [
        "codec",
        *(f"bytes L{k + 1}" for k in range(len(images.levels))),
        "bytes/image",
        "score err mean",
        "score err max",
        "top-10 same",
        *(f"R@{r}" for r in RECALL_AT),
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    reference = None
    for name in CODECS:
        decoded, used = coded(images, name, dims_per_byte)
        with torch.no_grad():
            scores = scorer.all_pairs(decoded, texts).total.T  # (M, N)
        top = scores.topk(TOP, dim=1).indices  # (M, 10)
        if reference is None:
            reference = (scores, top)
        error = (scores - reference[0]).abs()
        same = (top == reference[1]).all(dim=1).float().mean().item()
        ranked = Searcher(scorer, shortlist).search(texts, FeatureGallery(decoded), max(RECALL_AT))
        hit = ranked.positions.numpy() == truth[:, None]  # (M, 10)
        recall = [100 * hit[:, :r].any(axis=1).mean() for r in RECALL_AT]
        sizes = [codec_bytes_per_token(c, lv.shape[-1], dims_per_byte) * lv.shape[1]
                 for c, lv in zip(used, images.levels)]  # fmt: skip
        row = [
            name,
            *map(str, sizes),
            f"{sum(sizes):,}",
            f"{error.mean():.5f}",
            f"{error.max():.5f}",
            f"{100 * same:.1f}%",
            *(f"{r:.1f}" for r in recall),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a trained model folder (runs/demo/model)")
    parser.add_argument("--gallery", type=int, default=1000, help="generated scenes for --model")
    parser.add_argument("--images", type=int, default=200, help="synthetic paper-size images")
    parser.add_argument("--captions", type=int, default=100, help="synthetic captions")
    parser.add_argument("--shortlist", type=int, default=20, help="two-stage shortlist")
    parser.add_argument("--dims-per-byte", type=int, default=4, help="pq's dims per code byte")
    args = parser.parse_args()
    if args.model and Path(args.model).is_dir():
        images, texts, truth, scorer = real(Path(args.model), args.gallery)
        print(f"\n(a) {args.model}: {len(images)} generated scenes x {len(texts)} captions\n")
        print(table(images, texts, truth, scorer, args.shortlist, args.dims_per_byte))
    else:
        where = args.model or "no --model given"
        print(f"\n(a) trained model: skipped ({where}: no model folder; `make demo` makes one)")
    images, texts, truth = synthetic(args.images, args.captions)
    scorer = Scorer(get_preset("paper").model)
    print(f"\n(b) synthetic paper-size features: {args.images} images x {args.captions} captions, "
          f"tokens {PAPER_TOKENS} x {PAPER_DIM}, shortlist {args.shortlist}\n")  # fmt: skip
    print(table(images, texts, truth, scorer, args.shortlist, args.dims_per_byte))


if __name__ == "__main__":
    main()
