"""Peak finding at facility scale: the ``infer`` stage.

Two pipelines over the same parts (OM's layers: data retrieval, processing, parallelisation):

- **hybrid** (:mod:`peaknet.infer.pipeline`): MPI producer ranks read shards and put batches into
  a bounded Ray queue; inference actors (one per GPU) take batches, run the predictor with the
  next batch prefetched and copied to the device meanwhile, and put results on writer queues;
  writer actors write one CrystFEL-compatible CXI file per shard. Actor and writer crashes are
  survived (restarts; in-flight batches redone; duplicates dropped); a crashed job resumes.
- **legacy** (:mod:`peaknet.infer.legacy`): each MPI rank reads, predicts and writes inline.

Parts: :mod:`~peaknet.infer.sources` (CXI/HDF5, CBF folders, the generator, psana; stable event
ids; deterministic partition), :mod:`~peaknet.infer.predictors` (PeakNet or peakfinder8, one
``predict(frames, masks)`` interface), :mod:`~peaknet.infer.accounting` (plan, shard records,
resume, exactly-once verification, summary), :mod:`~peaknet.infer.monitor` (log lines, metrics
JSONL, progress), :mod:`~peaknet.infer.config` (the typed config), :mod:`~peaknet.infer.stage`
(``run(cfg)``).

    from peaknet.config import load_config
    from peaknet.infer import InferConfig, run
    cfg = load_config(InferConfig, "infer.toml", ["pipeline.actors=2"])
    summary = run(cfg)          # or: mpiexec -n 4 python -m jobs.infer --config infer.toml
"""
from .accounting import Plan, ShardCollector, read_outputs, summarize, verify_outputs
from .config import InferConfig
from .predictors import PeakNetPredictor, Peakfinder8Predictor, Predictor, build_predictor, load_weights
from .sources import Batch, EventId, Shard, Source, open_source, partition
from .stage import run

__all__ = [
    "InferConfig", "run", "EventId", "Shard", "Batch", "Source", "open_source", "partition",
    "Predictor", "PeakNetPredictor", "Peakfinder8Predictor", "build_predictor", "load_weights",
    "Plan", "ShardCollector", "verify_outputs", "read_outputs", "summarize",
]
