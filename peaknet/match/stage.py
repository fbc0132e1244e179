"""The ``peaknet match`` stage: PeakDiff found vs predicted, curation, tables and plots.

Inputs (``[run]``):

- ``found`` is a CrystFEL stream (``*.stream``: its found peaks are matched against the
  reflections predicted by indexing, ``predicted`` stays empty), or CXI peak-list files
  (a path or glob pattern, e.g. the output of ``peaknet find-peaks``).
- ``predicted`` is CXI peak-list files paired one to one with ``found`` in sorted order: the
  shards of ``peaknet simulate`` (their peak lists are the detectable ground truth), another
  finder's output, a model's output.

Outputs in ``run.out``: ``matches.csv`` (one row per frame: counts, precision, recall, mean
distance), ``manifest.csv`` (curation: selected or not, with the reason), ``summary.json``
(overall precision/recall, their distribution, frames selected), ``counts.png`` and
``precision_recall.png`` (the paper's Figure 3) and, when the CXI files hold frames,
``overlay_<n>.png`` for a few frames (Figure 2).
"""
from __future__ import annotations

import glob
import json
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from ..errors import InputError
from .curate import CurationRules, curate, frames_from_cxi, frames_from_stream, write_manifest

log = logging.getLogger("peaknet.match")


@dataclass
class MatchRunSection:
    """found: stream file or CXI peak lists (path or glob); predicted: CXI peak lists (path or
    glob) paired with ``found`` in sorted order, unset for a stream; geometry: CrystFEL .geom
    path or a shipped name (cspad, epix10ka2m, jungfrau4m) for CXI inputs in slab layout;
    crystal: which crystal of a multi-lattice stream chunk predicts ("first", "best", "all");
    indexed_only: stream chunks without a crystal are left out (else recall is undefined for
    them and precision is 0); overlays: how many frames get an overlay PNG; out: output folder."""

    found: str = ""
    predicted: Optional[str] = None
    geometry: Optional[str] = None
    crystal: Literal["first", "best", "all"] = "first"
    indexed_only: bool = True
    overlays: int = 2
    out: str = "runs/match"

    def validate(self) -> None:
        if not self.found:
            raise ValueError("found: a stream file or CXI peak-list files are needed")
        if self.overlays < 0:
            raise ValueError("overlays: must be >= 0")


@dataclass
class MatchConfig:
    run: MatchRunSection = field(default_factory=MatchRunSection)
    curation: CurationRules = field(default_factory=CurationRules)


def _expand(pattern: str, key: str) -> list[str]:
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not paths:
        raise InputError(pattern, key, "no file matches this pattern")
    for p in paths:
        if not pathlib.Path(p).is_file():
            raise InputError(p, key, "file not found")
    return paths


def _geometry(spec: Optional[str]):
    if spec is None:
        return None
    from ..io.geometry import load_builtin_geometry, parse_geometry

    if pathlib.Path(spec).is_file():
        return parse_geometry(pathlib.Path(spec))
    return load_builtin_geometry(spec)


def _frame_source(cfg: MatchRunSection, geometry):
    """Yield (event, found, predicted) and return a list of (cxi path, row) per frame."""
    found = _expand(cfg.found, "run.found")
    if len(found) == 1 and found[0].endswith(".stream"):
        from ..io.stream import StreamReader

        stream = StreamReader(found[0])
        return frames_from_stream(stream, crystal=cfg.crystal, indexed_only=cfg.indexed_only), []
    if cfg.predicted is None:
        raise InputError(cfg.found, "run.predicted", "CXI found peaks need predicted peaks to match")
    predicted = _expand(cfg.predicted, "run.predicted")
    if len(predicted) != len(found):
        raise InputError(
            cfg.predicted, "run.predicted",
            f"{len(predicted)} predicted files for {len(found)} found files (paired in sorted order)",
        )
    pairs = list(zip(found, predicted))

    def frames():
        for f, p in pairs:
            yield from frames_from_cxi(f, p, geometry=geometry)

    return frames(), pairs


def _overlays(pairs, result, geometry, out: pathlib.Path, n: int) -> list[str]:
    """Overlay PNGs of the first ``n`` frames that have peaks, when the CXI files hold frames."""
    import h5py

    from ..io.cxi import open_frames, read_peak_lists
    from .peakdiff import match_peaks
    from .plots import plot_match_overlay, save_figure

    written: list[str] = []
    for found_path, pred_path in pairs:
        for path in (pred_path, found_path):
            with h5py.File(path, "r") as h5:
                has_frames = "/entry_1/data_1/data" in h5
            if has_frames:
                break
        else:
            continue
        found = read_peak_lists(found_path, geometry=geometry)
        pred = read_peak_lists(pred_path, geometry=geometry)
        with open_frames(path, layout="stack" if geometry is None else "auto", geometry=geometry) as src:
            for i in range(len(found)):
                if len(written) >= n:
                    return written
                if len(found[i]) == 0 or len(pred[i]) == 0:
                    continue
                frame = src.read(i, as_stack=True) if geometry is not None else src.read(i)
                m = match_peaks(found[i], pred[i], max_distance=result.rules.max_distance)
                panel = int(np.bincount(pred[i].panel).argmax())
                fig = plot_match_overlay(frame, found[i], pred[i], match=m, panel=panel)
                target = out / f"overlay_{len(written)}.png"
                save_figure(fig, target)
                written.append(str(target))
    return written


def run(cfg: MatchConfig) -> dict:
    """Match, curate, write tables and plots; return the summary (also ``summary.json``)."""
    from .plots import plot_counts, plot_precision_recall, save_figure

    out = pathlib.Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    geometry = _geometry(cfg.run.geometry)
    frames, pairs = _frame_source(cfg.run, geometry)
    result = curate(frames, cfg.curation)
    table = result.table
    write_manifest(out / "manifest.csv", result)
    with open(out / "matches.csv", "w") as fh:
        records = table.records()
        if records:
            keys = list(records[0])
            fh.write(",".join(keys) + "\n")
            for r in records:
                fh.write(",".join(str(r[k]) for k in keys) + "\n")
    save_figure(plot_counts(table, selected=result.selected), out / "counts.png")
    save_figure(
        plot_precision_recall(table, min_precision=cfg.curation.min_precision,
                              min_recall=cfg.curation.min_recall, selected=result.selected),
        out / "precision_recall.png",
    )
    overlays = _overlays(pairs, result, geometry, out, cfg.run.overlays) if pairs else []
    summary = {"stage": "match", **result.summary(),
               "manifest": str(out / "manifest.csv"), "overlays": overlays}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    precision, recall = table.micro()
    log.info("%d frames, %d selected; overall precision %.3f recall %.3f",
             len(table), summary["n_selected"], precision, recall)
    return summary
