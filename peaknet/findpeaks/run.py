"""The ``findpeaks`` stage: peakfinder8 over CXI/HDF5 or CBF files, writing CXI peak lists.

    peaknet find-peaks --run.inputs='["runs/sim/*.cxi"]' --run.geometry=det.geom \\
        --peakfinder8.preset=om_epix10k2m --run.out=runs/peaks
    mpiexec -n 8 .venv/bin/python -m jobs.find_peaks --config fp.toml --run.backend=mpi
    sbatch --ntasks=32 slurm/find_peaks.sbatch fp.toml
    peaknet find-peaks --config fp.toml --run.backend=ray --ray.address=127.0.0.1:6379

Frames are read one batch at a time (never all of a file). Per input:

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

At scale
--------
The work runs on the rank-partitioned engine (:mod:`peaknet.parallel`), with ``run.backend``
``serial``, ``mpi`` (``mpiexec``/``srun``: every rank takes its shards), ``ray`` or ``auto``.
Every input event (frame of a CXI file, CBF file; a file that cannot be opened counts as one
event) goes into a plan of shards; each shard's peaks go into a part file
(``parts/findpeaks-shard-NNNNNN.h5``) with a record of every event's fate, written atomically,
so a killed run re-run with the same config redoes only the incomplete shards. When all shards
are complete, rank 0 (the Ray driver) merges them into ``findpeaks.h5`` (``/events/*`` one row
per event; ``/frames/{n_peaks, nonfinite, photon_energy_eV}``; ``/peaks/*`` one row per peak in
module coordinates, ``event`` = row in /events), writes ``findpeaks.manifest.jsonl`` (every
event: done, or skipped with kind and reason), and then the per-input CXI peak lists from it,
row for row as a single process writes them: the outputs do not depend on the backend or the
number of ranks.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import ConfigError, InputError
from ..peaks import PeakList
from .config import FindPeaksConfig, Peakfinder8Params
from .peakfinder8 import Peakfinder8

log = logging.getLogger(__name__)

__all__ = ["STAGE", "FindPeaksTask", "expand_inputs", "export_peak_lists", "run"]

STAGE = "findpeaks"
MERGED = "findpeaks.h5"
_GLOB_CHARS = set("*?[")
_PEAK_SCHEMA = {  # /peaks columns of the parts and of findpeaks.h5 (PeakList dtypes)
    "event": np.int64, "panel": np.int32, "ss": np.float32, "fs": np.float32,
    "intensity": np.float32, "max_value": np.float32, "snr": np.float32, "npix": np.int32,
}
_PEAK_COLS = ("panel", "ss", "fs", "intensity", "max_value", "snr", "npix")


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


def _split_inputs(cfg: FindPeaksConfig) -> tuple[list[Path], list[Path], list[Path]]:
    """(all inputs, CXI/HDF5 inputs, CBF inputs), each in the order given."""
    files = expand_inputs(cfg.run.inputs)
    cbf = [f for f in files if _is_cbf(f, cfg.run.format)]
    cxi = [f for f in files if not _is_cbf(f, cfg.run.format)]
    return files, cxi, cbf


def _load_geometry(spec):
    """A CrystFEL ``.geom`` file, or a shipped detector name (cspad, epix10ka2m, jungfrau4m)."""
    from ..io import geometry as g

    p = Path(spec)
    if not p.is_file() and str(spec) in getattr(g, "BUILTIN_GEOMETRIES", ()):
        return g.load_builtin_geometry(str(spec))
    return g.Geometry.from_file(p)


def _file_key(path) -> Optional[str]:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return str(path)
    return f"{p}:{hashlib.sha1(p.read_bytes()).hexdigest()[:16]}"


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


# --------------------------------------------------------------------------------------------
# the task (what the engine runs on every rank / Ray worker)
# --------------------------------------------------------------------------------------------
# Peakfinder8 objects of this process (building one sorts the detector's pixels by radius: worth
# doing once per detector and process, not once per frame or per Ray task)
_FINDERS: dict[str, Peakfinder8] = {}


@dataclass
class _Frame:
    """A frame on its way to peakfinder8: (P, H, W) float32; ``geometry`` for CBF frames (their
    own metrology), None for CXI frames (the run's geometry)."""

    frame: np.ndarray
    geometry: Any = None
    photon_energy_eV: Optional[float] = None
    nonfinite: bool = False


@dataclass
class _Found:
    peaks: PeakList
    nonfinite: bool
    photon_energy_eV: Optional[float]


class FindPeaksTask:
    """The find-peaks stage as a :class:`peaknet.parallel.ShardTask` (picklable: the config
    travels, the geometry and the finders are rebuilt once per process).

    A batch of frames is one unit of work (one Ray task): reading and peakfinder8 happen where
    the frames are read, only the peak lists travel."""

    name = STAGE
    output_name = MERGED

    def __init__(self, cfg: FindPeaksConfig):
        self.cfg = cfg
        self.params: Peakfinder8Params = cfg.peakfinder8.params()
        self._fp: Optional[str] = None
        self._geometry = None
        self._ready = False

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_geometry=None, _ready=False)
        return state

    # --- per process -----------------------------------------------------------------------
    def setup(self) -> None:
        if self._ready:
            return
        if self.cfg.run.geometry is not None:
            self._geometry = _load_geometry(self.cfg.run.geometry)
        self._ready = True

    def fingerprint(self) -> str:
        if self._fp is None:
            from .. import __version__

            run = self.cfg.run
            key = {
                "version": 1, "peaknet": __version__, "params": dataclasses.asdict(self.params),
                "format": run.format, "data_path": run.data_path,
                "geometry": _file_key(run.geometry), "mask": _file_key(run.mask_file),
                "mask_path": run.mask_path, "max_nonfinite_fraction": run.max_nonfinite_fraction,
                "level": run.compression_level,
            }
            self._fp = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self._fp

    def _cxi_finder(self) -> Peakfinder8:
        key = f"{self.fingerprint()}:cxi"
        pf = _FINDERS.get(key)
        if pf is None:
            geom = self._geometry
            mask = np.asarray(geom.good_pixel_mask(), bool)
            extra = _read_mask_file(self.cfg, geom, tuple(geom.stack_shape))
            if extra is not None:
                mask = mask & extra
            pf = _FINDERS[key] = Peakfinder8(geom.radius_map(), mask, self.params)
        return pf

    def _cbf_finder(self, geom) -> Peakfinder8:
        """The finder for a CBF file's metrology; files with the same metrology share one. The
        key is the ``.geom`` text with clen and photon energy fixed: they vary from shot to
        shot and the radius map in pixels does not depend on them."""
        norm = geom.with_values(clen=1.0, photon_energy_eV=1.0)
        key = (f"{self.fingerprint()}:geom:"
               + hashlib.sha1(norm.to_text().encode()).hexdigest())
        pf = _FINDERS.get(key)
        if pf is None:
            pf = _FINDERS[key] = Peakfinder8(geom.radius_map(),
                                             np.asarray(geom.good_pixel_mask(), bool), self.params)
        return pf

    # --- planning (rank 0 / the Ray driver) ------------------------------------------------
    def plan_events(self):
        """Events in the order a single process visits them: the frames of every CXI input
        (a file that cannot be opened: one placeholder event), then one event per CBF file;
        cut to ``run.max_frames``. ``meta["outputs"]``: the CXI peak lists to write and the
        event range of each."""
        from ..io.cxi import open_frames
        from ..parallel import EventTable

        run = self.cfg.run
        files, cxi, cbf = _split_inputs(self.cfg)
        if cxi and run.mask_file is not None:  # a bad mask file fails the run here, not per frame
            _read_mask_file(self.cfg, self._geometry, tuple(self._geometry.stack_shape))
        names, counts, notes = [], [], {}
        for p in cxi:
            f = str(p)
            names.append(f)
            if not p.is_file():
                counts.append(-1)
                notes[f] = ("unreadable_file", "file does not exist")
                continue
            try:
                with open_frames(p, run.data_path, geometry=self._geometry) as src:
                    counts.append(len(src))
            except InputError as exc:
                counts.append(-1)
                notes[f] = ("unreadable_file", exc.problem)
        for p in cbf:
            f = str(p)
            names.append(f)
            if p.is_file():
                counts.append(1)
            else:
                counts.append(-1)
                notes[f] = ("unreadable_file", "file does not exist")
        budget = math.inf if run.max_frames is None else run.max_frames
        # outputs: a CXI input that opened gets its file if the budget is not spent when a
        # single process would reach it; the CBF files share one (the first name is taken first)
        outputs, taken = [], set()

        def output_name(stem: str) -> str:
            name, k = f"{stem}.peaks.cxi", 1
            while name in taken:
                k += 1
                name = f"{stem}_{k}.peaks.cxi"
            taken.add(name)
            return name

        pos = 0
        for p, n in zip(cxi, counts):
            used = 1 if n < 0 else n
            if n >= 0 and pos < budget:
                outputs.append({"kind": "cxi", "input": str(p), "name": output_name(p.stem),
                                "start": pos, "stop": int(min(pos + n, budget))})
            pos += used
        cbf_start = pos
        if cbf and pos < budget:
            outputs.append({"kind": "cbf", "input": None, "name": output_name("cbf"),
                            "start": pos, "stop": int(min(pos + len(cbf), budget))})
        events = EventTable.from_counts(names, counts, notes)
        if budget < len(events):
            m = int(budget)
            events = EventTable(events.files, events.file_idx[:m], events.index[:m],
                                {k: v for k, v in events.notes.items() if k < m})
        meta = {"outputs": outputs, "cbf_start": cbf_start, "n_inputs": len(files),
                "n_cxi": len(cxi), "n_cbf": len(cbf),
                "max_peaks": int(self.params.max_num_peaks)}
        return events, meta

    # --- reading and processing (any rank / worker) ------------------------------------------
    def read(self, events, start: int, stop: int, meta: dict):
        from ..io.cxi import open_frames
        from ..parallel import Skip

        run = self.cfg.run
        cbf_start = meta["cbf_start"]  # events from here on are CBF files
        for path, ks, idx in events.runs(start, stop):
            if idx[0] < 0:  # placeholders: known bad when planning
                for k in ks:
                    yield int(k), Skip(*(events.note(k) or ("error", "placeholder without a note")))
                continue
            if int(ks[0]) >= cbf_start:
                for k in ks:
                    yield int(k), self._read_cbf(path)
                continue
            try:
                src = open_frames(path, run.data_path, geometry=self._geometry)
            except InputError as exc:
                for k in ks:
                    yield int(k), Skip("unreadable_file", exc.problem)
                continue
            with src:
                for k, i in zip(ks, idx):
                    try:
                        frame = src.read(int(i), as_stack=True)
                    except InputError as exc:
                        yield int(k), Skip("unreadable_frame", exc.problem)
                        continue
                    except (OSError, ValueError, IndexError) as exc:
                        yield int(k), Skip("unreadable_frame", f"cannot read frame {i}: {exc}")
                        continue
                    yield int(k), _Frame(frame)

    @staticmethod
    def _read_cbf(path: str):
        from ..io.cbf import read_cbf
        from ..parallel import Skip

        try:
            img = read_cbf(path)
        except (InputError, OSError, ValueError) as exc:
            reason = exc.problem if isinstance(exc, InputError) else f"cannot read: {exc}"
            return Skip("unreadable_file", reason)
        return _Frame(np.asarray(img.stack, np.float32), img.geometry, img.photon_energy_eV)

    def prepare(self, k: int, item: _Frame):
        from ..parallel import Skip

        frac = _nonfinite_fraction(item.frame)
        if frac > self.cfg.run.max_nonfinite_fraction:
            return Skip("nonfinite", f"{100 * frac:.1f}% of the pixels are NaN/inf")
        item.nonfinite = frac > 0
        return item

    def process(self, item: _Frame) -> _Found:
        pf = self._cxi_finder() if item.geometry is None else self._cbf_finder(item.geometry)
        return _Found(pf(item.frame), item.nonfinite, item.photon_energy_eV)

    # one unit of work per batch: the frames stay where they were read
    def split(self, items):
        return [k for k, _ in items], [[p for _, p in items]]

    def solve(self, sub: list) -> list:
        from ..parallel.task import skip_from_exception

        out = []
        for item in sub:
            try:
                out.append(self.process(item))
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the batch
                log.warning("findpeaks: %s", exc)
                out.append(skip_from_exception(exc))
        return out

    def combine(self, keys: list, results: list) -> list:
        return list(zip(keys, results[0] if results else []))

    # --- writing -----------------------------------------------------------------------------
    def open_writer(self, h5, plan, shard):
        return _PartWriter(h5, self.cfg.run.compression_level)

    def summarize(self, stats: dict) -> dict:
        return {}


class _PartWriter:
    """Rows of one shard: per event ``/frames/{n_peaks, nonfinite, photon_energy_eV}``, per
    peak ``/peaks/*`` (module coordinates, ``event`` = position in the plan)."""

    def __init__(self, h5, level: int):
        from ..parallel import RowAppender

        self.h5 = h5
        self.level = level
        self.peaks = RowAppender(h5.require_group("peaks"), dict(_PEAK_SCHEMA), level=level)
        self.peaks.group.attrs["coordinates"] = (
            "module (stack) coordinates: panel, ss, fs with the centre of pixel (i, j) at (i, j)")
        self.n_peaks: list[int] = []
        self.nonfinite: list[int] = []
        self.energy: list[float] = []
        self.frames = self.hits = self.n_nonfinite = 0

    def write(self, k: int, res: _Found) -> None:
        p = res.peaks
        n = len(p)
        if n:
            self.peaks.append(event=np.full(n, k, np.int64), **{c: getattr(p, c) for c in _PEAK_COLS})
        self.n_peaks.append(n)
        self.nonfinite.append(int(res.nonfinite))
        self.energy.append(np.nan if res.photon_energy_eV is None else float(res.photon_energy_eV))
        self.frames += 1
        self.hits += n > 0
        self.n_nonfinite += int(res.nonfinite)

    def skip(self, k: int, skip) -> None:
        self.n_peaks.append(0)
        self.nonfinite.append(0)
        self.energy.append(np.nan)

    def close(self) -> dict:
        self.peaks.flush()
        g = self.h5.require_group("frames")
        kw = {"compression": "gzip", "compression_opts": self.level}
        for name, vals, dt in (("n_peaks", self.n_peaks, np.int32),
                               ("nonfinite", self.nonfinite, np.uint8),
                               ("photon_energy_eV", self.energy, np.float64)):
            ds = g.create_dataset(name, data=np.asarray(vals, dt), **kw)
            ds.attrs["rows"] = "event"
        return {"frames": self.frames, "peaks": int(sum(self.n_peaks)), "hits": self.hits,
                "frames_with_nonfinite_pixels": self.n_nonfinite}


# --------------------------------------------------------------------------------------------
# the per-input CXI peak lists, from the merged output
# --------------------------------------------------------------------------------------------
class _PeakRows:
    """Peak lists of events of ``findpeaks.h5`` read block by block (bounded memory)."""

    def __init__(self, h5, n_peaks: np.ndarray, block: int = 4096):
        self.h5 = h5
        self.off = np.concatenate([[0], np.cumsum(n_peaks, dtype=np.int64)])
        self.block = block
        self._a = self._b = 0
        self._cols: dict = {}

    def get(self, k: int) -> PeakList:
        if not self._a <= k < self._b:
            self._a, self._b = k, min(k + self.block, self.off.size - 1)
            r0, r1 = int(self.off[self._a]), int(self.off[self._b])
            self._cols = {c: self.h5[f"peaks/{c}"][r0:r1] for c in _PEAK_COLS}
        r0 = int(self.off[k] - self.off[self._a])
        r1 = int(self.off[k + 1] - self.off[self._a])
        return PeakList(**{c: a[r0:r1] for c, a in self._cols.items()})


def export_peak_lists(cfg: FindPeaksConfig, out: Path, plan_meta: dict) -> dict:
    """Write the per-input CXI peak lists and ``findpeaks.skipped.jsonl`` from ``findpeaks.h5``
    and the manifest; return the stage's counters (frames, peaks, skips, outputs)."""
    import h5py

    from ..io.cxi import CXIWriter, open_h5, read_event_ids
    from ..parallel import read_manifest

    params = cfg.peakfinder8.params()
    skipped: dict[int, tuple[str, str, str]] = {}  # k -> (event id, kind, reason)
    for r in read_manifest(out / f"{STAGE}.manifest.jsonl"):
        if r["status"] == "skipped":
            skipped[int(r["index"])] = (r["event"], r["kind"], r["reason"])
    records: dict[int, dict] = {}  # k -> findpeaks.skipped.jsonl row
    geometry = None
    outputs = []
    with h5py.File(out / MERGED, "r") as h5:

        def column(name, dtype):  # a run of no events has no datasets at all
            return h5[name][()].astype(dtype) if name in h5 else np.zeros(0, dtype)

        status = column("events/status", np.uint8)
        n_peaks = column("frames/n_peaks", np.int64)
        nonfinite = column("frames/nonfinite", np.uint8)
        energy = column("frames/photon_energy_eV", np.float64)
        rows = _PeakRows(h5, n_peaks)
        for o in plan_meta["outputs"]:
            a, b = int(o["start"]), int(o["stop"])
            path = out / o["name"]
            if o["kind"] == "cxi":
                if geometry is None and cfg.run.geometry is not None:
                    geometry = _load_geometry(cfg.run.geometry)
                try:
                    with open_h5(o["input"]) as src:
                        ids = read_event_ids(src)
                except (InputError, OSError):
                    ids = None
                writer = CXIWriter(path, max_peaks=params.max_num_peaks, geometry=geometry)
                try:
                    for k in range(a, b):
                        i = k - a
                        ev = ids[i] if ids is not None and i < len(ids) else f"//{i}"
                        if status[k]:
                            writer.append(PeakList(), ev, skipped=1)
                            records[k] = {"file": o["input"], "event": ev, "reason": skipped[k][2]}
                        else:
                            writer.append(rows.get(k), ev, skipped=0)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
            else:  # CBF: one row per file; slab coordinates from the first readable file
                files = [x.decode().rpartition("//")[0] for x in h5["events/event_id"][a:b]]
                first = next((j for j in range(b - a) if not status[a + j]
                              or skipped[a + j][1] != "unreadable_file"), None)
                cbf_geom = None
                if first is not None:
                    from ..io.cbf import read_cbf

                    cbf_geom = read_cbf(files[first]).geometry
                writer = CXIWriter(path, max_peaks=params.max_num_peaks, geometry=cbf_geom)
                try:
                    for j, f in enumerate(files):
                        k = a + j
                        name = Path(f).name
                        if status[k]:
                            writer.append(PeakList(), name, skipped=1)
                            records[k] = {"file": f, "event": name, "reason": skipped[k][2]}
                        else:
                            e = float(energy[k])
                            writer.append(rows.get(k), name, skipped=0,
                                          photon_energy_eV=None if math.isnan(e) else e)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
            outputs.append(str(path))
    for k, (ev, kind, reason) in skipped.items():  # file-level events outside every output
        if k not in records:
            records[k] = {"file": ev.rpartition("//")[0], "event": None, "reason": reason}
    skip_rows = [records[k] for k in sorted(records)]
    tmp = out / f"{STAGE}.skipped.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in skip_rows))
    os.replace(tmp, out / f"{STAGE}.skipped.jsonl")
    for r in skip_rows:
        log.warning("skipped %s event %s: %s", r["file"], r["event"], r["reason"])
    done = status == 0
    counts = n_peaks[done]
    return {
        "inputs": plan_meta.get("n_inputs", 0),
        "frames": int(done.sum()),
        "hits": int(np.count_nonzero(counts)),
        "peaks": int(counts.sum()),
        "peaks_per_frame_median": float(np.median(counts)) if counts.size else None,
        "frames_with_nonfinite_pixels": int(np.count_nonzero(nonfinite[done])),
        "skipped": len(skip_rows),
        "skipped_events": skip_rows[:100],
        "outputs": outputs,
        "output_sizes": {Path(p).name: Path(p).stat().st_size for p in outputs},
    }


def _exported(prev: dict, out: Path) -> bool:
    """True if ``prev`` (a stored summary) says its peak lists were written and they are there."""
    sizes = prev.get("output_sizes")
    if not prev.get("exported") or not isinstance(sizes, dict):
        return False
    try:
        return all((out / name).stat().st_size == size for name, size in sizes.items())
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def run_options(cfg: FindPeaksConfig):
    from ..parallel import RunOptions

    r = cfg.run
    return RunOptions(out=Path(r.out), shard_size=r.shard_size, batch_size=r.batch_frames,
                      assignment=r.assignment, resume=r.resume, verify=r.verify,
                      stop_after_shards=r.stop_after_shards, keep_parts=r.keep_parts,
                      progress=r.progress, level=r.compression_level)


def ray_options(cfg: FindPeaksConfig):
    from ..parallel import RayOptions

    r = cfg.ray
    return RayOptions(address=r.address, num_cpus=r.num_cpus, temp_dir=r.temp_dir,
                      namespace=r.namespace, max_in_flight=r.max_in_flight,
                      in_flight_per_cpu=r.in_flight_per_cpu, batch_cpus=r.batch_cpus,
                      solve_cpus=r.batch_cpus, max_retries=r.max_retries)


def _finish(cfg: FindPeaksConfig, summary: dict, t0: float) -> dict:
    """Rank 0 / driver: the per-input CXI files (unless this plan's are already written), the
    stage's counters merged into the engine's summary (``findpeaks.summary.json``)."""
    from ..parallel.manifest import atomic_write_json

    out = Path(cfg.run.out)
    if not summary.get("complete"):
        return summary
    if summary.get("reused") and _exported(summary, out):
        return summary
    plan = json.loads((out / f"{STAGE}.plan.json").read_text())
    if plan.get("fingerprint") != summary.get("plan"):
        raise RuntimeError(f"{out}/{STAGE}.plan.json is of plan {plan.get('fingerprint')}, "
                           f"the summary of {summary.get('plan')} (another run wrote here?)")
    stage = export_peak_lists(cfg, out, plan["meta"])
    seconds = time.perf_counter() - t0
    frames = stage["frames"]
    summary = {**summary, **stage, "exported": True, "seconds": round(seconds, 3),
               "frames_per_second": round(frames / seconds, 2) if seconds > 0 else None,
               "peakfinder8": dataclasses.asdict(cfg.peakfinder8.params())}
    stored = {k: v for k, v in summary.items() if k != "reused"}
    atomic_write_json(out / f"{STAGE}.summary.json", stored)
    return summary


def run(cfg: FindPeaksConfig) -> dict:
    """Run the stage (see the module docstring); returns the JSON-able summary. Under MPI
    every rank runs this; rank 0 returns the summary, the other ranks ``{}``."""
    from ..parallel import get_comm, launcher_size, run_ray, run_sharded

    t0 = time.perf_counter()
    _, cxi, _ = _split_inputs(cfg)  # bad patterns fail here, on every rank
    if cxi and cfg.run.geometry is None:
        raise ConfigError(
            None, "run.geometry",
            "CXI/HDF5 inputs need a CrystFEL geometry (slab layout and radius map)",
        )
    task = FindPeaksTask(cfg)
    opts = run_options(cfg)
    if cfg.run.backend == "ray":
        if launcher_size() > 1:
            raise RuntimeError(f"backend 'ray' but {launcher_size()} processes were launched "
                               "(mpiexec/srun): start one driver process")
        return _finish(cfg, run_ray(task, opts, ray_options(cfg)), t0)
    comm = get_comm(cfg.run.backend)
    summary = run_sharded(task, opts, comm, backend=comm.name)
    # rank 0 writes the peak lists; every rank learns whether that worked (a job step ends
    # when its peak lists are there, and fails on every rank if they could not be written)
    result, err = None, None
    if comm.rank == 0:
        try:
            result = _finish(cfg, summary, t0)
        except Exception as exc:  # noqa: BLE001 - told to every rank below
            err = exc
    msgs = comm.allgather(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if any(msgs):
        from ..parallel import IncompleteRunError

        raise IncompleteRunError(f"findpeaks: writing the peak lists failed on rank 0: {msgs[0]}")
    return result if comm.rank == 0 else {}
