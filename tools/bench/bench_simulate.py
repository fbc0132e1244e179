#!/usr/bin/env python
"""Throughput of the synthetic-frame generator (peaknet.simulate) per CPU core.

    .venv/bin/python tools/bench/bench_simulate.py [--frames 60] [--detector epix10ka2m] [--write-docs]

One process, one thread (``numba.set_num_threads(1)``, OMP/MKL/OpenBLAS threads 1, torch threads
1 if torch is loaded). After a warm-up (numba compilation, static maps), it times
``Simulator.frame(i)`` over ``--frames`` frames of the default config (50 % hits) and again with
every frame a hit, reporting frames/s from wall time and from the process CPU time (the CPU
figure is the one to read on a shared, loaded machine: it counts only the time this process ran).
It also times the stages of a hit frame (reflection prediction, spot rendering, photon noise /
ADU conversion) and, with ``--write``, the whole ``run`` (CXI shards with bitshuffle-compressed
frames + truth files) into a temporary directory.

``--write-docs`` replaces the section between ``<!-- bench:simulate -->`` and
``<!-- /bench:simulate -->`` of docs/benchmarks.md (creating the file or the section if absent)
and touches nothing else.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section  # noqa: E402

SECTION = "simulate"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            model = m.group(1).strip()
    except OSError:
        pass
    try:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # nproc honours it
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False, env=env).stdout.strip()
    except OSError:
        nproc = str(os.cpu_count())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, nproc {nproc} (load average {load:.1f} at start)"


def single_thread() -> None:
    import numba

    numba.set_num_threads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def time_frames(sim, start: int, n: int) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    hits = 0
    npk = 0
    for i in range(start, start + n):
        _, t = sim.frame(i)
        hits += int(t.hit)
        npk += t.n_detectable
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"n": n, "hits": hits, "wall": wall, "cpu": cpu, "fps_wall": n / wall, "fps_cpu": n / cpu,
            "det_per_hit": npk / max(hits, 1)}


def stage_times(sim, n: int) -> dict:
    """CPU ms per hit frame in the main stages (profiled by wrapping the module functions)."""
    import peaknet.simulate.generator as gen

    acc = {"predict": 0.0, "render": 0.0, "noise": 0.0}
    orig = {"predict": gen.predict_still, "render": gen.render_spots, "noise": gen.counts_to_adu}

    def wrap(name):
        f = orig[name]

        def g(*a, **k):
            c = time.process_time()
            try:
                return f(*a, **k)
            finally:
                acc[name] += time.process_time() - c
        return g

    gen.predict_still, gen.render_spots, gen.counts_to_adu = wrap("predict"), wrap("render"), wrap("noise")
    try:
        c0 = time.process_time()
        for i in range(n):
            sim.frame(10_000 + i)
        total = time.process_time() - c0
    finally:
        gen.predict_still, gen.render_spots, gen.counts_to_adu = orig["predict"], orig["render"], orig["noise"]
    out = {k: 1e3 * v / n for k, v in acc.items()}
    out["other"] = 1e3 * total / n - sum(out.values())
    out["total"] = 1e3 * total / n
    return out


def time_run(cfg, n: int) -> dict:
    from peaknet.simulate.writer import run

    with tempfile.TemporaryDirectory() as d:
        cfg.run.out = d
        cfg.run.frames = n
        cfg.run.frames_per_shard = max(1, n // 2)
        cfg.run.progress = False
        cfg.run.overwrite = True
        w0, c0 = time.perf_counter(), time.process_time()
        s = run(cfg)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        size = sum(p.stat().st_size for p in Path(d).glob("*.cxi")) / n
        tsize = sum(p.stat().st_size for p in Path(d).glob("*.truth.h5")) / n
    return {"n": n, "wall": wall, "cpu": cpu, "fps_wall": n / wall, "fps_cpu": n / cpu, "mb_frame": size / 1e6,
            "mb_truth": tsize / 1e6, "summary": s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=60, help="frames per timing (default 60)")
    ap.add_argument("--detector", default="epix10ka2m", choices=["cspad", "epix10ka2m", "jungfrau4m"])
    ap.add_argument("--write", action="store_true", help="also time run() writing shards")
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args(argv)

    single_thread()
    from peaknet.simulate import SimulateConfig, Simulator

    mach = machine()
    cfg = SimulateConfig()
    cfg.run.detector = args.detector
    c0 = time.process_time()
    sim = Simulator(cfg)
    init_s = time.process_time() - c0
    c0 = time.process_time()
    for i in range(3):  # warm-up: numba compilation or cache load
        sim.frame(100_000 + i)
    warm_s = time.process_time() - c0
    mixed = time_frames(sim, 0, args.frames)
    cfg_hit = SimulateConfig()
    cfg_hit.run.detector = args.detector
    cfg_hit.crystal.hit_fraction = 1.0
    sim_hit = Simulator(cfg_hit)
    sim_hit.frame(0)
    hits = time_frames(sim_hit, 0, args.frames)
    stages = stage_times(sim_hit, max(10, args.frames // 3))
    wr = time_run(cfg, max(4, args.frames // 2)) if args.write else None

    P, H, W = sim.stack_shape
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python tools/bench/bench_simulate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"## Synthetic frames: `peaknet.simulate` throughput per core ({args.detector})",
        "",
        f"Command: `{cmd.strip()}`.  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {mach}.  ",
        f"Detector: {args.detector}, stack ({P}, {H}, {W}) = {P * H * W / 1e6:.2f} Mpixel; default config "
        f"(lysozyme-like cell, {len(sim.hkl)} candidate reflections to {sim.d_min_enumerated:.2f} Å). "
        "One process, one thread (numba.set_num_threads(1), OMP/BLAS threads 1). "
        f"Set-up {init_s:.1f} s CPU (static maps, reflection list), warm-up {warm_s:.1f} s (numba cache).  ",
        "Frames/s from CPU time are the per-core figure (the machine is shared; wall time grows with its load).",
        "",
        "| frames | hits | detectable peaks / hit | frames/s per core (CPU time) | frames/s (wall) | ms/frame (CPU) |",
        "|---|---|---|---|---|---|",
        f"| default (hit_fraction 0.5) | {mixed['hits']}/{mixed['n']} | {mixed['det_per_hit']:.0f} | "
        f"**{mixed['fps_cpu']:.1f}** | {mixed['fps_wall']:.1f} | {1e3 * mixed['cpu'] / mixed['n']:.0f} |",
        f"| all hits (hit_fraction 1) | {hits['hits']}/{hits['n']} | {hits['det_per_hit']:.0f} | "
        f"**{hits['fps_cpu']:.1f}** | {hits['fps_wall']:.1f} | {1e3 * hits['cpu'] / hits['n']:.0f} |",
        "",
        f"Stages of a hit frame (CPU ms): reflection prediction {stages['predict']:.1f} (all lattices), "
        f"spot rendering + truth {stages['render']:.1f}, Poisson/readout noise + ADU {stages['noise']:.1f}, "
        f"other (projection, covariances, truth tables) {stages['other']:.1f}; total {stages['total']:.1f}.",
    ]
    if wr is not None:
        lines += [
            "",
            f"Writing (`run`, {wr['n']} frames, bitshuffle/LZ4 frames, gzip-1 truth mask): "
            f"{wr['fps_cpu']:.1f} frames/s per core (CPU), {wr['fps_wall']:.1f} frames/s wall; "
            f"{wr['mb_frame']:.1f} MB of CXI and {wr['mb_truth']:.2f} MB of truth per frame.",
        ]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        doc = write_section(SECTION, text)
        print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
