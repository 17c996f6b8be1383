"""Two-stage retrieval (global-embedding shortlist + exact HAT rerank) against exhaustive
exact scoring, on the demo's test split (run ``make demo`` first).

    .venv/bin/python benchmarks/two_stage.py [--demo runs/demo] [--fractions 0.05 0.1 0.2]
        [--gallery 1000] [--fit-global]

``--fit-global`` first refits the model's global heads on the demo's training split with
the towers frozen (``hat.global_heads.fit_global_heads``), as ``hat fit-global`` does for
a model trained without the InfoNCE term.

Prints, for exhaustive scoring and for each shortlist share of the gallery (k images per
caption query, the same share of the captions per image query), R@1/5/10 both ways, the
number of exact pair scores computed and the wall time of the scoring stage; then the
text queries alone (each caption against its shortlisted images, one Searcher) against
exhaustive scoring.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hat.checkpoint import load_model
from hat.config import DataConfig, GlobalFitConfig
from hat.data import generate_scenes, load_records, select_split
from hat.encoder import Encoder
from hat.evaluate import RECALL_KEYS, two_stage_metrics
from hat.global_heads import fit_global_heads
from hat.metrics import retrieval_metrics
from hat.search import FeatureGallery, Searcher, two_stage_similarity

SCENE_SIZE = 96  # as the demo's scenes
GALLERY_SEED = 12345  # not the demo's seed: scenes the model never saw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", default="runs/demo")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument(
        "--gallery", type=int, default=0,
        help="instead of the demo's test split, a fresh gallery of this many generated scenes",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=GALLERY_SEED, help="seed of that gallery")
    parser.add_argument("--fit-global", action="store_true", help="refit the global heads first")
    args = parser.parse_args()
    demo = Path(args.demo)
    encoder = Encoder(load_model(demo / "model"))
    scorer = encoder.scorer()
    if args.fit_global:
        train_data = DataConfig(
            annotations=str(demo / "data" / "dataset_synth.json"), image_root=str(demo / "data")
        )
        train = select_split(load_records(train_data), "train")
        fit = fit_global_heads(encoder, train, GlobalFitConfig(num_workers=0), progress=False)
        print(f"refitted the global heads: {fit.to_dict()}")
    scenes = demo / "data"
    if args.gallery:
        scenes = Path(tempfile.mkdtemp(prefix="hat-gallery-"))
        generate_scenes(
            scenes, n_train=0, n_val=0, n_test=args.gallery, image_size=SCENE_SIZE, seed=args.seed
        )
    data = DataConfig(annotations=str(scenes / "dataset_synth.json"), image_root=str(scenes))
    test = select_split(load_records(data), "test")
    captions = [c for r in test for c in r.captions[:5]]
    images = encoder.encode_images(test)
    texts = encoder.encode_captions(captions)
    n, m = len(images), len(texts)
    start = time.perf_counter()
    exhaustive = retrieval_metrics(scorer.all_pairs(images, texts).total)
    rows = [("exhaustive", exhaustive, 2 * n * m, time.perf_counter() - start)]
    rows.append(
        (
            "global embedding alone",
            retrieval_metrics(images.global_embedding @ texts.global_embedding.T),
            0,
            0.0,
        )
    )
    text_seconds = {}
    for fraction in args.fractions:
        k, caption_k = (max(1, round(fraction * size)) for size in (n, m))
        start = time.perf_counter()
        two = two_stage_similarity(scorer, images, texts, k, caption_k=caption_k)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        Searcher(scorer, k).search(texts, FeatureGallery(images), k)
        text_seconds[fraction] = time.perf_counter() - start
        rows.append(
            (
                f"k = {k} images / {caption_k} captions ({fraction:.0%})",
                two_stage_metrics(two, 5),
                two.pairs_scored,
                seconds,
            )
        )
    print(f"{n} test images x {m} captions; pairs counted over both directions")
    print("| scoring | " + " | ".join(RECALL_KEYS) + " | exact pairs | seconds |")
    print("|---|" + "---:|" * (len(RECALL_KEYS) + 2))
    for name, metrics, pairs, seconds in rows:
        values = " | ".join(f"{metrics[key]:.1f}" for key in RECALL_KEYS)
        print(f"| {name} | {values} | {pairs:,} | {seconds:.2f} |")
    exhaustive_seconds = rows[0][3]
    print(f"\ntext queries alone ({m} captions; exhaustive scores every pair once for both):")
    for fraction, seconds in text_seconds.items():
        print(
            f"  {fraction:.0%}: {seconds:.2f} s, {exhaustive_seconds / seconds:.1f}x faster "
            f"than exhaustive ({exhaustive_seconds:.2f} s)"
        )


if __name__ == "__main__":
    main()
