"""Two-stage retrieval: shortlist by global embedding (faiss), rerank exactly with HAT.

Shape legend: ``N`` images, ``M`` captions, ``Q`` queries, ``G`` gallery items,
``k`` shortlist size, ``g`` global width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from hat._optional import needs_extra
from hat.align import DEFAULT_BLOCK_BYTES, scoring_dtype
from hat.config import IndexConfig, ModelConfig, RetrievalConfig

if TYPE_CHECKING:
    import faiss

    from hat.model import ImageFeatures, TextFeatures

__all__ = [
    "TwoStageScores",
    "global_index",
    "rerank",
    "shortlist",
    "two_stage_similarity",
]

FLOAT32_BYTES = 4
# Tensors of a pair's size alive at once while scoring it (products, weights, Gram).
LIVE_TEMPORARIES = 4


def shortlist(queries: Tensor, gallery: Tensor, k: int) -> Tensor:
    """Indices ``(Q, k)`` of each query's ``k`` gallery items of highest inner product.

    Exact inner-product search with faiss (``IndexFlatIP``) over ``(Q, g)`` queries and
    ``(G, g)`` gallery embeddings; ``k`` is capped at ``G``.
    """
    with needs_extra("index"):
        import faiss

    k = min(k, gallery.shape[0])
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.detach().float().cpu().numpy()))
    _, ids = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
    return torch.from_numpy(ids).long()


def global_index(embeddings: np.ndarray, ids: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """A faiss inner-product index over ``(G, g)`` embeddings with int64 ``ids``.

    Exact (flat) up to ``cfg.exact_max_items`` items; above, an IVF index with
    ``cfg.ivf_lists_per_sqrt * sqrt(G)`` lists trained on the embeddings themselves and
    searching ``cfg.nprobe`` lists per query (approximate, much faster).
    """
    with needs_extra("index"):
        import faiss

    g = embeddings.shape[1]
    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(data) <= cfg.exact_max_items:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(g))
    else:
        lists = min(len(data), max(1, int(cfg.ivf_lists_per_sqrt * np.sqrt(len(data)))))
        index = faiss.index_factory(g, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(data)
        index.nprobe = cfg.nprobe
    index.add_with_ids(data, np.ascontiguousarray(ids, dtype=np.int64))
    return index


@dataclass
class TwoStageScores:
    """Shortlisted-and-reranked scores; pairs outside a shortlist hold ``-inf``.

    Attributes:
        i2t: ``(N, M)`` each image's ``k`` shortlisted captions scored exactly.
        t2i: ``(N, M)`` each caption's ``k`` shortlisted images scored exactly.
        pairs_scored: number of exact (image, caption) scores computed.
    """

    i2t: Tensor
    t2i: Tensor
    pairs_scored: int


def _pairs_per_chunk(images: ImageFeatures, captions: TextFeatures, budget: int) -> int:
    """Pairs whose per-pair temporaries (products, weights and Gram matrices of every
    level, in float32) fit in ``budget`` bytes."""
    length = captions.levels[0].shape[1]
    per_pair = sum(
        (t.shape[1] * length + t.shape[1] ** 2 + length**2) * FLOAT32_BYTES * LIVE_TEMPORARIES
        for t in images.levels
    )
    return max(1, budget // per_pair)


@torch.no_grad()
def rerank(
    model_cfg: ModelConfig,
    images: ImageFeatures,
    captions: TextFeatures,
    candidates: Tensor,
    queries: Literal["image", "caption"],
    device: torch.device,
    retrieval: RetrievalConfig = RetrievalConfig(),
) -> Tensor:
    """HAT's exact summed score of each query with each of its candidates.

    ``queries="image"``: query ``q`` is image ``q`` and ``candidates`` ``(N, k)`` are
    caption indices; ``"caption"``: query ``q`` is caption ``q`` and ``candidates``
    ``(M, k)`` are image indices. Returns ``(Q, k)`` float32 on the CPU. Each query is
    scored against its own candidates as one group (:func:`hat.model.grouped_similarity`),
    in chunks of queries sized from :data:`hat.align.DEFAULT_BLOCK_BYTES`.
    """
    from hat.model import grouped_similarity

    dtype = scoring_dtype(retrieval.compute_dtype, device)
    num_queries, k = candidates.shape
    out = torch.empty(num_queries, k)
    step = max(1, _pairs_per_chunk(images, captions, DEFAULT_BLOCK_BYTES) // max(k, 1))
    for start in range(0, num_queries, step):
        chunk = torch.arange(start, min(start + step, num_queries))  # (Qc,)
        cand = candidates[chunk]  # (Qc, k)
        if queries == "image":
            lengths = captions.lengths[cand]  # (Qc, k)
            words = int(lengths.max())
            imgs = [t[chunk][:, None] for t in images.levels]  # (Qc, 1, R, d) each
            caps = [t[:, :words][cand] for t in captions.levels]  # (Qc, k, L, d) each
        else:
            lengths = captions.lengths[chunk][:, None]  # (Qc, 1)
            words = int(lengths.max())
            imgs = [t[cand] for t in images.levels]  # (Qc, k, R, d) each
            caps = [t[chunk, :words][:, None] for t in captions.levels]  # (Qc, 1, L, d) each
        scores = grouped_similarity(
            [t.to(device, dtype) for t in imgs],
            [t.to(device, dtype) for t in caps],
            lengths.to(device),
            model_cfg,
        ).sum(dim=0)  # (Qc, A, B)
        out[chunk] = scores.reshape(len(chunk), k).float().cpu()
    return out


@torch.no_grad()
def two_stage_similarity(
    model_cfg: ModelConfig,
    images: ImageFeatures,
    captions: TextFeatures,
    k: int,
    device: torch.device,
    retrieval: RetrievalConfig = RetrievalConfig(),
    caption_k: int | None = None,
) -> TwoStageScores:
    """Shortlist candidates per query by global embedding, rerank them with HAT.

    Both directions: each caption against its ``k`` best images (t2i) and each image
    against its ``caption_k`` (default ``k``) best captions (i2t); each query is scored
    against its own shortlist only (:func:`rerank`), never as blocks of all pairs.
    """
    n, m = len(images), len(captions)
    caption_k = k if caption_k is None else caption_k
    i2t = torch.full((n, m), float("-inf"))
    t2i = torch.full((n, m), float("-inf"))
    cap_candidates = shortlist(
        images.global_embedding, captions.global_embedding, caption_k
    )  # (N, caption_k)
    img_candidates = shortlist(captions.global_embedding, images.global_embedding, k)  # (M, k)
    i2t.scatter_(
        1,
        cap_candidates,
        rerank(model_cfg, images, captions, cap_candidates, "image", device, retrieval),
    )
    t2i.T.scatter_(
        1,
        img_candidates,
        rerank(model_cfg, images, captions, img_candidates, "caption", device, retrieval),
    )
    return TwoStageScores(i2t, t2i, cap_candidates.numel() + img_candidates.numel())
