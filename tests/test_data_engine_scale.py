"""The data engine's classical stages at scale, with the real components: mpiexec, a local Ray,
sbatch (a job array and srun ranks), a real kill -9.

find-peaks: a few small frames (two 64 x 128 modules) in CXI files. The serial run is the
reference: it must write what a plain loop of peakfinder8 + CXIWriter over the frames writes (the
stage's output before it ran on the engine), and every other way of running (MPI ranks, Ray,
srun, a run killed and re-run) must give IDENTICAL datasets, per-input peak lists and manifest.
Bad input (an all-NaN frame, a truncated file, a missing file) is skipped with its reason, and
every input event is accounted for exactly once.

simulate: 6 frames on the same small detector in 3 shards; the shards written by MPI ranks, by
hand-made shard slots and by a Slurm job array (then finalized) must equal the serial run's,
dataset for dataset, with the same manifest.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - the simulator's frames are bitshuffle/LZ4
import numpy as np
import pytest

from peaknet.cluster import REPO
from peaknet.config import load_config
from peaknet.parallel import read_manifest

PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
SHAPE = (2, 64, 128)  # (P, H, W): two modules, two ASICs each along fs

GEOM = """clen = 0.1
res = 10000
photon_energy = 9500
adu_per_photon = 10
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
"""
for _i in range(2):
    GEOM += (f"p{_i}/min_fs = 0\np{_i}/max_fs = 127\np{_i}/min_ss = {64 * _i}\n"
             f"p{_i}/max_ss = {64 * _i + 63}\np{_i}/fs = +1.0x\np{_i}/ss = +1.0y\n"
             f"p{_i}/corner_x = -64\np{_i}/corner_y = {60 - 128 * _i}\n")

FP_CONFIG = """
[run]
inputs = {inputs}
geometry = "{geometry}"
out = "{out}"
shard_size = 3
batch_frames = 2
progress = false

[peakfinder8]
preset = "lcls_cspad"
asics_fs = 2
local_bg_radius = 3
max_pix_count = 50
"""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _summary(output: str) -> dict:
    lines = [ln for ln in output.splitlines() if ln.startswith("{") and ln.rstrip().endswith("}")]
    assert lines, output[-3000:]
    return json.loads(lines[-1])


def _datasets(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def assert_same_datasets(a: Path, b: Path) -> None:
    """Same dataset names, dtypes, shapes and values (NaN == NaN)."""
    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db), (a, b)
    differ = []
    for n, x in da.items():
        y = db[n]
        if x.dtype != y.dtype or x.shape != y.shape:
            differ.append(n)
        elif x.dtype.kind == "O":
            if list(x) != list(y):
                differ.append(n)
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            differ.append(n)
    assert not differ, f"{a.name}: datasets differ: {differ}"


def _frame(rng) -> np.ndarray:
    """Noise plus 2-6 Gaussian spots away from the ASIC edges."""
    d = rng.normal(0.0, 1.0, SHAPE)
    yy, xx = np.mgrid[:SHAPE[1], :SHAPE[2]]
    for _ in range(int(rng.integers(2, 7))):
        p, y = int(rng.integers(0, 2)), rng.uniform(6, 58)
        x = rng.uniform(6, 58) + 64 * int(rng.integers(0, 2))
        d[p] += rng.uniform(300, 1200) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 0.8 ** 2))
    return d.astype(np.float32)


def _write_frames(path: Path, frames: np.ndarray, geom, ids=None) -> Path:
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = geom.stack_to_slab(frames)
        if ids is not None:
            h5["/entry_1/event_id"] = np.array([s.encode() for s in ids])
    return path


@pytest.fixture(scope="module")
def fp_data(tmp_path_factory):
    """a.cxi (8 frames, with event ids), b.cxi (6 frames, none), bad.cxi (frame 0 all NaN,
    frame 1 a few NaN pixels, frame 2 fine), trunc.cxi (a.cxi cut short), missing.cxi, and
    many.cxi (120 frames: long enough to be killed while it runs)."""
    from peaknet.io.geometry import Geometry

    d = tmp_path_factory.mktemp("fp_data")
    (d / "small.geom").write_text(GEOM)
    geom = Geometry.from_file(d / "small.geom")
    rng = np.random.default_rng(7)
    fa = np.stack([_frame(rng) for _ in range(8)])
    fb = np.stack([_frame(rng) for _ in range(6)])
    a = _write_frames(d / "a.cxi", fa, geom, [f"run7/evt{i}" for i in range(8)])
    b = _write_frames(d / "b.cxi", fb, geom)
    bad = np.stack([_frame(rng) for _ in range(3)])
    bad[0] = np.nan
    bad[1, 1, 30:33, 40:43] = np.nan
    bad_path = _write_frames(d / "bad.cxi", bad, geom)
    raw = a.read_bytes()
    (d / "trunc.cxi").write_bytes(raw[: len(raw) * 6 // 10])
    many = _write_frames(d / "many.cxi", np.concatenate([fa, fb] * 9)[:120], geom)
    return {"dir": d, "geometry": d / "small.geom", "geom": geom, "a": a, "b": b,
            "bad": bad_path, "trunc": d / "trunc.cxi", "missing": d / "missing.cxi",
            "many": many, "frames": {"a": fa, "b": fb}}


def _fp_config(tmp: Path, data, inputs, out: Path) -> Path:
    path = tmp / f"fp-{out.name}.toml"
    path.write_text(FP_CONFIG.format(inputs=json.dumps([str(p) for p in inputs]),
                                     geometry=data["geometry"], out=out))
    return path


def _fp_inprocess(cfg_path: Path, *overrides: str) -> dict:
    from peaknet.findpeaks.config import FindPeaksConfig
    from peaknet.findpeaks.run import run

    return run(load_config(FindPeaksConfig, cfg_path, list(overrides)))


def assert_same_find_peaks(out_a: Path, out_b: Path) -> None:
    """The per-input CXI peak lists, the merged table and the manifest are the same."""
    names = sorted(p.name for p in out_a.glob("*.peaks.cxi"))
    assert names and names == sorted(p.name for p in out_b.glob("*.peaks.cxi"))
    for n in names:
        assert_same_datasets(out_a / n, out_b / n)
    assert_same_datasets(out_a / "findpeaks.h5", out_b / "findpeaks.h5")
    keys = ("event", "status", "kind", "reason")
    ma = [{k: r[k] for k in keys} for r in read_manifest(out_a / "findpeaks.manifest.jsonl")]
    mb = [{k: r[k] for k in keys} for r in read_manifest(out_b / "findpeaks.manifest.jsonl")]
    assert ma == mb
    assert (out_a / "findpeaks.skipped.jsonl").read_text() == (out_b / "findpeaks.skipped.jsonl").read_text()


# ----------------------------------------------------------------------------------------------
# find-peaks: the serial reference
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp_serial(fp_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp_serial")
    out = tmp / "serial"
    cfg = _fp_config(tmp, fp_data, [fp_data["a"], fp_data["b"]], out)
    s = _fp_inprocess(cfg, "run.backend=serial")
    return {"out": out, "cfg": cfg, "summary": s}


def test_serial_find_peaks_writes_what_a_plain_loop_writes(fp_data, fp_serial, tmp_path):
    """The engine's serial run gives, dataset for dataset, the peak lists of a plain loop
    (peakfinder8 on every frame, CXIWriter row by row: the stage before the engine)."""
    from peaknet.findpeaks import Peakfinder8
    from peaknet.findpeaks.config import FindPeaksConfig
    from peaknet.io.cxi import CXIWriter

    s, out = fp_serial["summary"], fp_serial["out"]
    geom = fp_data["geom"]
    prm = load_config(FindPeaksConfig, fp_serial["cfg"]).peakfinder8.params()
    pf = Peakfinder8(geom.radius_map(), geom.good_pixel_mask(), prm)
    total = 0
    for name, ids in (("a", [f"run7/evt{i}" for i in range(8)]), ("b", None)):
        frames = fp_data["frames"][name]
        ref = tmp_path / f"{name}.peaks.cxi"
        with CXIWriter(ref, max_peaks=prm.max_num_peaks, geometry=geom) as w:
            for i, f in enumerate(frames):
                pk = pf(f)
                total += len(pk)
                w.append(pk, ids[i] if ids else f"//{i}", skipped=0)
        assert_same_datasets(ref, out / f"{name}.peaks.cxi")
    assert s["complete"] and s["frames"] == 14 and s["skipped"] == 0 and s["peaks"] == total > 20
    assert s["events"] == {"done": 14, "skipped": 0} and s["this_run"]["backend"] == "serial"
    assert [Path(p).name for p in s["outputs"]] == ["a.peaks.cxi", "b.peaks.cxi"]
    assert json.loads((out / "findpeaks.summary.json").read_text())["peaks"] == total
    with h5py.File(out / "a.peaks.cxi", "r") as h5:
        assert [x.decode() for x in h5["/entry_1/event_id"][()]] == [f"run7/evt{i}" for i in range(8)]
    # a second run finds everything complete and does nothing
    again = _fp_inprocess(fp_serial["cfg"], "run.backend=serial")
    assert again.get("reused") and again["plan"] == s["plan"] and again["peaks"] == total


# ----------------------------------------------------------------------------------------------
# find-peaks: MPI, Ray, srun give the same outputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.mpi
def test_mpiexec_find_peaks_equals_serial(fp_data, fp_serial, tmp_path):
    out = tmp_path / "mpi"
    cfg = _fp_config(tmp_path, fp_data, [fp_data["a"], fp_data["b"]], out)
    p = subprocess.run([MPIEXEC, "-n", "2", PY, "-m", "jobs.find_peaks", "--config", str(cfg),
                        "--run.backend=mpi"], capture_output=True, text=True, timeout=300,
                       env=_env(), cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    s = _summary(p.stdout)
    assert s["complete"] and s["this_run"]["backend"] == "mpi" and s["this_run"]["ranks"] == 2
    assert s["frames"] == 14 and s["peaks"] == fp_serial["summary"]["peaks"]
    assert "rank 0/2: 3 shard(s) assigned" in p.stderr and "rank 1/2: 2 shard(s) assigned" in p.stderr
    assert p.stdout.count('"stage": "findpeaks"') == 1  # rank 0 prints the summary, rank 1 {}
    assert_same_find_peaks(fp_serial["out"], out)


@pytest.mark.ray
def test_ray_find_peaks_equals_serial(fp_data, fp_serial, ray_head, tmp_path):
    out = tmp_path / "ray"
    cfg = _fp_config(tmp_path, fp_data, [fp_data["a"], fp_data["b"]], out)
    s = _fp_inprocess(cfg, "run.backend=ray", f"ray.address={ray_head.address}",
                      "ray.max_in_flight=4")
    assert s["complete"] and s["this_run"]["backend"] == "ray" and s["this_run"]["max_in_flight"] <= 4
    assert_same_find_peaks(fp_serial["out"], out)


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.slow
def test_sbatch_find_peaks_two_srun_ranks(slurm_cluster, fp_data, fp_serial, tmp_path):
    out = tmp_path / "sbatch"
    cfg = _fp_config(tmp_path, fp_data, [fp_data["a"], fp_data["b"]], out)
    res = slurm_cluster.sbatch(REPO / "slurm" / "find_peaks.sbatch", str(cfg),
                               options=["--ntasks=2", "--cpus-per-task=1", "--mem=2G", "--time=10",
                                        f"--output={tmp_path}/job-%j.out"], cwd=REPO, timeout=300)
    assert res.ok, res.output[-3000:]
    # the stored summary: srun splits a long printed line that another rank's log can land inside
    s = json.loads((out / "findpeaks.summary.json").read_text())
    assert s["complete"] and s["this_run"]["backend"] == "mpi" and s["this_run"]["ranks"] == 2
    assert "rank 1/2" in res.output
    assert_same_find_peaks(fp_serial["out"], out)


# ----------------------------------------------------------------------------------------------
# find-peaks: kill -9 and re-run
# ----------------------------------------------------------------------------------------------
def test_killed_find_peaks_resumes(fp_data, tmp_path):
    """A real kill -9 of a running job (its process group) after its first shard, then a
    re-run: only the missing shards are processed, and the outputs equal an uninterrupted run."""
    out = tmp_path / "killed"
    cfg = _fp_config(tmp_path, fp_data, [fp_data["many"]], out)
    proc = subprocess.Popen([PY, "-m", "jobs.find_peaks", "--config", str(cfg),
                             "--run.backend=serial", "--run.shard_size=1", "--run.batch_frames=1"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list((out / "parts").glob("*.json")):
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    n_before = len(list((out / "parts").glob("*.json")))
    assert 1 <= n_before < 120
    assert not (out / "many.peaks.cxi").exists() and not (out / "findpeaks.h5").exists()
    s = _fp_inprocess(cfg, "run.backend=serial", "run.shard_size=1", "run.batch_frames=1")
    assert s["complete"] and s["events"] == {"done": 120, "skipped": 0}
    assert s["this_run"]["shards_processed"] == 120 - n_before
    assert not list((out / "parts").glob("*.tmp*"))
    ref = tmp_path / "uninterrupted"
    _fp_inprocess(_fp_config(tmp_path, fp_data, [fp_data["many"]], ref), "run.backend=serial",
                  "run.shard_size=40", "run.batch_frames=8")
    assert_same_find_peaks(ref, out)  # and the shard size changes nothing either


def test_find_peaks_stop_then_resume_exports_once(fp_data, fp_serial, tmp_path):
    """A run stopped on purpose after 2 shards writes no peak list; the re-run completes it."""
    out = tmp_path / "partial"
    cfg = _fp_config(tmp_path, fp_data, [fp_data["a"], fp_data["b"]], out)
    s1 = _fp_inprocess(cfg, "run.backend=serial", "run.stop_after_shards=2")
    assert s1["interrupted"] and not s1["complete"] and not list(out.glob("*.peaks.cxi"))
    s2 = _fp_inprocess(cfg, "run.backend=serial")
    assert s2["complete"] and s2["this_run"]["shards_processed"] == 3
    assert_same_find_peaks(fp_serial["out"], out)
    (out / "b.peaks.cxi").unlink()  # a lost peak list is written again from findpeaks.h5
    s3 = _fp_inprocess(cfg, "run.backend=serial")
    assert s3.get("reused") and (out / "b.peaks.cxi").is_file()
    assert_same_find_peaks(fp_serial["out"], out)


# ----------------------------------------------------------------------------------------------
# find-peaks: bad input is skipped with its reason, every event accounted for
# ----------------------------------------------------------------------------------------------
def test_find_peaks_bad_inputs_are_accounted(fp_data, tmp_path):
    out = tmp_path / "bad"
    inputs = [fp_data["b"], fp_data["bad"], fp_data["trunc"], fp_data["missing"]]
    cfg = _fp_config(tmp_path, fp_data, inputs, out)
    s = _fp_inprocess(cfg, "run.backend=serial")
    assert s["complete"]
    rows = list(read_manifest(out / "findpeaks.manifest.jsonl"))
    ids = [r["event"] for r in rows]
    trunc = [e for e in ids if e.startswith(str(fp_data["trunc"]))]
    # the truncated file fails to open (one event for the file) or frame by frame
    assert trunc == [f"{fp_data['trunc']}//*"] or trunc == [f"{fp_data['trunc']}//{i}" for i in range(len(trunc))]
    expected = ([f"{fp_data['b']}//{i}" for i in range(6)] + [f"{fp_data['bad']}//{i}" for i in range(3)]
                + trunc + [f"{fp_data['missing']}//*"])
    assert ids == expected  # every input event exactly once, in order
    with h5py.File(out / "findpeaks.h5", "r") as h5:
        assert [x.decode() for x in h5["events/event_id"][()]] == expected
        assert list(h5["events/status"][()]) == [int(r["status"] == "skipped") for r in rows]
    by = {r["event"]: r for r in rows}
    nan0 = by[f"{fp_data['bad']}//0"]
    assert nan0["status"] == "skipped" and nan0["kind"] == "nonfinite" and "NaN" in nan0["reason"]
    assert by[f"{fp_data['bad']}//1"]["status"] == "done"  # a few NaN pixels are only masked
    miss = by[f"{fp_data['missing']}//*"]
    assert miss["kind"] == "unreadable_file" and "does not exist" in miss["reason"]
    assert all(by[e]["status"] == "skipped" and by[e]["reason"] for e in trunc)
    n_skipped = 1 + len(trunc) + 1
    assert s["events"] == {"done": len(expected) - n_skipped, "skipped": n_skipped}
    assert s["skipped"] == n_skipped and s["frames"] == len(expected) - n_skipped
    assert s["frames_with_nonfinite_pixels"] == 1
    assert s["skipped_by_kind"]["nonfinite"] == 1 and s["skipped_by_kind"]["unreadable_file"] >= 2
    # the peak list of bad.cxi: row i = frame i, the NaN frame empty and marked skipped
    with h5py.File(out / "bad.peaks.cxi", "r") as h5:
        assert h5["/entry_1/result_1/skipped"][()].tolist() == [1, 0, 0]
        assert h5["/entry_1/result_1/nPeaks"][0] == 0 and h5["/entry_1/result_1/nPeaks"][2] > 0
    skips = [json.loads(x) for x in (out / "findpeaks.skipped.jsonl").read_text().splitlines()]
    assert len(skips) == n_skipped
    assert {"file": str(fp_data["missing"]), "event": None, "reason": "file does not exist"} in skips
    assert any(r["event"] == "//0" and "NaN" in r["reason"] for r in skips)
    if trunc == [f"{fp_data['trunc']}//*"]:
        assert not (out / "trunc.peaks.cxi").exists()
        assert any(r["file"] == str(fp_data["trunc"]) and r["event"] is None for r in skips)


def test_mpi_backend_needs_mpi_ranks_to_match(monkeypatch, fp_data, tmp_path):
    """Several launched processes with backend serial would each redo the whole run: refused."""
    monkeypatch.setenv("PMI_SIZE", "2")
    cfg = _fp_config(tmp_path, fp_data, [fp_data["a"]], tmp_path / "x")
    with pytest.raises(RuntimeError, match="backend is 'serial'"):
        _fp_inprocess(cfg, "run.backend=serial")


# ----------------------------------------------------------------------------------------------
# simulate: MPI ranks, shard slots, a Slurm job array
# ----------------------------------------------------------------------------------------------
SIM_ARGS = ["--run.frames=6", "--run.frames_per_shard=2", "--run.seed=5", "--run.progress=false",
            "--crystal.hit_fraction=1.0", "--detector.clen_m=0.05"]


@pytest.fixture(scope="module")
def sim_serial(tmp_path_factory):
    from peaknet.cli import run_stage

    tmp = tmp_path_factory.mktemp("sim")
    (tmp / "small.geom").write_text(GEOM)
    out = tmp / "serial"
    args = [f"--run.geometry={tmp / 'small.geom'}", *SIM_ARGS]
    s = run_stage("simulate", [*args, f"--run.out={out}", "--run.backend=serial"])
    assert s["frames"] == 6 and s["shards"] == 3 and s["hits"] == 6
    return {"out": out, "args": args, "summary": s}


def assert_same_simulation(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("shard_*"))
    assert len(names) == 6 and names == sorted(p.name for p in b.glob("shard_*"))
    for n in names:
        assert_same_datasets(a / n, b / n)
        with h5py.File(a / n, "r") as ha, h5py.File(b / n, "r") as hb:
            aa = {k: v for k, v in ha.attrs.items() if k != "config"}
            ab = {k: v for k, v in hb.attrs.items() if k != "config"}
            assert sorted(aa) == sorted(ab)
            assert all(np.array_equal(aa[k], ab[k]) for k in aa), n
            if "config" in ha.attrs:  # the config text differs only by the output folder
                assert ha.attrs["config"].replace(str(a), "") == hb.attrs["config"].replace(str(b), "")
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    assert (a / "geometry.geom").read_text() == (b / "geometry.geom").read_text()
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    for k in ("frames", "hits", "shards", "mean_detectable_per_hit", "photon_energy_eV"):
        assert sa[k] == sb[k], k


@pytest.mark.mpi
def test_mpiexec_simulate_equals_serial(sim_serial, tmp_path):
    out = tmp_path / "mpi"
    p = subprocess.run([MPIEXEC, "-n", "2", PY, "-m", "jobs.simulate", *sim_serial["args"],
                        f"--run.out={out}"], capture_output=True, text=True, timeout=300,
                       env=_env(), cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    s = _summary(p.stdout)
    assert s["complete"] and s["distributed"]["mode"] == "mpi" and s["distributed"]["ranks"] == 2
    assert s["frames_generated"] == 6
    assert "rank 1/2: 1 of 3 shards are mine: [1]" in p.stderr
    assert_same_simulation(sim_serial["out"], out)


def test_simulate_shard_slots_then_finalize(sim_serial, tmp_path):
    """Two hand-made slots (what array tasks do): the first leaves the run unfinished,
    finalize_only names the missing shard, the second slot finishes and writes the manifest."""
    from peaknet.cli import run_stage

    out = tmp_path / "slots"
    args = [*sim_serial["args"], f"--run.out={out}"]
    s0 = run_stage("simulate", [*args, "--run.shard_index=0", "--run.shard_count=2"])
    assert s0["complete"] is False and s0["frames_generated"] == 4
    assert sorted(p.name for p in out.glob("*.cxi")) == ["shard_00000.cxi", "shard_00002.cxi"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(RuntimeError, match=r"1 of 3 shards are not \(yet\) written .*: 1"):
        run_stage("simulate", [*args, "--run.finalize_only=true"])
    s1 = run_stage("simulate", [*args, "--run.shard_index=1", "--run.shard_count=2"])
    assert s1["complete"] and s1["frames_generated"] == 2 and s1["frames"] == 6
    assert_same_simulation(sim_serial["out"], out)
    s2 = run_stage("simulate", [*args, "--run.finalize_only=true"])  # idempotent
    assert s2["complete"] and s2["frames_generated"] == 0
    assert_same_simulation(sim_serial["out"], out)


def test_array_slot_from_slurm_environment():
    from peaknet.simulate.config import SimulateConfig
    from peaknet.simulate.distributed import array_slot, my_shards

    cfg = SimulateConfig()
    cfg.run.array = True
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2",
           "SLURM_ARRAY_TASK_STEP": "1"}
    assert array_slot(cfg, env) == (3, 4)
    with pytest.raises(RuntimeError, match="not a Slurm array task"):
        array_slot(cfg, {})
    assert sorted(k for i in range(3) for r in range(2) for k in my_shards(10, i, 3, r, 2)) == list(range(10))
    assert my_shards(10, 1, 3, 0, 2) == [1, 7] and my_shards(10, 1, 3, 1, 2) == [4]


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_array_simulate_then_finalize(slurm_cluster, sim_serial, tmp_path):
    from peaknet.cli import run_stage

    out = tmp_path / "array"
    res = slurm_cluster.sbatch(REPO / "slurm" / "simulate.sbatch", *sim_serial["args"],
                               f"--run.out={out}",
                               options=["--array=0-1", "--cpus-per-task=1", "--mem=2G", "--time=10",
                                        f"--output={tmp_path}/sim-%A_%a.out"], cwd=REPO, timeout=300)
    assert len(res.states) == 2 and res.ok, res.output
    assert "array task 0/2" in res.output and "array task 1/2" in res.output
    assert sorted(p.name for p in out.glob("*.cxi")) == [f"shard_0000{k}.cxi" for k in range(3)]
    s = run_stage("simulate", [*sim_serial["args"], f"--run.out={out}", "--run.finalize_only=true"])
    assert s["complete"] and s["frames"] == 6
    assert_same_simulation(sim_serial["out"], out)
