"""S-Net (Spatial Context Network) for 2D lymph-node segmentation on axial CT slices, in torch.

After S-Net (J Imaging Inform Med 2024), written for hnct from the paper's description:

* **Encoder that downsamples only twice** (H -> H/2 -> H/4): small nodes (a few mm) survive in the
  deepest feature map. Stages: ``stem`` (H, ``width`` ch), ``enc1`` (H/2, 2w), ``enc2`` (H/4, 4w).
* **Dilated stages** (``dil1``, ``dil2``) at H/4: residual blocks with dilation 2 and 4 grow the
  receptive field without further downsampling.
* **ASPP** (atrous spatial pyramid pooling): parallel 1x1 and 3x3 atrous convolutions at rates
  (6, 12, 18) plus image-level pooling, concatenated and projected, for multi-scale context.
* **Reverse axial attention** on every skip connection (H/4, H/2, H): the skip features pass
  axial self-attention (along H, then along W: long-range context at O(HW(H+W)) cost), then are
  weighted by ``1 - sigmoid(coarser prediction)`` (PraNet's reverse attention) so the decoder
  looks at regions the coarser prediction missed and is pushed to correct its false positives.
* **Decoder**: at each scale, the upsampled decoder features and the reverse-attended skip are
  fused by two 3x3 convolutions; a 1x1 head predicts a *residual* added to the upsampled coarser
  prediction (coarse-to-fine refinement, as in PraNet).
* **Deep supervision**: in training mode (with ``deep_supervision``) ``forward`` returns the list
  ``[main (H), pred H/2, pred H/4, ASPP pred H/4]`` of logits, all bilinearly upsampled to the input
  resolution; in eval mode (or without deep supervision) only the main logits (B, out, H, W).

Input (B, in_channels, H, W) with H and W divisible by 4 (64 in the demo, 384 in the paper).
With ``out_channels > 1`` the reverse-attention map uses the maximum foreground probability over
channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hnct.models import register_model
from hnct.tasks.segment import Segment


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """Convolution (same padding) + batch norm + ReLU."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers (an encoder/decoder stage)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(conv_bn_relu(in_ch, out_ch), conv_bn_relu(out_ch, out_ch))


class DilatedResidualBlock(nn.Module):
    """Two 3x3 convolutions with dilation ``dilation`` and an identity (or 1x1) shortcut.

    Keeps the resolution (H/4) while enlarging the receptive field by 4*dilation pixels.
    """

    def __init__(self, in_ch: int, out_ch: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_ch, out_ch, dilation=dilation),
            nn.Conv2d(out_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, 3x3 atrous convs at ``rates``, image pooling.

    The branches see context at several scales (rates 6/12/18 at H/4 cover 24-72 input pixels per
    tap); their concatenation is projected to ``out_ch`` channels by a 1x1 conv.
    """

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_ch, out_ch, kernel=1)])
        self.branches.extend(conv_bn_relu(in_ch, out_ch, dilation=r) for r in rates)
        # Image pooling branch: no BatchNorm on a 1x1 map (batch statistics of one value per image).
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(out_ch * (len(rates) + 2), out_ch, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat(outs + [pooled], dim=1))


class AxialAttention(nn.Module):
    """Self-attention along one spatial axis (``axis`` 2 = H, 3 = W), with a learned residual gate.

    Each column (axis 2) or row (axis 3) attends over its own pixels: queries/keys of
    ``channels // 8`` dims, values of ``channels`` dims; output = x + gamma * attention(x), with
    gamma initialised to 0 so the block starts as identity.
    """

    def __init__(self, channels: int, axis: int):
        super().__init__()
        if axis not in (2, 3):
            raise ValueError(f"axis must be 2 (H) or 3 (W), got {axis}")
        self.axis = axis
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.axis == 2:  # sequences along H, one per (b, w)
            def seq(t):
                return t.permute(0, 3, 2, 1).reshape(b * w, h, t.shape[1])
            length, other = h, w
        else:  # sequences along W, one per (b, h)
            def seq(t):
                return t.permute(0, 2, 3, 1).reshape(b * h, w, t.shape[1])
            length, other = w, h
        qs, ks, vs = seq(q), seq(k), seq(v)  # (b*other, length, ch)
        attn = torch.softmax(qs @ ks.transpose(1, 2) / qs.shape[-1] ** 0.5, dim=-1)
        out = (attn @ vs).reshape(b, other, length, c)
        out = out.permute(0, 3, 2, 1) if self.axis == 2 else out.permute(0, 3, 1, 2)
        return x + self.gamma * out


class ReverseAxialAttention(nn.Module):
    """Reverse axial attention on a skip connection.

    skip -> axial attention along H then W -> multiplied by ``1 - sigmoid(coarse prediction)``
    (coarse logits upsampled to the skip's size) -> 3x3 conv-BN-ReLU. Regions the coarse prediction
    is already sure about are damped; missed regions and uncertain borders are emphasised.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.attend = nn.Sequential(AxialAttention(channels, axis=2), AxialAttention(channels, axis=3))
        self.refine = conv_bn_relu(channels, channels)

    def forward(self, skip: torch.Tensor, coarse_logits: torch.Tensor) -> torch.Tensor:
        coarse = F.interpolate(coarse_logits, size=skip.shape[2:], mode="bilinear", align_corners=False)
        reverse = 1 - torch.sigmoid(coarse).amax(dim=1, keepdim=True)
        return self.refine(self.attend(skip) * reverse)


class DecoderStage(nn.Module):
    """Fuse upsampled decoder features with a reverse-attended skip; predict a residual refinement."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, out_channels: int):
        super().__init__()
        self.reverse_attention = ReverseAxialAttention(skip_ch)
        self.fuse = DoubleConv(in_ch + skip_ch, out_ch)
        self.head = nn.Conv2d(out_ch, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, coarse_logits: torch.Tensor):
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        attended = self.reverse_attention(skip, coarse_logits)
        features = self.fuse(torch.cat([x, attended], dim=1))
        coarse_up = F.interpolate(coarse_logits, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return features, coarse_up + self.head(features)


class SNet(nn.Module):
    """S-Net: two-downsampling encoder, dilated stages, ASPP, reverse axial attention, deep supervision.

    Args:
        in_channels: input channels (1: windowed CT slice).
        out_channels: output logit channels (1: binary node mask).
        width: channels of the first stage; stages use w, 2w, 4w, deep stages and ASPP 8w.
        deep_supervision: in training mode return ``[main, aux...]`` logits at input resolution.

    Input (B, in_channels, H, W), H and W divisible by 4. Output logits (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16,
                 deep_supervision: bool = True):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w = width
        self.deep_supervision = deep_supervision
        self.stem = DoubleConv(in_channels, w)                  # H
        self.enc1 = DoubleConv(w, 2 * w)                        # H/2
        self.enc2 = DoubleConv(2 * w, 4 * w)                    # H/4
        self.dil1 = DilatedResidualBlock(4 * w, 8 * w, dilation=2)  # H/4
        self.dil2 = DilatedResidualBlock(8 * w, 8 * w, dilation=4)  # H/4
        self.aspp = ASPP(8 * w, 8 * w)
        self.aspp_head = nn.Conv2d(8 * w, out_channels, 1)
        self.dec2 = DecoderStage(8 * w, 4 * w, 4 * w, out_channels)  # H/4, skip enc2
        self.dec1 = DecoderStage(4 * w, 2 * w, 2 * w, out_channels)  # H/2, skip enc1
        self.dec0 = DecoderStage(2 * w, w, w, out_channels)          # H, skip stem

    def forward(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"SNet expects (B, C, H, W) with H, W divisible by 4, got {tuple(x.shape)}")
        size = x.shape[2:]
        # channels-last (NHWC) activations: oneDNN's convolutions run without layout reorders (with
        # the weights converted by build_snet: a CPU training step about 12 % faster, 2026-12-02)
        s0 = self.stem(x.contiguous(memory_format=torch.channels_last))
        s1 = self.enc1(F.max_pool2d(s0, 2))
        s2 = self.enc2(F.max_pool2d(s1, 2))
        deep = self.aspp(self.dil2(self.dil1(s2)))
        pred_aspp = self.aspp_head(deep)
        d2, pred2 = self.dec2(deep, s2, pred_aspp)
        d1, pred1 = self.dec1(d2, s1, pred2)
        _, pred0 = self.dec0(d1, s0, pred1)
        if self.training and self.deep_supervision:
            return [pred0] + [F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                              for p in (pred1, pred2, pred_aspp)]
        return pred0


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@register_model("snet", tasks=[Segment.name], config_keys=["snet_width"])
def build_snet(cfg: dict) -> SNet:
    model = SNet(in_channels=1, out_channels=1, width=int(cfg["snet_width"]), deep_supervision=True)
    return model.to(memory_format=torch.channels_last)
