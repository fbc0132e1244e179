"""Nothing lost, nothing doubled: the run's plan, per-shard records, resume, verification.

Every input event ends up exactly once either in an output CXI file (a hit: at least
``output.min_peaks`` peaks), in a shard record's list of misses, or in a shard record's list of
skipped events with the reason (``unreadable: ...``, ``bad shape: ...``, ``nonfinite: ...``).
Inputs that cannot even be opened to count their events are listed in the plan as unreadable.

Files in the output folder::

    infer.plan.json            the shards of the run (ids, event ranges, input fingerprints) and
                               the fingerprint of the predictor and output settings
    <shard_id>.cxi             hits of one shard, CrystFEL-compatible (written as .tmp, renamed)
    shards/<shard_id>.json     the shard's record, written after the CXI file is in place:
                               counts, misses (as ranges), skipped events with reasons
    infer.skipped.jsonl        every skipped event and unreadable input, one JSON per line
    infer.summary.json         the run summary (events in, hits, peaks, skipped, timings)

A shard is finished when its record exists, names the same input and settings fingerprints,
and its CXI file exists: a re-run (``run.resume``) skips finished shards, so a crashed run
only redoes what was not complete. Records are written with a temporary name and renamed, so a
crash never leaves a half record; a CXI file without its record is simply redone.

:class:`ShardCollector` is the one place that turns batch results into a shard's output; the
hybrid pipeline's writer actors and the legacy MPI ranks both use it. It drops a batch it has
already seen (a batch redone after an actor died may arrive twice) and writes rows in event
order, so both pipelines write identical files for identical peak lists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from peaknet.peaks import PeakList

from .sources import Shard

log = logging.getLogger(__name__)

__all__ = [
    "BatchResult",
    "Plan",
    "ShardCollector",
    "make_result",
    "run_fingerprint",
    "finished_shards",
    "verify_outputs",
    "summarize",
    "read_outputs",
    "PLAN_FILE",
    "SUMMARY_FILE",
    "SKIPPED_FILE",
]

PLAN_FILE = "infer.plan.json"
SUMMARY_FILE = "infer.summary.json"
SKIPPED_FILE = "infer.skipped.jsonl"
SHARD_DIR = "shards"


def _atomic_json(path: Path, obj) -> None:
    """Temporary file, fsync, rename (:func:`peaknet.parallel.manifest.atomic_write_json`)."""
    from peaknet.parallel.manifest import atomic_write_json

    atomic_write_json(path, obj)


def _ranges(positions: Iterable[int]) -> list[list[int]]:
    """Sorted positions -> [[a, b), ...] half-open runs."""
    out: list[list[int]] = []
    for p in sorted(positions):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def _unranges(ranges) -> list[int]:
    return [p for a, b in ranges for p in range(a, b)]


# --------------------------------------------------------------------------------------------
# batch results
# --------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """What an inference step returns for one :class:`~peaknet.infer.sources.Batch`.

    positions: (B,) events processed; peaks: their PeakLists; skipped: [(position, reason)];
    frames: {position: frame} of hits when frames are written; worker: who computed it.
    """

    batch_id: str
    shard_id: str
    positions: np.ndarray
    peaks: list
    skipped: list = field(default_factory=list)
    frames: Optional[dict] = None
    worker: str = ""

    @property
    def n_events(self) -> int:
        return int(len(self.positions)) + len(self.skipped)


def make_result(batch, peaks: Sequence[PeakList], min_peaks: int,
                frames: Optional[np.ndarray] = None, worker: str = "") -> BatchResult:
    """A BatchResult from a batch (``batch_id``, ``shard_id``, ``positions``, ``skipped``) and
    its peak lists; with ``frames`` the frames of hits are kept."""
    positions = np.asarray(batch.positions, np.int64)
    if len(peaks) != len(positions):
        raise RuntimeError(f"batch {batch.batch_id}: {len(peaks)} peak lists for "
                           f"{len(positions)} frames")
    hit_frames = None
    if frames is not None:
        hit_frames = {int(p): np.array(frames[k]) for k, p in enumerate(positions)
                      if len(peaks[k]) >= min_peaks}
    return BatchResult(batch.batch_id, batch.shard_id, positions, list(peaks),
                       list(batch.skipped), hit_frames, worker)


# --------------------------------------------------------------------------------------------
# plan and fingerprints
# --------------------------------------------------------------------------------------------
def run_fingerprint(cfg) -> tuple[str, dict]:
    """(hash, description) of everything that decides a shard's output besides its input:
    predictor settings (weights content included) and output settings."""
    from .predictors import predictor_fingerprint

    desc = {"predictor": predictor_fingerprint(cfg.predictor),
            "output": dataclasses.asdict(cfg.output),
            "max_nonfinite_fraction": cfg.source.max_nonfinite_fraction}
    digest = hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, desc


@dataclass
class Plan:
    """The shards of a run, in order, plus what identifies its settings."""

    shards: list
    unreadable: list
    fingerprint: str
    settings: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return sum(s.n_events for s in self.shards)

    def by_id(self) -> dict:
        return {s.shard_id: s for s in self.shards}

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "settings": self.settings,
                "source": self.source, "unreadable": self.unreadable,
                "n_events": self.n_events, "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls([Shard.from_dict(s) for s in d["shards"]], list(d.get("unreadable", [])),
                   d["fingerprint"], d.get("settings", {}), d.get("source", {}))

    def save(self, out_dir) -> Path:
        path = Path(out_dir) / PLAN_FILE
        _atomic_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, out_dir) -> "Plan":
        return cls.from_dict(json.loads((Path(out_dir) / PLAN_FILE).read_text()))

    @classmethod
    def make(cls, source, cfg) -> "Plan":
        fp, desc = run_fingerprint(cfg)
        return cls(source.shards(), source.unreadable, fp, desc, source.describe())


def output_path(out_dir, shard_id: str) -> Path:
    return Path(out_dir) / f"{shard_id}.cxi"


def record_path(out_dir, shard_id: str) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{shard_id}.json"


def read_record(out_dir, shard_id: str) -> Optional[dict]:
    try:
        return json.loads(record_path(out_dir, shard_id).read_text())
    except (OSError, ValueError):
        return None


def finished_shards(out_dir, plan: Plan) -> set:
    """Ids of the plan's shards already done with the same input and settings."""
    done = set()
    for s in plan.shards:
        rec = read_record(out_dir, s.shard_id)
        if (rec is not None and rec.get("fingerprint") == plan.fingerprint
                and rec.get("shard_fingerprint") == s.fingerprint
                and rec.get("n_events") == s.n_events
                and output_path(out_dir, s.shard_id).is_file()):
            done.add(s.shard_id)
        elif rec is not None:
            log.info("shard %s has a record from other inputs/settings: redoing it", s.shard_id)
    return done


# --------------------------------------------------------------------------------------------
# one shard's output
# --------------------------------------------------------------------------------------------
class ShardCollector:
    """Collects a shard's batch results and writes its CXI file and record when complete.

    Parameters: the shard; the output folder; the run fingerprint; the ``[output]`` section;
    the geometry (slab coordinates in the file; None keeps module coordinates with the module
    index in ``peakSegPosRaw``).
    """

    def __init__(self, shard: Shard, out_dir, fingerprint: str, output, geometry=None):
        self.shard = shard
        self.out_dir = Path(out_dir)
        self.fingerprint = fingerprint
        self.output = output
        self.geometry = geometry
        self.results: dict[str, BatchResult] = {}
        self.state = np.zeros(shard.n_events, np.int8)  # 0 pending, 1 processed, 2 skipped
        self.duplicates = 0

    @property
    def complete(self) -> bool:
        return bool(self.state.all())

    @property
    def n_accounted(self) -> int:
        return int(np.count_nonzero(self.state))

    def missing(self) -> list[int]:
        return np.flatnonzero(self.state == 0).tolist()

    def add(self, res: BatchResult) -> bool:
        """Take a batch result; False (and nothing changes) for a batch already taken."""
        if res.shard_id != self.shard.shard_id:
            raise ValueError(f"result of {res.shard_id} given to shard {self.shard.shard_id}")
        if res.batch_id in self.results:
            self.duplicates += 1
            return False
        pos = np.asarray(res.positions, np.int64)
        sk = np.asarray([p for p, _ in res.skipped], np.int64)
        both = np.concatenate([pos, sk])
        if both.size and (both.min() < 0 or both.max() >= self.shard.n_events):
            raise ValueError(f"batch {res.batch_id}: positions outside shard {self.shard.shard_id}")
        if np.any(self.state[both] != 0) or np.unique(both).size != both.size:
            raise RuntimeError(f"batch {res.batch_id} covers events already accounted for "
                               f"in shard {self.shard.shard_id} (two batches overlap)")
        self.state[pos] = 1
        self.state[sk] = 2
        self.results[res.batch_id] = res
        return True

    def write(self) -> dict:
        """Write ``<shard_id>.cxi`` (hits in event order) then the record; return the record."""
        from peaknet.io.cxi import CXIWriter

        if not self.complete:
            raise RuntimeError(f"shard {self.shard.shard_id}: events {self.missing()[:10]} "
                               "missing; not writing an incomplete shard")
        out = self.output
        rows: list[tuple[int, PeakList, Optional[np.ndarray]]] = []
        skipped: list[tuple[int, str]] = []
        for r in self.results.values():
            for k, p in enumerate(r.positions):
                frame = r.frames.get(int(p)) if r.frames else None
                rows.append((int(p), r.peaks[k], frame))
            skipped.extend((int(p), why) for p, why in r.skipped)
        rows.sort(key=lambda t: t[0])
        skipped.sort()
        hits = [t for t in rows if len(t[1]) >= out.min_peaks]
        misses = [t[0] for t in rows if len(t[1]) < out.min_peaks]
        path = output_path(self.out_dir, self.shard.shard_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        compression = None if out.compression == "none" else out.compression
        writer = CXIWriter(path, max_peaks=out.max_peaks, geometry=self.geometry,
                           compression=compression, write_frames=out.write_frames)
        try:
            for pos, peaks, frame in hits:
                eid = self.shard.event_id(pos)
                scalars = {} if self.shard.files else {"event_number": eid.index}
                writer.append(peaks, str(eid), frame=frame if out.write_frames else None,
                              **scalars)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        rec = {
            "shard_id": self.shard.shard_id, "file": self.shard.file,
            "start": self.shard.start, "stop": self.shard.stop,
            "n_events": self.shard.n_events, "processed": len(rows), "hits": len(hits),
            "misses": len(misses), "n_skipped": len(skipped),
            "peaks": int(sum(len(t[1]) for t in rows)),
            "peaks_written": int(sum(min(len(t[1]), out.max_peaks) for t in hits)),
            "truncated_frames": int(writer.n_truncated_frames),
            "skipped": [{"event": str(self.shard.event_id(p)), "position": p, "reason": why}
                        for p, why in skipped],
            "miss_positions": _ranges(misses),
            "output": path.name, "batches": len(self.results),
            "duplicates_dropped": self.duplicates,
            "fingerprint": self.fingerprint, "shard_fingerprint": self.shard.fingerprint,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _atomic_json(record_path(self.out_dir, self.shard.shard_id), rec)
        return rec


# --------------------------------------------------------------------------------------------
# reading back, verification, summary
# --------------------------------------------------------------------------------------------
def read_outputs(out_dir, plan: Optional[Plan] = None) -> dict:
    """``{event id string: PeakList}`` of every hit written by a run (module coordinates when
    the plan's source had a geometry is not needed: lists are read as stored)."""
    from peaknet.io.cxi import read_peak_event_ids, read_peak_lists

    plan = plan or Plan.load(out_dir)
    out: dict = {}
    for s in plan.shards:
        path = output_path(out_dir, s.shard_id)
        if not path.is_file():
            continue
        ids = read_peak_event_ids(path) or []
        for eid, peaks in zip(ids, read_peak_lists(path)):
            if eid in out:
                raise RuntimeError(f"event {eid} written twice")
            out[eid] = peaks
    return out


def verify_outputs(out_dir, plan: Optional[Plan] = None) -> dict:
    """Check that every planned event is accounted for exactly once.

    Returns ``{"ok", "problems", "events", "hits", "misses", "skipped", "unreadable_inputs"}``;
    problems name the shard and the events (missing shard, event written twice, an event both
    written and listed as a miss or skipped, events missing, ids of another shard).
    """
    from peaknet.io.cxi import read_peak_event_ids

    plan = plan or Plan.load(out_dir)
    problems: list[str] = []
    seen: set = set()
    totals = Counter()
    for s in plan.shards:
        rec = read_record(out_dir, s.shard_id)
        path = output_path(out_dir, s.shard_id)
        if rec is None or not path.is_file():
            problems.append(f"{s.shard_id}: not finished (record or CXI file missing)")
            continue
        ids = read_peak_event_ids(path) or []
        expected = {str(s.event_id(k)): k for k in range(s.n_events)}
        count = Counter()
        for eid in ids:
            if eid not in expected:
                problems.append(f"{s.shard_id}: event {eid} does not belong to this shard")
                continue
            if eid in seen:
                problems.append(f"{s.shard_id}: event {eid} written more than once")
            seen.add(eid)
            count[expected[eid]] += 1
        for pos in _unranges(rec.get("miss_positions", [])):
            count[pos] += 1
        for sk in rec.get("skipped", []):
            count[int(sk["position"])] += 1
        dup = [p for p, c in count.items() if c > 1]
        lost = [p for p in range(s.n_events) if count[p] == 0]
        if dup:
            problems.append(f"{s.shard_id}: {len(dup)} event(s) accounted more than once, "
                            f"e.g. {s.event_id(dup[0])}")
        if lost:
            problems.append(f"{s.shard_id}: {len(lost)} event(s) missing, e.g. {s.event_id(lost[0])}")
        totals["events"] += s.n_events
        totals["hits"] += len(ids)
        totals["misses"] += int(rec.get("misses", 0))
        totals["skipped"] += len(rec.get("skipped", []))
    return {"ok": not problems, "problems": problems, "events": totals["events"],
            "hits": totals["hits"], "misses": totals["misses"], "skipped": totals["skipped"],
            "unreadable_inputs": len(plan.unreadable)}


def summarize(out_dir, plan: Plan, resumed: Iterable[str] = (), extra: Optional[dict] = None
              ) -> dict:
    """The run summary from the shard records; writes ``infer.skipped.jsonl`` and
    ``infer.summary.json``. ``resumed``: shards skipped because an earlier run finished them."""
    out_dir = Path(out_dir)
    resumed = set(resumed)
    recs, missing = [], []
    for s in plan.shards:
        rec = read_record(out_dir, s.shard_id)
        (recs if rec is not None and rec.get("fingerprint") == plan.fingerprint
         else missing).append(rec if rec is not None else s.shard_id)
    reasons = Counter()
    tmp = out_dir / f".{SKIPPED_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        for u in plan.unreadable:
            fh.write(json.dumps({"event": None, "file": u["file"], "reason": u["reason"]}) + "\n")
            reasons[u["reason"].split(":", 1)[0]] += 1
        for rec in recs:
            for sk in rec.get("skipped", []):
                fh.write(json.dumps({"event": sk["event"], "shard": rec["shard_id"],
                                     "reason": sk["reason"]}) + "\n")
                reasons[sk["reason"].split(":", 1)[0]] += 1
    os.replace(tmp, out_dir / SKIPPED_FILE)
    processed = sum(r["processed"] for r in recs)
    summary = {
        "events_in": plan.n_events,
        "events_processed": processed,
        "hits": sum(r["hits"] for r in recs),
        "misses": sum(r["misses"] for r in recs),
        "peaks": sum(r["peaks"] for r in recs),
        "peaks_written": sum(r["peaks_written"] for r in recs),
        "skipped": sum(r["n_skipped"] for r in recs),
        "skipped_by_reason": dict(reasons),
        "unreadable_inputs": len(plan.unreadable),
        "shards": len(plan.shards),
        "shards_done": len(recs),
        "shards_resumed": len(resumed),
        "shards_missing": [m for m in missing],
        "duplicates_dropped": sum(r.get("duplicates_dropped", 0) for r in recs),
        "fingerprint": plan.fingerprint,
        "out": str(out_dir),
    }
    summary["hit_rate"] = summary["hits"] / processed if processed else 0.0
    if extra:
        summary.update(extra)
    _atomic_json(out_dir / SUMMARY_FILE, summary)
    return summary
