"""Typed configuration of the label fits (a section for :mod:`peaknet.config`).

Used as a TOML table, e.g. ``[fit]`` of a label stage config, with overrides such as
``--fit.solver=lmfit``. :meth:`LabelFitConfig.validate` raises ``ValueError("key: problem")``,
which the loader turns into a ConfigError naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union


@dataclass
class LabelFitConfig:
    """Windows, fit, rejection and label settings.

    Windows (see :mod:`peaknet.label.windows`):
      window: side of the square window in pixels (odd; the paper uses 9).
      tile_shape: (rows, cols) of the independent sensor tiles inside a module, e.g. (185, 194)
        for a CSPAD 2x1 module made of two ASICs; ``None``: the whole module is one tile.
        Windows never cross a tile edge.
      edge_policy: "shift": a window that would cross its tile's edge is shifted inside the tile
        (the peak is then off-centre in it); "reject": such peaks get status ``edge``.
      edge_margin: peaks whose rounded pixel lies less than this many pixels from the tile edge
        get status ``edge`` under either policy (default 1: the border row/column itself).
      min_good_pixels: fewer good (unmasked, finite, unsaturated if masked) pixels in the window
        gives status ``edge`` (e.g. a window mostly on a masked gap).
      saturation: pixel value at or above which a pixel is saturated (``None``: no check).
      saturated_policy: "reject" (status ``saturated``, not fitted) or "mask" (those pixels get
        weight zero and the peak is fitted).
      nan_policy: "reject" (status ``nan_pixels``) or "mask" (non-finite pixels get weight zero).
      overlap_policy: "reject" (status ``overlap`` if another peak's centre lies in the window)
        or "fit" (fit it anyway with one profile).

    Fit:
      solver: "batched" (vectorised Levenberg-Marquardt, :mod:`peaknet.label.fit_batched`) or
        "lmfit" (one ``lmfit.minimize(method="leastsq")`` per peak, the reference).
      device: batched solver only: "auto" (CUDA if available), "cpu" or "cuda".
      batch_size: batched solver: windows in flight at once (~25 kB of memory each).
      max_nfev: residual evaluations allowed per window, restarts included (as lmfit counts
        them: 11 per finite-difference Jacobian; the authors' lmfit code used 2000).
      restart_nfev: restart the fit from where it is after this many evaluations without
        convergence (0: never), in both solvers: lmfit is called again from its last values,
        the batched solver re-initialises MINPACK's state. MINPACK's scaling only grows, so
        fits that approach a bound (undersampled peaks: sigma -> width_min with A growing)
        crawl; on the real thermolysin peaks 19% had not converged after 2000 evaluations,
        with restarts every 500 under 1% after 4000.
      ftol, xtol: MINPACK's relative tolerances (lmfit's ``leastsq`` defaults 1.5e-8).
      width_min, width_max: bounds of sigma and gamma (``None``: window / 2).
      guess_core_fraction: the starting sigma comes from the second moments of the pixels at
        or above this fraction of the peak's maximum (0: all positive signal, which traps
        lmfit at eta = 1 on real, undersampled peaks; see
        :func:`peaknet.label.pvoigt.initial_guess`).

      adu_per_photon: detector gain. Both solvers fit the windows in photon units
        (data / adu_per_photon), with weights 1/sqrt(I + 1), I in photons, so that the reduced
        chi-square of a Poisson-limited peak is ~1 on any detector. "auto": from the geometry
        the labels run with (the panels' ``adu_per_photon``, or ``adu_per_eV`` x the photon
        energy; per module where the panels differ), and 1.0 (with a warning in the log) when
        there is no geometry or it has no gain; a number: that gain for every module. Fitted
        A, a, b, c (and the table's ``volume``) are reported back in ADU; chisqr and redchi
        are in photon units. See :func:`peaknet.label.labels.resolve_adu_per_photon`.

    Rejection (see :func:`peaknet.label.labels.assign_status`):
      redchi_max: fits with a larger reduced chi-square (photon units, see ``adu_per_photon``)
        get status ``rejected_redchi``. A good fit has redchi ~1 on any detector; the default
        6 lies above the high quantiles of good fits measured with the gain-aware fit
        (redchi of fits that pass every other check; 50th / 99th / 99.9th percentile, max):
        ``peaknet demo --frames 20`` (its peakfinder8 peaks): Epix10ka2M (140 ADU/photon, 1545
        fits) 0.83 / 1.68 / 3.8, max 11; CSPAD (10 ADU/photon, 1204 fits) 0.77 / 1.45 / 4.3,
        max 5.9; Jungfrau 4M (1 ADU/photon, 95 fits) 0.90 / 2.4, max 3.5; the DIALS-indexed
        peaks of the real thermolysin CSPAD frames at 10 ADU/photon (their photon peaks are 10
        ADU apart; 237 fits): 0.62 / 5.4 (95th 3.4), max 11.
        With 6 about 1% of the real fits and under 0.5% of the generated ones are rejected,
        while fits whose residuals are more than ~2.5x the Poisson noise are (wrong model,
        overlapping or streaked spots, artefacts). Before the fit was in photons the threshold
        scaled with the gain (the old default 50 rejected 1534 of 1556 Epix10ka2M peaks).
      min_amplitude: fitted A must be larger (same units as the data).
      max_amplitude_ratio: fitted A must be at most this times the window's data range
        (max - min of its good pixels); a larger A is an undersampled spike fit.

    Labels:
      label_threshold: a pixel is labelled if the fitted profile (without background) there is
        at least this fraction of the profile's maximum over the window's pixels.
    """

    window: int = 9
    tile_shape: Optional[tuple[int, int]] = None
    edge_policy: Literal["shift", "reject"] = "shift"
    edge_margin: int = 1
    min_good_pixels: int = 41
    saturation: Optional[float] = None
    saturated_policy: Literal["reject", "mask"] = "reject"
    nan_policy: Literal["reject", "mask"] = "reject"
    overlap_policy: Literal["reject", "fit"] = "reject"

    solver: Literal["batched", "lmfit"] = "batched"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 4096
    max_nfev: int = 4000
    restart_nfev: int = 500
    ftol: float = 1.5e-8
    xtol: float = 1.5e-8
    width_min: float = 0.3
    width_max: Optional[float] = None
    guess_core_fraction: float = 0.5

    redchi_max: float = 6.0
    min_amplitude: float = 0.0
    max_amplitude_ratio: float = 10.0

    label_threshold: float = 0.5

    adu_per_photon: Union[Literal["auto"], float] = "auto"

    def validate(self) -> None:
        if self.window < 5 or self.window % 2 == 0:
            raise ValueError(f"window: must be an odd number >= 5, got {self.window}")
        if self.tile_shape is not None and (
            len(self.tile_shape) != 2 or min(self.tile_shape) < self.window
        ):
            raise ValueError(
                f"tile_shape: must be two sizes of at least window={self.window}, got {self.tile_shape}"
            )
        if not 0 <= self.edge_margin <= self.window // 2:
            raise ValueError(f"edge_margin: must be in [0, window // 2], got {self.edge_margin}")
        npix = self.window * self.window
        if not 11 < self.min_good_pixels <= npix:
            raise ValueError(
                f"min_good_pixels: must be in [12, {npix}] (11 parameters), got {self.min_good_pixels}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_nfev < 1:
            raise ValueError(f"max_nfev: must be >= 1, got {self.max_nfev}")
        if self.restart_nfev != 0 and self.restart_nfev < 50:
            raise ValueError(
                f"restart_nfev: must be 0 (no restarts) or >= 50 (a run needs room for a few "
                f"Jacobians of 11 evaluations), got {self.restart_nfev}")
        for key in ("ftol", "xtol"):
            v = getattr(self, key)
            if not 0.0 < v < 1.0:
                raise ValueError(f"{key}: must be in (0, 1), got {v}")
        wmax = self.window / 2.0 if self.width_max is None else self.width_max
        if not 0.0 < self.width_min < wmax:
            raise ValueError(
                f"width_min: must be > 0 and below width_max ({wmax}), got {self.width_min}"
            )
        if not 0.0 <= self.guess_core_fraction < 1.0:
            raise ValueError(
                f"guess_core_fraction: must be in [0, 1), got {self.guess_core_fraction}"
            )
        if self.adu_per_photon != "auto":
            try:
                g = float(self.adu_per_photon)
            except (TypeError, ValueError):
                g = float("nan")
            if not (g > 0 and g < float("inf")):
                raise ValueError(
                    f'adu_per_photon: must be "auto" or a number > 0, got {self.adu_per_photon!r}')
        if not self.redchi_max > 0:
            raise ValueError(f"redchi_max: must be > 0, got {self.redchi_max}")
        if not self.max_amplitude_ratio > 0:
            raise ValueError(f"max_amplitude_ratio: must be > 0, got {self.max_amplitude_ratio}")
        if not 0.0 < self.label_threshold <= 1.0:
            raise ValueError(f"label_threshold: must be in (0, 1], got {self.label_threshold}")
