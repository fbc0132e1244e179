"""The main job on the embedded default: the whole pipeline on data it generates itself.

``peaknet demo --out runs/demo`` (what ``bash tools/run_demo.sh`` runs on a fresh machine):

1. ``simulate``: synthetic serial-crystallography frames for a shipped detector geometry,
   written as CXI shards with their ground truth.
2. ``find-peaks``: peakfinder8 on those frames (the detector's preset), CXI peak lists.
3. ``match``: PeakDiff of the found peaks against the detectable ground truth: precision,
   recall, curation manifest and plots.
4. ``label``: pseudo-Voigt fits of the found peaks of the curated frames, segmentation labels.
5. ``infer``: the hybrid pipeline (producers -> bounded Ray queue -> PeakNet actor -> CXI
   writer) with the shipped model over all generated frames: CXI peak lists of the hits.

The last line of the log is a headline: events, hit rate, peaks per hit, frames/s.

Each step writes into its own folder under ``run.out`` with its resolved config, and the demo
writes ``summary.json`` with every step's summary and ``label_vs_truth``: the pixel precision,
recall and IoU of the labels (``/labels/mask == 1``) against the generator's truth peak masks
of the labelled frames (:func:`label_vs_truth`).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Literal

from .config import config_from_dict, save_config

log = logging.getLogger("peaknet.demo")


@dataclass
class DemoRunSection:
    """out: folder for everything; detector: shipped geometry; frames: frames to generate;
    seed: seed of the generator; frames_per_shard: frames per CXI file."""

    out: str = "runs/demo"
    detector: Literal["cspad", "epix10ka2m", "jungfrau4m"] = "epix10ka2m"
    frames: int = 40
    seed: int = 0
    frames_per_shard: int = 20
    match_distance: float = 2.0

    def validate(self) -> None:
        if self.frames < 1:
            raise ValueError("frames: must be >= 1")
        if self.frames_per_shard < 1:
            raise ValueError("frames_per_shard: must be >= 1")


@dataclass
class DemoConfig:
    run: DemoRunSection = field(default_factory=DemoRunSection)


def _stage_config(cls, data: dict, out: pathlib.Path, name: str):
    cfg = config_from_dict(cls, data, f"demo step {name}")
    save_config(cfg, out, name)
    return cfg


def _truth_path(cxi_path: str) -> pathlib.Path:
    """The generator's truth file of a CXI shard: ``{stem}.truth.h5`` beside it."""
    p = pathlib.Path(cxi_path)
    return p.with_name(p.stem + ".truth.h5")


def label_vs_truth(labels_h5, truth_for=_truth_path) -> dict:
    """Pixel agreement of a label run's masks with the generator's truth peak masks.

    For every labelled frame (``/events/status`` 0) of ``labels_h5``: label = ``/labels/mask``
    == 1, truth = ``/mask`` of the frame's truth file (``truth_for(cxi_path)``, row = the frame
    index in its shard); read one frame at a time. Returns counts (tp, fp, fn), precision,
    recall, IoU over all those frames together, and ``truth_in_ignore``: the fraction of truth
    pixels under the ignore value (windows of rejected peaks). Truth covers every detectable
    reflection, also those the peak finder missed, so recall is bounded by find-peaks' recall.
    """
    import h5py
    import numpy as np

    from .parallel import parse_event_id

    tp = fp = fn = ign = frames = 0
    files: dict = {}
    try:
        with h5py.File(labels_h5, "r") as h:
            if "labels/mask" not in h:
                return {"frames": 0}
            ids = h["events/event_id"].asstr()[...]
            status = h["events/status"][...]
            lab_ds = h["labels/mask"]
            for k, (eid, st) in enumerate(zip(ids, status)):
                if st != 0:
                    continue
                path, i = parse_event_id(eid)
                tpath = truth_for(path)
                if tpath not in files:
                    files[tpath] = h5py.File(tpath, "r")
                truth = files[tpath]["mask"][i].astype(bool)
                lab = lab_ds[k]
                pos = lab == 1
                tp += int(np.count_nonzero(pos & truth))
                fp += int(np.count_nonzero(pos & ~truth))
                fn += int(np.count_nonzero(~pos & truth))
                ign += int(np.count_nonzero((lab == 255) & truth))
                frames += 1
    finally:
        for f in files.values():
            f.close()

    def ratio(a, b):
        return round(a / b, 4) if b else None

    return {"frames": frames, "tp": tp, "fp": fp, "fn": fn,
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "iou": ratio(tp, tp + fp + fn), "truth_in_ignore": ratio(ign, tp + fn)}


def run(cfg: DemoConfig) -> dict:
    """Run every available pipeline step on generated data; return a summary per step."""
    out = pathlib.Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"steps": {}}
    t0 = time.perf_counter()

    from .simulate.config import SimulateConfig
    from .simulate.generator import run as simulate

    sim_dir = out / "simulate"
    sim_cfg = _stage_config(
        SimulateConfig,
        {
            "run": {
                "detector": cfg.run.detector,
                "frames": cfg.run.frames,
                "seed": cfg.run.seed,
                "out": str(sim_dir),
                "frames_per_shard": cfg.run.frames_per_shard,
            }
        },
        sim_dir,
        "simulate",
    )
    log.info("step 1: simulate %d %s frames -> %s", cfg.run.frames, cfg.run.detector, sim_dir)
    summary["steps"]["simulate"] = simulate(sim_cfg)

    from .findpeaks.config import FindPeaksConfig
    from .findpeaks.run import run as find_peaks

    preset = {"cspad": "lcls_cspad", "epix10ka2m": "om_epix10k2m", "jungfrau4m": "om_jungfrau4m"}
    peaks_dir = out / "find-peaks"
    fp_cfg = _stage_config(
        FindPeaksConfig,
        {
            "run": {"inputs": [str(sim_dir / "shard_*.cxi")], "geometry": str(sim_dir / "geometry.geom"),
                    "out": str(peaks_dir)},
            # the OM presets keep single-pixel peaks (min_pix 1): on photon-counting noise that
            # gives hundreds of false peaks per frame, so ask for 2 pixels and SNR 6
            "peakfinder8": {"preset": preset[cfg.run.detector], "min_pix_count": 2, "min_snr": 6.0},
        },
        peaks_dir,
        "find-peaks",
    )
    log.info("step 2: peakfinder8 (%s) -> %s", preset[cfg.run.detector], peaks_dir)
    summary["steps"]["find-peaks"] = find_peaks(fp_cfg)

    from .match.stage import MatchConfig
    from .match.stage import run as match

    match_dir = out / "match"
    m_cfg = _stage_config(
        MatchConfig,
        {
            "run": {"found": str(peaks_dir / "*.cxi"), "predicted": str(sim_dir / "shard_*.cxi"),
                    "geometry": str(sim_dir / "geometry.geom"), "out": str(match_dir)},
            "curation": {"max_distance": cfg.run.match_distance},
        },
        match_dir,
        "match",
    )
    log.info("step 3: match found peaks against the detectable truth -> %s", match_dir)
    summary["steps"]["match"] = match(m_cfg)

    from .label.stage import LabelConfig
    from .label.stage import run as label

    label_dir = out / "label"
    l_cfg = _stage_config(
        LabelConfig,
        {
            "run": {"inputs": [str(sim_dir / "shard_*.cxi")], "peaks": str(peaks_dir / "{stem}.peaks.cxi"),
                    "geometry": str(sim_dir / "geometry.geom"), "manifest": str(match_dir / "manifest.csv"),
                    "out": str(label_dir), "backend": "serial"},
        },
        label_dir,
        "label",
    )
    log.info("step 4: label the curated frames' peaks with pseudo-Voigt fits -> %s", label_dir)
    summary["steps"]["label"] = label(l_cfg)
    summary["label_vs_truth"] = label_vs_truth(label_dir / "labels.h5")
    lt = summary["label_vs_truth"]
    log.info("labels vs truth masks on %d frames: pixel precision %s recall %s IoU %s",
             lt.get("frames", 0), lt.get("precision"), lt.get("recall"), lt.get("iou"))

    from .infer.config import InferConfig
    from .infer.stage import run as infer

    infer_dir = out / "infer"
    i_cfg = _stage_config(
        InferConfig,
        {
            # one inference actor: it may use every core for torch (producer and writer idle)
            "run": {"out": str(infer_dir), "threads": os.cpu_count() or 1},
            "source": {"inputs": [str(sim_dir / "shard_*.cxi")], "geometry": str(sim_dir / "geometry.geom")},
            "predictor": {"kind": "peaknet"},  # the shipped default model when the package has one
        },
        infer_dir,
        "infer",
    )
    log.info("step 5: hybrid inference pipeline with %s -> %s",
             i_cfg.predictor.weights or "a randomly initialised model (no shipped weights)", infer_dir)
    inf = infer(i_cfg)
    summary["steps"]["infer"] = {k: v for k, v in inf.items() if k != "final_metrics"}
    summary["headline"] = {
        "events": inf.get("events_in"),
        "hit_rate": inf.get("hit_rate"),
        "peaks_per_hit": round(inf["peaks_written"] / inf["hits"], 1) if inf.get("hits") else 0.0,
        "frames_per_s": inf.get("frames_per_s"),
        "skipped": inf.get("skipped"),
    }

    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("demo finished in %.1f s; summary in %s", summary["wall_s"], out / "summary.json")
    log.info("headline: %s", json.dumps(summary.get("headline", {}), default=str))
    return summary
