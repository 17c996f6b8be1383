"""Retrieval metrics of a similarity matrix (spec section 5).

Shape legend: ``N`` images, ``M = N * cpi`` captions; image ``i``'s captions are
columns ``i * cpi .. i * cpi + cpi - 1``.

Ranks are 0-based. Tie rule: a rank is the number of scores STRICTLY higher than
the positive one, so ties count in the query's favour. i2t: an image's rank is the
rank of its highest-scored caption (the best rank among its captions); t2i: a
caption's rank is the rank of its image in the caption's column.

All counting is vectorised and runs over blocks of ``chunk`` rows / columns, so a
5,000 x 25,000 matrix never needs more than one ``(chunk, M)`` boolean at a time.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["RECALL_KS", "fold_metrics", "ranks_i2t", "ranks_t2i", "retrieval_metrics"]

RECALL_KS = (1, 5, 10)
_CHUNK = 1024


def _as_scores(sims: Tensor | np.ndarray, captions_per_image: int) -> Tensor:
    """``sims`` as a tensor (no copy where possible) after checking its ``(N, N * cpi)`` shape."""
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    sims = torch.as_tensor(sims)
    shape = tuple(sims.shape)
    if sims.dim() != 2 or shape[0] == 0 or shape[1] != shape[0] * captions_per_image:
        raise ValueError(
            f"expected a non-empty (N, N * {captions_per_image}) similarity matrix, got {shape}"
        )
    return sims


def ranks_i2t(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, *, chunk: int = _CHUNK
) -> Tensor:
    """0-based rank of each image's best caption among all ``M`` captions.

    Args:
        sims: ``(N, M)`` scores, images in rows.
        captions_per_image: ``cpi``; ``M`` must equal ``N * cpi``.
        chunk: rows processed at once.

    Returns:
        ``(N,)`` int64 ranks on the CPU.
    """
    sims = _as_scores(sims, captions_per_image)
    n = sims.shape[0]
    out = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk):
        rows = sims[start : start + chunk]  # (B, M)
        b = rows.shape[0]
        local = torch.arange(b, device=sims.device)  # (B,)
        own = rows.reshape(b, n, captions_per_image)[local, local + start]  # (B, cpi)
        best = own.max(dim=1).values  # (B,)
        out[start : start + b] = (rows > best[:, None]).sum(dim=1).cpu()
    return out


def ranks_t2i(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, *, chunk: int = _CHUNK
) -> Tensor:
    """0-based rank of each caption's image among all ``N`` images.

    Args:
        sims: ``(N, M)`` scores, captions in columns.
        captions_per_image: ``cpi``; ``M`` must equal ``N * cpi``.
        chunk: columns processed at once.

    Returns:
        ``(M,)`` int64 ranks on the CPU.
    """
    sims = _as_scores(sims, captions_per_image)
    m = sims.shape[1]
    out = torch.empty(m, dtype=torch.long)
    for start in range(0, m, chunk):
        cols = sims[:, start : start + chunk]  # (N, B)
        b = cols.shape[1]
        local = torch.arange(b, device=sims.device)  # (B,)
        positive = cols[(local + start) // captions_per_image, local]  # (B,)
        out[start : start + b] = (cols > positive[None, :]).sum(dim=0).cpu()
    return out


def _summary(ranks: Tensor, prefix: str) -> dict[str, float]:
    """R@K (percent), medr and meanr of ``(Q,)`` 0-based ranks, keys prefixed ``prefix_``."""
    ranks = ranks.double()  # (Q,)
    out = {f"{prefix}_r{k}": 100.0 * float((ranks < k).double().mean()) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks.numpy()))) + 1.0
    out[f"{prefix}_meanr"] = float(ranks.mean()) + 1.0
    return out


def retrieval_metrics(sims: Tensor | np.ndarray, captions_per_image: int = 5) -> dict[str, float]:
    """R@1/5/10, medr and meanr in both directions, and rSum, of a score matrix.

    Args:
        sims: ``(N, N * cpi)`` scores (tensor on any device, or numpy array), images
            in rows; image ``i``'s captions are columns ``i * cpi .. i * cpi + cpi - 1``.
        captions_per_image: ``cpi``.

    Returns:
        ``i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 i2t_medr i2t_meanr t2i_medr
        t2i_meanr rsum``; recalls in percent, ``rsum`` the sum of the six recalls.

    Raises:
        ValueError: ``sims`` is not a non-empty ``(N, N * cpi)`` matrix.
    """
    sims = _as_scores(sims, captions_per_image)
    i2t = _summary(ranks_i2t(sims, captions_per_image), "i2t")
    t2i = _summary(ranks_t2i(sims, captions_per_image), "t2i")
    out = {
        **{f"i2t_r{k}": i2t[f"i2t_r{k}"] for k in RECALL_KS},
        **{f"t2i_r{k}": t2i[f"t2i_r{k}"] for k in RECALL_KS},
        "i2t_medr": i2t["i2t_medr"],
        "i2t_meanr": i2t["i2t_meanr"],
        "t2i_medr": t2i["t2i_medr"],
        "t2i_meanr": t2i["t2i_meanr"],
    }
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def fold_metrics(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, folds: int = 5
) -> dict[str, float]:
    """MSCOCO "1K" protocol: :func:`retrieval_metrics` per fold, averaged over folds.

    The ``N`` images are cut into ``folds`` consecutive blocks of ``N / folds`` images;
    fold ``f`` scores its images against its own captions only (the diagonal
    ``(N / folds, N / folds * cpi)`` block of ``sims``). Every key is averaged.

    Args:
        sims: ``(N, N * cpi)`` scores.
        captions_per_image: ``cpi``.
        folds: number of folds; must divide ``N``.

    Raises:
        ValueError: bad shape, or ``N`` not divisible by ``folds``.
    """
    sims = _as_scores(sims, captions_per_image)
    n = sims.shape[0]
    if folds < 1 or n % folds:
        raise ValueError(f"{n} images cannot be cut into {folds} equal folds")
    size = n // folds
    width = size * captions_per_image
    per_fold = [
        retrieval_metrics(
            sims[f * size : (f + 1) * size, f * width : (f + 1) * width],  # (N/folds, M/folds)
            captions_per_image,
        )
        for f in range(folds)
    ]
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}
