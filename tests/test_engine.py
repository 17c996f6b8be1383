"""The retrieval engine (Encoder, Scorer, Searcher, galleries) against pinned values.

``data/engine_regression.json`` holds what the code before the engine (commit
e01737e: its own encode loops, ``score_all``, ``two_stage_similarity`` and
``Index._search``) gave on this exact setup: the tiny preset seeded 0, the scenes
of seed 1. Evaluation metrics must be equal; search results must name the same
files in the same order with the same scores to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import data_args

from hat import align
from hat.checkpoint import save_model
from hat.config import RetrievalConfig, apply_overrides, get_preset
from hat.data import generate_scenes, load_records, select_split
from hat.encoder import Encoder
from hat.evaluate import evaluate
from hat.features import ImageFeatures, TextFeatures
from hat.index import Index
from hat.model import HAT
from hat.scorer import Scorer
from hat.search import FeatureGallery, Searcher

PINNED = json.loads((Path(__file__).parent / "data" / "engine_regression.json").read_text())
QUERIES = ("a red circle to the left of a blue square", "a green star")
# Scores are float32 sums over levels: the old and new paths may block them differently.
SCORE_TOL = 1e-5
CAPTIONED_IMAGES, CAPTIONS_EACH = 4, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("engine")
    annotations = generate_scenes(
        root / "scenes", n_train=24, n_val=8, n_test=8, image_size=64, seed=1
    )
    cfg = apply_overrides(get_preset("tiny"), data_args(annotations))
    torch.manual_seed(0)
    model = HAT(cfg.model).eval()
    model.global_trained.fill_(True)
    save_model(model, root / "model")
    records = load_records(cfg.data)
    return {"root": root, "model": model, "records": records}


def test_evaluation_metrics_equal_the_pinned_ones(setup) -> None:
    test = select_split(setup["records"], "test")
    retrieval = RetrievalConfig(shortlist_k=3, storage_dtype="float32")
    report = evaluate(Encoder(setup["model"]), test, retrieval=retrieval, progress=False)
    assert report.metrics.keys() == PINNED["metrics"].keys()
    for name, table in PINNED["metrics"].items():
        assert report.metrics[name] == pytest.approx(table), name


def _names(hits) -> list[str]:
    return [Path(h.path).name for h in hits]


def test_index_search_equals_the_pinned_results(setup) -> None:
    root = setup["root"]
    train, test = (select_split(setup["records"], s) for s in ("train", "test"))
    Index.create(root / "index", root / "model").close()
    with Index.open(root / "index", writable=True) as index:
        index.add_images(*[r.path for r in train], progress=False)
        for query in QUERIES:
            for exhaustive in (False, True):
                hits = index.search_text(query, k=5, exhaustive=exhaustive)
                pinned = PINNED["search"][f"{query}|{exhaustive}"]
                assert _names(hits) == [name for name, _, _ in pinned]
                for hit, (_, score, levels) in zip(hits, pinned):
                    assert hit.score == pytest.approx(score, abs=SCORE_TOL)
                    assert list(hit.level_scores) == pytest.approx(levels, abs=SCORE_TOL)
        images = index.search_image(test[0].path, k=5)  # no captions: pooled tokens
        assert _names(images) == [name for name, _ in PINNED["search"]["image"]]
        captions = root / "captions.jsonl"
        with open(captions, "w") as f:
            for r in test[:CAPTIONED_IMAGES]:
                for c in r.captions[:CAPTIONS_EACH]:
                    f.write(json.dumps({"caption": c, "image": str(r.path)}) + "\n")
        index.add_captions(captions, progress=False)
        for key, exhaustive in (("image_captions", False), ("image_captions_ex", True)):
            hits = index.search_image(test[0].path, k=5, exhaustive=exhaustive)
            assert [(h.text, pytest.approx(h.score, abs=SCORE_TOL)) for h in hits] == [
                tuple(pair) for pair in PINNED["search"][key]
            ]


def _random_features(n: int, m: int) -> tuple[ImageFeatures, TextFeatures]:
    cfg = get_preset("tiny").model
    regions, words = (16, 4, 1), 9
    images = ImageFeatures(
        [torch.randn(n, r, cfg.embed_dim) for r in regions],
        torch.nn.functional.normalize(torch.randn(n, cfg.global_dim), dim=-1),
    )
    captions = TextFeatures(
        [torch.randn(m, words, cfg.embed_dim) for _ in regions],
        torch.randint(2, words + 1, (m,)),
        torch.nn.functional.normalize(torch.randn(m, cfg.global_dim), dim=-1),
    )
    return images, captions


@pytest.mark.parametrize("budget", [1, 2**16, 2**26])
def test_searcher_keeps_each_querys_exact_top_k_within_any_budget(budget) -> None:
    """Exhaustive search through the Searcher is the top-k of the all-pairs scores,
    whatever the memory budget makes of its blocks; two-stage is the top-k among the
    global shortlist."""
    torch.manual_seed(0)
    images, captions = _random_features(30, 11)
    scorer = Scorer(get_preset("tiny").model, compute_dtype="float32", block_bytes=budget)
    exact = scorer.all_pairs(images, captions).total  # (30, 11)
    ranked = Searcher(scorer, shortlist=1).search(
        captions, FeatureGallery(images), k=4, exhaustive=True
    )
    top = exact.T.topk(4, dim=1)  # (11, 4)
    assert torch.equal(ranked.positions, top.indices)
    torch.testing.assert_close(ranked.total, top.values, rtol=0, atol=SCORE_TOL)
    shortlist = 7
    two = Searcher(scorer, shortlist).search(captions, FeatureGallery(images), k=4)
    cosine = captions.global_embedding @ images.global_embedding.T  # (11, 30)
    candidates = cosine.topk(shortlist, dim=1).indices  # (11, 7)
    best = exact.T.gather(1, candidates).topk(4, dim=1)  # (11, 4)
    assert torch.equal(two.positions, candidates.gather(1, best.indices))
    torch.testing.assert_close(two.total, best.values, rtol=0, atol=SCORE_TOL)
    assert two.scored == 11 * shortlist


def test_training_scores_in_the_tiles_of_the_features_device(monkeypatch) -> None:
    """A scorer without a ``block_bytes`` of its own leaves the tile budget to
    :mod:`hat.align`, which reads it from the device the tokens are on (a training
    scorer, built without a device, once scored CUDA features in the CPU's cache-sized
    tiles); an explicit ``block_bytes`` is passed on, on any device."""
    seen = []

    def record(images, captions, lengths, *args, block_bytes=None):
        seen.append(block_bytes)
        return torch.zeros(images.shape[0], captions.shape[0], device=images.device)

    monkeypatch.setattr(align, "similarity", record)
    cfg = get_preset("tiny").model
    for device in ("meta", "cpu"):
        images = torch.empty(2, 4, 8, device=device)
        captions, lengths = torch.empty(3, 5, 8, device=device), torch.full((3,), 5)
        Scorer.for_training(cfg).level(images, captions, lengths)
        Scorer(cfg, block_bytes=123, cast=False).level(images, captions, lengths)
    assert seen == [None, 123, None, 123]
    assert align.block_budget(torch.device("meta")) == align.ACCELERATOR_BLOCK_BYTES
