"""Training losses: the VSE++ hinge triplet loss (spec section 3), a symmetric InfoNCE,
and the score matrices of a batch spread over several processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hat import distributed
from hat.config import ModelConfig
from hat.features import ImageFeatures, TextFeatures
from hat.model import HAT
from hat.scorer import Scorer

__all__ = [
    "TripletLoss",
    "global_batch_scores",
    "info_nce_loss",
    "positive_mask",
    "triplet_loss",
]


def positive_mask(scores: Tensor, caption_image: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(B, C)`` scores and each caption's image row ``(C,)`` (``None``: the diagonal of a
    square matrix) -> the ``(B, C)`` mask of positive pairs and the ``(C,)`` rows."""
    if scores.dim() != 2:
        raise ValueError(f"expected a (B, C) score matrix, got {tuple(scores.shape)}")
    b, c = scores.shape
    if caption_image is None:
        if b != c:
            raise ValueError(
                f"a non-square ({b}, {c}) score matrix needs caption_image, the image row "
                "of each caption"
            )
        caption_image = torch.arange(c, device=scores.device)
    if caption_image.shape != (c,):
        raise ValueError(f"caption_image must have shape ({c},), got {tuple(caption_image.shape)}")
    rows = torch.arange(b, device=scores.device)  # (B,)
    return rows[:, None] == caption_image[None, :], caption_image  # (B, C), (C,)


def triplet_loss(
    scores: Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    caption_image: Tensor | None = None,
) -> Tensor:
    """VSE++ hinge loss of a batch score matrix, summed over queries (the reference's form).

    Each positive pair ``(i, c)`` (image ``i``, caption ``c``) is two queries. The image
    as query against each caption ``c'`` that is not one of its own:
    ``max(0, margin + S[i, c'] - S[i, c])``; the caption as query against each other
    image ``i'``: ``max(0, margin + S[i', c] - S[i, c])``. With pairs (``caption_image``
    ``None``: positives on the diagonal) only the diagonal is masked, as in the
    reference: two pairs that share an image are still negatives of each other.

    Args:
        scores: ``(B, C)`` scores, images in rows, captions in columns; any float dtype
            and device.
        margin: hinge margin.
        max_violation: keep only each query's hardest negative (VSE++) instead of
            summing over all negatives.
        caption_image: ``(C,)`` row of each caption's image, for batches that hold
            several captions per image; ``None``: ``B == C`` and caption ``j`` is image
            ``j``'s.

    Returns:
        Scalar loss in ``scores``' dtype: the SUM over all ``2C`` queries, not the mean.
    """
    positives, rows = positive_mask(scores, caption_image)  # (B, C), (C,)
    positive = scores.gather(0, rows[None, :])[0]  # (C,)
    # caption queries: every image that is not the caption's own
    cost_image = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(positives, 0)
    if max_violation:
        # image queries: the image's hardest negative caption, shared by its positives
        negatives = scores.masked_fill(positives, -torch.inf)  # (B, C)
        hardest = negatives.max(dim=1).values[rows]  # (C,)
        cost_caption = (margin + hardest - positive).clamp(min=0)  # (C,)
        return cost_caption.sum() + cost_image.max(dim=0).values.sum()
    own_rows = scores[rows]  # (C, C): each pair's image against every caption
    cost_caption = (margin + own_rows - positive[:, None]).clamp(min=0)  # (C, C)
    cost_caption = cost_caption.masked_fill(positives[rows], 0)
    return cost_caption.sum() + cost_image.sum()


class TripletLoss(nn.Module):
    """Module form of :func:`triplet_loss`: ``(B, C)`` scores -> scalar loss."""

    def __init__(self, margin: float = 0.2, max_violation: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, scores: Tensor, caption_image: Tensor | None = None) -> Tensor:
        """``(B, C)`` scores (and each caption's image row) -> scalar summed hinge loss."""
        return triplet_loss(scores, self.margin, self.max_violation, caption_image)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}"


def info_nce_loss(logits: Tensor, caption_image: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of ``(B, C)`` image-caption logits.

    Caption queries: cross-entropy over the ``B`` images. Image queries: each positive
    pair ``(i, c)`` is a cross-entropy over caption ``c`` and the captions that are not
    image ``i``'s (its other positives are left out of the denominator). With
    ``caption_image`` ``None``, ``B == C`` and the positives are the diagonal (the
    usual symmetric InfoNCE); otherwise it gives each caption's image row ``(C,)``.

    Returns the scalar mean of the two directions, each a mean over the ``C`` pairs.
    """
    positives, rows = positive_mask(logits, caption_image)  # (B, C), (C,)
    caption_queries = F.cross_entropy(logits.T, rows)
    positive = logits.gather(0, rows[None, :])[0]  # (C,)
    others = torch.logsumexp(logits.masked_fill(positives, -torch.inf), dim=1)[rows]  # (C,)
    image_queries = (torch.logaddexp(positive, others) - positive).mean()
    return 0.5 * (image_queries + caption_queries)


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
    scorer = Scorer.for_training(cfg)
    if not distributed.is_distributed():
        return scorer.all_pairs(images, captions).total, HAT.global_similarity(images, captions)
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
    rows = scorer.all_pairs(images, everyone).total  # (B, W*B)
    cols = scorer.all_pairs(others, captions).total  # ((W-1)*B, B)
    table = distributed.all_gather_with_grad(rows.detach())  # (W*B, W*B) constants
    scores = table.clone()
    scores[lo:hi] = rows
    scores[:lo, lo:hi] = cols[:lo]
    scores[hi:, lo:hi] = cols[lo:]
    logits = image_global @ everyone.global_embedding.T  # (W*B, W*B)
    return scores, logits
