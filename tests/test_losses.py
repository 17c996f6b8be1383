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


def test_zero_when_positives_clear_the_margin() -> None:
    scores = torch.full((4, 4), -1.0) + 3.0 * torch.eye(4)
    assert triplet_loss(scores) == 0


def test_gradient_and_module() -> None:
    scores = S.clone().requires_grad_(True)
    TripletLoss(margin=0.2)(scores).backward()
    assert scores.grad[0, 0] < 0 and scores.grad[0, 1] > 0  # pull positive up, hardest down
    assert scores.grad[2, 0] == 0  # not a hardest negative of anyone
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(2, 3))


def test_info_nce_prefers_the_diagonal() -> None:
    good = 5 * torch.eye(3)
    assert info_nce_loss(good) < info_nce_loss(torch.zeros(3, 3))
    torch.testing.assert_close(info_nce_loss(torch.zeros(3, 3)), torch.log(torch.tensor(3.0)))
