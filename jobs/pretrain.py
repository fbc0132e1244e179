"""Entry point of supervised pre-training, for torchrun, Slurm and submitit.

    torchrun --standalone --nproc_per_node=2 -m jobs.pretrain \
        --config peaknet/data/configs/pretrain-small-cpu.toml [--section.key=value ...]

Each process parses the same arguments; torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
...) tells it its place. ``slurm/pretrain.sbatch`` and ``peaknet.launch.submitit_train`` start
it through torchrun on every node. Rank 0 prints the run's summary as JSON on the last line.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

from peaknet.cli import Stage, parse_stage_args
from peaknet.config import ConfigError, load_config

STAGE = Stage("train", "peaknet.train.config:PretrainConfig", "peaknet.train.trainer:run",
              "supervised pre-training of PeakNet (focal loss, FSDP2)",
              aliases={"out": "run.out", "steps": "run.steps", "preset": "model.preset"})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = parse_stage_args(STAGE, list(sys.argv[1:] if argv is None else argv))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # torchrun or srun
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO)
                        if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    from peaknet.train.parallelize import destroy_distributed, init_distributed
    from peaknet.train.trainer import build_pretrainer

    cfg_cls, _ = STAGE.load()
    try:
        cfg = load_config(cfg_cls, args.config, overrides)
    except ConfigError as exc:
        print(f"jobs.pretrain: config error: {exc}", file=sys.stderr)
        return 2
    env = init_distributed(cfg.run.device, cfg.run.timeout_min, cfg.run.threads)
    try:
        summary = build_pretrainer(cfg, env).fit()
        if env.is_main:
            print(json.dumps(summary, default=str, sort_keys=True), flush=True)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
