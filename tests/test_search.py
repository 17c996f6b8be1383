"""Two-stage scoring: shortlists by global embedding, exact scores for each query's own."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hat.config import get_preset
from hat.features import ImageFeatures, TextFeatures
from hat.scorer import Scorer
from hat.search import two_stage_similarity


def _features(n: int, m: int, cfg) -> tuple[ImageFeatures, TextFeatures]:
    regions, d, g, words = (16, 4, 1), cfg.embed_dim, cfg.global_dim, 9
    images = ImageFeatures(
        [torch.randn(n, r, d) for r in regions], F.normalize(torch.randn(n, g), dim=-1)
    )
    captions = TextFeatures(
        [torch.randn(m, words, d) for _ in regions],
        torch.randint(2, words + 1, (m,)),
        F.normalize(torch.randn(m, g), dim=-1),
    )
    return images, captions


@pytest.mark.parametrize("alignment", ["cross_attention", "mean_pool"])
def test_shortlisted_scores_are_the_exact_scores_of_the_shortlist(alignment) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny").model, alignment=alignment)
    images, captions = _features(7, 20, cfg)
    scorer = Scorer(cfg, compute_dtype="float32")
    two = two_stage_similarity(scorer, images, captions, 3, caption_k=5)
    exact = scorer.all_pairs(images, captions).total  # (7, 20)
    cosine = images.global_embedding @ captions.global_embedding.T  # (7, 20)
    # i2t: each image's 5 captions of highest global cosine, scored exactly; t2i: 3 images.
    i2t_kept = torch.zeros_like(exact, dtype=torch.bool)
    i2t_kept.scatter_(1, cosine.topk(5, dim=1).indices, True)
    t2i_kept = torch.zeros_like(exact, dtype=torch.bool)
    t2i_kept.scatter_(0, cosine.topk(3, dim=0).indices, True)
    assert torch.equal(two.i2t.isfinite(), i2t_kept)
    assert torch.equal(two.t2i.isfinite(), t2i_kept)
    assert torch.allclose(two.i2t[i2t_kept], exact[i2t_kept], atol=1e-5)
    assert torch.allclose(two.t2i[t2i_kept], exact[t2i_kept], atol=1e-5)
    assert two.pairs_scored == 7 * 5 + 20 * 3
