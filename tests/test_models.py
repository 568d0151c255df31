"""hnct.models: every network builds from config and runs forward/backward with the contract's shapes."""

from __future__ import annotations

import pytest
import torch

from hnct.models import build_model, model_names

torch.set_num_threads(1)


@pytest.mark.parametrize("name", model_names("classify"))
def test_classify_model_forward_backward(name):
    torch.manual_seed(0)
    model = build_model("classify", name, {"cnn3d_channels": [4, 8, 16]})
    x = torch.randn(2, 1, 32, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 2)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    # the first convolution takes ONE channel (MONAI's ResNet default is 3)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.in_channels == 1


def test_unet_forward_keeps_input_size():
    model = build_model("segment", "unet", {"unet_features": [4, 4, 8, 16, 32, 4]})
    out = model(torch.randn(2, 1, 48, 48))
    assert out.shape == (2, 1, 48, 48)


def test_snet_training_returns_deep_supervision_list_and_eval_a_tensor():
    model = build_model("segment", "snet", {"snet_width": 4})
    x = torch.randn(2, 1, 32, 32)
    model.train()
    outputs = model(x)
    assert isinstance(outputs, (list, tuple)) and all(o.shape == (2, 1, 32, 32) for o in outputs)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 1, 32, 32)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown classify model"):
        build_model("classify", "vgg", {})
    with pytest.raises(ValueError, match="unknown task"):
        build_model("detect", "unet", {})
