"""The main job on the embedded default: the whole pipeline on data it generates itself.

``peaknet demo --out runs/demo`` (what ``bash tools/run_demo.sh`` runs on a fresh machine):

1. ``simulate``: synthetic serial-crystallography frames for a shipped detector geometry,
   written as CXI shards with their ground truth.
2. ``find-peaks``: peakfinder8 on those frames (the detector's preset), CXI peak lists.
3. ``match``: PeakDiff of the found peaks against the detectable ground truth: precision,
   recall, curation manifest and plots.
4. ``label``: pseudo-Voigt fits of the found peaks of the curated frames, segmentation labels.

Each step writes into its own folder under ``run.out`` with its resolved config, and the demo
writes ``summary.json`` with every step's summary.
"""
from __future__ import annotations

import json
import logging
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

    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("demo finished in %.1f s; summary in %s", summary["wall_s"], out / "summary.json")
    return summary
