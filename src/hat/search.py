"""Retrieval: one Searcher over any Gallery, shortlist by global embedding, rerank exactly.

A :class:`Gallery` is what can be searched: items of one kind (images or captions)
with their global embeddings (for the shortlist) and their per-level tokens (for
HAT's exact score), gathered by position. :class:`FeatureGallery` holds encoded
features in memory (evaluation); :class:`hat.index.gallery.SegmentGallery` reads an
index's memory-mapped segments. :class:`Searcher` is the one two-stage search used by
``evaluate``, ``hat search``, :class:`hat.Index` and ``hat serve``: each query's
shortlist (or, exhaustively, every item) is scored with
:meth:`hat.scorer.Scorer.rerank` on the scorer's device, block by block within its
memory budget, and the best ``k`` are kept with their exact scores.

Shape legend: ``Q`` queries, ``G`` gallery items, ``k`` results per query, ``c``
candidates per query, ``K`` levels, ``g`` global width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from hat._optional import needs_extra
from hat.features import ImageFeatures, TextFeatures
from hat.scorer import TOKEN_BLOCK_BYTES, Scorer

if TYPE_CHECKING:
    import faiss

    from hat.config import IndexConfig

__all__ = [
    "FeatureGallery",
    "Gallery",
    "Ranked",
    "Searcher",
    "TwoStageScores",
    "global_index",
    "two_stage_similarity",
]

Kind = Literal["image", "caption"]
# A shortlist slot faiss could not fill (an IVF index with fewer items in its probed lists).
MISSING = -1


class Gallery(Protocol):
    """Items of one ``kind`` that a :class:`Searcher` can rank."""

    kind: Kind
    # Bytes of one item's tokens as :meth:`features` returns them (an upper bound).
    item_bytes: int

    def __len__(self) -> int: ...

    def shortlist(self, queries: Tensor, count: int) -> Tensor:
        """``(Q, c)`` positions of each query's ``c`` items of highest global inner
        product with ``(Q, g)`` ``queries`` (:data:`MISSING` where there are fewer)."""
        ...

    def features(self, positions: Tensor) -> ImageFeatures | TextFeatures:
        """The per-level tokens of the items at ``(n,)`` ``positions``, in that order."""
        ...


def exact_inner_product(embeddings: np.ndarray) -> faiss.Index:
    """An exact faiss inner-product index over ``(G, g)`` embeddings (positions as ids)."""
    with needs_extra("index"):
        import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


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


class FeatureGallery:
    """A gallery of encoded features held in memory (an evaluation split), shortlisted
    exactly (``IndexFlatIP``)."""

    def __init__(self, features: ImageFeatures | TextFeatures) -> None:
        self.kind: Kind = "image" if isinstance(features, ImageFeatures) else "caption"
        self._features = features
        self._faiss: faiss.Index | None = None
        self.item_bytes = sum(t[0].numel() * t.element_size() for t in features.levels)

    def __len__(self) -> int:
        return len(self._features)

    def shortlist(self, queries: Tensor, count: int) -> Tensor:
        if self._faiss is None:
            self._faiss = exact_inner_product(self._features.global_embedding.float().numpy())
        queries = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        _, found = self._faiss.search(queries, min(count, len(self)))
        return torch.from_numpy(found).long()  # (Q, c)

    def features(self, positions: Tensor) -> ImageFeatures | TextFeatures:
        return self._features[positions]


@dataclass
class Ranked:
    """Each query's best gallery items, best first.

    Attributes:
        positions: ``(Q, k)`` gallery positions (:data:`MISSING` past the last item a
            query has).
        levels: ``(K, Q, k)`` per-level exact scores (float32, CPU; ``-inf`` where missing).
        scored: number of (query, item) pairs scored exactly.
    """

    positions: Tensor
    levels: Tensor
    scored: int

    @property
    def total(self) -> Tensor:
        """``(Q, k)`` HAT's summed scores."""
        return self.levels.sum(dim=0)


class Searcher:
    """Two-stage search with one :class:`~hat.scorer.Scorer`: each query's ``shortlist``
    best items by global embedding (at least ``k``), or every item when
    ``exhaustive``, reranked with the exact summed score.

    Text queries rank images and image queries rank captions by HAT's score; image
    queries on a gallery of images rank by :meth:`Scorer.pooled_images` (HAT has no
    image-image score).
    """

    def __init__(self, scorer: Scorer, shortlist: int) -> None:
        self.scorer = scorer
        self.shortlist = shortlist

    def search(
        self,
        queries: ImageFeatures | TextFeatures,
        gallery: Gallery,
        k: int,
        exhaustive: bool = False,
    ) -> Ranked:
        """The ``k`` best items of ``gallery`` for each of the ``Q`` ``queries``."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        num_queries, size = len(queries), len(gallery)
        if exhaustive:
            candidates = torch.arange(size).expand(num_queries, size)  # (Q, G)
        else:
            candidates = gallery.shortlist(
                queries.global_embedding, max(k, self.shortlist)
            )  # (Q, c)
        levels = self._score(queries, gallery, candidates)  # (K, Q, c)
        total = levels.sum(dim=0)  # (Q, c)
        if not torch.isfinite(total[candidates != MISSING]).all():
            # Gallery features are checked finite when gathered: the query is not.
            raise ValueError(
                "the model gave this query a score that is not finite (a damaged model?); "
                "no results"
            )
        total = total.masked_fill(candidates == MISSING, float("-inf"))
        top = total.topk(min(k, candidates.shape[1]), dim=1)  # (Q, k)
        positions = candidates.gather(1, top.indices)  # (Q, k)
        kept = levels.gather(2, top.indices.expand(len(levels), -1, -1))  # (K, Q, k)
        kept = kept.masked_fill(positions == MISSING, float("-inf"))
        return Ranked(positions, kept, int((candidates != MISSING).sum()))

    def _score(
        self, queries: ImageFeatures | TextFeatures, gallery: Gallery, candidates: Tensor
    ) -> Tensor:
        """``(K, Q, c)`` exact scores of each query with its own candidates, a block of
        queries at a time: as many as keep the items their candidates gather (at most
        the whole gallery) within :data:`hat.scorer.TOKEN_BLOCK_BYTES`."""
        num_levels = len(self.scorer.cfg.levels)
        num_queries, width = candidates.shape
        out = torch.empty(num_levels, num_queries, width)
        usable = candidates.clamp_min(0)  # MISSING slots score item 0, then are masked
        if len(gallery) * gallery.item_bytes <= TOKEN_BLOCK_BYTES:
            step = max(1, num_queries)  # the gather is never more than the whole gallery
        else:
            step = max(1, TOKEN_BLOCK_BYTES // max(gallery.item_bytes * width, 1))
        for start in range(0, num_queries, step):
            rows = usable[start : start + step]  # (Q_b, c)
            unique, local = torch.unique(rows, return_inverse=True)  # (u,), (Q_b, c)
            items = gallery.features(unique)
            block = queries[start : start + step]
            out[:, start : start + step] = self._pairs(block, items, gallery.kind, local)
        return out

    def _pairs(
        self,
        queries: ImageFeatures | TextFeatures,
        items: ImageFeatures | TextFeatures,
        kind: Kind,
        local: Tensor,
    ) -> Tensor:
        """``(K, Q, c)`` scores of query ``q`` with items ``local[q]``."""
        if isinstance(queries, TextFeatures):
            if kind != "image":
                raise ValueError("a caption query ranks images, not captions")
            return self.scorer.rerank(items, queries, local, "caption")
        if kind == "caption":
            return self.scorer.rerank(queries, items, local, "image")
        return torch.stack(
            [Scorer.pooled_images(queries[q : q + 1], items[local[q]]) for q in range(len(local))],
            dim=1,
        )  # (K, Q, c)


@dataclass
class TwoStageScores:
    """Shortlisted-and-reranked scores of an evaluation split; pairs outside a
    shortlist hold ``-inf``.

    Attributes:
        i2t: ``(N, M)`` each image's shortlisted captions scored exactly.
        t2i: ``(N, M)`` each caption's shortlisted images scored exactly.
        pairs_scored: number of exact (image, caption) scores computed.
    """

    i2t: Tensor
    t2i: Tensor
    pairs_scored: int


def two_stage_similarity(
    scorer: Scorer,
    images: ImageFeatures,
    captions: TextFeatures,
    k: int,
    caption_k: int | None = None,
) -> TwoStageScores:
    """Both directions of an evaluation split through one :class:`Searcher`: each
    caption against its ``k`` shortlisted images (t2i) and each image against its
    ``caption_k`` (default ``k``) shortlisted captions (i2t)."""
    caption_k = k if caption_k is None else caption_k
    n, m = len(images), len(captions)
    i2t_ranked = Searcher(scorer, caption_k).search(images, FeatureGallery(captions), caption_k)
    t2i_ranked = Searcher(scorer, k).search(captions, FeatureGallery(images), k)
    i2t = torch.full((n, m), float("-inf")).scatter_(1, i2t_ranked.positions, i2t_ranked.total)
    t2i = torch.full((m, n), float("-inf")).scatter_(1, t2i_ranked.positions, t2i_ranked.total)
    return TwoStageScores(i2t, t2i.T, i2t_ranked.scored + t2i_ranked.scored)
