"""The part of a sharded run that every backend shares: plan, resume check, one shard, finish.

:mod:`.mpi_runner` (serial and MPI) and :mod:`.ray_runner` call these; they differ only in who
processes which shard and where ``solve`` runs.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from .manifest import (DONE, SKIPPED, PartBuilder, RunDir, ShardRecord, atomic_write_json,
                       load_record, merge_parts, summarize_records, write_manifest)
from .partition import Plan, Shard
from .task import ShardTask, SolveMap, _local_map, process_batch, read_prepared

log = logging.getLogger("peaknet.parallel")

__all__ = ["RunOptions", "IncompleteRunError", "make_plan", "completed_summary", "split_todo",
           "process_shard", "finalize", "max_rss_mb"]


class IncompleteRunError(RuntimeError):
    """Some shards failed; the parts that were written stay, and a re-run completes the rest."""


@dataclass
class RunOptions:
    """How a sharded run is cut and kept (the stage's ``[run]`` section fills it).

    out: run folder. shard_size: events per shard (one part file each). batch_size: events per
    batch (one Ray frame-batch task; the unit of fit grouping). assignment: shards to ranks
    ``round_robin`` or ``block``. resume: reuse complete shards of the same plan. verify:
    ``digest`` (re-hash parts) or ``size`` when checking them. stop_after_shards: each rank
    (the Ray driver: the run) stops after this many processed shards, without merging (tests,
    or a deliberately partial run). keep_parts: keep ``parts/`` after the merge (re-runs then
    only re-merge). progress: tqdm bar on rank 0. level: gzip level of the parts' datasets.
    """

    out: Path
    shard_size: int = 200
    batch_size: int = 40
    assignment: Literal["round_robin", "block"] = "round_robin"
    resume: bool = True
    verify: Literal["digest", "size"] = "digest"
    stop_after_shards: Optional[int] = None
    keep_parts: bool = True
    progress: bool = True
    level: int = 4


def max_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def make_plan(task: ShardTask, opts: RunOptions, run: RunDir) -> Plan:
    """Plan the run (``task.plan_events``) and write ``NAME.plan.json``. Rank 0 / driver only."""
    t0 = time.perf_counter()
    events, meta = task.plan_events()
    plan = Plan(events, opts.shard_size, opts.batch_size, task.fingerprint(), meta)
    run.makedirs()
    atomic_write_json(run.plan, {**plan.describe(), "stage": task.name})
    log.info("%s: plan %s: %d events in %d files -> %d shards of %d (batches of %d), "
             "%d known bad; planned in %.1f s", task.name, plan.fingerprint, plan.n_events,
             len(events.files), plan.n_shards, plan.shard_size, plan.batch_size,
             len(events.notes), time.perf_counter() - t0)
    return plan


def completed_summary(run: RunDir, plan: Plan) -> Optional[dict]:
    """The stored summary if this plan's output is already complete (merged and intact)."""
    try:
        s = json.loads(run.summary.read_text())
    except (OSError, ValueError):
        return None
    if not (s.get("complete") and s.get("plan") == plan.fingerprint):
        return None
    try:
        if run.output.stat().st_size != s.get("output_size"):
            return None
    except OSError:
        return None
    return s


def split_todo(run: RunDir, plan: Plan, shards: Sequence[Shard], opts: RunOptions,
               who: str = "") -> tuple[list[Shard], list[ShardRecord]]:
    """(shards to process, records of complete shards) among ``shards``."""
    todo, done = [], []
    for s in shards:
        rec, why = load_record(run, s, plan.fingerprint, opts.verify) if opts.resume else (None, "no resume")
        if rec is None:
            if opts.resume and why != "no record":
                log.info("%sshard %d: redo (%s)", who, s.id, why)
            todo.append(s)
        else:
            done.append(rec)
    return todo, done


def process_shard(task: ShardTask, plan: Plan, run: RunDir, shard: Shard, opts: RunOptions,
                  rank: int = 0, on_events: Optional[Callable[[int], None]] = None,
                  solve_map: SolveMap = _local_map) -> ShardRecord:
    """Read, process and write one shard (batch by batch, bounded memory); returns its record."""
    t0 = time.perf_counter()
    builder = PartBuilder(run, plan, shard, task, rank=rank, level=opts.level)
    try:
        for a, b in plan.batches(shard):
            items = list(read_prepared(task, plan.events, a, b, plan.meta))
            for k, res in process_batch(task, items, solve_map, plan.events):
                builder.add(k, res)
            if on_events is not None:
                on_events(b - a)
        return builder.finish(time.perf_counter() - t0)
    except BaseException:
        builder.abort()
        raise


def finalize(task: ShardTask, plan: Plan, run: RunDir, opts: RunOptions, extra: dict) -> dict:
    """After every shard is complete: merge the parts, write the manifest and the summary.
    Rank 0 / driver only. Raises IncompleteRunError if a shard is not complete."""
    t0 = time.perf_counter()
    records: list[ShardRecord] = []
    missing = []
    for s in plan.shards():
        rec, why = load_record(run, s, plan.fingerprint, "size")
        if rec is None:
            missing.append(f"{s.id} ({why})")
        else:
            records.append(rec)
    if missing:
        raise IncompleteRunError(f"{task.name}: {len(missing)} shard(s) not complete: "
                                 f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; "
                                 "run again to complete them")
    parts = [run.parts / r.part for r in records]
    merge_parts(parts, run.output, attrs={"stage": task.name, "plan": plan.fingerprint,
                                         "n_events": plan.n_events})
    write_manifest(run, plan, records)
    agg = summarize_records(records)
    if agg["events"][DONE] + agg["events"][SKIPPED] != plan.n_events:
        raise RuntimeError(f"records account for {sum(agg['events'].values())} events, "
                           f"the plan has {plan.n_events}")
    summary = {
        "stage": task.name,
        "plan": plan.fingerprint,
        "complete": True,
        "n_events": plan.n_events,
        "n_shards": plan.n_shards,
        "events": agg["events"],
        "skipped_by_kind": agg["skipped_by_kind"],
        "skip_examples": agg["skip_examples"],
        **task.summarize(agg["stats"]),
        "output": str(run.output),
        "output_size": run.output.stat().st_size,
        "manifest": str(run.manifest),
        **extra,
        "merge_seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(run.summary, summary)
    if not opts.keep_parts:
        for r in records:
            (run.parts / r.part).unlink(missing_ok=True)
            run.record(r.shard).unlink(missing_ok=True)
    for stray in run.stray_parts(plan.n_shards) + list(run.parts.glob("*.tmp.*")):
        stray.unlink(missing_ok=True)  # parts of an earlier, larger plan; leftovers of killed runs
    log.info("%s: merged %d parts into %s in %.1f s", task.name, len(parts), run.output,
             time.perf_counter() - t0)
    return summary


def rate(n: float, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else 0.0


def hostname() -> str:
    return os.uname().nodename
