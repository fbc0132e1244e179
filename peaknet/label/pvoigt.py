"""2-D pseudo-Voigt peak on a planar background: the model of the label fits (pure NumPy).

The model (PeakNet paper, section 2.1.2) on window pixel coordinates (y, x), y the row (slow
scan) and x the column (fast scan), pixel (i, j) centred at (i, j)::

    I(y, x) = A [eta L(y, x) + (1 - eta) G(y, x)] + a y + b x + c

    G(y, x) = exp(-(y - cy)^2 / (2 sy^2) - (x - cx)^2 / (2 sx^2))
    L(y, x) = 1 / (1 + (y - cy)^2 / gy^2 + (x - cx)^2 / gx^2)

A is the peak height above the background (G = L = 1 at the centre), eta in [0, 1] mixes the
Lorentzian (gy, gx: half widths at half maximum) and the Gaussian (sy, sx: standard deviations).

Parameter vectors are ordered as :data:`PARAM_NAMES`:
``(A, cy, cx, sy, sx, gy, gx, eta, a, b, c)``.

Also here, because both solvers must share them exactly: the fit's bounds
(:func:`param_bounds`), the initial guesses (:func:`initial_guess`), the weights
(:func:`pixel_weights`), lmfit's bound transform (:func:`to_internal`, :func:`to_external`,
:func:`dexternal_dinternal`) and the result container :class:`WindowFits`.

Bound transform (lmfit's, after MINUIT; see ``lmfit.Parameter.setup_bounds``), internal u to
external p:

- both bounds: ``p = lo + (sin(u) + 1) (hi - lo) / 2``
- lower only: ``p = lo - 1 + sqrt(u^2 + 1)``
- upper only: ``p = hi + 1 - sqrt(u^2 + 1)``
- none: ``p = u``

Both solvers minimise the same sum of squares in the same internal coordinates, so their minima
coincide (the paths may differ).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

PARAM_NAMES: tuple[str, ...] = ("A", "cy", "cx", "sy", "sx", "gy", "gx", "eta", "a", "b", "c")
NPARAMS = len(PARAM_NAMES)
IDX = {name: i for i, name in enumerate(PARAM_NAMES)}

# bound kinds of the transform
FREE, LOWER, UPPER, BOTH = 0, 1, 2, 3


# --------------------------------------------------------------------------- the model
def pvoigt2d(y, x, A, cy, cx, sy, sx, gy, gx, eta, a=0.0, b=0.0, c=0.0):
    """Evaluate ``A [eta L + (1 - eta) G] + a y + b x + c`` (broadcasting NumPy arrays).

    With ``a = b = c = 0`` (the defaults) this is the peak profile without its background.
    """
    dy = np.asarray(y, dtype=np.float64) - cy
    dx = np.asarray(x, dtype=np.float64) - cx
    g = np.exp(-0.5 * (dy * dy / (sy * sy) + dx * dx / (sx * sx)))
    lor = 1.0 / (1.0 + dy * dy / (gy * gy) + dx * dx / (gx * gx))
    return A * (eta * lor + (1.0 - eta) * g) + a * y + b * x + c


def window_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened pixel-centre coordinates (y, x) of a ``size`` x ``size`` window, row-major."""
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                         indexing="ij")
    return yy.ravel(), xx.ravel()


def model(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Model for a batch: ``params`` (..., 11), ``y``/``x`` (npix,) -> (..., npix)."""
    p = np.asarray(params, dtype=np.float64)[..., None, :]
    return pvoigt2d(y, x, *(p[..., i] for i in range(NPARAMS)))


def profile(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The fitted peak without its background: ``A [eta L + (1 - eta) G]`` (..., npix)."""
    p = np.array(params, dtype=np.float64, copy=True)
    p[..., IDX["a"]] = p[..., IDX["b"]] = p[..., IDX["c"]] = 0.0
    return model(p, y, x)


def jacobian(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Analytic derivatives of :func:`model`: (..., npix, 11), columns as :data:`PARAM_NAMES`.

    With dy = y - cy, dx = x - cx, P = eta L + (1 - eta) G::

        dI/dA   = P
        dI/dcy  = A [eta 2 L^2 dy / gy^2 + (1 - eta) G dy / sy^2]     (cx alike)
        dI/dsy  = A (1 - eta) G dy^2 / sy^3                          (sx alike)
        dI/dgy  = A eta 2 L^2 dy^2 / gy^3                            (gx alike)
        dI/deta = A (L - G)
        dI/da = y,  dI/db = x,  dI/dc = 1
    """
    p = np.asarray(params, dtype=np.float64)[..., None, :]
    A, cy, cx, sy, sx, gy, gx, eta = (p[..., i] for i in range(8))
    dy = y - cy
    dx = x - cx
    dy2, dx2 = dy * dy, dx * dx
    g = np.exp(-0.5 * (dy2 / (sy * sy) + dx2 / (sx * sx)))
    lor = 1.0 / (1.0 + dy2 / (gy * gy) + dx2 / (gx * gx))
    l2 = lor * lor
    ag = A * (1.0 - eta) * g
    al = 2.0 * A * eta * l2
    ones = np.ones_like(dy)
    cols = [
        eta * lor + (1.0 - eta) * g,
        al * dy / (gy * gy) + ag * dy / (sy * sy),
        al * dx / (gx * gx) + ag * dx / (sx * sx),
        ag * dy2 / (sy * sy * sy),
        ag * dx2 / (sx * sx * sx),
        al * dy2 / (gy * gy * gy),
        al * dx2 / (gx * gx * gx),
        A * (lor - g),
        np.broadcast_to(y, dy.shape) * ones,
        np.broadcast_to(x, dx.shape) * ones,
        ones,
    ]
    return np.stack(cols, axis=-1)


# --------------------------------------------------------------------------- fit set-up
def param_bounds(window: int, width_min: float = 0.3,
                 width_max: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds (11,) of the fit on a ``window`` x ``window`` window.

    A > 0 (lower bound 0), centre inside the window's pixels ``[-0.5, window - 0.5]``,
    widths (sigma and gamma) in ``[width_min, width_max]`` (default ``window / 2``),
    eta in [0, 1], background a, b, c free.
    """
    wmax = window / 2.0 if width_max is None else float(width_max)
    lo = np.full(NPARAMS, -np.inf)
    hi = np.full(NPARAMS, np.inf)
    lo[IDX["A"]] = 0.0
    lo[IDX["cy"]] = lo[IDX["cx"]] = -0.5
    hi[IDX["cy"]] = hi[IDX["cx"]] = window - 0.5
    for k in ("sy", "sx", "gy", "gx"):
        lo[IDX[k]], hi[IDX[k]] = width_min, wmax
    lo[IDX["eta"]], hi[IDX["eta"]] = 0.0, 1.0
    return lo, hi


def bound_kinds(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per-parameter transform kind: FREE, LOWER, UPPER or BOTH."""
    lo_f, hi_f = np.isfinite(lo), np.isfinite(hi)
    return np.where(lo_f & hi_f, BOTH, np.where(lo_f, LOWER, np.where(hi_f, UPPER, FREE)))


def pixel_weights(data: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Residual weights ``1 / sqrt(max(I, 0) + 1)`` on good pixels, 0 on masked ones.

    ``I`` in photons (the solvers divide the data by the gain first), so that a
    Poisson-limited fit has reduced chi-square ~1 on any detector."""
    d = np.where(good, data, 0.0)
    return np.where(good, 1.0 / np.sqrt(np.maximum(d, 0.0) + 1.0), 0.0)


#: parameters in detector units (scaled by the gain); the others are positions and widths
GAIN_PARAMS = ("A", "a", "b", "c")


def window_gains(n: int, gain=None, cfg=None) -> np.ndarray:
    """ADU per photon (n,) of n windows: ``gain`` (a number or (n,) array) if given, else
    ``cfg.adu_per_photon`` if it is a number, else 1 ("auto" unresolved: ADU taken as photons)."""
    if gain is None:
        g = getattr(cfg, "adu_per_photon", 1.0) if cfg is not None else 1.0
        gain = 1.0 if isinstance(g, str) else g
    g = np.broadcast_to(np.asarray(gain, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(g) & (g > 0)):
        raise ValueError(f"adu_per_photon: gains must be finite and > 0, got {np.unique(g)[:5]}")
    return g


def scale_params(params: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``params`` (n, 11) with A, a, b, c multiplied by ``factor`` (n,): photons -> ADU with the
    gain, ADU -> photons with 1 / gain."""
    out = np.array(params, dtype=np.float64, copy=True)
    for k in GAIN_PARAMS:
        out[:, IDX[k]] *= factor
    return out


def initial_guess(data: np.ndarray, good: np.ndarray, width_min: float = 0.3,
                  width_max: Optional[float] = None, core_fraction: float = 0.5) -> np.ndarray:
    """Starting values (N, 11) for windows ``data`` (N, w, w) with good-pixel mask ``good``.

    - c: mean of the good pixels among the four corners (median of the good pixels if no corner
      is good); a = b = 0;
    - (cy, cx): centre of mass of the positive background-subtracted signal ``s = max(I - c, 0)``
      (window centre if there is none);
    - A: max - c (at least 1e-3 (|c| + 1), so that it is strictly inside its bound);
    - sy, sx: square roots of the second moments of s about its centre of mass, over the peak's
      core: the pixels where s >= ``core_fraction`` x max(s) (``core_fraction = 0``: all of s);
      gy, gx = sy, sx; eta = 0.5.

    Why the core: over the whole window, the background noise inflates the moments (median
    1.2 px on the real thermolysin CSPAD peaks, whose fitted sigma is ~0.3-0.5 px). From such a
    start lmfit's leastsq drives eta to its bound 1 early, where the bound transform's zero
    slope traps it: 55% of those fits ended at eta = 1 with a reduced chi-square 27% (median)
    above the independent scipy TRF minimum. With the half-maximum core: 1% at eta = 1 and 96%
    within 2% of scipy's chi-square (239 windows of the DIALS-indexed spots). On synthetic
    well-sampled peaks both starts reach the same minima (>= 92% within 2% of scipy).

    Every value is put strictly inside its bounds: lmfit's transform has zero slope at a bound.
    """
    data = np.asarray(data, dtype=np.float64)
    good = np.asarray(good, dtype=bool)
    n, h, w = data.shape
    lo, hi = param_bounds(w, width_min, width_max)
    d = np.where(good, data, np.nan)
    corners = d[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    ncorner = np.sum(np.isfinite(corners), axis=1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: handled below
        c0 = np.where(ncorner > 0, np.nansum(np.nan_to_num(corners, nan=0.0), axis=1)
                      / np.maximum(ncorner, 1), np.nanmedian(d.reshape(n, h * w), axis=1))
    c0 = np.nan_to_num(c0, nan=0.0)
    sig = np.where(good, np.maximum(np.nan_to_num(d) - c0[:, None, None], 0.0), 0.0)
    tot = sig.sum(axis=(1, 2))
    yy = np.arange(h, dtype=np.float64)[None, :, None]
    xx = np.arange(w, dtype=np.float64)[None, None, :]
    safe = np.where(tot > 0, tot, 1.0)
    cy = np.where(tot > 0, (sig * yy).sum(axis=(1, 2)) / safe, (h - 1) / 2.0)
    cx = np.where(tot > 0, (sig * xx).sum(axis=(1, 2)) / safe, (w - 1) / 2.0)
    smax = sig.reshape(n, h * w).max(axis=1)[:, None, None]
    core = np.where(sig >= core_fraction * smax, sig, 0.0) if core_fraction > 0 else sig
    ctot = core.sum(axis=(1, 2))
    csafe = np.where(ctot > 0, ctot, 1.0)
    ccy = (core * yy).sum(axis=(1, 2)) / csafe
    ccx = (core * xx).sum(axis=(1, 2)) / csafe
    vy = np.where(ctot > 0, (core * (yy - ccy[:, None, None]) ** 2).sum(axis=(1, 2)) / csafe, 1.0)
    vx = np.where(ctot > 0, (core * (xx - ccx[:, None, None]) ** 2).sum(axis=(1, 2)) / csafe, 1.0)
    dmax = np.nanmax(np.where(good, data, -np.inf).reshape(n, h * w), axis=1)
    dmax = np.where(np.isfinite(dmax), dmax, c0)
    amp = np.maximum(dmax - c0, 1e-3 * (np.abs(c0) + 1.0))
    p = np.empty((n, NPARAMS), dtype=np.float64)
    p[:, IDX["A"]] = amp
    p[:, IDX["cy"]] = cy
    p[:, IDX["cx"]] = cx
    p[:, IDX["sy"]] = np.sqrt(vy)
    p[:, IDX["sx"]] = np.sqrt(vx)
    p[:, IDX["gy"]] = p[:, IDX["sy"]]
    p[:, IDX["gx"]] = p[:, IDX["sx"]]
    p[:, IDX["eta"]] = 0.5
    p[:, IDX["a"]] = 0.0
    p[:, IDX["b"]] = 0.0
    p[:, IDX["c"]] = c0
    both = np.isfinite(lo) & np.isfinite(hi)
    margin = np.where(both, 0.01 * (hi - lo), 0.0)
    return np.clip(p, np.where(both, lo + margin, -np.inf), np.where(both, hi - margin, np.inf))


# --------------------------------------------------------------------------- lmfit's transform
def to_internal(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """External -> internal values, as ``lmfit.Parameter.setup_bounds`` (values (..., 11))."""
    p = np.asarray(p, dtype=np.float64)
    kind = bound_kinds(lo, hi)
    lo_ = np.where(np.isfinite(lo), lo, 0.0)
    hi_ = np.where(np.isfinite(hi), hi, 1.0)
    with np.errstate(invalid="ignore"):
        both = np.arcsin(np.clip(2.0 * (p - lo_) / (hi_ - lo_) - 1.0, -1.0, 1.0))
        lower = np.sqrt(np.maximum((p - lo_ + 1.0) ** 2 - 1.0, 0.0))
        upper = np.sqrt(np.maximum((hi_ - p + 1.0) ** 2 - 1.0, 0.0))
    u = np.where(kind == BOTH, both, np.where(kind == LOWER, lower,
                                              np.where(kind == UPPER, upper, p)))
    return np.where(np.abs(u) < 1e-15, 0.0, u)


def to_external(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Internal -> external values (lmfit's ``Parameter.from_internal``)."""
    u = np.asarray(u, dtype=np.float64)
    kind = bound_kinds(lo, hi)
    lo_ = np.where(np.isfinite(lo), lo, 0.0)
    hi_ = np.where(np.isfinite(hi), hi, 1.0)
    root = np.sqrt(u * u + 1.0)
    return np.where(kind == BOTH, lo_ + (np.sin(u) + 1.0) * (hi_ - lo_) / 2.0,
                    np.where(kind == LOWER, lo_ - 1.0 + root,
                             np.where(kind == UPPER, hi_ + 1.0 - root, u)))


def dexternal_dinternal(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """d(external)/d(internal) (lmfit's ``Parameter.scale_gradient``)."""
    u = np.asarray(u, dtype=np.float64)
    kind = bound_kinds(lo, hi)
    lo_ = np.where(np.isfinite(lo), lo, 0.0)
    hi_ = np.where(np.isfinite(hi), hi, 1.0)
    root = np.sqrt(u * u + 1.0)
    return np.where(kind == BOTH, np.cos(u) * (hi_ - lo_) / 2.0,
                    np.where(kind == LOWER, u / root,
                             np.where(kind == UPPER, -u / root, 1.0)))


# --------------------------------------------------------------------------- results
@dataclass
class WindowFits:
    """Fits of N windows, whichever solver made them.

    params (N, 11) float64 in :data:`PARAM_NAMES` order, window-local centre; chisqr (N,) sum of
    squared weighted residuals; ndata (N,) good pixels fitted; redchi (N,) = chisqr /
    (ndata - 11); nfev (N,) residual evaluations; converged (N,) bool; info (N,) int:
    MINPACK's codes (1-4 converged, 5 evaluation limit, 6-8 tolerances too small), -1 not
    fitted (pre-fit status), -2 non-finite values or a solver error, -3 not fitted: no more good
    pixels than parameters; solver: "lmfit", "batched" or "scipy"; seconds: wall time.
    """

    params: np.ndarray
    chisqr: np.ndarray
    ndata: np.ndarray
    nfev: np.ndarray
    converged: np.ndarray
    info: np.ndarray
    solver: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def redchi(self) -> np.ndarray:
        nfree = np.maximum(self.ndata - NPARAMS, 1)
        return self.chisqr / nfree

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def take(self, index) -> "WindowFits":
        """The fits selected by an index array, slice or boolean mask."""
        return WindowFits(self.params[index], self.chisqr[index], self.ndata[index],
                          self.nfev[index], self.converged[index], self.info[index], self.solver,
                          self.seconds, dict(self.extra))

    @classmethod
    def empty(cls, n: int, solver: str = "") -> "WindowFits":
        """N unfitted windows: NaN parameters, info -1."""
        return cls(
            params=np.full((n, NPARAMS), np.nan),
            chisqr=np.full(n, np.nan),
            ndata=np.zeros(n, np.int64),
            nfev=np.zeros(n, np.int64),
            converged=np.zeros(n, bool),
            info=np.full(n, -1, np.int64),
            solver=solver,
        )
