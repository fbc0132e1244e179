"""PeakNet's dual-pathway segmentation head (Wang et al. 2025, section 2.2.1).

Per level i (stride 4 * 2**i) a lateral branch of ``max(i, 1)`` conv3x3 -> GroupNorm -> GELU
layers, each followed by a bilinear x2 upsample for levels i > 0, brings every level to stride 4
(the semantic-FPN head of Kirillov et al. 2019); the branches are summed and a 1x1 conv maps the
sum to class logits at stride 4. Then:

- pathway 1: bilinear x4 upsample of the stride-4 logits (coarse, cheap, good for large peaks);
- pathway 2: a learned ``ConvTranspose2d(C, C, kernel 6, stride 4, padding 1)`` of the same
  logits ((h - 1) * 4 - 2 + 6 = 4h: exactly the input resolution), able to place single-pixel
  peaks;

the two are added. The transposed conv starts at zero (bias and weight) so at initialisation the
output is the bilinear pathway and the learned pathway grows from there. With 2 classes the
peak probability starts at ``prior_prob`` (0.01) everywhere.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), _group_norm(cout), nn.GELU()
        )


class LateralBranch(nn.Module):
    """conv-norm-GELU (+ x2 bilinear upsample) repeated ``num_up`` times (once, without
    upsampling, when ``num_up == 0``): (B, cin, h, w) -> (B, cout, h * 2**num_up, w * 2**num_up)."""

    def __init__(self, cin: int, cout: int, num_up: int) -> None:
        super().__init__()
        self.num_up = num_up
        self.layers = nn.ModuleList(
            [_ConvNormAct(cin if k == 0 else cout, cout) for k in range(max(num_up, 1))]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            if self.num_up > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x


class SegmentationHead(nn.Module):
    """BiFPN levels -> class logits at the input resolution.

    Parameters
    ----------
    in_channels:
        Width of the BiFPN levels.
    num_levels:
        Number of levels (strides 4 * 2**i, i < num_levels), finest first.
    width:
        Channels of the lateral branches (256 in the authors' runs).
    num_classes:
        Output classes (2: background, peak).
    upsample:
        Stride of the finest level (4): the factor of both pathways.
    prior_prob:
        Initial probability of the peak class (last class) everywhere (RetinaNet-style bias
        init, Lin et al. 2017): the classifier bias starts at ``log(prior / (1 - prior))`` for
        the last class relative to the others, so focal-loss training does not start flooded
        by the background. ``None`` leaves the bias at zero.

    ``forward(feats)``: list of (B, in_channels, H/4/2**i, W/4/2**i) ->
    (B, num_classes, H, W) float logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int = 4,
        width: int = 256,
        num_classes: int = 2,
        upsample: int = 4,
        prior_prob: Optional[float] = 0.01,
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.prior_prob = prior_prob
        self.lateral = nn.ModuleList(
            [LateralBranch(in_channels, width, i) for i in range(num_levels)]
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.learned_up = nn.ConvTranspose2d(
            num_classes, num_classes, kernel_size=upsample + 2, stride=upsample, padding=1
        )
        self.init_weights()

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        acc = None
        for branch, f in zip(self.lateral, feats):
            y = branch(f)
            if acc is not None and y.shape[-2:] != acc.shape[-2:]:
                y = F.interpolate(y, size=acc.shape[-2:], mode="bilinear", align_corners=False)
            acc = y if acc is None else acc + y
        z = self.classifier(acc)  # (B, C, H/4, W/4)
        coarse = F.interpolate(
            z, scale_factor=float(self.upsample), mode="bilinear", align_corners=False
        )
        fine = self.learned_up(z)
        return coarse + fine

    @torch.no_grad()
    def init_weights(self) -> None:
        """Convs: truncated normal std 0.02, zero bias; norms 1/0; transposed conv: zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                m.reset_parameters()
        if self.prior_prob is not None and self.classifier.out_channels > 1:
            self.classifier.bias[-1] = math.log(self.prior_prob / (1.0 - self.prior_prob))
        nn.init.zeros_(self.learned_up.weight)
        nn.init.zeros_(self.learned_up.bias)
