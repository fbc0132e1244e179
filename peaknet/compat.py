"""Make ``import timm`` work where torchvision's compiled ops do not match torch.

timm imports torchvision unconditionally. On machines where the only torchvision wheel is a
CUDA build that does not match the installed CPU torch, ``import torchvision`` fails with
``RuntimeError: operator torchvision::nms does not exist``. Defining the schemas of the two
operators torchvision registers at import time lets it import; peaknet never calls them.
Where a matching torchvision is installed the operators exist and this is a no-op.
"""
from __future__ import annotations

_done = False
_lib = None  # keep the Library alive: its definitions vanish when it is garbage collected


def ensure_timm_importable() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas if missing, so ``import timm`` succeeds."""
    global _done, _lib
    if _done:
        return
    import torch

    if not hasattr(torch.ops.torchvision, "nms"):
        try:
            torch.ops.torchvision.nms  # noqa: B018 - raises when missing
        except (AttributeError, RuntimeError):
            _lib = torch.library.Library("torchvision", "DEF")
            _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _lib.define(
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            )
    _done = True


def import_timm():
    """Return the ``timm`` module, applying :func:`ensure_timm_importable` first."""
    ensure_timm_importable()
    import timm

    return timm
