"""The main job on the embedded default: the whole pipeline on data it generates itself.

``peaknet demo --out runs/demo`` (what ``bash tools/run_demo.sh`` runs on a fresh machine):

1. ``simulate``: synthetic serial-crystallography frames for a shipped detector geometry,
   written as CXI shards with their ground truth.

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

    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("demo finished in %.1f s; summary in %s", summary["wall_s"], out / "summary.json")
    return summary
