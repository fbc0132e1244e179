"""The ``label`` stage: pseudo-Voigt labels for every found peak of many frames, at scale.

    peaknet label --run.inputs='["runs/sim/*.cxi"]' --run.out=runs/label
    mpiexec -n 64 .venv/bin/python -m jobs.label --config label.toml --run.backend=mpi
    sbatch slurm/label.sbatch label.toml --run.out=runs/label
    peaknet label --config label.toml --run.backend=ray --ray.address=127.0.0.1:6379

Inputs (``[run]``): CXI/HDF5 files with frames (``inputs``: paths or glob patterns), each
frame's peaks from a CXI peak list (``peaks``: empty = the list inside each input file, as the
generator's shards and CXIWriter files carry; or a template such as
``runs/peaks/{stem}.peaks.cxi`` for the find-peaks stage's outputs, row i = frame i), and
optionally a ``manifest`` of selected events (the curation manifest: rows with ``selected``
true; events named ``<file>//<index>`` or by the inputs' own event ids).

Work: per frame, the label owner's pieces (:mod:`peaknet.label`): ``cut_windows``, the
configured solver (``[fit]``, a :class:`~peaknet.label.config.LabelFitConfig`; the fits run in
photon units with ``fit.adu_per_photon``, "auto" = from ``run.geometry``'s gain, 1.0 without
one; the summary reports the gain used as ``adu_per_photon``), ``assign_status``,
``render_labels``, ``peak_table``. The fits of a batch of ``batch_frames`` frames are grouped into
chunks of ``chunk_peaks`` windows: one solver call each (and one Ray task each under Ray). The
batches and chunks depend only on the event order and these sizes, so the serial, MPI and Ray
backends write identical outputs; resuming reuses complete shards (see :mod:`peaknet.parallel`).

Outputs in ``run.out``:

- ``labels.h5``: ``/labels/mask`` (N, P, H, W) uint8, one gzip chunk per frame, aligned with
  ``/events/*`` (N rows in plan order: ``event_id`` "<file>//<frame>", ``frame``, ``status`` 0
  done / 1 skipped, ``kind``, ``reason``): 1 = peak, 255 = ignore (the window of a peak whose
  fit was rejected), 0 = background; ``/frames/{n_peaks, n_ok, n_labelled_pixels,
  source_event_id}`` per event; ``/peaks/*``: one row per input peak of every processed frame
  (``event`` = row in /events, ``peak`` = index in the frame's peak list, fitted parameters in
  module coordinates, ``redchi``, ``status`` code, flags, ...; ``/peaks/status`` attrs name
  the codes);
- ``label.manifest.jsonl`` (every input event: done, or skipped with the reason),
  ``label.summary.json`` (counts per status), ``label.plan.json``, ``parts/``.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import h5py
import numpy as np

from ..errors import ConfigError, InputError
from ..peaks import PeakList
from ..parallel import (EventTable, Plan, RayOptions, RowAppender, RunOptions, Shard, Skip,
                        get_comm, launcher_size, parse_event_id, run_ray, run_sharded,
                        write_string_dataset)
from .config import LabelFitConfig

log = logging.getLogger("peaknet.label")

__all__ = ["LabelConfig", "LabelRunSection", "LabelRaySection", "LabelTask", "run",
           "IGNORE"]

IGNORE = 255  # label value of the pixels of rejected peaks' windows
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
@dataclass
class LabelRunSection:
    """``[run]`` of ``peaknet label``.

    inputs: CXI/HDF5 files (paths or glob patterns, expanded in sorted order) with frames in
        ``data_path``: (N, P, H, W) stacks, or (N, SS, FS) slabs (with ``geometry``: converted
        to its stack; without: one module).
    peaks: where each input's peak list is: "" = in the input file itself (``peak_group``);
        otherwise a template with {dir}, {stem}, {name} of the input, e.g.
        "runs/peaks/{stem}.peaks.cxi". Row i of the list belongs to frame i. With
        ``geometry`` the positions are slab coordinates (converted to modules); without, they
        are module coordinates with the module in peakSegPosRaw (as CXIWriter writes them).
    manifest: optional list of events to label (curation manifest, JSON lines or CSV): rows
        with ``selected`` true (or ``status`` "done"), events as "<file>//<index>" or as the
        inputs' event ids. Events it names that are not among the inputs are reported skipped.
    geometry: a CrystFEL .geom file or a shipped detector name (cspad, epix10ka2m, jungfrau4m).
    mask_file, mask_path: optional HDF5 pixel mask (non-zero = good) of the stack or slab shape.
    out: run folder.
    backend: "auto" (MPI when launched by mpiexec/srun with several processes, else serial),
        "serial", "mpi", "ray".
    shard_size: events per shard (part file; unit of resume). batch_frames: frames per batch
        (one Ray frame-batch task; the paper used 40). chunk_peaks: windows per solver call
        (one Ray fit task each). assignment: shards to MPI ranks "round_robin" or "block".
    max_events: label only the first N events of the plan.
    max_nonfinite_fraction: frames with a larger fraction of NaN/inf pixels are skipped
        ("nonfinite"); fewer are left to ``fit.nan_policy`` per window.
    resume / verify / keep_parts / stop_after_shards: see :class:`peaknet.parallel.RunOptions`
        (stop_after_shards interrupts a run on purpose: tests, partial runs).
    threads: torch threads per process (default 1: the batched solver gains nothing from more
        threads on CPU, and oversubscribed threads slow it down a lot; parallelism comes from
        MPI ranks or Ray workers). None leaves torch's default.
    compression_level: gzip level of masks and tables (1-9).
    progress: tqdm bar on rank 0 / the Ray driver.
    """

    inputs: list[str] = field(default_factory=list)
    data_path: str = "/entry_1/data_1/data"
    peaks: str = ""
    peak_group: str = "/entry_1/result_1"
    manifest: Optional[str] = None
    geometry: Optional[str] = None
    mask_file: Optional[str] = None
    mask_path: str = "/data/data"
    out: str = "runs/label"
    backend: Literal["auto", "serial", "mpi", "ray"] = "auto"
    shard_size: int = 200
    batch_frames: int = 40
    chunk_peaks: int = 2048
    assignment: Literal["round_robin", "block"] = "round_robin"
    max_events: Optional[int] = None
    max_nonfinite_fraction: float = 0.5
    resume: bool = True
    verify: Literal["digest", "size"] = "digest"
    keep_parts: bool = True
    stop_after_shards: Optional[int] = None
    threads: Optional[int] = 1
    compression_level: int = 4
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one input file or glob pattern is needed")
        for key in ("shard_size", "batch_frames", "chunk_peaks"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_events is not None and self.max_events < 0:
            raise ValueError(f"max_events: must be >= 0, got {self.max_events}")
        if not 0.0 <= self.max_nonfinite_fraction <= 1.0:
            raise ValueError(f"max_nonfinite_fraction: must be in [0, 1], got {self.max_nonfinite_fraction}")
        if self.stop_after_shards is not None and self.stop_after_shards < 0:
            raise ValueError(f"stop_after_shards: must be >= 0, got {self.stop_after_shards}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {self.threads}")
        if not 1 <= self.compression_level <= 9:
            raise ValueError(f"compression_level: must be 1..9, got {self.compression_level}")
        if self.peaks and not any(t in self.peaks for t in ("{stem}", "{name}")):
            raise ValueError(f"peaks: a template needs {{stem}} or {{name}}, got {self.peaks!r}")


@dataclass
class LabelRaySection:
    """``[ray]``: used with ``run.backend = "ray"``.

    address: a running Ray cluster ("127.0.0.1:6379"; "auto" finds any Ray on this machine);
        None starts a private one on 127.0.0.1 with ``num_cpus`` CPUs for the run.
    max_in_flight: frame-batch tasks in flight (the paper: 80), capped at
        ``in_flight_per_cpu`` x the cluster's CPUs. batch_cpus, fit_cpus: CPUs reserved by a
        frame-batch task and by a fit task. max_retries: retries of tasks whose worker died.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    temp_dir: Optional[str] = None
    namespace: str = "peaknet"
    max_in_flight: int = 80
    in_flight_per_cpu: float = 2.0
    batch_cpus: float = 1.0
    fit_cpus: float = 1.0
    max_retries: int = 3

    def validate(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {self.max_in_flight}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus: must be >= 1, got {self.num_cpus}")
        for key in ("batch_cpus", "fit_cpus", "in_flight_per_cpu"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")


@dataclass
class LabelConfig:
    """Config of ``peaknet label``: ``[run]``, ``[fit]`` (the label fits) and ``[ray]``."""

    run: LabelRunSection = field(default_factory=LabelRunSection)
    fit: LabelFitConfig = field(default_factory=LabelFitConfig)
    ray: LabelRaySection = field(default_factory=LabelRaySection)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Glob patterns expanded (sorted); plain paths kept as given (a missing one is reported
    skipped later). A pattern matching nothing is a ConfigError."""
    files: list[str] = []
    for i, pat in enumerate(patterns):
        if _GLOB_CHARS & set(pat):
            hits = sorted(glob.glob(pat))
            if not hits:
                raise ConfigError(None, f"run.inputs[{i}]", f"pattern {pat!r} matches no file")
            files.extend(hits)
        else:
            files.append(str(pat))
    return files


def _peaks_path(template: str, frames_path: str) -> str:
    if not template:
        return frames_path
    p = Path(frames_path)
    return template.format(dir=str(p.parent), stem=p.stem, name=p.name)


_PEAK_COLS = {  # CXI dataset -> PeakList column
    "peakTotalIntensity": "intensity",
    "peakMaximumValue": "max_value",
    "peakSNR": "snr",
    "peakNPixels": "npix",
    "peakSegPosRaw": "panel",
}


def read_peak_rows(path: str, group: str, start: int, stop: int, geometry=None
                   ) -> tuple[dict, int]:
    """Peak lists of rows ``start..stop-1`` of a CXI peak-list group: ({row: PeakList or
    Skip}, number of rows in the file). Reads only those rows and the columns up to their
    largest nPeaks (bounded memory for large files)."""
    from ..io.cxi import get_dataset, open_h5

    with open_h5(path, field=group) as h5:
        npk = get_dataset(h5, f"{group}/nPeaks")
        if npk.ndim != 1 or npk.dtype.kind not in "iuf":
            raise InputError(path, npk.name, f"must be a 1-D numeric dataset, has shape {npk.shape}")
        n_rows = int(npk.shape[0])
        stop = min(stop, n_rows)
        if stop <= start:
            return {}, n_rows
        counts = np.asarray(npk[start:stop]).astype(np.int64)
        sets = {"fs": get_dataset(h5, f"{group}/peakXPosRaw"), "ss": get_dataset(h5, f"{group}/peakYPosRaw")}
        for name, col in _PEAK_COLS.items():
            if f"{group}/{name}" in h5:
                sets[col] = get_dataset(h5, f"{group}/{name}")
        for col, ds in sets.items():
            if ds.ndim != 2 or ds.shape[0] != n_rows:
                raise InputError(path, ds.name, f"shape {ds.shape}, expected ({n_rows}, maxPeaks) like nPeaks")
        width = min(ds.shape[1] for ds in sets.values())
        kmax = int(np.clip(counts, 0, width).max(initial=0))
        cols = {c: np.asarray(ds[start:stop, :kmax], dtype=np.float64) for c, ds in sets.items()}
        up = h5.get(f"{group}/skipped")  # find-peaks marks the frames it skipped
        upstream = (np.asarray(up[start:stop]) == 1) if isinstance(up, h5py.Dataset) and up.ndim == 1 \
            and up.shape[0] == n_rows else np.zeros(stop - start, bool)
    out: dict[int, Any] = {}
    for r, c in enumerate(counts):
        row = start + r
        if upstream[r]:
            out[row] = Skip("skipped_upstream", f"{path} [{group}/skipped] row {row}: the peak "
                                                "finder skipped this frame")
            continue
        if c < 0 or c > width:
            out[row] = Skip("bad_peak_list", f"{path} [{group}/nPeaks] row {row}: nPeaks={c} outside 0..{width}")
            continue
        v = {k: a[r, :c] for k, a in cols.items()}
        seg = np.rint(v.pop("panel")) if "panel" in v else np.zeros(c)
        ss, fs = v.pop("ss"), v.pop("fs")
        if geometry is not None and c:
            seg, ss, fs = geometry.slab_to_stack_coords(ss, fs)
        if "npix" in v:
            v["npix"] = np.rint(v["npix"])
        out[row] = PeakList.from_columns(int(c), panel=seg, ss=ss, fs=fs, **v)
    return out, n_rows


@dataclass
class _Input:
    frame: np.ndarray  # (P, H, W) float32
    peaks: PeakList
    source_id: str


@dataclass
class _Prepared:
    windows: Any  # peaknet.label.windows.Windows
    source_id: str


@dataclass
class LabelFrame:
    """The labels of one frame as they travel to the writer: the mask as one zlib-compressed
    HDF5 chunk (the writer stores it as is), the per-peak rows, and counters."""

    mask_chunk: bytes
    rows: dict
    n_peaks: int
    n_ok: int
    n_labelled_pixels: int
    status_counts: np.ndarray
    source_id: str


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
def _file_digest(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return str(path)  # a shipped detector name
    h = hashlib.sha1(p.read_bytes())
    return f"{p}:{h.hexdigest()[:16]}"


def _concat_windows(parts: list):
    from .windows import Windows

    if len(parts) == 1:
        return parts[0]
    return Windows(*(np.concatenate([getattr(w, f) for w in parts])
                     for f in ("data", "good", "panel", "origin", "peak_yx", "status", "flags")),
                   stack_shape=parts[0].stack_shape)


def peak_schema(window: int) -> dict:
    """HDF5 dtypes of the per-peak table: ``event``, ``peak`` and every numeric column of
    :func:`peaknet.label.labels.peak_table`."""
    from .labels import peak_table
    from .pvoigt import WindowFits
    from .windows import Windows

    n = 1  # one (unfitted) window: every column with its real dtype
    w = Windows(np.zeros((n, window, window)), np.ones((n, window, window), bool),
                np.zeros(n, np.int64), np.zeros((n, 2), np.int64), np.zeros((n, 2)),
                np.ones(n, np.int8), np.zeros(n, np.uint16), (1, window, window))
    tab = peak_table(w, WindowFits.empty(n), np.ones(n, np.int8), np.zeros(n, np.int32))
    schema = {"event": np.dtype(np.int64), "peak": np.dtype(np.int32)}
    for k, v in tab.items():
        a = np.asarray(v)
        if a.dtype.kind in "biuf":
            schema[k] = np.dtype(np.uint8) if a.dtype.kind == "b" else a.dtype
    return schema


class LabelTask:
    """The label stage as a :class:`peaknet.parallel.ShardTask` (picklable: config, geometry
    and pixel mask travel with it, once per process)."""

    name = "label"
    output_name = "labels.h5"

    def __init__(self, cfg: LabelConfig):
        self.cfg = cfg
        self._geometry = None
        self._mask: Optional[np.ndarray] = None
        self._ready = False
        self._schema: Optional[dict] = None
        self._gain: Any = None  # ADU per photon: a number or one per module (setup)
        self._gain_source = ""

    # --- per process -----------------------------------------------------------------------
    def setup(self) -> None:
        if self._ready:
            return
        run = self.cfg.run
        if run.threads:
            import torch

            torch.set_num_threads(run.threads)
        if run.geometry:
            from ..io import geometry as g

            p = Path(run.geometry)
            self._geometry = g.parse_geometry(p) if p.is_file() else g.load_builtin_geometry(run.geometry)
        if run.mask_file:
            self._mask = self._load_mask()
        from .labels import resolve_adu_per_photon

        n_mod = None if self._geometry is None else self._geometry.stack_shape[0]
        self._gain, self._gain_source = resolve_adu_per_photon(self.cfg.fit, self._geometry, n_mod)
        self._ready = True

    def _load_mask(self) -> np.ndarray:
        from ..io.cxi import get_dataset, open_h5

        run = self.cfg.run
        with open_h5(run.mask_file, field=run.mask_path) as h5:
            m = np.asarray(get_dataset(h5, run.mask_path)[()])
        g = self._geometry
        if g is not None and m.shape == tuple(g.slab_shape):
            m = g.slab_to_stack(m)
        if m.ndim == 2:
            m = m[None]
        return m != 0

    def fingerprint(self) -> str:
        from .. import __version__

        run = self.cfg.run
        key = {
            "version": 2, "peaknet": __version__,  # parts never mix code versions (2: photons)
            "fit": dataclasses.asdict(self.cfg.fit),
            "data_path": run.data_path, "peaks": run.peaks, "peak_group": run.peak_group,
            "geometry": _file_digest(run.geometry), "mask": _file_digest(run.mask_file),
            "mask_path": run.mask_path, "max_nonfinite_fraction": run.max_nonfinite_fraction,
            "chunk_peaks": run.chunk_peaks, "level": run.compression_level, "ignore": IGNORE,
        }
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # --- planning (rank 0) -------------------------------------------------------------------
    def _open(self, path: str):
        from ..io.cxi import open_frames

        return open_frames(path, self.cfg.run.data_path, geometry=self._geometry)

    def _stack_shape(self, src) -> tuple:
        if self._geometry is not None:
            return tuple(self._geometry.stack_shape)
        fs = tuple(src.frame_shape)
        return (1,) + fs if len(fs) == 2 else fs

    def plan_events(self) -> tuple[EventTable, dict]:
        run = self.cfg.run
        files = expand_inputs(run.inputs)
        counts, notes, shape, ids = [], {}, None, {}
        selected = self._selected_events() if run.manifest else None
        for f in files:
            try:
                with self._open(f) as src:
                    counts.append(len(src))
                    if shape is None:
                        shape = self._stack_shape(src)
                    if selected is not None and selected[1]:
                        ids[f] = src.event_ids
            except InputError as exc:
                counts.append(-1)
                notes[f] = ("unreadable_file", str(exc))
        if selected is None:
            events = EventTable.from_counts(files, counts, notes)
        else:
            events = self._select(files, counts, notes, ids, *selected)
        if run.max_events is not None and run.max_events < len(events):
            n = run.max_events
            events = EventTable(events.files, events.file_idx[:n], events.index[:n],
                                {k: v for k, v in events.notes.items() if k < n})
        meta = {"frame_shape": None if shape is None else [int(x) for x in shape],
                "n_inputs": len(files)}
        if shape is None:
            log.warning("label: no input file could be opened; every event will be skipped")
        return events, meta

    def _selected_events(self) -> tuple[list[str], set]:
        """Events the manifest selects (in its order) and the set of those that are not
        "<file>//<index>" ids (to be matched against the inputs' own event ids)."""
        from ..match.curate import read_manifest

        rows = read_manifest(self.cfg.run.manifest)
        out = []
        for r in rows:
            if "event" not in r:
                raise InputError(self.cfg.run.manifest, "event", "manifest rows need an 'event' field")
            if "selected" in r:
                keep = r["selected"] in (True, "True", "true", 1, "1")
            elif "status" in r:
                keep = r["status"] == "done"
            else:
                keep = True
            if keep:
                out.append(str(r["event"]))
        foreign = set()
        for e in out:
            try:
                parse_event_id(e)
            except ValueError:
                foreign.add(e)
        return out, foreign

    def _select(self, files, counts, notes, ids, wanted: list[str], foreign: set) -> EventTable:
        by_path: dict[tuple[str, int], None] = {}
        by_id: dict[str, tuple[str, int]] = {}
        for f, n in zip(files, counts):
            if n >= 0 and ids.get(f):
                for i, e in enumerate(ids[f][:n]):
                    by_id.setdefault(e, (f, i))
        count = dict(zip(files, counts))
        hits: set = set()
        missing: list[str] = []
        for e in wanted:
            if e in foreign:
                hit = by_id.get(e)
            else:
                f, i = parse_event_id(e)
                hit = (f, i) if count.get(f, -1) > i >= 0 else None
                if hit is None and f in count and count[f] < 0:
                    hit = ("unreadable", f)
            if hit is None:
                missing.append(e)
            elif hit[0] == "unreadable":
                hits.add((hit[1], -1))
            else:
                hits.add(hit)
        events: list[tuple[str, int]] = []
        ev_notes: dict = {}
        for f, n in zip(files, counts):  # input order, then frame order
            if n < 0:
                if (f, -1) in hits:
                    ev_notes[len(events)] = notes[f]
                    events.append((f"{f}//*", -1))
                continue
            events.extend((f, i) for i in range(n) if (f, i) in hits)
        for e in missing:
            ev_notes[len(events)] = ("not_in_inputs", f"event {e!r} of the manifest "
                                     f"{self.cfg.run.manifest} is not a frame of run.inputs")
            events.append((e, -1))
        log.info("label: manifest %s selects %d events, %d of them not found in the inputs",
                 self.cfg.run.manifest, len(wanted), len(missing))
        return EventTable.from_events(events, ev_notes)

    # --- reading and processing (any rank / worker) --------------------------------------
    def read(self, events: EventTable, start: int, stop: int, meta: dict):
        run = self.cfg.run
        shape = None if meta.get("frame_shape") is None else tuple(meta["frame_shape"])
        for path, ks, idx in events.runs(start, stop):
            if idx[0] < 0:  # placeholders: known bad when planning
                for k in ks:
                    note = events.note(k) or ("error", "placeholder without a note")
                    yield int(k), Skip(*note)
                continue
            try:
                src = self._open(path)
            except InputError as exc:
                for k in ks:
                    yield int(k), Skip("unreadable_file", str(exc))
                continue
            with src:
                ppath = _peaks_path(run.peaks, path)
                try:
                    lists, n_rows = read_peak_rows(ppath, run.peak_group, int(idx.min()),
                                                   int(idx.max()) + 1, self._geometry)
                except (InputError, OSError) as exc:
                    for k in ks:
                        yield int(k), Skip("no_peak_list", str(exc))
                    continue
                for k, i in zip(ks, idx):
                    yield int(k), self._read_one(src, int(i), lists, n_rows, ppath, shape)

    def _read_one(self, src, i: int, lists: dict, n_rows: int, ppath: str, shape):
        if i >= len(src):
            return Skip("unreadable_frame", f"{src.path}: frame {i} beyond its {len(src)} frames")
        try:
            frame = src.read(i, as_stack=self._geometry is not None)
        except (InputError, OSError, ValueError) as exc:
            return Skip("unreadable_frame", str(exc))
        if frame.ndim == 2:
            frame = frame[None]
        if shape is not None and tuple(frame.shape) != shape:
            return Skip("wrong_shape", f"{src.path} [{src.dataset}] frame {i}: shape {frame.shape} "
                                       f"!= the run's frame shape {shape}")
        peaks = lists.get(i)
        if peaks is None:
            return Skip("no_peak_list", f"{ppath} [{self.cfg.run.peak_group}]: no peak list for "
                                        f"frame {i} (nPeaks has {n_rows} rows)")
        if isinstance(peaks, Skip):
            return peaks
        ids = src.event_ids
        source_id = ids[i] if ids is not None and i < len(ids) else ""
        return _Input(frame, peaks, source_id)

    def prepare(self, k: int, inp: _Input):
        from .windows import cut_windows

        frame = inp.frame
        bad = frame.size - int(np.count_nonzero(np.isfinite(frame)))
        frac = bad / max(frame.size, 1)
        if frac > self.cfg.run.max_nonfinite_fraction:
            return Skip("nonfinite", f"{bad} of {frame.size} pixels ({frac:.1%}) are NaN/inf "
                                     f"(> run.max_nonfinite_fraction={self.cfg.run.max_nonfinite_fraction})")
        if self._mask is not None and self._mask.shape != frame.shape:
            raise InputError(self.cfg.run.mask_file, self.cfg.run.mask_path,
                             f"mask shape {self._mask.shape} != frame shape {frame.shape}")
        windows = cut_windows(frame, inp.peaks, self._mask, self.cfg.fit)
        return _Prepared(windows, inp.source_id)

    def split(self, items):
        from .windows import Status

        sel = [np.flatnonzero(p.windows.status == Status.OK) for _, p in items]
        pool = [p.windows.take(s) for (_, p), s in zip(items, sel) if s.size]
        subs = []
        if pool:
            allw = _concat_windows(pool)
            n, c = len(allw), self.cfg.run.chunk_peaks
            subs = [allw.take(slice(a, min(a + c, n))) for a in range(0, n, c)]
        return (items, sel), subs

    def solve(self, sub):
        from .labels import fit_windows

        self.setup()
        return fit_windows(sub, self.cfg.fit, gain=self._gain)

    def combine(self, state, results):
        from .labels import assign_status, peak_table, render_labels
        from .pvoigt import WindowFits
        from .windows import STATUS_NAMES, Status

        items, sel = state
        cat = {f: np.concatenate([getattr(r, f) for r in results]) if results else None
               for f in ("params", "chisqr", "ndata", "nfev", "converged", "info")}
        schema = self.schema()
        out = []
        off = 0
        level = self.cfg.run.compression_level
        for (k, p), s in zip(items, sel):
            w = p.windows
            n = len(w)
            fits = WindowFits.empty(n, self.cfg.fit.solver)
            fits.ndata = w.good.sum(axis=(1, 2)).astype(np.int64)  # also for n = 0
            if s.size:
                for f, a in cat.items():
                    getattr(fits, f)[s] = a[off:off + s.size]
                off += s.size
            status = assign_status(w, fits, self.cfg.fit)
            label, ignore, npix = render_labels(w, fits, status, self.cfg.fit)
            table = peak_table(w, fits, status, npix)
            mask = label.astype(np.uint8, copy=False)
            mask[ignore] = IGNORE
            rows = {"event": np.full(n, k, np.int64), "peak": np.arange(n, dtype=np.int32)}
            for col, dt in schema.items():
                if col not in rows:
                    rows[col] = np.asarray(table[col]).astype(dt, copy=False)
            out.append((k, LabelFrame(
                mask_chunk=zlib.compress(np.ascontiguousarray(mask).tobytes(), level),
                rows=rows, n_peaks=n, n_ok=int(np.count_nonzero(status == Status.OK)),
                n_labelled_pixels=int(np.count_nonzero(label == 1)),
                status_counts=np.bincount(status.astype(np.int64), minlength=len(STATUS_NAMES)),
                source_id=p.source_id)))
        return out

    def schema(self) -> dict:
        if self._schema is None:
            self._schema = peak_schema(self.cfg.fit.window)
        return self._schema

    # --- writing ---------------------------------------------------------------------------
    def open_writer(self, h5, plan: Plan, shard: Shard):
        return _LabelWriter(h5, plan, self.schema(), self.cfg.run.compression_level)

    def summarize(self, stats: dict) -> dict:
        from .windows import STATUS_NAMES

        st = stats.get("peak_status", {})
        self.setup()
        g = self._gain
        gain = float(g) if np.ndim(g) == 0 else [float(x) for x in np.asarray(g)]
        return {
            "adu_per_photon": gain, "adu_per_photon_source": self._gain_source,
            "frames_labelled": int(stats.get("frames", 0)),
            "peaks": {"total": int(stats.get("peaks", 0)),
                      "by_status": {name: int(st.get(name, 0)) for name in STATUS_NAMES}},
            "labelled_pixels": int(stats.get("labelled_pixels", 0)),
        }


class _LabelWriter:
    """Rows of one shard: the masks (one stored chunk per frame), the per-frame counters and
    the per-peak table."""

    def __init__(self, h5, plan: Plan, schema: dict, level: int):
        from .windows import STATUS_NAMES

        self.h5 = h5
        self.level = level
        shape = plan.meta.get("frame_shape")
        self.mask = None
        if shape is not None:
            shape = tuple(shape)
            g = h5.require_group("labels")
            self.mask = g.create_dataset("mask", (0,) + shape, np.uint8, maxshape=(None,) + shape,
                                         chunks=(1,) + shape, compression="gzip",
                                         compression_opts=level, fillvalue=0)
            self.mask.attrs["rows"] = "event"
            self.mask.attrs["values"] = f"0 background, 1 peak, {IGNORE} ignore (window of a rejected peak)"
            self.mask.attrs["layout"] = "stack (P, H, W) per frame"
        self.peaks = RowAppender(h5.require_group("peaks"), dict(schema), level=level,
                                 attrs={"status": {"names": list(STATUS_NAMES)}})
        self.n_peaks: list[int] = []
        self.n_ok: list[int] = []
        self.n_lab: list[int] = []
        self.source: list[str] = []
        self.status = np.zeros(len(STATUS_NAMES), np.int64)
        self.frames = 0

    def _row(self) -> int:
        i = len(self.n_peaks)
        if self.mask is not None:
            self.mask.resize((i + 1,) + self.mask.shape[1:])
        return i

    def write(self, k: int, res: LabelFrame) -> None:
        i = self._row()
        if self.mask is not None:
            self.mask.id.write_direct_chunk((i,) + (0,) * (self.mask.ndim - 1), res.mask_chunk, 0)
        self.peaks.append(**res.rows)
        self.n_peaks.append(res.n_peaks)
        self.n_ok.append(res.n_ok)
        self.n_lab.append(res.n_labelled_pixels)
        self.source.append(res.source_id)
        self.status += res.status_counts
        self.frames += 1

    def skip(self, k: int, skip: Skip) -> None:
        self._row()  # the mask row stays unwritten: all background
        self.n_peaks.append(0)
        self.n_ok.append(0)
        self.n_lab.append(0)
        self.source.append("")

    def close(self) -> dict:
        from .windows import STATUS_NAMES

        self.peaks.flush()
        g = self.h5.require_group("frames")
        kw = {"compression": "gzip", "compression_opts": self.level}
        for name, vals in (("n_peaks", self.n_peaks), ("n_ok", self.n_ok),
                           ("n_labelled_pixels", self.n_lab)):
            ds = g.create_dataset(name, data=np.asarray(vals, np.int32), **kw)
            ds.attrs["rows"] = "event"
        write_string_dataset(g, "source_event_id", self.source, self.level, rows="event")
        return {"frames": self.frames, "peaks": int(sum(self.n_peaks)),
                "labelled_pixels": int(sum(self.n_lab)),
                "peak_status": {n: int(c) for n, c in zip(STATUS_NAMES, self.status)}}


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def run_options(cfg: LabelConfig) -> RunOptions:
    r = cfg.run
    return RunOptions(out=Path(r.out), shard_size=r.shard_size, batch_size=r.batch_frames,
                      assignment=r.assignment, resume=r.resume, verify=r.verify,
                      stop_after_shards=r.stop_after_shards, keep_parts=r.keep_parts,
                      progress=r.progress, level=r.compression_level)


def ray_options(cfg: LabelConfig) -> RayOptions:
    r = cfg.ray
    return RayOptions(address=r.address, num_cpus=r.num_cpus, temp_dir=r.temp_dir,
                      namespace=r.namespace, max_in_flight=r.max_in_flight,
                      in_flight_per_cpu=r.in_flight_per_cpu, batch_cpus=r.batch_cpus,
                      solve_cpus=r.fit_cpus, max_retries=r.max_retries)


def run(cfg: LabelConfig) -> dict:
    """Stage entry point (``peaknet label``, ``jobs/label.py``): label every event, return the
    summary (also ``<out>/label.summary.json``). Under MPI every rank runs this; rank 0
    returns the summary and the other ranks ``{}`` (so a job prints it once)."""
    import sys

    task = LabelTask(cfg)
    opts = run_options(cfg)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        if cfg.run.backend == "ray":
            if launcher_size() > 1:
                raise RuntimeError(f"backend 'ray' but {launcher_size()} processes were launched "
                                   "(mpiexec/srun): start one driver process")
            summary = run_ray(task, opts, ray_options(cfg))
            rank = 0
        else:
            comm = get_comm(cfg.run.backend)
            summary = run_sharded(task, opts, comm, backend=comm.name)
            rank = comm.rank
    finally:  # a library caller gets its torch thread count back
        if threads is not None and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    this = summary.get("this_run")
    if this:
        peaks = int(this.get("stats", {}).get("peaks", 0))
        this["peaks_processed"] = peaks
        this["peaks_per_s"] = round(peaks / this["process_seconds"], 1) if this.get("process_seconds") else 0.0
        if this.get("cpu_seconds"):
            this["peaks_per_cpu_s"] = round(peaks / this["cpu_seconds"], 1)
    return summary if rank == 0 else {}
