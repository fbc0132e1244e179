"""The legacy coupling: every MPI rank reads its shards, runs the predictor inline and writes its
own CXI files (how LCLS peak finding with psana + MPI has always run).

    mpiexec -n 4 python -m jobs.infer_mpi --config infer.toml
    srun --mpi=pmi2 python -m jobs.infer_mpi --config infer.toml

Rank 0 plans the run (shards, resume) and broadcasts the plan; every rank takes its share with
the same deterministic :func:`~peaknet.infer.sources.partition` as the hybrid pipeline's
producers, reads batches with the same :class:`~peaknet.infer.sources.Source`, predicts with the
same :class:`~peaknet.infer.predictors.Predictor` and writes through the same
:class:`~peaknet.infer.accounting.ShardCollector`: for the same model and data the two pipelines
write the same peak lists. Its weak point, and the reason for the hybrid pipeline: reading,
computing and writing run one after another in each rank, and each rank needs its own model
(one GPU per rank, batches limited to what one rank reads).

Also here: the MPI helpers both pipelines use. :func:`mpi_comm` returns COMM_WORLD only when the
process was started by an MPI launcher with more than one rank (so ``peaknet infer`` on a
laptop never initialises MPI); :func:`quiet_barrier` waits in a sleeping ``Ibarrier`` loop,
because MPICH's blocking collectives spin at 100 % CPU, which would steal the cores of the ranks
and actors still working.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from .accounting import Plan, ShardCollector, finished_shards, make_result, summarize
from .monitor import Monitor, env_threads, peak_rss_mb
from .predictors import build_predictor
from .sources import open_source, partition

log = logging.getLogger(__name__)

__all__ = ["run_legacy", "mpi_comm", "quiet_barrier", "plan_run", "open_planned_source"]

def mpi_comm():
    """``MPI.COMM_WORLD`` (mpi4py) when an MPI launcher started more than one process, else
    None. Uses :func:`peaknet.parallel.get_comm`, which refuses a launcher/library mismatch
    (several processes that each see a world of one would all do the whole run)."""
    from peaknet.parallel import get_comm, launcher_size

    if launcher_size() <= 1:
        return None
    comm = get_comm("auto")
    return getattr(comm, "comm", None)


def quiet_barrier(comm, poll_s: float = 0.05) -> None:
    """A barrier that sleeps while it waits (MPICH's MPI_Barrier busy-polls)."""
    if comm is None:
        return
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll_s)


def plan_run(cfg):
    """Rank 0's planning: the source, the plan (saved in ``run.out``) and the finished shards."""
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.source)
    plan = Plan.make(source, cfg)
    plan.save(out)
    done = finished_shards(out, plan) if cfg.run.resume else set()
    if done:
        log.info("resume: %d of %d shards already finished in %s", len(done), len(plan.shards), out)
    if plan.unreadable:
        log.warning("%d input(s) cannot be read at all (listed in the skipped records)",
                    len(plan.unreadable))
    return source, plan, done


def open_planned_source(cfg, plan: Plan):
    """The source on a rank other than 0: no re-scan of the inputs, the frame shape from the
    plan."""
    return open_source(cfg.source, frame_shape=tuple(plan.source.get("frame_shape", ())))


def _set_threads(cfg) -> int:
    import torch

    n = cfg.run.threads or env_threads(1)
    torch.set_num_threads(n)
    return n


def run_legacy(cfg, comm="auto") -> dict:
    """Run the legacy coupling on this rank; rank 0 returns the run summary, others {}."""
    comm = mpi_comm() if comm == "auto" else comm
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    out = Path(cfg.run.out)
    t_start = time.perf_counter()
    msg: Optional[dict] = None
    if rank == 0:
        try:
            source, plan, done = plan_run(cfg)
            msg = {"plan": plan.to_dict(), "done": sorted(done)}
        except BaseException as exc:
            if comm is not None:  # tell the other ranks instead of leaving them waiting
                quiet_barrier(comm)
                comm.bcast({"error": f"{type(exc).__name__}: {exc}"}, root=0)
            raise
    if comm is not None:
        quiet_barrier(comm)
        msg = comm.bcast(msg, root=0)
        if "error" in msg:
            raise RuntimeError(f"rank 0 failed to plan the run: {msg['error']}")
    if rank != 0:
        plan = Plan.from_dict(msg["plan"])
        done = set(msg["done"])
        source = open_planned_source(cfg, plan)
    todo = [s for s in plan.shards if s.shard_id not in done]
    mine = partition(todo, rank, size)
    threads = _set_threads(cfg)
    predictor = build_predictor(cfg.predictor, source.geometry, source.frame_shape, threads)
    counters = {"computed": 0, "written": 0, "batches": 0, "busy_s": 0.0, "read_s": 0.0,
                "write_s": 0.0, "shards": 0}
    t0 = time.perf_counter()

    def collect() -> dict:
        c = dict(counters)
        c["rank"] = rank
        c["busy_fraction"] = round(c["busy_s"] / max(1e-9, time.perf_counter() - t0), 3)
        return c

    metrics = out / ("infer.metrics.jsonl" if size == 1 else f"infer.metrics.r{rank}.jsonl")
    mon = Monitor(collect, metrics if cfg.run.metrics else None, cfg.run.log_every_s,
                  total=sum(s.n_events for s in mine), progress=cfg.run.progress and rank == 0,
                  label=f"infer-legacy[{rank}]",
                  rate_keys={"computed_fps": "computed", "written_eps": "written"}).start()
    write_frames = cfg.output.write_frames
    try:
        for shard in mine:
            col = ShardCollector(shard, out, plan.fingerprint, cfg.output, source.geometry)
            t_read = time.perf_counter()
            for batch in source.read(shard, cfg.pipeline.batch_size):
                t1 = time.perf_counter()
                counters["read_s"] += t1 - t_read
                peaks = predictor.predict(batch.frames) if batch.n_frames else []
                counters["busy_s"] += time.perf_counter() - t1
                col.add(make_result(batch, peaks, cfg.output.min_peaks,
                                    batch.frames if write_frames else None, f"rank{rank}"))
                counters["computed"] += batch.n_frames
                counters["batches"] += 1
                counters["written"] += batch.n_frames + len(batch.skipped)
                t_read = time.perf_counter()
            t_w = time.perf_counter()
            col.write()
            counters["write_s"] += time.perf_counter() - t_w
            counters["shards"] += 1
    finally:
        final = mon.stop()
    wall = time.perf_counter() - t0
    stats = {"rank": rank, "frames": counters["computed"], "batches": counters["batches"],
             "shards": counters["shards"], "busy_s": round(counters["busy_s"], 3),
             "read_s": round(counters["read_s"], 3), "write_s": round(counters["write_s"], 3),
             "wall_s": round(wall, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
             "frames_per_s": round(counters["computed"] / max(1e-9, wall), 3)}
    log.info("rank %d done: %s", rank, stats)
    if comm is not None:
        quiet_barrier(comm)
        all_stats = comm.gather(stats, root=0)
    else:
        all_stats = [stats]
    if rank != 0:
        return {}
    wall_all = time.perf_counter() - t_start
    frames = sum(s["frames"] for s in all_stats)
    extra = {
        "mode": "legacy", "ranks": size, "predictor": predictor.describe(),
        "wall_s": round(wall_all, 3), "compute_wall_s": round(wall, 3),
        "frames_this_run": frames,
        "frames_per_s": round(frames / max(1e-9, max(s["wall_s"] for s in all_stats)), 3),
        "pipeline_s": round(max(s["wall_s"] for s in all_stats), 3),  # after the model build
        "pipeline_fps": round(frames / max(1e-9, max(s["wall_s"] for s in all_stats)), 3),
        "per_rank": all_stats,
        "final_metrics": final,
    }
    return summarize(out, plan, done, extra)
