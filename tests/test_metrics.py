"""Retrieval metrics against a hand-computed case and a per-query implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hat.metrics import fold_metrics, ranks_i2t, ranks_t2i, retrieval_metrics


def per_query(sims: np.ndarray, cpi: int) -> dict[str, float]:
    """The protocol written query by query (spec section 5)."""
    n = sims.shape[0]
    i2t = []
    for i in range(n):
        order = np.argsort(-sims[i], kind="stable")
        i2t.append(min(int(np.where(order == j)[0][0]) for j in range(i * cpi, (i + 1) * cpi)))
    t2i = []
    for j in range(sims.shape[1]):
        order = np.argsort(-sims[:, j], kind="stable")
        t2i.append(int(np.where(order == j // cpi)[0][0]))
    out = {}
    for name, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_meanr"] = ranks.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def test_hand_computed_case() -> None:
    # 2 images x 2 captions each. Image 0's captions are columns 0, 1; image 1's are 2, 3.
    sims = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2],  # image 0: its best caption (col 0) ranks 0
            [0.8, 0.7, 0.3, 0.6],  # image 1: its captions (0.3, 0.6) rank 3 and 2 -> 2
        ]
    )
    assert ranks_i2t(sims, 2).tolist() == [0, 2]
    # caption 0 (img 0): 0.9 > 0.8 -> 0; caption 1 (img 0): 0.1 < 0.7 -> 1;
    # caption 2 (img 1): 0.3 < 0.5 -> 1; caption 3 (img 1): 0.6 > 0.2 -> 0
    assert ranks_t2i(sims, 2).tolist() == [0, 1, 1, 0]
    m = retrieval_metrics(sims, captions_per_image=2)
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0
    assert m["t2i_r1"] == 50.0 and m["t2i_r5"] == 100.0
    assert m["i2t_medr"] == 2.0  # floor(median(0, 2)) + 1 = floor(1) + 1
    assert m["i2t_meanr"] == 2.0 and m["t2i_meanr"] == 1.5 and m["t2i_medr"] == 1.0
    assert m["rsum"] == 50 + 100 + 100 + 50 + 100 + 100
    assert set(m) == {
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
        "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "rsum",
    }  # fmt: skip


@pytest.mark.parametrize("cpi", [1, 5])
def test_random_matrices_match_the_per_query_definition(cpi: int) -> None:
    rng = np.random.default_rng(cpi)
    for n in (7, 23):
        sims = rng.standard_normal((n, n * cpi))
        sims[:, :: cpi + 1] += 1.0  # make some queries succeed
        got = retrieval_metrics(torch.from_numpy(sims), cpi)
        want = per_query(sims, cpi)
        assert got == pytest.approx(want)
        assert retrieval_metrics(sims, cpi) == pytest.approx(want)  # numpy input too


def test_fold_averaging() -> None:
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((10, 50))
    got = fold_metrics(sims, captions_per_image=5, folds=2)
    blocks = [per_query(sims[:5, :25], 5), per_query(sims[5:, 25:], 5)]
    assert got == pytest.approx({k: (blocks[0][k] + blocks[1][k]) / 2 for k in blocks[0]})
    with pytest.raises(ValueError, match="3 equal folds"):
        fold_metrics(sims, 5, folds=3)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, N \* 5\)"):
        retrieval_metrics(torch.zeros(3, 14))
    with pytest.raises(ValueError, match="got \\(6,\\)"):
        retrieval_metrics(torch.zeros(6), captions_per_image=1)
