"""The VSE++ hardest-negative hinge on hand-made score matrices."""

from __future__ import annotations

import pytest
import torch

from hat.losses import TripletLoss, info_nce_loss, triplet_loss

S = torch.tensor(
    [
        [0.9, 0.8, 0.1],
        [0.3, 0.5, 0.6],
        [0.2, 0.4, 0.7],
    ]
)


def test_hardest_negative_by_hand() -> None:
    # image queries (rows): img0: max(0.8)+0.2-0.9=0.1; img1: max(0.6)+0.2-0.5=0.3;
    # img2: max(0.4)+0.2-0.7=0 -> 0.4
    # caption queries (cols): cap0: max(0.3)+0.2-0.9=0 ; cap1: max(0.8)+0.2-0.5=0.5;
    # cap2: max(0.6)+0.2-0.7=0.1 -> 0.6
    torch.testing.assert_close(triplet_loss(S, margin=0.2), torch.tensor(1.0))


def test_sum_over_all_negatives_by_hand() -> None:
    # rows: img0: [0.1, 0] ; img1: [0.0, 0.3] ; img2: [0, 0]   -> 0.4
    # cols: cap0: [0, 0] ; cap1: [0.5, 0.1] ; cap2: [0, 0.1]   -> 0.7
    torch.testing.assert_close(triplet_loss(S, margin=0.2, max_violation=False), torch.tensor(1.1))


@pytest.mark.parametrize("max_violation", [True, False])
def test_zero_when_positives_clear_the_margin(max_violation: bool) -> None:
    scores = 0.3 * torch.eye(4)  # every positive beats every negative by 0.3
    assert triplet_loss(scores, margin=0.2, max_violation=max_violation) == 0
    assert triplet_loss(scores, margin=0.4, max_violation=max_violation) > 0


def test_pairs_sharing_an_image_are_still_negatives() -> None:
    # Two pairs with the same image and equally good captions: every score is 1, so each
    # of the 4 queries pays the full margin against the other pair.
    scores = torch.ones(2, 2)
    torch.testing.assert_close(triplet_loss(scores, margin=0.2), torch.tensor(0.8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_dtype_is_kept(dtype: torch.dtype) -> None:
    loss = triplet_loss(S.to(dtype))
    assert loss.dtype == dtype
    torch.testing.assert_close(
        loss.double(), torch.tensor(1.0, dtype=torch.float64), atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("max_violation", [True, False])
def test_gradient_and_module(max_violation: bool) -> None:
    scores = S.clone().requires_grad_(True)
    loss_fn = TripletLoss(margin=0.2, max_violation=max_violation)
    loss_fn(scores).backward()
    assert scores.grad is not None
    assert scores.grad[0, 0] < 0 and scores.grad[0, 1] > 0  # pull positive up, negative down
    assert scores.grad[2, 0] == 0  # violates no margin
    assert "max_violation" in repr(loss_fn)
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(2, 3))


def test_info_nce_prefers_the_diagonal() -> None:
    good = 5 * torch.eye(3)
    assert info_nce_loss(good) < info_nce_loss(torch.zeros(3, 3))
    torch.testing.assert_close(info_nce_loss(torch.zeros(3, 3)), torch.log(torch.tensor(3.0)))
