"""The label stage at scale, with the real components: mpiexec, a local Ray, sbatch, submitit.

A few generated frames (thermolysin on two CSPAD modules, ~250 peaks) written as CXI files with
their peak lists; the MPI run (``mpiexec -n 2 python -m jobs.label``) is the reference, and
every other way of running (Ray, Slurm, submitit, serial after a kill) must give IDENTICAL
datasets. Bad input (NaN frame, truncated and missing files, unknown manifest events) must be
skipped with its reason and every input event accounted for exactly once.
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
import numpy as np
import pytest

from peaknet.cluster import REPO
from peaknet.config import load_config
from peaknet.parallel import (EventTable, PerEventTask, Plan, RowAppender, RunOptions,
                              SerialComm, Skip, assign_shards, make_shards, parse_event_id,
                              read_manifest, run_sharded)

PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
N_FILES, PER_FILE, MODULES = 2, 3, 2

CONFIG = """
[run]
inputs = {inputs}
out = "{out}"
shard_size = 2
batch_frames = 2
chunk_peaks = 40
progress = false

[fit]
device = "cpu"
max_nfev = 200
adu_per_photon = 10.0  # the generator's CSPAD gain (no geometry here: "auto" would say 1.0)
"""


# ----------------------------------------------------------------------------------------------
# data and helpers
# ----------------------------------------------------------------------------------------------
def _write_cxi(path: Path, frames, peak_lists, ids) -> Path:
    from peaknet.io.cxi import CXIWriter

    with CXIWriter(path, max_peaks=512, write_frames=True) as w:
        for frame, pk, ev in zip(frames, peak_lists, ids):
            w.append(pk, ev, frame=frame)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Good files a.cxi, b.cxi and bad ones: nan.cxi (frame 0 all NaN, frame 1 a few NaN
    pixels), trunc.cxi (a.cxi cut short), missing.cxi (does not exist)."""
    from peaknet.simulate.config import thermolysin_cspad_config
    from peaknet.simulate.generator import Simulator

    d = tmp_path_factory.mktemp("label_data")
    sim = Simulator(thermolysin_cspad_config(frames=N_FILES * PER_FILE + 2, seed=11))
    made = [sim.frame(i) for i in range(N_FILES * PER_FILE + 2)]
    frames = [f[:MODULES] for f, _ in made]
    peaks = [t.peaks().take(t.peaks().panel < MODULES) for _, t in made]
    ids = [t.event_id for _, t in made]
    good = []
    for f in range(N_FILES):
        s = slice(f * PER_FILE, (f + 1) * PER_FILE)
        good.append(_write_cxi(d / f"{'ab'[f]}.cxi", frames[s], peaks[s], ids[s]))
    nan0 = np.full_like(frames[-2], np.nan)
    nan1 = frames[-1].copy()
    nan1[0, 50:53, 60:63] = np.nan
    bad_nan = _write_cxi(d / "nan.cxi", [nan0, nan1], peaks[-2:], ids[-2:])
    trunc = d / "trunc.cxi"
    raw = good[0].read_bytes()
    trunc.write_bytes(raw[: len(raw) * 6 // 10])
    n_peaks = sum(len(p) for p in peaks[: N_FILES * PER_FILE])
    return {"dir": d, "good": good, "nan": bad_nan, "trunc": trunc, "missing": d / "missing.cxi",
            "n_peaks": n_peaks, "ids": ids, "frames": frames, "peaks": peaks}


def _config(tmp: Path, inputs, out: Path, extra: str = "") -> Path:
    path = tmp / f"label-{out.name}.toml"
    path.write_text(CONFIG.format(inputs=json.dumps([str(p) for p in inputs]), out=out) + extra)
    return path


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


def assert_same_outputs(out_a: Path, out_b: Path) -> None:
    """Every dataset of labels.h5 equal (dtype and values), and the same manifest."""
    a, b = _datasets(out_a / "labels.h5"), _datasets(out_b / "labels.h5")
    assert sorted(a) == sorted(b)
    differ = [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
              or not np.array_equal(a[n], b[n], equal_nan=a[n].dtype.kind == "f")]
    assert not differ, f"datasets differ: {differ}"
    ma = [{k: r[k] for k in ("event", "status", "kind")} for r in read_manifest(out_a / "label.manifest.jsonl")]
    mb = [{k: r[k] for k in ("event", "status", "kind")} for r in read_manifest(out_b / "label.manifest.jsonl")]
    assert ma == mb


def _check_accounting(out: Path, expected_events: list[str]) -> list[dict]:
    """Every expected event exactly once, in order, in the manifest and in /events."""
    rows = list(read_manifest(out / "label.manifest.jsonl"))
    assert [r["event"] for r in rows] == expected_events
    with h5py.File(out / "labels.h5", "r") as h5:
        ids = [x.decode() for x in h5["events/event_id"][()]]
        status = h5["events/status"][()]
        assert ids == expected_events
        assert list(status) == [0 if r["status"] == "done" else 1 for r in rows]
        n = len(expected_events)
        assert h5["labels/mask"].shape[0] == n and h5["frames/n_peaks"].shape == (n,)
        assert int(h5["frames/n_peaks"][()].sum()) == h5["peaks/event"].shape[0]
    s = json.loads((out / "label.summary.json").read_text())
    assert s["complete"] and s["n_events"] == n
    assert s["events"]["done"] + s["events"]["skipped"] == n
    assert s["events"]["skipped"] == sum(r["status"] == "skipped" for r in rows)
    return rows


def _good_events(data) -> list[str]:
    return [f"{p}//{i}" for p in data["good"] for i in range(PER_FILE)]


def _run_inprocess(cfg_path: Path, *overrides: str) -> dict:
    from peaknet.label.stage import LabelConfig, run

    cfg = load_config(LabelConfig, cfg_path, list(overrides))
    return run(cfg)


# ----------------------------------------------------------------------------------------------
# pure pieces
# ----------------------------------------------------------------------------------------------
def test_partition_is_deterministic():
    assert [(s.start, s.stop) for s in make_shards(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert assign_shards(7, 1, 3) == [1, 4]
    assert assign_shards(7, 0, 3, "block") == [0, 1, 2] and assign_shards(7, 2, 3, "block") == [5, 6]
    every = sorted(i for r in range(4) for i in assign_shards(10, r, 4, "block"))
    assert every == list(range(10))
    t = EventTable.from_counts(["x.cxi", "bad.cxi", "y.cxi"], [2, -1, 3],
                               {"bad.cxi": ("unreadable_file", "truncated")})
    assert t.ids() == ["x.cxi//0", "x.cxi//1", "bad.cxi//*", "y.cxi//0", "y.cxi//1", "y.cxi//2"]
    assert t.note(2) == ("unreadable_file", "truncated") and t.note(0) is None
    assert [(f, list(k)) for f, k, _ in t.runs(1, 5)] == [("x.cxi", [1]), ("bad.cxi//*", [2]),
                                                          ("y.cxi", [3, 4])]
    assert parse_event_id("a//b.cxi//12") == ("a//b.cxi", 12)
    p1, p2 = Plan(t, 2, 1, "k"), Plan(t, 3, 1, "k")
    assert p1.fingerprint == Plan(t, 2, 1, "k").fingerprint != p2.fingerprint
    assert [(a, b) for a, b in p2.batches(p2.shard(1))] == [(3, 4), (4, 5), (5, 6)]


class _Squares(PerEventTask):
    """A toy stage on the generic engine: events 0..n-1, result k*k; some skipped by the
    reader, event 7 fails in ``process``."""

    name, output_name = "squares", "squares.h5"

    def __init__(self, n: int, bad=()):
        self.n, self.bad = n, set(bad)

    def fingerprint(self) -> str:
        return f"squares-{self.n}"

    def plan_events(self):
        return EventTable.from_counts(["numbers"], [self.n]), {}

    def read(self, events, start, stop, meta):
        for k in range(start, stop):
            yield k, Skip("bad", f"{k} is bad") if k in self.bad else k

    def process(self, x):
        if x == 7:
            raise ValueError("seven")
        return x * x

    def open_writer(self, h5, plan, shard):
        return _SquaresWriter(h5)


class _SquaresWriter:
    def __init__(self, h5):
        self.rows = RowAppender(h5.require_group("sq"), {"value": np.int64},
                                attrs={"value": {"rows": "event"}})

    def write(self, k, result):
        self.rows.append(value=[result])

    def skip(self, k, skip):
        self.rows.append(value=[-1])

    def close(self):
        self.rows.flush()
        return {"rows": self.rows.n_rows}


def test_generic_engine_with_a_toy_task(tmp_path):
    opts = RunOptions(out=tmp_path / "sq", shard_size=3, batch_size=2, progress=False)
    s = run_sharded(_Squares(10, bad=[2]), opts, SerialComm())
    assert s["complete"] and s["events"] == {"done": 8, "skipped": 2}
    assert s["skipped_by_kind"] == {"bad": 1, "error": 1} and "seven" in s["skip_examples"]["error"]
    with h5py.File(tmp_path / "sq" / "squares.h5", "r") as h5:
        assert list(h5["sq/value"][()]) == [0, 1, -1, 9, 16, 25, 36, -1, 64, 81]
        assert [x.decode() for x in h5["events/event_id"][()]][:2] == ["numbers//0", "numbers//1"]
    assert run_sharded(_Squares(10, bad=[2]), opts, SerialComm()).get("reused")
    s = run_sharded(_Squares(12, bad=[2]), opts, SerialComm())  # another plan: redone
    assert s["n_events"] == 12 and s["this_run"]["shards_processed"] == 4


def test_labels_equal_label_peaks_per_frame(data, tmp_path):
    """One frame per batch and one chunk per frame: the stage gives what the label owner's
    one-frame chain (label_peaks) gives, mask and table."""
    from peaknet.label import label_peaks

    from peaknet.label.stage import LabelConfig

    good = np.ones(data["frames"][0].shape, bool)  # a pixel mask file: one bad block
    good[1, 40:140, 100:300] = False
    with h5py.File(tmp_path / "mask.h5", "w") as h5:
        h5["data/data"] = good.astype(np.uint8)
    out = tmp_path / "perframe"
    cfg = _config(tmp_path, data["good"][:1], out)
    s = _run_inprocess(cfg, "run.batch_frames=1", "run.chunk_peaks=100000", "run.shard_size=3",
                       f"run.mask_file={tmp_path / 'mask.h5'}")
    assert s["events"] == {"done": PER_FILE, "skipped": 0}
    fit = load_config(LabelConfig, cfg).fit
    with h5py.File(out / "labels.h5", "r") as h5:
        ev = h5["peaks/event"][()]
        assert (h5["peaks/flags"][()] & 2).any()  # Flag.MASKED: the mask reached the windows
        for i in range(PER_FILE):
            res = label_peaks(data["frames"][i], data["peaks"][i], good, fit)
            label = h5["labels/mask"][i]
            assert np.array_equal(label == 1, res.label == 1)
            assert np.array_equal(label == 255, res.ignore)
            rows = ev == i
            for col in ("A", "ss", "fs", "redchi", "status"):
                assert np.array_equal(h5[f"peaks/{col}"][()][rows], res.table[col], equal_nan=True), col


# ----------------------------------------------------------------------------------------------
# MPI: the reference
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi_reference(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label_mpi")
    out = tmp / "mpi"
    cfg = _config(tmp, data["good"], out)
    t0 = time.perf_counter()
    p = subprocess.run([MPIEXEC, "-n", "2", PY, "-m", "jobs.label", "--config", str(cfg),
                        "--run.backend=mpi"], capture_output=True, text=True, timeout=300,
                       env=_env(), cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"out": out, "cfg": cfg, "summary": _summary(p.stdout), "log": p.stderr,
            "seconds": time.perf_counter() - t0}


@pytest.mark.mpi
def test_mpiexec_two_ranks(mpi_reference, data):
    s, out = mpi_reference["summary"], mpi_reference["out"]
    assert s["complete"] and s["events"] == {"done": N_FILES * PER_FILE, "skipped": 0}
    assert s["this_run"]["backend"] == "mpi" and s["this_run"]["ranks"] == 2
    assert len(s["this_run"]["rss_mb_per_rank"]) == 2
    assert s["peaks"]["total"] == data["n_peaks"] == sum(s["peaks"]["by_status"].values())
    assert s["peaks"]["by_status"]["ok"] > 0
    log = mpi_reference["log"]
    assert "rank 0/2: 2 shard(s) assigned" in log and "rank 1/2: 1 shard(s) assigned" in log
    _check_accounting(out, _good_events(data))
    with h5py.File(out / "labels.h5", "r") as h5:
        m = h5["labels/mask"]
        assert m.shape == (N_FILES * PER_FILE, MODULES, 185, 388) and m.chunks == (1, MODULES, 185, 388)
        assert m.compression == "gzip"
        assert set(np.unique(m[()])) <= {0, 1, 255} and (m[()] == 1).any()
        assert [x.decode() for x in h5["frames/source_event_id"][()]] == data["ids"][:N_FILES * PER_FILE]
        assert h5["peaks/status"].attrs["names"][0] == "ok"
    # a second run finds the output complete and does nothing
    assert (out / "label.config.toml").is_file()


# ----------------------------------------------------------------------------------------------
# Ray gives the same outputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_matches_mpi(mpi_reference, ray_head, tmp_path):
    out = tmp_path / "ray"
    cfg = _config(tmp_path, _inputs(mpi_reference), out)
    s = _run_inprocess(cfg, "run.backend=ray", f"ray.address={ray_head.address}",
                       "ray.max_in_flight=4")
    assert s["complete"] and s["this_run"]["backend"] == "ray"
    assert s["this_run"]["max_in_flight"] <= 4
    assert_same_outputs(mpi_reference["out"], out)


def _inputs(ref) -> list[str]:
    from peaknet.config import load_config as _lc
    from peaknet.label.stage import LabelConfig

    return _lc(LabelConfig, ref["cfg"]).run.inputs


# ----------------------------------------------------------------------------------------------
# kill and re-run
# ----------------------------------------------------------------------------------------------
def test_interrupted_then_corrupted_then_rerun(mpi_reference, tmp_path):
    out = tmp_path / "resume"
    cfg = _config(tmp_path, _inputs(mpi_reference), out)
    s1 = _run_inprocess(cfg, "run.backend=serial", "run.stop_after_shards=2")
    assert s1["interrupted"] and not s1["complete"] and s1["this_run"]["shards_processed"] == 2
    assert not (out / "labels.h5").exists()
    parts = out / "parts"
    assert sorted(p.name for p in parts.glob("*.json")) == ["label-shard-000000.json", "label-shard-000001.json"]
    # corrupt shard 0's part (same size, other bytes): the digest catches it
    p0 = parts / "label-shard-000000.h5"
    raw = bytearray(p0.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    p0.write_bytes(bytes(raw))
    s2 = _run_inprocess(cfg, "run.backend=serial")
    assert s2["complete"] and s2["this_run"]["shards_processed"] == 2  # shard 0 again + shard 2
    assert_same_outputs(mpi_reference["out"], out)
    # complete: a third run does nothing
    s3 = _run_inprocess(cfg, "run.backend=serial")
    assert s3.get("reused") and s3["plan"] == s2["plan"]


def test_sigkill_then_rerun(mpi_reference, tmp_path):
    """A real kill -9 of a running job (its process group), then a re-run: same output, each
    event once."""
    out = tmp_path / "killed"
    cfg = _config(tmp_path, _inputs(mpi_reference), out)
    proc = subprocess.Popen([PY, "-m", "jobs.label", "--config", str(cfg), "--run.backend=serial"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list((out / "parts").glob("*.json")):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    n_before = len(list((out / "parts").glob("*.json")))
    assert 1 <= n_before < 3
    s = _run_inprocess(cfg, "run.backend=serial")
    assert s["complete"]
    assert s["this_run"]["shards_processed"] == s["n_shards"] - n_before
    assert_same_outputs(mpi_reference["out"], out)
    assert not list((out / "parts").glob("*.tmp*"))


# ----------------------------------------------------------------------------------------------
# bad input: skipped with a reason, everything accounted for
# ----------------------------------------------------------------------------------------------
def test_bad_events_are_skipped_and_accounted(data, tmp_path):
    out = tmp_path / "bad"
    inputs = [data["good"][1], data["nan"], data["trunc"], data["missing"]]
    cfg = _config(tmp_path, inputs, out)
    s = _run_inprocess(cfg, "run.backend=serial")
    assert s["complete"]
    # trunc.cxi may fail to open (one placeholder event) or fail frame by frame
    with h5py.File(out / "labels.h5", "r") as h5:
        ids = [x.decode() for x in h5["events/event_id"][()]]
    trunc_ids = [e for e in ids if e.startswith(str(data["trunc"]))]
    assert trunc_ids == [f"{data['trunc']}//*"] or trunc_ids == [f"{data['trunc']}//{i}" for i in range(len(trunc_ids))]
    expected = ([f"{data['good'][1]}//{i}" for i in range(PER_FILE)]
                + [f"{data['nan']}//0", f"{data['nan']}//1"] + trunc_ids + [f"{data['missing']}//*"])
    rows = {r["event"]: r for r in _check_accounting(out, expected)}
    nan0 = rows[f"{data['nan']}//0"]
    assert nan0["status"] == "skipped" and nan0["kind"] == "nonfinite" and "NaN" in nan0["reason"]
    assert rows[f"{data['nan']}//1"]["status"] == "done"  # a few NaN pixels: handled per window
    miss = rows[f"{data['missing']}//*"]
    assert miss["kind"] == "unreadable_file" and "does not exist" in miss["reason"]
    assert all(rows[e]["status"] == "skipped" for e in trunc_ids)
    assert all(rows[e]["status"] == "done" for e in expected[:PER_FILE])
    assert s["skipped_by_kind"]["nonfinite"] == 1 and s["skipped_by_kind"]["unreadable_file"] >= 1
    with h5py.File(out / "labels.h5", "r") as h5:
        k = expected.index(f"{data['nan']}//0")
        assert not h5["labels/mask"][k].any() and h5["frames/n_peaks"][k] == 0
        reason = h5["events/reason"][k].decode()
        assert "NaN" in reason


def test_frame_with_zero_peaks(data, tmp_path):
    """A frame whose peak list is empty is labelled (all background), not a crash; alone in
    its batch or next to frames with peaks."""
    from peaknet.peaks import PeakList

    frames = data["frames"][:3]
    lists = [PeakList(), data["peaks"][1], PeakList()]
    path = _write_cxi(tmp_path / "empty.cxi", frames, lists, data["ids"][:3])
    for batch in (1, 2):
        out = tmp_path / f"empty{batch}"
        cfg = _config(tmp_path, [path], out)
        s = _run_inprocess(cfg, "run.backend=serial", f"run.batch_frames={batch}")
        assert s["events"] == {"done": 3, "skipped": 0}
        assert s["peaks"]["total"] == len(lists[1])
        with h5py.File(out / "labels.h5", "r") as h5:
            assert h5["frames/n_peaks"][()].tolist() == [0, len(lists[1]), 0]
            assert not h5["labels/mask"][0].any() and not h5["labels/mask"][2].any()
            assert (h5["labels/mask"][1] == 1).any()
            assert set(h5["peaks/event"][()].tolist()) == {1}


def test_manifest_selects_events(data, tmp_path):
    """A curation manifest: selected events by source id and by <file>//<index>; unselected
    ones left out; an unknown one reported skipped."""
    man = tmp_path / "curation.jsonl"
    a, b = data["good"]
    rows = [{"event": data["ids"][1], "selected": True},  # a.cxi frame 1, by its own id
            {"event": f"{b}//2", "selected": True},
            {"event": f"{a}//0", "selected": False},
            {"event": "sim/99/7", "selected": True}]
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sel"
    cfg = _config(tmp_path, data["good"], out)
    s = _run_inprocess(cfg, f"run.manifest={man}", "run.backend=serial")
    got = _check_accounting(out, [f"{a}//1", f"{b}//2", "sim/99/7"])
    assert [r["status"] for r in got] == ["done", "done", "skipped"]
    assert got[2]["kind"] == "not_in_inputs"
    assert s["events"] == {"done": 2, "skipped": 1}


def test_serial_backend_refuses_several_launched_processes(monkeypatch):
    from peaknet.parallel import get_comm

    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(RuntimeError, match="backend is 'serial'"):
        get_comm("serial")


# ----------------------------------------------------------------------------------------------
# Slurm: sbatch of the template, and submitit
# ----------------------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.slow
def test_sbatch_label_template(slurm_cluster, mpi_reference, tmp_path):
    out = tmp_path / "sbatch"
    cfg = _config(tmp_path, _inputs(mpi_reference), out)
    res = slurm_cluster.sbatch(REPO / "slurm" / "label.sbatch", str(cfg), f"--run.out={out}",
                               options=["--ntasks=2", "--time=10", "--mem-per-cpu=1G",
                                        f"--output={tmp_path}/job-%j.out"],
                               cwd=REPO, timeout=300)
    assert res.ok, res.output[-3000:]
    # the stored summary: srun splits a long printed line that another rank's log can land inside
    s = json.loads((out / "label.summary.json").read_text())
    assert s["complete"] and s["this_run"]["backend"] == "mpi" and s["this_run"]["ranks"] == 2
    assert "rank 1/2" in res.output
    assert_same_outputs(mpi_reference["out"], out)


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.slow
def test_submitit_label_two_tasks(slurm_cluster, slurm_env, mpi_reference, tmp_path):
    from peaknet.launch.submitit_launcher import submit_stage

    out = tmp_path / "submitit"
    cfg = _config(tmp_path, _inputs(mpi_reference), out)
    job = submit_stage("label", cfg, [f"run.out={out}"], folder=tmp_path / "jobs",
                       tasks_per_node=2, timeout_min=10, cluster="slurm",
                       slurm_partition=slurm_cluster.partition)
    results = job.results()  # one per task: rank 0's summary, {} from rank 1
    assert len(results) == 2 and results[1] == {}
    s = results[0]
    assert s["complete"] and s["this_run"]["ranks"] == 2
    assert_same_outputs(mpi_reference["out"], out)
