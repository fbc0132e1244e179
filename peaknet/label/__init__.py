"""Segmentation labels from 2-D pseudo-Voigt fits of Bragg peaks (PeakNet paper, 2.1.2).

One call per frame::

    from peaknet.label import LabelFitConfig, label_peaks
    res = label_peaks(stack, peaks, mask, LabelFitConfig(solver="batched"))
    res.label     # (P, H, W) uint8 segmentation label
    res.table     # per-peak fitted parameters, redchi, status
    res.counts()  # peaks per status

Pieces: :mod:`.pvoigt` (model, Jacobian, bounds, guesses, lmfit's transform),
:mod:`.windows` (cutting and pre-fit status), :mod:`.fit_lmfit` (reference: lmfit per peak;
scipy as a second referee), :mod:`.fit_batched` (vectorised MINPACK Levenberg-Marquardt in
torch, CPU or CUDA), :mod:`.labels` (status, labels, table), :mod:`.config`. The solvers are
imported from their submodules (``from peaknet.label.fit_batched import fit_batched``).
"""
from .config import LabelFitConfig
from .labels import LabelResult, assign_status, fit_windows, label_peaks, peak_table, \
    render_labels, resolve_adu_per_photon
from .pvoigt import PARAM_NAMES, WindowFits, initial_guess, jacobian, model, param_bounds, \
    profile, pvoigt2d
from .windows import STATUS_NAMES, Flag, Status, Windows, cut_windows

__all__ = [
    "LabelFitConfig", "LabelResult", "label_peaks", "fit_windows", "assign_status",
    "render_labels", "peak_table", "resolve_adu_per_photon", "cut_windows", "Windows",
    "Status", "Flag", "STATUS_NAMES",
    "WindowFits", "PARAM_NAMES", "pvoigt2d", "model", "profile", "jacobian", "param_bounds",
    "initial_guess",
]
# The solvers live in their submodules (imported on use: torch, lmfit):
#   from peaknet.label.fit_batched import fit_batched
#   from peaknet.label.fit_lmfit import fit_lmfit, fit_scipy
# or through fit_windows(windows, cfg, solver="batched" | "lmfit" | "scipy").
