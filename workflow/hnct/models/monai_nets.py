"""MONAI networks, registered with every argument whose default surprises passed explicitly.

classify (input (B, 1, D, H, W), logits (B, 2)): ``resnet18``, ``resnet50``, ``resnet101`` (MONAI's
ResNet defaults to 3 input channels and 400 classes) and ``densenet121``.
segment (input (B, 1, H, W), logits (B, 1, H, W)): ``unet`` (MONAI ``BasicUNet``, 2D).
"""

from __future__ import annotations

from typing import Any

from hnct.models import NUM_CLASSES, register_model
from hnct.tasks.classify import Classify
from hnct.tasks.segment import Segment


def _monai_resnet(name: str):
    from monai.networks import nets

    factory = getattr(nets, name)
    # shortcut_type "B" (1x1 conv projection) is MONAI's default and what Med3D used; widen_factor 1
    # keeps the published widths. feed_forward=True keeps the final linear layer (num_classes logits).
    return factory(pretrained=False, spatial_dims=3, n_input_channels=1, num_classes=NUM_CLASSES,
                   shortcut_type="B", widen_factor=1.0, feed_forward=True)


for _depth in (18, 50, 101):
    register_model(f"resnet{_depth}", tasks=[Classify.name])(
        lambda cfg, _name=f"resnet{_depth}": _monai_resnet(_name))


@register_model("densenet121", tasks=[Classify.name])
def build_densenet121(cfg: dict[str, Any]):
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES)


@register_model("unet", tasks=[Segment.name], config_keys=["unet_features"])
def build_unet(cfg: dict[str, Any]):
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=tuple(cfg["unet_features"]))
