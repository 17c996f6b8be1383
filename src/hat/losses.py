"""Training losses: VSE++ hardest-negative triplet loss (spec section 3) and InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TripletLoss", "info_nce_loss", "triplet_loss"]


def triplet_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = True) -> Tensor:
    """VSE++ hinge on a ``(B, B)`` score matrix, images in rows, positives on the diagonal.

    For each image the negative captions of its row, for each caption the negative
    images of its column: ``max(0, margin + S_neg - S_pos)``. With ``max_violation``
    only the hardest negative of each query counts. The result is the SUM over all
    queries, as in the reference. Pairs that share an image are still negatives.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"expected a square (B, B) score matrix, got {tuple(scores.shape)}")
    positive = scores.diagonal()  # (B,)
    cost_caption = (margin + scores - positive[:, None]).clamp_min(0)  # (B, B) image queries
    cost_image = (margin + scores - positive[None, :]).clamp_min(0)  # (B, B) caption queries
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = cost_caption.masked_fill(eye, 0)
    cost_image = cost_image.masked_fill(eye, 0)
    if max_violation:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


class TripletLoss(nn.Module):
    """Module form of :func:`triplet_loss`."""

    def __init__(self, margin: float = 0.2, max_violation: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, scores: Tensor) -> Tensor:
        return triplet_loss(scores, self.margin, self.max_violation)


def info_nce_loss(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE on ``(B, B)`` image-caption logits, positives on the diagonal:
    the mean of the image->caption and caption->image cross-entropies."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
