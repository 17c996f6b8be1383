"""Parameter-free hierarchical alignment: SCAN-style cross-attention scores.

Shape legend: ``N`` images, ``M`` captions, ``R`` regions (image tokens),
``L`` words (caption tokens, padded), ``d`` joint width.

For one level, :func:`similarity` scores every image of a block against every
caption of a block (spec section 2). Both directions share one formulation in
terms of *queries* (the side that receives an attended context) and *keys*
(the side that is attended over):

- i2t: queries are regions, keys are words;
- t2i: queries are words, keys are regions.

With ``s_qk`` the dot products, ``a = LeakyReLU(s)``, ``a`` is l2-normalised
across queries for each key, softmax over keys of ``lambda * a`` gives
``alpha``, the context is ``c_q = sum_k alpha_qk k_k``, and the score is the mean
over queries of ``cos(q, c_q)``. The context is never materialised:
``q . c_q = sum_k alpha_qk s_qk`` and ``|c_q|^2 = alpha_q G alpha_q^T`` with ``G``
the Gram matrix of the keys, so every product comes from ONE matrix
multiplication of all regions of a block of images with all words of a block
of captions.

Entry points: :func:`similarity` (all pairs of a block of images and captions),
:func:`grouped_similarity` (each group's own images against its own captions: a
shortlist per query) and :func:`pair_similarity` (listed pairs of a gallery, grouped by
image or by caption). All three chunk their work within one memory budget, ``block_bytes``
(default :func:`block_budget`: :data:`DEFAULT_BLOCK_BYTES`, from the CPU's cache, on the
CPU; :func:`pair_bytes` gives the bytes per pair to chunk by).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "ACCELERATOR_BLOCK_BYTES",
    "attention_maps",
    "block_budget",
    "grouped_similarity",
    "pooled_embeddings",
    "EPS",
    "LEAKY_SLOPE",
    "LIVE_TEMPORARIES",
    "mean_words",
    "pair_bytes",
    "pair_similarity",
    "pooled_similarity",
    "scoring_dtype",
    "similarity",
]

EPS = 1e-8
LEAKY_SLOPE = 0.1
# Tile-sized float temporaries alive at once while a tile is scored: the products ``s``,
# the activations, the attention weights and their spread through the key Gram matrix.
LIVE_TEMPORARIES = 4
CACHE_INFO = Path("/sys/devices/system/cpu/cpu0/cache")
# When the cache size cannot be read (not Linux): a typical per-core L2.
FALLBACK_CACHE_BYTES = 2 * 2**20
PER_CORE_CACHE_LEVEL = 2
_SIZE_UNITS = {"K": 2**10, "M": 2**20}
# Output columns below which a batched product is computed transposed (:func:`_products`;
# measured with MKL's fp32 bmm: 11-15 columns ran at 14-27 GFLOP/s, 16 at 54-66).
NARROW_PRODUCT = 16
# Keys per item up to which the Gram spread is summed elementwise (:func:`_spread`;
# measured: 4 keys 0.24 ms elementwise vs 0.70 ms batched for 1,200 items, 8 keys 0.58
# vs 0.16).
FEW_KEYS = 4
# How much more a key item costs to gather per pair than a query item of as many tokens
# (a rerank's per-pair Gram products are tiny batched matrix products). Measured at the
# demo's shapes (d = 128, ~14 words; microseconds per pair, by image / by caption): i2t
# with 16 regions 6.7 / 5.4, t2i with 16 regions 3.6 / 6.5, t2i with 4 regions 2.0 / 1.3.
KEY_GATHER_WEIGHT = 2


def _cache_bytes() -> int:
    """Size of the largest per-core cache: the biggest data or unified cache of level
    :data:`PER_CORE_CACHE_LEVEL` or below of ``cpu0``, read from sysfs (L2 on current x86
    and ARM servers; the last level is shared between cores and left out);
    :data:`FALLBACK_CACHE_BYTES` where that is unavailable."""
    best = 0
    for entry in CACHE_INFO.glob("index*"):
        try:
            level = int((entry / "level").read_text())
            kind = (entry / "type").read_text().strip()
            size = (entry / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = _SIZE_UNITS.get(size[-1:])
        if kind == "Instruction" or level > PER_CORE_CACHE_LEVEL or unit is None:
            continue
        if size[:-1].isdigit():
            best = max(best, int(size[:-1]) * unit)
    return best or FALLBACK_CACHE_BYTES


DEFAULT_BLOCK_BYTES = LIVE_TEMPORARIES * _cache_bytes()
"""The memory budget of one scoring tile, in bytes: each of its
:data:`LIVE_TEMPORARIES` tile-sized temporaries the size of the per-core cache, so that
the elementwise passes over a tile run from cache while its GEMM stays large enough to
be efficient. The one knob for chunking the scorer's work; see :func:`pair_bytes`."""


# Accelerators: the budget is memory, not cache; large tiles amortise kernel launches.
ACCELERATOR_BLOCK_BYTES = 256 * 2**20


def block_budget(device: torch.device) -> int:
    """The default ``block_bytes`` for scoring on ``device``: :data:`DEFAULT_BLOCK_BYTES`
    (cache-sized) on the CPU, :data:`ACCELERATOR_BLOCK_BYTES` elsewhere."""
    return DEFAULT_BLOCK_BYTES if device.type == "cpu" else ACCELERATOR_BLOCK_BYTES


def pair_bytes(regions: int, words: int, dim: int = 0, itemsize: int = 4) -> int:
    """Bytes of scoring temporaries per (image, caption) pair at one level.

    ``regions`` x ``words`` products, activations, weights and spread
    (:data:`LIVE_TEMPORARIES` of them) in ``itemsize``-byte floats. With ``dim``, also
    what a pair scored on its own (:func:`grouped_similarity`) adds: its own copy of the
    image and caption tokens and its attended contexts, ``(regions + words) * dim``
    values. A block of ``N`` images by ``M`` captions needs ``N * M`` times this; callers
    chunk their work so that it stays within :func:`block_budget` (or their own
    ``block_bytes``)."""
    return itemsize * (LIVE_TEMPORARIES * regions * words + (regions + words) * dim)


def scoring_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype tokens are cast to before scoring: ``auto`` is bfloat16 on CUDA and
    float32 elsewhere; any other name is a torch dtype name."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are normalised and soft-maxed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _word_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``(..., L)`` True at a caption's words, False at its padding, from ``(...)`` lengths."""
    return torch.arange(max_len, device=lengths.device) < lengths[..., None]


def _zero_padding(captions: Tensor, word_mask: Tensor) -> Tensor:
    """``(..., L, d)`` caption tokens with every padding position set to 0, whatever it
    held (inf and NaN included: a product with the mask would turn them into NaN)."""
    return torch.where(word_mask[..., None], captions, 0.0)


def _use_gram(key_tokens: int, query_tokens: int, dim: int) -> bool:
    """Whether the context norms are cheaper through the keys' Gram matrix than through
    the contexts themselves, for one key item (``key_tokens`` tokens) attended by
    ``query_tokens`` query tokens in all: ``nk^2 d + nk^2 q`` against ``nk q d`` flops."""
    return key_tokens * (dim + query_tokens) < dim * query_tokens


def _attend(
    keys: Tensor,
    queries: Tensor,
    key_bias: Tensor | None,
    query_mask: Tensor | None,
    query_norm: Tensor,
    key_gram: Tensor | None,
    lambda_softmax: float,
) -> Tensor:
    """Scores of ``G`` tiles, each ``K`` key items against ``Q`` query items.

    Args:
        keys: ``(G, K, nk, d)`` the attended side (words in i2t, regions in t2i), zero
            at padding.
        queries: ``(G, Q, nq, d)`` the attending side, zero at padding.
        key_bias: ``(G, K, nk)`` 0 at valid keys, ``-inf`` at padding; None: all valid.
        query_mask: ``(G, Q, nq)`` True at valid queries; None: all valid.
        query_norm: ``(G, Q, nq)`` the queries' l2 norms.
        key_gram: ``(G, K, nk, nk)`` the keys' Gram matrices; None: the contexts are
            formed explicitly (cheaper when keys outnumber the queries they serve).
        lambda_softmax: inverse temperature of the softmax over keys.

    Returns:
        ``(G, K, Q)`` mean over each item's valid queries of ``cos(q, c_q)``.

    The products are laid out with the longer token axis innermost, keys-major
    ``(G, K, nk, Q, nq)`` or queries-major ``(G, Q, nq, K, nk)``, so that the norms,
    softmax and broadcasts run over long contiguous rows. The softmax is left
    unnormalised: with ``e = exp(logits)`` and ``z`` its sum over keys,
    ``q . c = (e . s) / z`` and ``|c| = sqrt(e G e^T) / z``, so
    ``cos = (e . s) / max(|q| sqrt(e G e^T), eps z)``: the spec's clamp, exactly.
    """
    g, k, nk, d = keys.shape
    _, q, nq, _ = queries.shape
    cdtype = _compute_dtype(keys.dtype)
    keys_major = nq >= nk
    flat_keys, flat_queries = keys.reshape(g, k * nk, d), queries.reshape(g, q * nq, d)
    if keys_major:
        s = _products(flat_keys, flat_queries).to(cdtype).view(g, k, nk, q, nq)
        key_dim, query_dim = 2, 4
        key_shape = (g, k, nk, 1, 1)
    else:
        s = _products(flat_queries, flat_keys).to(cdtype).view(g, q, nq, k, nk)
        key_dim, query_dim = 4, 2
        key_shape = (g, 1, 1, k, nk)
    a = F.leaky_relu(s, LEAKY_SLOPE)  # (G, K, nk, Q, nq) or (G, Q, nq, K, nk)
    # Each key normalised across the queries of each item it meets: |n| <= 1.
    # (a sum of squares: vector_norm reduces slowly across a non-innermost axis; the
    # clamp only keeps sqrt's gradient finite at all-zero (padding) keys).
    norm = torch.linalg.vecdot(a, a, dim=query_dim).clamp_min(torch.finfo(cdtype).tiny).sqrt()
    scale = lambda_softmax / (norm.unsqueeze(query_dim) + EPS)
    # lambda n - lambda lies in [-2 lambda, 0]: exp needs no running max while exp(-2
    # lambda) is a normal float; beyond, the max over keys is subtracted.
    shifted = 2 * lambda_softmax < _EXP_RANGE[cdtype]
    bias = torch.full((), -lambda_softmax if shifted else 0.0, dtype=cdtype, device=s.device)
    if key_bias is not None:
        bias = bias + key_bias.reshape(key_shape)
    if keys_major:  # scale is constant along the inner axis: addcmul broadcasts it slowly
        logits = (a * scale).add_(bias)
    else:
        logits = torch.addcmul(bias, a, scale)
    if not shifted:
        logits = logits - logits.amax(dim=key_dim, keepdim=True)
    e = logits.exp_()  # unnormalised softmax over keys
    z = e.sum(dim=key_dim)  # (G, K, Q, nq) or (G, Q, nq, K)
    numer = torch.linalg.vecdot(e, s, dim=key_dim)  # z q . c
    if keys_major:
        e_keys = e.view(g, k, nk, q * nq)  # (G, K, nk, Q nq)
    else:
        e_keys = e.view(g, q * nq, k, nk).permute(0, 2, 3, 1)  # (G, K, nk, Q nq)
    if key_gram is not None and not keys_major and k == 1 and nk > FEW_KEYS:
        # One key item per tile (a rerank grouped by it): its weights are rows already, so
        # they are spread as rows, e G^T = (G e^T)^T, without the transposed copy.
        e_rows = e.view(g, q * nq, nk)  # (G, Q nq, nk)
        spread = e_rows @ key_gram.reshape(g, nk, nk).transpose(1, 2)  # (G, Q nq, nk)
        ctx_sq = torch.linalg.vecdot(spread, e_rows, dim=2).view(g, 1, q * nq)  # (G, 1, Q nq)
    elif key_gram is not None:
        spread = _spread(key_gram, e_keys)  # (G, K, nk, Q nq)
        ctx_sq = torch.linalg.vecdot(spread, e_keys, dim=2)  # (G, K, Q nq) = z^2 |c|^2
    else:
        ctx = e_keys.transpose(2, 3) @ keys.to(cdtype)  # (G, K, Q nq, d) = z c
        ctx_sq = torch.linalg.vecdot(ctx, ctx, dim=3)  # (G, K, Q nq)
    if keys_major:
        ctx_sq, norm_q = (
            ctx_sq.reshape(g, k, q, nq),
            query_norm[:, None],
        )  # (G, K, Q, nq), (G, 1, Q, nq)
        token_dim = 3
    else:
        ctx_sq, norm_q = ctx_sq.reshape(g, k, q, nq).permute(0, 2, 3, 1), query_norm[..., None]
        token_dim = 2  # (G, Q, nq, K), (G, Q, nq, 1)
    cos = numer / torch.maximum(norm_q * ctx_sq.clamp_min(0).sqrt(), EPS * z)
    if query_mask is None:
        scores = cos.mean(dim=token_dim)
    else:
        mask = query_mask.to(cdtype)  # (G, Q, nq)
        mask = mask[:, None] if keys_major else mask[..., None]
        scores = (cos * mask).sum(dim=token_dim) / mask.sum(dim=token_dim)
    return scores if keys_major else scores.transpose(1, 2)  # (G, K, Q)


def _spread(key_gram: Tensor, weights: Tensor) -> Tensor:
    """``(..., nk, nk) x (..., nk, n) -> (..., nk, n)``: the keys' Gram matrices times
    the attention weights. Items of at most :data:`FEW_KEYS` keys (an image's 2 x 2
    regions, each its own matrix in a rerank grouped by caption) are summed
    column by column: batched matrix products that small cost more per flop than
    elementwise passes."""
    nk = key_gram.shape[-1]
    if nk > FEW_KEYS:
        return key_gram @ weights
    spread = key_gram[..., :, :1] * weights[..., :1, :]
    for j in range(1, nk):
        spread.addcmul_(key_gram[..., :, j : j + 1], weights[..., j : j + 1, :])
    return spread


def _products(rows: Tensor, columns: Tensor) -> Tensor:
    """``(G, a, d) x (G, b, d) -> (G, a, b)`` token products, contiguous. A batched GEMM
    with fewer than :data:`NARROW_PRODUCT` output columns (one caption's words against
    many regions, as a rerank grouped by caption has) runs up to 2-3x slower per flop
    on the CPU than its transpose, so that one is computed and copied instead."""
    if columns.shape[1] < NARROW_PRODUCT <= rows.shape[1]:
        return (columns @ rows.transpose(1, 2)).transpose(1, 2).contiguous()
    return rows @ columns.transpose(1, 2)


# Largest x with exp(-x) a normal float: the shifted logits' range must stay above it.
_EXP_RANGE = {dtype: -math.log(torch.finfo(dtype).tiny) for dtype in (torch.float32, torch.float64)}


def _gram(tokens: Tensor) -> Tensor:
    """``(..., n, d)`` -> ``(..., n, n)`` Gram matrices in the compute dtype."""
    return (tokens @ tokens.transpose(-1, -2)).to(_compute_dtype(tokens.dtype))


def _norms(tokens: Tensor) -> Tensor:
    """``(..., n, d)`` -> ``(..., n)`` l2 norms in the compute dtype."""
    return torch.linalg.vector_norm(tokens.to(_compute_dtype(tokens.dtype)), dim=-1)


def _padding_bias(word_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``(..., L)`` additive softmax bias: 0 for words, ``-inf`` for padding."""
    return torch.where(word_mask, 0.0, float("-inf")).to(dtype)


def _pair_scores(
    images: Tensor,
    captions: Tensor,
    word_mask: Tensor | None,
    direction: Literal["i2t", "t2i"],
    lambda_softmax: float,
    query_norm: Tensor,
    key_gram: Tensor | None,
) -> Tensor:
    """``(G, A, B)`` scores of ``G`` tiles: images ``(G, A, R, d)`` against captions
    ``(G, B, L, d)`` (zero-padded, ``word_mask`` ``(G, B, L)``; None: no padding), with
    the queries' norms (images' ``(G, A, R)`` in i2t, captions' ``(G, B, L)`` in t2i)
    and the keys' Gram matrices (or None)."""
    if direction == "i2t":
        dtype = _compute_dtype(images.dtype)
        bias = None if word_mask is None else _padding_bias(word_mask, dtype)  # (G, B, L)
        scores = _attend(captions, images, bias, None, query_norm, key_gram, lambda_softmax)
        return scores.transpose(1, 2)  # (G, A, B)
    return _attend(images, captions, None, word_mask, query_norm, key_gram, lambda_softmax)


def _block_sizes(n: int, r: int, m: int, length: int, tile: int) -> tuple[int, int]:
    """Image and caption block sizes of a tile of at most ``tile`` region-word products
    (at least one pair), as square in tokens as the shapes allow so that its GEMM is
    efficient: ``image_block * r`` close to ``caption_block * length``."""
    side = math.isqrt(tile)
    image_block = max(1, min(n, side // r))
    caption_block = max(1, min(m, tile // (image_block * r * length)))
    if caption_block == m:
        image_block = max(1, min(n, tile // (m * r * length)))
    return image_block, caption_block


def _check_direction(direction: str) -> None:
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")


def similarity(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor,
    direction: Literal["i2t", "t2i"] = "i2t",
    lambda_softmax: float = 9.0,
    block_bytes: int | None = None,
) -> Tensor:
    """HAT alignment score of every image against every caption, for one level.

    Args:
        images: ``(N, R, d)`` image tokens of the level (all valid).
        captions: ``(M, L, d)`` caption tokens; positions ``>= caption_lengths[m]``
            are padding and never take part (their values are ignored).
        caption_lengths: ``(M,)`` number of valid tokens per caption (``[CLS]`` and
            ``[SEP]`` included), each in ``1..L``.
        direction: ``"i2t"`` (regions attend to words, the reference default) or
            ``"t2i"`` (words attend to regions).
        lambda_softmax: inverse temperature of the attention softmax.
        block_bytes: memory budget for the temporaries of one tile (see
            :func:`pair_bytes`; default :func:`block_budget` of the device); inputs of
            any size are scored tile by tile within it.

    Returns:
        ``(N, M)`` scores in ``[-1, 1]``, in float32 for half-precision inputs and in
        the input dtype otherwise. Differentiable.

    Captions are grouped by length so that each tile is padded only to its own
    longest caption. The keys' Gram matrices (captions' in i2t, images' in t2i) are
    computed once per block of keys, for every tile of queries it meets.
    """
    if images.dim() != 3 or captions.dim() != 3 or images.shape[2] != captions.shape[2]:
        raise ValueError(
            f"expected images (N, R, d) and captions (M, L, d) of the same d, got "
            f"{tuple(images.shape)} and {tuple(captions.shape)}"
        )
    _check_direction(direction)
    n, r, d = images.shape
    m, max_len, _ = captions.shape
    lengths = caption_lengths.to(device=captions.device, dtype=torch.long)
    if lengths.shape != (m,) or (m and (lengths.min() < 1 or lengths.max() > max_len)):
        raise ValueError(f"caption_lengths must be (M,) = ({m},) with values in 1..{max_len}")
    out = torch.empty(n, m, dtype=_compute_dtype(images.dtype), device=images.device)
    if n == 0 or m == 0:
        return out
    word_mask = _word_mask(lengths, max_len)  # (M, L)
    captions = _zero_padding(captions, word_mask)  # (M, L, d)
    device_type = images.device.type
    if torch.is_autocast_enabled(device_type):
        # Under AMP the products run in the autocast dtype; everything after them in float32.
        half = torch.get_autocast_dtype(device_type)
        images, captions = images.to(half), captions.to(half)
        out = out.float()
    budget = block_budget(images.device) if block_bytes is None else block_bytes
    tile = max(1, budget // pair_bytes(1, 1, itemsize=out.element_size()))
    with torch.autocast(device_type, enabled=False):
        image_block, _ = _block_sizes(n, r, m, max_len, tile)
        image_blocks = [slice(i, i + image_block) for i in range(0, n, image_block)]
        # Caption blocks, longest first, each padded to its own longest caption.
        order = torch.argsort(lengths, descending=True)
        caption_blocks = []
        start = 0
        while start < m:
            block_len = int(lengths[order[start]])
            _, caption_block = _block_sizes(image_block, r, m - start, block_len, tile)
            idx = order[start : start + caption_block]
            caption_blocks.append(
                (idx, captions[None, idx, :block_len], word_mask[None, idx, :block_len])
            )
            start += caption_block
        if direction == "i2t":  # keys are words: one Gram matrix per caption
            image_norm = _norms(images)  # (N, R)
            use_gram = _use_gram(max_len, n * r, d)
            for idx, caps, cmask in caption_blocks:  # (1, Mb, Lb, d), (1, Mb, Lb)
                gram = _gram(caps) if use_gram else None  # (1, Mb, Lb, Lb)
                for rows in image_blocks:
                    out[rows, idx] = _pair_scores(
                        images[None, rows], caps, cmask, direction, lambda_softmax,
                        image_norm[None, rows], gram,
                    )[0]  # fmt: skip
        else:  # keys are regions: one Gram matrix per image
            caption_norms = [_norms(caps) for _, caps, _ in caption_blocks]  # (1, Mb, Lb) each
            use_gram = _use_gram(r, int(lengths.sum()), d)
            for rows in image_blocks:
                imgs = images[None, rows]  # (1, Nb, R, d)
                gram = _gram(imgs) if use_gram else None  # (1, Nb, R, R)
                for (idx, caps, cmask), norm in zip(caption_blocks, caption_norms):
                    out[rows, idx] = _pair_scores(
                        imgs, caps, cmask, direction, lambda_softmax, norm, gram
                    )[0]
    return out


def grouped_similarity(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor,
    direction: Literal["i2t", "t2i"] = "i2t",
    lambda_softmax: float = 9.0,
    block_bytes: int | None = None,
) -> Tensor:
    """HAT alignment scores of ``Q`` independent groups, each its own small block.

    Group ``q`` scores its ``A`` images against its own ``B`` captions: images
    ``(Q, A, R, d)``, captions ``(Q, B, L, d)`` with ``caption_lengths`` ``(Q, B)`` ->
    ``(Q, A, B)``, the same numbers :func:`similarity` gives for those pairs. For
    reranking shortlists: one image with its ``k`` candidate captions (``A = 1``), one
    caption with its ``k`` candidate images (``B = 1``), or one pair (``A = B = 1``).

    Groups are scored in chunks whose temporaries fit ``block_bytes`` (see
    :func:`pair_bytes`; default :func:`block_budget` of the device); each chunk is one
    batched GEMM of every group's regions with its own words. The query side's terms
    (norms, the Gram matrix of a single caption or image) are computed once per group;
    when a group's keys outnumber its queries (an image's regions against one caption in
    t2i) the contexts are formed directly instead of through the keys' Gram matrices.
    Differentiable; half-precision inputs score in float32. To score many queries'
    shortlists of one gallery without gathering a copy of every candidate image, see
    :func:`pair_similarity`.
    """
    if images.dim() != 4 or captions.dim() != 4 or images.shape[::3] != captions.shape[::3]:
        raise ValueError(
            f"expected images (Q, A, R, d) and captions (Q, B, L, d) of the same Q and d, "
            f"got {tuple(images.shape)} and {tuple(captions.shape)}"
        )
    _check_direction(direction)
    q, a, r, d = images.shape
    _, b, max_len, _ = captions.shape
    lengths = caption_lengths.to(device=captions.device, dtype=torch.long)
    if lengths.shape != (q, b):
        raise ValueError(f"caption_lengths must be (Q, B) = ({q}, {b}), got {tuple(lengths.shape)}")
    word_mask = _word_mask(lengths, max_len)  # (Q, B, L)
    captions = _zero_padding(captions, word_mask)  # (Q, B, L, d)
    budget = block_budget(images.device) if block_bytes is None else block_bytes
    return _grouped_scores(images, captions, word_mask, direction, lambda_softmax, budget)


def _grouped_scores(
    images: Tensor,
    captions: Tensor,
    word_mask: Tensor | None,
    direction: Literal["i2t", "t2i"],
    lambda_softmax: float,
    block_bytes: int,
    key_gram: Tensor | None = None,
    query_norm: Tensor | None = None,
) -> Tensor:
    """:func:`grouped_similarity` of zero-padded captions ``(Q, B, L, d)`` with their
    ``word_mask`` ``(Q, B, L)`` (None: every caption has ``L`` words). When the caller
    has them: ``key_gram``, the keys' Gram matrices (captions' ``(Q, B, L, L)`` in i2t,
    images' ``(Q, A, R, R)`` in t2i),
    and ``query_norm``, the queries' token norms (images' ``(Q, A, R)`` in i2t,
    captions' ``(Q, B, L)`` in t2i); else they are computed per chunk."""
    q, a, r, d = images.shape
    _, b, max_len, _ = captions.shape
    out = torch.empty(q, a, b, dtype=_compute_dtype(images.dtype), device=images.device)
    if direction == "i2t":
        use_gram, query_tokens = _use_gram(max_len, a * r, d), r
    else:
        use_gram, query_tokens = _use_gram(r, b * max_len, d), max_len
    # A chunk's own temporaries: the products' tiles, and the contexts when formed.
    per_pair = pair_bytes(r, max_len, itemsize=out.element_size())
    if not use_gram:
        per_pair += query_tokens * d * out.element_size()
    step = max(1, block_bytes // (a * b * per_pair))
    for start in range(0, q, step):
        rows = slice(start, start + step)
        imgs, caps = images[rows], captions[rows]  # (Qc, A, R, d), (Qc, B, L, d)
        keys, queries = (caps, imgs) if direction == "i2t" else (imgs, caps)
        if not use_gram:
            gram = None
        elif key_gram is not None:
            gram = key_gram[rows]  # (Qc, B, L, L) or (Qc, A, R, R)
        else:
            gram = _gram(keys)
        norm = _norms(queries) if query_norm is None else query_norm[rows]
        mask = None if word_mask is None else word_mask[rows]
        out[rows] = _pair_scores(imgs, caps, mask, direction, lambda_softmax, norm, gram)
    return out


class _RowGather:
    """``table[rows]`` for contiguous ``(n, ...)`` tables, each row copied whole (a 2-D
    ``index_select``: several times faster on the CPU than advanced indexing of a 3-D or
    4-D tensor), into scratch memory reused from one call to the next when no gradient
    is needed (fresh pages for every chunk's copy cost as much as the copy). A result is
    valid until the next call."""

    def __init__(self) -> None:
        self._scratch: Tensor | None = None

    def __call__(self, table: Tensor, rows: Tensor) -> Tensor:
        flat = table.reshape(table.shape[0], -1)  # (n, prod(...)), a view when contiguous
        if torch.is_grad_enabled() and table.requires_grad:
            return flat.index_select(0, rows).view(len(rows), *table.shape[1:])
        size = len(rows) * flat.shape[1]
        scratch = self._scratch
        if scratch is None or scratch.numel() < size or scratch.dtype != table.dtype:
            scratch = self._scratch = table.new_empty(size)
        out = scratch[:size].view(len(rows), flat.shape[1])
        return torch.index_select(flat, 0, rows, out=out).view(len(rows), *table.shape[1:])


def pair_similarity(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor,
    image_index: Tensor,
    caption_index: Tensor,
    direction: Literal["i2t", "t2i"] = "i2t",
    lambda_softmax: float = 9.0,
    block_bytes: int | None = None,
    group_by: Literal["auto", "image", "caption"] = "auto",
) -> Tensor:
    """HAT alignment scores of listed (image, caption) pairs of a gallery, for one level.

    Args:
        images: ``(N, R, d)`` image tokens; captions ``(M, L, d)`` with
            ``caption_lengths`` ``(M,)``, as for :func:`similarity`.
        image_index: ``(P,)`` the image of each pair; caption_index ``(P,)`` its caption.
        direction, lambda_softmax, block_bytes: as for :func:`similarity`.
        group_by: the side each group shares: ``"image"`` (one image with its listed
            captions of one length), ``"caption"`` (one caption with its listed images),
            or ``"auto"``: the side that costs more to gather, so that the cheaper
            one is gathered per pair (:func:`_pair_grouping`).

    Returns:
        ``(P,)`` the scores :func:`similarity` gives for those pairs.

    For reranking shortlists of either direction (or both at once): each group is
    scored as :func:`grouped_similarity` does (``A = 1`` or ``B = 1``; groups of one
    caption length and similar sizes batched together), so the shared item's tokens are
    read once per group rather than once per pair and no caption is padded. Token
    norms, and the keys' Gram matrices where they pay, are computed once per image or
    caption, not per pair. Differentiable.
    """
    _check_direction(direction)
    pairs = image_index.shape[0]
    if image_index.shape != caption_index.shape or image_index.dim() != 1:
        raise ValueError(
            f"image_index and caption_index must be (P,) alike, got "
            f"{tuple(image_index.shape)} and {tuple(caption_index.shape)}"
        )
    if group_by not in ("auto", "image", "caption"):
        raise ValueError(f"group_by must be 'auto', 'image' or 'caption', got {group_by!r}")
    n, r, d = images.shape
    out = torch.empty(pairs, dtype=_compute_dtype(images.dtype), device=images.device)
    if pairs == 0:
        return out
    image_index = image_index.to(device=images.device, dtype=torch.long)
    caption_index = caption_index.to(device=images.device, dtype=torch.long)
    lengths = caption_lengths.to(device=images.device, dtype=torch.long)
    max_len = captions.shape[1]  # padding is never read: buckets keep each caption's words
    pair_len = lengths[caption_index]  # (P,)
    if group_by == "auto":
        group_by = _pair_grouping(r, float(pair_len.float().mean()), direction)
    by_caption = group_by == "caption"
    listed = torch.unique(caption_index)  # (U,)
    # Groups: the pairs of one image whose captions have one length, or of one caption,
    # so that a chunk of groups of one length needs no padding (and no mask).
    owner = caption_index if by_caption else image_index  # (P,) each pair's group item
    group_key = owner * (max_len + 1) + pair_len  # (P,)
    order = torch.argsort(group_key, stable=True)  # (P,) pairs grouped
    keys, counts = torch.unique_consecutive(group_key[order], return_counts=True)  # (U_g,)
    group_owner, group_len = keys // (max_len + 1), keys % (max_len + 1)
    starts = torch.cumsum(counts, 0) - counts  # (U_g,) first pair of each group in order
    # Longest captions first, then the most pairs: neighbours pad few slots.
    by = torch.argsort(group_len * (pairs + 1) + counts, descending=True, stable=True)
    run_lengths = torch.unique_consecutive(group_len[by], return_counts=True)[1].tolist()
    # Once per image: the region norms (i2t queries); the region Gram matrices (t2i
    # keys) when they pay against the words each image is scored with at once (one
    # caption grouped by caption, a group's captions grouped by image) and the images
    # are listed often (in several groups: one per caption length when by image).
    image_norm = _norms(images) if direction == "i2t" else None  # (N, R)
    image_gram = None
    if by_caption:
        wants_gram = pairs >= n and _use_gram(r, max_len, d)
    else:
        wants_gram = len(keys) > n and _use_gram(r, pairs // len(keys) * max_len, d)
    if direction == "t2i" and wants_gram:
        image_gram = _gram(images)  # (N, R, R)
    per_image = image_norm if direction == "i2t" else image_gram  # (N, R), (N, R, R) or None
    # Each listed caption's row in the bucket of its length (buckets hold the listed
    # captions of one length in increasing index order).
    listed_len = lengths[listed]  # (U,)
    by_length = listed[torch.argsort(listed_len, stable=True)]  # (U,) buckets, in order
    length_counts = torch.bincount(listed_len, minlength=max_len + 1)  # (L + 1,)
    first = torch.cumsum(length_counts, 0) - length_counts  # (L + 1,) bucket starts
    slot = torch.empty(captions.shape[0], dtype=torch.long, device=images.device)  # (M,)
    slot[by_length] = torch.arange(len(listed), device=images.device) - first[lengths[by_length]]
    # In grouped order: each pair's row of the side gathered per pair, and each group's
    # row of the side it shares.
    pair_rows = (image_index if by_caption else slot[caption_index])[order]  # (P,)
    owner_rows = slot[group_owner] if by_caption else group_owner  # (U_g,)
    budget = block_budget(images.device) if block_bytes is None else block_bytes
    # The chunks, planned once: each run of groups of one caption length is cut into
    # chunks whose temporaries fit the budget, every group of a chunk padded to its first
    # (largest) group's pairs. A pair's temporaries, and what is gathered for it: a
    # caption's tokens and norms or Gram matrix (grouped by image), or an image's tokens
    # and norms or Gram matrix (grouped by caption).
    group_counts, group_words = counts[by].tolist(), group_len[by].tolist()
    image_items = images[0].numel() + (0 if per_image is None else per_image[0].numel())
    plan = []  # per chunk: its groups [begin, stop) of `by`, slots per group, words, first slot
    width = []  # each group's slots (its chunk's), in `by` order
    begin = total_slots = 0
    for run in run_lengths:
        end, words = begin + run, group_words[begin]
        caption_items = words * d + (words * words if direction == "i2t" else words)
        per_pair = pair_bytes(r, words, itemsize=out.element_size())
        per_pair += (image_items if by_caption else caption_items) * captions.element_size()
        while begin < end:
            slots = group_counts[begin]
            stop = min(end, begin + max(1, budget // (slots * per_pair)))
            plan.append((begin, stop, slots, words, total_slots))
            width += [slots] * (stop - begin)
            total_slots += (stop - begin) * slots
            begin = stop
    # Every chunk's slots laid end to end: each slot's pair in grouped order (padding
    # slots repeat their group's last pair), so that a chunk reads its rows as a slice.
    width = torch.tensor(width, device=images.device)  # (U_g,)
    slot_group = torch.repeat_interleave(by, width)  # (T,) each slot's group
    slot_offset = torch.arange(total_slots, device=images.device)  # (T,)
    slot_offset -= torch.repeat_interleave(torch.cumsum(width, 0) - width, width)
    slot_count = counts[slot_group]  # (T,)
    valid = slot_offset < slot_count  # (T,)
    position = starts[slot_group] + torch.minimum(slot_offset, slot_count - 1)  # (T,)
    slot_rows, group_rows = pair_rows[position], owner_rows[by]  # (T,), (U_g,)
    padded = out.new_empty(total_slots)  # (T,) scores slot by slot
    gather = {name: _RowGather() for name in ("images", "tokens", "per caption", "per image")}
    bucket_words = -1
    for begin, stop, slots, words, first_slot in plan:
        if words != bucket_words:  # a new run: the listed captions of this length
            # contiguous (a gather copies whole rows), with what is computed once per
            # caption, not per pair: the word norms (t2i queries) or the Gram matrices
            # (i2t keys).
            bucket_words, low = words, int(first[words])
            members = by_length[low : low + int(length_counts[words])]  # (M_w,) its bucket
            bucket = captions[members, :words]  # (M_w, Lc, d), no padding
            per_caption = _gram(bucket) if direction == "i2t" else _norms(bucket)
        groups, slot_end = stop - begin, first_slot + (stop - begin) * slots
        listed_rows, shared_rows = slot_rows[first_slot:slot_end], group_rows[begin:stop]
        if by_caption:  # A = S listed images, B = 1 caption
            image_rows, caption_rows = listed_rows, shared_rows
            image_shape, caption_shape = (groups, slots), (groups, 1)
        else:  # A = 1 image, B = S listed captions
            image_rows, caption_rows = shared_rows, listed_rows
            image_shape, caption_shape = (groups, 1), (groups, slots)
        caption_terms = gather["per caption"](per_caption, caption_rows)
        caption_terms = caption_terms.view(*caption_shape, *per_caption.shape[1:])
        image_terms = None
        if per_image is not None:
            image_terms = gather["per image"](per_image, image_rows)
            image_terms = image_terms.view(*image_shape, *per_image.shape[1:])
        if direction == "i2t":  # keys are words, queries regions
            gram, query_norm = caption_terms, image_terms  # (G, B, Lc, Lc), (G, A, R)
        else:  # keys are regions, queries words
            gram, query_norm = image_terms, caption_terms  # (G, A, R, R) | None, (G, B, Lc)
        scores = _grouped_scores(
            gather["images"](images, image_rows).view(*image_shape, r, d),  # (G, A, R, d)
            gather["tokens"](bucket, caption_rows).view(*caption_shape, words, d),
            None,  # every caption of the chunk has exactly Lc words
            direction,
            lambda_softmax,
            budget,
            gram,
            query_norm,
        )  # (G, A, B): A or B is 1
        padded[first_slot:slot_end] = scores.reshape(-1)
    out[order[position[valid]]] = padded[valid]
    return out


def _pair_grouping(
    regions: int, mean_words: float, direction: Literal["i2t", "t2i"]
) -> Literal["image", "caption"]:
    """The side :func:`pair_similarity` groups listed pairs by, for images of ``regions``
    tokens and listed captions of ``mean_words`` tokens on average: each group shares
    the side that would cost more to gather per pair, so the cheaper one is gathered.
    A side's cost is its tokens, times :data:`KEY_GATHER_WEIGHT` on the key side (words
    in i2t, regions in t2i), whose gathered items each bring their own Gram product."""
    image_cost = regions * (KEY_GATHER_WEIGHT if direction == "t2i" else 1)
    caption_cost = mean_words * (KEY_GATHER_WEIGHT if direction == "i2t" else 1)
    return "caption" if image_cost < caption_cost else "image"


def mean_words(captions: Tensor, caption_lengths: Tensor) -> Tensor:
    """Mean of each caption's words: ``(M, L, d)`` tokens, ``(M,)`` lengths -> ``(M, d)``,
    padding (``>= caption_lengths``) left out, in the tokens' dtype."""
    word_mask = _word_mask(caption_lengths.to(captions.device), captions.shape[1])  # (M, L)
    words = _zero_padding(captions, word_mask)  # (M, L, d)
    return words.sum(dim=1) / word_mask.sum(dim=1, keepdim=True).to(captions.dtype)  # (M, d)


def pooled_embeddings(
    images: Tensor, captions: Tensor, caption_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """l2-normalised mean tokens: images ``(N, R, d)`` -> ``(N, d)``; captions
    ``(M, L, d)`` -> ``(M, d)`` with padding (``>= caption_lengths``) left out."""
    cdtype = _compute_dtype(images.dtype)
    image_mean = images.to(cdtype).mean(dim=1)  # (N, d)
    caption_mean = mean_words(captions.to(cdtype), caption_lengths)  # (M, d)
    return F.normalize(image_mean, dim=-1), F.normalize(caption_mean, dim=-1)


def pooled_similarity(images: Tensor, captions: Tensor, caption_lengths: Tensor) -> Tensor:
    """Baseline without cross-attention: cosine of mean-pooled tokens.

    images ``(N, R, d)``, captions ``(M, L, d)`` with ``caption_lengths`` ``(M,)`` ->
    ``(N, M)``. Padding is excluded from the caption mean.
    """
    image_mean, caption_mean = pooled_embeddings(images, captions, caption_lengths)
    return image_mean @ caption_mean.T  # (N, M)


def attention_maps(
    regions: Tensor,
    words: Tensor,
    direction: Literal["i2t", "t2i"] = "i2t",
    lambda_softmax: float = 9.0,
) -> Tensor:
    """The attention weights of one image and one caption at one level, word by region.

    Args:
        regions: ``(R, d)`` the image's tokens.
        words: ``(L, d)`` the caption's valid tokens (no padding).
        direction: the alignment direction the model scores with.
        lambda_softmax: inverse temperature of the attention softmax.

    Returns:
        ``(L, R)`` float32 weights ``alpha``. In ``t2i`` each word's row is its softmax
        over the regions (sums to 1). In ``i2t`` regions attend to words, so row ``w``
        holds, for every region, the share of that region's attention that went to
        word ``w`` (each column sums to 1): where in the image the word was matched.
    """
    v, t = regions.float(), words.float()
    a = F.leaky_relu(v @ t.T, LEAKY_SLOPE)  # (R, L)
    if direction == "i2t":
        n = a / (torch.linalg.vector_norm(a, dim=0, keepdim=True) + EPS)  # across regions
        return torch.softmax(lambda_softmax * n, dim=1).T  # (L, R), softmax over words
    n = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + EPS)  # across words
    return torch.softmax(lambda_softmax * n, dim=0).T  # (L, R), softmax over regions
