"""Figures that compare simulated frames with real ones (the realism check).

Used by ``tests/test_simulate_realism.py`` and for tuning ``thermolysin_cspad_config``.

The same estimators run on real and simulated frames, so the comparison is like for like:

- :func:`radial_profile`: median pixel value (ADU) in rings of scattering angle, per frame;
- :func:`spot_moments`: background-subtracted second moments (sigma along ss / fs, pixels)
  and peak / integrated values of listed spots (e.g. DIALS-indexed spots, or simulated truth);
- :func:`count_bright_spots`: connected groups of pixels above a radial ``median + k·MAD``
  threshold with at least ``min_pix`` pixels (a crude, parameter-light spot counter).

:func:`read_cspad_cbf` reads the LCLS/cctbx CSPAD CBF files of the thermolysin test data
(``shared/data/real/thermolysin_cspad``) with :func:`peaknet.io.cbf.read_cbf`: data as
(32, 185, 388) int32 ADU, the lab position of every pixel centre (metres; z along the beam)
and the wavelength. :func:`dials_spots` maps DIALS' ASIC coordinates to the stack.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "CbfFrame",
    "read_cspad_cbf",
    "dials_spots",
    "radial_profile",
    "spot_moments",
    "count_bright_spots",
    "find_bright_spots",
    "two_theta_map",
]


@dataclass
class CbfFrame:
    """One CSPAD CBF frame.

    data: (32, 185, 388) int32 ADU (values <= -400 are the file's "undefined" pixels);
    positions: (32, 185, 388, 3) float64 pixel centres in metres, lab frame with z along the
    beam (detector at z > 0); wavelength_A: Å.
    """

    data: np.ndarray
    positions: np.ndarray
    wavelength_A: float

    @property
    def valid(self) -> np.ndarray:
        return self.data > -400


def read_cspad_cbf(path: str | os.PathLike) -> CbfFrame:
    """Read a multi-panel CSPAD CBF (cctbx ``xtc_process`` layout) with its metrology, through
    :func:`peaknet.io.cbf.read_cbf` (pycbf)."""
    from peaknet.io.cbf import read_cbf

    f = read_cbf(path)
    return CbfFrame(data=np.asarray(f.stack), positions=f.geometry.pixel_positions(), wavelength_A=float(f.wavelength_A))


def dials_spots(csv_path: str | os.PathLike, image: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(module, ss, fs) stack coordinates of the DIALS-indexed spots of ``image`` (file name)
    listed in ``dials_indexed_spots.csv`` (columns image, panel64, fs_px, ss_px, h, k, l)."""
    import csv

    from peaknet.io.cbf import cbf_asic_to_stack

    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if os.path.basename(r["image"]) == os.path.basename(image)]
    p64 = np.array([int(r["panel64"]) for r in rows], np.int64)
    fs = np.array([float(r["fs_px"]) for r in rows])
    ss = np.array([float(r["ss_px"]) for r in rows])
    return cbf_asic_to_stack(p64, fs, ss)


def two_theta_map(positions: np.ndarray) -> np.ndarray:
    """Scattering angle 2θ (radians) of every pixel from its lab position (beam along +z)."""
    r = np.hypot(positions[..., 0], positions[..., 1])
    return np.arctan2(r, positions[..., 2])


def radial_profile(
    frame: np.ndarray,
    resolution_inv_A: np.ndarray,
    edges: np.ndarray,
    valid: Optional[np.ndarray] = None,
    stat: str = "median",
) -> np.ndarray:
    """Median (or mean) pixel value in bins of 1/d (1/Å) given by ``edges``; NaN where empty."""
    v = frame.ravel().astype(np.float64)
    s = resolution_inv_A.ravel()
    ok = np.ones(v.shape, bool) if valid is None else valid.ravel()
    out = np.full(len(edges) - 1, np.nan)
    idx = np.digitize(s, edges) - 1
    for b in range(len(edges) - 1):
        sel = ok & (idx == b)
        if sel.sum() >= 50:
            out[b] = np.median(v[sel]) if stat == "median" else v[sel].mean()
    return out


def spot_moments(
    frame: np.ndarray,
    panel: np.ndarray,
    ss: np.ndarray,
    fs: np.ndarray,
    half: int = 3,
    ring: int = 5,
    valid: Optional[np.ndarray] = None,
) -> dict:
    """Second moments of spots around the given positions.

    For each spot: a (2*ring+1)² window around the rounded position; background = median of the
    window's border; signal = the central (2*half+1)² box minus background, clipped at 0;
    centroid and sigma_ss / sigma_fs (pixels) from the clipped signal's second moments;
    ``peak`` = maximum background-subtracted pixel, ``total`` = sum of the clipped box.
    Spots whose window leaves the module or touches an invalid pixel are skipped.
    Returns dict of arrays: sigma_ss, sigma_fs, peak, total, background.
    """
    P, H, W = frame.shape
    res = {k: [] for k in ("sigma_ss", "sigma_fs", "peak", "total", "background")}
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    for p, y, x in zip(np.asarray(panel), np.asarray(ss), np.asarray(fs)):
        i, j, p = int(round(float(y))), int(round(float(x))), int(p)
        if i - ring < 0 or j - ring < 0 or i + ring >= H or j + ring >= W:
            continue
        win = frame[p, i - ring : i + ring + 1, j - ring : j + ring + 1].astype(np.float64)
        if valid is not None and not valid[p, i - ring : i + ring + 1, j - ring : j + ring + 1].all():
            continue
        border = np.concatenate([win[0], win[-1], win[1:-1, 0], win[1:-1, -1]])
        bg = float(np.median(border))
        core = win[ring - half : ring + half + 1, ring - half : ring + half + 1] - bg
        c = np.clip(core, 0, None)
        tot = c.sum()
        if tot <= 0:
            continue
        cy, cx = (c * yy).sum() / tot, (c * xx).sum() / tot
        res["sigma_ss"].append(math.sqrt((c * (yy - cy) ** 2).sum() / tot))
        res["sigma_fs"].append(math.sqrt((c * (xx - cx) ** 2).sum() / tot))
        res["peak"].append(core.max())
        res["total"].append(tot)
        res["background"].append(bg)
    return {k: np.asarray(v) for k, v in res.items()}


def find_bright_spots(
    frame: np.ndarray,
    resolution_inv_A: np.ndarray,
    valid: Optional[np.ndarray] = None,
    k: float = 8.0,
    min_pix: int = 2,
    nbins: int = 60,
    min_adu: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright spots: 8-connected groups of >= ``min_pix`` pixels above a radial threshold
    ``median + k * 1.4826 * MAD`` (per 1/d bin, bins of equal pixel count) and above
    ``min_adu``, found per module. Returns (panel, ss, fs) of their intensity-weighted
    centroids (pixel-centre coordinates)."""
    from scipy import ndimage

    valid = np.ones(frame.shape, bool) if valid is None else valid
    s = resolution_inv_A
    edges = np.quantile(s[valid], np.linspace(0, 1, nbins + 1))
    idx = np.clip(np.digitize(s, edges) - 1, 0, nbins - 1)
    thr = np.full(nbins, np.inf)
    v = frame.astype(np.float64)
    for b in range(nbins):
        sel = valid & (idx == b)
        if sel.sum() < 100:
            continue
        x = v[sel]
        med = np.median(x)
        mad = np.median(np.abs(x - med)) * 1.4826
        thr[b] = max(med + k * max(mad, 1e-6), min_adu)
    above = valid & (v > thr[idx])
    st = np.ones((3, 3), bool)
    panels, sss, fss = [], [], []
    for p in range(frame.shape[0]):
        lab, nl = ndimage.label(above[p], structure=st)
        if nl == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=nl + 1)[1:]
        keep = np.flatnonzero(sizes >= min_pix) + 1
        if keep.size == 0:
            continue
        w = np.clip(v[p], 0, None)
        cen = ndimage.center_of_mass(w, lab, keep)
        for c in cen:
            panels.append(p)
            sss.append(c[0])
            fss.append(c[1])
    return np.asarray(panels, np.int64), np.asarray(sss), np.asarray(fss)


def count_bright_spots(*args, **kwargs) -> int:
    """Number of spots :func:`find_bright_spots` finds (same arguments)."""
    return int(find_bright_spots(*args, **kwargs)[0].size)
