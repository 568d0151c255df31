"""hnct.losses: Tversky, PraNet structure loss and snet_loss against hand calculations."""

from __future__ import annotations

import math

import pytest
import torch

from hnct.losses import boundary_weight, snet_loss, structure_loss, tversky_loss

torch.set_num_threads(1)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_tversky_by_hand_on_two_pixels():
    logits = torch.tensor([2.0, -1.0]).reshape(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    p1, p2 = sig(2.0), sig(-1.0)
    tp, fp, fn = p1, p2, 1 - p1
    expected = 1 - (tp + 1) / (tp + 0.3 * fp + 0.7 * fn + 1)
    assert tversky_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # alpha/beta swap changes the value as the formula says
    swapped = 1 - (tp + 1) / (tp + 0.7 * fp + 0.3 * fn + 1)
    assert tversky_loss(logits, target, alpha=0.7, beta=0.3).item() == pytest.approx(swapped, rel=1e-6)


def test_tversky_weighs_missed_pixels_more_than_false_alarms():
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    miss = torch.tensor([-5.0, -5.0]).reshape(1, 1, 1, 2)       # misses the positive
    alarm = torch.tensor([5.0, 5.0]).reshape(1, 1, 1, 2)        # false alarm on the negative
    assert tversky_loss(miss, target) > tversky_loss(alarm, target)


def test_boundary_weight_by_hand():
    # A single foreground pixel in the middle of a 31x31 image: the 31x31 pool window at the centre
    # covers the whole image, so the average is 1/961 there; at a corner pixel (0, 0) the window
    # (zero padding counted) covers the 16x16 image block that includes the centre pixel (15, 15).
    mask = torch.zeros(1, 1, 31, 31)
    mask[0, 0, 15, 15] = 1
    w = boundary_weight(mask)
    assert w[0, 0, 15, 15].item() == pytest.approx(1 + 5 * (1 - 1 / 961))
    assert w[0, 0, 0, 0].item() == pytest.approx(1 + 5 / 961)
    assert w[0, 0, 0, 30].item() == pytest.approx(1 + 5 / 961)
    # An all-empty mask has weight exactly 1 everywhere.
    assert torch.equal(boundary_weight(torch.zeros(1, 1, 8, 8)), torch.ones(1, 1, 8, 8))


def test_structure_loss_by_hand_on_empty_mask():
    # Empty target: w = 1, so weighted BCE = mean BCE and weighted IoU = 1 - 1 / (sum(p) + 1).
    logits = torch.tensor([[0.0, 1.0], [-2.0, 3.0]]).reshape(1, 1, 2, 2)
    target = torch.zeros(1, 1, 2, 2)
    ps = [sig(v) for v in (0.0, 1.0, -2.0, 3.0)]
    bce = sum(-math.log(1 - p) for p in ps) / 4
    wiou = 1 - 1 / (sum(ps) + 1)
    assert structure_loss(logits, target).item() == pytest.approx(bce + wiou, rel=1e-6)


def test_structure_loss_by_hand_with_weights():
    # 1x2 image, target [1, 0]. avg_pool 31 with padding 15 over a 1x2 image divides by 961, so
    # both pixels see an average of 1/961: w = [1 + 5 (1 - 1/961), 1 + 5/961].
    logits = torch.tensor([0.5, -0.5]).reshape(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    w1, w2 = 1 + 5 * (1 - 1 / 961), 1 + 5 / 961
    p1, p2 = sig(0.5), sig(-0.5)
    bce = (w1 * -math.log(p1) + w2 * -math.log(1 - p2)) / (w1 + w2)
    inter = w1 * p1
    union = w1 * (p1 + 1) + w2 * p2
    wiou = 1 - (inter + 1) / (union - inter + 1)
    assert structure_loss(logits, target).item() == pytest.approx(bce + wiou, rel=1e-6)


def test_snet_loss_sums_deep_supervision_outputs_and_backpropagates():
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    outs = [torch.randn(2, 1, 8, 8, requires_grad=True) for _ in range(3)]
    single = [tversky_loss(o, target) + structure_loss(o, target) for o in outs]
    total = snet_loss(outs, target)
    assert total.item() == pytest.approx(sum(s.item() for s in single), rel=1e-6)
    assert snet_loss(outs[0], target).item() == pytest.approx(single[0].item(), rel=1e-6)
    total.backward()
    assert all(o.grad is not None and torch.isfinite(o.grad).all() for o in outs)
    # A near-perfect prediction has a much smaller loss than a random one.
    perfect = (target * 20 - 10)
    assert snet_loss(perfect, target).item() < 0.05 < single[0].item()


def test_loss_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        snet_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="empty"):
        snet_loss([], torch.zeros(1, 1, 4, 4))
