"""Entry point of distillation (teacher logits cached once, student trained on them).

    torchrun --standalone --nproc_per_node=2 -m jobs.distill \
        --config peaknet/data/configs/distill-small-cpu.toml [--section.key=value ...]

The first invocation runs the teacher over the training frames (one distributed pass) and
writes the logit cache; it and every later invocation (resumes) train the student from the cache
only. Rank 0 prints the run's summary as JSON on the last line.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

from peaknet.cli import Stage, parse_stage_args
from peaknet.config import ConfigError, load_config

STAGE = Stage("distill", "peaknet.train.config:DistillConfig", "peaknet.train.distill:run",
              "distil a student PeakNet from cached teacher logits (FSDP2 ZeRO-2)",
              aliases={"out": "run.out", "steps": "run.steps", "preset": "model.preset",
                       "teacher-weights": "distill.teacher_weights"})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = parse_stage_args(STAGE, list(sys.argv[1:] if argv is None else argv))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # torchrun or srun
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO)
                        if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    from peaknet.train.distill import build_distiller
    from peaknet.train.parallelize import destroy_distributed, init_distributed

    cfg_cls, _ = STAGE.load()
    try:
        cfg = load_config(cfg_cls, args.config, overrides)
    except ConfigError as exc:
        print(f"jobs.distill: config error: {exc}", file=sys.stderr)
        return 2
    env = init_distributed(cfg.run.device, cfg.run.timeout_min, cfg.run.threads)
    try:
        trainer, _ = build_distiller(cfg, env)
        summary = trainer.fit()
        if env.is_main:
            print(json.dumps(summary, default=str, sort_keys=True), flush=True)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
