"""Multi-scale CNN backbone for PeakNet: any timm model with ``features_only=True``.

The paper (Wang et al. 2025, section 2.2.1) uses ConvNeXtV2 (Woo et al. 2023, "ConvNeXt V2:
Co-designing and Scaling ConvNets with Masked Autoencoders") as a *swappable* backbone. Here the
backbone is whatever timm model name is given, built with ``features_only=True``, ``in_chans=1``
and ``pretrained=False``; the four feature levels at strides 4, 8, 16 and 32 are kept (timm models
that also expose a stride-2 level, e.g. ResNets, have it dropped). Channel widths come from
``feature_info.channels()`` and are never hard-coded.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from peaknet.compat import import_timm

#: The strides the BiFPN and the head expect, finest first.
STRIDES: tuple[int, ...] = (4, 8, 16, 32)


def _create(name: str, **kwargs) -> nn.Module:
    timm = import_timm()
    return timm.create_model(name, pretrained=False, features_only=True, **kwargs)


class Backbone(nn.Module):
    """A timm ``features_only`` model returning the levels at strides 4, 8, 16, 32.

    Parameters
    ----------
    name:
        A timm model name, e.g. ``"convnextv2_atto"`` or ``"convnextv2_huge"``.
    in_chans:
        Input channels (1 for detector images).
    drop_path_rate:
        Stochastic depth rate passed to timm (0 disables it).
    strides:
        The feature strides to keep, finest first (default 4, 8, 16, 32).
    **timm_kwargs:
        Further keyword arguments for ``timm.create_model``.

    Attributes
    ----------
    channels: list[int]
        Channels of each returned level (from ``feature_info.channels()``).
    strides: list[int]
        Reduction (stride) of each returned level.

    ``forward(x)``: x (B, in_chans, H, W) float -> list of (B, channels[i], H/strides[i],
    W/strides[i]) tensors, finest first. H and W must be multiples of ``max(strides)`` for the
    sizes to be exact (:class:`peaknet.model.peaknet.PeakNet` pads to ensure it).
    """

    def __init__(
        self,
        name: str = "convnextv2_atto",
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        strides: Sequence[int] = STRIDES,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        kwargs = dict(in_chans=in_chans, **timm_kwargs)
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        # Probe the feature levels on the meta device (no memory, no compute), then build the
        # real model with only the levels we need.
        with torch.device("meta"):
            probe = _create(name, **kwargs)
        reductions = list(probe.feature_info.reduction())
        want = list(strides)
        out_indices = []
        for s in want:
            if s not in reductions:
                raise ValueError(
                    f"timm model {name!r} has feature strides {reductions}; "
                    f"PeakNet needs {want}"
                )
            out_indices.append(reductions.index(s))
        default_indices = list(range(len(reductions)))
        if out_indices != default_indices:
            # timm's out_indices index the model's own feature list (same order as the probe's).
            probe_idx = list(probe.feature_info.out_indices)
            kwargs["out_indices"] = tuple(probe_idx[i] for i in out_indices)
        del probe
        self.body = _create(name, **kwargs)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        if self.strides != want:
            raise ValueError(f"timm model {name!r} gave strides {self.strides}, expected {want}")
        self._stage_names: list[str] = list(self.body.feature_info.module_name())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        return list(feats)

    # -- units for the distributed layer (FSDP / activation checkpointing live elsewhere) -----
    def stages(self) -> list[nn.Module]:
        """The modules that produce each returned level (e.g. ConvNeXt ``stages.i``)."""
        out = []
        children = dict(self.body.named_children())
        for name in self._stage_names:
            flat = name.replace(".", "_")
            if flat in children:
                out.append(children[flat])
            else:
                out.append(self.body.get_submodule(name))
        return out

    def blocks(self) -> list[nn.Module]:
        """Finest natural units for activation checkpointing: each stage's blocks when the stage
        has a ``blocks`` container (ConvNeXt), else the stage itself."""
        out: list[nn.Module] = []
        for stage in self.stages():
            blocks = getattr(stage, "blocks", None)
            if isinstance(blocks, nn.Sequential) and len(blocks) > 0:
                out.extend(blocks.children())
            elif isinstance(stage, nn.Sequential) and len(stage) > 1:
                out.extend(stage.children())  # e.g. ResNet layerN of BasicBlocks
            else:
                out.append(stage)
        return out

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter in place, e.g. after ``to_empty()`` from the meta
        device. ConvNeXt models get timm's ConvNeXt init (conv/linear truncated normal std 0.02,
        zero bias; GRN gamma/beta zero); other modules use their ``reset_parameters``."""
        import_timm()  # makes timm importable here
        from timm.models import convnext as _cnx

        for m in self.body.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            # timm's GlobalResponseNorm has no reset_parameters: it starts at zero.
            if type(m).__name__ == "GlobalResponseNorm":
                m.weight.zero_()
                m.bias.zero_()
        if self.name.startswith("convnext"):
            for n, m in self.body.named_modules():
                _cnx._init_weights(m, n)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}"


def backbone_channels(name: str, in_chans: int = 1) -> list[int]:
    """Channels of the stride 4/8/16/32 levels of timm model ``name`` (built on meta)."""
    with torch.device("meta"):
        return Backbone(name, in_chans=in_chans).channels
