"""Rank-partitioned and Ray-scheduled processing of many events, with resumable outputs.

A stage describes its work as a :class:`~peaknet.parallel.task.ShardTask` (read events,
process them with pure functions, write its datasets); this package moves events and results
and keeps the books:

- :mod:`.partition`: events ``"<file>//<index>"`` in a compact :class:`EventTable`, cut into
  shards (output units) and batches (processing units) that depend only on the event order;
- :mod:`.manifest`: per-shard part files and records (atomic), the merged output, the
  per-event manifest (done / skipped with the reason) and the summary;
- :mod:`.mpi_runner`: :func:`run_sharded`, serial or MPI (``mpiexec``/``srun``), rank 0 merges;
- :mod:`.ray_runner`: :func:`run_ray`, frame batches in flight with a cap, each fanning out
  its solve units; the same outputs as the MPI path.

Example (any stage's task)::

    from peaknet.parallel import RunOptions, get_comm, run_sharded
    summary = run_sharded(task, RunOptions(out="runs/x", shard_size=200, batch_size=40),
                          get_comm("auto"))

Nothing here imports MPI or Ray until a run asks for them.
"""
from .engine import IncompleteRunError, RunOptions
from .manifest import (DONE, SKIPPED, RowAppender, RunDir, ShardRecord, merge_parts,
                       read_manifest, write_string_dataset)
from .mpi_runner import SerialComm, get_comm, launcher_rank, launcher_size, run_sharded
from .partition import (Event, EventTable, Plan, Shard, assign_shards, event_id, make_shards,
                        parse_event_id)
from .ray_runner import RayOptions, run_ray  # imports Ray only when run_ray is called
from .task import PartWriter, PerEventTask, ShardTask, Skip, process_batch


__all__ = [
    "DONE", "SKIPPED", "Event", "EventTable", "IncompleteRunError", "PartWriter", "Plan",
    "RayOptions", "RowAppender", "RunDir", "RunOptions", "SerialComm", "Shard", "ShardRecord",
    "PerEventTask", "ShardTask", "Skip", "assign_shards", "event_id", "get_comm", "launcher_rank", "launcher_size",
    "make_shards", "merge_parts", "parse_event_id", "process_batch", "read_manifest",
    "run_ray", "run_sharded", "write_string_dataset",
]
