#!/usr/bin/env python
"""Benchmark the label stage under MPI: peaks/s with 1 and 2 ranks, and memory over >= 100k peaks.

    .venv/bin/python tools/bench/bench_label_scale.py [--peaks 100000] [--subset-frames 24] \\
        [--work runs/bench-label] [--write-docs]

Inputs: thermolysin frames on the full CSPAD (``thermolysin_cspad_config``, stack (32, 185, 388))
from the generator with their truth peak lists, written as CXI files. ``--unique`` frames are
generated and written over and over (event ids ``bench/<i>``) until the files hold ``--peaks``
peaks: fitting a repeated frame costs the same as a new one, and generating 100k peaks' worth of
frames would cost more than labelling them. The files are kept in ``--work/inputs`` and reused.

Runs (each ``mpiexec -n N .venv/bin/python -m jobs.label --run.backend=mpi``, fresh output,
default ``[fit]`` config on the CPU, one torch thread per rank): the first ``--subset-frames``
frames with 1 rank and with 2 ranks (throughput), then every frame with 2 ranks (throughput and
peak memory: the largest max RSS over the ranks, from the summary). Peaks/s counts every input
peak (fitted or rejected before the fit) over the ranks' processing time (start-up, planning and
the merge excluded; the wall time is shown too).

``--write-docs`` replaces the ``<!-- bench:label-scale -->`` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section  # noqa: E402

SECTION = "label-scale"
PY = Path(sys.executable)
MPIEXEC = PY.parent / "mpiexec"


def make_inputs(work: Path, target_peaks: int, unique: int, per_file: int, seed: int) -> dict:
    """CXI files of repeated generator frames holding >= target_peaks peaks (cached)."""
    import numpy as np

    from peaknet.io.cxi import CXIWriter
    from peaknet.simulate.config import thermolysin_cspad_config
    from peaknet.simulate.generator import Simulator

    d = work / "inputs"
    meta_path = d / "meta.json"
    want = {"target_peaks": target_peaks, "unique": unique, "per_file": per_file, "seed": seed}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == want and all(Path(f).is_file() for f in meta["files"]):
            return meta
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.cxi"):
        old.unlink()
    t0 = time.perf_counter()
    sim = Simulator(thermolysin_cspad_config(frames=unique, seed=seed))
    made = []
    for i in range(unique):
        frame, truth = sim.frame(i)
        made.append((frame, truth.peaks()))
    t_gen = time.perf_counter() - t0
    files, n_frames, n_peaks, counts = [], 0, 0, []
    writer = None
    while n_peaks < target_peaks:
        if writer is None:
            path = d / f"bench-{len(files):03d}.cxi"
            writer = CXIWriter(path, max_peaks=2048, write_frames=True, compression="gzip")
            files.append(str(path))
        frame, peaks = made[n_frames % unique]
        writer.append(peaks, f"bench/{n_frames}", frame=frame)
        n_frames += 1
        n_peaks += len(peaks)
        counts.append(len(peaks))
        if writer.n_frames >= per_file:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()
    meta = {"params": want, "files": files, "frames": n_frames, "peaks": n_peaks,
            "peaks_per_frame": [int(c) for c in counts], "unique_peaks": int(sum(len(p) for _, p in made)),
            "generate_s": round(t_gen, 1), "write_s": round(time.perf_counter() - t0 - t_gen, 1),
            "frame_shape": list(made[0][0].shape)}
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"inputs: {n_frames} frames, {n_peaks} peaks in {len(files)} files "
          f"({unique} unique frames, {np.mean(counts):.0f} peaks/frame)", flush=True)
    return meta


def run_label(ranks: int, files: list, out: Path, extra: list) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(MPIEXEC), "-n", str(ranks), str(PY), "-m", "jobs.label",
           f"--run.inputs={json.dumps(files)}", f"--run.out={out}", "--run.backend=mpi",
           "--run.progress=false", "--run.resume=false", "--fit.device=cpu", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_"))}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    s = json.loads(line)
    t = s["this_run"]
    res = {"ranks": ranks, "events": s["n_events"], "peaks": t["peaks_processed"],
           "process_s": t["process_seconds"], "wall_s": round(wall, 1),
           "peaks_per_s": t["peaks_per_s"], "cpu_s": t.get("cpu_seconds"),
           "peaks_per_cpu_s": t.get("peaks_per_cpu_s"), "max_rss_mb": t["max_rss_mb"],
           "rss_mb_per_rank": t["rss_mb_per_rank"], "by_status": s["peaks"]["by_status"],
           "merge_s": s.get("merge_seconds"), "output_mb": round(s["output_size"] / 2**20, 1)}
    print(json.dumps(res), flush=True)
    return res


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, nproc {os.cpu_count()}, {mem:.0f} GiB, {platform.system()} {platform.release()}"


def report(res: dict) -> str:
    """The docs section from the results of a run (see ``results.json``)."""
    from peaknet.label.config import LabelFitConfig

    _fit = LabelFitConfig()
    a, meta, r1, r2, big = res["args"], res["meta"], res["r1"], res["r2"], res["big"]
    load0, load1 = res["load"]
    argv = [x for x in res["argv"] if x != "--docs-from-results"]
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python tools/bench/bench_label_scale.py " + " ".join(argv)

    def cores(r):
        return r["cpu_s"] / r["process_s"] if r["process_s"] else 0.0

    rows = [("1", r1, f"first {a['subset_frames']}"), ("2", r2, f"first {a['subset_frames']}")]
    if big:
        rows.append(("2", big, "all"))
    lines = [
        "## Label stage under MPI: peaks/s with 1 and 2 ranks, memory over >= 100k peaks",
        "",
        f"Command: `{cmd.strip()}`.  ",
        f"Date: {res['started']} UTC. Machine: {res['machine']} (load average {load0:.1f} at "
        f"start, {load1:.1f} at the end: the machine is shared with other work).  ",
        f"Inputs: {meta['frames']} thermolysin frames on the full CSPAD (stack {tuple(meta['frame_shape'])}, "
        f"float32, gzip CXI), {meta['peaks']} truth peaks ({meta['peaks'] // max(meta['frames'], 1)} per "
        f"frame); {a['unique']} distinct generated frames ({meta['unique_peaks']} peaks) written over and over.  ",
        f"Run: `mpiexec -n N .venv/bin/python -m jobs.label --run.backend=mpi`, shard_size {a['shard_size']}, "
        f"batch_frames {a['batch_frames']}, chunk_peaks {a['chunk_peaks']}; `[fit]` defaults (batched "
        f"solver, CPU, max_nfev {_fit.max_nfev}, restart_nfev {_fit.restart_nfev}, redchi_max "
        f"{_fit.redchi_max:g}) with `--fit.adu_per_photon=10` (CSPAD gain: fits in photon units), one "
        "torch thread per rank. Peaks/s = input peaks / the ranks' "
        "processing time (reading, windows, fits, labels, part writing; start-up, planning and the "
        "merge excluded). Peaks per CPU-second = input peaks / the ranks' CPU time in that phase: the "
        "per-core rate, which the other work on the machine does not change; \"cores used\" = CPU "
        "time / processing time.",
        "",
        "| ranks | frames | peaks | processing s | wall s | **peaks/s** | cores used | peaks per CPU-s | "
        "max RSS over ranks (MB) | RSS per rank (MB) | output MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r, what in rows:
        lines.append(
            f"| {name} | {r['events']} ({what}) | {r['peaks']} | {r['process_s']} | {r['wall_s']} | "
            f"**{r['peaks_per_s']:.0f}** | {cores(r):.2f} | {r['peaks_per_cpu_s']:.0f} | "
            f"{r['max_rss_mb']:.0f} | {', '.join(f'{x:.0f}' for x in r['rss_mb_per_rank'])} | "
            f"{r['output_mb']} |")
    speed = r2["peaks_per_s"] / r1["peaks_per_s"] if r1["peaks_per_s"] else 0.0
    per_core = r2["peaks_per_cpu_s"] / r1["peaks_per_cpu_s"] if r1["peaks_per_cpu_s"] else 0.0
    lines += ["", f"- 2 ranks vs 1 on the same frames: **{speed:.2f}x** the peaks/s, with "
              f"{cores(r1):.2f} and {cores(r2):.2f} cores in use; per CPU-second 2 ranks do "
              f"{per_core:.2f}x what 1 rank does, so the speed-up is what the free cores allow."]
    if big:
        st = big["by_status"]
        lines.append(
            f"- Over {big['peaks']} peaks the largest rank stayed at **{big['max_rss_mb']:.0f} MB** "
            f"max RSS ({r1['max_rss_mb']:.0f} MB over {r1['peaks']} peaks with 1 rank): frames are "
            "read one at a time and only one batch of windows is held, so memory does not grow "
            f"with the run. {big['peaks_per_s']:.0f} peaks/s with {cores(big):.2f} cores in use. "
            "Statuses: " + ", ".join(f"{k} {v}" for k, v in st.items() if v) +
            f". Finish (merge of {-(-big['events'] // int(a['shard_size']))} parts, manifest, summary): "
            f"{big['merge_s']} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peaks", type=int, default=100_000, help="peaks in the big run (>=)")
    ap.add_argument("--unique", type=int, default=24, help="distinct generated frames")
    ap.add_argument("--per-file", type=int, default=32, help="frames per CXI file")
    ap.add_argument("--subset-frames", type=int, default=24, help="frames of the 1- vs 2-rank runs")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--batch-frames", type=int, default=4)
    ap.add_argument("--chunk-peaks", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-label")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--docs-from-results", action="store_true",
                    help="no runs: rebuild the text from <work>/results.json of the last run")
    a = ap.parse_args(argv)
    results_path = a.work / "results.json"
    if a.docs_from_results:
        res = json.loads(results_path.read_text())
    else:
        started = dt.datetime.now(dt.timezone.utc)
        load0 = os.getloadavg()[0]
        meta = make_inputs(a.work, a.peaks, a.unique, a.per_file, a.seed)
        extra = [f"--run.shard_size={a.shard_size}", f"--run.batch_frames={a.batch_frames}",
                 f"--run.chunk_peaks={a.chunk_peaks}",
                 # the inputs carry no geometry: give the generator's CSPAD gain (ADU per photon)
                 "--fit.adu_per_photon=10"]
        sub = extra + [f"--run.max_events={a.subset_frames}"]
        r1 = run_label(1, meta["files"], a.work / "out-1rank", sub)
        r2 = run_label(2, meta["files"], a.work / "out-2ranks", sub)
        big = None if a.skip_big else run_label(2, meta["files"], a.work / "out-big", extra)
        res = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
               "argv": list(argv if argv is not None else sys.argv[1:]),
               "started": f"{started:%Y-%m-%d %H:%M}", "load": [load0, os.getloadavg()[0]],
               "machine": machine(), "meta": meta, "r1": r1, "r2": r2, "big": big}
        results_path.write_text(json.dumps(res, indent=1))
    text = report(res)
    print(text)
    if a.write_docs:
        write_section(SECTION, text)
        print(f"wrote the {SECTION} section of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
