"""What a stage gives the rank-partitioned engine: a :class:`ShardTask` (read, process, write).

The engine (serial, MPI or Ray) moves events and results around and nothing else. A stage
supplies the pieces, each a plain function of arrays (no MPI, no Ray, no file layout beyond its
own part datasets)::

    plan_events()            -> (EventTable, meta)            once, on rank 0 / the Ray driver
    read(events, a, b, meta) -> (k, payload | Skip) ...       stream the inputs of events a..b-1
    prepare(k, payload)      -> prepared | Skip                per event (drop the big frame here)
    split(prepared items)    -> (state, [sub, ...])            per batch: the units of fan-out
    solve(sub)               -> sub result                     pure; a Ray task each
    combine(state, results)  -> [(k, result | Skip), ...]      per batch, in event order
    open_writer(h5, plan, shard) -> PartWriter                 the stage's datasets in a part

Under MPI a rank runs ``solve`` on its chunks in a loop; under Ray the frame-batch task fans
them out. Batches and chunks are the same in both (see :mod:`.partition`), so are the results.

A stage with one pure function per event derives from :class:`PerEventTask` and defines
``process(payload)`` instead of split/solve/combine (find-peaks: peakfinder8 per frame; the
legacy inference coupling: the model per frame, every rank reading and inferring inline). A
task must be picklable (Ray ships it once with ``ray.put``).
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

from .partition import EventTable, Plan, Shard

log = logging.getLogger(__name__)

__all__ = ["Skip", "ShardTask", "PartWriter", "PerEventTask", "process_batch", "read_prepared",
           "skip_from_exception"]


@dataclass(frozen=True)
class Skip:
    """An event that is not processed: ``kind`` (a short category counted in the summary, e.g.
    ``nonfinite``, ``unreadable_file``, ``error``) and ``reason`` (for a person)."""

    kind: str
    reason: str


def skip_from_exception(exc: BaseException, kind: Optional[str] = None) -> Skip:
    """A Skip for an exception: InputError subclasses keep their message (it names the file and
    field); anything else is ``error`` with the exception type."""
    from peaknet.errors import InputError

    if kind is None:
        kind = "bad_input" if isinstance(exc, InputError) else "error"
    text = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    return Skip(kind, text)


class PartWriter(Protocol):
    """Writes a stage's per-event rows into an open part file (HDF5); the engine writes the
    generic ``/events`` datasets itself. One call per event of the shard, in order."""

    def write(self, k: int, result: Any) -> None: ...

    def skip(self, k: int, skip: Skip) -> None: ...

    def close(self) -> dict:
        """Flush; return JSON-able counters (summed over shards into the run's summary)."""
        ...


@runtime_checkable
class ShardTask(Protocol):
    name: str  # the stage name: part files, output and log lines use it
    output_name: str  # merged output file name in the run folder

    def fingerprint(self) -> str: ...

    def setup(self) -> None: ...

    def plan_events(self) -> tuple[EventTable, dict]: ...

    def read(self, events: EventTable, start: int, stop: int, meta: dict) -> Iterator[tuple[int, Any]]: ...

    def prepare(self, k: int, payload: Any) -> Any: ...

    def split(self, items: Sequence[tuple[int, Any]]) -> tuple[Any, list]: ...

    def solve(self, sub: Any) -> Any: ...

    def combine(self, state: Any, results: list) -> list[tuple[int, Any]]: ...

    def open_writer(self, h5, plan: Plan, shard: Shard) -> PartWriter: ...

    def summarize(self, stats: dict) -> dict: ...


SolveMap = Callable[[Callable[[Any], Any], list], list]


def _local_map(fn, subs):
    return [fn(s) for s in subs]


def read_prepared(task: ShardTask, events: EventTable, start: int, stop: int,
                  meta: dict) -> Iterator[tuple[int, Any]]:
    """``task.read`` then ``task.prepare`` per event; an exception in either becomes a Skip of
    that event (reading goes on with the next one). Every event ``start..stop-1`` is yielded
    exactly once, in order (missing ones are filled in as ``error`` skips)."""
    expect = start
    it = task.read(events, start, stop, meta)
    while True:
        try:
            k, payload = next(it)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - the reader itself failed: skip the rest
            log.warning("%s: reader failed at event %d: %s", task.name, expect, exc)
            for j in range(expect, stop):
                yield j, skip_from_exception(exc)
            return
        if k != expect:
            raise RuntimeError(f"{task.name}.read yielded event {k}, expected {expect} (a bug)")
        expect += 1
        if not isinstance(payload, Skip):
            try:
                payload = task.prepare(k, payload)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the shard
                log.warning("%s: event %s: %s", task.name, events.id(k), exc)
                log.debug("%s", traceback.format_exc())
                payload = skip_from_exception(exc)
        yield k, payload
    for j in range(expect, stop):
        yield j, Skip("error", f"{task.name}.read stopped before this event")


def process_batch(task: ShardTask, items: Sequence[tuple[int, Any]],
                  solve_map: SolveMap = _local_map, names: Optional[EventTable] = None
                  ) -> list[tuple[int, Any]]:
    """Process one batch of prepared items: split, solve every sub (``solve_map``: a loop here,
    Ray tasks in the Ray runner), combine. Returns ``(k, result | Skip)`` for every item, in
    order.

    If the batch fails as a whole, every event is processed alone (local loop) so that only
    the events that fail by themselves are skipped, with the exception as reason.
    """
    items = list(items)
    todo = [(k, p) for k, p in items if not isinstance(p, Skip)]
    done: dict[int, Any] = {k: p for k, p in items if isinstance(p, Skip)}
    if todo:
        try:
            state, subs = task.split(todo)
            results = solve_map(task.solve, subs) if subs else []
            out = task.combine(state, results)
            if [k for k, _ in out] != [k for k, _ in todo]:
                raise RuntimeError(f"{task.name}.combine returned events {[k for k, _ in out]}, "
                                   f"expected {[k for k, _ in todo]}")
            done.update(out)
        except Exception as exc:  # noqa: BLE001
            if len(todo) == 1:
                k = todo[0][0]
                who = names.id(k) if names is not None else k
                log.warning("%s: event %s failed: %s", task.name, who, exc)
                log.debug("%s", traceback.format_exc())
                done[k] = skip_from_exception(exc)
            else:
                log.warning("%s: batch of %d events failed (%s); retrying them one by one",
                            task.name, len(todo), exc)
                for item in todo:
                    done.update(process_batch(task, [item], _local_map, names))
    return [(k, done[k]) for k, _ in items]


class PerEventTask:
    """Base for stages whose work is one pure function per event (find-peaks: peakfinder8 on a
    frame; inference: the model on a frame). Subclasses define ``name``, ``output_name``,
    ``fingerprint``, ``plan_events``, ``read``, ``process(payload) -> result`` and
    ``open_writer``; the batch plumbing is here: under Ray every event of a frame batch
    becomes one solve task, under MPI a rank loops over them."""

    name = "task"
    output_name = "output.h5"

    def setup(self) -> None:
        pass

    def prepare(self, k: int, payload: Any) -> Any:
        return payload

    def process(self, payload: Any) -> Any:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    def split(self, items: Sequence[tuple[int, Any]]) -> tuple[list[int], list]:
        return [k for k, _ in items], [p for _, p in items]

    def solve(self, sub: Any) -> Any:
        return self.process(sub)

    def combine(self, keys: list[int], results: list) -> list[tuple[int, Any]]:
        return list(zip(keys, results))

    def summarize(self, stats: dict) -> dict:
        return {}
