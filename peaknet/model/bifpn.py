"""Bidirectional feature pyramid network (BiFPN) with LayerNorm, as modified by PeakNet.

References: Tan, Pang & Le 2020, "EfficientDet: Scalable and Efficient Object Detection"
(BiFPN, fast normalised fusion); Wang et al. 2025 (PeakNet), section 2.2.1 (LayerNorm instead of
BatchNorm so inference depends only on the learned parameters).

One block fuses L >= 2 levels of equal width C, finest (stride 4) first:

- top-down path, coarse to fine: ``td_i = conv(fuse(p_i, up2(td_{i+1})))`` (``td_{L-1} = p_{L-1}``);
- bottom-up path, fine to coarse: ``out_0 = td_0``,
  ``out_i = conv(fuse(p_i, td_i, down2(out_{i-1})))`` for the middle levels and
  ``out_{L-1} = conv(fuse(p_{L-1}, down2(out_{L-2})))`` for the coarsest;
- ``fuse(x_1..x_k) = sum_k relu(w_k) x_k / (sum_k relu(w_k) + eps)`` (fast normalised fusion,
  weights initialised to 1);
- ``conv`` = depthwise 3x3 conv -> pointwise 1x1 conv -> LayerNorm over channels -> GELU.
  (The authors' public code defaulted the depthwise kernel to 1, i.e. no spatial mixing; a 3x3
  kernel is what the design intends and what is used here.)

Resampling: bilinear x2 up, 3x3 stride-2 max-pool down (EfficientDet). Any size mismatch (odd
sizes) is resolved by resizing to the target level, but PeakNet pads inputs to multiples of 32 so
levels are exact halves.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of a (B, C, H, W) tensor (no running statistics)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SeparableConvNormAct(nn.Module):
    """Depthwise kxk conv -> pointwise 1x1 conv -> LayerNorm2d -> GELU; (B, C, H, W) -> same H, W."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.dw = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2,
            groups=in_channels, bias=False,
        )
        # The norm that follows carries the bias.
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = LayerNorm2d(out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.pw(self.dw(x))))


class FastNormalizedFusion(nn.Module):
    """``sum_k relu(w_k) x_k / (sum_k relu(w_k) + eps)`` over k same-shaped inputs."""

    def __init__(self, num_inputs: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        out = xs[0] * w[0].to(xs[0].dtype)
        for i in range(1, len(xs)):
            out = out + xs[i] * w[i].to(xs[i].dtype)
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)


def _resize_to(x: torch.Tensor, ref: torch.Tensor, up: bool) -> torch.Tensor:
    th, tw = ref.shape[-2:]
    if up:
        y = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    else:
        y = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    if y.shape[-2:] != (th, tw):
        y = F.interpolate(y, size=(th, tw), mode="bilinear", align_corners=False)
    return y


class BiFPNBlock(nn.Module):
    """One BiFPN block: list of L (B, C, H_i, W_i) tensors, finest first -> same shapes."""

    def __init__(
        self, width: int, num_levels: int = 4, kernel_size: int = 3, fusion_eps: float = 1e-4
    ) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError("BiFPNBlock needs at least 2 levels")
        self.num_levels = num_levels
        L = num_levels
        # top-down: levels L-2 .. 0 ; bottom-up: levels 1 .. L-1
        self.td_fuse = nn.ModuleList([FastNormalizedFusion(2, fusion_eps) for _ in range(L - 1)])
        self.td_conv = nn.ModuleList(
            [SeparableConvNormAct(width, width, kernel_size) for _ in range(L - 1)]
        )
        self.bu_fuse = nn.ModuleList(
            [FastNormalizedFusion(3 if i < L - 1 else 2, fusion_eps) for i in range(1, L)]
        )
        self.bu_conv = nn.ModuleList(
            [SeparableConvNormAct(width, width, kernel_size) for _ in range(L - 1)]
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        L = self.num_levels
        if len(feats) != L:
            raise ValueError(f"BiFPNBlock expects {L} levels, got {len(feats)}")
        p = list(feats)
        td: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
        td[L - 1] = p[L - 1]
        for i in range(L - 2, -1, -1):  # coarse -> fine
            j = i  # index into td_* (level i)
            up = _resize_to(td[i + 1], p[i], up=True)
            td[i] = self.td_conv[j](self.td_fuse[j]([p[i], up]))
        out: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
        out[0] = td[0]
        for i in range(1, L):  # fine -> coarse
            j = i - 1
            down = _resize_to(out[i - 1], p[i], up=False)
            inputs = [p[i], td[i], down] if i < L - 1 else [p[i], down]
            out[i] = self.bu_conv[j](self.bu_fuse[j](inputs))
        return out


class BiFPN(nn.Module):
    """Input 1x1 projections (backbone channels -> width, with LayerNorm) + a stack of blocks.

    Parameters
    ----------
    in_channels:
        Channels of each backbone level, finest first (``Backbone.channels``).
    width:
        BiFPN feature width C (512 for the paper's teacher and students).
    num_blocks:
        Number of stacked :class:`BiFPNBlock` (1, 2 or 4 in the paper).
    kernel_size:
        Depthwise kernel (3; 1 reproduces the authors' code, which did no spatial mixing).

    ``forward(feats)``: list of (B, in_channels[i], H_i, W_i) -> list of (B, width, H_i, W_i).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        width: int = 512,
        num_blocks: int = 4,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.width = width
        self.proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, width, 1, bias=False), LayerNorm2d(width)) for c in in_channels]
        )
        self.blocks = nn.ModuleList(
            [BiFPNBlock(width, len(in_channels), kernel_size) for _ in range(num_blocks)]
        )
        self.init_weights()

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = [proj(f) for proj, f in zip(self.proj, feats)]
        for blk in self.blocks:
            x = blk(x)
        return x

    @torch.no_grad()
    def init_weights(self) -> None:
        """Conv weights: truncated normal std 0.02 (as the ConvNeXt backbone); norms: 1/0;
        fusion weights: 1."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, FastNormalizedFusion)):
                m.reset_parameters()
