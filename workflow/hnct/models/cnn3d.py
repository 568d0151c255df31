"""A plain 3D CNN for crop classification: conv-BN-ReLU-maxpool blocks, global pooling, linear.

Input (B, 1, D, H, W) (a 1 mm laryngeal crop, z-scored HU), output logits (B, n_classes).
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import Any

from torch import nn

from hnct.models import NUM_CLASSES, register_model
from hnct.tasks.classify import Classify


class CNN3D(nn.Module):
    """``len(channels)`` blocks of Conv3d(3³)-BatchNorm-ReLU-MaxPool(2), then global average pool and
    a linear layer. Each block halves every spatial size, so the input must be at least
    ``2 ** len(channels)`` voxels along each axis."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2,
                 channels: Sequence[int] = (8, 16, 32), dropout: float = 0.2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            blocks += [
                # bias is redundant before BatchNorm
                nn.Conv3d(previous, int(width), kernel_size=3, padding=1, bias=False),
                nn.BatchNorm3d(int(width)),
                nn.ReLU(inplace=True),
                nn.MaxPool3d(2),
            ]
            previous = int(width)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@register_model("cnn3d", tasks=[Classify.name], config_keys=["cnn3d_channels"])
def build_cnn3d(cfg: dict[str, Any]) -> CNN3D:
    return CNN3D(in_channels=1, num_classes=NUM_CLASSES, channels=cfg["cnn3d_channels"])
