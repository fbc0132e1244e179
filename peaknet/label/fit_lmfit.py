"""Reference fits: one ``lmfit.minimize`` per window, as the PeakNet authors ran them.

Method ``"leastsq"`` (lmfit's default, and what the authors' labelling code used): MINPACK's
Levenberg-Marquardt through ``scipy.optimize.leastsq`` with forward-difference derivatives,
lmfit's MINUIT-style transform for the bounded parameters, ``ftol = xtol = 1.5e-8`` (lmfit's
defaults) and ``max_nfev`` from the config (the authors used 2000), restarted from its last
values every ``restart_nfev`` evaluations (see :class:`~peaknet.label.config.LabelFitConfig`).
Residuals are ``(model - data) / sqrt(max(I, 0) + 1)`` in photon units (data /
``adu_per_photon``, see :func:`~peaknet.label.pvoigt.window_gains`; A, a, b, c are returned in
ADU) over the good pixels only (masked pixels are left out, which is the same objective as
weight zero; ``ndata`` counts good pixels).

:func:`fit_scipy` is a second, independent reference on the same objective: scipy's
``least_squares`` (trust-region reflective, bounds handled directly, analytic Jacobian) from
the same starting values. It shares neither the transform nor the algorithm with the other two.
"""
from __future__ import annotations

import time
import warnings
from typing import Optional

import numpy as np

from .config import LabelFitConfig
from .pvoigt import IDX, NPARAMS, PARAM_NAMES, WindowFits, initial_guess, jacobian, \
    param_bounds, pixel_weights, pvoigt2d, scale_params, window_gains, window_grid


def _prepare(data, good, cfg, p0, gain=None):
    """Config, data in photons, good mask, bounds, starting values (photons), gains (n,)."""
    cfg = cfg or LabelFitConfig()
    data = np.asarray(data, dtype=np.float64)
    n, h, w = data.shape
    g = window_gains(n, gain, cfg)
    good = np.isfinite(data) if good is None else (np.asarray(good, bool) & np.isfinite(data))
    data = np.where(good, data / g[:, None, None], 0.0)
    lo, hi = param_bounds(w, cfg.width_min, cfg.width_max)
    if p0 is None:
        p0 = initial_guess(data, good, cfg.width_min, cfg.width_max, cfg.guess_core_fraction)
    else:
        p0 = scale_params(np.asarray(p0, dtype=np.float64).reshape(n, NPARAMS), 1.0 / g)
    return cfg, data, good, lo, hi, np.asarray(p0, dtype=np.float64), g


def _residual(params, y, x, d, wt):
    v = params.valuesdict()
    return (pvoigt2d(y, x, v["A"], v["cy"], v["cx"], v["sy"], v["sx"], v["gy"], v["gx"],
                     v["eta"], v["a"], v["b"], v["c"]) - d) * wt


def fit_window_lmfit(data: np.ndarray, good: np.ndarray, p0: np.ndarray, lo: np.ndarray,
                     hi: np.ndarray, cfg: LabelFitConfig):
    """Fit one window (w, w) with lmfit, restarting as ``cfg.restart_nfev`` says.

    Returns ``(result, nfev, chisqr)``: the last ``lmfit.MinimizerResult``, the evaluations of
    all the calls together, and the chi-square at the final values (lmfit leaves
    ``result.chisqr`` stale when a call stops at its evaluation limit).
    """
    import lmfit

    w = data.shape[-1]
    y, x = window_grid(w)
    sel = np.asarray(good, bool).ravel()
    d = data.ravel()[sel]
    wt = pixel_weights(d, np.ones_like(d, dtype=bool))
    args = (y[sel], x[sel], d, wt)
    total = 0
    values = [float(v) for v in p0]
    while True:
        params = lmfit.Parameters()
        for i, name in enumerate(PARAM_NAMES):
            params.add(name, value=values[i],
                       min=float(lo[i]) if np.isfinite(lo[i]) else -np.inf,
                       max=float(hi[i]) if np.isfinite(hi[i]) else np.inf)
        budget = int(cfg.max_nfev) - total
        if cfg.restart_nfev > 0:
            budget = min(budget, int(cfg.restart_nfev))
        res = lmfit.minimize(_residual, params, method="leastsq", args=args, max_nfev=budget,
                             ftol=float(cfg.ftol), xtol=float(cfg.xtol))
        total += max(int(res.nfev), budget if res.aborted else 0)
        if res.success or not res.aborted or total >= cfg.max_nfev:
            chisqr = float(np.sum(_residual(res.params, *args) ** 2))
            return res, total, chisqr
        values = [res.params[name].value for name in PARAM_NAMES]


def fit_lmfit(data: np.ndarray, good: Optional[np.ndarray] = None,
              cfg: Optional[LabelFitConfig] = None, p0: Optional[np.ndarray] = None,
              gain=None) -> WindowFits:
    """Fit each window ``data`` (N, w, w) with lmfit ``leastsq``, one after the other.

    ``good`` (N, w, w) marks the pixels that enter the fit; ``p0`` (N, 11) starting values in
    ADU (default :func:`~peaknet.label.pvoigt.initial_guess`); ``gain``: ADU per photon, a
    number or (N,) (default ``cfg.adu_per_photon``, 1 if "auto"): the fit runs on data / gain,
    A, a, b, c come back in ADU, chisqr in photon units. A window whose fit raises is
    recorded as not converged (info -2), never re-raised.
    """
    t0 = time.perf_counter()
    cfg, data, good, lo, hi, p0, g = _prepare(data, good, cfg, p0, gain)
    n = data.shape[0]
    out = WindowFits.empty(n, "lmfit")
    out.ndata = good.sum(axis=(1, 2)).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            if out.ndata[i] <= NPARAMS:  # fewer pixels than parameters: not fitted
                out.info[i] = -3
                continue
            try:
                res, nfev, chisqr = fit_window_lmfit(data[i], good[i], p0[i], lo, hi, cfg)
            except Exception:  # noqa: BLE001 - one bad window must not stop a batch
                out.info[i] = -2
                continue
            out.params[i] = [res.params[name].value for name in PARAM_NAMES]
            out.chisqr[i] = chisqr
            out.nfev[i] = nfev
            ier = getattr(res, "ier", -1)
            out.info[i] = ier if not res.aborted else 5
            out.converged[i] = bool(res.success)
    out.params = scale_params(out.params, g)
    out.extra["adu_per_photon"] = g
    out.seconds = time.perf_counter() - t0
    return out


def fit_scipy(data: np.ndarray, good: Optional[np.ndarray] = None,
              cfg: Optional[LabelFitConfig] = None, p0: Optional[np.ndarray] = None,
              gain=None) -> WindowFits:
    """Second reference: ``scipy.optimize.least_squares`` (TRF, direct bounds, analytic Jacobian).

    Tolerances 1e-12 (tight: it is a referee, not a production path). info holds scipy's
    ``status`` (1-4 converged, 0 evaluation limit).
    """
    from scipy.optimize import least_squares

    t0 = time.perf_counter()
    cfg, data, good, lo, hi, p0, g = _prepare(data, good, cfg, p0, gain)
    n, _, w = data.shape
    y, x = window_grid(w)
    out = WindowFits.empty(n, "scipy")
    out.ndata = good.sum(axis=(1, 2)).astype(np.int64)
    for i in range(n):
        if out.ndata[i] <= NPARAMS:
            out.info[i] = -3
            continue
        sel = good[i].ravel()
        d = data[i].ravel()[sel]
        wt = pixel_weights(d, np.ones_like(d, dtype=bool))
        ys, xs = y[sel], x[sel]

        def fun(p):
            return (pvoigt2d(ys, xs, *p) - d) * wt

        def jac(p):
            return jacobian(p, ys, xs) * wt[:, None]

        start = p0[i].copy()  # strictly inside the bounds (initial_guess), as TRF needs
        start[IDX["A"]] = max(start[IDX["A"]], 1e-12)
        try:
            res = least_squares(fun, start, jac=jac, bounds=(lo, hi), method="trf",
                                x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12,
                                max_nfev=int(cfg.max_nfev))
        except Exception:  # noqa: BLE001
            out.info[i] = -2
            continue
        out.params[i] = res.x
        out.chisqr[i] = float(np.sum(res.fun ** 2))
        out.nfev[i] = int(res.nfev)
        out.info[i] = int(res.status)
        out.converged[i] = res.status > 0
    out.params = scale_params(out.params, g)
    out.extra["adu_per_photon"] = g
    out.seconds = time.perf_counter() - t0
    return out


__all__ = ["fit_lmfit", "fit_scipy", "fit_window_lmfit"]
