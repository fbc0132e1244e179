"""``peaknet simulate`` spread over MPI ranks and Slurm array tasks.

Frame ``i`` depends only on the seed and ``i`` and shard ``k`` holds frames
``k * frames_per_shard ..``, so any process can write any shard alone
(:func:`peaknet.simulate.writer.write_shard`); a shard's files appear (renamed from temporary
files) only when complete. This module only decides who writes which shard and who writes the
run's files (``geometry.geom``, ``manifest.json``, ``summary.json``) at the end. The shards are
identical, dataset for dataset, to those of a single process with the same config.

Ways to run::

    mpiexec -n 8 .venv/bin/python -m jobs.simulate --config sim.toml --run.backend=mpi
    sbatch --ntasks=8 slurm/simulate.sbatch sim.toml               # srun, one rank per task
    sbatch --array=0-7 slurm/simulate.sbatch sim.toml              # 8 independent array tasks
    peaknet simulate --config sim.toml --run.shard_index=3 --run.shard_count=8   # by hand
    peaknet simulate --config sim.toml --run.finalize_only=true    # manifest + summary only

Who writes what:

- the shards are split first between array tasks (``run.shard_index`` / ``run.shard_count``,
  or ``run.array = true``: from ``SLURM_ARRAY_TASK_ID``, ``_MIN``, ``_STEP``, ``_COUNT``):
  shard k goes to task ``k % count``; then between the MPI ranks of a task: its i-th shard to
  rank ``i % size``. Shards already written with the same config are kept (unless
  ``run.overwrite``), so a re-submitted job only writes what is missing;
- after every rank of a task is done (collective: a failure on one rank fails all), rank 0
  checks that every shard of the run is present with this config. If so it writes
  ``geometry.geom``, ``manifest.json`` and ``summary.json`` (each atomically); with array tasks
  the last task to finish finds them all. ``run.finalize_only`` does just that check and the
  writing, and says which shards are missing.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from .config import SimulateConfig

log = logging.getLogger(__name__)

__all__ = ["is_distributed", "array_slot", "my_shards", "run", "finalize"]


def is_distributed(cfg: SimulateConfig) -> bool:
    """True if this process writes only some shards, or only the run's files: MPI (backend
    "mpi", or several launched processes), a shard slot / Slurm array task, finalize_only."""
    from peaknet.parallel import launcher_size

    r = cfg.run
    return bool(r.finalize_only or r.array or r.shard_count is not None or r.backend == "mpi"
                or launcher_size() > 1)


def array_slot(cfg: SimulateConfig, environ: Optional[dict] = None) -> tuple[int, int]:
    """(index, count): this job's slot among the jobs that share the shards."""
    r = cfg.run
    if r.shard_count is not None:
        return int(r.shard_index), int(r.shard_count)
    if not r.array:
        return 0, 1
    env = os.environ if environ is None else environ
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except (KeyError, ValueError) as exc:
        raise RuntimeError(
            "run.array = true but this is not a Slurm array task (SLURM_ARRAY_TASK_ID / "
            f"SLURM_ARRAY_TASK_COUNT: {exc}); submit with sbatch --array=0-N, or give "
            "run.shard_index and run.shard_count") from None
    index = (task - first) // max(step, 1)
    if not 0 <= index < count:
        raise RuntimeError(f"Slurm array task {task} (min {first}, step {step}) is not one of "
                           f"{count} tasks: use a contiguous --array range")
    return index, count


def my_shards(n_shards: int, index: int, count: int, rank: int, size: int) -> list[int]:
    """Shards of array slot ``index`` of ``count``, rank ``rank`` of ``size``."""
    return [k for k in range(index, n_shards, count)][rank::size]


def _atomic_geometry(sim, path: Path) -> None:
    from peaknet.io.geometry import geometry_to_text

    tmp = path.with_name(f"{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    tmp.write_text(geometry_to_text(sim.geom), encoding="utf-8")
    os.replace(tmp, path)


def finalize(cfg: SimulateConfig, sim=None, entries: Optional[dict] = None, *,
             n_generated: int = 0, t0: Optional[float] = None, setup_s: float = 0.0,
             require_all: bool = True, extra: Optional[dict] = None) -> Optional[dict]:
    """Write ``geometry.geom``, ``manifest.json`` and ``summary.json`` if every shard of ``cfg``
    is present (``entries``: {shard: manifest entry} already known, e.g. just written); the
    others are checked on disk. Returns the summary, or None when shards are missing and not
    ``require_all`` (RuntimeError naming them otherwise)."""
    from .generator import Simulator
    from .writer import _shard_is_current, shard_ranges, write_run_files

    t0 = time.perf_counter() if t0 is None else t0
    entries = dict(entries or {})
    ranges = shard_ranges(cfg)
    missing = []
    for k, (start, stop) in enumerate(ranges):
        if k not in entries:
            e = _shard_is_current(cfg, k, start, stop)
            if e is None:
                missing.append(k)
            else:
                entries[k] = e
    if missing:
        msg = (f"{len(missing)} of {len(ranges)} shards are not (yet) written with this config: "
               f"{', '.join(map(str, missing[:20]))}{' ...' if len(missing) > 20 else ''}")
        if require_all:
            raise RuntimeError(f"simulate: {msg} (in {cfg.run.out}); run the jobs that write "
                               "them, with the same config")
        log.info("simulate: %s; the job that writes the last of them writes the manifest", msg)
        return None
    if sim is None:
        t1 = time.perf_counter()
        sim = Simulator(cfg)
        setup_s += time.perf_counter() - t1
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_geometry(sim, out / "geometry.geom")
    summary = write_run_files(cfg, sim, [entries[k] for k in range(len(ranges))], n_generated,
                              time.perf_counter() - t0, setup_s, extra)
    log.info("simulate: all %d shards present; wrote geometry.geom, manifest.json, summary.json "
             "in %s", len(ranges), out)
    return summary


def run(cfg: SimulateConfig) -> dict:
    """Write this process's shards; rank 0 writes the run's files when every shard is present.
    Returns the summary on rank 0 (``{"complete": False, ...}`` when other array tasks still
    have shards to write) and ``{}`` on the other ranks."""
    from peaknet.parallel import get_comm

    from .generator import Simulator
    from .writer import _shard_is_current, shard_ranges, write_shard

    t0 = time.perf_counter()
    cfg.validate()
    r = cfg.run
    out = Path(r.out)
    if r.finalize_only:
        summary = finalize(cfg, require_all=True, t0=t0,
                           extra={"complete": True, "distributed": {"mode": "finalize_only"}})
        return summary or {}
    index, count = array_slot(cfg)
    comm = get_comm(r.backend)
    rank, size = comm.rank, comm.size
    ranges = shard_ranges(cfg)
    mine = my_shards(len(ranges), index, count, rank, size)
    who = (f"array task {index}/{count}" if count > 1 else "") + \
          (f"{', ' if count > 1 else ''}rank {rank}/{size}" if size > 1 else "")
    log.info("simulate %s: %d of %d shards are mine: %s", who, len(mine), len(ranges),
             mine[:20] if len(mine) > 20 else mine)

    entries: dict[int, dict] = {}
    n_generated, err, setup_s = 0, None, 0.0
    sim = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        todo = []
        for k in mine:
            start, stop = ranges[k]
            e = None if r.overwrite else _shard_is_current(cfg, k, start, stop)
            if e is None:
                todo.append(k)
            else:
                entries[k] = e
        if len(todo) < len(mine):
            log.info("simulate %s: %d shard(s) already written with this config; kept", who,
                     len(mine) - len(todo))
        if todo or rank == 0:  # rank 0 needs the simulator for the run's files
            t1 = time.perf_counter()
            sim = Simulator(cfg)
            setup_s = time.perf_counter() - t1
        bar = None
        if r.progress and rank == 0 and todo:
            from tqdm import tqdm

            bar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), unit="frame",
                       desc=f"simulate{' ' + who if who else ''}", dynamic_ncols=True)
        try:
            for k in todo:
                entries[k] = write_shard(cfg, k, sim, bar)
                n_generated += ranges[k][1] - ranges[k][0]
                log.info("simulate %s: shard %d written (frames %d..%d)", who, k, *ranges[k])
        finally:
            if bar is not None:
                bar.close()
    except Exception as exc:  # noqa: BLE001 - told to every rank below
        err = exc
        log.error("simulate %s failed: %s", who, exc)
    gathered = comm.allgather((None if err is None else f"{type(err).__name__}: {err}",
                               entries, n_generated, round(time.perf_counter() - t0, 2)))
    bad = [(i, g[0]) for i, g in enumerate(gathered) if g[0]]
    if bad:
        if err is not None:
            raise err
        raise RuntimeError("simulate failed on rank(s) " + "; ".join(f"{i}: {m}" for i, m in bad))
    summary: Optional[dict] = None
    err = None
    if rank == 0:
        try:
            known = {k: e for g in gathered for k, e in g[1].items()}
            extra = {"distributed": {"mode": "array" if count > 1 else ("mpi" if size > 1 else "serial"),
                                     "array_index": index, "array_count": count, "ranks": size,
                                     "seconds_per_rank": [g[3] for g in gathered]}}
            summary = finalize(cfg, sim, known, n_generated=sum(g[2] for g in gathered), t0=t0,
                               setup_s=setup_s, require_all=count == 1,
                               extra={"complete": True, **extra})
            if summary is None:
                summary = {"stage": "simulate", "out": str(out), "complete": False,
                           "frames_generated": sum(g[2] for g in gathered), **extra}
        except Exception as exc:  # noqa: BLE001
            err = exc
    msgs = comm.allgather(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if msgs[0]:
        raise RuntimeError(f"simulate: rank 0 could not write the run's files: {msgs[0]}")
    return summary if rank == 0 else {}
