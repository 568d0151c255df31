"""3D multi-structure segmentation networks of task ``oar``, sized from the fold's plan.

Input (B, 1, z, y, x) patches of the plan's ``patch_size``; logits (B, C, z, y, x), one sigmoid
channel per structure (structures overlap: no softmax). The trainer's ``cfg["plan"]`` (set by the
task's ``prepare`` from ``results/preprocess/{task}/fold{k}/plan.json``) gives the structures, the
spacing (z, y, x, mm), the patch size and each structure's foreground fraction: both networks
start their output biases (the final layer and every deep-supervision head) at the fraction's logit
(hnct.tasks.oar.init_output_bias), not at 0, which starts every voxel at probability 0.5.

``dynunet``: MONAI ``DynUNet`` as nnU-Net's 3d_fullres: kernels and strides from the spacing and the
patch size by nnU-Net's heuristic (:func:`dynunet_layout`), instance norm, leaky ReLU, filters
doubling from ``dynunet_base_filters`` up to ``dynunet_max_filters`` (nnU-Net: 32 and 320), deep
supervision at every decoder level but the two lowest (in training it returns the heads stacked on
dim 1, all at full resolution; in eval the final output only).
``segresnet``: MONAI ``SegResNet`` (``segresnet_init_filters``; four levels: patch sides divisible by 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hnct.models import register_model
from hnct.tasks.oar import Oar, init_output_bias

MIN_FEATURE_MAP = 4  # nnU-Net stops pooling an axis whose feature map would fall below 4 voxels
MAX_POOLINGS = 5


def dynunet_layout(spacing_zyx: Sequence[float], patch_size: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's pooling and convolution plan: per level a kernel and a stride per axis.

    An axis is pooled (stride 2) while its spacing is at most twice the finest current spacing and
    its feature map stays at least :data:`MIN_FEATURE_MAP` voxels after pooling, at most
    :data:`MAX_POOLINGS` times; its kernel is 3 once its spacing is within twice the finest, else 1
    (in-plane only convolutions for thick slices). The first level has stride 1, the bottleneck a
    3x3x3 kernel. Raises ValueError when a patch side is not divisible by its axis' total stride.
    """
    spacing, size = [float(s) for s in spacing_zyx], [int(s) for s in patch_size]
    kernels, strides = [], [[1] * len(spacing)]
    pooled = [0] * len(spacing)
    while True:
        finest = min(spacing)
        stride = [2 if sp <= 2 * finest and sz // 2 >= MIN_FEATURE_MAP and n < MAX_POOLINGS else 1
                  for sp, sz, n in zip(spacing, size, pooled)]
        if all(s == 1 for s in stride):
            break
        kernels.append([3 if sp <= 2 * finest else 1 for sp in spacing])
        strides.append(stride)
        spacing = [sp * s for sp, s in zip(spacing, stride)]
        size = [sz // s for sz, s in zip(size, stride)]
        pooled = [n + (s == 2) for n, s in zip(pooled, stride)]
    kernels.append([3] * len(spacing))
    total = [2 ** n for n in pooled]
    bad = [f"{p} (axis {axis}, total stride {t})" for axis, (p, t) in enumerate(zip(patch_size, total)) if p % t]
    if bad:
        raise ValueError(f"patch size {list(patch_size)} is not divisible by the network's strides: {', '.join(bad)}")
    return kernels, strides


def _plan(cfg: dict[str, Any]) -> dict[str, Any]:
    if "plan" not in cfg:
        raise ValueError("the oar networks are sized from the fold's plan: cfg['plan'] is missing "
                         "(the task's prepare sets it from plan.json)")
    return cfg["plan"]


@register_model("dynunet", tasks=[Oar.name], config_keys=["dynunet_base_filters", "dynunet_max_filters"])
def build_dynunet(cfg: dict[str, Any]):
    from monai.networks.nets import DynUNet

    plan = _plan(cfg)
    kernels, strides = dynunet_layout(plan["spacing_zyx"], plan["patch_size"])
    filters = [min(int(cfg["dynunet_base_filters"]) * 2 ** level, int(cfg["dynunet_max_filters"]))
               for level in range(len(strides))]
    net = DynUNet(spatial_dims=3, in_channels=1, out_channels=len(plan["structures"]), kernel_size=kernels,
                  strides=strides, upsample_kernel_size=strides[1:], filters=filters,
                  norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                  deep_supervision=True, deep_supr_num=max(len(strides) - 3, 1), res_block=False)
    init_output_bias([net.output_block.conv.conv, *(head.conv.conv for head in net.deep_supervision_heads)],
                     plan["foreground_fraction"])
    return net


@register_model("segresnet", tasks=[Oar.name], config_keys=["segresnet_init_filters"])
def build_segresnet(cfg: dict[str, Any]):
    from monai.networks.nets import SegResNet

    plan = _plan(cfg)
    bad = [p for p in plan["patch_size"] if p % 8]
    if bad:
        raise ValueError(f"segresnet: patch size {plan['patch_size']} must be divisible by 8 (three downsamplings)")
    net = SegResNet(spatial_dims=3, init_filters=int(cfg["segresnet_init_filters"]), in_channels=1,
                    out_channels=len(plan["structures"]), blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
                    dropout_prob=None, norm=("GROUP", {"num_groups": 8}), use_conv_final=True)
    init_output_bias([net.conv_final[-1].conv], plan["foreground_fraction"])
    return net
