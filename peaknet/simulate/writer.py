"""Writing simulated frames: CXI shards, truth files, manifest and summary.

Output directory layout (``cfg.run.out``)::

    shard_00000.cxi          frames + CrystFEL-compatible peak list of the detectable truth peaks
    shard_00000.truth.h5     ground truth of the same frames (layout below)
    ...
    geometry.geom            the geometry used (clen and photon energy filled in)
    manifest.json            shard list: files, first frame, frame count, hits, peaks
    summary.json             run summary (also returned by :func:`run`)
    simulate.config.toml     the resolved config

Shard k holds frames ``k * frames_per_shard`` .. ``min((k+1) * frames_per_shard, frames) - 1``.
Files are written under a temporary name and renamed when complete, so an existing shard file
is always whole; :func:`run` skips shards whose files exist and were made with the same config
(``run.overwrite = true`` rewrites them).

CXI file (:class:`peaknet.io.cxi.CXIWriter`): ``/entry_1/data_1/data`` (N, P, H, W) float32 ADU
(stack layout; (N, SS, FS) with ``run.frame_layout = "slab"``), ``/entry_1/result_1/{nPeaks, peakXPosRaw, peakYPosRaw, peakTotalIntensity,
peakMaximumValue, peakSNR, peakNPixels, peakSegPosRaw}`` in slab coordinates (the truth's
detectable peaks: expected integrated and peak-pixel ADU), ``/entry_1/event_id``,
``/LCLS/photon_energy_eV``, ``/LCLS/eventNumber`` (global frame index) and per-frame
``/entry_1/result_1/{hit, nReflections}``.

Truth file (HDF5), N frames, M reflections in total:

=================================== ============== ==========================================
dataset                             shape, dtype   meaning
=================================== ============== ==========================================
/frames/index                       (N,) int64     global frame index
/frames/event_id                    (N,) str       event id (same as the CXI file)
/frames/hit                         (N,) bool      a crystal was in the beam
/frames/photon_energy_eV            (N,) float64   photon energy of the pulse
/frames/n_reflections               (N,) int32     rows of this frame in /reflections
/frames/reflection_start            (N,) int64     first row of this frame in /reflections
/frames/n_detectable                (N,) int32     detectable reflections
/frames/n_mask_pixels               (N,) int64     pixels set in /mask
/frames/n_lattices                  (N,) int8      crystals in the frame (0, 1, 2)
/frames/orientation                 (N, 2, 3, 3)   U of each crystal (NaN-padded); q = U B h
/frames/cell                        (N, 2, 6)      a, b, c (Å), alpha, beta, gamma (°)
/frames/{size_um, mosaicity_deg,    (N, 2) float64 per-crystal parameters (NaN-padded)
 b_factor, scale_photons}
/frames/{pulse, background_water,   (N,) float64   per-frame scalars (dead/noisy_module: -1 =
 background_diffuse, background_air,               none)
 dead_module, noisy_module}
/reflections/frame                  (M,) int32     row in /frames
/reflections/frame_index            (M,) int64     global frame index
/reflections/<column>               (M,)           see ``generator.REFLECTION_COLUMNS``: lattice,
                                                   h, k, l, panel, ss, fs, d, partiality,
                                                   excitation_error, photons, peak_photons,
                                                   background, npix_area, snr, detectable,
                                                   npix_mask, cov_ss, cov_sf, cov_ff, eta
/mask                               (N, P, H, W)   per-pixel peak mask (bool), gzip, one chunk
                                    bool           per frame
/static/good_pixels                 (P, H, W) bool pixels that read out (no dead / hot pixels)
/static/beamstop_transmission       (P, H, W) f32  fraction of light passing the beamstop
=================================== ============== ==========================================

Root attributes: format ("peaknet-simulate-truth"), version, seed, detector, shard,
frame_start, n_frames, stack_shape, adu_per_photon, clen_m, photon_energy_eV, config_hash,
config (TOML text), coordinates, detectable_definition, mask_definition.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from peaknet.errors import DataError

from .config import SimulateConfig
from .generator import REFLECTION_COLUMNS, FrameTruth, Simulator

__all__ = [
    "TRUTH_FORMAT",
    "TRUTH_VERSION",
    "TruthWriter",
    "shard_ranges",
    "shard_paths",
    "write_shard",
    "run",
    "read_truth_frame",
    "read_truth_reflections",
    "config_hash",
    "write_run_files",
    "DISTRIBUTION_KEYS",
]

log = logging.getLogger(__name__)

TRUTH_FORMAT = "peaknet-simulate-truth"
TRUTH_VERSION = 1
_LATTICE_SCALARS = ("size_um", "mosaicity_deg", "b_factor", "scale_photons")
_FRAME_SCALARS = ("pulse", "background_water", "background_diffuse", "background_air", "dead_module", "noisy_module")
_MAX_LATTICES = 2

COORDINATES = (
    "panel = module index of the (P, H, W) stack; ss, fs = module-local pixel coordinates with "
    "the centre of pixel (i, j) at (i, j); lab frame: beam along +z, metres"
)


#: [run] keys that say how the shards are spread over processes (they never change a frame)
DISTRIBUTION_KEYS = ("backend", "shard_index", "shard_count", "array", "finalize_only")


def _config_text(cfg: SimulateConfig) -> str:
    from peaknet.config import dump_toml

    defaults = type(cfg.run)()  # how the shards were spread is not part of what they hold
    run = dataclasses.replace(cfg.run, **{k: getattr(defaults, k) for k in DISTRIBUTION_KEYS})
    return dump_toml(dataclasses.replace(cfg, run=run))


def config_hash(cfg: SimulateConfig) -> str:
    """Hash of everything that changes the frames (the config without run.out, run.progress,
    run.frames, run.overwrite and the distribution keys): shards written with equal hashes
    are interchangeable."""
    d = dataclasses.asdict(cfg)
    for k in ("out", "progress", "frames", "overwrite", *DISTRIBUTION_KEYS):
        d["run"].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _definitions(cfg: SimulateConfig) -> tuple[str, str]:
    t = cfg.truth
    det = (
        f"S / sqrt(S + B + n*sigma_read^2) >= {t.snr_threshold}: S expected spot photons over the pixels "
        f"where the spot profile >= {t.area_fraction} of its maximum, B expected background photons "
        f"there, n their number, sigma_read readout noise in photons; and the brightest pixel works "
        f"(not dead/hot, module alive, beamstop transmission >= 0.5)"
    )
    msk = (
        f"pixels of detectable spots with expected spot photons s >= {t.mask_fraction} x the spot's "
        f"brightest pixel and s >= {t.mask_snr} x sqrt(b + sigma_read^2) (b: background photons), plus "
        f"the brightest pixel of every detectable spot; working pixels only"
    )
    return det, msk


def shard_ranges(cfg: SimulateConfig) -> list[tuple[int, int]]:
    """(start, stop) frame ranges of the shards."""
    n, k = cfg.run.frames, cfg.run.frames_per_shard
    return [(s, min(s + k, n)) for s in range(0, n, k)]


def shard_paths(cfg: SimulateConfig, shard: int) -> tuple[Path, Path]:
    """(cxi, truth) paths of shard ``shard``."""
    out = Path(cfg.run.out)
    return out / f"shard_{shard:05d}.cxi", out / f"shard_{shard:05d}.truth.h5"


class TruthWriter:
    """Append :class:`FrameTruth` objects to a truth file (layout in the module docstring).

    Written to ``path + ".tmp"`` and renamed by :meth:`close`; :meth:`abort` removes it.
    """

    def __init__(self, path, sim: Simulator, shard: int, frame_start: int, n_frames: int):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.sim = sim
        cfg = sim.cfg
        self.n = 0
        self.m = 0
        self._h5 = h5py.File(self.tmp_path, "w")
        h = self._h5
        det_def, mask_def = _definitions(cfg)
        attrs = {
            "format": TRUTH_FORMAT,
            "version": TRUTH_VERSION,
            "seed": cfg.run.seed,
            "detector": cfg.run.detector,
            "shard": shard,
            "frame_start": frame_start,
            "n_frames": n_frames,
            "stack_shape": np.asarray(sim.stack_shape, np.int64),
            "adu_per_photon": sim.adu_per_photon,
            "clen_m": sim.clen_m,
            "photon_energy_eV": sim.photon_energy_eV,
            "config_hash": config_hash(cfg),
            "config": _config_text(cfg),
            "coordinates": COORDINATES,
            "detectable_definition": det_def,
            "mask_definition": mask_def,
        }
        for k, v in attrs.items():
            h.attrs[k] = v
        fr = h.create_group("frames")
        self._f = {}

        def f(name, shape, dtype, fill=0):
            self._f[name] = fr.create_dataset(
                name, (0,) + shape, dtype, maxshape=(None,) + shape, chunks=(256,) + shape, fillvalue=fill
            )

        f("index", (), np.int64)
        self._f["event_id"] = fr.create_dataset("event_id", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(256,))
        f("hit", (), np.bool_)
        f("photon_energy_eV", (), np.float64)
        f("n_reflections", (), np.int32)
        f("reflection_start", (), np.int64)
        f("n_detectable", (), np.int32)
        f("n_mask_pixels", (), np.int64)
        f("n_lattices", (), np.int8)
        f("orientation", (_MAX_LATTICES, 3, 3), np.float64, np.nan)
        f("cell", (_MAX_LATTICES, 6), np.float64, np.nan)
        for k in _LATTICE_SCALARS:
            f(k, (_MAX_LATTICES,), np.float64, np.nan)
        for k in _FRAME_SCALARS:
            f(k, (), np.float64, np.nan)
        rg = h.create_group("reflections")
        self._r = {}
        cols = {"frame": np.int32, "frame_index": np.int64, **REFLECTION_COLUMNS}
        for k, dt in cols.items():
            self._r[k] = rg.create_dataset(k, (0,), dt, maxshape=(None,), chunks=(16384,), compression="gzip",
                                           compression_opts=1, shuffle=True)
        P, H, W = sim.stack_shape
        self._mask = None
        if cfg.run.write_mask:
            level = cfg.run.mask_compression_level
            kw = {"compression": "gzip", "compression_opts": level} if level > 0 else {}
            self._mask = h.create_dataset("mask", (0, P, H, W), np.bool_, maxshape=(None, P, H, W),
                                          chunks=(1, P, H, W), **kw)
        st = h.create_group("static")
        st.create_dataset("good_pixels", data=sim.maps.good, compression="gzip", compression_opts=1)
        st.create_dataset("beamstop_transmission", data=sim.maps.transmission, compression="gzip",
                          compression_opts=1)

    def append(self, truth: FrameTruth) -> None:
        i = self.n
        for ds in self._f.values():
            ds.resize((i + 1,) + ds.shape[1:])
        r = truth.reflections
        nr = int(r["h"].size)
        F = self._f
        F["index"][i] = truth.index
        F["event_id"][i] = truth.event_id
        F["hit"][i] = truth.hit
        F["photon_energy_eV"][i] = truth.photon_energy_eV
        F["n_reflections"][i] = nr
        F["reflection_start"][i] = self.m
        F["n_detectable"][i] = truth.n_detectable
        F["n_mask_pixels"][i] = int(np.count_nonzero(truth.mask))
        nl = len(truth.orientations)
        F["n_lattices"][i] = nl
        if nl:
            o = np.full((_MAX_LATTICES, 3, 3), np.nan)
            o[:nl] = truth.orientations[:_MAX_LATTICES]
            F["orientation"][i] = o
            c = np.full((_MAX_LATTICES, 6), np.nan)
            c[:nl] = truth.cells[:_MAX_LATTICES]
            F["cell"][i] = c
            for k in _LATTICE_SCALARS:
                v = np.full(_MAX_LATTICES, np.nan)
                for li in range(min(nl, _MAX_LATTICES)):
                    v[li] = truth.scalars.get(f"{k}_{li}", np.nan)
                F[k][i] = v
        for k in _FRAME_SCALARS:
            F[k][i] = truth.scalars.get(k, np.nan)
        if nr:
            m0, m1 = self.m, self.m + nr
            for k, ds in self._r.items():
                ds.resize((m1,))
            self._r["frame"][m0:m1] = np.full(nr, i, np.int32)
            self._r["frame_index"][m0:m1] = np.full(nr, truth.index, np.int64)
            for k in REFLECTION_COLUMNS:
                self._r[k][m0:m1] = r[k]
            self.m = m1
        if self._mask is not None:
            self._mask.resize((i + 1,) + self._mask.shape[1:])
            self._mask[i] = truth.mask
        self.n = i + 1

    def close(self) -> Path:
        if self._h5 is not None:
            self._h5.attrs["n_frames"] = self.n
            self._h5.close()
            self._h5 = None
            os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        if self._h5 is not None:
            try:
                self._h5.close()
            finally:
                self._h5 = None
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "TruthWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _compression(cfg: SimulateConfig) -> Optional[str]:
    return None if cfg.run.compression == "none" else cfg.run.compression


def _shard_is_current(cfg: SimulateConfig, shard: int, start: int, stop: int) -> Optional[dict]:
    """The manifest entry of an existing, complete shard made with the same config, else None."""
    cxi, truth = shard_paths(cfg, shard)
    if not (cxi.is_file() and truth.is_file()):
        return None
    try:
        with h5py.File(truth, "r") as h:
            a = h.attrs
            ok = (
                a.get("format") == TRUTH_FORMAT
                and a.get("config_hash") == config_hash(cfg)
                and int(a.get("frame_start", -1)) == start
                and int(a.get("n_frames", -1)) == stop - start
            )
            if not ok:
                return None
            fr = h["frames"]
            return _entry(shard, cxi, truth, start, stop, int(fr["hit"][()].sum()),
                          int(fr["n_reflections"][()].sum()), int(fr["n_detectable"][()].sum()))
    except (OSError, KeyError):
        return None


def _entry(shard, cxi, truth, start, stop, hits, nrefl, ndet) -> dict:
    return {
        "shard": shard,
        "cxi": Path(cxi).name,
        "truth": Path(truth).name,
        "frame_start": start,
        "n_frames": stop - start,
        "n_hits": hits,
        "n_reflections": nrefl,
        "n_detectable": ndet,
    }


def write_shard(cfg: SimulateConfig, shard: int, sim: Optional[Simulator] = None, progress=None) -> dict:
    """Write shard ``shard`` (CXI + truth) of ``cfg``; returns its manifest entry.

    Independent of every other shard (frames depend only on the seed and their index), so
    MPI ranks or Slurm array tasks can each write their own shards. ``progress``: an object
    with ``update(n)`` (e.g. tqdm) called once per frame.
    """
    from peaknet.io.cxi import CXIWriter

    sim = sim or Simulator(cfg)
    ranges = shard_ranges(cfg)
    if not 0 <= shard < len(ranges):
        raise ValueError(f"shard {shard} out of range: {len(ranges)} shards")
    start, stop = ranges[shard]
    cxi_path, truth_path = shard_paths(cfg, shard)
    cxi_path.parent.mkdir(parents=True, exist_ok=True)
    hits = nrefl = ndet = 0
    write_frames = cfg.run.write_frames
    slab = cfg.run.frame_layout == "slab"
    cxi = CXIWriter(
        cxi_path,
        max_peaks=cfg.run.max_peaks,
        geometry=sim.geom,
        data_shape=(sim.geom.slab_shape if slab else sim.stack_shape) if write_frames else None,
        data_dtype=np.float32,
        compression=_compression(cfg),
        write_frames=write_frames,
    )
    try:
        with TruthWriter(truth_path, sim, shard, start, stop - start) as tw:
            for i in range(start, stop):
                frame, truth = sim.frame(i)
                if slab and write_frames:
                    frame = sim.geom.stack_to_slab(frame)
                cxi.append(
                    truth.peaks(),
                    truth.event_id,
                    frame if write_frames else None,
                    photon_energy_eV=truth.photon_energy_eV,
                    event_number=truth.index,
                    hit=float(truth.hit),
                    nReflections=float(truth.n_reflections),
                )
                tw.append(truth)
                hits += int(truth.hit)
                nrefl += truth.n_reflections
                ndet += truth.n_detectable
                if progress is not None:
                    progress.update(1)
        cxi.close()
    except BaseException:
        cxi.abort()
        raise
    return _entry(shard, cxi_path, truth_path, start, stop, hits, nrefl, ndet)


def run(cfg: SimulateConfig) -> dict:
    """Write all shards of ``cfg`` into ``cfg.run.out`` plus geometry, manifest, summary and
    config; skip shards already written with the same config (unless ``run.overwrite``).
    Returns the summary dict (also written to ``summary.json``)."""
    from peaknet.config import save_config
    from peaknet.io.geometry import write_geometry

    t0 = time.perf_counter()
    cfg.validate()
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "simulate")
    sim = Simulator(cfg)
    setup_s = time.perf_counter() - t0
    write_geometry(sim.geom, out / "geometry.geom")
    ranges = shard_ranges(cfg)
    entries = []
    bar = None
    if cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.frames, unit="frame", desc="simulate", dynamic_ncols=True)
    n_generated = 0
    try:
        for k, (start, stop) in enumerate(ranges):
            entry = None if cfg.run.overwrite else _shard_is_current(cfg, k, start, stop)
            if entry is not None:
                log.info("shard %d already written with this config; skipping", k)
                if bar is not None:
                    bar.update(stop - start)
            else:
                entry = write_shard(cfg, k, sim, bar)
                n_generated += stop - start
            entries.append(entry)
    finally:
        if bar is not None:
            bar.close()
    return write_run_files(cfg, sim, entries, n_generated, time.perf_counter() - t0, setup_s)


def write_run_files(cfg: SimulateConfig, sim: Simulator, entries: list, n_generated: int,
                    elapsed: float, setup_s: float, extra: Optional[dict] = None) -> dict:
    """``manifest.json`` (the shards' entries, in shard order) and ``summary.json`` of a run
    whose shards are all written; returns the summary. ``extra``: more summary keys."""
    out = Path(cfg.run.out)
    frames = sum(e["n_frames"] for e in entries)
    hits = sum(e["n_hits"] for e in entries)
    manifest = {
        "format": "peaknet-simulate-manifest",
        "version": 1,
        "detector": cfg.run.detector,
        "seed": cfg.run.seed,
        "frames": frames,
        "frames_per_shard": cfg.run.frames_per_shard,
        "stack_shape": list(sim.stack_shape),
        "geometry": "geometry.geom",
        "config": "simulate.config.toml",
        "config_hash": config_hash(cfg),
        "shards": entries,
    }
    _write_json(out / "manifest.json", manifest)
    summary = {
        "stage": "simulate",
        "out": str(out),
        "detector": cfg.run.detector,
        "seed": cfg.run.seed,
        "frames": frames,
        "hits": hits,
        "hit_fraction": hits / frames if frames else 0.0,
        "shards": len(entries),
        "mean_reflections_per_hit": (sum(e["n_reflections"] for e in entries) / hits) if hits else 0.0,
        "mean_detectable_per_hit": (sum(e["n_detectable"] for e in entries) / hits) if hits else 0.0,
        "frames_generated": n_generated,
        "time_s": round(elapsed, 3),
        "setup_s": round(setup_s, 3),
        "frames_per_s": round(n_generated / (elapsed - setup_s), 3) if elapsed > setup_s else 0.0,
        "photon_energy_eV": sim.photon_energy_eV,
        "clen_m": sim.clen_m,
        "adu_per_photon": sim.adu_per_photon,
        "manifest": str(out / "manifest.json"),
        **(extra or {}),
    }
    _write_json(out / "summary.json", summary)
    return summary


def _write_json(path: Path, obj: dict) -> None:
    # a temporary name of its own: several array tasks may finalize the same run at once
    tmp = path.with_name(f"{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        v = float(o)
        return None if math.isnan(v) else v
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
def _open_truth(path) -> h5py.File:
    try:
        h = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(path, None, f"not a readable HDF5 truth file: {exc}") from exc
    if h.attrs.get("format") != TRUTH_FORMAT:
        h.close()
        raise DataError(path, "format", f"not a peaknet simulate truth file (format {h.attrs.get('format')!r})")
    return h


def read_truth_reflections(path) -> dict:
    """All reflections of a truth file as a dict of (M,) arrays (frame, frame_index, ...)."""
    with _open_truth(path) as h:
        return {k: ds[()] for k, ds in h["reflections"].items()}


def read_truth_frame(path, row: int, with_mask: bool = True) -> dict:
    """Row ``row`` of a truth file: dict with the /frames values of that row, ``reflections``
    (dict of columns) and ``mask`` ((P, H, W) bool, or None)."""
    with _open_truth(path) as h:
        fr = h["frames"]
        n = fr["index"].shape[0]
        if not -n <= row < n:
            raise IndexError(f"row {row} out of range for {n} frames in {path}")
        row %= n
        out = {k: ds[row] for k, ds in fr.items()}
        out["event_id"] = out["event_id"].decode() if isinstance(out["event_id"], bytes) else out["event_id"]
        s, c = int(out["reflection_start"]), int(out["n_reflections"])
        out["reflections"] = {k: ds[s:s + c] for k, ds in h["reflections"].items()}
        out["mask"] = h["mask"][row] if (with_mask and "mask" in h) else None
        return out
