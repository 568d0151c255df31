"""Network factory: ``build_model(task, name, cfg)`` for both tasks.

classify (input (B, 1, D, H, W), logits (B, 2)): ``cnn3d`` (hnct.models.cnn3d), ``resnet18``,
``resnet50``, ``resnet101`` and ``densenet121`` from ``monai.networks.nets`` with every argument whose
default surprises passed explicitly (MONAI's ResNet defaults to 3 input channels and 400 classes).
segment (input (B, 1, H, W), logits (B, 1, H, W)): ``snet`` (hnct.models.snet, imported lazily) and
``unet`` (MONAI ``BasicUNet``, 2D). ``cfg`` is the task's ``train.<task>`` config section.
"""

from __future__ import annotations

from typing import Any

from torch import nn

CLASSIFY_MODELS = ("cnn3d", "resnet18", "resnet50", "resnet101", "densenet121")
SEGMENT_MODELS = ("snet", "unet")
NUM_CLASSES = 2  # non-T4, T4


def _monai_resnet(name: str) -> nn.Module:
    from monai.networks import nets

    factory = getattr(nets, name)
    # shortcut_type "B" (1x1 conv projection) is MONAI's default and what Med3D used; widen_factor 1
    # keeps the published widths. feed_forward=True keeps the final linear layer (num_classes logits).
    return factory(pretrained=False, spatial_dims=3, n_input_channels=1, num_classes=NUM_CLASSES,
                   shortcut_type="B", widen_factor=1.0, feed_forward=True)


def build_model(task: str, name: str, cfg: dict[str, Any] | None = None) -> nn.Module:
    """The network ``name`` of ``task`` (classify|segment), sized by the task's train config ``cfg``."""
    cfg = cfg or {}
    if task == "classify":
        if name == "cnn3d":
            from hnct.models.cnn3d import CNN3D

            return CNN3D(in_channels=1, num_classes=NUM_CLASSES,
                         channels=cfg.get("cnn3d_channels", (8, 16, 32)))
        if name in ("resnet18", "resnet50", "resnet101"):
            return _monai_resnet(name)
        if name == "densenet121":
            from monai.networks.nets import DenseNet121

            return DenseNet121(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES)
        raise ValueError(f"unknown classify model {name!r}; choose from {', '.join(CLASSIFY_MODELS)}")
    if task == "segment":
        if name == "unet":
            from monai.networks.nets import BasicUNet

            return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1,
                             features=tuple(cfg.get("unet_features", (8, 8, 16, 32, 64, 8))))
        if name == "snet":
            # The colleague's module; imported here only so the U-Net path works without it.
            from hnct.models.snet import SNet

            return SNet(in_channels=1, out_channels=1, width=int(cfg.get("snet_width", 16)),
                        deep_supervision=True)
        raise ValueError(f"unknown segment model {name!r}; choose from {', '.join(SEGMENT_MODELS)}")
    raise ValueError(f"unknown task {task!r}; choose classify or segment")
