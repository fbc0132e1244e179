"""Classical peak finding: peakfinder8 (numba) and the ``findpeaks`` stage.

    from peaknet.findpeaks import Peakfinder8, peakfinder8, preset
    pf = Peakfinder8(radius, mask, preset("lcls_cspad"))   # radius/mask: (P, H, W)
    peaks = pf(stack)                                       # a peaknet.peaks.PeakList

The stage (``peaknet findpeaks``) lives in :mod:`peaknet.findpeaks.run`.
"""
from .config import (
    PRESETS,
    FindPeaksConfig,
    FindPeaksRunSection,
    Peakfinder8Params,
    Peakfinder8Section,
    preset,
)
from .peakfinder8 import Peakfinder8, peakfinder8, radial_thresholds

__all__ = [
    "PRESETS",
    "FindPeaksConfig",
    "FindPeaksRunSection",
    "Peakfinder8",
    "Peakfinder8Params",
    "Peakfinder8Section",
    "peakfinder8",
    "preset",
    "radial_thresholds",
]
