"""Deterministic partition of events over shards, batches and ranks.

An *event* is one frame of one input file, named ``"<file>//<index>"`` (CrystFEL's event
notation: row ``index`` of the file's first dimension). The events of a run are held in an
:class:`EventTable`: compact arrays (file number, frame index), so that a plan of millions of
events costs megabytes, not gigabytes, and can be broadcast to every MPI rank or put once into
Ray's object store.

The plan cuts the table, in order, into *shards* of ``shard_size`` consecutive events (a shard
is the unit of output: one part file, one manifest record, skipped as a whole when a re-run
finds it complete) and each shard into *batches* of ``batch_size`` events (the unit of
processing: one frame-batch task under Ray, one fit call per chunk of windows under MPI). Both
depend only on the event order and the two sizes, never on the number of ranks or workers, so
every backend computes exactly the same batches and therefore the same results.

Shards go to ranks ``round_robin`` (shard i to rank i % size: balances files of uneven cost)
or in contiguous ``block``\\ s (each rank reads long runs of a file).

Events whose fate is known at planning time (a file that cannot be opened, a manifest entry that
matches no input frame) are kept in the table as *placeholders* (frame index -1) with their
reason in ``EventTable.notes``, so that every input event is accounted for in the outputs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional, Sequence

import numpy as np

__all__ = [
    "Event",
    "EventTable",
    "Shard",
    "Plan",
    "event_id",
    "parse_event_id",
    "make_shards",
    "assign_shards",
    "split_range",
]

Assignment = Literal["round_robin", "block"]


def event_id(file: str, index: int) -> str:
    """The stable id ``"<file>//<index>"`` of frame ``index`` of ``file``."""
    return f"{file}//{int(index)}"


def parse_event_id(text: str) -> tuple[str, int]:
    """``"path/run1.cxi//12"`` -> ``("path/run1.cxi", 12)``; ValueError if not of that form."""
    file, sep, idx = str(text).rpartition("//")
    if not sep or not file:
        raise ValueError(f"event id {text!r} is not of the form <file>//<index>")
    try:
        return file, int(idx)
    except ValueError:
        raise ValueError(f"event id {text!r}: {idx!r} is not a frame index") from None


@dataclass(frozen=True)
class Event:
    """One event: frame ``index`` of ``file`` (``index`` -1: a placeholder, see the module doc)."""

    file: str
    index: int

    @property
    def id(self) -> str:
        return self.file if self.index < 0 else event_id(self.file, self.index)


@dataclass
class EventTable:
    """Events as arrays: ``files`` (names), ``file_idx`` (N,) int32 into ``files``, ``index``
    (N,) int64 frame index in the file (-1: placeholder whose id is ``files[file_idx]`` itself),
    ``notes``: {event position: (kind, reason)} for events known to be bad when planning."""

    files: tuple[str, ...]
    file_idx: np.ndarray
    index: np.ndarray
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.files = tuple(str(f) for f in self.files)
        self.file_idx = np.ascontiguousarray(self.file_idx, dtype=np.int32).reshape(-1)
        self.index = np.ascontiguousarray(self.index, dtype=np.int64).reshape(-1)
        if self.file_idx.size != self.index.size:
            raise ValueError(f"file_idx has {self.file_idx.size} entries, index {self.index.size}")
        self.notes = {int(k): (str(v[0]), str(v[1])) for k, v in self.notes.items()}

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_counts(cls, files: Sequence[str], counts: Sequence[int],
                    notes: Optional[dict] = None) -> "EventTable":
        """Every frame ``0 .. counts[i]-1`` of every file, in order. A count of -1 adds one
        placeholder for the whole file (``"<file>//*"``) with ``notes[file] = (kind, reason)``."""
        notes = notes or {}
        names, fidx, index, ev_notes = [], [], [], {}
        pos = 0
        for f, n in zip(files, counts):
            f = str(f)
            if n < 0:
                names.append(f"{f}//*")
                fidx.append(np.array([len(names) - 1]))
                index.append(np.array([-1]))
                ev_notes[pos] = notes.get(f, ("unreadable_file", "file could not be read"))
                pos += 1
                continue
            names.append(f)
            fidx.append(np.full(int(n), len(names) - 1))
            index.append(np.arange(int(n)))
            pos += int(n)
        if not names:
            return cls((), np.zeros(0, np.int32), np.zeros(0, np.int64))
        return cls(tuple(names), np.concatenate(fidx), np.concatenate(index), ev_notes)

    @classmethod
    def from_events(cls, events: Sequence[tuple[str, int]],
                    notes: Optional[dict] = None) -> "EventTable":
        """From (file, index) pairs, in the given order (index -1: placeholder, ``file`` is its
        id). ``notes``: {position: (kind, reason)}."""
        names: dict[str, int] = {}
        fidx = np.empty(len(events), np.int32)
        index = np.empty(len(events), np.int64)
        for k, (f, i) in enumerate(events):
            fidx[k] = names.setdefault(str(f), len(names))
            index[k] = int(i)
        return cls(tuple(names), fidx, index, dict(notes or {}))

    # --- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.size)

    def __getitem__(self, k: int) -> Event:
        return Event(self.files[int(self.file_idx[k])], int(self.index[k]))

    def id(self, k: int) -> str:
        return self[k].id

    def ids(self, start: int = 0, stop: Optional[int] = None) -> list[str]:
        stop = len(self) if stop is None else stop
        return [self.id(k) for k in range(start, stop)]

    def note(self, k: int) -> Optional[tuple[str, str]]:
        """(kind, reason) if event ``k`` was known bad when planning, else None."""
        return self.notes.get(int(k))

    def runs(self, start: int, stop: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Events ``start..stop-1`` grouped in runs of the same file:
        ``(file, positions (n,), frame indices (n,))``, in order."""
        if stop <= start:
            return
        f = self.file_idx[start:stop]
        cuts = np.flatnonzero(np.diff(f)) + 1
        for seg in np.split(np.arange(start, stop), cuts):
            yield self.files[int(self.file_idx[seg[0]])], seg, self.index[seg]

    def fingerprint(self) -> str:
        """Digest of the events (names, order, placeholders and their notes)."""
        h = hashlib.sha1()
        h.update(json.dumps(self.files).encode())
        h.update(self.file_idx.tobytes())
        h.update(self.index.tobytes())
        h.update(json.dumps(sorted(self.notes.items())).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    """Events ``start .. stop-1`` of the plan; ``id`` numbers the shard from 0."""

    id: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def make_shards(n_events: int, shard_size: int) -> list[Shard]:
    """Consecutive shards of ``shard_size`` events (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [Shard(i, a, min(a + shard_size, n_events))
            for i, a in enumerate(range(0, n_events, shard_size))]


def split_range(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into consecutive ``(a, b)`` pieces of ``size`` (last shorter)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def assign_shards(n_shards: int, rank: int, size: int, mode: Assignment = "round_robin") -> list[int]:
    """Shard numbers of ``rank`` out of ``size``: ``i % size == rank`` (round_robin) or the
    rank's contiguous block (block: the first ``n_shards % size`` ranks get one more)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside 0..{size - 1}")
    if mode == "round_robin":
        return list(range(rank, n_shards, size))
    if mode == "block":
        base, extra = divmod(n_shards, size)
        first = rank * base + min(rank, extra)
        return list(range(first, first + base + (1 if rank < extra else 0)))
    raise ValueError(f"assignment must be 'round_robin' or 'block', not {mode!r}")


@dataclass
class Plan:
    """What a run does: its events, their shards and batches, and a fingerprint.

    ``task_key``: the task's fingerprint (everything in its config that changes results);
    ``meta``: JSON-able facts found while planning that every rank needs (e.g. the frame
    shape). Parts and manifest records carry :attr:`fingerprint`; a re-run reuses only those
    whose fingerprint matches.
    """

    events: EventTable
    shard_size: int
    batch_size: int
    task_key: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")
        self._fp: Optional[str] = None

    @property
    def n_events(self) -> int:
        return len(self.events)

    @property
    def n_shards(self) -> int:
        return -(-self.n_events // self.shard_size)

    def shard(self, i: int) -> Shard:
        a = i * self.shard_size
        if not 0 <= a < max(self.n_events, 1) or i < 0:
            raise IndexError(f"shard {i} outside 0..{self.n_shards - 1}")
        return Shard(i, a, min(a + self.shard_size, self.n_events))

    def shards(self) -> list[Shard]:
        return make_shards(self.n_events, self.shard_size)

    def shards_for(self, rank: int, size: int, mode: Assignment = "round_robin") -> list[Shard]:
        return [self.shard(i) for i in assign_shards(self.n_shards, rank, size, mode)]

    def batches(self, shard: Shard) -> list[tuple[int, int]]:
        """The shard's batches as ``(start, stop)`` event ranges."""
        return split_range(shard.start, shard.stop, self.batch_size)

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha1()
            h.update(self.events.fingerprint().encode())
            h.update(json.dumps([self.shard_size, self.batch_size, self.task_key,
                                 self.meta], sort_keys=True, default=str).encode())
            self._fp = h.hexdigest()[:16]
        return self._fp

    def describe(self) -> dict:
        """JSON-able description (written to ``plan.json``)."""
        return {
            "fingerprint": self.fingerprint,
            "n_events": self.n_events,
            "n_shards": self.n_shards,
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "n_files": len(self.events.files),
            "n_placeholders": len(self.events.notes),
            "task_key": self.task_key,
            "meta": self.meta,
        }
