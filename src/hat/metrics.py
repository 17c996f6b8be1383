"""Retrieval metrics of a similarity matrix (spec section 5).

Shape legend: ``N`` images, ``M = N * cpi`` captions; image ``i``'s captions are
columns ``i * cpi .. i * cpi + cpi - 1``.

Ranks are 0-based. Tie rule: a rank is the number of NON-MATCHING candidates that
score AT LEAST as high as the positive, so a tie counts against the query and a
constant scorer ranks every positive last (recall at chance or below, never 100).
A NaN never counts as a win: a NaN candidate counts as above the positive, and a NaN
positive ranks below every candidate. On continuous scores (no ties) this is the
usual "number of strictly higher scores". i2t: an image's rank is that of its
highest-scored caption against the captions of the other images; t2i: a caption's
rank is that of its image against the other images in the caption's column.
:func:`retrieval_metrics` also counts the queries whose positive tied with a
candidate (``i2t_tied``, ``t2i_tied``): fp16 storage and duplicate captions make
ties real, and the count says how much the rule above mattered.

All counting is vectorised and runs over blocks of ``chunk`` rows / columns, so a
5,000 x 25,000 matrix never needs more than one ``(chunk, M)`` boolean at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RECALL_KS",
    "TIE_KEYS",
    "chance_metrics",
    "fold_metrics",
    "ranks_i2t",
    "ranks_t2i",
    "retrieval_metrics",
]

RECALL_KS = (1, 5, 10)
# Counts of queries whose positive tied with a candidate; summed, not averaged, over folds.
TIE_KEYS = ("i2t_tied", "t2i_tied")
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


def _ranks_i2t(sims: Tensor, cpi: int, chunk: int) -> tuple[Tensor, Tensor]:
    """``(N,)`` ranks and ``(N,)`` tie flags of each image's best caption."""
    n, m = sims.shape
    ranks = torch.empty(n, dtype=torch.long)
    tied = torch.empty(n, dtype=torch.bool)
    owner = torch.arange(m, device=sims.device) // cpi  # (M,) image of each caption
    for start in range(0, n, chunk):
        rows = sims[start : start + chunk]  # (B, M)
        b = rows.shape[0]
        local = torch.arange(b, device=sims.device)  # (B,)
        own = rows.reshape(b, n, cpi)[local, local + start]  # (B, cpi)
        best = own.nan_to_num(nan=-torch.inf).max(dim=1).values  # (B,) NaN never wins
        negative = owner[None, :] != (local + start)[:, None]  # (B, M)
        above = (rows >= best[:, None]) | rows.isnan()  # (B, M)
        ranks[start : start + b] = (above & negative).sum(dim=1).cpu()
        tied[start : start + b] = ((rows == best[:, None]) & negative).any(dim=1).cpu()
    return ranks, tied


def _ranks_t2i(sims: Tensor, cpi: int, chunk: int) -> tuple[Tensor, Tensor]:
    """``(M,)`` ranks and ``(M,)`` tie flags of each caption's image."""
    n, m = sims.shape
    ranks = torch.empty(m, dtype=torch.long)
    tied = torch.empty(m, dtype=torch.bool)
    images = torch.arange(n, device=sims.device)  # (N,)
    for start in range(0, m, chunk):
        cols = sims[:, start : start + chunk]  # (N, B)
        b = cols.shape[1]
        local = torch.arange(b, device=sims.device)  # (B,)
        mine = (local + start) // cpi  # (B,) each caption's image
        positive = cols[mine, local].nan_to_num(nan=-torch.inf)  # (B,) NaN never wins
        negative = images[:, None] != mine[None, :]  # (N, B)
        above = (cols >= positive[None, :]) | cols.isnan()  # (N, B)
        ranks[start : start + b] = (above & negative).sum(dim=0).cpu()
        tied[start : start + b] = ((cols == positive[None, :]) & negative).any(dim=0).cpu()
    return ranks, tied


def ranks_i2t(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, *, chunk: int = _CHUNK
) -> Tensor:
    """0-based rank of each image's best caption: how many captions of OTHER images score
    at least as high (ties and NaN count against the image; see the module docstring).

    Args:
        sims: ``(N, M)`` scores, images in rows.
        captions_per_image: ``cpi``; ``M`` must equal ``N * cpi``.
        chunk: rows processed at once.

    Returns:
        ``(N,)`` int64 ranks on the CPU.
    """
    return _ranks_i2t(_as_scores(sims, captions_per_image), captions_per_image, chunk)[0]


def ranks_t2i(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, *, chunk: int = _CHUNK
) -> Tensor:
    """0-based rank of each caption's image: how many OTHER images score at least as
    high in the caption's column (ties and NaN count against the caption).

    Args:
        sims: ``(N, M)`` scores, captions in columns.
        captions_per_image: ``cpi``; ``M`` must equal ``N * cpi``.
        chunk: columns processed at once.

    Returns:
        ``(M,)`` int64 ranks on the CPU.
    """
    return _ranks_t2i(_as_scores(sims, captions_per_image), captions_per_image, chunk)[0]


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
        t2i_meanr rsum i2t_tied t2i_tied``; recalls in percent, ``rsum`` the sum of
        the six recalls, ``*_tied`` the number of queries whose positive tied exactly
        with a candidate (counted against them).

    Raises:
        ValueError: ``sims`` is not a non-empty ``(N, N * cpi)`` matrix.
    """
    sims = _as_scores(sims, captions_per_image)
    i2t_ranks, i2t_tied = _ranks_i2t(sims, captions_per_image, _CHUNK)
    t2i_ranks, t2i_tied = _ranks_t2i(sims, captions_per_image, _CHUNK)
    i2t, t2i = _summary(i2t_ranks, "i2t"), _summary(t2i_ranks, "t2i")
    out = {
        **{f"i2t_r{k}": i2t[f"i2t_r{k}"] for k in RECALL_KS},
        **{f"t2i_r{k}": t2i[f"t2i_r{k}"] for k in RECALL_KS},
        "i2t_medr": i2t["i2t_medr"],
        "i2t_meanr": i2t["i2t_meanr"],
        "t2i_medr": t2i["t2i_medr"],
        "t2i_meanr": t2i["t2i_meanr"],
    }
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    out["i2t_tied"] = float(i2t_tied.sum())
    out["t2i_tied"] = float(t2i_tied.sum())
    return out


def chance_metrics(num_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected recalls and rSum of a scorer that ranks candidates in random order.

    t2i: a caption's image is at a uniform rank among ``N`` images, so R@K = K / N.
    i2t: an image's rank is the position of the first of its ``cpi`` captions among all
    ``M = N * cpi`` in random order, so R@K = 1 - C(M - K, cpi) / C(M, cpi).
    """
    n, cpi = num_images, captions_per_image
    if n < 1 or cpi < 1:
        raise ValueError(f"need at least one image and caption, got {n} and {cpi}")
    m = n * cpi
    out = {}
    for k in RECALL_KS:
        miss = math.comb(m - k, cpi) / math.comb(m, cpi) if m - k >= cpi else 0.0
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = 100.0 * min(k, n) / n
    out["rsum"] = sum(out.values())
    return out


def fold_metrics(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, folds: int = 5
) -> dict[str, float]:
    """MSCOCO "1K" protocol: :func:`retrieval_metrics` per fold, averaged over folds.

    The ``N`` images are cut into ``folds`` consecutive blocks of ``N / folds`` images;
    fold ``f`` scores its images against its own captions only (the diagonal
    ``(N / folds, N / folds * cpi)`` block of ``sims``). Every key is averaged but the
    tie counts (:data:`TIE_KEYS`), which are summed.

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
    return {
        key: float((np.sum if key in TIE_KEYS else np.mean)([m[key] for m in per_fold]))
        for key in per_fold[0]
    }
