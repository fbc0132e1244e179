"""Part files, shard records, the run manifest, and the merge of parts into one output.

Layout of a run folder ``out/`` for a stage ``NAME`` (e.g. ``label``)::

    out/NAME.plan.json                 the plan (fingerprint, events, shards), rank 0 writes it
    out/parts/NAME-shard-000012.h5     part of shard 12 (HDF5; written as .tmp, then renamed)
    out/parts/NAME-shard-000012.json   its record: plan fingerprint, part size and digest, the
                                       status of every event (done, or skipped with kind+reason)
    out/<output>                       the merged output (e.g. labels.h5), rows in plan order
    out/NAME.manifest.jsonl            one line per input event: event, shard, status, reason
    out/NAME.summary.json              counts per status, per skip kind, stage counters, timing

A shard is complete when its record parses, names the current plan fingerprint, and its part
exists with the recorded size (and BLAKE2 digest with ``verify="digest"``). The record is
written after the part is renamed into place, both atomically (temporary file + ``os.replace``),
so a run killed at any moment leaves either a complete shard or one that a re-run redoes; a
re-run redoes exactly the incomplete shards and gives the same output.

Every part holds the generic per-event datasets ``/events/{index, event_id, frame, status,
kind, reason}`` (one row per event of the shard, skipped ones included) next to the stage's
own datasets. :func:`merge_parts` concatenates every dataset of the parts along its first axis,
in shard order, streaming: per-row chunks (e.g. one label mask per chunk) are copied as
compressed bytes without decompressing them, other datasets in blocks of rows.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence

import h5py
import numpy as np

from .partition import Plan, Shard
from .task import PartWriter, ShardTask, Skip

log = logging.getLogger(__name__)

__all__ = [
    "DONE",
    "SKIPPED",
    "RunDir",
    "ShardRecord",
    "PartBuilder",
    "RowAppender",
    "write_string_dataset",
    "atomic_write_text",
    "atomic_write_json",
    "file_digest",
    "load_record",
    "merge_parts",
    "write_manifest",
    "read_manifest",
    "summarize_records",
    "add_counters",
]

DONE, SKIPPED = "done", "skipped"
STATUS_CODES = {DONE: 0, SKIPPED: 1}
RECORD_VERSION = 1
Verify = Literal["digest", "size"]


# --------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------
def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp.{os.getpid()}")


def atomic_write_text(path: os.PathLike | str, text: str) -> Path:
    """Write ``text`` to a temporary sibling (unique per process), fsync, rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: os.PathLike | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def file_digest(path: os.PathLike | str, block: int = 1 << 22) -> str:
    """``"blake2b:<hex>"`` of the file's bytes."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(block)
            if not buf:
                break
            h.update(buf)
    return "blake2b:" + h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def add_counters(total: dict, more: dict) -> dict:
    """Add nested dicts of numbers (``total`` is updated and returned)."""
    for k, v in more.items():
        if isinstance(v, dict):
            add_counters(total.setdefault(k, {}), v)
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + (v.item() if hasattr(v, "item") else v)
        else:
            total.setdefault(k, v)
    return total


# --------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------
class RunDir:
    """Paths of a run folder for stage ``name`` (see the module docstring)."""

    def __init__(self, out: os.PathLike | str, name: str, output_name: str):
        self.out = Path(out)
        self.name = name
        self.output_name = output_name
        self.parts = self.out / "parts"

    def part(self, shard: int) -> Path:
        return self.parts / f"{self.name}-shard-{shard:06d}.h5"

    def record(self, shard: int) -> Path:
        return self.parts / f"{self.name}-shard-{shard:06d}.json"

    @property
    def plan(self) -> Path:
        return self.out / f"{self.name}.plan.json"

    @property
    def output(self) -> Path:
        return self.out / self.output_name

    @property
    def manifest(self) -> Path:
        return self.out / f"{self.name}.manifest.jsonl"

    @property
    def summary(self) -> Path:
        return self.out / f"{self.name}.summary.json"

    def makedirs(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)

    def stray_parts(self, n_shards: int) -> list[Path]:
        """Part and record files of shards >= n_shards (left by an earlier, larger plan)."""
        out = []
        for p in self.parts.glob(f"{self.name}-shard-*"):
            stem = p.name.split(".", 1)[0]
            try:
                i = int(stem.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                continue
            if i >= n_shards:
                out.append(p)
        return out


# --------------------------------------------------------------------------------------------
# shard records
# --------------------------------------------------------------------------------------------
@dataclass
class ShardRecord:
    """What a finished shard left: see the module docstring. ``skipped``: ``[k, kind, reason]``
    rows (k = event position in the plan); every other event of ``start..stop-1`` is done."""

    stage: str
    shard: int
    start: int
    stop: int
    plan: str
    part: str
    size: int
    digest: str
    counts: dict
    skipped: list
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0
    host: str = ""
    written: str = ""
    version: int = RECORD_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ShardRecord":
        return cls(**d)

    def skipped_map(self) -> dict[int, tuple[str, str]]:
        return {int(k): (str(kind), str(reason)) for k, kind, reason in self.skipped}


def load_record(run: RunDir, shard: Shard, plan_fp: str, verify: Verify = "digest"
                ) -> tuple[Optional[ShardRecord], str]:
    """The shard's record if the shard is complete for plan ``plan_fp``; else (None, why)."""
    path = run.record(shard.id)
    if not path.is_file():
        return None, "no record"
    try:
        rec = ShardRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        return None, f"unreadable record ({exc})"
    if rec.version != RECORD_VERSION or rec.plan != plan_fp:
        return None, f"record of another plan ({rec.plan})"
    if (rec.shard, rec.start, rec.stop) != (shard.id, shard.start, shard.stop):
        return None, "record of another shard range"
    if rec.counts.get(DONE, 0) + rec.counts.get(SKIPPED, 0) != len(shard):
        return None, "record does not account for every event"
    part = run.parts / rec.part
    try:
        size = part.stat().st_size
    except OSError:
        return None, "part file missing"
    if size != rec.size:
        return None, f"part size {size} != recorded {rec.size}"
    if verify == "digest" and file_digest(part) != rec.digest:
        return None, "part digest differs from the record (corrupt)"
    return rec, "complete"


# --------------------------------------------------------------------------------------------
# writing parts
# --------------------------------------------------------------------------------------------
def _gzip(level: Optional[int]) -> dict:
    return {} if not level else {"compression": "gzip", "compression_opts": int(level)}


def write_string_dataset(group: h5py.Group, name: str, values: Sequence[str],
                         level: Optional[int] = 4, **attrs) -> h5py.Dataset:
    """Strings as a fixed-width UTF-8 bytes dataset (compressible, unlike variable-length
    strings); :func:`merge_parts` widens the width across parts."""
    raw = [str(v).encode("utf-8") for v in values]
    width = max([len(r) for r in raw] + [1])
    arr = np.array(raw, dtype=f"S{width}")
    opts = _gzip(level) if arr.size else {}
    ds = group.create_dataset(name, data=arr, maxshape=(None,), chunks=(max(1, min(arr.size, 4096)),)
                              if arr.size else None, **opts)
    for k, v in attrs.items():
        ds.attrs[k] = v
    return ds


class RowAppender:
    """Buffered appends of rows to resizable, chunked, compressed datasets of one group.

    ``columns``: name -> dtype, or name -> (dtype, row_shape). Rows are buffered and written
    ``flush_rows`` at a time. Every column must get the same number of rows per append.
    """

    def __init__(self, group: h5py.Group, columns: dict, chunk_rows: int = 4096,
                 level: Optional[int] = 4, flush_rows: int = 65536, attrs: Optional[dict] = None):
        self.group = group
        self.flush_rows = int(flush_rows)
        self.n_rows = 0
        self._buf: dict[str, list] = {}
        self._pending = 0
        self.datasets: dict[str, h5py.Dataset] = {}
        for name, spec in columns.items():
            dt, shape = (spec, ()) if not isinstance(spec, tuple) else spec
            shape = tuple(shape)
            self.datasets[name] = group.create_dataset(
                name, (0,) + shape, np.dtype(dt), maxshape=(None,) + shape,
                chunks=(max(1, chunk_rows),) + shape, **_gzip(level))
            for k, v in (attrs or {}).get(name, {}).items():
                self.datasets[name].attrs[k] = v
            self._buf[name] = []

    def append(self, **cols) -> None:
        n = None
        for name, ds in self.datasets.items():
            if name not in cols:
                raise KeyError(f"RowAppender({self.group.name}): column {name!r} missing")
            a = np.asarray(cols[name], dtype=ds.dtype)
            if a.ndim == 0:
                a = a.reshape(1)
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"column {name!r} has {a.shape[0]} rows, expected {n}")
            self._buf[name].append(a)
        self._pending += n or 0
        if self._pending >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            for b in self._buf.values():
                b.clear()
            return
        i0, i1 = self.n_rows, self.n_rows + self._pending
        for name, ds in self.datasets.items():
            block = np.concatenate(self._buf[name], axis=0)
            ds.resize((i1,) + ds.shape[1:])
            ds[i0:i1] = block
            self._buf[name].clear()
        self.n_rows = i1
        self._pending = 0


class PartBuilder:
    """Builds the part of one shard: the generic ``/events`` datasets plus the stage's own (its
    :class:`PartWriter`), then renames it into place and writes the record.

    Call :meth:`add` once per event of the shard, in order, then :meth:`finish`; on any error
    :meth:`abort` (removes the temporary file; the shard stays incomplete).
    """

    def __init__(self, run: RunDir, plan: Plan, shard: Shard, task: ShardTask,
                 rank: int = 0, level: Optional[int] = 4):
        self.run, self.plan, self.shard, self.task = run, plan, shard, task
        self.rank = rank
        self.level = level
        self.path = run.part(shard.id)
        self.tmp = _tmp_name(self.path)
        run.makedirs()
        run.record(shard.id).unlink(missing_ok=True)  # an old record must not outlive its part
        self.h5: Optional[h5py.File] = h5py.File(self.tmp, "w")
        self._status: list[int] = []
        self._kind: list[str] = []
        self._reason: list[str] = []
        self._skipped: list = []
        self.next = shard.start
        try:
            self.writer: PartWriter = task.open_writer(self.h5, plan, shard)
        except BaseException:
            self.abort()
            raise

    def add(self, k: int, result: Any) -> None:
        if k != self.next:
            raise RuntimeError(f"shard {self.shard.id}: event {k} added, expected {self.next}")
        if isinstance(result, Skip):
            self.writer.skip(k, result)
            self._status.append(STATUS_CODES[SKIPPED])
            self._kind.append(result.kind)
            self._reason.append(result.reason)
            self._skipped.append([k, result.kind, result.reason])
        else:
            self.writer.write(k, result)
            self._status.append(STATUS_CODES[DONE])
            self._kind.append("")
            self._reason.append("")
        self.next += 1

    def _write_events(self) -> None:
        s = self.shard
        g = self.h5.require_group("events")
        ev = self.plan.events
        lvl = self.level
        g.create_dataset("index", data=np.arange(s.start, s.stop, dtype=np.int64), **_gzip(lvl))
        g.create_dataset("frame", data=ev.index[s.start:s.stop], **_gzip(lvl))
        st = g.create_dataset("status", data=np.asarray(self._status, np.uint8), **_gzip(lvl))
        st.attrs["values"] = "0 done, 1 skipped"
        write_string_dataset(g, "event_id", ev.ids(s.start, s.stop), lvl)
        write_string_dataset(g, "kind", self._kind, lvl)
        write_string_dataset(g, "reason", self._reason, lvl)
        for name in ("index", "frame", "status", "event_id", "kind", "reason"):
            g[name].attrs["rows"] = "event"
        g.attrs["about"] = ("one row per input event in plan order: index = position in the plan, "
                            "event_id = '<file>//<frame>', status 0 done / 1 skipped")

    def finish(self, seconds: float = 0.0) -> ShardRecord:
        if self.next != self.shard.stop:
            raise RuntimeError(f"shard {self.shard.id}: {self.next - self.shard.start} of "
                               f"{len(self.shard)} events added")
        try:
            stats = self.writer.close() or {}
            self._write_events()
            self.h5.attrs.update({"stage": self.task.name, "plan": self.plan.fingerprint,
                                  "shard": self.shard.id, "start": self.shard.start,
                                  "stop": self.shard.stop})
            self.h5.close()
            self.h5 = None
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        n_skip = len(self._skipped)
        rec = ShardRecord(
            stage=self.task.name, shard=self.shard.id, start=self.shard.start,
            stop=self.shard.stop, plan=self.plan.fingerprint, part=self.path.name,
            size=self.path.stat().st_size, digest=file_digest(self.path),
            counts={DONE: len(self.shard) - n_skip, SKIPPED: n_skip}, skipped=self._skipped,
            stats=stats, seconds=round(float(seconds), 3), rank=self.rank,
            host=socket.gethostname(), written=_now())
        atomic_write_json(self.run.record(self.shard.id), rec.to_json())
        return rec

    def abort(self) -> None:
        if self.h5 is not None:
            try:
                self.h5.close()
            except Exception:  # noqa: BLE001
                pass
            self.h5 = None
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------------
def _datasets(h5: h5py.File) -> list[str]:
    names: list[str] = []
    h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def _groups(h5: h5py.File) -> list[str]:
    names: list[str] = []
    h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Group) else None)
    return names


def _filters(ds: h5py.Dataset) -> tuple:
    return (ds.compression, ds.compression_opts, ds.shuffle, ds.fletcher32, ds.scaleoffset)


def merge_parts(parts: Sequence[os.PathLike | str], out_path: os.PathLike | str,
                attrs: Optional[dict] = None, block_bytes: int = 64 << 20) -> Path:
    """Concatenate every dataset of ``parts`` (in order) along axis 0 into ``out_path``.

    Datasets keep their dtype (fixed-width strings are widened to the widest part), trailing
    shape, chunking, compression, fill value and attributes (those of the first part that has
    them); group attributes come from the first part. Datasets chunked one row per chunk are
    copied chunk by chunk as stored bytes (no decompression); rows never written stay unwritten
    (fill value). Datasets marked ``attrs["rows"] == "event"`` must have one row per event of
    their part. Written to a temporary file and renamed. Returns ``out_path``.
    """
    out_path = Path(out_path)
    parts = [Path(p) for p in parts]
    specs: dict[str, dict] = {}
    rows: list[dict[str, int]] = []
    group_attrs: dict[str, dict] = {}
    for p in parts:
        with h5py.File(p, "r") as h5:
            n_events = int(h5.attrs.get("stop", 0)) - int(h5.attrs.get("start", 0))
            r = {}
            for name in _datasets(h5):
                ds = h5[name]
                if ds.ndim == 0:
                    raise ValueError(f"{p}: dataset {name} is a scalar; parts hold row datasets only")
                r[name] = ds.shape[0]
                if ds.attrs.get("rows") == "event" and ds.shape[0] != n_events:
                    raise ValueError(f"{p}: {name} has {ds.shape[0]} rows for {n_events} events")
                spec = specs.get(name)
                if spec is None:
                    specs[name] = dict(dtype=ds.dtype, tail=ds.shape[1:], chunks=ds.chunks,
                                       filters=_filters(ds), fill=ds.fillvalue,
                                       attrs=dict(ds.attrs))
                    continue
                if spec["tail"] != ds.shape[1:]:
                    raise ValueError(f"{p}: {name} has rows of shape {ds.shape[1:]}, "
                                     f"other parts {spec['tail']}")
                if spec["dtype"].kind == "S" and ds.dtype.kind == "S":
                    if ds.dtype.itemsize > spec["dtype"].itemsize:
                        spec["dtype"] = ds.dtype
                elif spec["dtype"] != ds.dtype:
                    raise ValueError(f"{p}: {name} has dtype {ds.dtype}, other parts {spec['dtype']}")
                if spec["chunks"] is None and ds.chunks is not None:
                    spec.update(chunks=ds.chunks, filters=_filters(ds))
            for g in _groups(h5):
                group_attrs.setdefault(g, dict(h5[g].attrs))
            rows.append(r)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(out_path)
    try:
        # the output's datasets stay open for the whole copy, each with a chunk cache of a few
        # chunks: closing one (or evicting a partly written chunk) would compress it, and the
        # next part would decompress it again
        with h5py.File(tmp, "w", rdcc_nbytes=4 << 20, rdcc_nslots=1031) as out:
            dsts: dict[str, h5py.Dataset] = {}
            for g, a in group_attrs.items():
                out.require_group(g).attrs.update(a)
            for name, spec in specs.items():
                total = sum(r.get(name, 0) for r in rows)
                comp, opts, shuffle, fletcher, scaleoffset = spec["filters"]
                kw = {}
                chunks = spec["chunks"]
                row_bytes = max(1, spec["dtype"].itemsize * int(np.prod(spec["tail"], dtype=np.int64)))
                big = max(1, min(65536, (1 << 20) // row_bytes))  # ~1 MB chunks for row tables
                if chunks is None:  # contiguous in the parts: chunk it for the merge
                    chunks = (max(1, min(big, total)),) + tuple(spec["tail"])
                else:
                    if chunks[0] != 1:  # one row per chunk is kept (direct chunk copy)
                        chunks = (max(1, min(max(chunks[0], big), total)),) + tuple(chunks[1:])
                    kw = dict(compression=comp, compression_opts=opts, shuffle=shuffle,
                              fletcher32=fletcher, scaleoffset=scaleoffset)
                    kw = {k: v for k, v in kw.items() if v not in (None, False)}
                ds = out.create_dataset(name, (total,) + tuple(spec["tail"]), spec["dtype"],
                                        maxshape=(None,) + tuple(spec["tail"]), chunks=chunks,
                                        fillvalue=spec["fill"], **kw)
                ds.attrs.update(spec["attrs"])
                dsts[name] = ds
            offsets = {name: 0 for name in specs}
            for p, r in zip(parts, rows):
                with h5py.File(p, "r") as h5:
                    for name, n in r.items():
                        if n:
                            _copy_rows(h5[name], dsts[name], offsets[name], block_bytes)
                        offsets[name] += n
            out.attrs.update(attrs or {})
            out.attrs["n_parts"] = len(parts)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, offset: int, block_bytes: int) -> None:
    n = src.shape[0]
    tail_zero = (0,) * (src.ndim - 1)
    one_chunk_per_row = (src.chunks is not None and src.chunks == dst.chunks
                         and src.chunks[0] == 1 and tuple(src.chunks[1:]) == tuple(src.shape[1:]))
    if (one_chunk_per_row and src.dtype == dst.dtype and _filters(src) == _filters(dst)
            and src.compression is not None):
        for i in range(n):
            coord = (i,) + tail_zero
            info = src.id.get_chunk_info_by_coord(coord)
            if info.byte_offset is None:  # never written: stays the fill value
                continue
            mask, data = src.id.read_direct_chunk(coord)
            dst.id.write_direct_chunk((offset + i,) + tail_zero, data, mask)
        return
    row_bytes = max(1, src.dtype.itemsize * int(np.prod(src.shape[1:], dtype=np.int64)))
    step = max(1, block_bytes // row_bytes)
    if src.chunks is not None:
        step = max(src.chunks[0], step - step % src.chunks[0])
    for a in range(0, n, step):
        b = min(n, a + step)
        dst[offset + a:offset + b] = src[a:b]


# --------------------------------------------------------------------------------------------
# manifest and summary
# --------------------------------------------------------------------------------------------
def write_manifest(run: RunDir, plan: Plan, records: Iterable[ShardRecord]) -> Path:
    """``NAME.manifest.jsonl``: one line per event of the plan, in order:
    ``{"event", "index", "shard", "status", "kind", "reason"}`` (kind/reason null when done)."""
    tmp = _tmp_name(run.manifest)
    n = 0
    with open(tmp, "w") as fh:
        for rec in records:
            skipped = rec.skipped_map()
            for k in range(rec.start, rec.stop):
                kind, reason = skipped.get(k, (None, None))
                fh.write(json.dumps({
                    "event": plan.events.id(k), "index": k, "shard": rec.shard,
                    "status": SKIPPED if kind is not None else DONE, "kind": kind,
                    "reason": reason}) + "\n")
                n += 1
        fh.flush()
        os.fsync(fh.fileno())
    if n != plan.n_events:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"manifest would list {n} events, the plan has {plan.n_events}")
    os.replace(tmp, run.manifest)
    return run.manifest


def read_manifest(path: os.PathLike | str) -> Iterator[dict]:
    """The rows of a ``*.manifest.jsonl`` (streamed)."""
    with open(path) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def summarize_records(records: Iterable[ShardRecord]) -> dict:
    """Event counts per status and per skip kind, stage counters summed over shards."""
    counts = {DONE: 0, SKIPPED: 0}
    kinds: dict[str, int] = {}
    stats: dict = {}
    examples: dict[str, str] = {}
    n = 0
    for rec in records:
        n += 1
        counts[DONE] += int(rec.counts.get(DONE, 0))
        counts[SKIPPED] += int(rec.counts.get(SKIPPED, 0))
        for k, kind, reason in rec.skipped:
            kinds[kind] = kinds.get(kind, 0) + 1
            examples.setdefault(kind, reason)
        add_counters(stats, rec.stats)
    return {"events": counts, "skipped_by_kind": dict(sorted(kinds.items())),
            "skip_examples": examples, "stats": stats, "n_records": n}
