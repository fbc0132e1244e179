"""From peak positions to segmentation labels: cut windows, fit, judge, paint.

``label_peaks(stack, peaks, mask, cfg)`` runs the whole chain for one frame:

1. :func:`~peaknet.label.windows.cut_windows`: one window per peak, pre-fit status;
2. :func:`fit_windows`: the configured solver on the windows whose status is ``ok``;
3. :func:`assign_status`: ``not_converged`` (solver did not converge or returned non-finite
   values), ``bad_amplitude`` (A <= ``min_amplitude`` or A > ``max_amplitude_ratio`` x the
   window's data range), ``rejected_redchi`` (redchi > ``redchi_max``), in that order;
4. :func:`render_labels`: for each ``ok`` peak, the fitted profile without background
   ``A [eta L + (1 - eta) G]`` on its window's pixels, thresholded at ``label_threshold`` x its
   maximum over those pixels, is painted into a (P, H, W) label mask. Peaks with any other
   status are *removed* from the label (as the paper says; the authors' code kept them). Their
   windows are returned as an ``ignore`` mask (minus labelled pixels) so that a training loss
   may skip them rather than learn them as background.

The per-peak table (:func:`peak_table`) holds the fitted parameters in module coordinates,
redchi, nfev, the status (code and name) and the flags.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ..peaks import PeakList
from .config import LabelFitConfig
from .pvoigt import IDX, PARAM_NAMES, WindowFits, profile, window_grid
from .windows import STATUS_NAMES, PeaksLike, Status, Windows, cut_windows

log = logging.getLogger("peaknet.label")


def geometry_adu_per_photon(geometry, n_modules: Optional[int] = None) -> Optional[np.ndarray]:
    """ADU per photon of each stack module (P,) from a geometry's panels: ``adu_per_photon``,
    else ``adu_per_eV`` x ``geometry.photon_energy_eV``; the median of a module's panels;
    modules without a gain get the median of the others. None if no panel has a gain."""
    if geometry is None:
        return None
    energy = getattr(geometry, "photon_energy_eV", None)
    per_panel = []
    for p in geometry.panels:
        g = p.adu_per_photon
        if g is None and p.adu_per_eV is not None and energy:
            g = p.adu_per_eV * energy
        per_panel.append(np.nan if g is None or not g > 0 else float(g))
    per_panel = np.asarray(per_panel, dtype=np.float64)
    if not np.isfinite(per_panel).any():
        return None
    try:
        groups = geometry.module_panels
    except Exception:  # noqa: BLE001 - a geometry without a stack layout: one module
        groups = [list(range(len(per_panel)))]
    out = np.array([np.nanmedian(per_panel[idx]) if np.isfinite(per_panel[idx]).any() else np.nan
                    for idx in groups])
    out[~np.isfinite(out)] = np.nanmedian(out)
    if n_modules is not None and len(out) != n_modules:
        if np.allclose(out, out[0]):
            return np.full(n_modules, out[0])
        return None
    return out


def resolve_adu_per_photon(cfg: Optional[LabelFitConfig] = None, geometry=None,
                           n_modules: Optional[int] = None) -> tuple[Union[float, np.ndarray], str]:
    """The gain the fits use: ``(gain, source)``, gain a number or a (P,) array per module.

    ``cfg.adu_per_photon`` a number: that number ("config"). "auto": from ``geometry``
    (:func:`geometry_adu_per_photon`, "geometry"), else 1.0 ("default: no gain known", logged
    as a warning: the reduced chi-square is then in ADU and ``redchi_max`` means less).
    """
    cfg = cfg or LabelFitConfig()
    if cfg.adu_per_photon != "auto":
        return float(cfg.adu_per_photon), "config"
    g = geometry_adu_per_photon(geometry, n_modules)
    if g is not None:
        if np.allclose(g, g[0]):
            return float(g[0]), "geometry"
        return g, "geometry"
    log.warning("label: fit.adu_per_photon='auto' but %s: fitting ADU as photons "
                "(adu_per_photon 1.0); set fit.adu_per_photon for a detector-independent redchi",
                "there is no geometry" if geometry is None else "the geometry has no "
                "adu_per_photon / adu_per_eV with a photon energy")
    return 1.0, "default: no gain known"


def _gain_of_windows(windows: Windows, gain) -> Optional[np.ndarray]:
    """Per-window gains (N,) from a number or a per-module (P,) array (None: the config's)."""
    if gain is None:
        return None
    g = np.asarray(gain, dtype=np.float64)
    if g.ndim == 0:
        return np.full(len(windows), float(g))
    return g[np.clip(windows.panel, 0, len(g) - 1)]


def fit_windows(windows: Windows, cfg: Optional[LabelFitConfig] = None,
                solver: Optional[str] = None, gain=None) -> WindowFits:
    """Fit the windows whose status is ``ok`` with ``solver`` (default ``cfg.solver``).

    ``gain``: ADU per photon, a number or one per module (P,) (see
    :func:`resolve_adu_per_photon`); default ``cfg.adu_per_photon`` (1 if "auto"). The fit
    runs in photon units; A, a, b, c come back in ADU, chisqr/redchi in photon units.
    Returns :class:`WindowFits` for *all* windows (NaN parameters, info -1 where not fitted).
    """
    cfg = cfg or LabelFitConfig()
    solver = solver or cfg.solver
    n = len(windows)
    sel = np.flatnonzero(windows.status == Status.OK)
    if solver == "batched":
        from .fit_batched import fit_batched as fit
    elif solver == "lmfit":
        from .fit_lmfit import fit_lmfit as fit
    elif solver == "scipy":
        from .fit_lmfit import fit_scipy as fit
    else:
        raise ValueError(f"solver: unknown solver {solver!r} (batched, lmfit, scipy)")
    out = WindowFits.empty(n, solver)
    out.ndata = windows.good.sum(axis=(1, 2)).astype(np.int64)
    g = _gain_of_windows(windows, gain)
    if sel.size:
        part = fit(windows.data[sel], windows.good[sel], cfg,
                   gain=None if g is None else g[sel])
        out.params[sel] = part.params
        out.chisqr[sel] = part.chisqr
        out.ndata[sel] = part.ndata
        out.nfev[sel] = part.nfev
        out.converged[sel] = part.converged
        out.info[sel] = part.info
        out.seconds = part.seconds
        out.extra.update(part.extra)
    return out


def assign_status(windows: Windows, fits: WindowFits,
                  cfg: Optional[LabelFitConfig] = None) -> np.ndarray:
    """Final status (N,) int8: the windows' pre-fit status, then the fit's verdict."""
    cfg = cfg or LabelFitConfig()
    status = windows.status.astype(np.int8).copy()
    fitted = status == Status.OK
    finite = np.all(np.isfinite(fits.params), axis=1) & np.isfinite(fits.chisqr)
    notconv = fitted & (~fits.converged | ~finite)
    n = len(windows)
    d = np.where(windows.good, windows.data, np.nan).reshape(n, windows.size ** 2)
    with np.errstate(all="ignore"):
        rng = np.nanmax(d, axis=1, initial=-np.inf) - np.nanmin(d, axis=1, initial=np.inf)
        amp = fits.params[:, IDX["A"]]
        badamp = fitted & ~notconv & ((amp <= cfg.min_amplitude)
                                      | (amp > cfg.max_amplitude_ratio * rng))
        badchi = fitted & ~notconv & ~badamp & ~(fits.redchi <= cfg.redchi_max)
    status[notconv] = Status.NOT_CONVERGED
    status[badamp] = Status.BAD_AMPLITUDE
    status[badchi] = Status.REJECTED_REDCHI
    return status


def _window_pixels(windows: Windows, index: np.ndarray):
    """(panel, ss, fs) index arrays (k, w*w) of the windows' pixels in the stack."""
    w = windows.size
    y, x = window_grid(w)
    yi = windows.origin[index, 0][:, None] + y.astype(np.int64)[None, :]
    xi = windows.origin[index, 1][:, None] + x.astype(np.int64)[None, :]
    pi = np.broadcast_to(windows.panel[index][:, None], yi.shape)
    return pi, yi, xi


def render_labels(windows: Windows, fits: WindowFits, status: np.ndarray,
                  cfg: Optional[LabelFitConfig] = None):
    """Label mask (P, H, W) uint8 (1 = peak), ignore mask (P, H, W) bool, labelled pixels (N,).

    Only ``ok`` peaks are painted: pixels where the fitted profile without background is at
    least ``cfg.label_threshold`` of its maximum over the window's pixels. ``ignore`` marks
    the windows of the other peaks that lie on the detector (excluding labelled pixels).
    """
    cfg = cfg or LabelFitConfig()
    label = np.zeros(windows.stack_shape, np.uint8)
    ignore = np.zeros(windows.stack_shape, bool)
    npix = np.zeros(len(windows), np.int32)
    ok = np.flatnonzero(status == Status.OK)
    if ok.size:
        y, x = window_grid(windows.size)
        prof = profile(fits.params[ok], y, x)
        thr = cfg.label_threshold * prof.max(axis=1, keepdims=True)
        on = prof >= thr
        npix[ok] = on.sum(axis=1)
        pi, yi, xi = _window_pixels(windows, ok)
        label[pi[on], yi[on], xi[on]] = 1
    rest = np.flatnonzero((status != Status.OK) & np.all(np.isfinite(windows.peak_yx), axis=1))
    if rest.size:
        pi, yi, xi = _window_pixels(windows, rest)
        ignore[pi.ravel(), yi.ravel(), xi.ravel()] = True
        ignore &= label == 0
    return label, ignore, npix


def peak_table(windows: Windows, fits: WindowFits, status: np.ndarray,
               npix_label: Optional[np.ndarray] = None) -> dict:
    """Per-peak columns (dict of (N,) arrays), in the order of the input peaks.

    panel; ss_in, fs_in (input position); ss, fs (fitted centre, module coordinates);
    A, sy, sx, gy, gx, eta, a, b, c (window coordinates for the background plane); redchi,
    chisqr, ndata, nfev, info, converged; status (int8), status_name (str); flags (uint16);
    origin_ss, origin_fs (window pixel (0, 0)); npix_label; volume (sum of the fitted
    profile without background over the window's pixels, ADU). A, a, b, c are in ADU;
    chisqr and redchi in photon units (the fit's, see ``LabelFitConfig.adu_per_photon``).
    """
    n = len(windows)
    volume = np.full(n, np.nan)
    fin = np.flatnonzero(np.all(np.isfinite(fits.params), axis=1))
    if fin.size:
        y, x = window_grid(windows.size)
        volume[fin] = profile(fits.params[fin], y, x).sum(axis=1)
    oy = windows.origin[:, 0].astype(np.float64)
    ox = windows.origin[:, 1].astype(np.float64)
    tab = {
        "panel": windows.panel.astype(np.int32),
        "ss_in": windows.peak_yx[:, 0] + oy,
        "fs_in": windows.peak_yx[:, 1] + ox,
        "ss": fits.params[:, IDX["cy"]] + oy,
        "fs": fits.params[:, IDX["cx"]] + ox,
    }
    for name in PARAM_NAMES:
        if name not in ("cy", "cx"):
            tab[name] = fits.params[:, IDX[name]].copy()
    tab.update(
        redchi=fits.redchi, chisqr=fits.chisqr.copy(), ndata=fits.ndata.copy(),
        nfev=fits.nfev.copy(), info=fits.info.copy(), converged=fits.converged.copy(),
        status=status.astype(np.int8), status_name=np.array([STATUS_NAMES[s] for s in status]),
        flags=windows.flags.copy(), origin_ss=windows.origin[:, 0].copy(),
        origin_fs=windows.origin[:, 1].copy(),
        npix_label=np.zeros(n, np.int32) if npix_label is None else npix_label,
        volume=volume,
    )
    return tab


@dataclass
class LabelResult:
    """Labels of one frame: ``label`` (P, H, W) uint8, ``ignore`` (P, H, W) bool, ``table``
    (per-peak columns, see :func:`peak_table`), ``fits`` (the raw :class:`WindowFits`)."""

    label: np.ndarray
    ignore: np.ndarray
    table: dict
    fits: WindowFits

    def counts(self) -> dict:
        """Number of peaks per status name (JSON-able)."""
        names, counts = np.unique(self.table["status_name"], return_counts=True)
        out = {name: 0 for name in STATUS_NAMES}
        out.update({str(k): int(v) for k, v in zip(names, counts)})
        return out

    def peaks(self) -> PeakList:
        """The ``ok`` peaks as a PeakList: fitted centres; intensity = fitted profile summed
        over the window (ADU); max_value = A; npix = labelled pixels."""
        t = self.table
        ok = t["status"] == Status.OK
        return PeakList.from_columns(
            panel=t["panel"][ok], ss=t["ss"][ok], fs=t["fs"][ok], intensity=t["volume"][ok],
            max_value=t["A"][ok], npix=t["npix_label"][ok])


def label_peaks(stack: np.ndarray, peaks: PeaksLike, mask: Optional[np.ndarray] = None,
                cfg: Optional[LabelFitConfig] = None, geometry=None, gain=None) -> LabelResult:
    """Cut, fit, judge and paint the labels of one frame ``stack`` (P, H, W).

    ``peaks``: a PeakList or (N, 3) array of (panel, ss, fs); ``mask`` (P, H, W) True = good.
    ``geometry``: the detector's (for ``cfg.adu_per_photon = "auto"``); ``gain``: ADU per
    photon (number or per module), overrides both (see :func:`resolve_adu_per_photon`).
    Bad peaks never raise: they get a status in the table.
    """
    cfg = cfg or LabelFitConfig()
    if gain is None:
        gain, _ = resolve_adu_per_photon(cfg, geometry, np.shape(stack)[0] if np.ndim(stack) == 3
                                         else None)
    windows = cut_windows(stack, peaks, mask, cfg)
    fits = fit_windows(windows, cfg, gain=gain)
    status = assign_status(windows, fits, cfg)
    label, ignore, npix = render_labels(windows, fits, status, cfg)
    return LabelResult(label, ignore, peak_table(windows, fits, status, npix), fits)
