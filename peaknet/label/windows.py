"""Cut square windows around peak positions from a (P, H, W) detector stack, with their status.

Each peak (panel, ss, fs) gets the ``window`` x ``window`` pixels centred on its rounded
position, ``origin`` = (ss, fs) of the window's pixel (0, 0) in the module. Window coordinates
are pixel centres: the peak's input position is ``(ss - origin_ss, fs - origin_fs)``.

Pre-fit statuses (a peak gets the first that applies, in this order; the conditions are also
recorded as bits of ``flags``):

- ``edge``: the peak is outside its module, its rounded pixel lies less than ``edge_margin``
  pixels from its tile's edge, the window crosses the tile edge and ``edge_policy="reject"``,
  or the window has fewer than ``min_good_pixels`` good pixels (mostly masked: a gap).
  A *tile* is the module, or a ``tile_shape`` block of it (a CSPAD ASIC): windows never cross a
  tile edge. With ``edge_policy="shift"`` (default) a window that would cross it is shifted to
  lie inside the tile (flag ``SHIFTED``; the peak is off-centre and the fit is normal).
- ``nan_pixels``: non-finite pixels in the window (not masked) and ``nan_policy="reject"``;
  with ``"mask"`` they get weight zero.
- ``saturated``: pixels >= ``saturation`` (good ones) and ``saturated_policy="reject"``; with
  ``"mask"`` they get weight zero.
- ``overlap``: another peak's position lies inside the window (the extent of its pixels) and
  ``overlap_policy="reject"``.

Masked pixels (``mask`` False) always get weight zero in both solvers (flag ``MASKED``).
Everything else is ``ok`` (fit it). Nothing here raises for a bad peak: it gets a status.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Union

import numpy as np

from ..errors import DataError
from ..peaks import PeakList
from .config import LabelFitConfig


class Status(IntEnum):
    """Per-peak verdict (pre-fit ones from :func:`cut_windows`, the rest from the fit)."""

    OK = 0
    EDGE = 1
    SATURATED = 2
    NAN_PIXELS = 3
    OVERLAP = 4
    NOT_CONVERGED = 5
    REJECTED_REDCHI = 6
    BAD_AMPLITUDE = 7


STATUS_NAMES: tuple[str, ...] = tuple(s.name.lower() for s in Status)


class Flag(IntEnum):
    """Conditions seen in a window (bits of ``Windows.flags``), whatever the status."""

    SHIFTED = 1  # window shifted to stay inside its tile
    MASKED = 2  # some pixels masked (weight zero)
    NAN = 4  # non-finite pixels
    SATURATED = 8  # saturated pixels
    OVERLAP = 16  # another peak inside the window
    OUTSIDE = 32  # peak outside the module / tile margin


@dataclass
class Windows:
    """N windows cut from one stack.

    data (N, w, w) float64 (0 where not good); good (N, w, w) bool: pixels that enter the fit;
    panel (N,) int64; origin (N, 2) int64 (ss, fs) of pixel (0, 0) in the module; peak_yx (N, 2)
    float64 input peak position in window coordinates; status (N,) int8 (:class:`Status`);
    flags (N,) uint16 (:class:`Flag` bits); stack_shape: (P, H, W) of the source stack.
    """

    data: np.ndarray
    good: np.ndarray
    panel: np.ndarray
    origin: np.ndarray
    peak_yx: np.ndarray
    status: np.ndarray
    flags: np.ndarray
    stack_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def size(self) -> int:
        return int(self.data.shape[-1])

    def take(self, index) -> "Windows":
        """Windows selected by an index array or boolean mask."""
        return Windows(self.data[index], self.good[index], self.panel[index], self.origin[index],
                       self.peak_yx[index], self.status[index], self.flags[index], self.stack_shape)

    @classmethod
    def from_arrays(cls, data: np.ndarray, good: Optional[np.ndarray] = None) -> "Windows":
        """Windows not cut from a stack (synthetic tests, benchmarks): all status ``ok``."""
        data = np.asarray(data, dtype=np.float64)
        n, h, w = data.shape
        if h != w:
            raise DataError(None, "windows", f"windows must be square, got {h} x {w}")
        finite = np.isfinite(data)
        good = finite if good is None else (np.asarray(good, bool) & finite)
        return cls(np.where(good, data, 0.0), good, np.zeros(n, np.int64), np.zeros((n, 2), np.int64),
                   np.full((n, 2), (w - 1) / 2.0), np.zeros(n, np.int8), np.zeros(n, np.uint16),
                   (1, h, w))


PeaksLike = Union[PeakList, np.ndarray]


def _positions(peaks: PeaksLike) -> np.ndarray:
    if isinstance(peaks, PeakList):
        return peaks.positions()
    pos = np.asarray(peaks, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise DataError(None, "peaks", f"expected a PeakList or an (N, 3) array of (panel, ss, fs), "
                                       f"got shape {pos.shape}")
    return pos


def cut_windows(stack: np.ndarray, peaks: PeaksLike, mask: Optional[np.ndarray] = None,
                cfg: Optional[LabelFitConfig] = None) -> Windows:
    """Cut one window per peak from ``stack`` (P, H, W); ``mask`` (P, H, W) True = good pixel.

    ``peaks``: a :class:`~peaknet.peaks.PeakList` or an (N, 3) array of (panel, ss, fs), pixel
    centres at integers. Returns :class:`Windows` in the order of the peaks.
    """
    cfg = cfg or LabelFitConfig()
    stack = np.asarray(stack)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise DataError(None, "stack", f"expected a (P, H, W) stack, got shape {stack.shape}")
    P, H, W = stack.shape
    if mask is not None:
        if np.size(mask) != stack.size:
            raise DataError(None, "mask", f"mask has shape {np.shape(mask)}, the stack "
                                          f"{stack.shape}: they must match")
        mask = np.asarray(mask, dtype=bool).reshape(stack.shape)
    w = cfg.window
    half = w // 2
    th, tw = cfg.tile_shape if cfg.tile_shape is not None else (H, W)
    if H < w or W < w:
        raise DataError(None, "stack", f"modules of {H} x {W} are smaller than the window {w}")

    pos = _positions(peaks)
    n = pos.shape[0]
    status = np.zeros(n, np.int8)
    flags = np.zeros(n, np.uint16)
    finite_pos = np.all(np.isfinite(pos), axis=1)
    pnl = np.where(finite_pos, pos[:, 0], -1).astype(np.int64)
    ss = np.where(finite_pos, pos[:, 1], -1e9)
    fs = np.where(finite_pos, pos[:, 2], -1e9)
    ry = np.floor(ss + 0.5).astype(np.int64)
    rx = np.floor(fs + 0.5).astype(np.int64)
    inside = finite_pos & (pnl >= 0) & (pnl < P) & (ry >= 0) & (ry < H) & (rx >= 0) & (rx < W)

    # tiles: windows stay inside the tile holding the peak's pixel
    ty0 = np.where(inside, (ry // th) * th, 0)
    tx0 = np.where(inside, (rx // tw) * tw, 0)
    ty1 = np.minimum(ty0 + th, H)  # exclusive
    tx1 = np.minimum(tx0 + tw, W)
    m = cfg.edge_margin
    near = (ry - ty0 < m) | (ty1 - 1 - ry < m) | (rx - tx0 < m) | (tx1 - 1 - rx < m)
    small_tile = (ty1 - ty0 < w) | (tx1 - tx0 < w)
    y0 = ry - half
    x0 = rx - half
    crosses = (y0 < ty0) | (y0 + w > ty1) | (x0 < tx0) | (x0 + w > tx1)
    y0 = np.clip(y0, ty0, np.maximum(ty1 - w, ty0))
    x0 = np.clip(x0, tx0, np.maximum(tx1 - w, tx0))
    edge = ~inside | near | small_tile | (crosses & (cfg.edge_policy == "reject"))
    flags |= np.where(crosses & inside, Flag.SHIFTED, 0).astype(np.uint16)
    flags |= np.where(~inside | near, Flag.OUTSIDE, 0).astype(np.uint16)

    # gather (N, w, w) windows; out-of-range peaks read a dummy window (they are 'edge')
    y0 = np.where(inside, np.clip(y0, 0, H - w), 0)
    x0 = np.where(inside, np.clip(x0, 0, W - w), 0)
    pidx = np.where(inside, pnl, 0)
    ar = np.arange(w)
    iy = y0[:, None, None] + ar[None, :, None]
    ix = x0[:, None, None] + ar[None, None, :]
    data = stack[pidx[:, None, None], iy, ix].astype(np.float64)
    good = np.ones_like(data, dtype=bool) if mask is None else mask[pidx[:, None, None], iy, ix]
    masked_any = ~good.all(axis=(1, 2))
    finite = np.isfinite(data)
    nonfinite = (~finite & good).any(axis=(1, 2))
    good &= finite
    if cfg.saturation is not None:
        with np.errstate(invalid="ignore"):
            sat_pix = good & (data >= cfg.saturation)
    else:
        sat_pix = np.zeros_like(good)
    saturated = sat_pix.any(axis=(1, 2))
    if cfg.saturated_policy == "mask":
        good &= ~sat_pix
    flags |= np.where(masked_any, Flag.MASKED, 0).astype(np.uint16)
    flags |= np.where(nonfinite, Flag.NAN, 0).astype(np.uint16)
    flags |= np.where(saturated, Flag.SATURATED, 0).astype(np.uint16)
    too_few = good.sum(axis=(1, 2)) < cfg.min_good_pixels
    edge |= too_few

    # overlap: another peak's position inside this window's pixel extent (same panel)
    overlap = np.zeros(n, bool)
    valid = np.flatnonzero(inside)
    if valid.size > 1:
        for p in np.unique(pnl[valid]):
            idx = valid[pnl[valid] == p]
            if idx.size < 2:
                continue
            oy = ss[idx][None, :] - y0[idx][:, None]
            ox = fs[idx][None, :] - x0[idx][:, None]
            hit = (oy >= -0.5) & (oy < w - 0.5) & (ox >= -0.5) & (ox < w - 0.5)
            np.fill_diagonal(hit, False)
            overlap[idx] = hit.any(axis=1)
    flags |= np.where(overlap, Flag.OVERLAP, 0).astype(np.uint16)

    status[:] = Status.OK
    status[overlap & (cfg.overlap_policy == "reject")] = Status.OVERLAP
    status[saturated & (cfg.saturated_policy == "reject")] = Status.SATURATED
    status[nonfinite & (cfg.nan_policy == "reject")] = Status.NAN_PIXELS
    status[edge] = Status.EDGE

    data = np.where(good, data, 0.0)
    peak_yx = np.stack([ss - y0, fs - x0], axis=1)
    peak_yx[~inside] = np.nan
    origin = np.stack([y0, x0], axis=1).astype(np.int64)
    return Windows(data, good, pnl, origin, peak_yx, status, flags, (P, H, W))
