"""Where inference frames come from: one interface over CXI/HDF5 files, CBF folders, the
synthetic generator and psana.

    from peaknet.infer.sources import open_source, partition

    src = open_source(cfg.source)                  # a Source
    shards = src.shards()                          # the whole run, in a fixed order
    for shard in partition(shards, rank, size):    # this producer's share
        for batch in src.read(shard, batch_size=8):
            batch.frames      # (B, P, H, W) float32, the readable frames
            batch.positions   # (B,) their positions in the shard
            batch.skipped     # [(position, reason)] events that cannot be processed

Events and shards
-----------------
Every event has a stable id :class:`EventId` ``(file, index)``, written ``file//index`` (the
CrystFEL event notation): a CXI file and the frame's row, a CBF file and 0, the generator's
``sim/<seed>`` and the frame number, a psana ``exp=..:run=..`` and the event number. The same
inputs give the same ids in every run, on any number of ranks.

A :class:`Shard` is a contiguous range of a source's events (at most ``events_per_shard``): the
unit of work distribution, of output files (one CXI file per shard) and of resume. Its id
(``<file stem>-<first event>``) is stable too. :func:`partition` deals shards to P producers
deterministically (largest first to the least loaded rank): every rank computes the same
answer without talking to the others.

Bad input is never fatal: a file that cannot be opened, a frame that cannot be read, a frame
of the wrong shape, a frame with too many NaN/inf pixels is returned in ``Batch.skipped`` with
the reason, and the run goes on (OM's rule: one bad event is logged and skipped).

This module knows nothing of MPI or Ray: producers (:mod:`peaknet.infer.pipeline`,
:mod:`peaknet.infer.legacy`) call it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from peaknet.errors import ConfigError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "EventId",
    "Shard",
    "Batch",
    "Source",
    "CXISource",
    "CBFSource",
    "GeneratorSource",
    "PsanaSource",
    "open_source",
    "partition",
    "expand_inputs",
    "load_geometry",
]

_GLOB_CHARS = set("*?[")
_CXI_SUFFIXES = (".cxi", ".h5", ".hdf5", ".nxs")


# --------------------------------------------------------------------------------------------
# events, shards, batches
# --------------------------------------------------------------------------------------------
class EventId(NamedTuple):
    """Stable identity of one event: the file (or stream label) and the index inside it.
    ``str()`` gives ``"<file>//<index>"``, the same string as
    :func:`peaknet.parallel.event_id` (every stage names events alike)."""

    file: str
    index: int

    def __str__(self) -> str:
        from peaknet.parallel.partition import event_id

        return event_id(self.file, self.index)

    @classmethod
    def parse(cls, text: str) -> "EventId":
        """Inverse of ``str()``: ``"run.cxi//12"`` -> ``EventId("run.cxi", 12)``."""
        from peaknet.parallel.partition import parse_event_id

        return cls(*parse_event_id(text))


@dataclass(frozen=True)
class Shard:
    """A contiguous range of events of one source.

    shard_id: stable name (also the output file's stem); file: the input file, or the label of
    a stream (``sim/0``, ``exp=..:run=..``); events ``start .. stop-1`` of it. For CBF shards
    ``files`` lists one file per event (``file`` is then the folder label). ``fingerprint``
    changes when the input changes (size and modification time, or the generator's config).
    Positions inside a shard run from 0 to ``n_events - 1``.
    """

    shard_id: str
    file: str
    start: int
    stop: int
    files: tuple = ()
    fingerprint: str = ""

    @property
    def n_events(self) -> int:
        return len(self.files) if self.files else self.stop - self.start

    def event_id(self, position: int) -> EventId:
        """The id of the event at ``position`` (0-based) in this shard."""
        if not 0 <= position < self.n_events:
            raise IndexError(f"position {position} outside shard {self.shard_id}")
        if self.files:
            return EventId(self.files[position], 0)
        return EventId(self.file, self.start + int(position))

    def to_dict(self) -> dict:
        return {"shard_id": self.shard_id, "file": self.file, "start": self.start,
                "stop": self.stop, "files": list(self.files), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> "Shard":
        return cls(d["shard_id"], d["file"], int(d["start"]), int(d["stop"]),
                   tuple(d.get("files", ())), d.get("fingerprint", ""))


@dataclass
class Batch:
    """Up to ``batch_size`` consecutive events of one shard, as read by a producer.

    positions: (B,) int64 positions (in the shard) of the readable frames; frames:
    (B, P, H, W) float32; skipped: [(position, reason)] events of this range that cannot be
    processed. Every position of the range is in exactly one of the two.
    """

    shard_id: str
    seq: int
    positions: np.ndarray
    frames: np.ndarray
    skipped: list = field(default_factory=list)

    @property
    def batch_id(self) -> str:
        return f"{self.shard_id}#{self.seq}"

    @property
    def n_frames(self) -> int:
        return int(self.positions.size)


@runtime_checkable
class Source(Protocol):
    """What the producers need from a source of frames.

    kind: "cxi", "cbf", "generator", "psana"; frame_shape: (P, H, W) of a good frame;
    geometry: a :class:`peaknet.io.geometry.Geometry` or None; unreadable: inputs that could
    not even be listed, as ``{"file", "reason"}`` records (their events are unknown).
    """

    kind: str
    frame_shape: tuple
    geometry: object

    @property
    def unreadable(self) -> list: ...

    def shards(self) -> list[Shard]:
        """All shards of the run, in a fixed order."""

    def read(self, shard: Shard, batch_size: int) -> Iterator[Batch]:
        """The shard's events as batches of at most ``batch_size`` events, in order."""

    def describe(self) -> dict:
        """JSON-able description (goes into the run's plan)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def expand_inputs(patterns: Sequence[str], suffixes: Sequence[str] = ()) -> list[Path]:
    """Files named by ``patterns``: globs expanded and sorted, folders listed (files ending in
    one of ``suffixes``, sorted), plain paths kept (a missing one is reported later, as an
    unreadable input). A glob or folder that yields nothing is a ConfigError."""
    out: list[Path] = []
    for i, pat in enumerate(patterns):
        p = Path(pat)
        if _GLOB_CHARS & set(str(pat)):
            hits = sorted(glob.glob(str(pat)))
            if not hits:
                raise ConfigError(None, f"source.inputs[{i}]", f"pattern {pat!r} matches no file")
            out.extend(Path(h) for h in hits)
        elif p.is_dir():
            hits = sorted(q for q in p.iterdir()
                          if q.is_file() and (not suffixes or q.suffix.lower() in suffixes))
            if not hits:
                raise ConfigError(None, f"source.inputs[{i}]",
                                  f"folder {pat!r} holds no {'/'.join(suffixes) or ''} file")
            out.extend(hits)
        else:
            out.append(p)
    return out


def load_geometry(spec: Optional[str]):
    """A geometry from a ``.geom`` path or a shipped name (None -> None)."""
    if spec is None:
        return None
    from peaknet.io import geometry as g

    if Path(spec).is_file():
        return g.parse_geometry(spec)
    try:
        return g.load_builtin_geometry(spec)
    except KeyError:
        raise ConfigError(None, "source.geometry",
                          f"{spec!r} is neither a .geom file nor a shipped geometry") from None


def _file_fingerprint(path: Path) -> str:
    try:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        key = f"{path}|missing"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _unique_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """A short, stable, unique label per file: its stem, plus a hash where stems collide."""
    stems: dict[str, list[Path]] = {}
    for p in paths:
        stems.setdefault(p.stem, []).append(p)
    out = {}
    for stem, ps in stems.items():
        for p in ps:
            out[p] = stem if len(ps) == 1 else \
                f"{stem}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:6]}"
    return out


def _ranges(n: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(n, a + size)


def check_frames(frames: np.ndarray, max_nonfinite_fraction: float) -> list[Optional[str]]:
    """Per frame of a (B, ...) block: None if usable, else the reason to skip it (too many
    NaN/inf pixels). Fewer non-finite pixels are left for the predictor to mask."""
    b = frames.shape[0]
    if b == 0:
        return []
    flat = frames.reshape(b, -1)
    bad = flat.shape[1] - np.count_nonzero(np.isfinite(flat), axis=1)
    frac = bad / max(1, flat.shape[1])
    return [None if f <= max_nonfinite_fraction else
            f"nonfinite: {int(n)} NaN/inf pixel(s) of {flat.shape[1]} "
            f"({f:.1%} > max_nonfinite_fraction {max_nonfinite_fraction:.1%})"
            for n, f in zip(bad, frac)]


class _BatchBuilder:
    """Accumulates (position, frame or reason) into Batches of a fixed event range."""

    def __init__(self, shard: Shard, frame_shape: tuple, max_nonfinite_fraction: float):
        self.shard = shard
        self.frame_shape = tuple(frame_shape)
        self.maxbad = max_nonfinite_fraction

    def make(self, seq: int, positions: Sequence[int], frames: Optional[np.ndarray],
             reasons: Optional[list] = None) -> Batch:
        """Batch of ``positions``; ``frames`` (len(positions), ...) or None; ``reasons``: an
        explicit skip reason (or None) per position, checked before the frame checks."""
        positions = list(positions)
        reasons = list(reasons) if reasons is not None else [None] * len(positions)
        keep: list[int] = []
        skipped = []
        shape_ok = frames is not None and tuple(frames.shape[1:]) == self.frame_shape
        checks = check_frames(frames, self.maxbad) if shape_ok else []
        for k, pos in enumerate(positions):
            why = reasons[k]
            if why is None and frames is None:
                why = "unreadable: no data"
            if why is None and not shape_ok:
                why = f"bad shape: {tuple(frames.shape[1:])} != {self.frame_shape}"
            if why is None:
                why = checks[k]
            if why is None:
                keep.append(k)
            else:
                skipped.append((int(pos), why))
        if not keep:
            arr = np.zeros((0,) + self.frame_shape, np.float32)
        elif len(keep) == len(positions):  # the usual case: no copy
            arr = np.asarray(frames, np.float32)
        else:
            arr = np.asarray(frames[keep], np.float32)
        kept = np.asarray([positions[k] for k in keep], np.int64)
        return Batch(self.shard.shard_id, seq, kept, arr, skipped)

    def all_skipped(self, batch_size: int, reason: str) -> Iterator[Batch]:
        for seq, (a, b) in enumerate(_ranges(self.shard.n_events, batch_size)):
            yield self.make(seq, range(a, b), None, [reason] * (b - a))


def _limit(shards: list[Shard], max_events: Optional[int]) -> list[Shard]:
    """Cut the shard list after ``max_events`` events in plan order."""
    if max_events is None:
        return shards
    out, left = [], int(max_events)
    for s in shards:
        if left <= 0:
            break
        if s.n_events <= left:
            out.append(s)
            left -= s.n_events
        elif s.files:
            out.append(Shard(s.shard_id, s.file, s.start, s.start + left, s.files[:left],
                             s.fingerprint))
            left = 0
        else:
            out.append(Shard(s.shard_id, s.file, s.start, s.start + left, (), s.fingerprint))
            left = 0
    return out


# --------------------------------------------------------------------------------------------
# CXI / HDF5
# --------------------------------------------------------------------------------------------
class CXISource:
    """Frames in CXI/HDF5 files (``data_path``; (N, P, H, W) stacks or (N, SS, FS) slabs).

    With a geometry, slab frames are converted to stacks and every file must match it; without
    one, a slab frame is read as one module ``(1, SS, FS)`` and the first readable file fixes
    the frame shape. A file that cannot be opened at planning time is listed in
    :attr:`unreadable`; one that fails later has its events skipped with the reason.
    ``frame_shape`` given (ranks that get the plan from rank 0): the files are not scanned and
    :meth:`shards` is not available.
    """

    kind = "cxi"

    def __init__(self, inputs: Sequence[str], data_path: str = "/entry_1/data_1/data",
                 geometry=None, layout: str = "auto", events_per_shard: int = 1000,
                 max_events: Optional[int] = None, max_nonfinite_fraction: float = 0.01,
                 frame_shape: Optional[tuple] = None):
        self.paths = expand_inputs(inputs, _CXI_SUFFIXES)
        self.data_path = data_path
        self.geometry = geometry
        self.layout = layout
        self.events_per_shard = int(events_per_shard)
        self.max_events = max_events
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self._unreadable: list[dict] = []
        self._lengths: dict[Path, int] = {}
        self.frame_shape: tuple = tuple(geometry.stack_shape) if geometry is not None else ()
        if frame_shape:  # planned elsewhere (rank 0): no need to open every file here
            self.frame_shape = tuple(frame_shape)
        else:
            self._scan()

    def _open(self, path):
        """(FrameSource, None), or (FrameSource opened without the geometry, "bad shape: ...")
        when the file's frames do not match the geometry: its events are then skipped one by
        one with that reason instead of the whole file vanishing as unreadable."""
        from peaknet.errors import DataError
        from peaknet.io.cxi import open_frames

        try:
            return open_frames(path, self.data_path, self.layout, self.geometry), None
        except DataError as exc:
            if self.geometry is None or "geometry" not in str(exc.problem):
                raise
            return open_frames(path, self.data_path, self.layout, None), f"bad shape: {exc.problem}"

    def _stack_shape(self, fs) -> tuple:
        if fs.layout == "stack":
            return tuple(fs.frame_shape)
        if self.geometry is not None:
            return tuple(self.geometry.stack_shape)
        return (1,) + tuple(fs.frame_shape)

    def _scan(self) -> None:
        for p in self.paths:
            try:
                fs, bad = self._open(p)
                with fs:
                    self._lengths[p] = len(fs)
                    if not self.frame_shape and bad is None:
                        self.frame_shape = self._stack_shape(fs)
            except (InputError, OSError) as exc:
                self._unreadable.append({"file": str(p), "reason": f"unreadable: {exc}"})
                log.warning("input %s cannot be read: %s", p, exc)

    @property
    def unreadable(self) -> list:
        return list(self._unreadable)

    def shards(self) -> list[Shard]:
        ok = [p for p in self.paths if p in self._lengths]
        labels = _unique_stems(ok)
        out = []
        for p in ok:
            fp = _file_fingerprint(p)
            for a, b in _ranges(self._lengths[p], self.events_per_shard):
                out.append(Shard(f"{labels[p]}-{a:06d}", str(p), a, b, (), fp))
        return _limit(out, self.max_events)

    def read(self, shard: Shard, batch_size: int) -> Iterator[Batch]:
        builder = _BatchBuilder(shard, self.frame_shape, self.max_nonfinite_fraction)
        try:
            fs, bad = self._open(shard.file)
        except (InputError, OSError) as exc:
            yield from builder.all_skipped(batch_size, f"unreadable: {exc}")
            return
        with fs:
            if bad is not None:
                yield from builder.all_skipped(batch_size, bad)
                return
            shape = self._stack_shape(fs)
            if shape != tuple(self.frame_shape):
                yield from builder.all_skipped(
                    batch_size, f"bad shape: frames of {shape}, expected {self.frame_shape}")
                return
            n_file = len(fs)
            for seq, (a, b) in enumerate(_ranges(shard.n_events, batch_size)):
                idx = np.arange(shard.start + a, shard.start + b)
                if idx[-1] >= n_file:  # the file shrank since planning
                    reasons = [None if i < n_file else f"unreadable: event {i} >= {n_file} "
                               "frames in the file" for i in idx]
                else:
                    reasons = None
                frames, reasons = self._read_block(fs, idx, n_file, reasons)
                yield builder.make(seq, range(a, b), frames, reasons)

    def _frames_of(self, fs, idx: np.ndarray) -> np.ndarray:
        as_stack = fs.layout == "slab" and self.geometry is not None
        out = next(fs.iter_batches(len(idx), indices=idx, as_stack=as_stack))[1]
        if fs.layout == "slab" and self.geometry is None:
            out = out[:, None]
        return out

    def _read_block(self, fs, idx, n_file, reasons):
        """Frames of ``idx`` in one read; on failure, frame by frame to isolate the bad ones."""
        if reasons is None:
            try:
                return self._frames_of(fs, idx), None
            except (InputError, OSError) as exc:
                log.warning("%s: block read of events %d..%d failed (%s); reading one by one",
                            fs.path, idx[0], idx[-1], exc)
                reasons = [None] * len(idx)
        frames = np.zeros((len(idx),) + tuple(self.frame_shape), np.float32)
        reasons = list(reasons)
        for k, i in enumerate(idx):
            if reasons[k] is not None:
                continue
            try:
                frames[k] = self._frames_of(fs, np.array([i]))[0]
            except (InputError, OSError, ValueError) as exc:
                reasons[k] = f"unreadable: {exc}"
        return frames, reasons

    def describe(self) -> dict:
        return {"kind": self.kind, "inputs": [str(p) for p in self.paths],
                "data_path": self.data_path, "layout": self.layout,
                "frame_shape": list(self.frame_shape), "events_per_shard": self.events_per_shard}


# --------------------------------------------------------------------------------------------
# CBF folders
# --------------------------------------------------------------------------------------------
class CBFSource:
    """CBF files (one event each, e.g. the LCLS CSPAD stills written by cctbx.xfel), given as
    files, globs or folders; shards of ``events_per_shard`` files in sorted order.

    The first readable file gives the frame shape and the geometry (each CBF carries its own
    metrology; the first one is used for the mask, the radius map and slab coordinates).
    """

    kind = "cbf"

    def __init__(self, inputs: Sequence[str], events_per_shard: int = 1000,
                 max_events: Optional[int] = None, max_nonfinite_fraction: float = 0.01,
                 frame_shape: Optional[tuple] = None):
        self.paths = expand_inputs(inputs, (".cbf",))
        self.events_per_shard = int(events_per_shard)
        self.max_events = max_events
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self.geometry = None
        self.frame_shape: tuple = ()
        for p in self.paths:  # the first readable file fixes shape and geometry
            try:
                f = self._read(p)
            except (InputError, OSError) as exc:
                log.warning("CBF %s cannot be read: %s", p, exc)
                continue
            self.geometry, self.frame_shape = f.geometry, tuple(f.stack.shape)
            break
        if not self.frame_shape and self.paths:
            log.warning("no readable CBF among %d files", len(self.paths))

    @staticmethod
    def _read(path):
        from peaknet.io.cbf import read_cbf

        return read_cbf(path)

    @property
    def unreadable(self) -> list:
        return []  # every listed file is an event; unreadable ones are skipped per event

    def shards(self) -> list[Shard]:
        if not self.paths:
            return []
        parents = {p.parent for p in self.paths}
        label = (self.paths[0].parent.name or "cbf") if len(parents) == 1 else "cbf"
        out = []
        for a, b in _ranges(len(self.paths), self.events_per_shard):
            files = tuple(str(p) for p in self.paths[a:b])
            fp = hashlib.sha1("".join(_file_fingerprint(Path(f)) for f in files).encode()
                              ).hexdigest()[:16]
            out.append(Shard(f"{label}-{a:06d}", label, a, b, files, fp))
        return _limit(out, self.max_events)

    def read(self, shard: Shard, batch_size: int) -> Iterator[Batch]:
        builder = _BatchBuilder(shard, self.frame_shape, self.max_nonfinite_fraction)
        for seq, (a, b) in enumerate(_ranges(shard.n_events, batch_size)):
            frames, reasons = [], []
            for pos in range(a, b):
                try:
                    stack = np.asarray(self._read(shard.files[pos]).stack, np.float32)
                    reasons.append(None)
                except (InputError, OSError, ValueError) as exc:
                    stack, why = None, f"unreadable: {exc}"
                    reasons.append(why)
                frames.append(stack)
            block = [f if f is not None and f.shape == self.frame_shape else None for f in frames]
            for k, f in enumerate(frames):
                if reasons[k] is None and block[k] is None:
                    reasons[k] = f"bad shape: {f.shape} != {self.frame_shape}"
            arr = np.stack([f if f is not None else np.zeros(self.frame_shape, np.float32)
                            for f in block]) if block else None
            yield builder.make(seq, range(a, b), arr, reasons)

    def describe(self) -> dict:
        return {"kind": self.kind, "files": len(self.paths), "first": str(self.paths[0])
                if self.paths else None, "frame_shape": list(self.frame_shape),
                "events_per_shard": self.events_per_shard}


# --------------------------------------------------------------------------------------------
# the synthetic generator
# --------------------------------------------------------------------------------------------
class GeneratorSource:
    """Frames made on the fly by :mod:`peaknet.simulate` (frame i depends only on the seed and
    i), for tests and benchmarks of any length without storage: ``frames`` events in shards
    of ``events_per_shard``. Event ids: ``sim/<seed>//<i>``."""

    kind = "generator"

    def __init__(self, sim_cfg, frames: int, events_per_shard: int = 1000,
                 max_events: Optional[int] = None, max_nonfinite_fraction: float = 0.01,
                 frame_shape: Optional[tuple] = None):
        from peaknet.simulate.generator import Simulator

        self.sim_cfg = sim_cfg
        self.frames = int(frames)
        self.events_per_shard = int(events_per_shard)
        self.max_events = max_events
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self._sim = Simulator(sim_cfg)
        self.geometry = self._sim.geom
        self.frame_shape = tuple(self._sim.stack_shape)
        from peaknet.config import config_to_dict

        self._cfg_dict = config_to_dict(sim_cfg)
        self._fp = hashlib.sha1(json.dumps(self._cfg_dict, sort_keys=True, default=str).encode()
                                ).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"sim/{self.sim_cfg.run.seed}"

    @property
    def unreadable(self) -> list:
        return []

    def shards(self) -> list[Shard]:
        seed = self.sim_cfg.run.seed
        out = [Shard(f"sim{seed}-{a:06d}", self.label, a, b, (), self._fp)
               for a, b in _ranges(self.frames, self.events_per_shard)]
        return _limit(out, self.max_events)

    def read(self, shard: Shard, batch_size: int) -> Iterator[Batch]:
        builder = _BatchBuilder(shard, self.frame_shape, self.max_nonfinite_fraction)
        for seq, (a, b) in enumerate(_ranges(shard.n_events, batch_size)):
            frames = np.stack([self._sim.frame(shard.start + k)[0] for k in range(a, b)])
            yield builder.make(seq, range(a, b), frames)

    def describe(self) -> dict:
        return {"kind": self.kind, "frames": self.frames, "seed": self.sim_cfg.run.seed,
                "frame_shape": list(self.frame_shape), "events_per_shard": self.events_per_shard,
                "sim_config_sha1": self._fp}


# --------------------------------------------------------------------------------------------
# psana (LCLS)
# --------------------------------------------------------------------------------------------
class PsanaSource:
    """LCLS data through psana (the LCLS-II ``psana`` package, "psana2"), when importable.

    Thin on purpose: ``DataSource(exp=experiment, run=run_number, max_events=...)``, the
    detector's ``raw.calib(evt)`` as the (P, H, W) frame (None -> skipped "no data"), and the
    ``geometry`` of the config (psana's own geometry is not converted). Shards are ranges of
    event numbers; a producer reads a shard by iterating the run from its start, so this is
    for runs of moderate size. psana is put in serial mode (``PS_PARALLEL=none``) because the
    producers already are the MPI ranks; for very large runs, let psana's own MPI event
    distribution feed the queue instead (each psana "bd" rank being a producer). The number of
    events must be given (``source.max_events``): psana2 does not know it before reading.
    """

    kind = "psana"

    def __init__(self, experiment: str, run_number: int, detector: str, geometry=None,
                 events_per_shard: int = 1000, max_events: Optional[int] = None,
                 max_nonfinite_fraction: float = 0.01, frame_shape: Optional[tuple] = None):
        os.environ.setdefault("PS_PARALLEL", "none")
        import psana  # noqa: F401  (ImportError: not an LCLS environment)

        if max_events is None:
            raise ConfigError(None, "source.max_events", "psana sources need the event count")
        self.experiment, self.run_number, self.detector = experiment, int(run_number), detector
        self.geometry = geometry
        self.events_per_shard = int(events_per_shard)
        self.max_events = int(max_events)
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self.frame_shape = tuple(frame_shape or ()) or (
            tuple(geometry.stack_shape) if geometry is not None else ())
        if not self.frame_shape:
            for _, frame in self._events(0, 1):
                if frame is not None:
                    self.frame_shape = tuple(np.shape(frame))

    @property
    def label(self) -> str:
        return f"exp={self.experiment}:run={self.run_number}"

    @property
    def unreadable(self) -> list:
        return []

    def _events(self, start: int, stop: int) -> Iterator[tuple[int, Optional[np.ndarray]]]:
        import psana

        ds = psana.DataSource(exp=self.experiment, run=self.run_number, max_events=stop)
        for run in ds.runs():
            det = run.Detector(self.detector)
            for i, evt in enumerate(run.events()):
                if i >= stop:
                    return
                if i >= start:
                    yield i, det.raw.calib(evt)
            return

    def shards(self) -> list[Shard]:
        fp = hashlib.sha1(self.label.encode()).hexdigest()[:16]
        return [Shard(f"{self.experiment}-r{self.run_number:04d}-{a:06d}", self.label, a, b, (), fp)
                for a, b in _ranges(self.max_events, self.events_per_shard)]

    def read(self, shard: Shard, batch_size: int) -> Iterator[Batch]:
        builder = _BatchBuilder(shard, self.frame_shape, self.max_nonfinite_fraction)
        got: dict[int, Optional[np.ndarray]] = dict(self._events(shard.start, shard.stop))
        for seq, (a, b) in enumerate(_ranges(shard.n_events, batch_size)):
            pos = list(range(a, b))
            frames = [got.get(shard.start + k) for k in pos]
            reasons = [None if f is not None else "unreadable: no detector data in this event"
                       for f in frames]
            arr = np.stack([np.asarray(f, np.float32) if f is not None
                            else np.zeros(self.frame_shape, np.float32) for f in frames])
            yield builder.make(seq, pos, arr, reasons)

    def describe(self) -> dict:
        return {"kind": self.kind, "experiment": self.experiment, "run": self.run_number,
                "detector": self.detector, "frame_shape": list(self.frame_shape)}


# --------------------------------------------------------------------------------------------
# factory and partition
# --------------------------------------------------------------------------------------------
def _auto_kind(inputs: Sequence[str]) -> str:
    if not inputs:
        return "generator"
    for pat in inputs:
        p = Path(pat)
        if p.is_dir():
            if any(q.suffix.lower() == ".cbf" for q in p.iterdir()):
                return "cbf"
        elif str(pat).lower().endswith(".cbf"):
            return "cbf"
    return "cxi"


def simulate_config(section):
    """The generator's :class:`~peaknet.simulate.config.SimulateConfig` for a [source] section
    (``sim_config`` file + ``sim_overrides``; ``geometry`` replaces the detector)."""
    from peaknet.config import load_config
    from peaknet.simulate.config import SimulateConfig

    overrides = list(section.sim_overrides)
    if section.geometry:
        key = "run.geometry" if Path(section.geometry).is_file() else "run.detector"
        overrides.append(f"{key}={json.dumps(str(section.geometry))}")
    overrides.append(f"run.frames={int(section.frames)}")
    return load_config(SimulateConfig, section.sim_config, overrides)


def open_source(section, frame_shape: Optional[tuple] = None) -> Source:
    """The source described by a :class:`peaknet.infer.config.SourceSection`.

    ``frame_shape``: known from the plan (ranks other than 0): inputs are not scanned again.
    """
    kind = section.kind if section.kind != "auto" else _auto_kind(section.inputs)
    common = dict(events_per_shard=section.events_per_shard, max_events=section.max_events,
                  max_nonfinite_fraction=section.max_nonfinite_fraction,
                  frame_shape=tuple(frame_shape) if frame_shape else None)
    if kind == "cxi":
        return CXISource(section.inputs, section.data_path, load_geometry(section.geometry),
                         section.layout, **common)
    if kind == "cbf":
        return CBFSource(section.inputs, **common)
    if kind == "generator":
        return GeneratorSource(simulate_config(section), section.frames, **common)
    if kind == "psana":
        return PsanaSource(section.experiment, section.run_number, section.detector,
                           load_geometry(section.geometry), **common)
    raise ConfigError(None, "source.kind", f"unknown source kind {kind!r}")


def partition(shards: Sequence[Shard], rank: int, size: int) -> list[Shard]:
    """This rank's shards: deterministic, disjoint, complete, balanced by events.

    Largest shards first, each to the rank with the fewest events so far (ties: lowest rank;
    equal shards keep plan order), then returned in plan order. Depends only on the shard list
    and ``size``, so every rank computes the same assignment without communication.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside 0..{size - 1}")
    load = [0] * size
    owner: dict[int, int] = {}
    order = sorted(range(len(shards)), key=lambda i: (-shards[i].n_events, i))
    for i in order:
        r = min(range(size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += shards[i].n_events
    return [s for i, s in enumerate(shards) if owner[i] == rank]
