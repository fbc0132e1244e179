"""Training data: frames + per-pixel labels streamed from HDF5, cut into model inputs.

Sources
-------
A *source* is one frame file (CXI / HDF5: ``(N, P, H, W)`` stack or ``(N, SS, FS)`` slab frames)
with its labels: an ``(N, P, H, W)`` mask aligned frame by frame, either the generator's truth
mask (``label_source = "truth"``) or the label stage's masks (``"label"``), in a separate file or
in the frame file itself, and optionally a good-pixel mask. :func:`resolve_sources` expands the
file globs of a :class:`~peaknet.train.config.DataSection`, pairs frames with labels and checks
every shape once, in the main process; then the files are closed again.

Samples
-------
:class:`PeakDataset` is a map-style dataset. ``input = "panels"``: sample = (frame, module), the
*canvas* is the module (H, W); ``"assembled"``: sample = frame, the canvas is the assembled image
(the geometry places the modules as seen along the beam; gaps are invalid). Each sample:

1. reads its canvas (image, label, valid = good and finite), opening the HDF5 files lazily in
   the process that reads (every DataLoader worker has its own handles);
2. z-scores the image over its good pixels (``zscore = "frame"``: with its frame's statistics),
   bad pixels become 0 (:func:`peaknet.model.zscore`);
3. cuts a *window*: ``image_size`` squared (assembled) or ``crop`` / the whole module (panels).
   Without augmentation the window is centred exactly as :func:`peaknet.model.pad_crop` centres
   it (so training, the teacher cache and inference see the same pixels); with augmentation its
   position is random (any crop of the canvas, shifted up to ``max_shift`` beyond it) and it is
   flipped along each axis with probability 1/2. Image, label, valid mask (and cached teacher
   logits) get exactly the same window and flips; pixels outside the canvas are invalid.

Randomness depends only on ``(seed, epoch, sample)``: the same sample of the same epoch gets the
same augmentation whatever the number of workers or ranks, and a resumed run continues exactly.

Sharding
--------
:class:`ShardSampler` works like ``DistributedSampler``: a seeded permutation per epoch, rank
``r`` of ``W`` takes every W-th sample. Training drops the remainder so every rank runs the same
number of steps; validation pads with repeats marked ``keep = False`` (they are run, so that
FSDP's collectives line up, but not counted). ``set_start(k)`` skips the first k samples of the
epoch: the dataloader position of a checkpoint.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import h5py
import hdf5plugin  # noqa: F401 - registers compression filters
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from peaknet.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "Source",
    "expand_files",
    "resolve_sources",
    "load_geometry",
    "PeakDataset",
    "ShardSampler",
    "make_loader",
    "centred_offset",
    "cut_window",
    "TRUTH_DATASETS",
    "LABEL_DATASETS",
]

#: Label value meaning "do not train on this pixel" (the label stage's rejected-peak windows).
IGNORE = 255
#: Where "auto" looks for the generator's per-pixel peak mask, in this order
#: (``peaknet.simulate.writer``: ``shard_*.truth.h5:/mask``).
TRUTH_DATASETS = ("/mask", "/truth/mask", "/entry_1/truth/mask", "/peak_mask")
#: Where "auto" looks for the label stage's masks, in this order
#: (``peaknet.label.stage``: ``labels.h5:/labels/mask``).
LABEL_DATASETS = ("/labels/mask", "/label/mask", "/label_mask", "/mask")


# ------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One frame file and where its labels and good-pixel mask are.

    n: frames used from this file; frame_index: their indices in the file (None: 0..n-1);
    label_rows: the label dataset's row of each (None: the same index as the frame; the label
    stage writes one row per event of all its inputs). layout: "stack" or "slab" (frames);
    stack_shape: (P, H, W) of a frame in the stack layout; labels_layout / mask_layout likewise;
    mask_per_frame: the mask has a frame axis.
    """

    frames: str
    frames_dataset: str
    n: int
    layout: str
    stack_shape: tuple
    labels: Optional[str] = None
    labels_dataset: Optional[str] = None
    labels_layout: str = "stack"
    mask: Optional[str] = None
    mask_dataset: Optional[str] = None
    mask_layout: str = "stack"
    mask_per_frame: bool = False
    mask_good_nonzero: bool = True
    frame_index: Optional[np.ndarray] = None
    label_rows: Optional[np.ndarray] = None

    def frame(self, i: int) -> int:
        return int(i if self.frame_index is None else self.frame_index[i])

    def label_row(self, i: int) -> int:
        return int(self.frame(i) if self.label_rows is None else self.label_rows[i])


def expand_files(patterns: Sequence[str]) -> list[str]:
    """Expand shell globs (sorted per pattern, order of patterns kept); plain names that do not
    exist are kept (and reported by the reader with the file name)."""
    out: list[str] = []
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        hits = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not hits:
            raise DataError(pat, None, "the pattern matches no file")
        out += hits
    return out


_GEOMETRIES: dict[str, object] = {}


def load_geometry(spec: Optional[str]):
    """A built-in detector name or a ``.geom`` path -> :class:`peaknet.io.geometry.Geometry`
    (cached per process); None -> None."""
    if spec is None:
        return None
    if spec not in _GEOMETRIES:
        from peaknet.io import geometry as g

        if spec in g.BUILTIN_GEOMETRIES:
            _GEOMETRIES[spec] = g.load_builtin_geometry(spec)
        else:
            _GEOMETRIES[spec] = g.Geometry.from_file(spec)
    return _GEOMETRIES[spec]


def _open(path: str, field: Optional[str] = None) -> h5py.File:
    from peaknet.io.cxi import open_h5

    return open_h5(path, field=field)


def _dataset(h5: h5py.File, name: str) -> h5py.Dataset:
    from peaknet.io.cxi import get_dataset

    return get_dataset(h5, name)


def _layout_of(shape: tuple, n: Optional[int], geom, path: str, name: str,
               per_frame_required: bool = True) -> tuple[str, bool, tuple]:
    """(layout, per_frame, stack_shape) of a dataset of frames / labels / masks."""
    rank = len(shape)
    if rank == 4:
        return "stack", True, tuple(shape[1:])
    if rank == 3:
        if geom is not None and tuple(shape) == tuple(geom.stack_shape) and not per_frame_required:
            return "stack", False, tuple(shape)
        if geom is not None and tuple(shape[1:]) == tuple(geom.slab_shape):
            return "slab", True, tuple(geom.stack_shape)
        if not per_frame_required and (n is None or shape[0] != n):
            return "stack", False, tuple(shape)
        raise DataError(path, name, f"shape {shape} is ambiguous: (N, SS, FS) slab frames need "
                        "data.geometry; stack frames are (N, P, H, W)")
    if rank == 2 and not per_frame_required:
        if geom is not None and tuple(shape) == tuple(geom.slab_shape):
            return "slab", False, tuple(geom.stack_shape)
    raise DataError(path, name, f"rank {rank} (shape {shape}) is not (N, P, H, W) or (N, SS, FS)")


def _find_label_dataset(h5: h5py.File, candidates: Sequence[str], n: int, stack_shape: tuple,
                        slab_shape: Optional[tuple], exclude: Optional[str]) -> Optional[str]:
    ok_shapes = {(n,) + tuple(stack_shape)}
    if slab_shape is not None:
        ok_shapes.add((n,) + tuple(slab_shape))
    for name in candidates:
        obj = h5.get(name)
        if isinstance(obj, h5py.Dataset) and tuple(obj.shape) in ok_shapes and name != exclude:
            return name
    found: list[str] = []

    def visit(name, obj):
        if (isinstance(obj, h5py.Dataset) and tuple(obj.shape) in ok_shapes
                and obj.dtype.kind in "biu" and "/" + name != exclude):
            found.append("/" + name)

    h5.visititems(visit)
    return found[0] if len(found) == 1 else None


def _inspect_frames(path: str, data, geom, frame_index=None) -> Source:
    """A Source for the frames of ``path`` (checked shapes; mask attached when configured)."""
    with _open(path, data.frames_dataset) as h5:
        ds = _dataset(h5, data.frames_dataset)
        if ds.dtype.kind not in "biuf":
            raise DataError(path, data.frames_dataset, f"dtype {ds.dtype} is not numeric")
        layout, _, stack_shape = _layout_of(tuple(ds.shape), None, geom, path, data.frames_dataset)
        n_file = int(ds.shape[0])
        if geom is not None and tuple(stack_shape) != tuple(geom.stack_shape):
            raise DataError(path, data.frames_dataset,
                            f"frames of stack shape {stack_shape} do not match the geometry's "
                            f"{tuple(geom.stack_shape)}")
    if frame_index is not None:
        frame_index = np.asarray(frame_index, np.int64)
        if frame_index.size and (frame_index.min() < 0 or frame_index.max() >= n_file):
            raise DataError(path, data.frames_dataset,
                            f"frame {int(frame_index.max())} requested, the file has {n_file}")
    n = n_file if frame_index is None else int(frame_index.size)
    return Source(path, data.frames_dataset, n, layout, tuple(stack_shape), frame_index=frame_index)


def _attach_mask(src: Source, data, geom) -> Source:
    if not data.mask_dataset:
        return src
    path = src.labels if data.mask_source == "labels" else src.frames
    if path is None:
        raise DataError(None, "data.mask_source", "mask_source = 'labels' needs label files")
    with _open(path, data.mask_dataset) as h5:
        mds = _dataset(h5, data.mask_dataset)
        mlayout, per_frame, mshape = _layout_of(tuple(mds.shape), None, geom, path,
                                                data.mask_dataset, per_frame_required=False)
        if mshape != src.stack_shape:
            raise DataError(path, data.mask_dataset,
                            f"mask shape {mds.shape} does not fit frames of {src.stack_shape}")
        if per_frame and data.mask_source == "labels":
            raise DataError(path, data.mask_dataset, "a mask in the label file must be static "
                            "(P, H, W)")
    return replace(src, mask=path, mask_dataset=data.mask_dataset, mask_layout=mlayout,
                   mask_per_frame=per_frame, mask_good_nonzero=data.mask_good == "nonzero")


def _is_label_stage_file(path: str) -> bool:
    with _open(path) as h5:
        return isinstance(h5.get("/events/event_id"), h5py.Dataset)


def _label_stage_sources(label_file: str, frame_filter: Optional[set], data, geom) -> list[Source]:
    """Sources of a label-stage output (``labels.h5``): one per frame file its events name,
    with the rows of the events that were labelled (status 0)."""
    from peaknet.parallel import parse_event_id

    with _open(label_file, "/events/event_id") as h5:
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in h5["/events/event_id"][()]]
        status = (np.asarray(h5["/events/status"][()]) if "/events/status" in h5
                  else np.zeros(len(ids), np.uint8))
        name = data.label_dataset if data.label_dataset != "auto" else next(
            (c for c in LABEL_DATASETS if isinstance(h5.get(c), h5py.Dataset)), None)
        if name is None:
            raise DataError(label_file, "auto", f"no label mask found (looked for "
                            f"{', '.join(LABEL_DATASETS)}); set data.label_dataset")
        lds = _dataset(h5, name)
        if lds.shape[0] != len(ids):
            raise DataError(label_file, name, f"{lds.shape[0]} label rows for {len(ids)} events")
        lshape = tuple(lds.shape[1:])
    groups: dict[str, tuple[list[int], list[int]]] = {}
    base = Path(label_file).parent
    for row, (eid, st) in enumerate(zip(ids, status)):
        if int(st) != 0:
            continue
        f, i = parse_event_id(eid)
        if not os.path.isabs(f) and not os.path.exists(f) and (base / f).exists():
            f = str(base / f)
        if frame_filter is not None and os.path.abspath(f) not in frame_filter:
            continue
        fr, rows = groups.setdefault(f, ([], []))
        fr.append(i)
        rows.append(row)
    out = []
    for f, (fr, rows) in groups.items():
        src = _inspect_frames(f, data, geom, frame_index=fr)
        if lshape == src.stack_shape:
            layout = "stack"
        elif geom is not None and lshape == tuple(geom.slab_shape):
            layout = "slab"
        else:
            raise DataError(label_file, name, f"label frames of shape {lshape} do not match the "
                            f"frames {src.stack_shape} of {f}")
        out.append(replace(src, labels=label_file, labels_dataset=name, labels_layout=layout,
                           label_rows=np.asarray(rows, np.int64)))
    return out


def resolve_sources(data, split: str = "train") -> list[Source]:
    """The :class:`Source` list of ``data.train`` (``split="train"``) or ``data.val``.

    Label files are either aligned frame by frame with the frame files (the generator's
    ``shard_*.truth.h5``: ``/mask``), or a label-stage output (``labels.h5`` with
    ``/events/event_id`` = "<file>//<frame>" and ``/labels/mask``): then the frames are the
    events it labelled (status 0), restricted to the frame files given, if any. Label value 255
    (the label stage's "ignore") makes a pixel invalid.

    Raises :class:`peaknet.errors.DataError` naming the file and dataset for a missing file,
    a label file whose mask does not match the frames, or no label dataset found.
    """
    frames = expand_files(getattr(data, split))
    labels_given = list(getattr(data, f"{split}_labels"))
    labels = expand_files(labels_given) if labels_given else []
    geom = load_geometry(data.geometry)
    slab_shape = tuple(geom.slab_shape) if geom is not None else None
    if data.label_source == "label" and labels and all(_is_label_stage_file(f) for f in labels):
        keep = {os.path.abspath(f) for f in frames} if frames else None
        out = []
        for lf in labels:
            out += _label_stage_sources(lf, keep, data, geom)
        if not out:
            raise DataError(labels[0], "/events/event_id", "no labelled event of the given "
                            f"frame files ({len(frames)} given)")
        return [_attach_mask(s, data, geom) for s in out]
    if labels and len(labels) != len(frames):
        raise DataError(None, f"data.{split}_labels",
                        f"{len(labels)} label files for {len(frames)} frame files")
    out = []
    for k, fpath in enumerate(frames):
        src = _inspect_frames(fpath, data, geom)
        if data.label_source != "none":
            src = _attach_labels(src, data, labels[k] if labels else None, slab_shape)
        out.append(_attach_mask(src, data, geom))
    return out


def _label_path(frames: str, pattern: Optional[str]) -> str:
    if not pattern:
        return frames
    p = Path(frames)
    return pattern.format(dir=str(p.parent), stem=p.stem, name=p.name)


def _attach_labels(src: Source, data, label_file: Optional[str], slab_shape) -> Source:
    path = label_file or _label_path(src.frames, data.label_pattern)
    cands = TRUTH_DATASETS if data.label_source == "truth" else LABEL_DATASETS
    with _open(path, data.label_dataset) as h5:
        if data.label_dataset == "auto":
            name = _find_label_dataset(h5, cands, src.n, src.stack_shape, slab_shape,
                                       exclude=src.frames_dataset if path == src.frames else None)
            if name is None:
                raise DataError(path, "auto", f"no {data.label_source} mask of shape "
                                f"{(src.n,) + src.stack_shape} found (looked for {', '.join(cands)} "
                                "and for the one integer dataset of that shape); set "
                                "data.label_dataset")
        else:
            name = data.label_dataset
        lds = _dataset(h5, name)
        shape = tuple(lds.shape)
        if shape == (src.n,) + src.stack_shape:
            layout = "stack"
        elif slab_shape is not None and shape == (src.n,) + tuple(slab_shape):
            layout = "slab"
        else:
            raise DataError(path, name, f"label shape {shape} does not match the frames "
                            f"{(src.n,) + src.stack_shape} of {src.frames}")
    return replace(src, labels=path, labels_dataset=name, labels_layout=layout)


# ------------------------------------------------------------------------------------------
# windows
# ------------------------------------------------------------------------------------------
def centred_offset(size: int, extent: int) -> int:
    """Canvas coordinate of the first row (column) of a ``size`` window centred on a canvas of
    ``extent`` pixels, exactly as :func:`peaknet.model.pad_crop` places it (negative: the window
    starts before the canvas, i.e. the canvas is padded)."""
    d = size - extent
    return -(d // 2) if d >= 0 else (-d) // 2


def cut_window(a: np.ndarray, oy: int, ox: int, h: int, w: int, fill=0) -> np.ndarray:
    """``a[..., oy:oy+h, ox:ox+w]`` with out-of-canvas pixels set to ``fill``."""
    H, W = a.shape[-2:]
    out = np.full(a.shape[:-2] + (h, w), fill, dtype=a.dtype)
    y0, y1 = max(oy, 0), min(oy + h, H)
    x0, x1 = max(ox, 0), min(ox + w, W)
    if y1 > y0 and x1 > x0:
        out[..., y0 - oy:y1 - oy, x0 - ox:x1 - ox] = a[..., y0:y1, x0:x1]
    return out


# ------------------------------------------------------------------------------------------
# dataset
# ------------------------------------------------------------------------------------------
class _Handles:
    """HDF5 files opened lazily, per process (a forked worker never uses its parent's)."""

    def __init__(self) -> None:
        self.pid: Optional[int] = None
        self.files: dict[str, h5py.File] = {}

    def get(self, path: str) -> h5py.File:
        if self.pid != os.getpid():
            self.files = {}
            self.pid = os.getpid()
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = _open(path)
        return f

    def close(self) -> None:
        if self.pid == os.getpid():
            for f in self.files.values():
                try:
                    f.close()
                except Exception:  # noqa: BLE001
                    pass
        self.files = {}


class PeakDataset(Dataset):
    """Model inputs with labels (and cached teacher logits) from a list of :class:`Source`.

    Parameters
    ----------
    sources: from :func:`resolve_sources`.
    input: "panels" or "assembled".
    geometry: the detector geometry spec (name or .geom path); needed for "assembled" and for
        slab data.
    window: (h, w) of a sample; None (panels only): the whole module.
    zscore: "sample" or "frame".
    augment, flip, max_shift: training-time augmentation (see the module doc).
    seed: augmentation seed.

    Items (dict of tensors): ``image`` (1, h, w) float32 z-scored; ``label`` (h, w) int64 0/1;
    ``valid`` (h, w) bool; ``index`` int64; ``keep`` bool; and ``teacher`` (C, h, w) float16
    when a teacher cache is attached (:meth:`attach_teacher`).
    """

    def __init__(self, sources: Sequence[Source], input: str = "panels", geometry: Optional[str] = None,
                 window: Optional[tuple] = None, zscore: str = "sample", augment: bool = False,
                 flip: bool = False, max_shift: int = 0, seed: int = 0) -> None:
        if not sources:
            raise ValueError("PeakDataset needs at least one source")
        self.sources = list(sources)
        self.input = input
        self.geometry = geometry
        self.zscore_mode = zscore
        self.augment = augment
        self.flip = flip
        self.max_shift = int(max_shift)
        self.seed = int(seed)
        self.has_labels = all(s.labels is not None for s in self.sources)
        if input == "assembled":
            if geometry is None:
                raise ValueError("assembled inputs need a geometry")
            if window is None:
                raise ValueError("assembled inputs need a window (image_size, image_size)")
            self.per_frame = [1] * len(self.sources)
        elif input == "panels":
            self.per_frame = [s.stack_shape[0] for s in self.sources]
            shapes = {tuple(s.stack_shape[1:]) for s in self.sources}
            if window is None:
                if len(shapes) > 1:
                    raise ValueError(f"modules of different shapes {sorted(shapes)}: set data.crop")
                window = shapes.pop()
        else:
            raise ValueError(f"input must be 'panels' or 'assembled', not {input!r}")
        if any(s.layout == "slab" for s in self.sources) and geometry is None:
            raise ValueError("slab frames need a geometry")
        self.window = (int(window[0]), int(window[1]))
        counts = np.array([s.n * k for s, k in zip(self.sources, self.per_frame)], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        fcounts = np.array([s.n for s in self.sources], np.int64)
        self._fstarts = np.concatenate([[0], np.cumsum(fcounts)])
        self._h5 = _Handles()
        self.teacher: Optional[str] = None
        self._teacher_meta: Optional[dict] = None

    # -- bookkeeping --------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def n_frames(self) -> int:
        return int(self._fstarts[-1])

    def locate(self, idx: int) -> tuple[int, int, int]:
        """Sample index -> (source, frame in source, panel (0 for assembled))."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range ({len(self)} samples)")
        s = int(np.searchsorted(self._starts, idx, side="right") - 1)
        local = int(idx - self._starts[s])
        k = self.per_frame[s]
        return s, local // k, local % k

    def frame_index(self, idx: int) -> int:
        """Global frame number of sample ``idx`` (the teacher cache's first axis)."""
        s, i, _ = self.locate(idx)
        return int(self._fstarts[s] + i)

    def frame_samples(self, g: int) -> list[int]:
        """Sample indices of global frame ``g``."""
        s = int(np.searchsorted(self._fstarts, g, side="right") - 1)
        i = g - int(self._fstarts[s])
        k = self.per_frame[s]
        first = int(self._starts[s]) + i * k
        return list(range(first, first + k))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = _Handles()  # never ship open files to workers
        return state

    def close(self) -> None:
        self._h5.close()

    # -- reading ------------------------------------------------------------------------
    def _geom(self):
        return load_geometry(self.geometry)

    def _read(self, path: str, name: str, layout: str, i: Optional[int], p: Optional[int]):
        ds = self._h5.get(path)[name]
        try:
            if layout == "stack":
                if i is None:
                    return ds[()] if p is None else ds[p]
                return ds[i] if p is None else ds[i, p]
            slab = ds[()] if i is None else ds[i]
        except OSError as exc:
            raise DataError(path, name, f"cannot read frame {i}: {exc}") from exc
        stack = self._geom().slab_to_stack(slab)
        return stack if p is None else stack[p]

    def _frames(self, src: Source, i: int, p: Optional[int]) -> np.ndarray:
        return np.asarray(self._read(src.frames, src.frames_dataset, src.layout, src.frame(i), p),
                          np.float32)

    def _good(self, src: Source, i: int, p: Optional[int], raw: np.ndarray) -> np.ndarray:
        good = np.isfinite(raw)
        if src.mask is not None:
            m = self._read(src.mask, src.mask_dataset, src.mask_layout,
                           src.frame(i) if src.mask_per_frame else None, p)
            m = np.asarray(m) != 0
            good &= m if src.mask_good_nonzero else ~m
        return good

    def _label(self, src: Source, i: int, p: Optional[int], shape: tuple) -> np.ndarray:
        """uint8: 0 background, 1 peak, 255 ignore (any other nonzero value counts as peak)."""
        if src.labels is None:
            return np.zeros(shape, np.uint8)
        lab = np.asarray(self._read(src.labels, src.labels_dataset, src.labels_layout,
                                    src.label_row(i), p))
        out = (lab != 0).astype(np.uint8)
        if lab.dtype != np.bool_:
            out[lab == IGNORE] = IGNORE
        return out

    def canvas(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The un-cut sample: (image z-scored float32 (H, W), label uint8 0/1, valid bool);
        bad pixels, gaps and "ignore" labels are invalid, with image 0 and label 0 there."""
        from peaknet.model import zscore

        s, i, p = self.locate(idx)
        src = self.sources[s]
        if self.input == "panels":
            if self.zscore_mode == "frame":
                raw = self._frames(src, i, None)
                good = self._good(src, i, None, raw)
                z = zscore(raw, good, ndim=3).numpy()[p]
                good = good[p]
            else:
                raw = self._frames(src, i, p)
                good = self._good(src, i, p, raw)
                z = zscore(raw, good, ndim=2).numpy()
            label = self._label(src, i, p, z.shape)
        else:
            raw = self._frames(src, i, None)
            good = self._good(src, i, None, raw)
            label = self._label(src, i, None, raw.shape)
            geom = self._geom()
            img, _ = geom.assemble(raw, fill=np.nan)
            g_img, _ = geom.assemble(good.astype(np.uint8), fill=0)
            label, _ = geom.assemble(label, fill=0)
            good = g_img.astype(bool) & np.isfinite(img)
            z = zscore(np.nan_to_num(img), good, ndim=2).numpy()
            label = label.astype(np.uint8)
        good = good & (label != IGNORE)
        label = np.where(good, label, 0).astype(np.uint8)  # no label where nothing is learnt
        return z, label, good

    def teacher_window(self, canvas_shape: tuple) -> tuple[int, int, int, int]:
        """(oy, ox, h, w) of the window the teacher sees on a canvas: the centred sample window
        (assembled) or the whole module (panels)."""
        if self.input == "panels":
            return 0, 0, int(canvas_shape[0]), int(canvas_shape[1])
        h, w = self.window
        return centred_offset(h, canvas_shape[0]), centred_offset(w, canvas_shape[1]), h, w

    def teacher_inputs(self, g: int) -> np.ndarray:
        """The teacher's inputs for global frame ``g``: (K, 1, h, w) float32 (K = modules for
        panels, 1 for assembled)."""
        out = []
        for idx in self.frame_samples(g):
            z, _, _ = self.canvas(idx)
            oy, ox, h, w = self.teacher_window(z.shape)
            out.append(cut_window(z, oy, ox, h, w, 0.0)[None])
        return np.stack(out)

    def teacher_shape(self) -> tuple:
        """(K, h, w) of one frame's teacher windows (all frames must agree)."""
        if self.input == "assembled":
            return (1,) + self.window
        shapes = {tuple(s.stack_shape) for s in self.sources}
        if len(shapes) > 1:
            raise ValueError(f"a teacher cache needs frames of one shape, got {sorted(shapes)}")
        return shapes.pop()

    def attach_teacher(self, path: str, dataset: str = "logits") -> None:
        """Read cached teacher logits from ``path`` (written by :mod:`peaknet.train.distill`)."""
        with _open(path, dataset) as h5:
            ds = _dataset(h5, dataset)
            want = (self.n_frames,) + (self.teacher_shape()[0],)
            if tuple(ds.shape[:2]) != want or tuple(ds.shape[3:]) != self.teacher_shape()[1:]:
                raise DataError(path, dataset, f"cached logits {ds.shape} do not fit the "
                                f"dataset ({self.n_frames} frames of {self.teacher_shape()})")
            self._teacher_meta = {"classes": int(ds.shape[2])}
        self.teacher = path
        self._teacher_ds = dataset

    # -- items --------------------------------------------------------------------------
    def _rng(self, idx: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(idx)])

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            idx, epoch, keep = int(key[0]), int(key[1]), bool(key[2])
        else:
            idx, epoch, keep = int(key), 0, True
        z, label, valid = self.canvas(idx)
        H, W = z.shape
        h, w = self.window
        fy = fx = False
        if self.augment:
            rng = self._rng(idx, epoch)
            ms = self.max_shift
            oy = int(rng.integers(min(0, H - h) - ms, max(0, H - h) + ms + 1))
            ox = int(rng.integers(min(0, W - w) - ms, max(0, W - w) + ms + 1))
            if self.flip:
                fy, fx = bool(rng.integers(2)), bool(rng.integers(2))
        else:
            oy, ox = centred_offset(h, H), centred_offset(w, W)
        image = cut_window(z, oy, ox, h, w, 0.0)
        lab = cut_window(label, oy, ox, h, w, 0)
        val = cut_window(valid, oy, ox, h, w, False)
        item = {}
        if self.teacher is not None:
            g = self.frame_index(idx)
            k = self.locate(idx)[2]
            ty, tx, th, tw = self.teacher_window((H, W))
            logits = np.asarray(self._h5.get(self.teacher)[self._teacher_ds][g, k])
            tvalid = cut_window(np.ones((th, tw), bool), oy - ty, ox - tx, h, w, False)
            item["teacher"] = cut_window(logits, oy - ty, ox - tx, h, w, 0)
            val &= tvalid
        arrays = {"image": image, "label": lab, "valid": val, **item}
        if fy or fx:
            axes = tuple(a for a, f in ((-2, fy), (-1, fx)) if f)
            arrays = {k: np.flip(v, axis=axes) for k, v in arrays.items()}
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(arrays["image"])[None]),
            "label": torch.from_numpy(np.ascontiguousarray(arrays["label"]).astype(np.int64)),
            "valid": torch.from_numpy(np.ascontiguousarray(arrays["valid"])),
            "index": torch.tensor(idx, dtype=torch.int64),
            "keep": torch.tensor(keep),
        }
        if "teacher" in arrays:
            out["teacher"] = torch.from_numpy(np.ascontiguousarray(arrays["teacher"]).astype(np.float16))
        return out


def build_dataset(data, sources: Sequence[Source], train: bool, seed: int) -> PeakDataset:
    """A :class:`PeakDataset` from a :class:`~peaknet.train.config.DataSection`; ``train``
    enables the configured augmentation (validation never augments)."""
    window = (data.image_size, data.image_size) if data.input == "assembled" else (
        tuple(data.crop) if data.crop is not None else None)
    return PeakDataset(sources, input=data.input, geometry=data.geometry, window=window,
                       zscore=data.zscore, augment=train and data.augment, flip=data.flip,
                       max_shift=data.max_shift, seed=seed)


# ------------------------------------------------------------------------------------------
# sampler and loader
# ------------------------------------------------------------------------------------------
class ShardSampler(Sampler):
    """DistributedSampler-style sharding that yields ``(index, epoch, keep)`` keys.

    n: dataset size; indices: optional subset (e.g. a validation subset) -- positions into it
    are sharded; rank, world: this process among all; shuffle, seed: a permutation per epoch
    (``seed + epoch``); drop_last: training (equal count per rank, remainder dropped) versus
    validation (padded with repeats whose ``keep`` is False).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, indices: Optional[Sequence[int]] = None) -> None:
        self.base = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.rank, self.world = int(rank), int(world)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.epoch = 0
        self.start = 0
        if drop_last and len(self.base) < self.world:
            raise ValueError(f"{len(self.base)} samples cannot feed {self.world} processes")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        self.start = int(start)

    def shard(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, keep) of this rank for the current epoch (before ``start``)."""
        n = len(self.base)
        if self.shuffle:
            g = np.random.default_rng([self.seed, self.epoch])
            order = self.base[g.permutation(n)]
        else:
            order = self.base
        if self.drop_last:
            total = (n // self.world) * self.world
            keep = np.ones(total, bool)
            order = order[:total]
        else:
            total = -(-n // self.world) * self.world
            pad = total - n
            keep = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
            order = np.concatenate([order, order[:pad]]) if pad else order
            while len(order) < total:  # fewer samples than ranks
                order = np.concatenate([order, order[: total - len(order)]])
                keep = np.concatenate([keep, np.zeros(total - len(keep), bool)])
        return order[self.rank::self.world], keep[self.rank::self.world]

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        idx, keep = self.shard()
        for i, k in zip(idx[self.start:], keep[self.start:]):
            yield int(i), self.epoch, bool(k)

    def __len__(self) -> int:
        return max(len(self.shard()[0]) - self.start, 0)


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(dataset: PeakDataset, sampler: ShardSampler, batch_size: int, num_workers: int = 0,
                prefetch_factor: int = 2, drop_last: bool = True, pin_memory: bool = False
                ) -> DataLoader:
    """A DataLoader over ``sampler``'s keys; workers open their own HDF5 handles."""
    kw = dict(batch_size=batch_size, sampler=sampler, num_workers=num_workers,
              drop_last=drop_last, pin_memory=pin_memory)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init,
                  persistent_workers=False)
    return DataLoader(dataset, **kw)
