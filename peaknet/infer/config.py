"""Typed configuration of the ``infer`` stage (``peaknet infer``, ``jobs/infer.py``).

Sections (TOML tables) and what they control:

- ``[run]``        output folder, resume, logging/metrics cadence, torch threads;
- ``[source]``     where frames come from: CXI/HDF5 files, folders of CBF files, the synthetic
  generator (any number of frames, for benchmarks) or psana; shard size;
- ``[pipeline]``   ``hybrid`` (MPI producers -> Ray queue -> inference actors -> writer actors) or
  ``legacy`` (every MPI rank reads, predicts and writes inline); producers, actors, writers,
  queue capacity (in frames), batch size, restarts;
- ``[predictor]``  PeakNet (preset + weights) or peakfinder8 (``[predictor.peakfinder8]``);
- ``[output]``     hit filter (minimum peaks), frames of hits, CXI options;
- ``[ray]``        the Ray cluster to use (explicit address) or a private local one.

Example (``configs/infer.toml`` style)::

    [source]
    kind = "cxi"
    inputs = ["runs/sim/*.cxi"]
    geometry = "epix10ka2m"          # a shipped geometry name or a .geom path
    events_per_shard = 1000          # one output file per shard

    [pipeline]
    mode = "hybrid"
    actors = 4                       # one per GPU
    writers = 2
    batch_size = 8
    queue_capacity = 3200            # frames

    [predictor]
    kind = "peaknet"
    preset = "student-atto-b1"
    weights = "models/student-atto-b1.safetensors"

    [output]
    min_peaks = 10

    [ray]
    address = "10.0.0.5:6379"
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal, Optional

from peaknet.findpeaks.config import Peakfinder8Section

__all__ = [
    "InferConfig",
    "RunSection",
    "SourceSection",
    "PipelineSection",
    "PredictorSection",
    "OutputSection",
    "RaySection",
]


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


@dataclass
class RunSection:
    """[run]

    out: output folder (CXI files, shard records, summary, metrics, the resolved config).
    resume: skip shards whose output and record already exist for the same inputs, predictor
        and output settings (a re-run after a crash only does what is missing).
    log_every_s: seconds between monitor lines (and metrics JSONL records).
    metrics: write ``<out>/infer.metrics.jsonl``.
    progress: show a tqdm bar on the driver (rank 0).
    threads: torch threads per process that runs a predictor; None: ``SLURM_CPUS_PER_TASK``
        or, for actors, their CPU share (at least 1). MPI launchers default torch to one thread.
    """

    out: pathlib.Path = pathlib.Path("runs/infer")
    resume: bool = True
    log_every_s: float = 10.0
    metrics: bool = True
    progress: bool = True
    threads: Optional[int] = None

    def validate(self) -> None:
        _need(self.log_every_s > 0, "log_every_s", f"must be > 0, got {self.log_every_s}")
        _need(self.threads is None or self.threads >= 1, "threads", "must be >= 1")


@dataclass
class SourceSection:
    """[source]

    kind: ``cxi`` (CXI/HDF5 files), ``cbf`` (CBF files or folders of them, one event per
        file), ``generator`` (synthetic frames made on the fly by :mod:`peaknet.simulate`),
        ``psana`` (LCLS data, when ``psana`` is importable), ``auto`` (no inputs: the
        generator; .cbf files or folders of them: cbf; anything else: cxi).
    inputs: files, glob patterns or folders (sorted; the order defines event ids and shards).
    data_path: the frames' dataset in CXI inputs ((N, P, H, W) stacks or (N, SS, FS) slabs).
    geometry: CrystFEL .geom path or a shipped name (``epix10ka2m``, ``cspad``, ``jungfrau4m``):
        slab <-> stack conversion, good-pixel mask, radius map for peakfinder8, slab
        coordinates in the output. CBF files carry their own; the generator uses its own.
    layout: how CXI frames are stored (``auto`` decides from shape and geometry).
    events_per_shard: events per shard: the unit of work distribution, of output files (one
        CXI file per shard) and of resume.
    max_events: process only the first N events of the source (None: all).
    max_nonfinite_fraction: frames with a larger fraction of NaN/inf pixels are skipped (recorded
        with the reason); below it, non-finite pixels are treated as masked.
    sim_config: the generator's ``simulate`` TOML (None: its defaults); sim_overrides:
        ``section.key=value`` changes to it; frames: how many frames the generator makes.
    experiment, run_number, detector: psana DataSource arguments (``exp``, ``run``, detector).
    """

    kind: Literal["auto", "cxi", "cbf", "generator", "psana"] = "auto"
    inputs: list[str] = field(default_factory=list)
    data_path: str = "/entry_1/data_1/data"
    geometry: Optional[str] = None
    layout: Literal["auto", "stack", "slab"] = "auto"
    events_per_shard: int = 1000
    max_events: Optional[int] = None
    max_nonfinite_fraction: float = 0.01
    sim_config: Optional[pathlib.Path] = None
    sim_overrides: list[str] = field(default_factory=list)
    frames: int = 1000
    experiment: Optional[str] = None
    run_number: Optional[int] = None
    detector: Optional[str] = None

    def validate(self) -> None:
        _need(self.events_per_shard >= 1, "events_per_shard", "must be >= 1")
        _need(self.max_events is None or self.max_events >= 0, "max_events", "must be >= 0")
        _need(0.0 <= self.max_nonfinite_fraction <= 1.0, "max_nonfinite_fraction",
              "must be in [0, 1]")
        _need(self.frames >= 0, "frames", "must be >= 0")
        if self.kind in ("cxi", "cbf"):
            _need(bool(self.inputs), "inputs", f"kind {self.kind!r} needs at least one input")
        if self.kind == "psana":
            _need(bool(self.experiment) and self.run_number is not None and bool(self.detector),
                  "experiment", "psana needs experiment, run_number and detector")


@dataclass
class PipelineSection:
    """[pipeline]

    mode: ``hybrid`` (producers -> queue -> inference actors -> queue -> writer actors) or
        ``legacy`` (each MPI rank reads its shards, predicts inline and writes its own files).
    producers: under ``mpiexec``/``srun`` every rank is a producer (0 or the world size);
        outside MPI, this many producer threads in the driver (0 means 1).
    actors: inference actors (one per GPU on GPU nodes; CPU actors otherwise).
    writers: CXI writer actors (shard i goes to writer i % writers).
    batch_size: frames per batch (what an actor runs through the model at once).
    queue_capacity: frames the input queue holds; a producer blocks when it is full
        (backpressure). The paper's value is 3200.
    result_capacity: batches each writer's queue holds (an actor blocks when it is full).
    prefetch: batches an actor fetches (and copies to its device) ahead of the one it computes.
    actor_cpus, actor_gpus: Ray resources per inference actor; actor_gpus None: 1 when the
        Ray cluster has GPUs, else 0. writer_cpus: per writer actor.
    max_restarts: how often Ray restarts a dead actor; its in-flight batches are redone.
    stall_timeout_s: fail the run if no batch is produced, computed or written for this long.
    """

    mode: Literal["hybrid", "legacy"] = "hybrid"
    producers: int = 0
    actors: int = 1
    writers: int = 1
    batch_size: int = 4
    queue_capacity: int = 3200
    result_capacity: int = 64
    prefetch: int = 1
    actor_cpus: float = 1.0
    actor_gpus: Optional[float] = None
    writer_cpus: float = 1.0
    max_restarts: int = 3
    stall_timeout_s: float = 600.0

    def validate(self) -> None:
        _need(self.producers >= 0, "producers", "must be >= 0")
        _need(self.actors >= 1, "actors", "must be >= 1")
        _need(self.writers >= 1, "writers", "must be >= 1")
        _need(self.batch_size >= 1, "batch_size", "must be >= 1")
        _need(self.queue_capacity >= 1, "queue_capacity", "must be >= 1 frame")
        _need(self.result_capacity >= 1, "result_capacity", "must be >= 1")
        _need(self.prefetch >= 1, "prefetch", "must be >= 1")
        _need(self.actor_cpus >= 0 and self.writer_cpus >= 0, "actor_cpus", "must be >= 0")
        _need(self.actor_gpus is None or self.actor_gpus >= 0, "actor_gpus", "must be >= 0")
        _need(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        _need(self.stall_timeout_s > 0, "stall_timeout_s", "must be > 0")


@dataclass
class PredictorSection:
    """[predictor]

    kind: ``peaknet`` (the neural network) or ``peakfinder8`` (``[predictor.peakfinder8]``).
    preset: PeakNet preset (``peaknet.model.list_presets()``); weights: a ``.safetensors`` file
        or a torch checkpoint read with ``weights_only=True`` (never arbitrary pickle); None:
        the shipped default model (``peaknet.models``) when ``preset`` is its preset and
        ``default_weights`` is true (its tuned threshold too, unless ``threshold`` is set),
        else random weights from ``seed`` (a placeholder; logged as a warning).
    device: ``auto`` (CUDA when available), ``cpu``, ``cuda``.
    dtype: ``auto`` (bfloat16 autocast on GPU, float32 on CPU), ``float32``, ``bfloat16``.
    compile: ``auto`` (torch.compile on GPU only), ``on``, ``off``.
    threshold: peak-class probability threshold (None: argmax); min_pix, max_pix: accepted
        peak sizes in pixels; norm: z-score per ``frame`` or per ``panel``.
    peakfinder8: preset and overrides for ``kind = "peakfinder8"``.
    """

    kind: Literal["peaknet", "peakfinder8"] = "peaknet"
    preset: str = "small-cpu"
    weights: Optional[pathlib.Path] = None
    seed: int = 0
    default_weights: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    threshold: Optional[float] = None
    min_pix: int = 1
    max_pix: Optional[int] = None
    norm: Literal["frame", "panel"] = "frame"
    peakfinder8: Peakfinder8Section = field(default_factory=Peakfinder8Section)

    def validate(self) -> None:
        if self.kind == "peaknet":
            from peaknet.model import list_presets

            _need(self.preset in list_presets(), "preset",
                  f"unknown PeakNet preset {self.preset!r}; known: {', '.join(list_presets())}")
        _need(self.threshold is None or 0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")
        _need(self.min_pix >= 1, "min_pix", "must be >= 1")
        _need(self.max_pix is None or self.max_pix >= self.min_pix, "max_pix", "must be >= min_pix")
        if self.weights is not None:
            _need(pathlib.Path(self.weights).is_file(), "weights", f"{self.weights} is not a file")
        elif self.kind == "peaknet" and self.default_weights:
            from peaknet.models import DEFAULT_MODEL

            if self.preset == DEFAULT_MODEL.preset and pathlib.Path(DEFAULT_MODEL.weights).is_file():
                self.weights = pathlib.Path(DEFAULT_MODEL.weights)
                if self.threshold is None:
                    self.threshold = DEFAULT_MODEL.threshold


@dataclass
class OutputSection:
    """[output]

    min_peaks: hit filter: frames with at least this many peaks are written to the CXI files;
        the others are counted (and their event ids listed in the shard records).
    write_frames: also store the frames of hits in ``/entry_1/data_1/data``.
    max_peaks: second dimension of the CXI peak arrays.
    compression: of stored frames (peak arrays are always gzip unless ``none``).
    """

    min_peaks: int = 10
    write_frames: bool = False
    max_peaks: int = 2048
    compression: Literal["gzip", "bitshuffle", "none"] = "gzip"

    def validate(self) -> None:
        _need(self.min_peaks >= 0, "min_peaks", "must be >= 0")
        _need(self.max_peaks >= 1, "max_peaks", "must be >= 1")


@dataclass
class RaySection:
    """[ray]

    address: ``host:port`` of a running Ray head (always explicit: ``auto`` would pick up any
        Ray on the machine). None: the driver starts a private loopback Ray for the run.
    namespace: Ray namespace of the run's named queues and actors (None: a fresh one per run,
        so a crashed run's leftovers never collide with a re-run).
    num_cpus, object_store_memory, temp_dir: for the private Ray only.
    """

    address: Optional[str] = None
    namespace: Optional[str] = None
    num_cpus: Optional[int] = None
    object_store_memory: Optional[int] = None
    temp_dir: Optional[str] = None

    def validate(self) -> None:
        _need(self.address != "auto", "address", "give the head's host:port explicitly, not 'auto'")


@dataclass
class InferConfig:
    """Config of ``peaknet infer``."""

    run: RunSection = field(default_factory=RunSection)
    source: SourceSection = field(default_factory=SourceSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    predictor: PredictorSection = field(default_factory=PredictorSection)
    output: OutputSection = field(default_factory=OutputSection)
    ray: RaySection = field(default_factory=RaySection)
