"""The one place that scores images against captions under a model's alignment settings.

A :class:`Scorer` is built from a :class:`~hat.config.ModelConfig` (alignment kind,
direction, softmax temperature), a device, the compute-dtype rule and ONE memory
budget. Training, evaluation, the index, search and explanations all score through
it; it is the only code that chooses between cross-attention and mean pooling.

Entry points:

- :meth:`Scorer.all_pairs`: every image against every caption (training batches,
  evaluation, exhaustive search), block by block within the budget;
- :meth:`Scorer.rerank`: each query against its own candidates only (two-stage
  search), as groups of the alignment's batched products;
- :meth:`Scorer.attention_maps`: the weights one image and one caption are scored with.

Shape legend: ``N`` images, ``M`` captions, ``Q`` queries, ``k`` candidates per
query, ``R_k`` regions of level ``k``, ``L`` words (padded), ``d`` joint width,
``K`` levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from hat import align
from hat.config import ModelConfig
from hat.features import ImageFeatures, Scores, TextFeatures

__all__ = ["Scorer"]

FLOAT32_BYTES = 4
# Per-pair tensors of a rerank group alive at once: products, weights and Gram terms.
_RERANK_TEMPORARIES = 4


@dataclass(frozen=True)
class Scorer:
    """HAT's scores under ``cfg``'s alignment, computed on ``device``.

    Attributes:
        cfg: the model's config; only its alignment fields are read.
        device: where scores are computed; features are moved there block by block.
        compute_dtype: ``auto`` (bfloat16 on CUDA, float32 elsewhere) or a dtype name;
            tokens are cast to it before the products (normalisations and softmax run
            in float32 or wider).
        block_bytes: the memory budget of the temporaries of one block of pairs.
        cast: cast tokens to ``compute_dtype``; off for training, where the
            features arrive in the dtype autocast and the optimiser expect.
    """

    cfg: ModelConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_dtype: str = "auto"
    block_bytes: int = align.DEFAULT_BLOCK_BYTES
    cast: bool = True

    @classmethod
    def for_training(cls, cfg: ModelConfig) -> Scorer:
        """Scores of a training batch: on the features' own device and dtype,
        differentiable."""
        return cls(cfg, cast=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype tokens are cast to before scoring."""
        return align.scoring_dtype(self.compute_dtype, self.device)

    def _place(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype) if self.cast else t

    # -- one level ------------------------------------------------------------------
    def level(self, images: Tensor, captions: Tensor, lengths: Tensor) -> Tensor:
        """``(N, M)`` scores of one level: images ``(N, R, d)``, captions ``(M, L, d)``
        with ``lengths`` ``(M,)``."""
        if self.cfg.alignment == "mean_pool":
            return align.pooled_similarity(images, captions, lengths)
        return align.similarity(
            images, captions, lengths, self.cfg.direction, self.cfg.lambda_softmax,
            block_bytes=self.block_bytes,
        )  # fmt: skip

    def grouped(
        self, image_levels: list[Tensor], caption_levels: list[Tensor], lengths: Tensor
    ) -> Tensor:
        """``(K, Q, A, B)`` per-level scores of ``Q`` groups, each of ``A`` images
        (``(Q, A, R_k, d)`` per level) against its own ``B`` captions (``(Q, B, L, d)``
        per level, ``lengths`` ``(Q, B)``): the entries :meth:`all_pairs` gives for those
        pairs, without the pairs across groups."""

        def level_score(img: Tensor, cap: Tensor) -> Tensor:
            if self.cfg.alignment == "mean_pool":
                q, a, r, d = img.shape
                _, b, length, _ = cap.shape
                image_mean, caption_mean = align.pooled_embeddings(
                    img.reshape(q * a, r, d), cap.reshape(q * b, length, d), lengths.reshape(-1)
                )  # (Q*A, d), (Q*B, d)
                return image_mean.view(q, a, d) @ caption_mean.view(q, b, d).transpose(1, 2)
            return align.grouped_similarity(
                img, cap, lengths, self.cfg.direction, self.cfg.lambda_softmax
            )  # (Q, A, B)

        return torch.stack([level_score(i, c) for i, c in zip(image_levels, caption_levels)])

    # -- all pairs --------------------------------------------------------------------
    def all_pairs(
        self, images: ImageFeatures, captions: TextFeatures, out: torch.device | None = None
    ) -> Scores:
        """Every image against every caption: per-level ``(K, N, M)`` and summed ``(N, M)``.

        Captions go to :attr:`device` once, images a block at a time (as many as the
        budget holds), each cast to the compute dtype there. Results land on ``out``
        (default: :attr:`device`). Differentiable when :attr:`cast` is off.
        """
        caps = [self._place(t) for t in captions.levels]  # (M, L, d) each
        lengths = captions.lengths.to(caps[0].device)  # (M,)
        step = self.images_per_block(images)
        parts = []
        for start in range(0, len(images), step):
            block = [self._place(t[start : start + step]) for t in images.levels]  # (n, R_k, d)
            levels = torch.stack(
                [self.level(img, cap, lengths) for img, cap in zip(block, caps)]
            )  # (K, n, M)
            parts.append(levels if out is None else levels.to(out))
        if not parts:
            empty = torch.empty(len(self.cfg.levels), 0, len(captions), device=out or self.device)
            return Scores(levels=empty, total=empty.sum(dim=0))
        levels = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (K, N, M)
        return Scores(levels=levels, total=levels.sum(dim=0))

    def images_per_block(self, images: ImageFeatures) -> int:
        """Images whose tokens, in the compute dtype, fit in the budget (at least one).
        Without casting (training) the batch is scored whole: it is already in memory."""
        if not self.cast:
            return max(1, len(images))
        itemsize = torch.finfo(self.dtype).bits // 8
        per_image = sum(t.shape[1] * t.shape[2] for t in images.levels) * itemsize
        return max(1, self.block_bytes // max(per_image, 1))

    # -- rerank -----------------------------------------------------------------------
    @torch.no_grad()
    def rerank(
        self,
        images: ImageFeatures,
        captions: TextFeatures,
        candidates: Tensor,
        queries: Literal["image", "caption"],
    ) -> Tensor:
        """Per-level scores ``(K, Q, k)`` (float32, on the CPU) of each query with each
        of its own candidates.

        ``queries="image"``: query ``q`` is image ``q`` of ``images`` and ``candidates``
        ``(Q, k)`` index ``captions``; ``"caption"``: query ``q`` is caption ``q`` and
        ``candidates`` index ``images``. Each query is one group of :meth:`grouped`;
        queries are taken in chunks whose temporaries fit in the budget.
        """
        num_queries, k = candidates.shape
        out = torch.empty(len(self.cfg.levels), num_queries, k)
        pairs = self._pairs_per_chunk(images, captions)
        rows, cols = max(1, pairs // max(k, 1)), min(max(k, 1), pairs)  # queries, candidates
        for start in range(0, num_queries, rows):
            chunk = torch.arange(start, min(start + rows, num_queries))  # (Qc,)
            for first in range(0, k, cols):
                cand = candidates[chunk, first : first + cols]  # (Qc, kc)
                out[:, chunk, first : first + cols] = self._rerank_block(
                    images, captions, chunk, cand, queries
                )
        return out

    def _rerank_block(
        self,
        images: ImageFeatures,
        captions: TextFeatures,
        chunk: Tensor,
        cand: Tensor,
        queries: Literal["image", "caption"],
    ) -> Tensor:
        """``(K, Qc, kc)`` scores of queries ``chunk`` with their candidates ``cand``."""
        if queries == "image":
            lengths = captions.lengths[cand]  # (Qc, kc)
            words = int(lengths.max())
            imgs = [t[chunk][:, None] for t in images.levels]  # (Qc, 1, R, d) each
            caps = [t[:, :words][cand] for t in captions.levels]  # (Qc, kc, L, d) each
        else:
            lengths = captions.lengths[chunk][:, None]  # (Qc, 1)
            words = int(lengths.max())
            imgs = [t[cand] for t in images.levels]  # (Qc, kc, R, d) each
            caps = [t[chunk, :words][:, None] for t in captions.levels]  # (Qc, 1, L, d) each
        scores = self.grouped(
            [self._place(t) for t in imgs], [self._place(t) for t in caps], lengths.to(self.device)
        )  # (K, Qc, A, B)
        return scores.reshape(len(self.cfg.levels), *cand.shape).float().cpu()

    def _pairs_per_chunk(self, images: ImageFeatures, captions: TextFeatures) -> int:
        """Pairs whose per-pair temporaries (products, weights and Gram matrices of every
        level, in float32) fit in the budget."""
        length = captions.levels[0].shape[1]
        per_pair = sum(
            (t.shape[1] * length + t.shape[1] ** 2 + length**2)
            * FLOAT32_BYTES
            * _RERANK_TEMPORARIES
            for t in images.levels
        )
        return max(1, self.block_bytes // per_pair)

    # -- images against images --------------------------------------------------------
    @staticmethod
    def pooled_images(query: ImageFeatures, images: ImageFeatures) -> Tensor:
        """``(K, n)`` per-level cosine of ONE query image's and each image's mean-pooled
        tokens: HAT has no image-image score, so image queries on an index without
        captions rank images by this."""
        every_token = torch.full((len(images),), images.levels[0].shape[1])  # (n,)
        return torch.stack(
            [
                align.pooled_similarity(q, g, every_token)[0]  # (n,)
                for q, g in zip(query.levels, images.levels)
            ]
        )  # (K, n)

    # -- explanations -----------------------------------------------------------------
    def attention_maps(self, regions: Tensor, words: Tensor) -> Tensor:
        """``(L, R)`` weights one image's regions ``(R, d)`` and one caption's valid
        words ``(L, d)`` are scored with at one level (uniform under mean pooling);
        see :func:`hat.align.attention_maps`."""
        if self.cfg.alignment == "mean_pool":
            return torch.full((words.shape[0], regions.shape[0]), 1.0 / regions.shape[0])
        return align.attention_maps(regions, words, self.cfg.direction, self.cfg.lambda_softmax)
