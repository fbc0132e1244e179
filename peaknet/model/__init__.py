"""PeakNet model: backbone (timm) -> BiFPN -> dual-pathway head, presets, losses, pre/post-processing.

Typical use::

    from peaknet.model import build_model, prepare_images, decode_peaks

    model = build_model("small-cpu").eval()
    x, info = prepare_images(image, mask, size=1920)        # (1, 1, 1920, 1920)
    logits = info.restore(model(x))                          # (1, 2, H, W) on the image
    peaks = decode_peaks(logits, image[None], mask)[0]       # PeakList

Nothing here imports torch.distributed: FSDP / activation checkpointing use
``model.fsdp_units()`` and ``model.activation_checkpoint_units()`` from the training layer.
timm is imported lazily (through :func:`peaknet.compat.import_timm`) when a model is built.
"""
from .backbone import Backbone, backbone_channels
from .bifpn import BiFPN, BiFPNBlock, LayerNorm2d
from .decode import decode_peaks, label_components, measure_components, segment
from .head import SegmentationHead
from .losses import (
    DistillationLoss,
    DistillationParts,
    FocalLoss,
    distillation_loss,
    focal_loss,
    kd_kl_loss,
    kd_mse_loss,
)
from .peaknet import PeakNet, pad_to_multiple
from .preprocess import PadCrop, PanelBatch, pad_crop, prepare_images, prepare_panels, zscore
from .presets import PresetSpec, build_model, get_preset, list_presets, register_preset

__all__ = [
    "Backbone", "backbone_channels", "BiFPN", "BiFPNBlock", "LayerNorm2d", "SegmentationHead",
    "PeakNet", "pad_to_multiple", "PresetSpec", "build_model", "get_preset", "list_presets",
    "register_preset", "focal_loss", "FocalLoss", "distillation_loss", "DistillationLoss",
    "DistillationParts", "kd_kl_loss", "kd_mse_loss", "zscore", "pad_crop", "PadCrop",
    "prepare_images", "prepare_panels", "PanelBatch", "segment", "label_components",
    "measure_components", "decode_peaks",
]
