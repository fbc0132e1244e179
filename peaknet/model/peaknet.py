"""PeakNet: swappable CNN backbone -> BiFPN -> dual-pathway segmentation head.

Wang, Mariani, Poitevin, Avaylon & Thayer 2025, "End-to-end deep learning pipeline for real-time
Bragg peak segmentation: from training to large-scale deployment", Front. High Perform. Comput.
3:1536471, section 2.2.1. Backbone: ConvNeXtV2 (Woo et al. 2023) through timm; BiFPN: Tan et al.
2020 with LayerNorm; head: :mod:`peaknet.model.head`.

This file imports nothing distributed (torchtitan habit): FSDP and activation checkpointing are
applied elsewhere through :meth:`PeakNet.fsdp_units` and :meth:`PeakNet.activation_checkpoint_units`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone
from .bifpn import BiFPN
from .head import SegmentationHead


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dims of ``x`` at the bottom/right up to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), value=value)


class PeakNet(nn.Module):
    """Bragg-peak segmentation network.

    Parameters
    ----------
    backbone:
        timm model name with ``features_only`` support and levels at strides 4/8/16/32
        (``"convnextv2_huge"`` for the teacher, ``"convnextv2_atto"``/``"convnextv2_tiny"`` for
        students; any other such timm model works).
    bifpn_width, bifpn_blocks:
        Width and number of stacked BiFPN blocks.
    head_width:
        Channels of the head's lateral branches.
    num_classes:
        Output classes (2: background = 0, peak = 1).
    in_chans:
        Input channels (1).
    drop_path_rate:
        Backbone stochastic depth.
    bifpn_kernel:
        Depthwise kernel of the BiFPN convs (3).
    prior_prob:
        Initial peak probability (see :class:`~peaknet.model.head.SegmentationHead`).

    ``forward(x)``: x (B, in_chans, H, W) float (z-scored, see :mod:`peaknet.model.preprocess`)
    -> logits (B, num_classes, H, W) in x's dtype (or the autocast dtype). Any H, W >= 1 work:
    the input is zero-padded at the bottom/right to a multiple of 32 (zero is neutral after the
    z-score) and the logits are cropped back.
    """

    def __init__(
        self,
        backbone: str = "convnextv2_atto",
        bifpn_width: int = 64,
        bifpn_blocks: int = 1,
        head_width: int = 64,
        num_classes: int = 2,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        bifpn_kernel: int = 3,
        prior_prob: Optional[float] = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = Backbone(backbone, in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.size_divisor = max(self.backbone.strides)
        self.bifpn = BiFPN(
            self.backbone.channels, width=bifpn_width, num_blocks=bifpn_blocks,
            kernel_size=bifpn_kernel,
        )
        self.head = SegmentationHead(
            bifpn_width, num_levels=len(self.backbone.channels), width=head_width,
            num_classes=num_classes, upsample=min(self.backbone.strides), prior_prob=prior_prob,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PeakNet expects (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.size_divisor)
        feats = self.backbone(x)
        feats = self.bifpn(feats)
        logits = self.head(feats)
        return logits[..., :h, :w]

    # -- units for the distributed layer ------------------------------------------------------
    def fsdp_units(self) -> list[nn.Module]:
        """Submodules to shard individually (FSDP2 ``fully_shard`` each, then the root): every
        backbone stage and every BiFPN block, finest/first first. The stem, the BiFPN input
        projections and the head stay with the root unit."""
        return [*self.backbone.stages(), *self.bifpn.blocks]

    def activation_checkpoint_units(self) -> list[nn.Module]:
        """Submodules to wrap for activation checkpointing: every backbone block (each ConvNeXt
        block; 36 for convnextv2_huge) and every BiFPN block. Each takes and returns tensors
        (BiFPN blocks: a list of tensors)."""
        return [*self.backbone.blocks(), *self.bifpn.blocks]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise all parameters in place (for models materialised with ``to_empty()``
        after construction on the meta device). Construction already initialises them."""
        self.backbone.init_weights()
        self.bifpn.init_weights()
        self.head.init_weights()

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: backbone, bifpn_proj (input 1x1 projections), bifpn_blocks, head,
        total. Works on the meta device."""

        def n(mod: nn.Module) -> int:
            return sum(p.numel() for p in mod.parameters())

        out = {
            "backbone": n(self.backbone),
            "bifpn_proj": n(self.bifpn.proj),
            "bifpn_blocks": n(self.bifpn.blocks),
            "head": n(self.head),
        }
        out["total"] = n(self)
        return out
