"""The ``infer`` stage: ``peaknet infer``, ``jobs/infer.py`` (hybrid), ``jobs/infer_mpi.py`` (legacy).

    peaknet infer --config infer.toml                       # one process: producer threads
    mpiexec -n 4 python -m jobs.infer --config infer.toml   # 4 MPI producers, rank 0 drives
    srun --mpi=pmi2 python -m jobs.infer_mpi --config infer.toml   # legacy coupling

:func:`run` is the stage's ``run(cfg) -> summary``: it dispatches on ``pipeline.mode`` to
:func:`peaknet.infer.pipeline.run_hybrid` or :func:`peaknet.infer.legacy.run_legacy`. Under MPI
every rank calls it; rank 0 returns the summary, the others an empty dict.
:func:`job_main` is what the job scripts call: the CLI's argument handling, with the config
logged and saved by rank 0 only (every rank writing ``infer.config.toml`` would race).
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Optional, Sequence

from .config import InferConfig

log = logging.getLogger("peaknet.infer")

__all__ = ["run", "run_job", "job_main", "STAGE"]


def _stage():
    from peaknet.cli import Stage

    return Stage(
        "infer",
        "peaknet.infer.config:InferConfig",
        "peaknet.infer.stage:run",
        "find peaks at scale: MPI producers -> Ray queue -> inference actors -> CXI writers "
        "(pipeline.mode=hybrid) or the legacy MPI coupling (pipeline.mode=legacy)",
        aliases={
            "inputs": "source.inputs",
            "geometry": "source.geometry",
            "out": "run.out",
            "mode": "pipeline.mode",
            "predictor": "predictor.kind",
            "weights": "predictor.weights",
        },
        example="peaknet infer --inputs 'runs/sim/*.cxi' --geometry epix10ka2m --out runs/infer",
    )


STAGE = _stage()


def run(cfg: InferConfig) -> dict:
    """Run inference with ``cfg``; the summary on rank 0 (``{}`` on other MPI ranks)."""
    if cfg.pipeline.mode == "legacy":
        from .legacy import run_legacy

        return run_legacy(cfg)
    from .pipeline import run_hybrid

    return run_hybrid(cfg)


def run_job(argv: Sequence[str], mode: Optional[str] = None) -> dict:
    """Parse ``argv`` like ``peaknet infer``, run on this rank, return the summary (rank 0).

    ``mode`` forces ``pipeline.mode``. Rank 0 logs the changed settings and saves
    ``<out>/infer.config.toml``. Raises ConfigError for a bad config.
    """
    from peaknet import __version__
    from peaknet.cli import _changed_from_default, parse_stage_args
    from peaknet.config import dump_toml, load_config, save_config

    from .legacy import mpi_comm

    ns, overrides = parse_stage_args(STAGE, list(argv))
    if mode is not None:
        overrides.append(f"pipeline.mode={mode}")
    comm = mpi_comm()
    rank = comm.Get_rank() if comm is not None else 0
    logging.basicConfig(
        level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s [{rank}] %(name)s: %(message)s",
    )
    cfg = load_config(InferConfig, ns.config, overrides)
    if ns.print_config:
        if rank == 0:
            sys.stdout.write(dump_toml(cfg))
        return {}
    if rank == 0:
        log.info("peaknet %s infer (%s, %d rank(s))", __version__, cfg.pipeline.mode,
                 comm.Get_size() if comm is not None else 1)
        for line in _changed_from_default(cfg, InferConfig):
            log.info("  %s", line)
        log.info("resolved config saved to %s", save_config(cfg, cfg.run.out, "infer"))
    return run(cfg)


def job_main(argv: Optional[Sequence[str]] = None, mode: Optional[str] = None) -> int:
    """``python -m jobs.infer[_mpi] [--config F] [--section.key=value ...]`` on every rank:
    :func:`run_job`, then rank 0 prints the summary as JSON on its last line."""
    from peaknet.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        summary = run_job(argv, mode)
    except ConfigError as exc:
        print(f"peaknet infer: config error: {exc}", file=sys.stderr)
        return 2
    if summary:
        print(json.dumps(summary, default=str, sort_keys=True))
    return 0
