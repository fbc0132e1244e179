"""The hybrid inference pipeline: MPI producers -> Ray queue -> inference actors -> Ray queues ->
writer actors (the paper's design, section 2.2.3.2, without its weak points).

::

    MPI rank 0..P-1            input queue              G inference actors        W writers
    read shard, batch  --put-->  [bounded, frames]  --get-->  prefetch thread:      [queue w]
    ray.put(frames)              blocks producers           ray.get + H2D copy   --> CXI file
    (rank 0 also drives)         when full                  main: model, decode      per shard
                                 records who holds          async put of results     + record
                                 which batch

How the paper's weak points are addressed (section 3.4: "the sequential execution of inference
pipeline stages (loading data to GPUs, model inference, and load results to the second queue)",
transfer and batching overheads):

- **Overlap.** Inside an actor a prefetch thread takes the next batch from the queue, maps it
  from the object store and starts its host-to-device copy (pinned memory, ``non_blocking``,
  side CUDA stream) while the main thread computes the current one; the result of a batch is
  put on the writer's queue asynchronously and only waited for after the next batch has been
  computed. Loading, computing and storing overlap instead of alternating.
- **Transfers.** A producer ``ray.put``\\ s each batch once; the queue carries only a small
  descriptor with the object reference (Ray's advice: put large arrays once, pass references).
  On a node, the actor reads the frames zero-copy from shared memory.
- **No polling.** The queues are asyncio actors: a producer's ``put`` on a full queue and an
  actor's ``get`` on an empty one wait on a condition inside the queue actor (with timeouts
  only to notice an aborted run); nobody spins. MPI ranks that wait use a sleeping barrier.
- **Backpressure.** The input queue's capacity is counted in frames (default 3200, the
  paper's), the writer queues' in batches; a full queue blocks whoever puts.

Fault tolerance (nothing lost, nothing doubled):

- The queue records which consumer holds which batch (:class:`TrackedQueue`, unlike
  ``ray.util.queue.Queue``, which cannot know). An inference actor acknowledges a batch only
  after its result sits in the writer's queue. When an actor dies, Ray restarts it
  (``max_restarts``) and retries its ``run`` (``max_task_retries=-1``); the new incarnation's
  constructor hands the batches its predecessor held back to the queue (front of the line), so
  they are redone. If an actor cannot be restarted, the driver requeues its batches.
- Writers acknowledge a shard's results only once the shard's CXI file and record are on disk;
  a restarted writer gets its unfinished shards' results back and rewrites them. Shards its
  predecessor finished are recognised from their records.
- A batch redone after a crash between "result put" and "acknowledge" reaches the writer twice;
  the writer keeps the first (batch ids) and counts the duplicate.
- Producers keep their batches' object references until the queue reports them acknowledged
  (returned by ``put``/``drain``), so a batch can be redone while its producer lives, and
  memory stays bounded.
- A whole-job crash leaves finished shards (records) behind; the re-run resumes from them.

Entry points: :func:`run_hybrid` (``peaknet infer``, ``jobs/infer.py``). Under ``mpiexec -n P``
or ``srun`` every rank is a producer and rank 0 also drives: it plans the run, connects to Ray
(explicit address, or a private loopback Ray), creates the named queues and actors in a fresh
namespace, broadcasts address and namespace, then produces its own share. Outside MPI the
driver runs ``pipeline.producers`` producer threads.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .accounting import Plan, ShardCollector, finished_shards, make_result, summarize
from .legacy import mpi_comm, open_planned_source, plan_run, quiet_barrier
from .monitor import Monitor, gpu_stats, peak_rss_mb
from .sources import Shard, partition

log = logging.getLogger(__name__)

__all__ = [
    "run_hybrid",
    "TrackedQueue",
    "InferenceActor",
    "WriterActor",
    "BatchDesc",
    "produce",
    "connect_ray",
    "remote_classes",
    "PipelineAborted",
    "CLOSED",
]

#: what ``TrackedQueue.get`` returns once the queue is closed, empty and nobody else holds items
CLOSED = "__peaknet_queue_closed__"
INPUT_QUEUE = "infer-input"
_GET_TIMEOUT_S = 5.0
_PUT_TIMEOUT_S = 30.0


class PipelineAborted(RuntimeError):
    """The run was aborted (an actor failed for good, or nothing moved for too long)."""


def _ray():
    import ray

    return ray


def _is_loopback(address: Optional[str]) -> bool:
    if not address:
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in ("localhost", "") or host.startswith("127.")


def connect_ray(ray_cfg, namespace: Optional[str] = None, num_cpus: Optional[int] = None,
                log_to_driver: bool = True) -> bool:
    """Connect this process to Ray; returns True if this call initialised Ray (the caller then
    shuts it down). An already initialised Ray is used as it is.

    With ``ray_cfg.address`` the head is reached at that explicit address; without one a
    private loopback Ray is started (``num_cpus`` at least the run's needs). For loopback heads
    Ray's "cluster" node-IP lookup is switched off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), or
    the driver would use the machine's eth0 address and never reach the head.
    """
    if _is_loopback(ray_cfg.address):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = _ray()
    if ray.is_initialized():
        return False
    if _is_loopback(ray_cfg.address):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, namespace=namespace, log_to_driver=log_to_driver,
                 configure_logging=False)
    else:
        # A private loopback Ray: Ray 2.5x+ would otherwise turn token authentication on and
        # write ~/.ray/auth_token, after which every `ray start` by this user (other jobs'
        # heads) requires a token their clients do not send. Loopback-only, so no network
        # exposure; set RAY_AUTH_MODE=token yourself to keep authentication.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kw: dict = dict(num_cpus=num_cpus, include_dashboard=False, namespace=namespace,
                        configure_logging=False, _node_ip_address="127.0.0.1")
        if ray_cfg.object_store_memory:
            kw["object_store_memory"] = int(ray_cfg.object_store_memory)
        if ray_cfg.temp_dir:
            kw["_temp_dir"] = str(ray_cfg.temp_dir)
        ray.init(**kw)
    return True


# --------------------------------------------------------------------------------------------
# the queue
# --------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    key: str
    item: Any
    weight: int
    producer: Optional[int]


class TrackedQueue:
    """A bounded queue that knows which consumer holds which item; run as a Ray async actor
    (``remote_classes()["queue"]``).

    Like ``ray.util.queue.Queue`` (an asyncio queue inside an actor: whoever waits, waits on a
    condition, not in a loop), plus what fault tolerance needs: ``get`` records the item as
    held by the named consumer until ``ack``; ``requeue(consumer)`` puts a dead consumer's
    items back at the front. Capacity is in weight units (frames for the input queue): ``put``
    waits while the queue holds items and the new one would exceed it. Producers learn which of
    their items were acknowledged (``put``/``drain`` return them) so they can release their
    object references. ``get`` returns :data:`CLOSED` once all producers are done (or
    ``close`` was called), the queue is empty and no other consumer holds items.
    """

    def __init__(self, capacity: int, n_producers: int = 0, name: str = ""):
        self.capacity = int(capacity)
        self.n_producers = int(n_producers)
        self.name = name
        self.items: collections.deque = collections.deque()
        self.front: collections.deque = collections.deque()  # requeued: served first
        self.size = 0  # weight of self.items
        self.inflight: dict[str, dict[str, list]] = {}
        self.outstanding: dict[int, set] = collections.defaultdict(set)
        self.acked_for: dict[int, list] = collections.defaultdict(list)
        self.producers_done: set = set()
        self.closed = False
        self.aborted: Optional[str] = None
        self.cond: Optional[asyncio.Condition] = None
        self.n = collections.Counter()
        self.max_depth = 0
        self.t0 = time.time()

    def _c(self) -> asyncio.Condition:
        if self.cond is None:
            self.cond = asyncio.Condition()
        return self.cond

    async def _wait(self, pred, timeout: Optional[float]) -> bool:
        cond = self._c()
        try:
            await asyncio.wait_for(cond.wait_for(pred), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _others_hold(self, consumer: str) -> bool:
        return any(v for c, v in self.inflight.items() if c != consumer)

    def _finished_for(self, consumer: str) -> bool:
        return (self.closed and not self.items and not self.front
                and not self._others_hold(consumer))

    # --- producers ------------------------------------------------------------------------
    async def put(self, item, key: str, weight: int = 1, producer: Optional[int] = None,
                  timeout: Optional[float] = None) -> dict:
        """Append ``item``; wait while the queue is full (it accepts anything when empty).
        Returns ``{"ok", "acked", "aborted"}``: acked = keys of this producer's items
        acknowledged since its last call (it can drop their object references)."""
        cond = self._c()
        t0 = time.perf_counter()
        async with cond:
            ok = await self._wait(
                lambda: self.aborted is not None or self.size == 0
                or self.size + weight <= self.capacity, timeout)
            self.n["put_wait_ms"] += int(1000 * (time.perf_counter() - t0))
            if self.aborted is not None:
                return {"ok": False, "acked": [], "aborted": self.aborted}
            if not ok:
                return {"ok": False, "acked": [], "aborted": None}
            self.items.append(_Entry(key, item, int(weight), producer))
            self.size += int(weight)
            self.max_depth = max(self.max_depth, self.size)
            self.n["put"] += 1
            self.n["put_weight"] += int(weight)
            if producer is not None:
                self.outstanding[producer].add(key)
            cond.notify_all()
            acked = self.acked_for.pop(producer, []) if producer is not None else []
        return {"ok": True, "acked": acked, "aborted": None}

    async def producer_done(self, producer: int) -> None:
        """Producer ``producer`` will put nothing more; the queue closes when all have said so."""
        cond = self._c()
        async with cond:
            self.producers_done.add(producer)
            if self.n_producers and len(self.producers_done) >= self.n_producers:
                self.closed = True
            cond.notify_all()

    async def drain(self, producer: int, timeout: Optional[float] = None) -> dict:
        """Wait until every item of ``producer`` is acknowledged (or ``timeout``); returns
        ``{"done", "acked", "aborted"}``."""
        cond = self._c()
        async with cond:
            done = await self._wait(lambda: self.aborted is not None
                                    or not self.outstanding.get(producer), timeout)
            acked = self.acked_for.pop(producer, [])
            return {"done": done and self.aborted is None, "acked": acked,
                    "aborted": self.aborted}

    # --- consumers ------------------------------------------------------------------------
    async def get(self, consumer: str, timeout: Optional[float] = None):
        """The next item for ``consumer`` (recorded as held by it), None after ``timeout``,
        or :data:`CLOSED` when the queue is closed, empty and no other consumer holds items
        (one could still die and give them back)."""
        cond = self._c()
        t0 = time.perf_counter()
        async with cond:
            ok = await self._wait(lambda: self.aborted is not None or bool(self.front)
                                  or bool(self.items) or self._finished_for(consumer), timeout)
            self.n["get_wait_ms"] += int(1000 * (time.perf_counter() - t0))
            if self.aborted is not None:
                return CLOSED
            if not ok:
                return None
            if self.front:
                e = self.front.popleft()
            elif self.items:
                e = self.items.popleft()
                self.size -= e.weight
            else:
                return CLOSED
            self.inflight.setdefault(consumer, {}).setdefault(e.key, []).append(e)
            self.n["got"] += 1
            cond.notify_all()
            return e.item

    async def ack(self, consumer: str, keys) -> int:
        """``consumer`` is done with one delivery of each of ``keys`` (a key or a list): it
        leaves the queue for good. A consumer that got the same key twice (a batch redone after
        a crash) holds two deliveries and acknowledges them one at a time, so dropping the
        duplicate never releases the copy it still needs."""
        cond = self._c()
        keys = [keys] if isinstance(keys, str) else list(keys)
        n = 0
        async with cond:
            held = self.inflight.get(consumer, {})
            for key in keys:
                entries = held.get(key)
                if not entries:
                    continue
                e = entries.pop()
                if not entries:
                    del held[key]
                n += 1
                prod = e.producer
                if (prod is not None and key not in held
                        and key in self.outstanding.get(prod, ())):
                    self.outstanding[prod].discard(key)
                    self.acked_for[prod].append(key)
            self.n["acked"] += n
            cond.notify_all()
        return n

    async def requeue(self, consumer: str) -> int:
        """Give back everything ``consumer`` holds (it died): first in line, in order (one
        copy per key)."""
        cond = self._c()
        async with cond:
            held = self.inflight.pop(consumer, {})
            entries = [es[0] for es in held.values()]
            for e in entries:
                self.front.append(e)
            self.n["requeued"] += len(entries)
            if entries:
                self.n["requeue_events"] += 1
            cond.notify_all()
        return len(entries)

    async def close(self) -> None:
        cond = self._c()
        async with cond:
            self.closed = True
            cond.notify_all()

    async def abort(self, reason: str) -> None:
        """Fail the run: every waiting put/get/drain returns at once."""
        cond = self._c()
        async with cond:
            if self.aborted is None:
                self.aborted = str(reason)
            cond.notify_all()

    async def stats(self) -> dict:
        held = sum(len(v) for v in self.inflight.values())
        return {"name": self.name, "capacity": self.capacity, "depth_frames": self.size,
                "depth_batches": len(self.items) + len(self.front), "inflight": held,
                "inflight_by": {c: len(v) for c, v in self.inflight.items() if v},
                "put": self.n["put"], "put_frames": self.n["put_weight"], "got": self.n["got"],
                "acked": self.n["acked"], "requeued": self.n["requeued"],
                "requeue_events": self.n["requeue_events"], "max_depth": self.max_depth,
                "put_wait_s": self.n["put_wait_ms"] / 1000, "get_wait_s": self.n["get_wait_ms"] / 1000,
                "closed": self.closed, "aborted": self.aborted,
                "producers_done": len(self.producers_done)}


# --------------------------------------------------------------------------------------------
# what flows through the input queue
# --------------------------------------------------------------------------------------------
@dataclass
class BatchDesc:
    """A batch as queued: metadata plus the object reference of its frames (None when every
    event of the batch was skipped by the producer)."""

    batch_id: str
    shard_id: str
    positions: np.ndarray
    skipped: list
    n_frames: int
    frames_ref: Any
    writer: int
    producer: int


# --------------------------------------------------------------------------------------------
# the actors
# --------------------------------------------------------------------------------------------
def _was_restarted() -> bool:
    """True in an actor that Ray restarted after its process died."""
    import warnings

    with warnings.catch_warnings():  # Ray's own property uses a deprecated call inside
        warnings.simplefilter("ignore")
        return bool(getattr(_ray().get_runtime_context(), "was_current_actor_reconstructed",
                            False))


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class InferenceActor:
    """Runs the predictor on batches from the input queue; a Ray actor
    (``remote_classes()["infer"]``, one GPU each on GPU clusters).

    ``run()``: a prefetch thread gets the next batch (recorded as held by this actor), reads its
    frames from the object store and stages them on the device; the main thread predicts, puts
    the result on the shard's writer queue and acknowledges the input batch once the previous
    result put has been accepted. The constructor gives back to the queue whatever a previous
    incarnation of the same actor held (Ray restarted it after a crash).
    """

    def __init__(self, name: str, in_queue, out_queues: list, spec: dict, threads: int = 1,
                 prefetch: int = 1):
        _setup_logging()
        import torch

        ray = _ray()
        self.name = name
        self.in_queue = in_queue
        self.out_queues = out_queues
        self.output = spec["output"]
        self.prefetch = max(1, int(prefetch))
        torch.set_num_threads(max(1, int(threads)))
        self.restarted = _was_restarted()
        # whatever a previous incarnation of this actor held goes back to the queue
        self.requeued_at_start = ray.get(in_queue.requeue.remote(name))
        if self.requeued_at_start or self.restarted:
            log.warning("%s restarted: %d batch(es) of its predecessor requeued",
                        name, self.requeued_at_start)
        from .predictors import build_predictor

        self.predictor = build_predictor(spec["predictor"], spec["geometry"],
                                         tuple(spec["frame_shape"]), threads,
                                         pinned_slots=self.prefetch + 2)
        self._stage = getattr(self.predictor, "stage", None)
        self.c = collections.Counter()
        self.t_run = None
        self.started_at = None  # epoch seconds when run() began (after the model was built)
        self.busy_s = 0.0
        self.wait_s = 0.0

    def info(self) -> dict:
        import socket

        return {"name": self.name, "pid": os.getpid(), "node": socket.gethostname(),
                "restarted": self.restarted, "predictor": self.predictor.describe()}

    def stats(self) -> dict:
        wall = time.perf_counter() - self.t_run if self.t_run else 0.0
        out = {"name": self.name, "pid": os.getpid(), "frames": self.c["frames"],
               "batches": self.c["batches"], "busy_s": round(self.busy_s, 3),
               "wait_s": round(self.wait_s, 3), "wall_s": round(wall, 3),
               "busy_fraction": round(self.busy_s / wall, 3) if wall > 0 else 0.0,
               "restarted": self.restarted, "requeued_at_start": self.requeued_at_start,
               "started_at": self.started_at, "rss_mb": round(peak_rss_mb(), 1)}
        out.update(gpu_stats())
        return out

    def _fetch(self, local, slots: threading.Semaphore, stop: threading.Event) -> None:
        """Prefetch thread: next batch from the queue, frames from the object store, start
        the device copy; hand over through ``local``. A batch is fetched only when one of the
        ``prefetch`` slots is free (the main thread frees one when it takes a batch)."""
        ray = _ray()
        try:
            while not stop.is_set():
                if not slots.acquire(timeout=_GET_TIMEOUT_S):
                    continue
                item = ray.get(self.in_queue.get.remote(self.name, _GET_TIMEOUT_S))
                if item is None:
                    slots.release()
                    continue
                if isinstance(item, str) and item == CLOSED:
                    local.put(CLOSED)
                    return
                if item.n_frames:
                    frames = ray.get(item.frames_ref)
                    if not frames.flags.writeable:
                        frames = np.array(frames)  # zero-copy view is read-only
                    staged = self._stage(frames) if self._stage is not None else frames
                else:
                    frames, staged = None, None
                local.put((item, frames, staged))
        except BaseException as exc:  # noqa: BLE001 - hand the failure to the main thread
            local.put(exc)

    def _acknowledge(self, acks, puts: threading.Semaphore) -> None:
        """Ack thread: once a result is accepted by its writer queue, the input batch it came
        from is acknowledged (and leaves the input queue's books). Runs apart from the main
        loop so that no batch stays unacknowledged while this actor waits for more work (two
        actors would otherwise wait for each other at the end of the run)."""
        ray = _ray()
        while True:
            x = acks.get()
            if x is None:
                return
            ref, batch_id = x
            try:
                ray.get(ref)
                ray.get(self.in_queue.ack.remote(self.name, batch_id))
            finally:
                puts.release()

    def run(self) -> dict:
        """Process batches until the input queue is closed and drained; returns stats."""
        import queue as pyqueue

        self.t_run = time.perf_counter()
        self.started_at = time.time()
        local: pyqueue.Queue = pyqueue.Queue()
        slots = threading.Semaphore(self.prefetch)
        puts = threading.Semaphore(2)  # results on their way to a writer queue (backpressure)
        acks: pyqueue.Queue = pyqueue.Queue()
        stop = threading.Event()
        fetcher = threading.Thread(target=self._fetch, args=(local, slots, stop), daemon=True,
                                   name=f"{self.name}-prefetch")
        acker = threading.Thread(target=self._acknowledge, args=(acks, puts), daemon=True,
                                 name=f"{self.name}-ack")
        fetcher.start()
        acker.start()
        try:
            while True:
                t0 = time.perf_counter()
                x = local.get()
                self.wait_s += time.perf_counter() - t0
                if isinstance(x, str) and x == CLOSED:
                    break
                if isinstance(x, BaseException):
                    raise x
                slots.release()  # the fetcher may get the next batch while this one computes
                item, frames, staged = x
                t1 = time.perf_counter()
                if item.n_frames:
                    if self._stage is not None:
                        peaks = self.predictor.predict_staged(staged)
                    else:
                        peaks = self.predictor.predict(staged)
                else:
                    peaks = []
                self.busy_s += time.perf_counter() - t1
                res = make_result(item, peaks, self.output.min_peaks,
                                  frames if self.output.write_frames else None, self.name)
                t2 = time.perf_counter()
                puts.acquire()
                self.wait_s += time.perf_counter() - t2
                ref = self.out_queues[item.writer].put.remote(res, res.batch_id, 1, None, None)
                acks.put((ref, item.batch_id))
                self.c["frames"] += item.n_frames
                self.c["batches"] += 1
        finally:
            stop.set()
            acks.put(None)
        acker.join()
        fetcher.join(timeout=_GET_TIMEOUT_S + 5)
        return self.stats()


class WriterActor:
    """Collects results per shard and writes each shard's CXI file and record when complete;
    a Ray actor (``remote_classes()["writer"]``).

    Results are acknowledged to the writer queue only after their shard is on disk, so a
    restarted writer gets back the results of the shards its predecessor had not finished.
    """

    def __init__(self, name: str, queue, spec: dict):
        _setup_logging()
        ray = _ray()
        self.name = name
        self.queue = queue
        self.out_dir = Path(spec["out_dir"])
        fingerprint, output_section, geometry = spec["fingerprint"], spec["output"], spec["geometry"]
        self.restarted = _was_restarted()
        self.requeued_at_start = ray.get(queue.requeue.remote(name))
        shard_objs = [Shard.from_dict(s) for s in spec["shards"]]
        # shards a previous incarnation already finished are done (their records say so)
        plan = Plan(shard_objs, [], fingerprint)
        already = finished_shards(self.out_dir, plan) if self.restarted or self.requeued_at_start \
            else set()
        if self.restarted or self.requeued_at_start:
            log.warning("%s restarted: %d result batch(es) requeued, %d shard(s) already written",
                        name, self.requeued_at_start, len(already))
        self.pending = {s.shard_id: ShardCollector(s, self.out_dir, fingerprint, output_section,
                                                   geometry)
                        for s in shard_objs if s.shard_id not in already}
        self.keys: dict[str, list] = collections.defaultdict(list)
        self.c = collections.Counter()
        self.c["shards_before"] = len(already)
        self.incomplete: list = []
        self.t_run = None
        self.busy_s = 0.0

    def info(self) -> dict:
        import socket

        return {"name": self.name, "pid": os.getpid(), "node": socket.gethostname(),
                "restarted": self.restarted, "pending_shards": len(self.pending)}

    def stats(self) -> dict:
        held = sum(c.n_accounted for c in self.pending.values())
        return {"name": self.name, "pid": os.getpid(), "shards_written": self.c["shards"],
                "shards_pending": len(self.pending), "events_written": self.c["events"],
                "events_held": held, "hits": self.c["hits"], "duplicates": self.c["dups"],
                "late": self.c["late"], "busy_s": round(self.busy_s, 3),
                "restarted": self.restarted, "requeued_at_start": self.requeued_at_start,
                "rss_mb": round(peak_rss_mb(), 1)}

    def run(self) -> dict:
        """Write shards until all assigned ones are done (or the queue is closed)."""
        ray = _ray()
        self.t_run = time.perf_counter()
        while self.pending:
            res = ray.get(self.queue.get.remote(self.name, _GET_TIMEOUT_S))
            if res is None:
                continue
            if isinstance(res, str) and res == CLOSED:
                break
            col = self.pending.get(res.shard_id)
            if col is None or not col.add(res):
                # a duplicate (batch redone after a crash) or a shard already written
                self.c["late" if col is None else "dups"] += 1
                ray.get(self.queue.ack.remote(self.name, res.batch_id))
                continue
            self.keys[res.shard_id].append(res.batch_id)
            if col.complete:
                t0 = time.perf_counter()
                rec = col.write()
                self.busy_s += time.perf_counter() - t0
                ray.get(self.queue.ack.remote(self.name, self.keys.pop(res.shard_id)))
                del self.pending[res.shard_id]
                self.c["shards"] += 1
                self.c["events"] += rec["n_events"]
                self.c["hits"] += rec["hits"]
        for sid, col in self.pending.items():
            miss = col.missing()
            self.incomplete.append({"shard_id": sid, "missing": len(miss)})
            log.error("%s: shard %s incomplete at the end (%d event(s) missing): not written",
                      self.name, sid, len(miss))
        out = self.stats()
        out["incomplete"] = self.incomplete
        out["finished_at"] = time.time()
        return out


_CLASSES: dict = {}


def remote_classes() -> dict:
    """The Ray actor classes ``{"queue", "infer", "writer"}`` (made on first use, so importing
    this module does not import Ray)."""
    if not _CLASSES:
        ray = _ray()
        _CLASSES["queue"] = ray.remote(num_cpus=0)(TrackedQueue)
        _CLASSES["infer"] = ray.remote(InferenceActor)
        _CLASSES["writer"] = ray.remote(WriterActor)
    return _CLASSES


# --------------------------------------------------------------------------------------------
# producers
# --------------------------------------------------------------------------------------------
def produce(source, shards: list, queue, producer: int, batch_size: int, writer_of: dict,
            stall_timeout_s: float = 600.0) -> dict:
    """Read ``shards`` and put their batches on ``queue``; return the producer's stats.

    Each batch's frames are ``ray.put`` once; the reference is kept until the queue reports the
    batch acknowledged, so a batch can be redone if an actor dies. Blocks while the queue is
    full (backpressure). Raises :class:`PipelineAborted` if the run is aborted.
    """
    ray = _ray()
    held: dict[str, Any] = {}
    c = collections.Counter()
    t_start = time.perf_counter()
    read_s = put_s = 0.0

    def forget(keys) -> None:
        for k in keys:
            held.pop(k, None)

    for shard in shards:
        t0 = time.perf_counter()
        for batch in source.read(shard, batch_size):
            ref = ray.put(batch.frames) if batch.n_frames else None
            desc = BatchDesc(batch.batch_id, batch.shard_id, batch.positions, batch.skipped,
                             batch.n_frames, ref, writer_of[batch.shard_id], producer)
            held[batch.batch_id] = ref
            t1 = time.perf_counter()
            read_s += t1 - t0
            while True:
                r = ray.get(queue.put.remote(desc, batch.batch_id, batch.n_frames, producer,
                                             _PUT_TIMEOUT_S))
                if r["aborted"]:
                    raise PipelineAborted(r["aborted"])
                if r["ok"]:
                    break
                if time.perf_counter() - t1 > stall_timeout_s:
                    raise PipelineAborted(f"producer {producer}: queue full for "
                                          f"{stall_timeout_s:.0f} s (are the actors alive?)")
                log.info("producer %d: queue full for %.0f s", producer, time.perf_counter() - t1)
            forget(r["acked"])
            put_s += time.perf_counter() - t1
            c["frames"] += batch.n_frames
            c["skipped"] += len(batch.skipped)
            c["batches"] += 1
            t0 = time.perf_counter()
        c["shards"] += 1
    ray.get(queue.producer_done.remote(producer))
    t_drain = time.perf_counter()
    while held:
        r = ray.get(queue.drain.remote(producer, _PUT_TIMEOUT_S))
        forget(r["acked"])
        if r["aborted"]:
            raise PipelineAborted(r["aborted"])
        if r["done"]:
            held.clear()
        elif time.perf_counter() - t_drain > stall_timeout_s:
            raise PipelineAborted(f"producer {producer}: {len(held)} batch(es) not "
                                  f"acknowledged after {stall_timeout_s:.0f} s")
    wall = time.perf_counter() - t_start
    return {"producer": producer, "frames": c["frames"], "skipped": c["skipped"],
            "batches": c["batches"], "shards": c["shards"], "read_s": round(read_s, 3),
            "put_wait_s": round(put_s, 3), "wall_s": round(wall, 3),
            "frames_per_s": round(c["frames"] / max(1e-9, wall), 3),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
class _Driver:
    """Rank 0's side: Ray, the queues and actors, supervision, monitoring, summary."""

    def __init__(self, cfg, plan: Plan, todo: list, source, n_producers: int):
        self.cfg = cfg
        self.plan = plan
        self.todo = todo
        self.source = source
        self.n_producers = n_producers
        self.namespace = cfg.ray.namespace or f"peaknet-infer-{uuid.uuid4().hex[:8]}"
        self.owns_ray = False
        self.error: Optional[str] = None
        self.actor_results: dict = {}
        self.writer_results: dict = {}
        self.t0 = time.perf_counter()

    # --- setup --------------------------------------------------------------------------------
    def start(self) -> dict:
        cfg, p = self.cfg, self.cfg.pipeline
        need_cpus = p.actors * p.actor_cpus + p.writers * p.writer_cpus
        self.owns_ray = connect_ray(cfg.ray, self.namespace,
                                    cfg.ray.num_cpus or max(os.cpu_count() or 1,
                                                            math.ceil(need_cpus)))
        ray = _ray()
        res = ray.cluster_resources()
        have_cpus, have_gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        gpus = p.actor_gpus if p.actor_gpus is not None else (1.0 if have_gpus >= 1 else 0.0)
        if need_cpus > have_cpus + 1e-9 or p.actors * gpus > have_gpus + 1e-9:
            from peaknet.errors import ConfigError

            raise ConfigError(None, "pipeline.actors",
                              f"{p.actors} actor(s) x ({p.actor_cpus} CPU, {gpus} GPU) + "
                              f"{p.writers} writer(s) x {p.writer_cpus} CPU do not fit the Ray "
                              f"cluster ({have_cpus:g} CPU, {have_gpus:g} GPU): lower "
                              "pipeline.actor_cpus / writer_cpus or the counts")
        self.gpus = gpus
        cls = remote_classes()
        ns = self.namespace
        self.in_queue = cls["queue"].options(name=INPUT_QUEUE, namespace=ns).remote(
            max(1, p.queue_capacity), self.n_producers, INPUT_QUEUE)
        self.res_queues = [cls["queue"].options(name=f"infer-results-{w}", namespace=ns).remote(
            p.result_capacity, 0, f"infer-results-{w}") for w in range(p.writers)]
        self.writer_of = {s.shard_id: i % p.writers for i, s in enumerate(self.todo)}
        threads = cfg.run.threads or max(1, int(round(p.actor_cpus)))
        geom = self.source.geometry
        # Constructor payloads go through the object store as references the driver holds for
        # the whole run, so a restarted actor can always read them again (Ray warns that
        # creation arguments it stored itself may be gone when a restart needs them).
        self._keep = []

        def held(obj):
            ref = ray.put(obj)
            self._keep.append(ref)
            return ref

        self.writers = []
        for w in range(p.writers):
            spec = held({"shards": [s.to_dict() for s in self.todo if self.writer_of[s.shard_id] == w],
                         "out_dir": str(cfg.run.out), "fingerprint": self.plan.fingerprint,
                         "output": cfg.output, "geometry": geom})
            self.writers.append(cls["writer"].options(
                name=f"infer-writer-{w}", namespace=ns, num_cpus=p.writer_cpus,
                max_restarts=p.max_restarts, max_task_retries=-1, max_concurrency=4,
            ).remote(f"infer-writer-{w}", self.res_queues[w], spec))
        spec = held({"predictor": cfg.predictor, "geometry": geom, "output": cfg.output,
                     "frame_shape": tuple(self.source.frame_shape)})
        self.actors = []
        for g in range(p.actors):
            self.actors.append(cls["infer"].options(
                name=f"infer-actor-{g}", namespace=ns, num_cpus=p.actor_cpus, num_gpus=gpus,
                max_restarts=p.max_restarts, max_task_retries=-1, max_concurrency=4,
                scheduling_strategy="SPREAD",
            ).remote(f"infer-actor-{g}", self.in_queue, self.res_queues, spec, threads,
                     p.prefetch))
        self.actor_runs = {a.run.remote(): f"infer-actor-{g}" for g, a in enumerate(self.actors)}
        self.writer_runs = {w.run.remote(): f"infer-writer-{i}" for i, w in enumerate(self.writers)}
        gcs = ray.get_runtime_context().gcs_address
        log.info("hybrid pipeline: %d producer(s) -> queue of %d frames -> %d actor(s) "
                 "(%g CPU, %g GPU each) -> %d writer(s); Ray %s, namespace %s",
                 self.n_producers, p.queue_capacity, p.actors, p.actor_cpus, gpus, p.writers,
                 gcs, ns)
        self._sup = threading.Thread(target=self._supervise, daemon=True, name="infer-supervisor")
        self._sup.start()
        self.monitor = Monitor(
            self._collect, Path(cfg.run.out) / "infer.metrics.jsonl" if cfg.run.metrics else None,
            cfg.run.log_every_s, total=sum(s.n_events for s in self.todo),
            progress=cfg.run.progress, label="infer",
            rate_keys={"produced_fps": "produced", "computed_fps": "computed",
                       "written_eps": "written"},
            progress_keys=("produced", "computed", "written"),
            stall_timeout_s=p.stall_timeout_s, on_stall=self._on_stall).start()
        return {"address": gcs, "namespace": ns, "writer_of": self.writer_of}

    # --- supervision ------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        ray = _ray()
        if self.error is None:
            self.error = reason
        log.error("aborting the run: %s", reason)
        for q in [self.in_queue, *self.res_queues]:
            try:
                q.abort.remote(reason)
            except Exception:  # noqa: BLE001
                pass

    def _on_stall(self, seconds: float) -> None:
        self.abort(f"no progress for {seconds:.0f} s (pipeline.stall_timeout_s)")

    def _supervise(self) -> None:
        """Watch the actors' ``run`` calls: a failure that Ray could not recover from (restarts
        exhausted, or an exception in the predictor) requeues the actor's batches and, if no
        actor is left or it was an error, aborts the run."""
        ray = _ray()
        from ray.exceptions import RayActorError

        waiting = dict(self.actor_runs)
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=None)
            for ref in ready:
                name = waiting.pop(ref)
                try:
                    self.actor_results[name] = ray.get(ref)
                except RayActorError as exc:
                    n = ray.get(self.in_queue.requeue.remote(name))
                    log.error("%s is gone for good (%s); %d batch(es) requeued", name,
                              type(exc).__name__, n)
                    self.actor_results[name] = {"name": name, "dead": True}
                    if not waiting:
                        self.abort("every inference actor is dead")
                except Exception as exc:  # noqa: BLE001 - the predictor raised
                    self.abort(f"{name} failed: {exc}")
        # all inference done: nothing more will reach the writers
        for q in self.res_queues:
            q.close.remote()

    def _collect(self) -> dict:
        ray = _ray()
        refs = {"queue": self.in_queue.stats.remote()}
        for i, q in enumerate(self.res_queues):
            refs[f"rq{i}"] = q.stats.remote()
        for i, a in enumerate(self.actors):
            refs[f"a{i}"] = a.stats.remote()
        for i, w in enumerate(self.writers):
            refs[f"w{i}"] = w.stats.remote()
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)
        ready = set(ready)
        got = {}
        for k, r in refs.items():
            if r in ready:
                try:
                    got[k] = ray.get(r)
                except Exception:  # noqa: BLE001 - a restarting actor
                    pass
        q = got.get("queue", {})
        actors = [got[f"a{i}"] for i in range(len(self.actors)) if f"a{i}" in got]
        writers = [got[f"w{i}"] for i in range(len(self.writers)) if f"w{i}" in got]
        return {
            "queue": q,
            "results": [{"depth": got[f"rq{i}"]["depth_batches"],
                         "inflight": got[f"rq{i}"]["inflight"]}
                        for i in range(len(self.res_queues)) if f"rq{i}" in got],
            "actors": actors, "writers": writers,
            "produced": q.get("put_frames", 0),
            "computed": sum(a.get("frames", 0) for a in actors),
            "written": sum(w.get("events_written", 0) for w in writers),
        }

    # --- the end ------------------------------------------------------------------------------
    def finish(self, producer_stats: list) -> dict:
        ray = _ray()
        self._sup.join()
        waiting = dict(self.writer_runs)
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=None)
            for ref in ready:
                name = waiting.pop(ref)
                try:
                    self.writer_results[name] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001
                    self.writer_results[name] = {"name": name, "error": str(exc)}
                    if self.error is None:
                        self.error = f"{name} failed: {exc}"
        final = self.monitor.stop()
        qstats = ray.get(self.in_queue.stats.remote())
        wall = time.perf_counter() - self.t0
        frames = sum(s.get("frames", 0) for s in producer_stats)
        incomplete = [i for w in self.writer_results.values() for i in w.get("incomplete", [])]
        # steady-state rate: from the first actor ready (model built) to the last shard written
        starts = [a["started_at"] for a in self.actor_results.values() if a.get("started_at")]
        ends = [w["finished_at"] for w in self.writer_results.values() if w.get("finished_at")]
        span = (max(ends) - min(starts)) if starts and ends else 0.0
        extra = {
            "pipeline_s": round(span, 3),
            "pipeline_fps": round(frames / span, 3) if span > 0 else 0.0,
            "mode": "hybrid", "producers": self.n_producers, "actors": self.cfg.pipeline.actors,
            "writers": self.cfg.pipeline.writers, "actor_gpus": self.gpus,
            "namespace": self.namespace,
            "wall_s": round(wall, 3), "frames_this_run": frames,
            "frames_per_s": round(frames / max(1e-9, wall), 3),
            "queue": qstats, "per_actor": list(self.actor_results.values()),
            "per_writer": list(self.writer_results.values()), "per_producer": producer_stats,
            "incomplete_shards": incomplete, "error": self.error, "final_metrics": final,
        }
        return extra

    def teardown(self) -> None:
        ray = _ray()
        for h in [*getattr(self, "actors", []), *getattr(self, "writers", []),
                  *getattr(self, "res_queues", []),
                  *([self.in_queue] if hasattr(self, "in_queue") else [])]:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self.owns_ray:
            ray.shutdown()


def run_hybrid(cfg, comm="auto") -> dict:
    """Run the hybrid pipeline on this process; rank 0 (the driver) returns the summary,
    other ranks {}. Raises :class:`PipelineAborted` on rank 0 if the run failed."""
    comm = mpi_comm() if comm == "auto" else comm
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    n_producers = size if comm is not None else max(1, cfg.pipeline.producers)
    if comm is not None and cfg.pipeline.producers not in (0, size):
        log.warning("pipeline.producers=%d ignored: every one of the %d MPI ranks produces",
                    cfg.pipeline.producers, size)
    out = Path(cfg.run.out)
    driver = None
    msg: dict = {}
    try:
        if rank == 0:
            source, plan, done = plan_run(cfg)
            todo = [s for s in plan.shards if s.shard_id not in done]
            msg = {"plan": plan.to_dict(), "done": sorted(done), "todo": [s.shard_id for s in todo]}
            if todo:
                driver = _Driver(cfg, plan, todo, source, n_producers)
                msg.update(driver.start())
    except BaseException as exc:
        msg = {"error": f"{type(exc).__name__}: {exc}"}
        if comm is None:
            if driver is not None:
                driver.teardown()
            raise
        comm.bcast(msg, root=0)
        if driver is not None:
            driver.teardown()
        raise
    if comm is not None:
        quiet_barrier(comm)
        msg = comm.bcast(msg, root=0)
        if "error" in msg:
            raise PipelineAborted(f"rank 0 failed to start the run: {msg['error']}")
    plan = Plan.from_dict(msg["plan"])
    done = set(msg["done"])
    if not msg["todo"]:
        if rank == 0:
            log.info("nothing to do: all %d shards finished earlier", len(plan.shards))
            return summarize(out, plan, done, {"mode": "hybrid", "wall_s": 0.0,
                                               "frames_this_run": 0, "frames_per_s": 0.0})
        return {}
    if rank != 0:
        source = open_planned_source(cfg, plan)
        cfg.ray.address = msg["address"]
        owns = connect_ray(cfg.ray, msg["namespace"], log_to_driver=False)
    todo = [plan.by_id()[sid] for sid in msg["todo"]]
    ray = _ray()
    queue = ray.get_actor(INPUT_QUEUE, namespace=msg["namespace"])
    writer_of = msg["writer_of"]
    bs = cfg.pipeline.batch_size
    stall = cfg.pipeline.stall_timeout_s
    stats: list = []
    err: Optional[BaseException] = None
    try:
        if comm is not None:
            stats = [produce(source, partition(todo, rank, size), queue, rank, bs, writer_of, stall)]
        else:
            results: list = [None] * n_producers

            def work(k: int) -> None:
                try:
                    results[k] = produce(source, partition(todo, k, n_producers), queue, k, bs,
                                         writer_of, stall)
                except BaseException as exc:  # noqa: BLE001
                    results[k] = exc

            threads = [threading.Thread(target=work, args=(k,), name=f"producer-{k}")
                       for k in range(n_producers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            errs = [r for r in results if isinstance(r, BaseException)]
            if errs:
                raise errs[0]
            stats = list(results)
    except BaseException as exc:  # noqa: BLE001
        err = exc
        log.error("producer %d failed: %s", rank, exc)
        try:
            queue.abort.remote(f"producer {rank} failed: {exc}")
        except Exception:  # noqa: BLE001
            pass
        if driver is not None:
            driver.abort(f"producer failed: {exc}")
    if comm is not None:
        quiet_barrier(comm)
        gathered = comm.gather(stats, root=0)
        stats = [s for part in gathered for s in part] if rank == 0 else stats
    if rank != 0:
        if owns:
            ray.shutdown()
        if err is not None:
            raise err
        return {}
    try:
        extra = driver.finish(stats)
    finally:
        driver.teardown()
    summary = summarize(out, plan, done, extra)
    if err is not None:
        raise err
    if driver.error or summary["shards_missing"]:
        raise PipelineAborted(f"run incomplete: {driver.error or ''} "
                              f"missing shards {summary['shards_missing'][:5]}")
    return summary
