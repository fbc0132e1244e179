#!/usr/bin/env python
"""Benchmark inference: the model alone, the hybrid pipeline and the legacy coupling, on the same
data and model, in one run; peak memory over >= 10k generated frames; GPU throughput (CUDA only).

    .venv/bin/python tools/bench/bench_infer.py [--frames 256] [--rss-frames 10000] [--write-docs]

What is measured
----------------
- **model alone**: ``predictor.predict`` on batches already in memory, in G processes at once
  (1 torch thread each, started together through a file barrier): the compute bound of G
  inference actors, without reading, queues or writing.
- **hybrid** (P producers x G actors): ``mpiexec -n P python -m jobs.infer`` against a private
  loopback Ray head started here (tools/cluster/ray_up.sh), 1 writer; frames/s in steady state
  = frames / (last shard written - first actor ready): Ray start and model builds excluded.
- **legacy** (R ranks): ``mpiexec -n R python -m jobs.infer_mpi``; frames/s = frames / slowest
  rank's time after its model build (reading, computing and writing included).
- pipeline efficiency = pipeline frames/s / model-alone frames/s with as many model processes
  as the pipeline has actors (ranks); and hybrid / legacy at equal model processes.
- **peak RSS**: the hybrid pipeline fed by the generator (frames made on the fly, nothing on
  disk) with the peakfinder8 predictor (so 10k frames take minutes, not an hour, on 2 cores),
  at 1k and at N frames: summed peak RSS of producers, actors, writers, plus the Ray head's
  process tree (raylet, GCS, queue actors) sampled every second. Bounded memory means the two
  are about equal.
- **GPU** (only where CUDA is present): Epix10ka2M-sized frames (16 x 352 x 384), a student
  preset, bfloat16 autocast + torch.compile: model alone and the hybrid pipeline with one
  actor per GPU, frames/s per GPU.

Data: N synthetic frames of a tiny 4-module detector (4 x 64 x 64 pixels; the same geometry as
tests/test_infer.py) written as CXI shards, so that a 2-core machine runs every configuration in
minutes. Small frames make the fixed per-batch costs (queue calls, object store, decoding) weigh
more than on real detectors: the efficiencies are pessimistic for the pipeline. Model: PeakNet
``small-cpu`` with random weights (seed 0; no trained weights ship yet), probability threshold
0.02, batch 4.

``--write-docs`` replaces the ``<!-- bench:infer -->`` section of docs/benchmarks.md (created if
absent; other sections untouched).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section  # noqa: E402

SECTION = "infer"

TINY_GEOM = """; tiny 4-module detector (bench_infer): 4 modules of 64 x 64 pixels of 400 um
photon_energy = 9500 eV
clen = 0.08 m
res = 2500
adu_per_eV = 0.0147
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
peak_list = /entry_1/result_1
peak_list_type = cxi
"""
for _i, (_fs, _ss, _cx, _cy) in enumerate([("+1.0x +0.0y", "+0.0x -1.0y", 2, 66),
                                           ("+0.0x -1.0y", "-1.0x +0.0y", 66, -2),
                                           ("-1.0x +0.0y", "+0.0x +1.0y", -2, -66),
                                           ("+0.0x +1.0y", "+1.0x +0.0y", -66, 2)]):
    TINY_GEOM += (f"\np{_i}/min_fs = 0\np{_i}/max_fs = 63\np{_i}/min_ss = {64 * _i}\n"
                  f"p{_i}/max_ss = {64 * _i + 63}\np{_i}/fs = {_fs}\np{_i}/ss = {_ss}\n"
                  f"p{_i}/corner_x = {_cx}\np{_i}/corner_y = {_cy}\n")

MODEL = ["predictor.kind=peaknet", "predictor.preset=small-cpu", "predictor.threshold=0.02"]


def env() -> dict:
    e = dict(os.environ)
    e["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def log(msg: str) -> None:
    print(f"[bench_infer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def make_data(d: Path, n: int, per_file: int = 64) -> tuple[Path, list[Path]]:
    """The tiny geometry and n simulated frames in CXI files of ``per_file`` frames."""
    import h5py

    from peaknet.config import load_config
    from peaknet.simulate.config import SimulateConfig
    from peaknet.simulate.generator import Simulator

    d.mkdir(parents=True, exist_ok=True)
    geom = d / "tiny.geom"
    geom.write_text(TINY_GEOM)
    sim = Simulator(load_config(SimulateConfig, None, [f"run.geometry={geom}", "run.seed=7"]))
    files = []
    for k, a in enumerate(range(0, n, per_file)):
        frames = np.stack([sim.frame(i)[0] for i in range(a, min(n, a + per_file))])
        path = d / f"frames-{k:03d}.cxi"
        with h5py.File(path, "w") as h5:
            h5["/entry_1/data_1/data"] = frames
        files.append(path)
    return geom, files


def source_overrides(geom: Path, files: list[Path]) -> list[str]:
    return ["source.kind=cxi", f"source.inputs={json.dumps([str(f) for f in files])}",
            f"source.geometry={geom}", "source.events_per_shard=64"]


# --------------------------------------------------------------------------------------------
# model alone (worker processes)
# --------------------------------------------------------------------------------------------
def model_worker(args) -> None:
    """In a subprocess: build the predictor, wait at the barrier, time predict() over the data."""
    import torch

    from peaknet.config import load_config
    from peaknet.infer import InferConfig, build_predictor, open_source

    torch.set_num_threads(args.threads)
    cfg = load_config(InferConfig, None, json.loads(args.overrides))
    src = open_source(cfg.source)
    batches = [b.frames for s in src.shards() for b in src.read(s, cfg.pipeline.batch_size)]
    pred = build_predictor(cfg.predictor, src.geometry, src.frame_shape, args.threads)
    pred.predict(batches[0])  # warm-up
    Path(args.barrier, f"ready-{os.getpid()}").touch()
    while not Path(args.barrier, "go").exists():
        time.sleep(0.02)
    t0 = time.perf_counter()
    n = peaks = 0
    for b in batches:
        out = pred.predict(b)
        n += len(b)
        peaks += sum(len(p) for p in out)
    dt = time.perf_counter() - t0
    print(json.dumps({"frames": n, "seconds": dt, "peaks": peaks}))


def model_alone(overrides: list[str], procs: int, threads: int = 1) -> dict:
    barrier = Path(tempfile.mkdtemp(prefix="bench-barrier-"))
    cmd = [sys.executable, __file__, "--model-worker", "--overrides", json.dumps(overrides),
           "--threads", str(threads), "--barrier", str(barrier)]
    ps = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for _ in range(procs)]
    t0 = time.time()
    while len(list(barrier.glob("ready-*"))) < procs:
        if any(p.poll() not in (None, 0) for p in ps):
            raise RuntimeError("model worker failed: " + "".join(p.stderr.read() for p in ps))
        if time.time() - t0 > 900:
            raise TimeoutError("model workers not ready")
        time.sleep(0.1)
    (barrier / "go").touch()
    res = []
    for p in ps:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"model worker failed:\n{err[-3000:]}")
        res.append(json.loads(out.strip().splitlines()[-1]))
    shutil.rmtree(barrier, ignore_errors=True)
    frames = sum(r["frames"] for r in res)
    secs = max(r["seconds"] for r in res)
    return {"procs": procs, "frames": frames, "seconds": round(secs, 3),
            "fps": round(frames / secs, 2), "peaks_per_frame": res[0]["peaks"] / res[0]["frames"]}


# --------------------------------------------------------------------------------------------
# pipelines (mpiexec jobs)
# --------------------------------------------------------------------------------------------
class TreeRSS:
    """Samples the summed RSS of process trees (roots by pid) every ``every`` seconds."""

    def __init__(self, pids_fn, every: float = 1.0):
        self.pids_fn, self.every = pids_fn, every
        self.peak = 0.0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import psutil

        while not self._stop.wait(self.every):
            total = 0
            for pid in self.pids_fn():
                try:
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 2**20)

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()


def run_job(entry: str, n: int, overrides: list[str], out: Path, head_pid=None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-m", entry,
           *[f"--{o}" for o in overrides], f"--run.out={out}", "--run.progress=false",
           "--run.log_every_s=5"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    pids = [p.pid] + ([head_pid] if head_pid else [])
    with TreeRSS(lambda: pids) as rss:
        text, _ = p.communicate(timeout=7200)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-6000:]}")
    s = json.loads([x for x in text.splitlines() if x.startswith("{")][-1])
    s["job_wall_s"] = round(time.perf_counter() - t0, 2)
    s["tree_rss_peak_mb"] = round(rss.peak, 1)
    from peaknet.infer import verify_outputs

    v = verify_outputs(out)
    if not v["ok"]:
        raise RuntimeError(f"{entry} output incomplete: {v['problems'][:5]}")
    return s


def inrun_efficiency(s: dict) -> float:
    """Pipeline frames/s over the frames/s its own model processes reached while computing in
    the same run (sum over actors/ranks of frames / time inside predict): the share of the
    model's capacity the pipeline delivers, measured under the same machine load."""
    workers = s.get("per_actor") if s.get("mode") == "hybrid" else s.get("per_rank")
    cap = sum(w["frames"] / w["busy_s"] for w in workers or [] if w.get("busy_s"))
    return s["pipeline_fps"] / cap if cap else 0.0


def _median_run(rs: list, key: str) -> dict:
    """The run with the median ``key`` (lower median), annotated with every round's value."""
    vals = sorted(r[key] for r in rs)
    med = vals[(len(vals) - 1) // 2]
    out = dict(next(r for r in rs if r[key] == med))
    out["rounds"] = [r[key] for r in rs]
    if "pipeline_fps" in out:
        effs = sorted(inrun_efficiency(r) for r in rs)
        out["inrun_eff"] = effs[(len(effs) - 1) // 2]
        out["inrun_effs"] = effs
    return out


def _rng(s: dict, key: str) -> str:
    vals = s.get("rounds") or [s[key]]
    return f"{s[key]:.1f} ({min(vals):.1f}-{max(vals):.1f})" if len(vals) > 1 else f"{s[key]:.1f}"


def role_rss(s: dict) -> dict:
    """Peak RSS (MiB) per role from a summary."""
    if s.get("mode") == "hybrid":
        prod = [p["peak_rss_mb"] for p in s.get("per_producer", [])]
        act = [a.get("rss_mb", 0) for a in s.get("per_actor", [])]
        wri = [w.get("rss_mb", 0) for w in s.get("per_writer", [])]
        return {"producers": max(prod or [0]), "actors": max(act or [0]),
                "writers": max(wri or [0]),
                "sum": round(sum(prod) + sum(act) + sum(wri), 1)}
    ranks = [r["peak_rss_mb"] for r in s.get("per_rank", [])]
    return {"ranks": max(ranks or [0]), "sum": round(sum(ranks), 1)}


# --------------------------------------------------------------------------------------------
# GPU section
# --------------------------------------------------------------------------------------------
def gpu_bench(work: Path, head_address: str, head_pid, preset: str, batch: int,
              n_frames: int) -> dict:
    """Epix10ka2M-sized frames on one GPU: model alone (bf16 + compile) and the hybrid pipeline
    with one GPU actor. Returns {} without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    import h5py

    from peaknet.config import load_config
    from peaknet.infer import PeakNetPredictor
    from peaknet.io.geometry import load_builtin_geometry
    from peaknet.simulate.config import SimulateConfig
    from peaknet.simulate.generator import Simulator

    geom = load_builtin_geometry("epix10ka2m")
    sim = Simulator(load_config(SimulateConfig, None, ["run.detector=epix10ka2m", "run.seed=2"]))
    base = np.stack([sim.frame(i)[0] for i in range(8)])
    frames = np.concatenate([base] * (n_frames // len(base) + 1))[:n_frames]
    pred = PeakNetPredictor(preset, device="cuda", dtype="bfloat16", compile="on",
                            mask=geom.good_pixel_mask())
    batches = [frames[a:a + batch] for a in range(0, n_frames, batch)]
    for b in batches[:3]:  # compile + warm-up
        pred.predict(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        pred.predict(b)
    torch.cuda.synchronize()
    alone = n_frames / (time.perf_counter() - t0)
    # forward only (no decoding), for reference
    from peaknet.model import prepare_panels

    x = torch.from_numpy(frames[:batch]).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        inp, _ = prepare_panels(x, pred.mask_dev)
        for _ in range(3):
            pred.model(inp)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = max(1, n_frames // batch)
        for _ in range(reps):
            pred.model(inp)
        torch.cuda.synchronize()
    fwd = reps * batch / (time.perf_counter() - t0)
    d = work / "gpu"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for k, a in enumerate(range(0, n_frames, 64)):
        path = d / f"epix-{k:03d}.cxi"
        with h5py.File(path, "w") as h5:
            h5["/entry_1/data_1/data"] = frames[a:a + 64]
        files.append(path)
    ov = [f"predictor.preset={preset}", "predictor.kind=peaknet", "predictor.dtype=bfloat16",
          "predictor.compile=on", "source.kind=cxi",
          f"source.inputs={json.dumps([str(f) for f in files])}", "source.geometry=epix10ka2m",
          "source.events_per_shard=64", f"pipeline.batch_size={batch}", "pipeline.actors=1",
          "pipeline.actor_gpus=1", "pipeline.actor_cpus=1", "pipeline.writers=2",
          "pipeline.writer_cpus=0.5", "pipeline.prefetch=2", f"ray.address={head_address}"]
    hyb = run_job("jobs.infer", 2, ov, work / "gpu-hybrid", head_pid)
    return {"preset": preset, "batch": batch, "frames": n_frames,
            "gpu": torch.cuda.get_device_name(0), "model_alone_fps": round(alone, 1),
            "forward_only_fps": round(fwd, 1), "hybrid_fps": hyb["pipeline_fps"],
            "efficiency": round(hyb["pipeline_fps"] / alone, 3)}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
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
    import ray
    import torch

    return (f"{cpu}, nproc {os.cpu_count()}, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"ray {ray.__version__}")


def notes(res: dict) -> str:
    he = [s["inrun_eff"] for s in res["hybrid"]]
    le = [s["inrun_eff"] for s in res["legacy"]]
    return (
        "the machine's 2 cores are shared with other work (load average above), so absolute "
        "rates move from run to run by tens of percent; read the same-run efficiencies. "
        f"Hybrid: {min(he):.2f}-{max(he):.2f} of its actors' model capacity (target >= 0.9); "
        f"legacy: {min(le):.2f}-{max(le):.2f} of its ranks'. On 2 CPU cores with a CPU model "
        "both are compute-bound: reading 64 KiB frames and writing peak lists cost a legacy "
        "rank ~2 % of its time, and the hybrid pipeline's remaining 2-8 % goes to the queue "
        "round trips and to producers, writer and Ray competing with the actors for the two "
        "cores (more so with two actors). What the hybrid design buys (one model per GPU fed "
        "with full batches from many readers, host-to-device copies overlapped with compute, "
        "readers and GPUs scaled independently) needs GPUs to show; this machine has none, so "
        "the GPU section is code that runs where CUDA exists.")


def report(res: dict) -> str:
    L = []
    a = res["args"]
    L.append("## Inference: hybrid pipeline (MPI producers -> Ray queue -> actors -> writers) "
             "vs legacy MPI coupling\n")
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Date: {res['date']}. Machine: {res['machine']} "
             f"(shared: load average {res['load_start']} at start, {res['load_end']} at the end).  ")
    L.append(f"Data: {a['frames']} synthetic frames of a tiny 4-module detector "
             "(4 x 64 x 64 px, 64 KiB per frame; geometry as in tests/test_infer.py) in CXI files "
             "of 64 frames, read by the producers/ranks. Small frames on purpose (2 shared "
             "cores): fixed per-batch costs weigh more than on real detectors.  ")
    L.append(f"Model: PeakNet `small-cpu`, random weights (seed 0), probability threshold 0.02 "
             f"(~{res['model'][0]['peaks_per_frame']:.0f} peaks/frame), batch {a['batch']}, "
             "float32 on CPU, 1 torch thread per model process (actor, rank, worker). "
             "Hybrid: 1 writer, queue capacity 32 frames (small, so producers stay coupled to "
             "the actors as in a long run), prefetch 1.\n")
    L.append(f"Frames/s: median over {a['rounds']} rounds (range); every round runs every "
             "configuration once, in the same order.  ")
    L.append("**Efficiency (same run)** = the pipeline's frames/s / the frames/s its own model "
             "processes reached while computing in that run (sum over actors or ranks of frames "
             "/ time inside `predict`), median over rounds: the share of the model's capacity the "
             "pipeline delivers, under the same machine load. **vs model alone (separate)** = "
             "pipeline frames/s / frames/s of as many standalone model processes, measured "
             "minutes apart, and **hybrid / legacy** likewise: on this shared machine the same "
             "standalone model process measured 18 to 28 frames/s within one minute, so these "
             "cross-run ratios (which can exceed 1) move with other users' load and are shown "
             "for completeness only.\n")
    L.append("| configuration | model processes | frames/s | efficiency (same run) | "
             "vs model alone (separate) | hybrid / legacy | peak RSS, sum over processes (MiB) |")
    L.append("|---|---|---|---|---|---|---|")
    ma = {m["procs"]: m for m in res["model"]}
    for m in res["model"]:
        L.append(f"| model alone, {m['procs']} process(es) | {m['procs']} | {_rng(m, 'fps')} | "
                 "- | 1 | - | - |")
    leg = {s["ranks"]: s for s in res["legacy"]}
    for s in res["legacy"]:
        n = s["ranks"]
        L.append(f"| legacy, mpiexec -n {n} | {n} | {_rng(s, 'pipeline_fps')} | "
                 f"{s['inrun_eff']:.2f} | {s['pipeline_fps'] / ma[n]['fps']:.2f} | - | "
                 f"{role_rss(s)['sum']:.0f} |")
    for s in res["hybrid"]:
        g, p = s["actors"], s["producers"]
        ratio = f"{s['pipeline_fps'] / leg[g]['pipeline_fps']:.2f}" if g in leg else "-"
        L.append(f"| hybrid, {p} producer(s) x {g} actor(s) | {g} | {_rng(s, 'pipeline_fps')} | "
                 f"{s['inrun_eff']:.2f} | {s['pipeline_fps'] / ma[g]['fps']:.2f} | {ratio} | "
                 f"{role_rss(s)['sum']:.0f} (+ Ray head {s['tree_rss_peak_mb']:.0f} tree) |")
    L.append("")
    L.append("Frames/s: model alone = frames / compute time of the slowest of its processes "
             "(started together); hybrid = frames / (last shard written - first actor ready), "
             "legacy = frames / slowest rank's time after its model build: both include reading "
             "the CXI files, decoding the peaks and writing the CXI peak lists, neither includes "
             "Ray start-up or model builds (job wall times incl. those: "
             + ", ".join(f"{s['mode']} {s.get('producers', s.get('ranks'))}x"
                         f"{s.get('actors', '')}: {s['job_wall_s']:.0f} s"
                         for s in res["legacy"] + res["hybrid"]) + ").\n")
    r = res.get("rss")
    if r:
        L.append(f"### Memory over {r[-1]['frames_this_run']} generated frames\n")
        L.append("Hybrid pipeline, 2 MPI producers generating frames on the fly "
                 "(`source.kind = \"generator\"`, the tiny detector, nothing on disk) -> 2 actors "
                 "running peakfinder8 (`crystfel` preset; used instead of the CPU model so that "
                 "10k frames take a minute) -> 1 writer, default queue capacity (3200 frames), "
                 "shards of 1000 events. Peak RSS (MiB) of the largest process of each role "
                 "(ru_maxrss), and the sampled (1 s) sum over every process of the MPI job and "
                 "of the Ray head's tree (raylet, GCS, object store, queue actors, workers; "
                 "shared pages count in every process that maps them: an upper bound).\n")
        L.append("| frames | producer | actor | writer | sum over all processes | hits | "
                 "frames/s |")
        L.append("|---|---|---|---|---|---|---|")
        for s in r:
            rr = role_rss(s)
            L.append(f"| {s['frames_this_run']} | {rr['producers']:.0f} | {rr['actors']:.0f} | "
                     f"{rr['writers']:.0f} | {s['tree_rss_peak_mb']:.0f} | {s['hits']} | "
                     f"{s['pipeline_fps']:.0f} |")
        L.append(f"\nFrom {r[0]['frames_this_run']} to {r[-1]['frames_this_run']} frames the sum "
                 f"changes by {r[-1]['tree_rss_peak_mb'] - r[0]['tree_rss_peak_mb']:+.0f} MiB, "
                 f"from {r[-2]['frames_this_run']} to {r[-1]['frames_this_run']} by "
                 f"{r[-1]['tree_rss_peak_mb'] - r[-2]['tree_rss_peak_mb']:+.0f} MiB: what is held "
                 "is bounded by the queue capacity (3200 x 64 KiB = 200 MiB of frames in the "
                 "object store at most), the writers' unfinished shards and the in-flight "
                 "batches, not by the run length.\n")
    g = res.get("gpu")
    L.append("### GPU\n")
    if g:
        L.append(f"{g['gpu']}: `{g['preset']}`, Epix10ka2M-sized frames (16 x 352 x 384), "
                 f"batch {g['batch']}, bfloat16 autocast + torch.compile, {g['frames']} frames.\n")
        L.append("| measure | frames/s per GPU |")
        L.append("|---|---|")
        L.append(f"| forward pass only | {g['forward_only_fps']} |")
        L.append(f"| model alone (pre-processing, forward, decoding) | {g['model_alone_fps']} |")
        L.append(f"| hybrid pipeline, 2 producers, 1 GPU actor | {g['hybrid_fps']} "
                 f"(efficiency {g['efficiency']:.2f}) |")
        L.append("\nThe paper's figure: 183 images/s on 40 L40S GPUs = ~4.6 images/s per GPU "
                 "(1920 x 1920 images, atto student).\n")
    else:
        L.append("Not run: no CUDA device on this machine. The section runs by itself where "
                 "`torch.cuda.is_available()` (Epix10ka2M-sized frames, `student-atto-b1`, "
                 "bfloat16 + torch.compile, one GPU actor with pinned-memory, non-blocking copies "
                 "on a side stream).\n")
    L.append(f"Notes: {notes(res)}")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=256, help="frames for the throughput runs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all configurations")
    ap.add_argument("--rss-frames", type=int, default=10000,
                    help="generated frames for the memory run (0: skip)")
    ap.add_argument("--configs", default="1x1,2x1,1x2,2x2",
                    help="hybrid producers x actors (comma-separated)")
    ap.add_argument("--gpu-preset", default="student-atto-b1")
    ap.add_argument("--gpu-frames", type=int, default=256)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--from-json", type=Path,
                    help="only re-render the report (and --write-docs) from saved results")
    # worker mode
    ap.add_argument("--model-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model_worker:
        model_worker(args)
        return 0

    if args.from_json:
        res = json.loads(args.from_json.read_text())
        text = report(res)
        print(text)
        if args.write_docs:
            write_section(SECTION, text)
        return 0
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from peaknet.cluster import RayHead

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-infer-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(args) | {"work": str(work)},
                 "command": " ".join([".venv/bin/python", "tools/bench/bench_infer.py",
                                      *(argv if argv is not None else sys.argv[1:])]),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_start": os.getloadavg()[0].__round__(1), "machine": machine()}
    res["args"].pop("model_worker", None)
    log(f"data: {args.frames} tiny frames in {work}")
    geom, files = make_data(work / "data", args.frames)
    src = source_overrides(geom, files)
    common = src + MODEL + [f"pipeline.batch_size={args.batch}", "output.min_peaks=10"]

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",") if c]
    procs = sorted({g for _, g in configs} | {1, 2})
    head = RayHead(root=work / "cluster")
    os.environ.setdefault("PEAKNET_RAY_CPUS", "4")  # logical CPUs: 2 actors + writer + slack
    head.start()
    head_pid = int((head.dir / "head.pid").read_text())
    runs: dict = {}
    try:
        # rounds: every configuration once per round, in the same order, so that the machine's
        # (shared) load hits all of them alike; medians over rounds are reported
        for rnd in range(args.rounds):
            for n in procs:
                log(f"round {rnd + 1}: model alone, {n} process(es)")
                m = model_alone(common, n)
                runs.setdefault(("model", n), []).append(m)
                log(f"  {m['fps']} frames/s")
            for n in procs:
                log(f"round {rnd + 1}: legacy, mpiexec -n {n}")
                s = run_job("jobs.infer_mpi", n, common + ["run.threads=1"],
                            work / f"legacy-{n}")
                runs.setdefault(("legacy", n), []).append(s)
                log(f"  {s['pipeline_fps']} frames/s")
            for p, g in configs:
                log(f"round {rnd + 1}: hybrid, {p} producer(s) x {g} actor(s)")
                s = run_job("jobs.infer", p, common + [
                    f"ray.address={head.address}", f"pipeline.actors={g}",
                    "pipeline.actor_cpus=1", "pipeline.writers=1", "pipeline.writer_cpus=0.5",
                    "pipeline.queue_capacity=32"], work / f"hybrid-{p}x{g}", head_pid)
                runs.setdefault(("hybrid", p, g), []).append(s)
                log(f"  {s['pipeline_fps']} frames/s")
        res["model"] = [_median_run(runs[("model", n)], "fps") for n in procs]
        res["legacy"] = [_median_run(runs[("legacy", n)], "pipeline_fps") for n in procs]
        res["hybrid"] = [_median_run(runs[("hybrid", p, g)], "pipeline_fps") for p, g in configs]
        if args.rss_frames:
            gen = [f"source.kind=generator", f"source.geometry={geom}",
                   "source.events_per_shard=1000", "source.sim_overrides=[\"run.seed=11\"]",
                   "predictor.kind=peakfinder8", "predictor.peakfinder8.preset=crystfel",
                   f"pipeline.batch_size={args.batch * 4}", "output.min_peaks=10",
                   f"ray.address={head.address}", "pipeline.actors=2", "pipeline.actor_cpus=1",
                   "pipeline.writers=1", "pipeline.writer_cpus=0.5"]
            res["rss"] = []
            for n in sorted({1000, args.rss_frames // 2, args.rss_frames}):
                log(f"memory run: {n} generated frames")
                r = run_job("jobs.infer", 2, gen + [f"source.frames={n}"], work / f"rss-{n}",
                            head_pid)
                res["rss"].append(r)
                log(f"  {role_rss(r)}, tree {r['tree_rss_peak_mb']}")
        res["gpu"] = gpu_bench(work, head.address, head_pid, args.gpu_preset, 8, args.gpu_frames)
    finally:
        head.stop()
    res["load_end"] = round(os.getloadavg()[0], 1)
    res["notes"] = notes(res)
    text = report(res)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if args.write_docs:
        write_section(SECTION, text)
        log("docs/benchmarks.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
