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
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "attention_maps",
    "grouped_similarity",
    "pooled_embeddings",
    "EPS",
    "LEAKY_SLOPE",
    "pooled_similarity",
    "scoring_dtype",
    "similarity",
]

EPS = 1e-8
LEAKY_SLOPE = 0.1
DEFAULT_BLOCK_BYTES = 64 * 2**20
# Number of (N, R, M, L)-sized float temporaries alive at once inside a block.
_LIVE_TEMPORARIES = 6


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
    return torch.where(word_mask[..., None], captions, captions.new_zeros(()))


def _padding_bias(word_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(M, L) additive softmax bias: 0 for words, -inf for padding."""
    return torch.where(word_mask, 0.0, float("-inf")).to(dtype)


def _block_scores(
    images: Tensor,
    captions: Tensor,
    word_mask: Tensor,
    direction: Literal["i2t", "t2i"],
    lambda_softmax: float,
) -> Tensor:
    """Scores of a block: images (N, R, d), captions (M, L, d) zero-padded, word_mask (M, L)."""
    n, r, d = images.shape
    m, length, _ = captions.shape
    cdtype = _compute_dtype(images.dtype)
    # One GEMM for all region-word products of the block.
    s = (images.reshape(n * r, d) @ captions.reshape(m * length, d).T).to(cdtype)
    s = s.view(n, r, m, length)  # (N, R, M, L)
    a = F.leaky_relu(s, LEAKY_SLOPE)  # (N, R, M, L)
    mask = word_mask.to(cdtype)  # (M, L)
    if direction == "i2t":
        # Keys are words: normalise across regions for each word, softmax over words.
        scale = lambda_softmax / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + EPS)
        logits = torch.addcmul(_padding_bias(word_mask, cdtype), a, scale)  # (N, R, M, L)
        alpha = torch.softmax(logits, dim=3)  # (N, R, M, L)
        numer = torch.linalg.vecdot(alpha, s, dim=3)  # (N, R, M)
        gram = (captions @ captions.transpose(1, 2)).to(cdtype)  # (M, L, L)
        spread = torch.einsum("nrml,mlk->nrmk", alpha, gram)  # (N, R, M, L)
        ctx_sq = torch.linalg.vecdot(spread, alpha, dim=3)  # (N, R, M)
        q_norm = torch.linalg.vector_norm(images.to(cdtype), dim=2)[:, :, None]  # (N, R, 1)
        cos = numer / (q_norm * ctx_sq.clamp_min(0).sqrt()).clamp_min(EPS)  # (N, R, M)
        return cos.mean(dim=1)  # (N, M)
    # t2i: keys are regions: normalise across the caption's words for each region,
    # softmax over regions, mean over the caption's words.
    a = a * mask
    a = a / (a.square().sum(dim=3, keepdim=True).sqrt() + EPS)
    alpha = torch.softmax(lambda_softmax * a, dim=1)  # (N, R, M, L)
    numer = (alpha * s).sum(dim=1)  # (N, M, L)
    gram = (images @ images.transpose(1, 2)).to(cdtype)  # (N, R, R)
    ctx_sq = (torch.einsum("nkr,nrml->nkml", gram, alpha) * alpha).sum(dim=1)  # (N, M, L)
    q_norm = captions.to(cdtype).norm(dim=2)  # (M, L)
    cos = numer / (q_norm * ctx_sq.clamp_min(0).sqrt()).clamp_min(EPS)  # (N, M, L)
    lengths = mask.sum(dim=1)  # (M,)
    return (cos * mask).sum(dim=2) / lengths  # (N, M)


def _block_sizes(
    n: int, r: int, m: int, length: int, itemsize: int, budget: int
) -> tuple[int, int]:
    """Image and caption block sizes whose temporaries fit in ``budget`` bytes."""
    per_pair = r * length * itemsize * _LIVE_TEMPORARIES
    pairs = max(1, budget // per_pair)
    caption_block = max(1, min(m, int(pairs**0.5)))
    image_block = max(1, min(n, pairs // caption_block))
    if image_block == n:
        caption_block = max(1, min(m, pairs // image_block))
    return image_block, caption_block


def similarity(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor,
    direction: Literal["i2t", "t2i"] = "i2t",
    lambda_softmax: float = 9.0,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
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
        block_bytes: memory budget for the temporaries of one block; inputs of any
            size are scored block by block within it.

    Returns:
        ``(N, M)`` scores in ``[-1, 1]``, in float32 for half-precision inputs and in
        the input dtype otherwise. Differentiable.

    Captions are grouped by length so that each block is padded only to its own
    longest caption.
    """
    if images.dim() != 3 or captions.dim() != 3 or images.shape[2] != captions.shape[2]:
        raise ValueError(
            f"expected images (N, R, d) and captions (M, L, d) of the same d, got "
            f"{tuple(images.shape)} and {tuple(captions.shape)}"
        )
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    n, r, _ = images.shape
    m, max_len, _ = captions.shape
    lengths = caption_lengths.to(device=captions.device, dtype=torch.long)
    if lengths.shape != (m,) or (m and (lengths.min() < 1 or lengths.max() > max_len)):
        raise ValueError(f"caption_lengths must be (M,) = ({m},) with values in 1..{max_len}")
    out = torch.empty(n, m, dtype=_compute_dtype(images.dtype), device=images.device)
    if n == 0 or m == 0:
        return out
    word_mask = _word_mask(lengths, max_len)  # (M, L)
    captions = _zero_padding(captions, word_mask)  # (M, L, d)
    order = torch.argsort(lengths, descending=True)
    device_type = images.device.type
    if torch.is_autocast_enabled(device_type):
        # Under AMP the products run in the autocast dtype; everything after them in float32.
        half = torch.get_autocast_dtype(device_type)
        images, captions = images.to(half), captions.to(half)
        out = out.float()
    itemsize = torch.finfo(out.dtype).bits // 8
    with torch.autocast(device_type, enabled=False):
        start = 0
        while start < m:
            block_len = int(lengths[order[start]])
            image_block, caption_block = _block_sizes(
                n, r, m - start, block_len, itemsize, block_bytes
            )
            idx = order[start : start + caption_block]
            caps, cmask = captions[idx, :block_len], word_mask[idx, :block_len]
            for i in range(0, n, image_block):
                block = _block_scores(
                    images[i : i + image_block], caps, cmask, direction, lambda_softmax
                )
                out[i : i + image_block, idx] = block
            start += caption_block
    return out


def grouped_similarity(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor,
    direction: Literal["i2t", "t2i"] = "i2t",
    lambda_softmax: float = 9.0,
) -> Tensor:
    """HAT alignment scores of ``Q`` independent groups, each its own small block.

    Group ``q`` scores its ``A`` images against its own ``B`` captions: images
    ``(Q, A, R, d)``, captions ``(Q, B, L, d)`` with ``caption_lengths`` ``(Q, B)`` ->
    ``(Q, A, B)``, the same numbers :func:`similarity` gives for those pairs. For
    reranking shortlists: one image with its ``k`` candidate captions (``A = 1``), one
    caption with its ``k`` candidate images (``B = 1``), or one pair (``A = B = 1``).
    The block scorer is vectorised over groups (``torch.func.vmap``), so each group's
    products are one batched matrix multiplication and the query's own terms (norms,
    Gram matrix) are computed once per group, not once per pair.
    """
    word_mask = _word_mask(caption_lengths.to(captions.device), captions.shape[2])  # (Q, B, L)
    captions = _zero_padding(captions, word_mask)  # (Q, B, L, d)
    scores = torch.func.vmap(_block_scores, in_dims=(0, 0, 0, None, None))
    return scores(images, captions, word_mask, direction, lambda_softmax)  # (Q, A, B)


def pooled_embeddings(
    images: Tensor, captions: Tensor, caption_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """l2-normalised mean tokens: images ``(N, R, d)`` -> ``(N, d)``; captions
    ``(M, L, d)`` -> ``(M, d)`` with padding (``>= caption_lengths``) left out."""
    cdtype = _compute_dtype(images.dtype)
    word_mask = _word_mask(caption_lengths.to(captions.device), captions.shape[1])  # (M, L)
    image_mean = images.to(cdtype).mean(dim=1)  # (N, d)
    words = _zero_padding(captions, word_mask).to(cdtype)  # (M, L, d)
    caption_mean = words.sum(dim=1) / word_mask.sum(dim=1, keepdim=True).to(cdtype)  # (M, d)
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
