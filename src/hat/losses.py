"""Training losses: the VSE++ hinge triplet loss (spec section 3) and a symmetric InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TripletLoss", "info_nce_loss", "triplet_loss"]


def triplet_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = True) -> Tensor:
    """VSE++ hinge loss of a batch score matrix, summed over queries (the reference's form).

    Image ``i`` as query against negative captions ``j``:
    ``max(0, margin + S[i, j] - S[i, i])``; caption ``j`` as query against negative
    images ``i``: ``max(0, margin + S[i, j] - S[j, j])``. Only the diagonal is masked:
    two pairs that share an image are still negatives of each other.

    Args:
        scores: ``(B, B)`` scores, images in rows, captions in columns, positives on
            the diagonal; any float dtype and device.
        margin: hinge margin.
        max_violation: keep only each query's hardest negative (VSE++) instead of
            summing over all negatives.

    Returns:
        Scalar loss in ``scores``' dtype: the SUM over all ``2B`` queries, not the mean.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"expected a square (B, B) score matrix, got {tuple(scores.shape)}")
    positive = scores.diagonal()  # (B,)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)  # (B, B)
    cost_caption = (margin + scores - positive[:, None]).clamp(min=0)  # (B, B) image queries
    cost_image = (margin + scores - positive[None, :]).clamp(min=0)  # (B, B) caption queries
    cost_caption = cost_caption.masked_fill(eye, 0)
    cost_image = cost_image.masked_fill(eye, 0)
    if max_violation:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


class TripletLoss(nn.Module):
    """Module form of :func:`triplet_loss`: ``(B, B)`` scores -> scalar loss."""

    def __init__(self, margin: float = 0.2, max_violation: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, scores: Tensor) -> Tensor:
        """``(B, B)`` scores, positives on the diagonal -> scalar summed hinge loss."""
        return triplet_loss(scores, self.margin, self.max_violation)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}"


def info_nce_loss(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE of ``(B, B)`` image-caption logits, positives on the diagonal.

    Returns the scalar mean of the image->caption and caption->image cross-entropies.
    """
    targets = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
