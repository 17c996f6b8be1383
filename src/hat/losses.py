"""Training losses: the VSE++ hinge triplet loss (spec section 3), a symmetric InfoNCE,
and the score matrices of a batch spread over several processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hat import distributed
from hat.config import ModelConfig
from hat.model import HAT, ImageFeatures, TextFeatures, similarity

__all__ = ["TripletLoss", "global_batch_scores", "info_nce_loss", "triplet_loss"]


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


def global_batch_scores(
    images: ImageFeatures, captions: TextFeatures, cfg: ModelConfig
) -> tuple[Tensor, Tensor]:
    """HAT and global-embedding scores of the GLOBAL batch: every process's ``B`` pairs,
    ``W * B`` in all, images in rows, captions in columns, positives on the diagonal.

    Each process passes its own batch's features (``B`` equal on every process) and
    gets the same ``(W*B, W*B)`` matrices, in which only the entries that involve its
    own images or captions carry gradients: its rows (its images against every
    caption) and its columns (every other image against its captions). The entries
    between two other processes' pairs are those processes' rows, gathered as
    constants. A loss of these matrices thus gives each process the gradient of the
    global loss with respect to its own features, and the SUM over processes of these
    gradients is the gradient a single process would get on the whole global batch.
    ``DistributedDataParallel`` AVERAGES gradients, so the caller multiplies the loss
    it back-propagates by ``W``. Without a process group this is the plain batch score.

    Memory per process, on top of the local batch: the other processes' features of
    every level (``W*B`` images of ``R_k`` tokens and ``W*B`` captions padded to the
    longest caption, ``d`` wide), the gathered ``(W*B, W*B)`` score table, and the
    alignment of ``B x W*B`` rows plus ``(W-1)*B x B`` columns with their autograd
    temporaries: ``(2W - 1) * B * B`` pairs, ``2W - 1`` times the alignment activations
    of a local ``B x B`` batch (the ``(W*B, W*B)`` table is small next to these).

    Returns:
        ``(W*B, W*B)`` summed level scores and ``(W*B, W*B)`` global-embedding cosines.
    """
    if not distributed.is_distributed():
        return similarity(images, captions, cfg).total, HAT.global_similarity(images, captions)
    world, me, b = distributed.world_size(), distributed.rank(), len(images)
    lo, hi = me * b, (me + 1) * b
    longest = distributed.all_reduce_max(captions.levels[0].shape[1])
    padded = [F.pad(t, (0, 0, 0, longest - t.shape[1])) for t in captions.levels]  # (B, L, d)
    everyone = TextFeatures(
        [distributed.all_gather_with_grad(t) for t in padded],  # (W*B, L, d)
        distributed.all_gather_with_grad(captions.lengths.detach()),  # (W*B,)
        distributed.all_gather_with_grad(captions.global_embedding),  # (W*B, g)
    )
    image_global = distributed.all_gather_with_grad(images.global_embedding)  # (W*B, g)
    remote = torch.cat([torch.arange(lo), torch.arange(hi, world * b)]).to(image_global.device)
    others = ImageFeatures(
        [distributed.all_gather_with_grad(t.detach())[remote] for t in images.levels],
        image_global[remote].detach(),
    )  # every other process's images: ((W-1)*B, R_k, d) per level
    rows = similarity(images, everyone, cfg).total  # (B, W*B)
    cols = similarity(others, captions, cfg).total  # ((W-1)*B, B)
    table = distributed.all_gather_with_grad(rows.detach())  # (W*B, W*B) constants
    scores = table.clone()
    scores[lo:hi] = rows
    scores[:lo, lo:hi] = cols[:lo]
    scores[hi:, lo:hi] = cols[lo:]
    logits = image_global @ everyone.global_embedding.T  # (W*B, W*B)
    return scores, logits
