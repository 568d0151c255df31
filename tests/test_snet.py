"""hnct.models.snet.SNet: shapes, deep supervision, blocks, and that it can fit a tiny example."""

from __future__ import annotations

import pytest
import torch

from hnct.losses import snet_loss
from hnct.models.snet import ASPP, AxialAttention, ReverseAxialAttention, SNet, count_parameters

torch.set_num_threads(1)


def test_shapes_train_and_eval():
    torch.manual_seed(0)
    net = SNet(in_channels=1, out_channels=1, width=4)
    x = torch.randn(2, 1, 32, 48)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    assert all(o.shape == (2, 1, 32, 48) for o in outs)
    net.eval()
    with torch.no_grad():
        main = net(x)
    assert isinstance(main, torch.Tensor) and main.shape == (2, 1, 32, 48)


def test_no_deep_supervision_returns_a_tensor_in_training_and_multichannel_works():
    net = SNet(in_channels=2, out_channels=3, width=4, deep_supervision=False).train()
    out = net(torch.randn(2, 2, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16)


def test_size_not_divisible_by_4_is_an_error():
    with pytest.raises(ValueError, match="divisible by 4"):
        SNet(width=4).eval()(torch.randn(1, 1, 30, 32))


def test_parameter_count_grows_with_width():
    counts = [count_parameters(SNet(width=w)) for w in (8, 16)]
    assert counts[0] < counts[1] < 3_000_000
    assert counts[1] == pytest.approx(4 * counts[0], rel=0.1)  # convolutions scale with width**2


def test_axial_attention_is_identity_at_init_and_mixes_along_its_axis_only():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 6)
    along_h = AxialAttention(8, axis=2)
    assert torch.allclose(along_h(x), x)
    with torch.no_grad():
        along_h.gamma.fill_(1.0)
    y = along_h(x)
    x2 = x.clone()
    x2[:, :, 0, 0] += 10  # change one pixel of column 0
    y2 = along_h(x2)
    changed = (y2 - y).abs().sum(dim=1)[0] > 1e-6
    assert changed[:, 0].all() and not changed[:, 1:].any()  # only column 0 is affected


def test_reverse_attention_suppresses_confident_regions():
    torch.manual_seed(0)
    block = ReverseAxialAttention(4).eval()
    skip = torch.randn(1, 4, 8, 8)
    confident = torch.full((1, 1, 4, 4), 30.0)  # sigmoid = 1 everywhere: reverse weight 0
    out_confident = block(skip, confident)
    zeros = block(torch.zeros_like(skip), confident)
    assert torch.allclose(out_confident, zeros, atol=1e-5)
    unsure = torch.full((1, 1, 4, 4), -30.0)  # nothing predicted: skip passes through
    assert not torch.allclose(block(skip, unsure), zeros, atol=1e-3)


def test_aspp_keeps_resolution():
    aspp = ASPP(8, 6).eval()
    assert aspp(torch.randn(2, 8, 12, 10)).shape == (2, 6, 12, 10)


def test_learns_a_square_in_a_few_steps():
    torch.manual_seed(0)
    net = SNet(width=4)
    x = torch.randn(4, 1, 16, 16) * 0.1
    target = torch.zeros(4, 1, 16, 16)
    target[:, :, 4:10, 5:11] = 1
    x = x + target  # the square is brighter
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = snet_loss(net(x), target)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first
    net.eval()
    with torch.no_grad():
        pred = torch.sigmoid(net(x)) > 0.5
    dice = 2 * (pred & (target > 0)).sum() / (pred.sum() + target.sum())
    assert dice > 0.8
