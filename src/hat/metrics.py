"""Retrieval metrics of a similarity matrix (spec section 5).

Shape legend: ``N`` images, ``M = N * cpi`` captions; image ``i``'s captions are
columns ``i * cpi .. i * cpi + cpi - 1``.

Ranks are 0-based and count the scores strictly higher than the positive one
(ties go in the query's favour). i2t: an image's rank is the best rank among its
captions; t2i: a caption's rank is the rank of its image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["RECALL_KS", "fold_metrics", "ranks_i2t", "ranks_t2i", "retrieval_metrics"]

RECALL_KS = (1, 5, 10)
_CHUNK = 1024


def _as_tensor(sims: Tensor | np.ndarray, captions_per_image: int) -> Tensor:
    sims = torch.as_tensor(sims)
    if sims.dim() != 2 or sims.shape[1] != sims.shape[0] * captions_per_image:
        raise ValueError(
            f"expected an (N, N * {captions_per_image}) similarity matrix, got {tuple(sims.shape)}"
        )
    return sims


def ranks_i2t(sims: Tensor | np.ndarray, captions_per_image: int = 5) -> Tensor:
    """``(N,)`` 0-based rank of each image's best-ranked caption among all captions."""
    sims = _as_tensor(sims, captions_per_image)
    n = sims.shape[0]
    out = torch.empty(n, dtype=torch.long)
    for start in range(0, n, _CHUNK):
        rows = sims[start : start + _CHUNK]  # (B, M)
        own = rows.view(rows.shape[0], -1, captions_per_image)  # (B, N, cpi)
        idx = torch.arange(start, start + rows.shape[0])
        best = own[torch.arange(rows.shape[0]), idx].max(dim=1).values  # (B,)
        out[start : start + rows.shape[0]] = (rows > best[:, None]).sum(dim=1)
    return out


def ranks_t2i(sims: Tensor | np.ndarray, captions_per_image: int = 5) -> Tensor:
    """``(M,)`` 0-based rank of each caption's image among all images."""
    sims = _as_tensor(sims, captions_per_image)
    m = sims.shape[1]
    out = torch.empty(m, dtype=torch.long)
    for start in range(0, m, _CHUNK):
        cols = sims[:, start : start + _CHUNK]  # (N, B)
        owner = torch.arange(start, start + cols.shape[1]) // captions_per_image  # (B,)
        positive = cols[owner, torch.arange(cols.shape[1])]  # (B,)
        out[start : start + cols.shape[1]] = (cols > positive[None, :]).sum(dim=0)
    return out


def _summary(ranks: Tensor, prefix: str) -> dict[str, float]:
    ranks = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * float((ranks < k).double().mean()) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks.numpy()))) + 1.0
    out[f"{prefix}_meanr"] = float(ranks.mean()) + 1.0
    return out


def retrieval_metrics(sims: Tensor | np.ndarray, captions_per_image: int = 5) -> dict[str, float]:
    """R@1/5/10, medr and meanr both ways, and rSum, of an ``(N, N * cpi)`` score matrix.

    Keys: ``i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 i2t_medr i2t_meanr t2i_medr
    t2i_meanr rsum``; recalls in percent.
    """
    i2t = _summary(ranks_i2t(sims, captions_per_image), "i2t")
    t2i = _summary(ranks_t2i(sims, captions_per_image), "t2i")
    out = {**i2t, **t2i}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def fold_metrics(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, folds: int = 5
) -> dict[str, float]:
    """MSCOCO "1K": metrics of each of ``folds`` consecutive diagonal blocks, averaged."""
    sims = _as_tensor(sims, captions_per_image)
    n = sims.shape[0]
    if folds < 1 or n % folds:
        raise ValueError(f"{n} images cannot be cut into {folds} equal folds")
    size = n // folds
    per_fold = [
        retrieval_metrics(
            sims[
                f * size : (f + 1) * size,
                f * size * captions_per_image : (f + 1) * size * captions_per_image,
            ],
            captions_per_image,
        )
        for f in range(folds)
    ]
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}
