"""Typed configs of the ``train`` (supervised pre-training) and ``distill`` stages.

Sections (TOML tables) and who reads them -- each component gets only its own section:

- ``[run]``        output folder, seed, number of optimizer steps (trainer, launcher);
- ``[model]``      the PeakNet preset and where its starting weights come from (model builder);
- ``[data]``       frame / label files, input layout, crops, augmentation, loader (data layer);
- ``[optim]``      AdamW, schedule, accumulation, clipping, focal-loss parameters (trainer);
- ``[fsdp]``       sharding mode, mixed precision, activation checkpointing (parallelize);
- ``[checkpoint]`` DCP checkpoints, resume, safetensors export (checkpointer);
- ``[log]``        progress bar, metrics JSONL, validation cadence and PeakDiff cut (trainer);
- ``[distill]``    teacher, logit cache, distillation-loss weights (distill stage only).

Shipped defaults are the paper's (Wang et al. 2025, section 2.2.2 and 2.2.3.1):

- pre-training: assembled images padded/cropped to 1920 x 1920, per-image z-score, batch 1 with
  gradient accumulation 20, AdamW, lr 3e-4 with 20 warm-up steps then cosine decay, gradient
  norm clipped at 1.0, focal loss alpha 0.25 / 0.75, gamma 2, FSDP (full sharding);
- distillation: batch 4 with accumulation 10, lr 3e-4 cosine down to 1e-7 over 3200 steps,
  FSDP ZeRO-2, T = 2, loss weights MSE 0.4 / KL 0.4 / focal 0.2, teacher logits cached on disk.

What the paper does not state, and the value chosen here: the number of pre-training steps
(2000), AdamW weight decay (0.05) and betas (0.9, 0.999), the pre-training floor lr (0), no data
augmentation (it mentions none). The small CPU configs used by the tests live in
``peaknet/data/configs/*-small-cpu.toml``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

__all__ = [
    "RunSection",
    "ModelSection",
    "DataSection",
    "OptimSection",
    "FsdpSection",
    "CheckpointSection",
    "LogSection",
    "DistillSection",
    "PretrainConfig",
    "DistillConfig",
    "CONFIG_DIR",
    "shipped_config",
]

#: Folder of the shipped TOML configs (``pretrain-teacher.toml``, ``distill-small-cpu.toml``, ...).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "data" / "configs"


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


@dataclass
class RunSection:
    """[run]: where outputs go and how long to train.

    out: output folder (metrics.jsonl, checkpoints/, model.safetensors, summary.json, plots).
    seed: seeds the model initialisation (identical on every rank), the data order and the
        augmentations (which depend on (seed, epoch, sample) only, never on worker or rank).
    steps: optimizer steps of the whole run (the cosine schedule spans them unless
        ``optim.decay_steps`` says otherwise).
    stop_after: stop this invocation after this step, with a checkpoint (the schedule still spans
        ``steps``); for time-limited jobs that resume (``checkpoint.resume = "auto"``).
    time_limit_min: stop with a checkpoint before this many minutes of wall time would pass
        (the job's time limit minus a margin; None: no limit); a requeued job resumes.
    device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
    threads: torch intra-op threads per process (None: leave as is; torchrun sets 1).
    timeout_min: process-group timeout in minutes.
    """

    out: str = "runs/train"
    seed: int = 0
    steps: int = 2000
    stop_after: Optional[int] = None
    time_limit_min: Optional[float] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = None
    timeout_min: float = 30.0

    def validate(self) -> None:
        _need(bool(str(self.out)), "out", "must name a folder")
        _need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.stop_after is not None:
            _need(self.stop_after >= 1, "stop_after", f"must be >= 1, got {self.stop_after}")
        if self.time_limit_min is not None:
            _need(self.time_limit_min > 0, "time_limit_min", "must be > 0")
        if self.threads is not None:
            _need(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _need(self.timeout_min > 0, "timeout_min", "must be > 0")


@dataclass
class ModelSection:
    """[model]: which PeakNet to train.

    preset: a name from :func:`peaknet.model.list_presets` ("teacher", "student-atto-b4", ...,
        "small-cpu").
    weights: optional safetensors file to start from (e.g. a previous run's model.safetensors).
    drop_path_rate: backbone stochastic depth.
    meta_init: build on the meta device, shard, then materialise each rank's shard and
        initialise it there (for models too large to build whole on every rank). Off: every
        rank builds the full model from the same seed and FSDP shards it.
    """

    preset: str = "teacher"
    weights: Optional[str] = None
    drop_path_rate: float = 0.0
    meta_init: bool = False

    def validate(self) -> None:
        from peaknet.model import list_presets

        _need(self.preset in list_presets(), "preset",
              f"unknown preset {self.preset!r}; known: {', '.join(list_presets())}")
        _need(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "must be in [0, 1)")


@dataclass
class DataSection:
    """[data]: frames, labels and how samples are cut from them.

    train, val: frame files (CXI / HDF5; shell globs allowed, expanded and sorted).
    train_labels, val_labels: label files aligned one-to-one with the expanded frame files
        (the generator's ``shard_*.truth.h5``). Empty: ``label_pattern`` if set, else the
        labels are read from the frame file itself. With ``label_source = "label"`` these may
        instead be label-stage outputs (``labels.h5``, one row per event "<file>//<frame>"):
        the frames are then the events it labelled, restricted to ``train`` / ``val`` when
        those are given.
    label_pattern: label file name from a frame file name, with ``{dir}``, ``{stem}``, ``{name}``
        (the generator's shards: ``"{dir}/{stem}.truth.h5"``).
    frames_dataset: detector frames inside a frame file: (N, P, H, W) stack or (N, SS, FS) slab
        (a slab needs ``geometry``).
    label_source: "truth" (the generator's per-pixel peak mask), "label" (the label stage's
        masks from pseudo-Voigt fits) or "none" (no labels: distillation only).
    label_dataset: the (N, P, H, W) mask inside a label file; "auto" looks for the usual names
        of the chosen ``label_source`` and then for the one dataset of the frames' stack shape.
    mask_dataset: optional good-pixel mask, (P, H, W) or (N, P, H, W) (or the slab
        equivalents), in the frame file (``mask_source = "frames"``) or, static, in the label
        file (``"labels"``: e.g. the generator's ``/static/good_pixels``); ``mask_good`` says
        whether nonzero means good (CrystFEL) or bad (Cheetah pixel masks). Non-finite pixels
        are always bad, and so are pixels labelled 255 (the label stage's "ignore").
    input: "assembled" (the paper: frames assembled with ``geometry``, then padded/cropped to
        ``image_size`` x ``image_size``) or "panels" (one detector module per sample, the
        authors' deployment layout; ``crop`` cuts windows from it).
    geometry: built-in detector name ("cspad", "epix10ka2m", "jungfrau4m") or a .geom file.
    image_size: side of the assembled input (1920).
    crop: panels only: (h, w) of the window cut from a module; None: the whole module.
    zscore: "sample" (each panel / image over its good pixels) or "frame" (panels normalised
        with the statistics of their whole frame).
    batch_size: samples per micro-batch and process.
    num_workers, prefetch_factor: DataLoader workers per process (each opens its own files).
    shuffle: shuffle the training samples every epoch (seeded).
    augment: training-time augmentation, identical on image, label, mask (and teacher logits):
        the window is placed at a random position (any crop inside the canvas, up to
        ``max_shift`` pixels beyond it, padding counts as invalid) instead of centred, and
        flipped along each axis with probability 1/2 when ``flip``.
    """

    train: list[str] = field(default_factory=list)
    train_labels: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    val_labels: list[str] = field(default_factory=list)
    label_pattern: Optional[str] = None
    frames_dataset: str = "/entry_1/data_1/data"
    label_source: Literal["truth", "label", "none"] = "truth"
    label_dataset: str = "auto"
    mask_dataset: Optional[str] = None
    mask_source: Literal["frames", "labels"] = "frames"
    mask_good: Literal["nonzero", "zero"] = "nonzero"
    input: Literal["assembled", "panels"] = "assembled"
    geometry: Optional[str] = None
    image_size: int = 1920
    crop: Optional[tuple[int, ...]] = None
    zscore: Literal["sample", "frame"] = "sample"
    batch_size: int = 1
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle: bool = True
    augment: bool = False
    flip: bool = False
    max_shift: int = 0

    def validate(self) -> None:
        _need(self.image_size >= 32, "image_size", f"must be >= 32, got {self.image_size}")
        if self.crop is not None:
            _need(len(self.crop) == 2 and min(self.crop) >= 1, "crop",
                  f"needs two sizes >= 1 (h, w), got {self.crop}")
        _need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _need(self.num_workers >= 0, "num_workers", "must be >= 0")
        _need(self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1")
        _need(self.max_shift >= 0, "max_shift", "must be >= 0")
        if self.input == "assembled":
            _need(self.crop is None, "crop", "applies to input = 'panels' (assembled inputs are "
                  "image_size x image_size)")
        for name in ("train_labels", "val_labels"):
            files = getattr(self, name)
            _need(not files or self.label_source != "none", name,
                  "label files given but label_source = 'none'")


@dataclass
class OptimSection:
    """[optim]: optimizer, schedule and loss.

    lr: peak learning rate (3e-4); min_lr: floor of the cosine decay.
    warmup_steps: linear warm-up from lr / warmup_steps to lr over this many steps (20).
    schedule: "cosine" (warm-up, then cosine from lr to min_lr) or "constant" (after warm-up).
    decay_steps: length of warm-up + decay in steps (None: ``run.steps``).
    grad_accum: micro-batches per optimizer step.
    clip_grad: max global gradient norm (1.0; 0 disables clipping but the norm is still logged).
    weight_decay, betas, eps: AdamW.
    focal_alpha, focal_gamma: focal loss (background, peak) alphas and gamma.
    """

    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    decay_steps: Optional[int] = None
    grad_accum: int = 20
    clip_grad: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    focal_alpha: tuple[float, ...] = (0.25, 0.75)
    focal_gamma: float = 2.0

    def validate(self) -> None:
        _need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr], got {self.min_lr}")
        _need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        if self.decay_steps is not None:
            _need(self.decay_steps >= 1, "decay_steps", "must be >= 1")
        _need(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _need(self.clip_grad >= 0, "clip_grad", "must be >= 0")
        _need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"needs two values in [0, 1), got {self.betas}")
        _need(self.eps > 0, "eps", "must be > 0")
        _need(len(self.focal_alpha) == 2, "focal_alpha", "needs (background, peak)")
        _need(self.focal_gamma >= 0, "focal_gamma", "must be >= 0")


@dataclass
class FsdpSection:
    """[fsdp]: how the model is spread over processes (see :mod:`peaknet.train.parallelize`).

    mode: "zero3" (FSDP2 full sharding: parameters resharded after forward), "zero2" (FSDP2
        with ``reshard_after_forward=False``: gradients and optimizer states sharded,
        parameters kept gathered between forward and backward) or "ddp" (replicated). A single
        process without a process group always trains the plain module.
    mixed_precision: "bf16" (parameters and activations in bfloat16 for compute, float32
        master weights; falls back to float32, with a log line, where bf16 does not work) or
        "fp32".
    reduce_dtype: dtype of the gradient reduction ("fp32" is the safe choice).
    activation_checkpointing: recompute every backbone block and BiFPN block in backward.
    """

    mode: Literal["zero3", "zero2", "ddp"] = "zero3"
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False


@dataclass
class CheckpointSection:
    """[checkpoint]: torch.distributed.checkpoint (DCP) snapshots and the exported weights.

    dir: checkpoint folder (None: ``<run.out>/checkpoints``).
    every: save every N optimizer steps (0: only at the end / on stop).
    keep: complete checkpoints kept (older ones are deleted; 0 keeps all).
    resume: "auto" (the latest complete checkpoint in ``dir`` if any), "none", or a path.
    export: write ``<run.out>/model.safetensors`` (full float32 weights) at the end.
    """

    dir: Optional[str] = None
    every: int = 100
    keep: int = 2
    resume: str = "auto"
    export: bool = True

    def validate(self) -> None:
        _need(self.every >= 0, "every", "must be >= 0")
        _need(self.keep >= 0, "keep", "must be >= 0")


@dataclass
class LogSection:
    """[log]: progress, metrics and validation.

    every: write a metrics line (loss, lr, grad norm, images/s, memory) every N steps.
    jsonl: metrics file (None: ``<run.out>/metrics.jsonl``); rank 0 writes it.
    tqdm: progress bar on rank 0.
    val_every: validate every N steps (0: only at the end); needs ``data.val``.
    val_at_start: also validate before the first step.
    val_max_samples: validate on at most this many samples (None: all).
    match_distance: PeakDiff cut in pixels for peak-level precision / recall.
    plots: write loss / lr / metric curves (PNG) next to the JSONL at the end.
    """

    every: int = 1
    jsonl: Optional[str] = None
    tqdm: bool = True
    val_every: int = 0
    val_at_start: bool = False
    val_max_samples: Optional[int] = None
    match_distance: float = 5.0
    plots: bool = True

    def validate(self) -> None:
        _need(self.every >= 1, "every", "must be >= 1")
        _need(self.val_every >= 0, "val_every", "must be >= 0")
        if self.val_max_samples is not None:
            _need(self.val_max_samples >= 1, "val_max_samples", "must be >= 1")
        _need(self.match_distance > 0, "match_distance", "must be > 0")


@dataclass
class DistillSection:
    """[distill]: the teacher, its cached logits and the loss.

    teacher: preset of the teacher model ("teacher").
    teacher_weights: its safetensors weights (None: random initialisation, seeded; only for
        tests -- a warning is logged).
    cache: HDF5 file of the cached teacher logits (None: ``<run.out>/teacher_logits.h5``).
        Written once, by a distributed pass over the training frames (fp16, one chunk per frame,
        compressed); the student training reads it and never runs the teacher.
    rebuild_cache: recompute the cache even if a complete one exists.
    cache_batch: canvases per teacher forward pass.
    cache_dtype: "bf16" autocast for the teacher pass where supported, else "fp32".
    compression, compression_level: filter of the cache ("gzip" 0-9, "lzf", "none").
    temperature, lam_mse, lam_kl, lam_focal: the paper's loss (T = 2; 0.4 / 0.4 / 0.2).
    """

    teacher: str = "teacher"
    teacher_weights: Optional[str] = None
    cache: Optional[str] = None
    rebuild_cache: bool = False
    cache_batch: int = 4
    cache_dtype: Literal["bf16", "fp32"] = "bf16"
    compression: Literal["gzip", "lzf", "none"] = "gzip"
    compression_level: int = 4
    temperature: float = 2.0
    lam_mse: float = 0.4
    lam_kl: float = 0.4
    lam_focal: float = 0.2

    def validate(self) -> None:
        from peaknet.model import list_presets

        _need(self.teacher in list_presets(), "teacher",
              f"unknown preset {self.teacher!r}; known: {', '.join(list_presets())}")
        _need(self.cache_batch >= 1, "cache_batch", "must be >= 1")
        _need(0 <= self.compression_level <= 9, "compression_level", "must be 0..9")
        _need(self.temperature > 0, "temperature", "must be > 0")
        for k in ("lam_mse", "lam_kl", "lam_focal"):
            _need(getattr(self, k) >= 0, k, "must be >= 0")
        _need(self.lam_mse + self.lam_kl + self.lam_focal > 0, "lam_mse",
              "at least one loss weight must be > 0")


def _check_data(cfg) -> None:
    d = cfg.data
    if not d.train and not (d.label_source == "label" and d.train_labels):
        raise ValueError("data.train: no training files given")
    if cfg.log.val_every and not cfg.data.val:
        raise ValueError("log.val_every: validation needs data.val files")
    if cfg.data.input == "assembled" and cfg.data.geometry is None:
        raise ValueError("data.geometry: assembled inputs need a detector geometry")


@dataclass
class PretrainConfig:
    """The ``train`` stage (supervised pre-training with the focal loss); paper defaults."""

    run: RunSection = field(default_factory=lambda: RunSection(out="runs/pretrain"))
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    fsdp: FsdpSection = field(default_factory=FsdpSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def validate(self) -> None:
        _check_data(self)
        if self.data.label_source == "none":
            raise ValueError("data.label_source: pre-training needs labels ('truth' or 'label')")


@dataclass
class DistillConfig:
    """The ``distill`` stage (student trained on cached teacher logits); paper defaults."""

    run: RunSection = field(default_factory=lambda: RunSection(out="runs/distill", steps=3200))
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="student-atto-b4"))
    data: DataSection = field(default_factory=lambda: DataSection(batch_size=4))
    optim: OptimSection = field(default_factory=lambda: OptimSection(grad_accum=10, min_lr=1e-7))
    fsdp: FsdpSection = field(default_factory=lambda: FsdpSection(mode="zero2"))
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def validate(self) -> None:
        _check_data(self)


def shipped_config(name: str) -> Path:
    """Path of a shipped config (``"pretrain-small-cpu"`` or ``"pretrain-small-cpu.toml"``)."""
    p = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if not p.is_file():
        known = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
        raise FileNotFoundError(f"no shipped config {name!r} in {CONFIG_DIR}; known: {known}")
    return p


def lr_factor(step: int, optim: OptimSection, total_steps: int) -> float:
    """Multiplier of ``optim.lr`` for optimizer update ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` updates, then
    cosine from 1 to ``min_lr / lr`` over the remaining ``decay_steps - warmup_steps`` updates
    (constant at the floor beyond), or 1 for the "constant" schedule.
    """
    warm = optim.warmup_steps
    if step < warm:
        return (step + 1) / warm
    if optim.schedule == "constant":
        return 1.0
    total = optim.decay_steps or total_steps
    span = max(total - warm, 1)
    t = min(max(step - warm, 0) / span, 1.0)
    floor = optim.min_lr / optim.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
