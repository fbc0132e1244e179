"""Pluggable peak finders for inference: the PeakNet model or peakfinder8, one interface.

    pred = build_predictor(cfg.predictor, geometry=src.geometry, frame_shape=src.frame_shape)
    peaks = pred.predict(frames, masks=None)   # frames (B, P, H, W) -> list of B PeakLists

A :class:`Predictor` is an algorithm in the OM sense: arrays in, :class:`peaknet.peaks.PeakList`
out, no files, no MPI, no Ray. The pipeline's inference actors, the legacy MPI ranks and the
benchmark's "model alone" all call the same object, so their peak lists agree.

Device overlap (GPU)
--------------------
:class:`PeakNetPredictor` splits a batch in two steps so an actor can overlap them:
:meth:`~PeakNetPredictor.stage` copies the frames into pinned host memory and starts an
asynchronous host-to-device copy on a side CUDA stream (run it in a prefetch thread for the next
batch); :meth:`~PeakNetPredictor.predict_staged` waits for that copy on the compute stream and
runs pre-processing, the model (bfloat16 autocast, ``torch.compile``) and the decoder. On CPU
both are plain calls. ``predict`` is ``predict_staged(stage(frames))``.

Weights
-------
``.safetensors`` files, or torch checkpoints read with ``torch.load(weights_only=True)`` (a plain
state dict, or one under ``"model"``/``"state_dict"``). Arbitrary pickles are refused: a
checkpoint from an untrusted place cannot run code. Without weights the model is initialised
from a fixed seed and a warning says so (a placeholder until trained weights are shipped).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, runtime_checkable

import numpy as np

from peaknet.errors import ConfigError, InputError
from peaknet.peaks import PeakList

log = logging.getLogger(__name__)

__all__ = [
    "Predictor",
    "PeakNetPredictor",
    "Peakfinder8Predictor",
    "build_predictor",
    "load_weights",
    "predictor_fingerprint",
]


@runtime_checkable
class Predictor(Protocol):
    """``predict(frames, masks) -> list[PeakList]``.

    frames: (B, P, H, W) float32 detector stacks (ADU). masks: None, or bool/0-1 of a shape
    broadcastable to frames (True = good pixel), applied on top of the predictor's own
    (geometry) mask. NaN/inf pixels are always treated as bad. Returns one PeakList per frame
    (module index, module-local ss/fs).
    """

    name: str

    def predict(self, frames: np.ndarray, masks: Optional[np.ndarray] = None) -> list[PeakList]: ...

    def describe(self) -> dict: ...


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def _strip_prefix(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(path) -> dict:
    """A state dict from ``.safetensors`` or a weights-only torch checkpoint.

    Accepted torch layouts: the state dict itself, or a dict holding it under ``"model"`` or
    ``"state_dict"``. Prefixes added by DDP/FSDP (``module.``) or ``torch.compile``
    (``_orig_mod.``) are removed. Raises :class:`InputError` naming the file for anything else,
    including pickles that need code to load (refused by ``weights_only=True``).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "weights file does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
            raise InputError(path, None, f"not a readable safetensors file: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
            raise InputError(
                path, None,
                f"not a weights-only torch checkpoint (arbitrary pickles are refused): {exc}",
            ) from exc
        for key in ("model", "state_dict"):
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InputError(path, None, "holds no state dict of tensors")
        sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        sd = _strip_prefix(sd, prefix)
    return sd


def _file_digest(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def predictor_fingerprint(section) -> dict:
    """What makes two runs' peak lists comparable: the predictor settings (and the weights'
    content hash), without building anything. Goes into the run's plan and shard records."""
    if section.kind == "peakfinder8":
        import dataclasses

        return {"kind": "peakfinder8", "params": dataclasses.asdict(section.peakfinder8.params())}
    return {
        "kind": "peaknet", "preset": section.preset,
        "weights": None if section.weights is None else _file_digest(section.weights),
        "seed": None if section.weights is not None else section.seed,
        "threshold": section.threshold, "min_pix": section.min_pix, "max_pix": section.max_pix,
        "norm": section.norm, "dtype": section.dtype,
    }


# --------------------------------------------------------------------------------------------
# PeakNet
# --------------------------------------------------------------------------------------------
@dataclass
class Staged:
    """A batch on its way to the device: host frames (for the decoder's measurements), the
    device tensor, and the CUDA event its copy records (None on CPU)."""

    host: np.ndarray
    dev: Any
    event: Any = None
    slot: int = -1


class PeakNetPredictor:
    """PeakNet inference: per-panel z-score -> model -> segmentation -> connected components.

    Parameters
    ----------
    preset, weights, seed:
        The model (:func:`peaknet.model.build_model`); without ``weights`` the parameters come
        from ``torch.manual_seed(seed)`` (logged as a warning).
    device:
        "auto" (CUDA if available), "cpu", "cuda" or a torch device.
    dtype:
        "auto" (bfloat16 autocast on CUDA, float32 on CPU), "float32", "bfloat16".
    compile:
        "auto" (``torch.compile`` on CUDA), "on", "off". A failure to compile falls back to
        eager mode with a warning.
    mask:
        (P, H, W) good-pixel mask of the detector (True = good), e.g. the geometry's.
    threshold, min_pix, max_pix, norm:
        Decoder and pre-processing options (:func:`peaknet.model.decode_peaks`,
        :func:`peaknet.model.prepare_panels`).
    pinned_slots:
        Pinned host buffers in rotation for asynchronous copies (>= prefetch depth + 1).
    """

    name = "peaknet"

    def __init__(self, preset: str = "small-cpu", weights=None, seed: int = 0,
                 device="auto", dtype: str = "auto", compile: str = "auto",
                 mask: Optional[np.ndarray] = None, threshold: Optional[float] = None,
                 min_pix: int = 1, max_pix: Optional[int] = None, norm: str = "frame",
                 pinned_slots: int = 3):
        import torch

        from peaknet.model import build_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and not torch.cuda.is_available():
            raise ConfigError(None, "predictor.device", "cuda requested but no GPU is visible")
        self.preset, self.weights, self.seed = preset, weights, seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(preset)
        if weights is not None:
            sd = load_weights(weights)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise InputError(weights, None, f"weights do not fit preset {preset!r}: "
                                 f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
            log.info("PeakNet %s: weights from %s", preset, weights)
        else:
            log.warning("PeakNet %s with RANDOM weights (seed %d): a placeholder until trained "
                        "weights exist; peak lists are not meaningful", preset, seed)
        self.model = model.eval().to(self.device)
        if dtype == "auto":
            dtype = "bfloat16" if self.is_cuda else "float32"
        self.dtype = dtype
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        self.compiled = False
        if compile == "on" or (compile == "auto" and self.is_cuda):
            try:
                self.model = torch.compile(self.model)
                self.compiled = True
            except Exception as exc:  # noqa: BLE001 - no compiler toolchain, old GPU...
                log.warning("torch.compile failed (%s); running eagerly", exc)
        self.mask_host = None if mask is None else np.asarray(mask, bool)
        self.mask_dev = None if mask is None else torch.from_numpy(self.mask_host).to(self.device)
        self.threshold, self.min_pix, self.max_pix, self.norm = threshold, min_pix, max_pix, norm
        self._lock = threading.Lock()
        self._slots = [None] * max(2, int(pinned_slots))
        self._slot_events = [None] * len(self._slots)
        self._next_slot = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None

    # --- staging (prefetch thread) -----------------------------------------------------------
    def _pinned_slot(self, frames: np.ndarray):
        """A pinned buffer holding ``frames``: slots rotate; a slot is reused only after the
        copy that last read it has finished."""
        import torch

        with self._lock:
            i = self._next_slot
            self._next_slot = (i + 1) % len(self._slots)
        ev = self._slot_events[i]
        if ev is not None:
            ev.synchronize()
        buf = self._slots[i]
        n = int(np.prod(frames.shape))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, pin_memory=True)
            self._slots[i] = buf
        view = buf[:n].view(frames.shape)
        view.numpy()[...] = frames
        return i, view

    def stage(self, frames: np.ndarray) -> Staged:
        """Start moving ``frames`` (B, P, H, W) to the device; returns at once on GPU."""
        import torch

        frames = np.ascontiguousarray(frames, dtype=np.float32)
        if not self.is_cuda:
            return Staged(frames, torch.from_numpy(frames))
        slot, pinned = self._pinned_slot(frames)
        with torch.cuda.stream(self._copy_stream):
            dev = pinned.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        self._slot_events[slot] = ev
        return Staged(frames, dev, ev, slot)

    # --- compute (main thread) ----------------------------------------------------------------
    def _masks(self, masks: Optional[np.ndarray]):
        import torch

        if masks is None:
            return self.mask_host, self.mask_dev
        host = np.asarray(masks, bool)
        if self.mask_host is not None:
            host = host & self.mask_host
        return host, torch.from_numpy(np.ascontiguousarray(host)).to(self.device)

    def predict_staged(self, staged: Staged, masks: Optional[np.ndarray] = None) -> list[PeakList]:
        import torch

        from peaknet.model import decode_peaks, prepare_panels

        if staged.host.shape[0] == 0:
            return []
        host_mask, dev_mask = self._masks(masks)
        with torch.inference_mode():
            x = staged.dev
            if staged.event is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(staged.event)
                x.record_stream(cur)
            inp, info = prepare_panels(x, dev_mask, norm=self.norm)
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    logits = self.model(inp)
            else:
                logits = self.model(inp)
            out = info.split(logits)
            return decode_peaks(out, staged.host, host_mask, threshold=self.threshold,
                                min_pix=self.min_pix, max_pix=self.max_pix, layout="stack")

    def predict(self, frames: np.ndarray, masks: Optional[np.ndarray] = None) -> list[PeakList]:
        return self.predict_staged(self.stage(frames), masks)

    def describe(self) -> dict:
        return {"kind": self.name, "preset": self.preset,
                "weights": None if self.weights is None else str(self.weights),
                "seed": self.seed, "device": str(self.device), "dtype": self.dtype,
                "compiled": self.compiled, "threshold": self.threshold}


# --------------------------------------------------------------------------------------------
# peakfinder8
# --------------------------------------------------------------------------------------------
class Peakfinder8Predictor:
    """peakfinder8 (:mod:`peaknet.findpeaks`) behind the predictor interface.

    radius: (P, H, W) distance from the beam in pixels (the geometry's radius map); mask: the
    detector's good pixels; params: :class:`~peaknet.findpeaks.Peakfinder8Params`; threads:
    frames of a batch processed in parallel (the numba kernels release the GIL).
    """

    name = "peakfinder8"

    def __init__(self, radius: np.ndarray, mask: Optional[np.ndarray], params, threads: int = 1):
        from peaknet.findpeaks import Peakfinder8

        r = np.asarray(radius, np.float64)
        bad = ~np.isfinite(r)
        if bad.any():  # off-panel pixels of a stack: masked out, any finite radius
            r = np.where(bad, 0.0, r)
            mask = ~bad if mask is None else (np.asarray(mask, bool) & ~bad)
        self.params = params
        self._pf = Peakfinder8(r, mask, params)
        self.threads = max(1, int(threads))
        self._pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pf8")

    def predict(self, frames: np.ndarray, masks: Optional[np.ndarray] = None) -> list[PeakList]:
        frames = np.asarray(frames, np.float32)
        if masks is not None:  # per-frame masks: masked pixels become NaN (= masked)
            frames = np.where(np.broadcast_to(np.asarray(masks, bool), frames.shape),
                              frames, np.float32(np.nan))
        if self._pool is None or len(frames) < 2:
            return [self._pf(f) for f in frames]
        return list(self._pool.map(self._pf, frames))

    def describe(self) -> dict:
        import dataclasses

        return {"kind": self.name, "params": dataclasses.asdict(self.params)}


# --------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------
def build_predictor(section, geometry=None, frame_shape: Optional[tuple] = None,
                    threads: int = 1, device: Optional[str] = None, pinned_slots: int = 3):
    """The predictor of a :class:`peaknet.infer.config.PredictorSection`.

    geometry: gives the good-pixel mask (both) and the radius map (peakfinder8, required);
    frame_shape: checked against the geometry; threads: peakfinder8's frame threads (torch
    threads are set by the caller's process); device: overrides ``section.device``.
    """
    mask = None
    if geometry is not None:
        mask = geometry.good_pixel_mask()
        if frame_shape is not None and tuple(mask.shape) != tuple(frame_shape):
            raise ConfigError(None, "source.geometry",
                              f"geometry stack shape {mask.shape} != frames {tuple(frame_shape)}")
    if section.kind == "peaknet":
        return PeakNetPredictor(
            section.preset, section.weights, section.seed, device or section.device,
            section.dtype, section.compile, mask, section.threshold, section.min_pix,
            section.max_pix, section.norm, pinned_slots=pinned_slots,
        )
    if section.kind == "peakfinder8":
        if geometry is None:
            raise ConfigError(None, "source.geometry",
                              "peakfinder8 needs a geometry (its radius map)")
        return Peakfinder8Predictor(geometry.radius_map(), mask, section.peakfinder8.params(),
                                    threads)
    raise ConfigError(None, "predictor.kind", f"unknown predictor {section.kind!r}")
