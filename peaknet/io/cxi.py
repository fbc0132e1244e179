"""CXI / HDF5 detector frames and CrystFEL-compatible peak lists.

Reading frames
--------------
:func:`open_frames` opens a detector dataset in any of these layouts and returns a
:class:`FrameSource`:

- ``stack``: (N, P, H, W) frames of P modules (or one (P, H, W) frame);
- ``slab``: (N, SS, FS) frames of the CrystFEL slab (or one (SS, FS) frame).

Chunked, compressed datasets (gzip, bitshuffle/LZ4, Blosc, ...) are readable because this module
imports :mod:`hdf5plugin`, which registers the filters with HDF5. Frames come back as float32.
Every problem with the input raises :class:`peaknet.errors.DataError` naming the file and the
dataset.

Peak lists
----------
:class:`CXIWriter` writes the peak-list group that CrystFEL reads with ``peak_list_type = cxi``:
``/entry_1/result_1/{nPeaks, peakXPosRaw, peakYPosRaw, peakTotalIntensity, ...}``. Positions in
the file are SLAB coordinates with the centre of pixel (i, j) at (i, j) (``peakXPosRaw`` = fs,
``peakYPosRaw`` = ss); :class:`peaknet.peaks.PeakList` holds module-local (stack) coordinates, and
the geometry converts between the two. Without a geometry, module-local coordinates are written
as they are (module-local == slab) and the module index goes to ``peakSegPosRaw``.
:func:`read_peak_lists` reads such a group back.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import h5py
import hdf5plugin  # noqa: F401 - registers bitshuffle/LZ4/Blosc/... filters with HDF5
import numpy as np

from peaknet.errors import DataError, InputError
from peaknet.peaks import PeakList

DEFAULT_DATASET = "/entry_1/data_1/data"
PEAK_GROUP = "/entry_1/result_1"
EVENT_ID = "/entry_1/event_id"
LCLS_EVENT_NUMBER = "/LCLS/eventNumber"
LCLS_PHOTON_ENERGY = "/LCLS/photon_energy_eV"
LCLS_ENCODER = "/LCLS/detector_1/EncoderValue"
DEFAULT_MAX_PEAKS = 1024

# Per-frame scalars with a conventional home; any other scalar goes to /entry_1/result_1/<name>.
_SCALAR_PATHS = {
    "photon_energy_eV": LCLS_PHOTON_ENERGY,
    "encoder_value": LCLS_ENCODER,
    "EncoderValue": LCLS_ENCODER,
    "clen": LCLS_ENCODER,
    "event_number": LCLS_EVENT_NUMBER,
    "eventNumber": LCLS_EVENT_NUMBER,
}
_INT_SCALARS = {LCLS_EVENT_NUMBER}

# peak-list dataset -> (PeakList column, dtype)
_PEAK_COLUMNS = {
    "peakTotalIntensity": ("intensity", np.float32),
    "peakMaximumValue": ("max_value", np.float32),
    "peakSNR": ("snr", np.float32),
    "peakNPixels": ("npix", np.float32),
    "peakSegPosRaw": ("panel", np.float32),
}


# --------------------------------------------------------------------------------------------
# opening files
# --------------------------------------------------------------------------------------------
def open_h5(path: os.PathLike | str, mode: str = "r", field: Optional[str] = None
            ) -> h5py.File:
    """Open an HDF5 file, turning every failure into a DataError that names the file (and
    ``field``, the dataset the caller wants)."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise DataError(path, field, "file does not exist")
    if mode == "r" and path.is_dir():
        raise DataError(path, field, "is a directory, not an HDF5 file")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise DataError(
            path, field, f"not a readable HDF5 file (truncated or corrupt?): {exc}"
        ) from exc


def _nearby_datasets(h5: h5py.File, name: str, limit: int = 20) -> list[str]:
    """Datasets under the deepest existing ancestor group of ``name`` (for error messages)."""
    parts = [p for p in name.strip("/").split("/") if p]
    group = h5["/"]
    for part in parts[:-1]:
        child = group.get(part)
        if not isinstance(child, h5py.Group):
            break
        group = child
    found: list[str] = []

    def visit(item_name, obj):
        if isinstance(obj, h5py.Dataset):
            found.append(f"{group.name.rstrip('/')}/{item_name}")
        return len(found) >= limit or None

    group.visititems(visit)
    return found


def get_dataset(h5: h5py.File, name: str) -> h5py.Dataset:
    """``h5[name]`` as a dataset, or a DataError saying which datasets exist nearby."""
    obj = h5.get(name)
    if isinstance(obj, h5py.Dataset):
        return obj
    if obj is None:
        nearby = _nearby_datasets(h5, name)
        hint = (f"; datasets nearby: {', '.join(nearby)}" if nearby
                else "; the file has no datasets there")
        raise DataError(h5.filename, name, f"dataset does not exist{hint}")
    raise DataError(h5.filename, name, f"is a {type(obj).__name__}, not a dataset")


def _check_numeric(ds: h5py.Dataset, name: str) -> None:
    """DataError(file, name) unless ``ds`` holds ints, uints or floats (bool counts as int)."""
    if ds.dtype.kind not in "biuf":
        raise DataError(
            ds.file.filename, name, f"dtype {ds.dtype} is not numeric (need int/uint/float)"
        )


def read_event_ids(h5: h5py.File) -> Optional[list[str]]:
    """Event ids from ``/entry_1/event_id`` (strings or numbers) or ``/LCLS/eventNumber``.

    Returns a list of str (numbers formatted as decimal), or None if neither dataset exists.
    """
    for name in (EVENT_ID, LCLS_EVENT_NUMBER):
        obj = h5.get(name)
        if isinstance(obj, h5py.Dataset):
            values = obj[()]
            values = np.atleast_1d(values)
            return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    return None


# --------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------
def _geometry_shape(geometry, layout: str) -> Optional[tuple]:
    """The geometry's frame shape for ``layout``; None if it has no stack layout."""
    try:
        return tuple(geometry.stack_shape if layout == "stack" else geometry.slab_shape)
    except InputError:  # GeometryError: panels that do not tile into equal modules
        return None


def _resolve_layout(shape: tuple, layout: str, geometry, path, dataset) -> tuple[str, bool]:
    """Decide (layout, single_frame) from a dataset shape.

    Rules: rank 4 is an (N, P, H, W) stack; rank 2 a single slab frame; rank 3 is ambiguous:
    with a geometry it is a single stack frame if it equals ``geometry.stack_shape`` and N slab
    frames if ``shape[1:] == geometry.slab_shape``; without a geometry ``auto`` reads it as N
    slab frames (the CXI convention: first axis = event), ``layout="stack"`` as one stack frame.
    """
    rank = len(shape)
    if rank not in (2, 3, 4):
        raise DataError(
            path, dataset,
            f"rank {rank} (shape {shape}) is not a detector layout: expected (N,P,H,W), "
            "(N,SS,FS), (P,H,W) or (SS,FS)",
        )
    if layout not in ("auto", "stack", "slab"):
        raise ValueError(f"layout must be 'auto', 'stack' or 'slab', not {layout!r}")
    if layout == "auto":
        if rank == 4:
            return "stack", False
        if rank == 2:
            return "slab", True
        if geometry is not None and tuple(shape) == _geometry_shape(geometry, "stack"):
            return "stack", True
        return "slab", False
    if layout == "stack":
        if rank == 2:
            raise DataError(
                path, dataset, f"shape {shape} has rank 2, a stack needs (N,P,H,W) or (P,H,W)"
            )
        return "stack", rank == 3
    if rank == 4:
        raise DataError(
            path, dataset, f"shape {shape} has rank 4, a slab needs (N,SS,FS) or (SS,FS)"
        )
    return "slab", rank == 2


class FrameSource:
    """Frames of one HDF5 dataset, read lazily (the file stays open until :meth:`close`).

    Attributes: ``path``, ``dataset``, ``layout`` ("stack" or "slab"), ``frame_shape``
    ((P, H, W) or (SS, FS)), ``shape`` ((N,) + frame_shape), ``event_ids`` (list of str or None).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path, dataset: str = DEFAULT_DATASET, layout: str = "auto", geometry=None):
        self.path = os.fspath(path)
        self.dataset = dataset
        self.geometry = geometry
        self._h5 = open_h5(path, field=dataset)
        try:
            self._ds = get_dataset(self._h5, dataset)
            _check_numeric(self._ds, dataset)
            self.layout, self._single = _resolve_layout(
                self._ds.shape, layout, geometry, self.path, dataset
            )
            self.frame_shape = tuple(self._ds.shape[1:] if not self._single else self._ds.shape)
            self._check_geometry()
            self.event_ids = read_event_ids(self._h5)
        except BaseException:
            self._h5.close()
            raise

    def _check_geometry(self) -> None:
        if self.geometry is None:
            return
        want = _geometry_shape(self.geometry, self.layout)
        if self.frame_shape != want:
            raise DataError(
                self.path, self.dataset,
                f"{self.layout} frame shape {self.frame_shape} does not match the geometry's "
                f"{self.layout} shape {want}",
            )

    # --- container protocol -----------------------------------------------------------
    def __len__(self) -> int:
        return 1 if self._single else int(self._ds.shape[0])

    @property
    def shape(self) -> tuple:
        return (len(self),) + self.frame_shape

    @property
    def dtype(self) -> np.dtype:
        """The dtype stored in the file (frames are returned as float32)."""
        return self._ds.dtype

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, batch in self.iter_batches(1):
            yield batch[0]

    # --- reading -------------------------------------------------------------------------
    def _as_stack(self, frames: np.ndarray) -> np.ndarray:
        """Slab frames (..., SS, FS) -> stack (..., P, H, W) via the geometry."""
        if self.layout == "stack":
            return frames
        if self.geometry is None:
            raise ValueError(f"{self.path}: as_stack=True needs a geometry for slab data")
        return self.geometry.slab_to_stack(frames)

    def read(self, i: int, as_stack: bool = False) -> np.ndarray:
        """Frame ``i`` as a float32 array of ``frame_shape`` (or the geometry's stack shape
        with ``as_stack``)."""
        if as_stack:
            return self._as_stack(self.read(i))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for {n} frames in {self.path}")
        i = int(i) % n
        try:
            data = self._ds[()] if self._single else self._ds[i]
        except OSError as exc:  # a corrupt chunk or a missing filter
            raise DataError(self.path, self.dataset, f"cannot read frame {i}: {exc}") from exc
        return np.asarray(data, dtype=np.float32)

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        try:
            data = self._ds[()][None] if self._single else self._ds[start:stop]
        except OSError as exc:
            raise DataError(
                self.path, self.dataset, f"cannot read frames {start}..{stop - 1}: {exc}"
            ) from exc
        return np.asarray(data, dtype=np.float32)

    def iter_batches(
        self, batch_size: int, indices: Optional[Sequence[int]] = None, as_stack: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(idx, frames)``: idx (B,) int64 frame indices, frames (B, *frame_shape) float32
        ((B, P, H, W) with ``as_stack``, converting slab data via the geometry).

        At most ``batch_size`` frames are in memory at a time. ``indices`` (any order, repeats
        allowed) selects frames; consecutive runs are read with one slice each.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        n = len(self)
        idx_all = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx_all.size and (idx_all.min() < 0 or idx_all.max() >= n):
            raise IndexError(f"frame indices out of range for {n} frames in {self.path}")
        for b in range(0, idx_all.size, batch_size):
            idx = idx_all[b:b + batch_size]
            batch = self._read_indices(idx)
            yield idx, (self._as_stack(batch) if as_stack else batch)

    def _read_indices(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((idx.size,) + self.frame_shape, np.float32)
        # split into runs of consecutive increasing indices, one HDF5 read per run
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        pos = 0
        for run in np.split(idx, breaks):
            out[pos:pos + run.size] = self._read_range(int(run[0]), int(run[-1]) + 1)
            pos += run.size
        return out


def open_frames(
    path: os.PathLike | str,
    dataset: str = DEFAULT_DATASET,
    layout: str = "auto",
    geometry=None,
) -> FrameSource:
    """Open detector frames in ``path[dataset]``; see :class:`FrameSource` and the module doc.

    ``layout``: "auto" (from rank and geometry), "stack" or "slab". With a ``geometry``
    (:class:`peaknet.io.geometry.Geometry`) the frame shape must equal its stack or slab shape.
    """
    return FrameSource(path, dataset, layout, geometry)


# --------------------------------------------------------------------------------------------
# frame checks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FiniteCheck:
    """Result of :func:`check_finite`: ``n_nonfinite`` NaN/inf pixels, ``mask`` (frame shape,
    bool, True = finite = usable), ``reason`` ("" when all pixels are finite)."""

    n_nonfinite: int
    mask: np.ndarray
    reason: str

    @property
    def ok(self) -> bool:
        return self.n_nonfinite == 0


def check_finite(
    frame: np.ndarray, path=None, event=None, raise_error: bool = False
) -> FiniteCheck:
    """Count NaN/inf pixels of ``frame``; return them as a mask to apply, or raise.

    With ``raise_error`` a frame with non-finite pixels raises DataError(path, "event ...").
    Otherwise the caller can mask the pixels (``frame[~check.mask] = 0`` plus the mask in the
    peak finder) or record the event as skipped with ``check.reason``.
    """
    mask = np.isfinite(frame)
    n_bad = int(mask.size - np.count_nonzero(mask))
    reason = ""
    if n_bad:
        reason = f"{n_bad} non-finite pixel(s) (NaN/inf) of {mask.size}"
        if raise_error:
            raise DataError(path, None if event is None else f"event {event}", reason)
    return FiniteCheck(n_bad, mask, reason)


@dataclass(frozen=True)
class FrameStatus:
    """Classification of one frame: ``status`` in {"ok", "nonfinite", "wrong_shape"} and a
    human-readable ``reason`` ("" when ok)."""

    status: str
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def classify_frame(frame: np.ndarray, expected_shape: Optional[tuple] = None) -> FrameStatus:
    """Decide whether a batch job can process ``frame``: ok / wrong_shape / nonfinite.

    Shape is checked first (a wrong-shaped frame is not inspected further).
    """
    frame = np.asarray(frame)
    if expected_shape is not None and tuple(frame.shape) != tuple(expected_shape):
        return FrameStatus(
            "wrong_shape", f"shape {tuple(frame.shape)} != expected {tuple(expected_shape)}"
        )
    if frame.dtype.kind not in "biuf":
        return FrameStatus("wrong_shape", f"dtype {frame.dtype} is not numeric")
    if frame.dtype.kind == "f":
        check = check_finite(frame)
        if not check.ok:
            return FrameStatus("nonfinite", check.reason)
    return FrameStatus("ok", "")


# --------------------------------------------------------------------------------------------
# peak-list coordinates
# --------------------------------------------------------------------------------------------
def _to_slab(peaks: PeakList, geometry) -> tuple[np.ndarray, np.ndarray]:
    """(ss, fs) slab coordinates of module-local peaks (identity without a geometry)."""
    if geometry is None or len(peaks) == 0:
        return peaks.ss.astype(np.float32), peaks.fs.astype(np.float32)
    ss, fs = geometry.stack_to_slab_coords(peaks.panel, peaks.ss, peaks.fs)
    return np.asarray(ss, np.float32), np.asarray(fs, np.float32)


def _from_slab(ss, fs, seg, geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(panel, ss, fs) module coordinates of slab peaks; without a geometry the stored module
    index ``seg`` is kept and positions are unchanged."""
    if geometry is None or len(ss) == 0:
        return seg, ss, fs
    panel, lss, lfs = geometry.slab_to_stack_coords(ss, fs)
    return np.asarray(panel), np.asarray(lss), np.asarray(lfs)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _compression_kwargs(compression: Optional[str]) -> dict:
    if compression is None:
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "bitshuffle":
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    raise ValueError(f"compression must be 'gzip', 'bitshuffle' or None, not {compression!r}")


class CXIWriter:
    """Append frames' peak lists (and optionally the frames) to a CXI file, frame by frame.

    Parameters
    ----------
    path:
        The final file. Data go to ``path + ".tmp"`` and are renamed to ``path`` only by a
        successful :meth:`close`, so a killed or failed job never leaves a complete-looking file.
    max_peaks:
        Second dimension of the peak datasets; frames with more peaks keep the first
        ``max_peaks`` (a warning; counted in ``n_truncated_frames`` / ``n_dropped_peaks``).
    geometry:
        Converts PeakList module coordinates to the slab coordinates stored in the file.
    data_shape, data_dtype, write_frames:
        Also store frames in ``/entry_1/data_1/data`` (N, *data_shape); the shape is taken
        from the first frame when not given. Frames are stored as given (stack or slab).
    compression:
        "gzip" (default), "bitshuffle" (LZ4, via hdf5plugin) or None, for the frames. Peak
        datasets use gzip whenever compression is not None (every HDF5, CrystFEL's included,
        reads it; the zero padding compresses away).
    flush_every:
        Peak rows are buffered and written this many frames at a time (fewer HDF5 calls).

    Each dataset is resizable along the first axis, chunked one frame per chunk.
    """

    def __init__(
        self,
        path: os.PathLike | str,
        max_peaks: int = DEFAULT_MAX_PEAKS,
        geometry=None,
        data_shape: Optional[tuple] = None,
        data_dtype=np.float32,
        compression: Optional[str] = "gzip",
        write_frames: bool = False,
        flush_every: int = 64,
    ):
        if max_peaks < 1:
            raise ValueError("max_peaks must be >= 1")
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.max_peaks = int(max_peaks)
        self.geometry = geometry
        self.data_shape = None if data_shape is None else tuple(data_shape)
        self.data_dtype = np.dtype(data_dtype)
        self.write_frames = bool(write_frames or data_shape is not None)
        self._frame_opts = _compression_kwargs(compression)
        self._peak_opts = {} if compression is None else _compression_kwargs("gzip")
        self.n_frames = 0
        self.n_truncated_frames = 0
        self.n_dropped_peaks = 0
        self.flush_every = max(1, int(flush_every))
        self._pending: list = []
        self._scalars: dict[str, h5py.Dataset] = {}
        self._frames = None
        self._h5: Optional[h5py.File] = h5py.File(self.tmp_path, "w")
        try:
            self._create_peak_datasets()
        except BaseException:
            self.abort()
            raise

    # --- layout ----------------------------------------------------------------------------
    def _create_peak_datasets(self) -> None:
        g = self._h5.require_group(PEAK_GROUP)
        m = self.max_peaks
        chunks2 = (1, m)
        self._n_peaks = g.create_dataset("nPeaks", (0,), np.int32, maxshape=(None,), chunks=(1024,))
        self._peaks = {
            name: g.create_dataset(
                name, (0, m), np.float32, maxshape=(None, m), chunks=chunks2, fillvalue=0,
                **self._peak_opts,
            )
            for name in ("peakXPosRaw", "peakYPosRaw", *_PEAK_COLUMNS)
        }
        g.attrs["coordinates"] = "slab pixel indices, centre of pixel (i, j) at (i, j)"
        self._event_id = self._h5.create_dataset(
            EVENT_ID, (0,), h5py.string_dtype(), maxshape=(None,), chunks=(1024,)
        )
        if self.write_frames and self.data_shape is not None:
            self._create_frame_dataset(self.data_shape)

    def _create_frame_dataset(self, shape: tuple) -> None:
        self.data_shape = tuple(shape)
        self._frames = self._h5.create_dataset(
            DEFAULT_DATASET, (0,) + self.data_shape, self.data_dtype,
            maxshape=(None,) + self.data_shape, chunks=(1,) + self.data_shape,
            **self._frame_opts,
        )

    def _scalar_dataset(self, name: str, n_rows: int) -> h5py.Dataset:
        """The per-frame dataset for scalar ``name``, created with ``n_rows`` rows (earlier
        frames get the fill value) if new."""
        path = _SCALAR_PATHS.get(name, f"{PEAK_GROUP}/{name}")
        ds = self._scalars.get(path)
        if ds is None:
            is_int = path in _INT_SCALARS
            ds = self._h5.create_dataset(
                path, (n_rows,), np.int64 if is_int else np.float64, maxshape=(None,),
                chunks=(1024,), fillvalue=-1 if is_int else np.nan,
            )
            self._scalars[path] = ds
        return ds

    # --- appending ------------------------------------------------------------------------
    def append(self, peaks: PeakList, event_id: str, frame: Optional[np.ndarray] = None,
               **scalars) -> None:
        """Add one frame: its peaks (module coordinates), event id, frame and scalars.

        ``frame`` is required when the writer stores frames and ignored otherwise. Known scalar
        names: ``photon_energy_eV`` -> /LCLS/photon_energy_eV, ``encoder_value`` (or
        ``clen``/``EncoderValue``) -> /LCLS/detector_1/EncoderValue, ``event_number`` ->
        /LCLS/eventNumber (int); any other name -> /entry_1/result_1/<name> (float64). Frames
        that do not give a scalar get NaN (-1 for event_number). Peak rows are buffered and
        written ``flush_every`` frames at a time; frames are written at once.
        """
        if self._h5 is None:
            raise RuntimeError(f"CXIWriter for {self.path} is closed")
        frame = self._checked_frame(frame, event_id) if self.write_frames else None
        peaks = self._truncate(peaks, event_id)
        ss, fs = _to_slab(peaks, self.geometry)
        row = {"peakXPosRaw": fs, "peakYPosRaw": ss}
        for name, (col, _) in _PEAK_COLUMNS.items():
            row[name] = getattr(peaks, col)
        self._pending.append((len(peaks), row, str(event_id), scalars))
        if frame is not None:
            i = self.n_frames
            self._frames.resize((i + 1,) + self.data_shape)
            self._frames[i] = frame
        self.n_frames += 1
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered peak rows, event ids and scalars to the (temporary) file."""
        if not self._pending or self._h5 is None:
            return
        i0, k = self._n_peaks.shape[0], len(self._pending)
        i1 = i0 + k
        self._n_peaks.resize((i1,))
        self._n_peaks[i0:i1] = [n for n, *_ in self._pending]
        for name, ds in self._peaks.items():
            block = np.zeros((k, self.max_peaks), np.float32)
            for r, (n, row, *_) in enumerate(self._pending):
                block[r, :n] = row[name]
            ds.resize((i1, self.max_peaks))
            ds[i0:i1] = block
        self._event_id.resize((i1,))
        self._event_id[i0:i1] = [ev for _, _, ev, _ in self._pending]
        self._flush_scalars(i0, i1)
        self._pending.clear()

    def _flush_scalars(self, i0: int, i1: int) -> None:
        names = {name for *_, sc in self._pending for name, v in sc.items() if v is not None}
        for ds in self._scalars.values():
            ds.resize((i1,))
        for name in sorted(names):
            ds = self._scalar_dataset(name, i1)
            col = np.full(i1 - i0, ds.fillvalue, ds.dtype)
            for r, (*_, sc) in enumerate(self._pending):
                if sc.get(name) is not None:
                    col[r] = sc[name]
            ds[i0:i1] = col

    def _truncate(self, peaks: PeakList, event_id) -> PeakList:
        if len(peaks) <= self.max_peaks:
            return peaks
        dropped = len(peaks) - self.max_peaks
        self.n_truncated_frames += 1
        self.n_dropped_peaks += dropped
        warnings.warn(
            f"{self.path}: event {event_id}: {len(peaks)} peaks > max_peaks={self.max_peaks}; "
            f"dropping the last {dropped}",
            RuntimeWarning, stacklevel=3,
        )
        return peaks.take(slice(0, self.max_peaks))

    def _checked_frame(self, frame: Optional[np.ndarray], event_id) -> np.ndarray:
        """The frame in the file's dtype, after checking it (creates the dataset on first use)."""
        if frame is None:
            raise ValueError(f"{self.path}: write_frames is on but event {event_id} has no frame")
        frame = np.asarray(frame)
        if self._frames is None:
            self._create_frame_dataset(frame.shape)
        if tuple(frame.shape) != self.data_shape:
            raise DataError(
                self.path, DEFAULT_DATASET,
                f"event {event_id}: frame shape {frame.shape} != data_shape {self.data_shape}",
            )
        return frame.astype(self.data_dtype, copy=False)

    # --- finishing ------------------------------------------------------------------------
    def close(self) -> Path:
        """Flush, close and rename the temporary file to ``path``; returns ``path``."""
        if self._h5 is None:
            return self.path
        self.flush()
        g = self._h5[PEAK_GROUP]
        g.attrs["n_truncated_frames"] = self.n_truncated_frames
        g.attrs["n_dropped_peaks"] = self.n_dropped_peaks
        self._h5.close()
        self._h5 = None
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; ``path`` is not created."""
        if self._h5 is not None:
            try:
                self._h5.close()
            finally:
                self._h5 = None
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "CXIWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):  # a writer dropped without close() must not leave a final file
        if getattr(self, "_h5", None) is not None:
            try:
                self._h5.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


# --------------------------------------------------------------------------------------------
# reading peak lists
# --------------------------------------------------------------------------------------------
def _peak_dataset(h5: h5py.File, name: str, n_frames: int, required: bool
                  ) -> Optional[h5py.Dataset]:
    """A (n_frames, maxPeaks) numeric peak dataset, None if optional and absent."""
    if not required and name not in h5:
        return None
    ds = get_dataset(h5, name)
    _check_numeric(ds, name)
    if ds.ndim != 2 or ds.shape[0] != n_frames:
        raise DataError(
            h5.filename, name, f"shape {ds.shape}, expected ({n_frames}, maxPeaks) like nPeaks"
        )
    return ds


def _read_counts(h5: h5py.File, group: str) -> np.ndarray:
    """nPeaks as (N,) int64, checked to be numeric and 1-D."""
    npk = get_dataset(h5, f"{group}/nPeaks")
    _check_numeric(npk, npk.name)
    if npk.ndim != 1:
        raise DataError(h5.filename, npk.name, f"must be 1-D, has shape {npk.shape}")
    return npk[()].astype(np.int64)


def _check_counts(h5: h5py.File, group: str, counts: np.ndarray, max_peaks: int) -> None:
    bad = np.flatnonzero((counts < 0) | (counts > max_peaks))
    if bad.size:
        raise DataError(
            h5.filename, f"{group}/nPeaks",
            f"row {bad[0]}: nPeaks={counts[bad[0]]} outside 0..maxPeaks={max_peaks}",
        )


def _block_peak_lists(counts, cols: dict, geometry) -> list[PeakList]:
    """PeakLists of a block of frames; cols: column -> (B, K) array (x/y under "fs"/"ss")."""
    valid = np.arange(cols["fs"].shape[1])[None, :] < counts[:, None]
    flat = {c: a[valid] for c, a in cols.items()}  # frame-major order
    seg = np.rint(flat.pop("panel")) if "panel" in flat else np.zeros(valid.sum(), np.int32)
    flat["panel"], flat["ss"], flat["fs"] = _from_slab(flat["ss"], flat["fs"], seg, geometry)
    if "npix" in flat:
        flat["npix"] = np.rint(flat["npix"])
    bounds = np.cumsum(counts)[:-1]
    per_frame = {c: np.split(a, bounds) for c, a in flat.items()}
    return [
        PeakList.from_columns(int(k), **{c: v[f] for c, v in per_frame.items()})
        for f, k in enumerate(counts)
    ]


def iter_peak_lists(
    path: os.PathLike | str, geometry=None, group: str = PEAK_GROUP, block: int = 1024
) -> Iterator[PeakList]:
    """Yield each frame's peaks from a CXI peak-list group (CrystFEL ``peak_list_type = cxi``).

    Reads ``block`` frames at a time, and only the columns up to the block's largest nPeaks, so
    memory stays bounded for large files. Positions are converted from slab to module
    coordinates with ``geometry`` (``slab_to_stack_coords``; module -1 and NaN outside every
    module); without one they are returned as stored, with the module index from
    ``peakSegPosRaw`` (0 if absent). Optional columns default to zeros.
    """
    with open_h5(path, field=group) as h5:
        counts = _read_counts(h5, group)
        n = counts.size
        sets = {"fs": _peak_dataset(h5, f"{group}/peakXPosRaw", n, True),
                "ss": _peak_dataset(h5, f"{group}/peakYPosRaw", n, True)}
        for name, (col, _) in _PEAK_COLUMNS.items():
            ds = _peak_dataset(h5, f"{group}/{name}", n, False)
            if ds is not None:
                sets[col] = ds
        _check_counts(h5, group, counts, min(ds.shape[1] for ds in sets.values()))
        for i0 in range(0, n, block):
            c = counts[i0:i0 + block]
            k = int(c.max(initial=0))
            cols = {col: np.asarray(ds[i0:i0 + c.size, :k]) for col, ds in sets.items()}
            yield from _block_peak_lists(c, cols, geometry)


def read_peak_lists(
    path: os.PathLike | str, geometry=None, group: str = PEAK_GROUP
) -> list[PeakList]:
    """Every frame's peaks as a list; see :func:`iter_peak_lists`."""
    return list(iter_peak_lists(path, geometry, group))


def read_peak_event_ids(path: os.PathLike | str) -> Optional[list[str]]:
    """Event ids of a CXI file (``/entry_1/event_id`` or ``/LCLS/eventNumber``), or None."""
    with open_h5(path) as h5:
        return read_event_ids(h5)
