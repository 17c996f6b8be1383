"""The alignment against a straightforward per-pair implementation of spec section 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hat import align
from hat.align import (
    DEFAULT_BLOCK_BYTES,
    grouped_similarity,
    pair_bytes,
    pair_similarity,
    pooled_similarity,
    similarity,
)

LAMBDA = 9.0
EPS = 1e-8


def reference_pair(v: torch.Tensor, t: torch.Tensor, direction: str, lam: float = LAMBDA) -> float:
    """One image (R, d) against one caption (L, d) of valid tokens only, written from the spec
    with explicit loops over regions and words."""
    if direction == "t2i":
        v, t = t, v  # queries are words, keys are regions
    queries, keys = v, t
    n_q, n_k = queries.shape[0], keys.shape[0]
    s = [[float(queries[q] @ keys[k]) for k in range(n_k)] for q in range(n_q)]
    a = [[x if x > 0 else 0.1 * x for x in row] for row in s]
    norms = [math.sqrt(sum(a[q][k] ** 2 for q in range(n_q))) + EPS for k in range(n_k)]
    total = 0.0
    for q in range(n_q):
        logits = [lam * a[q][k] / norms[k] for k in range(n_k)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        z = sum(weights)
        context = sum((weights[k] / z) * keys[k] for k in range(n_k))
        cos = float(queries[q] @ context) / max(
            float(queries[q].norm()) * float(context.norm()), EPS
        )
        total += cos
    return total / n_q


def reference(images, captions, lengths, direction, lam=LAMBDA):
    return torch.tensor(
        [
            [
                reference_pair(img, cap[: int(n)], direction, lam)
                for cap, n in zip(captions, lengths)
            ]
            for img in images
        ],
        dtype=torch.float64,
    )


def _inputs(n=3, r=5, m=4, max_len=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, r, d, generator=g, dtype=torch.float64)
    captions = torch.randn(m, max_len, d, generator=g, dtype=torch.float64)
    lengths = torch.randint(2, max_len + 1, (m,), generator=g)
    lengths[0] = max_len
    for j, length in enumerate(lengths):  # garbage in the padding
        captions[j, length:] = 1e3 * torch.randn(
            max_len - length, d, generator=g, dtype=torch.float64
        )
    return images, captions, lengths


@pytest.mark.parametrize("regions", [5, 9])  # fewer and more regions than words: both layouts
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_matches_per_pair_reference_float64(direction: str, regions: int) -> None:
    images, captions, lengths = _inputs(r=regions)
    got = similarity(images, captions, lengths, direction=direction)
    assert got.dtype == torch.float64 and got.shape == (3, 4)
    torch.testing.assert_close(
        got, reference(images, captions, lengths, direction), atol=1e-9, rtol=0
    )


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_lambda_is_used(direction: str) -> None:
    images, captions, lengths = _inputs(seed=1)
    got = similarity(images, captions, lengths, direction=direction, lambda_softmax=2.0)
    torch.testing.assert_close(
        got, reference(images, captions, lengths, direction, lam=2.0), atol=1e-9, rtol=0
    )
    assert not torch.allclose(got, similarity(images, captions, lengths, direction=direction))


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_blocking_does_not_change_scores(direction: str) -> None:
    images, captions, lengths = _inputs(n=7, r=5, m=9, seed=2)
    whole = similarity(images, captions, lengths, direction=direction)
    tiny_blocks = similarity(images, captions, lengths, direction=direction, block_bytes=1)
    torch.testing.assert_close(tiny_blocks, whole, atol=1e-12, rtol=0)


def test_padding_width_does_not_matter() -> None:
    images, captions, lengths = _inputs(seed=3)
    wider = F.pad(captions, (0, 0, 0, 5), value=7.0)
    torch.testing.assert_close(
        similarity(images, wider, lengths),
        similarity(images, captions, lengths),
        atol=1e-12,
        rtol=0,
    )


@pytest.mark.parametrize("garbage", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_non_finite_padding_is_ignored(direction: str, garbage: float) -> None:
    """Padding values never take part, inf and NaN included, in every scoring path."""
    images, captions, lengths = _inputs(seed=6)
    dirty = captions.clone()
    for j, length in enumerate(lengths):
        dirty[j, length:] = garbage
    assert not dirty.isfinite().all()
    clean = similarity(images, captions, lengths, direction=direction)
    got = similarity(images, dirty, lengths, direction=direction)
    assert got.isfinite().all()
    torch.testing.assert_close(got, clean, atol=1e-12, rtol=0)
    grouped = grouped_similarity(images[:, None], dirty[None].expand(3, -1, -1, -1),
                                 lengths[None].expand(3, -1), direction, LAMBDA)  # fmt: skip
    torch.testing.assert_close(grouped[:, 0], clean, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        pooled_similarity(images, dirty, lengths),
        pooled_similarity(images, captions, lengths),
        atol=1e-12,
        rtol=0,
    )


def test_float32_and_half_inputs_follow_float64() -> None:
    images, captions, lengths = _inputs(seed=4)
    exact = similarity(images, captions, lengths)
    f32 = similarity(images.float(), captions.float(), lengths)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), exact, atol=1e-5, rtol=0)
    bf16 = similarity(images.bfloat16(), captions.bfloat16(), lengths)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.double(), exact, atol=5e-2, rtol=0)


def test_gradients_flow_to_both_sides() -> None:
    images, captions, lengths = _inputs(seed=5)
    images.requires_grad_(True)
    captions.requires_grad_(True)
    similarity(images, captions, lengths, block_bytes=1).sum().backward()
    assert images.grad.abs().sum() > 0
    assert captions.grad[0].abs().sum() > 0
    short = int(torch.argmin(lengths))
    assert captions.grad[short, lengths[short] :].abs().sum() == 0  # padding gets no gradient


def test_bad_inputs_are_rejected() -> None:
    images, captions, lengths = _inputs()
    with pytest.raises(ValueError, match="caption_lengths"):
        similarity(images, captions, torch.zeros_like(lengths))
    with pytest.raises(ValueError, match="same d"):
        similarity(images, captions[..., :3], lengths)
    with pytest.raises(ValueError, match="direction"):
        similarity(images, captions, lengths, direction="both")


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_grouped_similarity_is_the_same_entries(direction):
    """Each group's own block equals those entries of the all-pairs scores: one image
    with its candidate captions, one caption with its candidate images, single pairs."""
    torch.manual_seed(3)
    images = torch.randn(9, 12, 16, dtype=torch.float64)
    captions = torch.randn(11, 7, 16, dtype=torch.float64)
    lengths = torch.randint(1, 8, (11,))
    full = similarity(images, captions, lengths, direction, 9.0)  # (9, 11)
    cands = torch.stack([torch.randperm(11)[:4] for _ in range(9)])  # (9, 4) captions
    per_image = grouped_similarity(
        images[:, None], captions[cands], lengths[cands], direction, 9.0
    )  # (9, 1, 4)
    assert torch.allclose(per_image[:, 0], full.gather(1, cands), atol=1e-12)
    img_cands = torch.stack([torch.randperm(9)[:3] for _ in range(11)])  # (11, 3) images
    per_caption = grouped_similarity(
        images[img_cands], captions[:, None], lengths[:, None], direction, 9.0
    )  # (11, 3, 1)
    assert torch.allclose(per_caption[:, :, 0], full.T.gather(1, img_cands), atol=1e-12)
    pairs = grouped_similarity(
        images[:, None], captions[:9, None], lengths[:9, None], direction, 9.0
    )  # (9, 1, 1)
    assert torch.allclose(pairs[:, 0, 0], full[:, :9].diagonal(), atol=1e-12)


def _grouped_inputs(r: int, max_len: int, d: int, seed: int):
    """A gallery of 6 images and 8 captions (garbage in the padding) with shortlists:
    4 captions per image query, 3 images per caption query."""
    images, captions, lengths = _inputs(n=6, r=r, m=8, max_len=max_len, d=d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    cap_cands = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(6)])  # (6, 4)
    img_cands = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(8)])  # (8, 3)
    return images, captions, lengths, cap_cands, img_cands


@pytest.mark.parametrize("gram", [True, False])  # context norms via Gram matrices or directly
@pytest.mark.parametrize(("r", "max_len", "d"), [(5, 7, 8), (12, 4, 16), (2, 9, 32)])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_grouped_shortlists_match_reference(monkeypatch, direction, r, max_len, d, gram):
    """One image with its candidate captions (A = 1) and one caption with its candidate
    images (B = 1), padded captions with garbage, both layouts and both context paths,
    against the per-pair reference in float64."""
    monkeypatch.setattr(align, "_use_gram", lambda *shape: gram)
    images, captions, lengths, cap_cands, img_cands = _grouped_inputs(r, max_len, d, seed=r)
    ref = reference(images, captions, lengths, direction)  # (6, 8)
    per_image = grouped_similarity(
        images[:, None], captions[cap_cands], lengths[cap_cands], direction, LAMBDA
    )  # (6, 1, 4)
    assert per_image.shape == (6, 1, 4) and per_image.dtype == torch.float64
    torch.testing.assert_close(per_image[:, 0], ref.gather(1, cap_cands), atol=1e-12, rtol=0)
    per_caption = grouped_similarity(
        images[img_cands], captions[:, None], lengths[:, None], direction, LAMBDA
    )  # (8, 3, 1)
    torch.testing.assert_close(per_caption[:, :, 0], ref.T.gather(1, img_cands), atol=1e-12, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_grouped_chunks_do_not_change_scores(direction: str) -> None:
    images, captions, lengths, cap_cands, _ = _grouped_inputs(5, 7, 8, seed=7)
    args = (images[:, None], captions[cap_cands], lengths[cap_cands], direction, LAMBDA)
    whole = grouped_similarity(*args)
    torch.testing.assert_close(grouped_similarity(*args, block_bytes=1), whole, atol=1e-12, rtol=0)


def test_grouped_gradients_flow() -> None:
    images, captions, lengths, cap_cands, _ = _grouped_inputs(5, 7, 8, seed=8)
    images.requires_grad_(True)
    captions.requires_grad_(True)
    grouped_similarity(images[:, None], captions[cap_cands], lengths[cap_cands]).sum().backward()
    assert images.grad.abs().sum() > 0 and captions.grad.abs().sum() > 0


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_large_lambda_keeps_the_reference(direction: str) -> None:
    """Beyond the range where exp needs no running max (2 lambda > 708 in float64, > 87
    in float32), the max over keys is subtracted: still the reference, never NaN."""
    images, captions, lengths = _inputs(seed=9)
    got = similarity(images, captions, lengths, direction=direction, lambda_softmax=400.0)
    want = reference(images, captions, lengths, direction, lam=400.0)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    f32 = similarity(images.float(), captions.float(), lengths, direction, lambda_softmax=60.0)
    assert f32.isfinite().all()
    want = reference(images, captions, lengths, direction, lam=60.0)
    torch.testing.assert_close(f32.double(), want, atol=1e-4, rtol=0)


def test_memory_budget(tmp_path, monkeypatch) -> None:
    """One budget: read from the per-core cache (a fallback without sysfs), and the bytes
    per pair that callers chunk by."""
    assert DEFAULT_BLOCK_BYTES == align.LIVE_TEMPORARIES * align._cache_bytes() >= 2**16
    assert pair_bytes(196, 16) == 4 * align.LIVE_TEMPORARIES * 196 * 16
    assert pair_bytes(196, 16, 768) == pair_bytes(196, 16) + 4 * (196 + 16) * 768
    assert pair_bytes(196, 16, itemsize=8) == 2 * pair_bytes(196, 16)
    assert align.block_budget(torch.device("cpu")) == DEFAULT_BLOCK_BYTES
    assert align.block_budget(torch.device("cuda")) == align.ACCELERATOR_BLOCK_BYTES
    monkeypatch.setattr(align, "CACHE_INFO", tmp_path / "missing")
    assert align._cache_bytes() == align.FALLBACK_CACHE_BYTES
    caches = [("1", "Data", "48K"), ("1", "Instruction", "64K"), ("2", "Unified", "1M")]
    caches.append(("3", "Unified", "260M"))  # shared between cores: left out
    for i, (level, kind, size) in enumerate(caches):
        index = tmp_path / f"index{i}"
        index.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (index / name).write_text(value + "\n")
    monkeypatch.setattr(align, "CACHE_INFO", tmp_path)
    assert align._cache_bytes() == 2**20


@pytest.mark.parametrize("group_by", ["auto", "image", "caption"])
@pytest.mark.parametrize("regions", [5, 2])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_pair_similarity_is_the_listed_entries(direction: str, regions: int, group_by: str) -> None:
    """Listed pairs (repeats, images listed with different numbers of captions, images
    never listed) score as their entries of the all-pairs matrix, in any chunking and
    grouped by either side (with 2 regions, t2i keys use the images' Gram matrices)."""
    images, captions, lengths = _inputs(n=6, r=regions, m=8, max_len=7, d=8, seed=10)
    full = similarity(images, captions, lengths, direction)  # (6, 8)
    g = torch.Generator().manual_seed(10)
    image_index = torch.tensor([0, 3, 3, 3, 5, 0, 3, 1, 1, 5, 5, 5, 5])
    caption_index = torch.randint(0, 8, image_index.shape, generator=g)
    want = full[image_index, caption_index]
    for block_bytes in (1, align.DEFAULT_BLOCK_BYTES):
        got = pair_similarity(
            images, captions, lengths, image_index, caption_index, direction, LAMBDA,
            block_bytes, group_by,
        )  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    dirty = captions.clone()
    for j, length in enumerate(lengths):
        dirty[j, length:] = float("nan")
    got = pair_similarity(
        images, dirty, lengths, image_index, caption_index, direction, group_by=group_by
    )
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    empty = pair_similarity(images, captions, lengths, image_index[:0], caption_index[:0])
    assert empty.shape == (0,)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_pair_similarity_with_images_in_many_groups(direction: str) -> None:
    """Images listed by many captions of several lengths (grouped by image, each image in
    several groups: t2i computes its region Gram matrices once and gathers them)."""
    images, captions, lengths = _inputs(n=3, r=3, m=12, max_len=6, d=16, seed=11)
    full = similarity(images, captions, lengths, direction)  # (3, 12)
    image_index = torch.arange(3).repeat_interleave(12)  # every image with every caption
    caption_index = torch.arange(12).repeat(3)
    got = pair_similarity(
        images, captions, lengths, image_index, caption_index, direction, group_by="image"
    )
    torch.testing.assert_close(got, full[image_index, caption_index], atol=1e-12, rtol=0)


@pytest.mark.parametrize("keys", [2, 4, 6])
def test_spread_and_products_are_the_matrix_products(keys: int) -> None:
    """The elementwise Gram spread (few keys) and the transposed narrow products are the
    plain matrix products."""
    g = torch.Generator().manual_seed(keys)
    gram = torch.randn(5, 3, keys, keys, generator=g, dtype=torch.float64)
    weights = torch.randn(5, 3, keys, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(align._spread(gram, weights), gram @ weights)
    rows = torch.randn(4, 40, 8, generator=g, dtype=torch.float64)
    for columns in (keys, align.NARROW_PRODUCT + keys):
        cols = torch.randn(4, columns, 8, generator=g, dtype=torch.float64)
        got = align._products(rows, cols)
        assert got.is_contiguous()
        torch.testing.assert_close(got, rows @ cols.transpose(1, 2))


def test_pair_grouping_gathers_the_cheaper_side() -> None:
    """The side gathered per pair is the one with fewer tokens, the key side (words in
    i2t, regions in t2i) counted at KEY_GATHER_WEIGHT."""
    words = 14.0
    assert align._pair_grouping(64, words, "i2t") == "image"  # gathers 14 words
    assert align._pair_grouping(64, words, "t2i") == "image"
    assert align._pair_grouping(16, words, "t2i") == "image"  # 16 key regions cost 32
    assert align._pair_grouping(16, words, "i2t") == "caption"  # 14 key words cost 28
    assert align._pair_grouping(4, words, "t2i") == "caption"


@pytest.mark.parametrize("group_by", ["image", "caption"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_pair_similarity_gradients_are_the_listed_entries(direction: str, group_by: str) -> None:
    """With gradients on (no reused scratch), listed pairs back-propagate exactly as
    their entries of the all-pairs matrix do, to images and captions."""
    images, captions, lengths = _inputs(n=4, r=5, m=6, max_len=7, d=8, seed=11)
    image_index = torch.tensor([0, 3, 3, 1, 1, 2, 0])
    caption_index = torch.tensor([5, 0, 2, 2, 4, 1, 3])
    weights = torch.linspace(0.5, 2.0, len(image_index), dtype=torch.float64)
    grads = []
    for listed in (True, False):
        imgs, caps = images.clone().requires_grad_(), captions.clone().requires_grad_()
        if listed:
            got = pair_similarity(
                imgs, caps, lengths, image_index, caption_index, direction, group_by=group_by
            )
        else:
            got = similarity(imgs, caps, lengths, direction)[image_index, caption_index]
        (got * weights).sum().backward()
        grads.append((imgs.grad, caps.grad))
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
