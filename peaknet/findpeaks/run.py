"""The ``findpeaks`` stage: peakfinder8 over CXI/HDF5 or CBF files, writing CXI peak lists.

    peaknet findpeaks --run.inputs='["runs/sim/*.cxi"]' --run.geometry=det.geom \\
        --peakfinder8.preset=om_epix10k2m --run.out=runs/peaks

Frames are read one at a time (never all of a file). Per input:

- a CXI/HDF5 file (frames in ``run.data_path``, slab or stack; ``run.geometry`` gives the slab
  layout, the radius map and the bad regions) -> ``<out>/<stem>.peaks.cxi`` with one row per
  input frame, so row i of the output is frame i of the input (CrystFEL event ``//i``);
- CBF files (one frame each, with their own metrology) -> all into ``<out>/cbf.peaks.cxi``, one
  row per file, the file name as event id.

Bad input never stops the run: a file that cannot be opened, a frame that cannot be read, or a
frame with more than ``run.max_nonfinite_fraction`` NaN/inf pixels is recorded as skipped with the
reason (``<out>/findpeaks.skipped.jsonl``; skipped frames get an empty row and ``skipped = 1`` in
``/entry_1/result_1/skipped``). Fewer NaN/inf pixels are simply treated as masked. The summary
(also ``<out>/findpeaks.summary.json``) counts frames, peaks and skips.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import ConfigError, InputError
from ..peaks import PeakList
from .config import FindPeaksConfig, Peakfinder8Params
from .peakfinder8 import Peakfinder8

log = logging.getLogger(__name__)

STAGE = "findpeaks"
_GLOB_CHARS = set("*?[")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by ``run.inputs``: glob patterns expanded (sorted), plain paths kept as given
    (a missing one is reported as skipped later). A pattern matching nothing is a ConfigError."""
    files: list[Path] = []
    for i, pat in enumerate(patterns):
        if _GLOB_CHARS & set(pat):
            hits = sorted(glob.glob(pat))
            if not hits:
                raise ConfigError(None, f"run.inputs[{i}]", f"pattern {pat!r} matches no file")
            files.extend(Path(h) for h in hits)
        else:
            files.append(Path(pat))
    return files


def _is_cbf(path: Path, fmt: str) -> bool:
    return fmt == "cbf" or (fmt == "auto" and path.suffix.lower() == ".cbf")


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.view(np.uint8).reshape(-1).data)
    return h.hexdigest()


class _FinderCache:
    """One :class:`Peakfinder8` per distinct (radius map, mask): building one sorts the pixels
    by radius, which is worth doing once per detector geometry, not once per frame."""

    def __init__(self, params: Peakfinder8Params):
        self.params = params
        self._finders: dict[str, Peakfinder8] = {}

    def get(self, radius: np.ndarray, mask: np.ndarray) -> Peakfinder8:
        key = _digest(radius, mask)
        pf = self._finders.get(key)
        if pf is None:
            pf = Peakfinder8(radius, mask, self.params)
            self._finders[key] = pf
        return pf

    def for_geometry(self, geom) -> Peakfinder8:
        """The finder for a geometry's radius map and good-pixel mask; files with the same
        metrology share one without recomputing the maps. The key is the ``.geom`` text with
        clen and photon energy fixed: they vary from shot to shot and the radius map in pixels
        does not depend on them."""
        norm = geom.with_values(clen=1.0, photon_energy_eV=1.0)
        key = "geom:" + hashlib.sha1(norm.to_text().encode()).hexdigest()
        pf = self._finders.get(key)
        if pf is None:
            pf = self.get(geom.radius_map(), np.asarray(geom.good_pixel_mask(), bool))
            self._finders[key] = pf
        return pf


@dataclasses.dataclass
class _Tally:
    frames: int = 0
    peaks: int = 0
    hits: int = 0  # frames with at least one peak
    frames_with_nonfinite: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    per_frame: list = dataclasses.field(default_factory=list)


def _nonfinite_fraction(frame: np.ndarray) -> float:
    n_bad = frame.size - int(np.count_nonzero(np.isfinite(frame)))
    return n_bad / max(1, frame.size)


def _read_mask_file(cfg: FindPeaksConfig, geometry, shape: tuple) -> Optional[np.ndarray]:
    """The optional HDF5 mask (1 = good) as a (P, H, W) bool array of ``shape``."""
    if cfg.run.mask_file is None:
        return None
    from ..io.cxi import get_dataset, open_h5

    with open_h5(cfg.run.mask_file) as h5:
        m = np.asarray(get_dataset(h5, cfg.run.mask_path)[()])
    if m.shape != tuple(shape) and geometry is not None and m.shape == tuple(geometry.slab_shape):
        m = geometry.slab_to_stack(m)
    if m.shape != tuple(shape):
        raise InputError(
            cfg.run.mask_file, cfg.run.mask_path,
            f"mask shape {m.shape} matches neither the frames' stack shape {tuple(shape)} "
            "nor the geometry's slab shape",
        )
    return m != 0


class _Stage:
    def __init__(self, cfg: FindPeaksConfig):
        self.cfg = cfg
        self.params = cfg.peakfinder8.params()
        self.out = Path(cfg.run.out)
        self.finders = _FinderCache(self.params)
        self.tally = _Tally()
        self.max_frames = cfg.run.max_frames
        self._names: set[str] = set()
        self._skip_log = None

    # --- bookkeeping -------------------------------------------------------------------------
    def budget_left(self) -> bool:
        used = self.tally.frames + len(self.tally.skipped)
        return self.max_frames is None or used < self.max_frames

    def skip(self, path, event, reason: str) -> None:
        rec = {"file": str(path), "event": None if event is None else str(event), "reason": reason}
        self.tally.skipped.append(rec)
        self._skip_log.write(json.dumps(rec) + "\n")
        self._skip_log.flush()
        log.warning("skipped %s event %s: %s", path, event, reason)

    def output_path(self, stem: str) -> Path:
        name, k = f"{stem}.peaks.cxi", 1
        while name in self._names:
            k += 1
            name = f"{stem}_{k}.peaks.cxi"
        self._names.add(name)
        return self.out / name

    def record(self, peaks: PeakList) -> None:
        self.tally.frames += 1
        self.tally.peaks += len(peaks)
        self.tally.hits += len(peaks) > 0
        self.tally.per_frame.append(len(peaks))

    # --- frames ------------------------------------------------------------------------------
    def find(self, frame: np.ndarray, finder: Peakfinder8, path, event) -> Optional[PeakList]:
        """peakfinder8 on one (P, H, W) frame, or None (recorded as skipped) for a bad frame."""
        frac = _nonfinite_fraction(frame)
        if frac > self.cfg.run.max_nonfinite_fraction:
            self.skip(path, event, f"{100 * frac:.1f}% of the pixels are NaN/inf")
            return None
        self.tally.frames_with_nonfinite += frac > 0
        return finder(frame)

    def run_cxi(self, path: Path) -> None:
        from ..io.cxi import CXIWriter, open_frames

        geometry = self.geometry
        try:
            src = open_frames(path, self.cfg.run.data_path, geometry=geometry)
        except InputError as exc:
            self.skip(path, None, exc.problem)
            return
        with src:
            shape = geometry.stack_shape
            mask = self.mask
            if self.mask_file_mask is None and self.cfg.run.mask_file is not None:
                self.mask_file_mask = _read_mask_file(self.cfg, geometry, shape)
            if self.mask_file_mask is not None:
                mask = mask & self.mask_file_mask
            finder = self.finders.get(self.radius, mask)
            ids = src.event_ids
            out = self.output_path(path.stem)
            with CXIWriter(out, max_peaks=self.params.max_num_peaks, geometry=geometry) as w:
                for i in range(len(src)):
                    if not self.budget_left():
                        break
                    event = ids[i] if ids is not None and i < len(ids) else f"//{i}"
                    try:
                        frame = src.read(i, as_stack=True)
                    except InputError as exc:
                        self.skip(path, event, exc.problem)
                        w.append(PeakList(), event, skipped=1)
                        continue
                    peaks = self.find(frame, finder, path, event)
                    if peaks is None:
                        w.append(PeakList(), event, skipped=1)
                        continue
                    self.record(peaks)
                    w.append(peaks, event, skipped=0)
            self.tally.outputs.append(str(out))

    def iter_cbf(self, files: list[Path]) -> Iterator[tuple[Path, object]]:
        from ..io.cbf import read_cbf

        for path in files:
            if not self.budget_left():
                return
            if not path.is_file():
                self.skip(path, path.name, "file does not exist")
                yield path, None
                continue
            try:
                img = read_cbf(path)
            except (InputError, OSError, ValueError) as exc:
                reason = exc.problem if isinstance(exc, InputError) else f"cannot read: {exc}"
                self.skip(path, path.name, reason)
                img = None
            yield path, img

    def run_cbf(self, files: list[Path]) -> None:
        """All CBF files into one CXI, one row per file. The writer takes the first readable
        file's geometry (slab layout for the peak coordinates); rows of files skipped before it
        opens are written first."""
        from ..io.cxi import CXIWriter

        out = self.output_path("cbf")
        writer = None
        early: list[str] = []
        try:
            for path, img in self.iter_cbf(files):
                if img is None:
                    if writer is None:
                        early.append(path.name)
                    else:
                        writer.append(PeakList(), path.name, skipped=1)
                    continue
                frame = np.asarray(img.stack, np.float32)
                geom = img.geometry
                if writer is None:
                    writer = CXIWriter(out, max_peaks=self.params.max_num_peaks, geometry=geom)
                    for name in early:
                        writer.append(PeakList(), name, skipped=1)
                peaks = self.find(frame, self.finders.for_geometry(geom), path, path.name)
                if peaks is None:
                    writer.append(PeakList(), path.name, skipped=1)
                    continue
                self.record(peaks)
                writer.append(peaks, path.name, skipped=0,
                              photon_energy_eV=img.photon_energy_eV)
            if writer is None:  # nothing readable: still leave a (peak-less) file
                writer = CXIWriter(out, max_peaks=self.params.max_num_peaks)
                for name in early:
                    writer.append(PeakList(), name, skipped=1)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        writer.close()
        self.tally.outputs.append(str(out))

    # --- the run -----------------------------------------------------------------------------
    def load_geometry(self) -> None:
        from ..io.geometry import Geometry

        self.geometry = None
        self.radius = None
        self.mask = None
        self.mask_file_mask = None
        if self.cfg.run.geometry is None:
            return
        self.geometry = Geometry.from_file(self.cfg.run.geometry)
        self.radius = self.geometry.radius_map()
        self.mask = np.asarray(self.geometry.good_pixel_mask(), bool)

    def run(self) -> dict:
        t0 = time.perf_counter()
        files = expand_inputs(self.cfg.run.inputs)
        cbf = [f for f in files if _is_cbf(f, self.cfg.run.format)]
        cxi = [f for f in files if not _is_cbf(f, self.cfg.run.format)]
        self.load_geometry()
        if cxi and self.geometry is None:
            raise ConfigError(
                None, "run.geometry",
                "CXI/HDF5 inputs need a CrystFEL geometry (slab layout and radius map)",
            )
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"{STAGE}.skipped.jsonl", "w") as self._skip_log:
            for path in cxi:
                if not self.budget_left():
                    break
                if not path.is_file():
                    self.skip(path, None, "file does not exist")
                    continue
                self.run_cxi(path)
            if cbf and self.budget_left():
                self.run_cbf(cbf)
        return self.summary(len(files), time.perf_counter() - t0)

    def summary(self, n_files: int, seconds: float) -> dict:
        t = self.tally
        counts = np.asarray(t.per_frame, np.int64)
        s = {
            "stage": STAGE,
            "inputs": n_files,
            "frames": t.frames,
            "hits": t.hits,
            "peaks": t.peaks,
            "peaks_per_frame_median": float(np.median(counts)) if counts.size else None,
            "frames_with_nonfinite_pixels": t.frames_with_nonfinite,
            "skipped": len(t.skipped),
            "skipped_events": t.skipped[:100],
            "outputs": t.outputs,
            "seconds": round(seconds, 3),
            "frames_per_second": round(t.frames / seconds, 2) if seconds > 0 else None,
            "peakfinder8": dataclasses.asdict(self.params),
        }
        tmp = self.out / f"{STAGE}.summary.json.tmp"
        tmp.write_text(json.dumps(s, indent=1, default=str))
        os.replace(tmp, self.out / f"{STAGE}.summary.json")
        return s


def run(cfg: FindPeaksConfig) -> dict:
    """Run the stage (see the module docstring); returns the JSON-able summary."""
    return _Stage(cfg).run()
