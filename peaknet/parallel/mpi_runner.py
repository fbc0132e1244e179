"""Rank-partitioned driver: every rank takes its deterministic shards, rank 0 merges.

    from peaknet.parallel import RunOptions, get_comm, run_sharded
    summary = run_sharded(task, RunOptions(out="runs/label"), get_comm("auto"))

The same code runs as one plain process (``SerialComm``: no MPI needed, nothing imported) and
under ``mpiexec -n N`` or ``srun --mpi=pmi2`` (``mpi4py``, imported only then):

1. rank 0 plans the run (events -> shards) and broadcasts the plan; if this plan's output is
   already complete, every rank returns the stored summary;
2. each rank takes its shards (``i % size == rank``, or contiguous blocks), skips those a
   previous run completed, and processes the others batch by batch: read, process (the
   task's pure functions), write its own part per shard; memory stays bounded by one batch;
3. the ranks compare notes (allgather): if any rank failed, every rank raises
   :class:`~peaknet.parallel.engine.IncompleteRunError` (nobody waits forever at a barrier;
   completed shards are kept for the re-run);
4. rank 0 merges the parts, writes the manifest and the summary, and broadcasts the summary.

Rank 0 shows a tqdm bar of the events of all ranks (the others send counts with non-blocking
sends); every rank logs what it does. Library code never calls ``MPI.Finalize()`` or exits.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any, Optional

from .engine import (IncompleteRunError, RunOptions, completed_summary, finalize, hostname,
                     make_plan, max_rss_mb, process_shard, rate, split_todo)
from .manifest import RunDir, add_counters
from .task import ShardTask

log = logging.getLogger("peaknet.parallel")

__all__ = ["SerialComm", "MPIComm", "get_comm", "launcher_size", "launcher_rank", "run_sharded"]

_PROGRESS_TAG = 7701


class SerialComm:
    """The communicator of a run without MPI: one rank."""

    rank = 0
    size = 1
    name = "serial"

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        pass


class MPIComm:
    """A thin wrapper of an mpi4py communicator (pickle-based collectives only)."""

    name = "mpi"

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()


def launcher_size(environ: Optional[dict] = None) -> int:
    """How many processes the launcher started, from its environment (1 if none is known):
    MPICH/Hydra and srun --mpi=pmi2 set PMI_SIZE, Open MPI OMPI_COMM_WORLD_SIZE, PMIx
    PMIX_SIZE; inside an srun step SLURM_STEP_NUM_TASKS."""
    env = os.environ if environ is None else environ
    sizes = [1]
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        try:
            sizes.append(int(env.get(key, "1")))
        except ValueError:
            pass
    step = env.get("SLURM_STEP_ID", "")
    if step.isdigit():  # a real srun step (the batch script itself is not one)
        try:
            sizes.append(int(env.get("SLURM_STEP_NUM_TASKS", "1")))
        except ValueError:
            pass
    return max(sizes)


def launcher_rank(environ: Optional[dict] = None) -> int:
    """This process's rank as the launcher numbered it (0 if none is known): PMI_RANK (Hydra,
    srun --mpi=pmi2), OMPI_COMM_WORLD_RANK, PMIX_RANK, SLURM_PROCID. Known before MPI starts."""
    env = os.environ if environ is None else environ
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if str(env.get(key, "")).isdigit():
            return int(env[key])
    return 0


def get_comm(kind: str = "auto"):
    """``serial``: one process; ``mpi``: MPI.COMM_WORLD via mpi4py; ``auto``: mpi when a
    launcher started several processes, else serial.

    Raises RuntimeError when the launcher started several processes but the run would not be
    split between them (backend serial, mpi4py missing, or an MPI library that does not match
    the launcher): every process would redo the whole run into the same files.
    """
    n = launcher_size()
    if kind == "auto":
        kind = "mpi" if n > 1 else "serial"
    if kind == "serial":
        if n > 1:
            raise RuntimeError(
                f"{n} processes were launched (mpiexec/srun) but the backend is 'serial': each "
                "would do the whole run; use backend 'mpi' (or 'auto')")
        return SerialComm()
    if kind != "mpi":
        raise ValueError(f"unknown communicator kind {kind!r} (serial, mpi, auto)")
    try:
        comm = MPIComm()
    except ImportError as exc:
        if n > 1:
            raise RuntimeError(f"backend 'mpi' with {n} processes but mpi4py cannot be imported: {exc}") from exc
        log.warning("mpi4py is not available (%s): running as a single serial rank", exc)
        return SerialComm()
    if comm.size == 1 and n > 1:
        raise RuntimeError(
            f"the launcher started {n} processes but MPI sees a world of 1: the launcher and the "
            "MPI library do not match (use the venv's mpiexec, or srun --mpi=pmi2 with PyPI MPICH)")
    return comm


class _Progress:
    """Rank 0: a tqdm bar over the events of all ranks; other ranks: periodic counts to rank 0
    (non-blocking sends, received whenever rank 0 is between batches)."""

    def __init__(self, comm, total: int, enabled: bool, desc: str, every_s: float = 1.0):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.mpi = isinstance(comm, MPIComm)
        self.every_s = every_s
        self.pending = 0
        self.last = time.monotonic()
        self.reqs: list = []
        self.finished_ranks = 0
        self.bar = None
        if self.rank == 0 and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="ev", dynamic_ncols=True,
                            mininterval=0.5 if os.isatty(2) else 10.0)

    def update(self, n: int) -> None:
        if self.rank == 0:
            if self.bar is not None:
                self.bar.update(n)
            self.poll()
            return
        self.pending += n
        if self.mpi and time.monotonic() - self.last >= self.every_s:
            self._send(self.pending)
            self.pending = 0

    def _send(self, n: int) -> None:
        self.reqs.append(self.comm.comm.isend(n, dest=0, tag=_PROGRESS_TAG))
        self.last = time.monotonic()

    def _handle(self, n: int) -> None:
        if n < 0:
            self.finished_ranks += 1
        elif self.bar is not None:
            self.bar.update(n)

    def poll(self) -> None:
        if not self.mpi or self.rank != 0:
            return
        MPI = self.comm.MPI
        while self.comm.comm.iprobe(source=MPI.ANY_SOURCE, tag=_PROGRESS_TAG):
            self._handle(self.comm.comm.recv(source=MPI.ANY_SOURCE, tag=_PROGRESS_TAG))

    def close(self) -> None:
        if self.mpi:
            MPI = self.comm.MPI
            if self.rank != 0:
                if self.pending:
                    self._send(self.pending)
                self._send(-1)
                MPI.Request.Waitall(self.reqs)
            else:
                while self.finished_ranks < self.size - 1:
                    self._handle(self.comm.comm.recv(source=MPI.ANY_SOURCE, tag=_PROGRESS_TAG))
        if self.bar is not None:
            self.bar.close()


def _raise_together(comm, error: Optional[BaseException], what: str):
    """Every rank learns whether any rank failed; all raise together (no rank left waiting)."""
    msgs = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    bad = [(r, m) for r, m in enumerate(msgs) if m]
    if not bad:
        return
    if error is not None:  # the failing rank re-raises its own exception (type and traceback)
        raise error
    text = "; ".join(f"rank {r}: {m}" for r, m in bad[:5])
    raise IncompleteRunError(f"{what} failed on {len(bad)} rank(s): {text}") from error


def run_sharded(task: ShardTask, opts: RunOptions, comm=None, backend: Optional[str] = None) -> dict:
    """Run ``task`` over its events on every rank of ``comm`` (default: :func:`get_comm`);
    see the module docstring. Returns the run summary on every rank."""
    comm = comm if comm is not None else get_comm("auto")
    rank, size = comm.rank, comm.size
    backend = backend or comm.name
    run = RunDir(opts.out, task.name, task.output_name)
    who = f"rank {rank}/{size}: " if size > 1 else ""
    t0 = time.perf_counter()
    log.info("%s%s on %s (pid %d), backend %s", who, task.name, hostname(), os.getpid(), backend)

    # 1. plan (rank 0), broadcast
    err: Optional[BaseException] = None
    payload: Any = None
    if rank == 0:
        try:
            task.setup()
            plan = make_plan(task, opts, run)
            payload = (plan, completed_summary(run, plan) if opts.resume else None)
        except Exception as exc:  # noqa: BLE001 - told to every rank below
            err = exc
    _raise_together(comm, err, f"{task.name}: planning")
    plan, previous = comm.bcast(payload)
    if previous is not None:
        log.info("%s%s: output %s of plan %s is complete; nothing to do", who, task.name,
                 run.output, plan.fingerprint)
        return {**previous, "reused": True}
    if rank != 0:
        try:
            task.setup()
        except Exception as exc:  # noqa: BLE001
            err = exc
    _raise_together(comm, err, f"{task.name}: setup")

    # 2. my shards
    mine = plan.shards_for(rank, size, opts.assignment)
    todo, reused = split_todo(run, plan, mine, opts, who)
    now = todo if opts.stop_after_shards is None else todo[:max(0, opts.stop_after_shards)]
    stopped_early = len(now) < len(todo)
    n_events = sum(len(s) for s in now)
    totals = comm.allgather(n_events)
    log.info("%s%d shard(s) assigned (%s), %d complete from an earlier run, %d to process "
             "(%d events)%s", who, len(mine), opts.assignment, len(reused), len(now), n_events,
             f"; stopping after {len(now)} (stop_after_shards)" if stopped_early else "")

    # 3. process
    progress = _Progress(comm, sum(totals), opts.progress, f"{task.name} ({size} rank{'s' * (size > 1)})")
    stats: dict = {}
    t1, c1 = time.perf_counter(), time.process_time()
    err = None
    try:
        for shard in now:
            rec = process_shard(task, plan, run, shard, opts, rank, on_events=progress.update)
            add_counters(stats, rec.stats)
            log.info("%sshard %d [%d:%d]: %d done, %d skipped in %.1f s", who, shard.id,
                     shard.start, shard.stop, rec.counts["done"], rec.counts["skipped"], rec.seconds)
    except Exception as exc:  # noqa: BLE001 - told to every rank below
        err = exc
        log.error("%s%s failed: %s\n%s", who, task.name, exc, traceback.format_exc())
    finally:
        progress.close()
    seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
    _raise_together(comm, err, f"{task.name}: processing")

    ranks = comm.allgather({"rank": rank, "host": hostname(), "shards": len(now),
                            "events": n_events, "seconds": round(seconds, 2),
                            "cpu_seconds": round(cpu, 2),
                            "max_rss_mb": max_rss_mb(), "stats": stats,
                            "stopped_early": stopped_early})
    run_stats: dict = {}
    for r in ranks:
        add_counters(run_stats, r["stats"])
    wall = time.perf_counter() - t0
    this_run = {
        "backend": backend, "ranks": size, "shards_processed": sum(r["shards"] for r in ranks),
        "events_processed": sum(r["events"] for r in ranks), "seconds": round(wall, 2),
        "process_seconds": round(max(r["seconds"] for r in ranks), 2),
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in ranks), 2),
        "cpu_seconds_per_rank": [r["cpu_seconds"] for r in ranks],
        "max_rss_mb": max(r["max_rss_mb"] for r in ranks),
        "rss_mb_per_rank": [r["max_rss_mb"] for r in ranks],
        "stats": run_stats,
    }
    this_run["events_per_s"] = rate(this_run["events_processed"], this_run["process_seconds"])
    if any(r["stopped_early"] for r in ranks):
        log.info("%s%s: stopped early (stop_after_shards); no merge", who, task.name)
        return {"stage": task.name, "plan": plan.fingerprint, "complete": False,
                "interrupted": True, "n_events": plan.n_events, "n_shards": plan.n_shards,
                "this_run": this_run}

    # 4. rank 0 merges
    summary: Any = None
    err = None
    if rank == 0:
        try:
            summary = finalize(task, plan, run, opts, {"this_run": this_run})
        except Exception as exc:  # noqa: BLE001
            err = exc
    _raise_together(comm, err, f"{task.name}: merge")
    summary = comm.bcast(summary)
    log.info("%s%s: %d events (%s) in %.1f s", who, task.name, summary["n_events"],
             ", ".join(f"{v} {k}" for k, v in summary["events"].items()), wall)
    return summary
