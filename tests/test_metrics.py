"""Retrieval metrics against a hand-computed case and a per-query implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hat.metrics import fold_metrics, ranks_i2t, ranks_t2i, retrieval_metrics


def loop_ranks(sims: np.ndarray, cpi: int) -> tuple[np.ndarray, np.ndarray]:
    """i2t ``(N,)`` and t2i ``(M,)`` ranks, query by query (spec section 5; no ties)."""
    i2t = []
    for i in range(sims.shape[0]):
        order = np.argsort(-sims[i], kind="stable")
        i2t.append(min(int(np.where(order == j)[0][0]) for j in range(i * cpi, (i + 1) * cpi)))
    t2i = []
    for j in range(sims.shape[1]):
        order = np.argsort(-sims[:, j], kind="stable")
        t2i.append(int(np.where(order == j // cpi)[0][0]))
    return np.array(i2t), np.array(t2i)


def per_query(sims: np.ndarray, cpi: int) -> dict[str, float]:
    """The metrics of :func:`loop_ranks`, written out directly."""
    out = {}
    for name, ranks in zip(("i2t", "t2i"), loop_ranks(sims, cpi)):
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
    assert list(m) == [
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
        "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "rsum", "i2t_tied", "t2i_tied",
    ]  # fmt: skip


def test_ties_count_against_the_query() -> None:
    # Every score equal: every other candidate ties with the positive, so each positive
    # ranks last among them and recall is 0, not 100.
    sims = torch.ones(3, 6)
    assert ranks_i2t(sims, 2).tolist() == [4, 4, 4]  # the 4 captions of other images
    assert ranks_t2i(sims, 2).tolist() == [2] * 6  # the 2 other images
    m = retrieval_metrics(sims, 2)
    assert m["i2t_r1"] == m["t2i_r1"] == 0.0 and m["i2t_tied"] == 3 and m["t2i_tied"] == 6
    # Ties with the positive count, as do strictly higher scores; the positive itself not.
    sims = torch.tensor([[0.5, 0.5, 0.9], [0.5, 0.6, 0.2], [0.0, 0.3, 0.3]])
    assert ranks_i2t(sims, 1).tolist() == [2, 0, 1]
    assert ranks_t2i(sims, 1).tolist() == [1, 0, 1]
    # i2t takes the best positive first: image 0's captions (cols 0, 1) score 0.2 and 0.7,
    # the 0.7 ties with a negative -> 1; image 1's best (0.5) is beaten by 0.6 only -> 1.
    # Its other caption (0.4) is not counted against it: only other images' captions are.
    sims = torch.tensor([[0.2, 0.7, 0.7, 0.1], [0.6, 0.0, 0.5, 0.4]])
    assert ranks_i2t(sims, 2).tolist() == [1, 1]


@pytest.mark.parametrize("value", [0.0, 1.0, float("nan")])
@pytest.mark.parametrize("cpi", [1, 5])
def test_constant_or_nan_scores_are_at_most_chance(value: float, cpi: int) -> None:
    n = 20  # more candidates than R@10 looks at, so "last" is outside every recall
    m = retrieval_metrics(torch.full((n, n * cpi), value), cpi)
    assert m["rsum"] == 0.0  # at most chance (rSum ~ 100 here): every positive ranks last
    assert m["i2t_medr"] == n * cpi - cpi + 1 and m["t2i_medr"] == n


def test_nan_never_counts_as_a_win() -> None:
    sims = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert ranks_t2i(sims, 1).tolist() == [0, 0]
    sims[0, 0] = float("nan")  # a NaN positive ranks below every candidate
    assert ranks_i2t(sims, 1).tolist() == [1, 0]
    assert ranks_t2i(sims, 1).tolist() == [1, 0]
    sims = torch.tensor([[0.9, float("nan")], [0.2, 0.8]])  # a NaN negative beats both
    assert ranks_i2t(sims, 1).tolist() == [1, 0]
    assert ranks_t2i(sims, 1).tolist() == [0, 1]
    # i2t: one NaN positive among finite ones is skipped, not taken as the best.
    sims = torch.tensor([[float("nan"), 0.5, 0.6, 0.1], [0.3, 0.2, 0.9, 0.8]])
    assert ranks_i2t(sims, 2).tolist() == [1, 0]


def test_continuous_scores_are_unchanged_by_the_tie_rule() -> None:
    # Without ties, "at least as high" and "strictly higher" agree: the loop reference
    # (argsort position) gives the same ranks, and no query is reported as tied.
    rng = np.random.default_rng(7)
    sims = rng.standard_normal((13, 65))
    i2t, t2i = loop_ranks(sims, 5)
    assert ranks_i2t(sims, 5).tolist() == i2t.tolist()
    assert ranks_t2i(sims, 5).tolist() == t2i.tolist()
    m = retrieval_metrics(sims, 5)
    assert m["i2t_tied"] == 0 and m["t2i_tied"] == 0


def test_tie_counts_are_summed_over_folds() -> None:
    sims = torch.ones(4, 4)
    m = fold_metrics(sims, captions_per_image=1, folds=2)
    assert m["i2t_tied"] == 4 and m["t2i_tied"] == 4 and m["i2t_r1"] == 0.0


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
def test_chunking_does_not_change_ranks(chunk: int) -> None:
    sims = torch.randn(7, 21)
    i2t, t2i = loop_ranks(sims.numpy(), 3)
    assert ranks_i2t(sims, 3, chunk=chunk).tolist() == i2t.tolist()
    assert ranks_t2i(sims, 3, chunk=chunk).tolist() == t2i.tolist()


@pytest.mark.parametrize("cpi", [1, 5])
def test_random_matrices_match_the_per_query_definition(cpi: int) -> None:
    rng = np.random.default_rng(cpi)
    for n in (7, 23):
        sims = rng.standard_normal((n, n * cpi))
        sims[:, :: cpi + 1] += 1.0  # make some queries succeed
        got = retrieval_metrics(torch.from_numpy(sims), cpi)
        want = per_query(sims, cpi)
        assert got == pytest.approx({**want, "i2t_tied": 0.0, "t2i_tied": 0.0})
        assert retrieval_metrics(sims, cpi) == pytest.approx(got)  # numpy input too


def test_fold_averaging() -> None:
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((10, 50))
    got = fold_metrics(sims, captions_per_image=5, folds=2)
    blocks = [per_query(sims[:5, :25], 5), per_query(sims[5:, 25:], 5)]
    want = {k: (blocks[0][k] + blocks[1][k]) / 2 for k in blocks[0]}
    assert got == pytest.approx({**want, "i2t_tied": 0.0, "t2i_tied": 0.0})
    assert fold_metrics(sims, 5, folds=1) == pytest.approx(retrieval_metrics(sims, 5))
    with pytest.raises(ValueError, match="3 equal folds"):
        fold_metrics(sims, 5, folds=3)


def test_fold_averaging_by_hand() -> None:
    # 4 images x 1 caption, 2 folds. Off-diagonal blocks are huge and must be ignored.
    sims = torch.tensor(
        [
            [0.9, 0.1, 9.0, 9.0],
            [0.8, 0.2, 9.0, 9.0],  # fold 0: i2t ranks [0, 1], t2i ranks [0, 0]
            [9.0, 9.0, 0.5, 0.6],
            [9.0, 9.0, 0.4, 0.5],  # fold 1: i2t ranks [1, 0], t2i ranks [0, 1]
        ]
    )
    m = fold_metrics(sims, captions_per_image=1, folds=2)
    assert m["i2t_r1"] == 50.0 and m["t2i_r1"] == 75.0  # (50 + 50) / 2, (100 + 50) / 2
    assert m["i2t_r5"] == m["t2i_r5"] == 100.0
    assert m["i2t_medr"] == 1.0  # floor(0.5) + 1 in both folds
    assert m["t2i_meanr"] == 1.25  # (1.0 + 1.5) / 2
    assert m["rsum"] == 50 + 100 + 100 + 75 + 100 + 100


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, N \* 5\) similarity matrix, got \(3, 14\)"):
        retrieval_metrics(torch.zeros(3, 14))
    with pytest.raises(ValueError, match=r"got \(6,\)"):
        retrieval_metrics(torch.zeros(6), captions_per_image=1)
    with pytest.raises(ValueError, match=r"got \(0, 0\)"):
        retrieval_metrics(np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"got \(4, 10\)"):
        fold_metrics(np.zeros((4, 10)), captions_per_image=5, folds=2)
    with pytest.raises(ValueError, match=r"got \(2, 2, 2\)"):
        ranks_t2i(torch.zeros(2, 2, 2), 1)
    with pytest.raises(ValueError, match="captions_per_image"):
        ranks_i2t(torch.zeros(2, 0), 0)
