"""Model input preparation: per-image z-score over good pixels, pad-and-crop, per-panel batches.

Two input layouts (the paper trains on assembled images; the authors' deployment ran per panel):

- **assembled images**: the caller assembles a frame with the geometry
  (``peaknet.io.geometry``: ``geom.assemble(stack)`` -> image + index maps) and passes the image
  (B, H, W) and its good-pixel mask; :func:`prepare_images` z-scores each image over its good
  pixels, sets bad pixels to 0, and pads/crops to a fixed square (1920 by default, centred),
  returning a :class:`PadCrop` that maps coordinates and output maps back.
- **panel stacks**: (P, H, W) or (B, P, H, W) module stacks; :func:`prepare_panels` z-scores (per
  frame or per panel), zeroes bad pixels, pads each panel at the bottom/right to a multiple of 32
  and returns a (B*P, 1, H', W') batch plus a :class:`PanelBatch` to undo it. The crop index
  within a frame is the module (panel) index.

All functions take numpy arrays or torch tensors and return torch tensors on ``device`` (default:
the input tensor's device, CPU for numpy) in float32; everything is batched (no per-image Python
loops) and runs on GPU. Masks follow CrystFEL: True/1 = good pixel. Non-finite pixels are
treated as bad.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]
DEFAULT_SIZE = 1920


def _as_tensor(x: ArrayLike, device=None, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    if dtype is not None:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def _as_mask(mask: Optional[ArrayLike], like: torch.Tensor) -> torch.Tensor:
    good = torch.isfinite(like)
    if mask is not None:
        m = _as_tensor(mask, device=like.device, dtype=None)
        good = good & m.to(torch.bool).expand_as(like)
    return good


def zscore(
    x: ArrayLike,
    mask: Optional[ArrayLike] = None,
    eps: float = 1e-6,
    ndim: int = 2,
    device=None,
) -> torch.Tensor:
    """Per-image z-score over good pixels; bad pixels become 0.

    Parameters
    ----------
    x:
        (..., *image) array; the last ``ndim`` dims form one image (2 for an image or panel,
        3 for a whole (P, H, W) stack normalised as one frame). Any real dtype (ADU).
    mask:
        Broadcastable to ``x``; True/1 = good. Non-finite pixels of ``x`` are bad regardless.
    eps:
        Added to the standard deviation: ``(x - mean) / (std + eps)``.
    ndim:
        Number of trailing dims that make one image.

    Returns float32 (same shape as x): ``(x - mean) / (std + eps)`` on good pixels, 0 on bad ones
    (0 is the image mean after the z-score, i.e. neutral). Mean and population std are over the
    good pixels of each image (two-pass, in float32; an image without good pixels becomes all 0).
    """
    t = _as_tensor(x, device=device)
    good = _as_mask(mask, t)
    dims = tuple(range(t.dim() - ndim, t.dim()))
    g = good.to(t.dtype)
    n = g.sum(dim=dims, keepdim=True).clamp_min(1.0)
    t0 = torch.where(good, t, torch.zeros_like(t))
    mean = t0.sum(dim=dims, keepdim=True) / n
    dev = torch.where(good, t - mean, torch.zeros_like(t))
    std = (dev.square().sum(dim=dims, keepdim=True) / n).sqrt()
    return dev / (std + eps)


@dataclass(frozen=True)
class PadCrop:
    """How an (H, W) image was placed in an (Sh, Sw) canvas: ``out[i + oy, j + ox] = in[i, j]``.

    ``offset`` = (oy, ox) is positive when the image was padded (placed inside the canvas) and
    negative when it was cropped (the canvas shows a window of the image). Pixel-centre
    coordinates convert with :meth:`to_input` / :meth:`to_output`.
    """

    in_shape: tuple[int, int]
    out_shape: tuple[int, int]
    offset: tuple[int, int]

    def to_input(self, ss, fs):
        """Canvas (output) coordinates -> original image coordinates (arrays or scalars)."""
        return ss - self.offset[0], fs - self.offset[1]

    def to_output(self, ss, fs):
        """Original image coordinates -> canvas coordinates."""
        return ss + self.offset[0], fs + self.offset[1]

    def apply(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(..., H, W) -> (..., Sh, Sw): pad with ``fill`` / crop, centred as recorded."""
        return _place(x, self.out_shape, self.offset, fill)

    def restore(self, y: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(..., Sh, Sw) canvas map (e.g. logits) -> (..., H, W) on the original image; pixels
        that were cropped away get ``fill`` (0 logits: argmax picks class 0, background)."""
        return _place(y, self.in_shape, (-self.offset[0], -self.offset[1]), fill)


def _place(x: torch.Tensor, shape: Sequence[int], offset: Sequence[int], fill: float) -> torch.Tensor:
    """Return a (..., shape) tensor with out[i + oy, j + ox] = x[i, j] where both exist."""
    h, w = x.shape[-2:]
    sh, sw = int(shape[0]), int(shape[1])
    oy, ox = int(offset[0]), int(offset[1])
    pad = (ox, sw - w - ox, oy, sh - h - oy)  # negative amounts crop
    return F.pad(x, pad, mode="constant", value=fill)


def _centre(s: int, n: int) -> int:
    d = s - n
    return d // 2 if d >= 0 else -((-d) // 2)


def pad_crop(
    x: ArrayLike, size: Union[int, Sequence[int]] = DEFAULT_SIZE, fill: float = 0.0, device=None
) -> tuple[torch.Tensor, PadCrop]:
    """Centre-pad and/or centre-crop the last two dims of ``x`` to ``size`` (int or (Sh, Sw)).

    Returns the float32 tensor (..., Sh, Sw) and the :class:`PadCrop` that undoes it. The offset is
    ``(S - H) / 2`` rounded toward zero per axis: centred to within a pixel, the odd pixel of
    padding or cropping going to the bottom/right.
    """
    t = _as_tensor(x, device=device)
    sh, sw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = t.shape[-2:]
    info = PadCrop((int(h), int(w)), (sh, sw), (_centre(sh, h), _centre(sw, w)))
    return info.apply(t, fill), info


def prepare_images(
    images: ArrayLike,
    mask: Optional[ArrayLike] = None,
    size: Optional[Union[int, Sequence[int]]] = DEFAULT_SIZE,
    eps: float = 1e-6,
    device=None,
) -> tuple[torch.Tensor, PadCrop]:
    """Assembled images -> model input.

    Parameters
    ----------
    images:
        (H, W) or (B, H, W) assembled frames (ADU; gaps between modules may be anything when
        masked out).
    mask:
        Broadcastable to images: True/1 = good (assembled mask; gaps are bad).
    size:
        Canvas size (1920, the paper's); ``None`` keeps the image size.
    eps:
        z-score epsilon.
    device:
        Target device (default: the input's).

    Returns (B, 1, Sh, Sw) float32 (z-scored over good pixels, bad pixels and padding 0) and the
    :class:`PadCrop` shared by the batch: ``info.restore(logits)`` gives logits (B, C, H, W) on the
    original image, and ``info.to_input(ss, fs)`` maps canvas coordinates back.
    """
    t = _as_tensor(images, device=device)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"images must be (H, W) or (B, H, W), got {tuple(t.shape)}")
    z = zscore(t, mask, eps=eps, ndim=2)
    if size is None:
        size = tuple(z.shape[-2:])
    out, info = pad_crop(z, size)
    return out.unsqueeze(1), info


@dataclass(frozen=True)
class PanelBatch:
    """How a (B, P, H, W) stack became a (B*P, 1, H', W') batch (bottom/right padding only)."""

    batch: int
    panels: int
    in_shape: tuple[int, int]
    out_shape: tuple[int, int]
    squeezed: bool  # the input was a single (P, H, W) stack

    def split(self, y: torch.Tensor) -> torch.Tensor:
        """Model output (B*P, C, H', W') -> (B, P, C, H, W) (or (P, C, H, W) if the input was a
        single stack): reshaped and cropped back to the panel size."""
        h, w = self.in_shape
        y = y[..., :h, :w]
        y = y.reshape(self.batch, self.panels, *y.shape[1:])
        return y[0] if self.squeezed else y


def prepare_panels(
    stack: ArrayLike,
    mask: Optional[ArrayLike] = None,
    multiple: int = 32,
    norm: Literal["frame", "panel"] = "frame",
    eps: float = 1e-6,
    device=None,
) -> tuple[torch.Tensor, PanelBatch]:
    """Panel stacks -> a batch of per-panel crops.

    Parameters
    ----------
    stack:
        (P, H, W) one frame's modules or (B, P, H, W) several frames (ADU).
    mask:
        Broadcastable to stack; True/1 = good.
    multiple:
        Each panel is zero-padded at the bottom/right to a multiple of this (32: the model's
        largest stride; the model would pad anyway, this keeps the batch rectangular and exact).
    norm:
        ``"frame"``: one mean/std per frame over the good pixels of all its panels (the model was
        pre-trained on per-image statistics); ``"panel"``: one per panel.
    eps:
        z-score epsilon.
    device:
        Target device.

    Returns (B*P, 1, H', W') float32 and a :class:`PanelBatch`; crop ``k`` of frame ``b`` is row
    ``b*P + k`` and its panel (module) index is ``k``.
    """
    t = _as_tensor(stack, device=device)
    squeezed = t.dim() == 3
    if squeezed:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"stack must be (P, H, W) or (B, P, H, W), got {tuple(t.shape)}")
    b, p, h, w = t.shape
    if mask is not None:
        m = _as_tensor(mask, device=t.device, dtype=None)
        if squeezed and m.dim() == 3:
            m = m.unsqueeze(0)
    else:
        m = None
    z = zscore(t, m, eps=eps, ndim=3 if norm == "frame" else 2)
    ph, pw = (-h) % multiple, (-w) % multiple
    z = F.pad(z, (0, pw, 0, ph))
    info = PanelBatch(int(b), int(p), (int(h), int(w)), (int(h + ph), int(w + pw)), squeezed)
    return z.reshape(b * p, 1, h + ph, w + pw), info
