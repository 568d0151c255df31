"""Segmentation losses of S-Net (binary, logits in, (B, 1, H, W) tensors).

* ``tversky_loss``: 1 - TI with TI = (TP + eps) / (TP + alpha FP + beta FN + eps), soft counts from
  sigmoid probabilities summed over each image, averaged over the batch. alpha = 0.3, beta = 0.7
  weigh missed node pixels (FN) more than false alarms, for small lymph nodes.
* ``structure_loss``: PraNet's structure loss. Boundary weight
  ``w = 1 + 5 |avg_pool2d(mask, 31, stride 1, padding 15) - mask|`` (large near mask edges),
  weighted BCE-with-logits ``sum(w * bce) / sum(w)`` plus weighted IoU
  ``1 - (sum(w p m) + 1) / (sum(w (p + m)) - sum(w p m) + 1)`` per image, averaged over the batch.
  avg_pool2d counts the zero padding (``count_include_pad=True``, PraNet's call).
* ``snet_loss``: Tversky + structure loss, summed over the deep-supervision outputs (a list of
  logits all at the target's resolution) or applied to a single tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

EPS = 1.0


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} differs from target shape {tuple(target.shape)}")
    if logits.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) tensors, got {logits.dim()}D")


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                 smooth: float = EPS) -> torch.Tensor:
    """Binary Tversky loss from logits: mean over images of 1 - (TP+s)/(TP + a FP + b FN + s)."""
    _check(logits, target)
    prob = torch.sigmoid(logits)
    target = target.to(prob.dtype)
    dims = tuple(range(1, prob.dim()))
    tp = (prob * target).sum(dims)
    fp = (prob * (1 - target)).sum(dims)
    fn = ((1 - prob) * target).sum(dims)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return (1 - index).mean()


def boundary_weight(target: torch.Tensor) -> torch.Tensor:
    """PraNet boundary weight 1 + 5 |avgpool31(mask) - mask| (zero padding counted).

    The 31 x 31 window sum is taken as a 31-row sum then a 31-column sum (the same sum: exact for a
    0/1 mask, whose partial sums are small integers), divided by 961 once as avg_pool2d divides it:
    a 0/1 mask gets avg_pool2d's weights bit for bit, at 62 instead of 961 additions a pixel (the
    one 31 x 31 pooling was a quarter of an S-Net training step on CPU, measured 2026-12-02)."""
    rows = F.avg_pool2d(target, kernel_size=(31, 1), stride=1, padding=(15, 0), divisor_override=1)
    window_sum = F.avg_pool2d(rows, kernel_size=(1, 31), stride=1, padding=(0, 15), divisor_override=1)
    return 1 + 5 * torch.abs(window_sum / 961 - target)


def structure_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """PraNet structure loss: boundary-weighted BCE-with-logits + boundary-weighted IoU.

    ``weight``: :func:`boundary_weight` of ``target`` when the caller has it already (snet_loss
    scores several outputs against one target)."""
    _check(logits, target)
    target = target.to(logits.dtype)
    weight = boundary_weight(target) if weight is None else weight.to(logits.dtype)
    dims = (2, 3)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weighted_bce = (weight * bce).sum(dims) / weight.sum(dims)
    prob = torch.sigmoid(logits)
    inter = (prob * target * weight).sum(dims)
    union = ((prob + target) * weight).sum(dims)
    weighted_iou = 1 - (inter + 1) / (union - inter + 1)
    return (weighted_bce + weighted_iou).mean()


def snet_loss(outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Tversky + structure loss, summed over deep-supervision outputs (list) or for one tensor."""
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    if len(outputs) == 0:
        raise ValueError("snet_loss got an empty list of outputs")
    total = None
    weight = boundary_weight(target.to(outputs[0].dtype))  # one target: its weight once
    for logits in outputs:
        term = tversky_loss(logits, target) + structure_loss(logits, target, weight)
        total = term if total is None else total + term
    return total
