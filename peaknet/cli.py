"""The ``peaknet`` command: one subcommand per pipeline stage.

Every stage is run the same way::

    peaknet <stage> [--config FILE.toml] [--section.key=value ...] [--print-config]

The stage's typed config (a dataclass, see :mod:`peaknet.config`) is built from its defaults,
the TOML file and the overrides, validated, logged (every value that differs from the default),
saved as ``<out>/<stage>.config.toml`` next to the outputs, and passed to the stage's
``run(cfg) -> dict``. The summary it returns is printed as JSON on the last line.

``jobs/<stage>.py`` (what Slurm templates and submitit call) go through :func:`run_stage` too.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .config import ConfigError, config_to_dict, load_config, save_config

log = logging.getLogger("peaknet")


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: where its config class and run function live, and its CLI aliases."""

    name: str
    config: str  # "module:ClassName"
    run: str  # "module:function"
    help: str
    aliases: dict = field(default_factory=dict)  # "--frames" -> "run.frames"
    example: str = ""

    def load(self) -> tuple[type, Callable[[Any], dict]]:
        mod, _, cls = self.config.partition(":")
        cfg_cls = getattr(importlib.import_module(mod), cls)
        mod, _, fn = self.run.partition(":")
        return cfg_cls, getattr(importlib.import_module(mod), fn)


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


register(
    Stage(
        "simulate",
        "peaknet.simulate.config:SimulateConfig",
        "peaknet.simulate.generator:run",
        "generate synthetic serial-crystallography frames (CXI shards) with their ground truth",
        aliases={
            "detector": "run.detector",
            "frames": "run.frames",
            "seed": "run.seed",
            "out": "run.out",
        },
        example="peaknet simulate --detector epix10ka2m --frames 100 --seed 1 --out runs/sim",
    )
)


register(
    Stage(
        "find-peaks",
        "peaknet.findpeaks.config:FindPeaksConfig",
        "peaknet.findpeaks.run:run",
        "find Bragg peaks with peakfinder8 in CXI/HDF5 or CBF files, write CXI peak lists",
        aliases={
            "inputs": "run.inputs",
            "geometry": "run.geometry",
            "out": "run.out",
            "preset": "peakfinder8.preset",
            "backend": "run.backend",
        },
        example="peaknet find-peaks --inputs 'runs/sim/*.cxi' --geometry epix10ka2m --out runs/peaks",
    )
)

register(
    Stage(
        "match",
        "peaknet.match.stage:MatchConfig",
        "peaknet.match.stage:run",
        "PeakDiff: match found vs predicted peaks, curate frames, write tables and plots",
        aliases={"found": "run.found", "predicted": "run.predicted", "out": "run.out"},
        example="peaknet match --found runs/peaks/'*.cxi' --predicted runs/sim/'*.cxi' --out runs/match",
    )
)

register(
    Stage(
        "label",
        "peaknet.label.stage:LabelConfig",
        "peaknet.label.stage:run",
        "fit pseudo-Voigt profiles to found peaks, write segmentation labels (serial, MPI or Ray; resumable)",
        aliases={"inputs": "run.inputs", "out": "run.out", "backend": "run.backend"},
        example="peaknet label --inputs 'runs/sim/*.cxi' --out runs/label --backend ray",
    )
)

register(
    Stage(
        "train",
        "peaknet.train.config:PretrainConfig",
        "peaknet.train.trainer:run",
        "supervised pre-training of PeakNet (focal loss; FSDP2 under torchrun)",
        aliases={"out": "run.out", "steps": "run.steps", "preset": "model.preset"},
        example="peaknet train --config peaknet/data/configs/pretrain-small-cpu.toml "
        "--data.train='[\"runs/sim/shard_*.cxi\"]' --data.label_pattern='{dir}/{stem}.truth.h5' --out runs/pretrain",
    )
)

register(
    Stage(
        "distill",
        "peaknet.train.config:DistillConfig",
        "peaknet.train.distill:run",
        "distil a student PeakNet from cached teacher logits (FSDP2 ZeRO-2)",
        aliases={"out": "run.out", "steps": "run.steps", "preset": "model.preset",
                 "teacher-weights": "distill.teacher_weights"},
        example="peaknet distill --config peaknet/data/configs/distill-student-atto.toml "
        "--teacher-weights runs/pretrain-teacher/model.safetensors",
    )
)

register(
    Stage(
        "infer",
        "peaknet.infer.config:InferConfig",
        "peaknet.infer.stage:run",
        "find peaks at scale: MPI producers -> Ray queue -> inference actors -> CXI writers "
        "(pipeline.mode=hybrid) or the legacy MPI coupling (pipeline.mode=legacy)",
        aliases={"inputs": "source.inputs", "geometry": "source.geometry", "out": "run.out",
                 "mode": "pipeline.mode", "predictor": "predictor.kind", "weights": "predictor.weights"},
        example="peaknet infer --inputs 'runs/sim/*.cxi' --geometry epix10ka2m --out runs/infer",
    )
)

register(
    Stage(
        "evaluate",
        "peaknet.evaluate:EvaluateConfig",
        "peaknet.evaluate:run",
        "peak-level precision/recall/F1 of PeakNet or peakfinder8 on generated and real frames",
        aliases={"predictor": "run.predictor", "weights": "model.weights",
                 "threshold": "model.threshold", "preset": "peakfinder8.preset",
                 "shards": "data.shards", "cbf": "data.cbf", "out": "run.out"},
        example="peaknet evaluate --predictor model --weights default "
        "--shards 'runs/sim/shard_*.cxi' --out runs/eval",
    )
)

register(
    Stage(
        "demo",
        "peaknet.demo:DemoConfig",
        "peaknet.demo:run",
        "the main job: the whole pipeline on generated data",
        aliases={"out": "run.out", "frames": "run.frames", "detector": "run.detector"},
        example="peaknet demo --out runs/demo",
    )
)


def process_rank() -> int:
    """This process's rank as its launcher numbered it (torchrun, mpiexec/Hydra, srun), else 0."""
    import os

    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _out_dir(cfg: Any) -> Optional[str]:
    run = getattr(cfg, "run", None)
    out = getattr(run, "out", None) if run is not None else None
    return None if out is None else str(out)


def _changed_from_default(cfg: Any, cls: type) -> list[str]:
    """``section.key = value`` lines for every value that differs from the default."""
    now, default = config_to_dict(cfg), config_to_dict(cls())
    lines = []
    for section, values in now.items():
        if isinstance(values, dict):
            for key, v in values.items():
                if default.get(section, {}).get(key) != v:
                    lines.append(f"{section}.{key} = {v!r}")
        elif default.get(section) != values:
            lines.append(f"{section} = {values!r}")
    return lines


def build_parser(stage: Stage) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"peaknet {stage.name}",
        description=stage.help,
        epilog=(f"example: {stage.example}\n" if stage.example else "")
        + "Any config value can be set with --section.key=value.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML config file (defaults are used for missing keys)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    for alias, key in stage.aliases.items():
        p.add_argument(f"--{alias}", dest=f"alias_{alias}", help=f"same as --{key}")
    return p


def parse_stage_args(stage: Stage, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split argv into the known flags and ``section.key=value`` overrides."""
    parser = build_parser(stage)
    ns, rest = parser.parse_known_args(list(argv))
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            parser.error(f"unexpected argument {item!r}: overrides look like --section.key=value")
        if "=" not in item:  # "--section.key value"
            if i + 1 >= len(rest):
                parser.error(f"{item} needs a value")
            item = f"{item}={rest[i + 1]}"
            i += 1
        overrides.append(item[2:])
        i += 1
    for alias, key in stage.aliases.items():
        value = getattr(ns, f"alias_{alias}")
        if value is not None:
            overrides.append(f"{key}={value}")
    return ns, overrides


def run_stage(name: str, argv: Sequence[str]) -> dict:
    """Parse arguments for stage ``name``, build its config, save it, run it, return the summary."""
    stage = STAGES[name]
    ns, overrides = parse_stage_args(stage, argv)
    logging.basicConfig(
        level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg_cls, run = stage.load()
    cfg = load_config(cfg_cls, ns.config, overrides)
    if ns.print_config:
        from .config import dump_toml

        sys.stdout.write(dump_toml(cfg))
        return {}
    lead = process_rank() == 0  # in a multi-process job only the first process logs and saves
    if lead:
        log.info("peaknet %s %s", __version__, name)
        for line in _changed_from_default(cfg, cfg_cls):
            log.info("  %s", line)
    out = _out_dir(cfg)
    if out and lead:
        path = save_config(cfg, out, name)
        log.info("resolved config saved to %s", path)
    t0 = time.perf_counter()
    summary = run(cfg) or {}
    if lead:
        log.info("%s finished in %.1f s", name, time.perf_counter() - t0)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"peaknet {__version__}: Bragg peak finding at facility scale\n")
        print("usage: peaknet <stage> [--config FILE] [--section.key=value ...]\n\nstages:")
        for s in STAGES.values():
            print(f"  {s.name:<12} {s.help}")
        print("\n'peaknet <stage> --help' shows a stage's options.")
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name = argv[0]
    if name not in STAGES:
        print(f"peaknet: unknown stage {name!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        summary = run_stage(name, argv[1:])
    except ConfigError as exc:
        print(f"peaknet {name}: config error: {exc}", file=sys.stderr)
        return 2
    if summary:
        _print_line(json.dumps(summary, default=str, sort_keys=True))
    return 0


def _print_line(text: str) -> None:
    """Write ``text`` and a newline to stdout in one system call (after flushing the logs), so
    another process sharing the job's output file cannot land inside it. Under ``srun`` a long
    line was seen split by Slurm's output forwarding all the same, so a job's summary is best read
    from the ``<stage>.summary.json`` file every stage writes beside its outputs."""
    import os

    sys.stderr.flush()
    sys.stdout.flush()
    data = (text + "\n").encode()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stdout (pytest, notebooks)
        sys.stdout.write(text + "\n")
        return
    while data:
        data = data[os.write(fd, data):]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
