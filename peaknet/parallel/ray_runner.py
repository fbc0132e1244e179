"""Ray backend: two-level elastic scheduling of frame batches and their fit chunks.

The driver plans the run exactly as the MPI path does (same shards, same batches), puts the task
(config, pixel mask) and the event table into the object store once (``ray.put``), and keeps at
most ``max_in_flight`` *frame-batch* tasks running (``ray.wait``, never ``ray.get`` in a loop).
Each frame-batch task reads its frames itself (workers share the file system), prepares them,
and fans its *solve* units (chunks of peak windows for the labels) out as further Ray tasks:
it solves the first chunk itself and gathers the others with one ``ray.get``. Results come back
small (tables and compressed label chunks), and the driver writes them, shard by shard and in
event order, into the same part files, records and merged output as the MPI path. Because
batches and chunks are the same, so are the outputs, byte for byte in every dataset.

Elastic: Ray places tasks on whatever nodes join the cluster; a task lost with its worker is
retried (``max_retries``); a batch that still fails makes its shard incomplete (logged; the
others go on; a re-run redoes it).

    from peaknet.parallel import RayOptions, RunOptions, run_ray
    run_ray(task, RunOptions(out="runs/label"), RayOptions(address="127.0.0.1:6379"))

Without ``address`` a private local Ray is started on 127.0.0.1 (and stopped at the end);
inside an initialised Ray session that session is used.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from .engine import (IncompleteRunError, RunOptions, completed_summary, finalize, hostname,
                     make_plan, max_rss_mb, rate, split_todo)
from .manifest import PartBuilder, RunDir, add_counters
from .task import ShardTask, process_batch, read_prepared

log = logging.getLogger("peaknet.parallel")

__all__ = ["RayOptions", "run_ray"]


@dataclass
class RayOptions:
    """address: a running cluster ("127.0.0.1:6379", "auto"); None starts a private local Ray
    on 127.0.0.1 with ``num_cpus`` CPUs (and ``temp_dir``). max_in_flight: frame-batch tasks
    in flight (the paper: 80), capped at ``in_flight_per_cpu`` x the cluster's CPUs so that a
    small machine does not start dozens of workers. batch_cpus / solve_cpus: CPUs reserved by
    a frame-batch task / a solve task. max_retries: retries of a task whose worker died."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    temp_dir: Optional[str] = None
    namespace: str = "peaknet"
    max_in_flight: int = 80
    in_flight_per_cpu: float = 2.0
    batch_cpus: float = 1.0
    solve_cpus: float = 1.0
    max_retries: int = 3


# ------------------------------------------------------------------------------ remote side
def _solve_chunk(task: ShardTask, sub: Any) -> Any:
    task.setup()
    return task.solve(sub)


_SOLVE_REMOTE: dict = {}


def _solve_remote(ray, cpus: float, retries: int):
    key = (cpus, retries)
    if key not in _SOLVE_REMOTE:
        _SOLVE_REMOTE[key] = ray.remote(num_cpus=cpus, max_retries=retries)(_solve_chunk)
    return _SOLVE_REMOTE[key]


def _frame_batch(boxes: list, start: int, stop: int, meta: dict, solve_cpus: float,
                 retries: int) -> list:
    """One frame batch: read + prepare its events, fan the solve units out, combine.
    ``boxes`` = [task ref, events ref] (a list, so that the refs themselves arrive here and can
    be handed on to the solve tasks without copying the task again)."""
    import ray

    task_ref, events_ref = boxes
    task, events = ray.get([task_ref, events_ref])
    task.setup()
    items = list(read_prepared(task, events, start, stop, meta))
    remote = _solve_remote(ray, solve_cpus, retries)

    def solve_map(fn, subs):
        if len(subs) <= 1:
            return [fn(s) for s in subs]
        refs = [remote.remote(task_ref, s) for s in subs[1:]]
        first = fn(subs[0])  # this task holds a CPU: use it for one chunk
        return [first] + ray.get(refs)

    return process_batch(task, items, solve_map, events)


# ------------------------------------------------------------------------------ driver side
def _connect(ray, ropts: RayOptions) -> bool:
    """Connect (or start a local Ray); True if this call started the session."""
    if ray.is_initialized():
        return False
    kw: dict = {"namespace": ropts.namespace, "log_to_driver": True}
    if ropts.address:
        ray.init(address=ropts.address, **kw)
    else:
        ray.init(num_cpus=ropts.num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", _temp_dir=ropts.temp_dir, **kw)
    return True


class _ShardSink:
    """Driver-side writer of one shard: results arrive per batch, in any order; they are
    written in event order."""

    def __init__(self, run: RunDir, plan, shard, task, opts: RunOptions):
        self.shard = shard
        self.n_batches = len(plan.batches(shard))
        self.next = 0
        self.waiting: dict[int, list] = {}
        self.t0 = time.perf_counter()
        self.builder = PartBuilder(run, plan, shard, task, rank=0, level=opts.level)

    def put(self, bi: int, results: list) -> int:
        """Store batch ``bi``; write every batch now in order; return events written."""
        self.waiting[bi] = results
        n = 0
        while self.next in self.waiting:
            for k, res in self.waiting.pop(self.next):
                self.builder.add(k, res)
                n += 1
            self.next += 1
        return n

    @property
    def complete(self) -> bool:
        return self.next == self.n_batches


def run_ray(task: ShardTask, opts: RunOptions, ropts: Optional[RayOptions] = None) -> dict:
    """Run ``task`` on Ray; same plan, parts, manifest and output as :func:`run_sharded`."""
    import ray

    ropts = ropts or RayOptions()
    run = RunDir(opts.out, task.name, task.output_name)
    t0 = time.perf_counter()
    task.setup()
    plan = make_plan(task, opts, run)
    previous = completed_summary(run, plan) if opts.resume else None
    if previous is not None:
        log.info("%s: output %s of plan %s is complete; nothing to do", task.name, run.output,
                 plan.fingerprint)
        return {**previous, "reused": True}
    todo, reused = split_todo(run, plan, plan.shards(), opts)
    now = todo if opts.stop_after_shards is None else todo[:max(0, opts.stop_after_shards)]
    stopped_early = len(now) < len(todo)

    started = _connect(ray, ropts)
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        cap = max(1, min(ropts.max_in_flight, int(ropts.in_flight_per_cpu * cpus)))
        if cap < ropts.max_in_flight:
            log.info("ray: max_in_flight %d capped to %d (%.1f x %.0f CPUs)", ropts.max_in_flight,
                     cap, ropts.in_flight_per_cpu, cpus)
        log.info("ray %s: %.0f CPUs; %d shards complete from an earlier run, %d to process "
                 "(%d events), %d frame batches in flight at most", ray.__version__, cpus,
                 len(reused), len(now), sum(len(s) for s in now), cap)
        summary_extra, failed = _drive(ray, task, plan, run, opts, ropts, now, cap)
    finally:
        if started:
            ray.shutdown()
    if failed:
        raise IncompleteRunError(f"{task.name}: {len(failed)} shard(s) failed under Ray: " +
                                 "; ".join(f"{i}: {m}" for i, m in list(failed.items())[:5]) +
                                 "; run again to complete them")
    wall = time.perf_counter() - t0
    this_run = {"backend": "ray", "ranks": 1, "ray_cpus": cpus, "max_in_flight": cap,
                "seconds": round(wall, 2), "max_rss_mb": max_rss_mb(), "driver": hostname(),
                **summary_extra}
    this_run["events_per_s"] = rate(this_run["events_processed"], this_run["process_seconds"])
    if stopped_early:
        log.info("%s: stopped early (stop_after_shards); no merge", task.name)
        return {"stage": task.name, "plan": plan.fingerprint, "complete": False,
                "interrupted": True, "n_events": plan.n_events, "n_shards": plan.n_shards,
                "this_run": this_run}
    return finalize(task, plan, run, opts, {"this_run": this_run})


def _drive(ray, task, plan, run, opts, ropts, shards, cap) -> tuple[dict, dict]:
    batch_remote = ray.remote(num_cpus=ropts.batch_cpus, max_retries=ropts.max_retries)(_frame_batch)
    boxes = [ray.put(task), ray.put(plan.events)]  # once; every batch task gets the refs
    queue = deque((s, bi, a, b) for s in shards for bi, (a, b) in enumerate(plan.batches(s)))
    sinks: dict[int, _ShardSink] = {}
    inflight: dict = {}
    failed: dict[int, str] = {}
    stats: dict = {}
    n_events = 0
    n_shards = 0
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s) for s in shards), desc=f"{task.name} (ray)", unit="ev",
                   dynamic_ncols=True, mininterval=0.5 if os.isatty(2) else 10.0)
    t1 = time.perf_counter()

    def buffered() -> int:
        return sum(len(s.waiting) for s in sinks.values())

    def fail(shard_id: int, msg: str) -> None:
        failed[shard_id] = msg
        sink = sinks.pop(shard_id, None)
        if sink is not None:
            sink.builder.abort()
        log.error("%s: shard %d failed: %s", task.name, shard_id, msg)

    try:
        while queue or inflight:
            while queue and len(inflight) < cap and buffered() < cap:
                s, bi, a, b = queue.popleft()
                if s.id in failed:
                    continue
                ref = batch_remote.remote(boxes, a, b, plan.meta, ropts.solve_cpus, ropts.max_retries)
                inflight[ref] = (s, bi)
            if not inflight:
                continue
            pending = list(inflight)
            ready, rest = ray.wait(pending, num_returns=1)
            if rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            try:
                values = ray.get(ready)
            except Exception:  # noqa: BLE001 - find which batch failed (rare path)
                values = []
                for ref in ready:
                    try:
                        values.append(ray.get(ref))
                    except Exception as exc:  # noqa: BLE001
                        values.append(exc)
            for ref, value in zip(ready, values):
                s, bi = inflight.pop(ref)
                if s.id in failed:
                    continue
                if isinstance(value, Exception):
                    fail(s.id, f"{type(value).__name__}: {value}")
                    continue
                try:
                    sink = sinks.get(s.id)
                    if sink is None:
                        sink = sinks[s.id] = _ShardSink(run, plan, s, task, opts)
                    n = sink.put(bi, value)
                    if bar is not None:
                        bar.update(n)
                    if sink.complete:
                        rec = sink.builder.finish(time.perf_counter() - sink.t0)
                        del sinks[s.id]
                        add_counters(stats, rec.stats)
                        n_events += len(s)
                        n_shards += 1
                        log.info("shard %d [%d:%d]: %d done, %d skipped", s.id, s.start, s.stop,
                                 rec.counts["done"], rec.counts["skipped"])
                except Exception as exc:  # noqa: BLE001 - a write error fails this shard only
                    fail(s.id, f"{type(exc).__name__}: {exc}")
    finally:
        for sink in sinks.values():
            sink.builder.abort()
        if bar is not None:
            bar.close()
    extra = {"shards_processed": n_shards, "events_processed": n_events,
             "process_seconds": round(time.perf_counter() - t1, 2), "stats": stats}
    return extra, failed
