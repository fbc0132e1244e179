"""The peak list that every stage exchanges: finders, matchers, writers, the model's decoder.

Coordinate convention (the same everywhere in peaknet):
- ``panel`` is the index of the detector *module* in the stack layout (first axis of a
  (P, H, W) stack); ``ss``/``fs`` are the slow-scan (row) and fast-scan (column) positions
  inside that module, in pixels, with the centre of pixel (i, j) at (i, j).
- Slab coordinates (the panels side by side in one 2-D array, as CXI peak lists store them)
  are ``ss + min_ss[panel]``, ``fs + min_fs[panel]`` (see :mod:`peaknet.io.geometry`).
- Intensities are in detector units (ADU) after local background subtraction.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable

import numpy as np

_COLUMNS = {
    "panel": np.int32,
    "ss": np.float32,
    "fs": np.float32,
    "intensity": np.float32,
    "max_value": np.float32,
    "snr": np.float32,
    "npix": np.int32,
}


@dataclass
class PeakList:
    """Peaks of one frame as columns of equal length N.

    panel (N,) int32 module index; ss, fs (N,) float32 pixel-centre coordinates in the module;
    intensity (N,) float32 background-subtracted total (ADU); max_value (N,) float32 maximum
    background-subtracted pixel (ADU); snr (N,) float32; npix (N,) int32 pixels in the peak.
    """

    panel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    ss: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    fs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    intensity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    max_value: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    snr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    npix: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            arr = np.asarray(getattr(self, f.name), dtype=_COLUMNS[f.name]).reshape(-1)
            setattr(self, f.name, arr)
            if n is None:
                n = arr.size
            elif arr.size != n:
                raise ValueError(
                    f"PeakList column {f.name!r} has {arr.size} entries, expected {n}"
                )

    def __len__(self) -> int:
        return int(self.ss.size)

    @classmethod
    def from_columns(cls, n: int | None = None, **cols) -> "PeakList":
        """Build from any subset of columns; missing ones are zeros of the right length."""
        if n is None:
            n = len(next(iter(cols.values()))) if cols else 0
        full = {k: cols.get(k, np.zeros(n, dt)) for k, dt in _COLUMNS.items()}
        return cls(**full)

    @classmethod
    def concatenate(cls, lists: Iterable["PeakList"]) -> "PeakList":
        """Join several peak lists of the same frame into one."""
        lists = list(lists)
        if not lists:
            return cls()
        return cls(**{k: np.concatenate([getattr(p, k) for p in lists]) for k in _COLUMNS})

    def take(self, index) -> "PeakList":
        """Rows selected by an index array or boolean mask."""
        return PeakList(**{k: getattr(self, k)[index] for k in _COLUMNS})

    def positions(self) -> np.ndarray:
        """(N, 3) float64 array of (panel, ss, fs)."""
        return np.stack([self.panel.astype(np.float64), self.ss, self.fs], axis=1)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in _COLUMNS}
