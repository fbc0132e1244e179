"""The ``evaluate`` stage: peak-level figures of a peak finder on generated and real frames.

``peaknet evaluate [--config FILE] [--section.key=value ...]`` runs one *predictor* --
``run.predictor = "model"`` (a PeakNet: ``model.weights`` = a safetensors file or ``"default"``,
the shipped :data:`peaknet.models.DEFAULT_MODEL`) or ``"peakfinder8"`` (``peakfinder8.preset``
plus ``peakfinder8.overrides``) -- on

- generated shards (``data.shards``: the generator's ``shard_*.cxi`` globs): the truth peaks are
  the shard's CXI peak list (the generator's *detectable* peaks); found peaks are matched to
  them one to one within ``match.distance`` pixels (:func:`peaknet.match.peakdiff.match_peaks`),
  giving peak-level precision, recall and F1 over all frames and per detector folder;
- real CBF frames (``data.cbf``) with a DIALS spot list (``data.dials_csv``: image, panel64,
  fs_px, ss_px, ...): per frame the number of peaks found and, for frames with spots, the recall
  of the DIALS-indexed spots within ``match.real_distance`` (2) pixels.

Model inputs are the detector modules, each z-scored over its good pixels (exactly as the
``panels`` training input with ``zscore = "sample"``); the good-pixel mask is the geometry's,
and for generated frames also the truth file's ``/static/good_pixels``. The model's peaks are
the connected components of its peak mask (peak probability >= ``model.threshold``; for the
default weights the threshold tuned on held-out frames, recorded in its card).

Writes ``<run.out>/summary.json`` (the returned summary) and ``evaluate.config.toml``.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch

from peaknet.peaks import PeakList

log = logging.getLogger(__name__)

__all__ = [
    "RunSection", "ModelSection", "Peakfinder8Section", "DataSection", "MatchSection",
    "EvaluateConfig", "ModelPredictor", "Peakfinder8Predictor", "build_predictor",
    "evaluate_shards", "evaluate_cbf", "tune_threshold", "run",
]

DEFAULT_DIALS_CSV = "dials_indexed_spots.csv"


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
@dataclass
class RunSection:
    """[run]: what to evaluate and where the summary goes.

    predictor: "model" (PeakNet, see [model]) or "peakfinder8" (see [peakfinder8]).
    out: output folder (summary.json, evaluate.config.toml).
    threads: torch intra-op threads (None: leave as is).
    device: "cpu", "cuda" or "auto".
    """

    predictor: Literal["model", "peakfinder8"] = "model"
    out: str = "runs/evaluate"
    threads: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "cpu"

    def validate(self) -> None:
        _need(bool(str(self.out)), "out", "must name a folder")
        if self.threads is not None:
            _need(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")


@dataclass
class ModelSection:
    """[model]: the PeakNet predictor.

    weights: a safetensors file, or "default" (the shipped peaknet-small-cpu weights).
    preset: model preset (None: the file's metadata, else "small-cpu").
    threshold: peak-probability cut (None: the default model's tuned threshold from its card
        when weights = "default", else argmax).
    min_pix: smallest peak (pixels) kept (None: the default model's tuned value from its card
        when weights = "default", else 1).
    batch_panels: modules per forward pass.
    """

    weights: str = "default"
    preset: Optional[str] = None
    threshold: Optional[float] = None
    min_pix: Optional[int] = None
    batch_panels: int = 8

    def validate(self) -> None:
        if self.threshold is not None:
            _need(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")
        if self.min_pix is not None:
            _need(self.min_pix >= 1, "min_pix", "must be >= 1")
        _need(self.batch_panels >= 1, "batch_panels", "must be >= 1")


@dataclass
class Peakfinder8Section:
    """[peakfinder8]: the peakfinder8 predictor.

    preset: a name of :data:`peaknet.findpeaks.config.PRESETS` ("lcls_cspad", "crystfel", ...).
    overrides: parameter changes, "name=value" (e.g. "min_snr=5").
    """

    preset: str = "lcls_cspad"
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        from peaknet.findpeaks.config import PRESETS

        _need(self.preset in PRESETS, "preset",
              f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        for o in self.overrides:
            _need("=" in o, "overrides", f"{o!r} is not name=value")


@dataclass
class DataSection:
    """[data]: frames to evaluate on.

    shards: generated CXI shards (globs, e.g. "runs/sim/shard_*.cxi").
    geometry: geometry of the shards when their folder has no geometry.geom (built-in name or
        .geom file).
    panels: evaluate only these modules (empty: all); truth peaks are restricted to them.
    max_frames: at most this many frames per shard file (None: all).
    cbf: real CBF frames (globs).
    dials_csv: DIALS spot list of the CBF frames (None: dials_indexed_spots.csv next to the
        first CBF file, when it exists).
    """

    shards: list[str] = field(default_factory=list)
    geometry: Optional[str] = None
    panels: list[int] = field(default_factory=list)
    max_frames: Optional[int] = None
    cbf: list[str] = field(default_factory=list)
    dials_csv: Optional[str] = None

    def validate(self) -> None:
        _need(all(p >= 0 for p in self.panels), "panels", "module indices must be >= 0")
        if self.max_frames is not None:
            _need(self.max_frames >= 1, "max_frames", "must be >= 1")


@dataclass
class MatchSection:
    """[match]: matching distances (pixels).

    distance: found vs generated truth peaks.
    real_distance: found peaks vs DIALS-indexed spots on real frames (the data README's 2 px).
    """

    distance: float = 3.0
    real_distance: float = 2.0

    def validate(self) -> None:
        _need(self.distance > 0, "distance", "must be > 0")
        _need(self.real_distance > 0, "real_distance", "must be > 0")


@dataclass
class EvaluateConfig:
    """The ``evaluate`` stage."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    peakfinder8: Peakfinder8Section = field(default_factory=Peakfinder8Section)
    data: DataSection = field(default_factory=DataSection)
    match: MatchSection = field(default_factory=MatchSection)

    def validate(self) -> None:
        if not self.data.shards and not self.data.cbf:
            raise ValueError("data.shards: give generated shards and/or data.cbf real frames")


# ------------------------------------------------------------------------------------------
# predictors: (stack (P, H, W), good mask (P, H, W), geometry) -> PeakList
# ------------------------------------------------------------------------------------------
class ModelPredictor:
    """A PeakNet applied module by module (per-module z-score), peaks decoded from its mask."""

    name = "model"

    def __init__(self, model: torch.nn.Module, threshold: Optional[float] = None,
                 min_pix: int = 1, batch_panels: int = 8, device=None) -> None:
        self.model = model.eval()
        self.threshold = threshold
        self.min_pix = int(min_pix)
        self.batch_panels = int(batch_panels)
        self.device = torch.device(device or "cpu")

    @torch.inference_mode()
    def peak_logit(self, stack: np.ndarray, good: np.ndarray) -> torch.Tensor:
        """(P, H, W) float32: peak minus background logit (sigmoid = peak probability)."""
        from peaknet.model import prepare_panels

        x, info = prepare_panels(np.asarray(stack, np.float32), good, norm="panel")
        outs = []
        for i in range(0, x.shape[0], self.batch_panels):
            y = self.model(x[i:i + self.batch_panels].to(self.device)).float().cpu()
            outs.append(y[:, 1] - y[:, 0])
        d = torch.cat(outs)[:, None]  # (P, 1, H', W')
        return info.split(d)[:, 0]

    def decode(self, diff: torch.Tensor, stack: np.ndarray, good: np.ndarray,
               threshold: Optional[float]) -> PeakList:
        from peaknet.model import decode_peaks

        logits = torch.stack([torch.zeros_like(diff), diff], 1)  # (P, 2, H, W)
        return decode_peaks(logits, np.asarray(stack, np.float32), good, layout="stack",
                            threshold=threshold, min_pix=self.min_pix)[0]

    def __call__(self, stack, good, geometry=None) -> PeakList:
        return self.decode(self.peak_logit(stack, good), stack, good, self.threshold)


class Peakfinder8Predictor:
    """peakfinder8 with a preset; one finder per (geometry, mask) is kept."""

    name = "peakfinder8"

    def __init__(self, params) -> None:
        self.params = params
        self._cache: dict = {}

    def __call__(self, stack, good, geometry=None, radius: Optional[np.ndarray] = None) -> PeakList:
        from peaknet.findpeaks.peakfinder8 import Peakfinder8

        if radius is None:
            if geometry is None:
                raise ValueError("peakfinder8 needs a geometry (radius map)")
            radius = geometry.radius_map()
        key = (id(geometry), np.asarray(radius).shape, hash(np.asarray(good).tobytes()))
        pf = self._cache.get(key)
        if pf is None:
            self._cache.clear()
            pf = self._cache[key] = Peakfinder8(np.asarray(radius), np.asarray(good, bool),
                                                self.params)
        return pf(np.asarray(stack, np.float32))


def _parse_override(text: str):
    from peaknet.config import _parse_override_value

    k, _, v = text.partition("=")
    return k.strip(), _parse_override_value(v.strip())


def build_predictor(cfg: EvaluateConfig):
    """The configured predictor; returns (predictor, description dict)."""
    if cfg.run.predictor == "peakfinder8":
        from peaknet.findpeaks.config import preset

        ov = dict(_parse_override(o) for o in cfg.peakfinder8.overrides)
        params = preset(cfg.peakfinder8.preset, **ov)
        return Peakfinder8Predictor(params), {"predictor": "peakfinder8",
                                              "preset": cfg.peakfinder8.preset, "overrides": ov}
    from peaknet.models import DEFAULT_MODEL, load_model

    device = _device(cfg.run.device)
    mc = cfg.model
    if mc.weights == "default":
        weights = DEFAULT_MODEL.weights
        preset_name = mc.preset or DEFAULT_MODEL.preset
        threshold = mc.threshold if mc.threshold is not None else DEFAULT_MODEL.threshold
        min_pix = mc.min_pix if mc.min_pix is not None else DEFAULT_MODEL.min_pix
    else:
        weights, preset_name, threshold = Path(mc.weights), mc.preset, mc.threshold
        min_pix = mc.min_pix if mc.min_pix is not None else 1
    model = load_model(weights, preset_name, device)
    pred = ModelPredictor(model, threshold, min_pix, mc.batch_panels, device)
    return pred, {"predictor": "model", "weights": str(weights), "preset": preset_name,
                  "threshold": threshold, "decode": "argmax" if threshold is None else
                  f"peak probability >= {threshold}", "min_pix": min_pix}


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


# ------------------------------------------------------------------------------------------
# generated frames
# ------------------------------------------------------------------------------------------
def _expand(patterns: Sequence[str]) -> list[str]:
    from peaknet.errors import DataError

    out: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise DataError(pat, None, "no file matches")
        out.extend(h for h in hits if h not in out)
    return out


def _shard_geometry(path: Path, spec: Optional[str]):
    from peaknet.train.data import load_geometry

    local = path.parent / "geometry.geom"
    if local.is_file():
        return load_geometry(str(local))
    if spec is None:
        from peaknet.errors import DataError

        raise DataError(str(path), "geometry", "no geometry.geom next to the shard and no "
                        "data.geometry given")
    return load_geometry(spec)


def _iter_shard_frames(path: str, geometry_spec: Optional[str], max_frames: Optional[int]):
    """Yield (frame index, stack (P, H, W) float32, good (P, H, W), truth PeakList, geometry)."""
    import h5py
    import hdf5plugin  # noqa: F401

    from peaknet.io.cxi import read_peak_lists

    p = Path(path)
    geom = _shard_geometry(p, geometry_spec)
    truth = read_peak_lists(p, geom)
    static = None
    tfile = p.with_name(p.stem + ".truth.h5")
    if tfile.is_file():
        with h5py.File(tfile, "r") as t:
            if "static/good_pixels" in t:
                static = np.asarray(t["static/good_pixels"][()], bool)
    gmask = np.asarray(geom.good_pixel_mask(), bool)
    with h5py.File(p, "r") as h5:
        ds = h5["/entry_1/data_1/data"]
        n = ds.shape[0] if max_frames is None else min(ds.shape[0], max_frames)
        for i in range(n):
            raw = np.asarray(ds[i], np.float32)
            if raw.ndim == 2:
                raw = geom.slab_to_stack(raw)
            good = gmask & np.isfinite(raw)
            if static is not None:
                good &= static
            yield i, raw, good, truth[i], geom


def _restrict(stack, good, truth: Optional[PeakList], panels: Sequence[int]):
    if not panels:
        return stack, good, truth
    idx = np.asarray(panels, np.int64)
    if truth is not None:
        truth = truth.take(np.isin(truth.panel, idx))
        remap = {int(p): k for k, p in enumerate(idx)}
        truth = PeakList.from_columns(**{**truth.as_dict(), "panel": np.array(
            [remap[int(p)] for p in truth.panel], np.int32)}) if len(truth) else truth
    return stack[idx], good[idx], truth


def _prf(found: int, truth: int, matched: int) -> dict:
    p = matched / found if found else float("nan")
    r = matched / truth if truth else float("nan")
    f1 = 2 * p * r / (p + r) if found and truth and (p + r) > 0 else float("nan")
    return {"frames": 0, "found": int(found), "truth": int(truth), "matched": int(matched),
            "precision": p, "recall": r, "f1": f1}


def evaluate_shards(predict: Callable, shards: Sequence[str], distance: float = 3.0,
                    geometry: Optional[str] = None, panels: Sequence[int] = (),
                    max_frames: Optional[int] = None) -> dict:
    """Peak-level precision / recall / F1 of ``predict`` against the shards' truth peaks,
    overall and per detector folder."""
    from peaknet.match.peakdiff import match_peaks

    groups: dict[str, np.ndarray] = {}
    per_frame = []
    t0 = time.perf_counter()
    for path in _expand(shards):
        det = Path(path).parent.name
        for i, stack, good, truth, geom in _iter_shard_frames(path, geometry, max_frames):
            stack, good, truth = _restrict(stack, good, truth, panels)
            radius = np.asarray(geom.radius_map())[np.asarray(panels)] if panels else None
            if isinstance(predict, Peakfinder8Predictor):
                found = predict(stack, good, geom, radius=radius)
            else:
                found = predict(stack, good, geom)
            m = match_peaks(found, truth, max_distance=distance)
            row = np.array([1, m.n_found, m.n_predicted, m.n_matched])
            groups[det] = groups.get(det, 0) + row
            per_frame.append({"file": path, "frame": i, "found": m.n_found,
                              "truth": m.n_predicted, "matched": m.n_matched})
    tot = sum(groups.values()) if groups else np.zeros(4, int)
    out = _prf(*tot[1:])
    out["frames"] = int(tot[0])
    out["by_detector"] = {}
    for k, v in groups.items():
        d = _prf(*v[1:])
        d["frames"] = int(v[0])
        out["by_detector"][k] = d
    out["match_distance_px"] = distance
    out["time_s"] = round(time.perf_counter() - t0, 2)
    out["per_frame"] = per_frame
    return out


# ------------------------------------------------------------------------------------------
# real CBF frames
# ------------------------------------------------------------------------------------------
def read_dials_spots(path: str | Path) -> dict[str, np.ndarray]:
    """DIALS spot csv (image, panel64, fs_px, ss_px, ...) -> {image name: (N, 3) (module, ss, fs)}."""
    from peaknet.io.cbf import cbf_asic_to_stack

    rows: dict[str, list] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows.setdefault(r["image"], []).append(
                (int(r["panel64"]), float(r["fs_px"]), float(r["ss_px"])))
    out = {}
    for name, rr in rows.items():
        a = np.asarray(rr, np.float64)
        mod, ss, fs = cbf_asic_to_stack(a[:, 0].astype(int), a[:, 1], a[:, 2])
        out[name] = np.stack([mod, ss, fs], 1)
    return out


def evaluate_cbf(predict: Callable, files: Sequence[str], dials_csv: Optional[str] = None,
                 distance: float = 2.0) -> dict:
    """Per real frame: peaks found and the recall of the DIALS-indexed spots within
    ``distance`` px; totals over the frames that have spots."""
    from peaknet.io.cbf import read_cbf
    from peaknet.match.peakdiff import match_peaks

    paths = _expand(files)
    if dials_csv is None and paths:
        cand = Path(paths[0]).parent / DEFAULT_DIALS_CSV
        dials_csv = str(cand) if cand.is_file() else None
    spots = read_dials_spots(dials_csv) if dials_csv else {}
    frames = []
    t0 = time.perf_counter()
    for path in paths:
        fr = read_cbf(path)
        stack = fr.stack.astype(np.float32)
        good = np.asarray(fr.geometry.good_pixel_mask(), bool) & np.isfinite(stack)
        t1 = time.perf_counter()
        found = predict(stack, good, fr.geometry)
        row = {"image": Path(path).name, "found": len(found),
               "time_s": round(time.perf_counter() - t1, 2)}
        sp = spots.get(Path(path).name)
        if sp is not None and len(sp):
            m = match_peaks(found, sp, max_distance=distance)
            row.update(dials_spots=int(len(sp)), matched=m.n_matched, recall=m.recall)
        frames.append(row)
    idx = [f for f in frames if "dials_spots" in f]
    n_sp = sum(f["dials_spots"] for f in idx)
    n_m = sum(f["matched"] for f in idx)
    return {
        "frames": frames,
        "indexed_frames": len(idx),
        "dials_spots": n_sp,
        "matched": n_m,
        "recall": n_m / n_sp if n_sp else float("nan"),
        "found_on_indexed_frames": sum(f["found"] for f in idx),
        "found_all_frames": sum(f["found"] for f in frames),
        "match_distance_px": distance,
        "dials_csv": dials_csv,
        "time_s": round(time.perf_counter() - t0, 2),
    }


# ------------------------------------------------------------------------------------------
# decode-threshold tuning (used when exporting the default model)
# ------------------------------------------------------------------------------------------
#: decode thresholds tried when tuning (finer where the best ones usually are)
TUNING_THRESHOLDS = (0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)


def tune_threshold(model: torch.nn.Module, shards: Sequence[str],
                   thresholds: Sequence[float] = TUNING_THRESHOLDS,
                   distance: float = 3.0, geometry: Optional[str] = None,
                   max_frames: Optional[int] = None, min_pix: Sequence[int] = (1, 2, 3)) -> dict:
    """Peak F1 on generated shards for each (threshold, min_pix) (the model runs once per frame;
    only the decoding is repeated). Returns the table and the best pair (ties: the lower
    threshold, then the smaller min_pix)."""
    from peaknet.match.peakdiff import match_peaks

    pred = ModelPredictor(model)
    ths = [None] + [float(t) for t in thresholds]
    grid = [(t, int(k)) for t in ths for k in min_pix]
    sums = {g: np.zeros(3) for g in grid}
    n = 0
    for path in _expand(shards):
        for _, stack, good, truth, _ in _iter_shard_frames(path, geometry, max_frames):
            d = pred.peak_logit(stack, good)
            n += 1
            for t in ths:
                pred.min_pix = 1
                found = pred.decode(d, stack, good, t)
                for k in min_pix:
                    f = found.take(found.npix >= k)
                    m = match_peaks(f, truth, max_distance=distance)
                    sums[(t, int(k))] += (m.n_found, m.n_predicted, m.n_matched)
    table = []
    for t, k in grid:
        r = _prf(*sums[(t, k)])
        r.pop("frames")
        table.append({"threshold": "argmax" if t is None else t, "min_pix": k, **r})
    valid = [r for r in table if r["threshold"] != "argmax" and np.isfinite(r["f1"])]
    best = (max(valid, key=lambda r: (round(r["f1"], 6), -r["threshold"], -r["min_pix"]))
            if valid else None)
    return {"frames": n, "shards": list(shards), "match_distance_px": distance,
            "table": table, "best_threshold": best["threshold"] if best else None,
            "best_min_pix": best["min_pix"] if best else 1, "best": best}


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------
def _finite(o):
    if isinstance(o, float):
        return o if np.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _finite(float(o))
    return o


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate the configured predictor; writes and returns the summary."""
    t0 = time.perf_counter()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    predict, desc = build_predictor(cfg)
    summary: dict = {"stage": "evaluate", **desc}
    if cfg.data.shards:
        summary["generated"] = evaluate_shards(predict, cfg.data.shards, cfg.match.distance,
                                               cfg.data.geometry, cfg.data.panels,
                                               cfg.data.max_frames)
        g = summary["generated"]
        log.info("generated frames: %d, precision %.3f recall %.3f F1 %.3f", g["frames"],
                 g["precision"], g["recall"], g["f1"])
    if cfg.data.cbf:
        summary["real"] = evaluate_cbf(predict, cfg.data.cbf, cfg.data.dials_csv,
                                       cfg.match.real_distance)
        r = summary["real"]
        log.info("real frames: %s found; DIALS-spot recall %d/%d = %.3f",
                 [f["found"] for f in r["frames"]], r["matched"], r["dials_spots"], r["recall"])
    summary["out"] = cfg.run.out
    summary["time_s"] = round(time.perf_counter() - t0, 2)
    summary = _finite(summary)
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ------------------------------------------------------------------------------------------
# command line: ``peaknet evaluate`` once the stage is registered in peaknet/cli.py, and
# ``python -m peaknet.evaluate`` in any case (same arguments)
# ------------------------------------------------------------------------------------------
STAGE_ALIASES = {"predictor": "run.predictor", "weights": "model.weights",
                 "threshold": "model.threshold", "preset": "peakfinder8.preset",
                 "shards": "data.shards", "cbf": "data.cbf", "out": "run.out"}


def stage():
    """The :class:`peaknet.cli.Stage` of this stage."""
    from peaknet.cli import Stage

    return Stage(
        "evaluate",
        "peaknet.evaluate:EvaluateConfig",
        "peaknet.evaluate:run",
        "peak-level precision/recall/F1 of PeakNet or peakfinder8 on generated and real frames",
        aliases=dict(STAGE_ALIASES),
        example="peaknet evaluate --predictor model --weights default "
                "--shards 'runs/sim/shard_*.cxi' --out runs/eval",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    from peaknet import cli

    if "evaluate" not in cli.STAGES:
        cli.register(stage())
    return cli.main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
