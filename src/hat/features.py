"""What the towers produce and what scoring gives: per-level tokens and scores.

Shape legend: ``N`` images, ``M`` captions, ``R_k`` regions of level ``k``, ``L``
words (padded), ``d`` joint width, ``g`` global width, ``K`` levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ImageFeatures", "Scores", "TextFeatures"]


@dataclass
class ImageFeatures:
    """Projected image tokens per level.

    Attributes:
        levels: one ``(N, R_k, d)`` tensor per level (every token is valid).
        global_embedding: ``(N, g)`` l2-normalised global embedding for shortlisting.
    """

    levels: list[Tensor]
    global_embedding: Tensor

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    def __getitem__(self, index: slice | Tensor) -> ImageFeatures:
        return ImageFeatures([t[index] for t in self.levels], self.global_embedding[index])

    def to(self, *args, **kwargs) -> ImageFeatures:
        return ImageFeatures(
            [t.to(*args, **kwargs) for t in self.levels], self.global_embedding.to(*args, **kwargs)
        )

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        return ImageFeatures(
            [torch.cat(ts) for ts in zip(*(p.levels for p in parts))],
            torch.cat([p.global_embedding for p in parts]),
        )


@dataclass
class TextFeatures:
    """Projected caption tokens per level and the captions' lengths.

    Attributes:
        levels: one ``(M, L, d)`` tensor per level; positions ``>= lengths`` are padding.
        lengths: ``(M,)`` number of valid tokens, ``[CLS]`` and ``[SEP]`` included.
        global_embedding: ``(M, g)`` l2-normalised global embedding for shortlisting.
    """

    levels: list[Tensor]
    lengths: Tensor
    global_embedding: Tensor

    def __len__(self) -> int:
        return self.lengths.shape[0]

    def __getitem__(self, index: slice | Tensor) -> TextFeatures:
        lengths = self.lengths[index]
        longest = int(lengths.max()) if lengths.numel() else 0
        return TextFeatures(
            [t[index, :longest] for t in self.levels], lengths, self.global_embedding[index]
        )

    def to(self, *args, **kwargs) -> TextFeatures:
        """Move/cast the token and global tensors; lengths stay integer on the CPU side's device."""
        levels = [t.to(*args, **kwargs) for t in self.levels]
        device = levels[0].device
        return TextFeatures(
            levels, self.lengths.to(device), self.global_embedding.to(*args, **kwargs)
        )

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        longest = max(p.levels[0].shape[1] for p in parts)
        levels = [
            torch.cat([nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in ts])
            for ts in zip(*(p.levels for p in parts))
        ]
        return TextFeatures(
            levels,
            torch.cat([p.lengths for p in parts]),
            torch.cat([p.global_embedding for p in parts]),
        )


@dataclass
class Scores:
    """Alignment scores of every image against every caption.

    Attributes:
        levels: ``(K, N, M)`` score of each level.
        total: ``(N, M)`` HAT's score, the plain sum over levels.
    """

    levels: Tensor
    total: Tensor
