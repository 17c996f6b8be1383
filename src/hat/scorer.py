"""The one place that scores images against captions under a model's alignment settings.

A :class:`Scorer` is built from a :class:`~hat.config.ModelConfig` (alignment kind,
direction, softmax temperature), a device, the compute-dtype rule and ONE memory
budget. Training, evaluation, the index, search and explanations all score through
it; it is the only code that chooses between cross-attention and mean pooling.

Entry points:

- :meth:`Scorer.all_pairs`: every image against every caption (training batches,
  evaluation, exhaustive search), block by block within the budget;
- :meth:`Scorer.rerank`: each query against its own candidates only (two-stage
  search), as listed pairs grouped by image or by caption
  (:func:`hat.align.pair_similarity`);
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

__all__ = ["TOKEN_BLOCK_BYTES", "Scorer"]

# Tokens held at once outside the scoring temporaries: a block of images moved and cast
# to the compute dtype, or of gallery items gathered for a rerank.
TOKEN_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Scorer:
    """HAT's scores under ``cfg``'s alignment, computed on ``device``.

    Attributes:
        cfg: the model's config; only its alignment fields are read.
        device: where scores are computed; features are moved there block by block.
        compute_dtype: ``auto`` (bfloat16 on CUDA, float32 elsewhere) or a dtype name;
            tokens are cast to it before the products (normalisations and softmax run
            in float32 or wider).
        block_bytes: the memory budget of the temporaries of one block of pairs;
            ``None``: :func:`hat.align.block_budget` of the device the scored tokens are
            on (cache-sized on the CPU), which :mod:`hat.align` reads from the tokens:
            a training scorer scores features where they are.
        cast: cast tokens to ``compute_dtype``; off for training, where the
            features arrive in the dtype autocast and the optimiser expect.
    """

    cfg: ModelConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_dtype: str = "auto"
    block_bytes: int | None = None
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
        """Images moved (and cast) to the device at once: as many as
        :data:`TOKEN_BLOCK_BYTES` of their tokens in the compute dtype hold, at least one.
        Without casting (training) the batch is scored whole: it is already in place.
        The temporaries inside a block stay within :attr:`budget` either way."""
        if not self.cast:
            return max(1, len(images))
        itemsize = torch.finfo(self.dtype).bits // 8
        per_image = sum(t.shape[1] * t.shape[2] for t in images.levels) * itemsize
        return max(1, TOKEN_BLOCK_BYTES // max(per_image, 1))

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
        ``candidates`` index ``images``. The ``Q * k`` pairs are scored as listed pairs
        (:func:`hat.align.pair_similarity`: grouped by the side with more tokens per
        item, so only the smaller side is gathered), within the budget; never as blocks
        of all pairs.
        """
        num_queries, k = candidates.shape
        query = torch.arange(num_queries).repeat_interleave(k)  # (Q * k,)
        listed = candidates.reshape(-1)  # (Q * k,)
        image_index, caption_index = (query, listed) if queries == "image" else (listed, query)
        imgs = [self._place(t) for t in images.levels]  # (N, R_k, d) each
        caps = [self._place(t) for t in captions.levels]  # (M, L, d) each
        lengths = captions.lengths.to(caps[0].device)  # (M,)
        scores = torch.stack(
            [
                self._listed(img, cap, lengths, image_index, caption_index)
                for img, cap in zip(imgs, caps)
            ]
        )  # (K, Q * k)
        return scores.float().cpu().reshape(len(imgs), num_queries, k)

    def _listed(
        self,
        images: Tensor,
        captions: Tensor,
        lengths: Tensor,
        image_index: Tensor,
        caption_index: Tensor,
    ) -> Tensor:
        """``(P,)`` scores of the listed (image, caption) pairs at one level."""
        if self.cfg.alignment == "mean_pool":
            image_mean, caption_mean = align.pooled_embeddings(images, captions, lengths)
            return (image_mean[image_index] * caption_mean[caption_index]).sum(dim=-1)
        return align.pair_similarity(
            images, captions, lengths, image_index, caption_index, self.cfg.direction,
            self.cfg.lambda_softmax, block_bytes=self.block_bytes,
        )  # fmt: skip

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
