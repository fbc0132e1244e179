"""Training PeakNet: supervised pre-training and distillation, FSDP2 on torchrun / Slurm.

- :mod:`peaknet.train.config`      typed configs (``PretrainConfig``, ``DistillConfig``); paper
  defaults, small CPU configs in ``peaknet/data/configs/``;
- :mod:`peaknet.train.data`        frames + labels streamed from HDF5, windows, augmentation,
  sharded sampling;
- :mod:`peaknet.train.parallelize` process group, FSDP2 (ZeRO-2 / ZeRO-3), bf16, activation
  checkpointing (the model file imports nothing distributed);
- :mod:`peaknet.train.checkpoint`  DCP checkpoints that resume exactly, safetensors export;
- :mod:`peaknet.train.trainer`     the loop, validation (pixel and PeakDiff peak metrics), logs;
  ``run(cfg)`` is the ``train`` stage;
- :mod:`peaknet.train.distill`     teacher-logit cache and the ``distill`` stage;
- :mod:`peaknet.train.plots`       curves from ``metrics.jsonl``.

Run with ``torchrun --standalone --nproc_per_node=N -m jobs.pretrain --config F``
(``jobs.distill`` likewise), ``sbatch slurm/pretrain.sbatch ...`` or
:func:`peaknet.launch.submitit_train.submit_train`.
"""
from .config import (
    CheckpointSection,
    DataSection,
    DistillConfig,
    DistillSection,
    FsdpSection,
    LogSection,
    ModelSection,
    OptimSection,
    PretrainConfig,
    RunSection,
    lr_factor,
    shipped_config,
)

__all__ = [
    "PretrainConfig", "DistillConfig", "RunSection", "ModelSection", "DataSection",
    "OptimSection", "FsdpSection", "CheckpointSection", "LogSection", "DistillSection",
    "lr_factor", "shipped_config", "run_pretrain", "run_distill",
]


def run_pretrain(cfg: PretrainConfig) -> dict:
    """The ``train`` stage (see :func:`peaknet.train.trainer.run`)."""
    from .trainer import run

    return run(cfg)


def run_distill(cfg: DistillConfig) -> dict:
    """The ``distill`` stage (see :func:`peaknet.train.distill.run`)."""
    from .distill import run

    return run(cfg)
