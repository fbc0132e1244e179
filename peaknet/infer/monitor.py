"""Run monitoring: periodic log lines, a metrics JSONL, a progress bar, stall detection.

The paper's pipeline tracked queue depths, GPU utilisation and throughput; this module does the
same for both pipelines:

- :class:`Monitor` runs a thread on the driver that, every ``interval_s`` (an ``Event.wait``,
  not a busy loop), calls a ``collect()`` function returning a dict of counters, derives rates
  from the previous sample, writes one JSON line to the metrics file, logs one line, moves the
  tqdm bar (events accounted for) and calls ``on_stall`` when no counter named in
  ``progress_keys`` moved for ``stall_timeout_s``.
- :func:`gpu_stats` reads GPU utilisation/memory through torch (``torch.cuda.utilization`` needs
  pynvml; it is skipped without it), for the inference actors' own stats.
- :func:`peak_rss_mb` is the process's peak resident memory.

Record fields (hybrid): ``t`` (s since start), ``queue`` (input queue: depth in frames and
batches, in flight, requeued, totals), ``results`` (per writer queue depth), ``actors`` (per
actor: frames, batches, busy fraction, wait seconds, restarted, GPU), ``writers`` (shards and
events written), ``rates`` (frames/s produced, computed; events/s written, over the last
interval), ``rss_mb`` (driver). Legacy ranks write their own file with the same ``rates``.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["Monitor", "gpu_stats", "peak_rss_mb", "format_line"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpu_stats(device=None) -> dict:
    """GPU memory (allocated/reserved/peak, MiB) and utilisation (%, needs pynvml) of the
    current CUDA device; {} without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {}
    if not torch.cuda.is_available():
        return {}
    out = {
        "gpu_name": torch.cuda.get_device_name(device),
        "gpu_mem_alloc_mb": torch.cuda.memory_allocated(device) / 2**20,
        "gpu_mem_reserved_mb": torch.cuda.memory_reserved(device) / 2**20,
        "gpu_mem_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
    }
    try:
        out["gpu_util"] = float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unavailable
        pass
    return out


def _get(d: dict, path: str, default=0.0):
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def format_line(rec: dict) -> str:
    """One human line for a metrics record."""
    r = rec.get("rates", {})
    parts = [f"t={rec.get('t', 0):.0f}s"]
    if "produced" in rec:
        parts.append(f"produced {rec['produced']} f ({r.get('produced_fps', 0):.1f}/s)")
    if "computed" in rec:
        parts.append(f"computed {rec['computed']} f ({r.get('computed_fps', 0):.1f}/s)")
    if "written" in rec:
        parts.append(f"written {rec['written']}/{rec.get('total', '?')} ev "
                     f"({r.get('written_eps', 0):.1f}/s)")
    q = rec.get("queue")
    if q:
        parts.append(f"queue {q.get('depth_frames', 0)}/{q.get('capacity', '?')} f, "
                     f"in flight {q.get('inflight', 0)}, requeued {q.get('requeued', 0)}")
    acts = rec.get("actors")
    if acts:
        busy = ",".join(f"{a.get('busy_fraction', 0):.2f}" for a in acts)
        parts.append(f"busy {busy}")
        gpu = [a for a in acts if "gpu_util" in a or "gpu_mem_alloc_mb" in a]
        if gpu:
            parts.append("gpu " + ",".join(
                f"{a.get('gpu_util', float('nan')):.0f}%/{a.get('gpu_mem_alloc_mb', 0):.0f}MB"
                for a in gpu))
    return " | ".join(parts)


class Monitor:
    """Periodic sampling on a background thread.

    collect: returns the current counters (see the module doc); must not block for long.
    out_path: JSONL file (None: no file); interval_s: seconds between samples; total: events
    expected (progress bar); rate_keys: ``{"produced_fps": "produced", ...}`` rates to derive
    from counters; progress_keys: counters whose change means progress (stall detection);
    on_stall(seconds): called once when nothing moved for ``stall_timeout_s``.
    """

    def __init__(self, collect: Callable[[], dict], out_path: Optional[Path], interval_s: float,
                 total: int = 0, progress: bool = True, label: str = "infer",
                 rate_keys: Optional[dict] = None, progress_keys: Sequence[str] = (),
                 stall_timeout_s: Optional[float] = None,
                 on_stall: Optional[Callable[[float], None]] = None, bar_key: str = "written"):
        self.collect = collect
        self.out_path = None if out_path is None else Path(out_path)
        self.interval_s = float(interval_s)
        self.total = int(total)
        self.label = label
        self.rate_keys = rate_keys or {}
        self.progress_keys = tuple(progress_keys)
        self.stall_timeout_s = stall_timeout_s
        self.on_stall = on_stall
        self.bar_key = bar_key
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = time.perf_counter()
        self._prev: Optional[dict] = None
        self._last_progress = time.perf_counter()
        self._progress_sig = None
        self._stalled = False
        self.records: list[dict] = []
        self._bar = None
        if progress and total:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=label, unit="ev", file=sys.stderr,
                                 disable=not sys.stderr.isatty(), mininterval=interval_s)
            except ImportError:  # pragma: no cover
                self._bar = None

    def start(self) -> "Monitor":
        self._t0 = time.perf_counter()
        self._last_progress = self._t0
        self._thread = threading.Thread(target=self._loop, name=f"{self.label}-monitor",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - monitoring must never kill the run
                log.debug("monitor sample failed: %s", exc)

    def sample(self) -> dict:
        """Take one sample now (also called by :meth:`stop` for the final record)."""
        now = time.perf_counter()
        rec = dict(self.collect())
        rec["t"] = round(now - self._t0, 3)
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        rec["rss_mb"] = round(peak_rss_mb(), 1)
        if self.total:
            rec.setdefault("total", self.total)
        rates = rec.setdefault("rates", {})
        if self._prev is not None:
            dt = max(1e-9, rec["t"] - self._prev["t"])
            for name, key in self.rate_keys.items():
                rates[name] = round((_get(rec, key) - _get(self._prev, key)) / dt, 3)
        for name, key in self.rate_keys.items():  # averages over the whole run so far
            rates[f"{name}_avg"] = round(_get(rec, key) / max(1e-9, rec["t"]), 3)
        sig = tuple(_get(rec, k) for k in self.progress_keys)
        if sig != self._progress_sig:
            self._progress_sig = sig
            self._last_progress = now
        elif (self.stall_timeout_s and not self._stalled
              and now - self._last_progress > self.stall_timeout_s):
            self._stalled = True
            log.error("%s: no progress for %.0f s", self.label, now - self._last_progress)
            if self.on_stall is not None:
                self.on_stall(now - self._last_progress)
        self._prev = rec
        self.records.append(rec)
        if self.out_path is not None:
            with open(self.out_path, "a") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")
        log.info("%s %s", self.label, format_line(rec))
        if self._bar is not None:
            done = int(_get(rec, self.bar_key))
            self._bar.update(max(0, done - self._bar.n))
        return rec

    def stop(self, final: bool = True) -> Optional[dict]:
        """Stop the thread; with ``final`` take a last sample and return it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 30)
        rec = None
        if final:
            try:
                rec = self.sample()
            except Exception as exc:  # noqa: BLE001
                log.debug("final monitor sample failed: %s", exc)
        if self._bar is not None:
            self._bar.close()
        return rec


def ensure_dir(path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def env_threads(default: int = 1) -> int:
    """Torch threads for this process: SLURM_CPUS_PER_TASK, else ``default``."""
    v = os.environ.get("SLURM_CPUS_PER_TASK")
    try:
        return max(1, int(v)) if v else default
    except ValueError:
        return default
