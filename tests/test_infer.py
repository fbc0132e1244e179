"""peaknet.infer: sources, predictors, accounting, the legacy coupling and the hybrid pipeline.

Real runs on small data: a tiny 4-module detector (4 x 64 x 64 pixels) with frames from the
simulator, a few real CSPAD CBF frames, a real local Ray head (fixture ``ray_head``), MPI
producers started with the venv's ``mpiexec -n 2``, and the local Slurm for the templates.
The fault tests kill processes for real (SIGKILL of an inference actor, of a writer, of the
whole job) and check that the output is complete with nothing written twice.

The PeakNet predictor is a randomly initialised ``small-cpu`` model with a fixed seed (no trained
weights ship yet), thresholded at probability 0.02 so that it reports ~20 "peaks" per frame:
enough to compare peak lists between pipelines, meaningless as science.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet.config import load_config
from peaknet.errors import ConfigError, InputError
from peaknet.infer import (EventId, InferConfig, Plan, ShardCollector, build_predictor,
                           load_weights, open_source, partition, read_outputs, run,
                           verify_outputs)
from peaknet.infer.config import PredictorSection

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
CBF_DIR = REPO.parent / "shared" / "data" / "real" / "thermolysin_cspad"

TINY_GEOM = """; tiny 4-module detector for tests: 4 modules of 64 x 64 pixels of 400 um around the beam
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


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny geometry and CXI inputs made from simulated frames:
    a.cxi (10 frames, frame 3 all NaN), b.cxi (8 frames), wrong.cxi (2 frames of another
    shape), broken.cxi (not HDF5)."""
    from peaknet.simulate.config import SimulateConfig
    from peaknet.simulate.generator import Simulator

    d = tmp_path_factory.mktemp("infer-data")
    geom = d / "tiny.geom"
    geom.write_text(TINY_GEOM)
    sim = Simulator(load_config(SimulateConfig, None, [f"run.geometry={geom}", "run.seed=3"]))
    frames = np.stack([sim.frame(i)[0] for i in range(18)])
    a = frames[:10].copy()
    a[3] = np.nan
    for name, arr in (("a.cxi", a), ("b.cxi", frames[10:]),
                      ("wrong.cxi", np.zeros((2, 4, 32, 64), np.float32))):
        with h5py.File(d / name, "w") as h5:
            h5["/entry_1/data_1/data"] = arr
    (d / "broken.cxi").write_bytes(b"this is not an HDF5 file")
    return {"dir": d, "geom": geom, "frames": frames}


def overrides(out, data, *extra, predictor="peaknet"):
    """Common settings: the CXI inputs (good, NaN frame, wrong shape, broken) in shards of 4."""
    d = data["dir"]
    inputs = json.dumps([str(d / "a.cxi"), str(d / "b.cxi"), str(d / "wrong.cxi"),
                         str(d / "broken.cxi")])
    return [f"run.out={out}", "run.log_every_s=3", "run.progress=false",
            "source.kind=cxi", f"source.inputs={inputs}", f"source.geometry={data['geom']}",
            "source.events_per_shard=4", "pipeline.batch_size=2",
            f"predictor.kind={predictor}", "predictor.threshold=0.02",
            "predictor.peakfinder8.preset=crystfel", "output.min_peaks=3", *extra]


def make_cfg(out, data, *extra, predictor="peaknet") -> InferConfig:
    return load_config(InferConfig, None, overrides(out, data, *extra, predictor=predictor))


def assert_same_peaks(a: dict, b: dict) -> int:
    """Same events, same peak lists (positions to 1e-4 px, intensities to 1e-4 relative)."""
    assert set(a) == set(b)
    n = 0
    for k in a:
        pa, pb = a[k], b[k]
        assert len(pa) == len(pb), k
        np.testing.assert_allclose(pa.positions(), pb.positions(), atol=1e-4, err_msg=k)
        np.testing.assert_allclose(pa.intensity, pb.intensity, rtol=1e-4, atol=1e-3, err_msg=k)
        n += len(pa)
    return n


def wait_for(pred, timeout: float = 180.0, what: str = ""):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_env(**extra) -> dict:
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def mpi_job(entry: str, args: list, n: int = 2, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(MPIEXEC), "-n", str(n), sys.executable, "-m", entry, *args],
                            cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
def test_event_ids_shards_and_partition(data):
    cfg = make_cfg("unused", data, "source.kind=generator", "source.frames=23",
                   "source.events_per_shard=5")
    src = open_source(cfg.source)
    shards = src.shards()
    assert [s.shard_id for s in shards] == [f"sim0-{a:06d}" for a in range(0, 23, 5)]
    assert [s.n_events for s in shards] == [5, 5, 5, 5, 3]
    ids = [str(s.event_id(k)) for s in shards for k in range(s.n_events)]
    assert ids == [f"sim/0//{i}" for i in range(23)]
    assert EventId.parse(ids[7]) == EventId("sim/0", 7)
    assert [str(s.event_id(0)) for s in open_source(cfg.source).shards()] == \
        [str(s.event_id(0)) for s in shards]  # stable
    for size in (1, 2, 3, 4, 7):
        parts = [partition(shards, r, size) for r in range(size)]
        assert parts == [partition(shards, r, size) for r in range(size)]  # deterministic
        got = sorted(s.shard_id for p in parts for s in p)
        assert got == sorted(s.shard_id for s in shards)  # complete and disjoint
        loads = [sum(s.n_events for s in p) for p in parts if p]
        assert max(loads) - min(loads) <= 5
    batches = list(src.read(shards[-1], 2))
    assert [b.positions.tolist() for b in batches] == [[0, 1], [2]]
    np.testing.assert_array_equal(batches[0].frames[1], src._sim.frame(21)[0])


def test_cxi_and_cbf_sources_record_bad_events(data):
    cfg = make_cfg("unused", data)
    src = open_source(cfg.source)
    assert src.frame_shape == (4, 64, 64)
    assert [u["file"] for u in src.unreadable] == [str(data["dir"] / "broken.cxi")]
    shards = src.shards()
    assert [(Path(s.file).name, s.start, s.stop) for s in shards] == [
        ("a.cxi", 0, 4), ("a.cxi", 4, 8), ("a.cxi", 8, 10), ("b.cxi", 0, 4), ("b.cxi", 4, 8),
        ("wrong.cxi", 0, 2)]
    first = list(src.read(shards[0], 4))[0]
    assert first.positions.tolist() == [0, 1, 2]
    assert first.skipped[0][0] == 3 and first.skipped[0][1].startswith("nonfinite")
    np.testing.assert_array_equal(first.frames[2], data["frames"][2])
    wrong = list(src.read(shards[-1], 4))[0]
    assert wrong.n_frames == 0 and all(r.startswith("bad shape") for _, r in wrong.skipped)

    if not CBF_DIR.is_dir():
        pytest.skip(f"real CBF data not found at {CBF_DIR}")
    from peaknet.infer.config import SourceSection

    cbf = open_source(SourceSection(inputs=[str(CBF_DIR)], events_per_shard=3))
    assert cbf.kind == "cbf" and cbf.frame_shape == (32, 185, 388)
    cshards = cbf.shards()
    assert [s.n_events for s in cshards] == [3, 1]
    assert cshards[0].event_id(1) == EventId(str(sorted(CBF_DIR.glob("*.cbf"))[1]), 0)
    b = next(cbf.read(cshards[1], 1))
    assert b.frames.shape == (1, 32, 185, 388) and b.frames.dtype == np.float32


# --------------------------------------------------------------------------------------------
# predictors
# --------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_predictors_weights_masks_and_peakfinder8(data, tmp_path):
    import torch
    from safetensors.torch import save_file

    from peaknet.findpeaks import Peakfinder8, preset
    from peaknet.io.geometry import parse_geometry

    geom = parse_geometry(str(data["geom"]))
    frames = data["frames"][[0, 4, 5]]  # hits (peakfinder8 finds 35, 17, 19 peaks)
    sec = PredictorSection(threshold=0.02)
    p1 = build_predictor(sec, geom, frames.shape[1:])
    peaks = p1.predict(frames)
    assert len(peaks) == 3 and all(len(p) > 0 for p in peaks)
    assert p1.describe()["weights"] is None  # random init, seed 0
    # the same seed gives the same model; weights from safetensors and from a weights-only
    # torch checkpoint give the same peak lists
    sd = {k: v.contiguous() for k, v in p1.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd}, tmp_path / "w.pt")
    for w in ("w.safetensors", "w.pt"):
        p2 = build_predictor(PredictorSection(threshold=0.02, weights=tmp_path / w, seed=99),
                             geom, frames.shape[1:])
        for a, b in zip(peaks, p2.predict(frames)):
            np.testing.assert_allclose(a.positions(), b.positions(), atol=1e-5)
    # arbitrary pickles are refused (weights_only)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(InputError, match="weights-only"):
        load_weights(tmp_path / "evil.pt")
    # masks: everything masked -> no peaks
    none = p1.predict(frames, masks=np.zeros(frames.shape[1:], bool))
    assert all(len(p) == 0 for p in none)
    # peakfinder8 behind the interface == peakfinder8 called directly
    pf_sec = PredictorSection(kind="peakfinder8")
    pf_sec.peakfinder8.preset = "crystfel"
    pf = build_predictor(pf_sec, geom, frames.shape[1:])
    direct = Peakfinder8(geom.radius_map(), geom.good_pixel_mask(), preset("crystfel"))
    for f, got in zip(frames, pf.predict(frames)):
        want = direct(f)
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got.positions(), want.positions())
    with pytest.raises(ConfigError, match="geometry"):
        build_predictor(pf_sec, None, frames.shape[1:])


# --------------------------------------------------------------------------------------------
# accounting, legacy coupling, resume
# --------------------------------------------------------------------------------------------
def test_legacy_accounts_for_every_event_and_resumes(data, tmp_path):
    out = tmp_path / "legacy"
    cfg = make_cfg(out, data, "pipeline.mode=legacy", predictor="peakfinder8")
    s = run(cfg)
    assert s["events_in"] == 20 and s["shards"] == 6 and s["shards_done"] == 6
    assert s["events_processed"] == 17  # 20 - NaN frame - 2 of the wrong shape
    assert s["skipped_by_reason"] == {"nonfinite": 1, "bad shape": 2, "unreadable": 1}
    assert s["hits"] + s["misses"] == 17 and s["hits"] > 0 and s["misses"] > 0
    assert s["unreadable_inputs"] == 1
    v = verify_outputs(out)
    assert v["ok"], v["problems"]
    assert (v["hits"], v["misses"], v["skipped"]) == (s["hits"], s["misses"], 3)
    skipped = [json.loads(line) for line in (out / "infer.skipped.jsonl").read_text().splitlines()]
    assert {r["event"] for r in skipped} == {
        f"{data['dir'] / 'a.cxi'}//3", f"{data['dir'] / 'wrong.cxi'}//0",
        f"{data['dir'] / 'wrong.cxi'}//1", None}
    with h5py.File(out / "a-000000.cxi") as h5:  # CrystFEL's datasets, slab coordinates
        n = h5["/entry_1/result_1/nPeaks"][()]
        assert n.ndim == 1 and (n >= 3).all()
        assert h5["/entry_1/result_1/peakTotalIntensity"].shape[0] == n.size
        ev = [e.decode() for e in h5["/entry_1/event_id"][()]]
        assert ev == sorted(ev, key=lambda e: int(e.rsplit("//", 1)[1]))
    # re-run: everything is finished -> nothing redone
    s2 = run(cfg)
    assert s2["shards_resumed"] == 6 and s2["frames_this_run"] == 0
    # a shard whose record is gone is redone, alone; other settings redo everything
    (out / "shards" / "b-000004.json").unlink()
    s3 = run(cfg)
    assert s3["shards_resumed"] == 5 and s3["frames_this_run"] == 4
    s4 = run(make_cfg(out, data, "pipeline.mode=legacy", "output.min_peaks=1",
                      predictor="peakfinder8"))
    assert s4["shards_resumed"] == 0 and s4["hits"] >= s["hits"]
    assert verify_outputs(out)["ok"]


def test_shard_collector_drops_duplicates_and_refuses_overlaps(data, tmp_path):
    from peaknet.infer.accounting import BatchResult
    from peaknet.peaks import PeakList

    cfg = make_cfg(tmp_path, data)
    shard = open_source(cfg.source).shards()[0]
    col = ShardCollector(shard, tmp_path, "fp", cfg.output)
    one = PeakList.from_columns(3, ss=[1, 2, 3], fs=[4, 5, 6])
    r0 = BatchResult(f"{shard.shard_id}#0", shard.shard_id, np.array([0, 1]), [one, one])
    assert col.add(r0) and not col.add(r0) and col.duplicates == 1
    with pytest.raises(RuntimeError, match="overlap"):
        col.add(BatchResult(f"{shard.shard_id}#9", shard.shard_id, np.array([1]), [one]))
    with pytest.raises(RuntimeError, match="missing"):
        col.write()
    col.add(BatchResult(f"{shard.shard_id}#1", shard.shard_id, np.array([2]), [one],
                        [(3, "nonfinite: test")]))
    rec = col.write()
    assert (rec["hits"], rec["n_skipped"], rec["duplicates_dropped"]) == (3, 1, 1)


def test_tracked_queue_capacity_requeue_and_close():
    """The queue actor's logic, run directly on asyncio (no Ray): capacity in frames blocks
    producers, a dead consumer's items come back first, a duplicate delivery is acknowledged
    on its own, and CLOSED waits for other consumers' in-flight items."""
    import asyncio

    from peaknet.infer.pipeline import CLOSED, TrackedQueue

    async def scenario():
        q = TrackedQueue(capacity=4, n_producers=1)
        assert (await q.put("b0", "b0", 3, producer=0))["ok"]
        # 3 + 3 > 4 frames: the producer waits (backpressure) ...
        assert not (await q.put("b1", "b1", 3, producer=0, timeout=0.05))["ok"]
        blocked = asyncio.ensure_future(q.put("b1", "b1", 3, producer=0, timeout=5))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        assert await q.get("a", timeout=1) == "b0"  # ... until a consumer takes a batch
        assert (await blocked)["ok"]
        assert await q.get("b", timeout=1) == "b1"
        # consumer "a" dies: its batch goes back, first in line, to "b"
        assert await q.requeue("a") == 1
        await q.put("b2", "b2", 1, producer=0)
        assert await q.get("b", timeout=1) == "b0"
        await q.producer_done(0)
        # "b" holds b1 and b0: "c" may not be told CLOSED yet (b could die and give them back)
        assert await q.get("c", timeout=1) == "b2"
        assert await q.get("c", timeout=0.05) is None
        assert await q.ack("b", ["b1", "b0"]) == 2
        assert await q.ack("c", "b2") == 1
        assert await q.get("c", timeout=1) == CLOSED
        assert (await q.drain(0, timeout=1))["done"]
        # a duplicate delivery is acknowledged alone: the first copy stays held
        r = TrackedQueue(capacity=10)
        await r.put("x", "k", 1)
        await r.put("x", "k", 1)
        await r.get("w", timeout=1), await r.get("w", timeout=1)
        assert await r.ack("w", "k") == 1 and (await r.stats())["inflight"] == 1
        assert await r.requeue("w") == 1
        st = await r.stats()
        assert (st["depth_batches"], st["inflight"], st["requeued"]) == (1, 0, 1)

    asyncio.run(scenario())


def test_config_is_checked():
    with pytest.raises(ConfigError, match="preset"):
        load_config(InferConfig, None, ["predictor.preset=nope"])
    with pytest.raises(ConfigError, match="inputs"):
        load_config(InferConfig, None, ["source.kind=cxi"])
    with pytest.raises(ConfigError, match="address"):
        load_config(InferConfig, None, ["ray.address=auto"])
    cfg = load_config(InferConfig, None, [])
    assert cfg.pipeline.queue_capacity == 3200 and cfg.pipeline.mode == "hybrid"


def test_submitit_task_runs_the_stage(data, tmp_path):
    pytest.importorskip("submitit")
    from peaknet.launch.submitit_infer import submit_infer

    out = tmp_path / "sub"
    job = submit_infer(None, overrides(out, data, predictor="peakfinder8"),
                       folder=tmp_path / "submitit", mode="legacy", cluster="debug")
    s = job.result()
    assert s["mode"] == "legacy" and s["shards_done"] == 6 and verify_outputs(out)["ok"]


# --------------------------------------------------------------------------------------------
# the hybrid pipeline on a real Ray, MPI producers
# --------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.mpi
@pytest.mark.timeout(900)
def test_hybrid_equals_legacy_under_mpiexec(data, tmp_path, ray_head):
    """mpiexec -n 2 producers -> Ray queue -> 2 CPU actors -> 2 writers, against mpiexec -n 2
    legacy ranks: same peak lists, same accounting."""
    hyb, leg = tmp_path / "hybrid", tmp_path / "legacy"
    args_h = [f"--{o}" for o in overrides(hyb, data, "output.write_frames=true")] + [
        f"--ray.address={ray_head.address}", "--pipeline.actors=2", "--pipeline.writers=2",
        "--pipeline.actor_cpus=0.5", "--pipeline.writer_cpus=0.25",
        "--pipeline.queue_capacity=6"]
    args_l = [f"--{o}" for o in overrides(leg, data, "output.write_frames=true")]
    ph = mpi_job("jobs.infer", args_h)
    out_h = finish(ph)
    out_l = finish(mpi_job("jobs.infer_mpi", args_l))
    sh = json.loads(out_h.strip().splitlines()[-1])
    sl = json.loads(out_l.strip().splitlines()[-1])
    assert sh["mode"] == "hybrid" and sh["producers"] == 2 and sh["actors"] == 2
    assert sl["mode"] == "legacy" and sl["ranks"] == 2
    assert len({p["producer"] for p in sh["per_producer"]}) == 2
    q = sh["queue"]
    assert q["capacity"] == 6 and q["max_depth"] <= 6  # bounded in frames
    assert q["put"] == q["acked"] and q["inflight"] == 0
    for key in ("events_in", "events_processed", "hits", "misses", "peaks", "skipped",
                "skipped_by_reason"):
        assert sh[key] == sl[key], key
    assert sh["hits"] > 0
    for o in (hyb, leg):
        v = verify_outputs(o)
        assert v["ok"], v["problems"]
    n = assert_same_peaks(read_outputs(hyb), read_outputs(leg))
    assert n > 50
    # frames of hits travel with the results (hybrid) or are written inline (legacy): the same
    for name in ("a-000000.cxi", "b-000004.cxi"):
        with h5py.File(hyb / name) as fh, h5py.File(leg / name) as fl:
            ids = [int(e.decode().rsplit("//", 1)[1]) for e in fh["/entry_1/event_id"][()]]
            off = 0 if name.startswith("a") else 10
            np.testing.assert_array_equal(fh["/entry_1/data_1/data"][()],
                                          fl["/entry_1/data_1/data"][()])
            np.testing.assert_array_equal(fh["/entry_1/data_1/data"][()],
                                          data["frames"][[off + i for i in ids]])
    metrics = [json.loads(x) for x in (hyb / "infer.metrics.jsonl").read_text().splitlines()]
    assert metrics and "queue" in metrics[-1] and "rates" in metrics[-1]


@pytest.fixture(scope="module")
def ray_driver(ray_head):
    """This test process connected to the session's Ray head (fault tests drive in-process)."""
    import ray

    if not ray.is_initialized():
        ray_head.connect()
    yield ray
    ray.shutdown()


def _run_in_thread(cfg):
    box: dict = {}

    def go():
        try:
            box["summary"] = run(cfg)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th, box


def _actor(ray, name, ns):
    def get():
        try:
            return ray.get_actor(name, namespace=ns)
        except ValueError:
            return None
    return wait_for(get, 120, f"actor {name}")


FAULT_FRAMES = 48


def _gen_overrides(out, data, *extra):
    """The fault tests' data: 48 frames made on the fly by the generator (long enough a run to
    kill a process in the middle of it)."""
    return [f"run.out={out}", "run.log_every_s=3", "run.progress=false",
            "source.kind=generator", f"source.geometry={data['geom']}",
            f"source.frames={FAULT_FRAMES}", "source.sim_overrides=[\"run.seed=5\"]",
            "source.events_per_shard=8", "pipeline.batch_size=2", "predictor.threshold=0.02",
            "output.min_peaks=3", *extra]


def _fault_cfg(out, data, ns, *extra):
    return load_config(InferConfig, None, _gen_overrides(
        out, data, f"ray.namespace={ns}", "pipeline.producers=2", "pipeline.actors=2",
        "pipeline.actor_cpus=0.5", "pipeline.writers=1", "pipeline.writer_cpus=0.25",
        "pipeline.queue_capacity=8", *extra))


def _check_complete(out, summary, reference=None):
    v = verify_outputs(out)
    assert v["ok"], v["problems"]
    assert summary["events_in"] == FAULT_FRAMES and summary["skipped"] == 0
    assert summary["error"] is None and not summary["shards_missing"]
    got = read_outputs(out)  # raises if an event was written twice
    if reference is not None:
        assert_same_peaks(got, reference)
    assert not list(Path(out).glob("*.tmp"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Legacy peak lists of the fault tests' data (in-process, one rank)."""
    out = tmp_path_factory.mktemp("ref")
    run(load_config(InferConfig, None, _gen_overrides(out, data, "pipeline.mode=legacy")))
    return read_outputs(out)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_inference_actor_is_restarted_and_its_batches_redone(data, tmp_path, ray_driver,
                                                                     reference):
    ray = ray_driver
    ns = f"test-kill-actor-{os.getpid()}"
    cfg = _fault_cfg(tmp_path / "o", data, ns)
    th, box = _run_in_thread(cfg)
    queue = _actor(ray, "infer-input", ns)
    victim = _actor(ray, "infer-actor-0", ns)

    def busy():
        st = ray.get(victim.stats.remote())
        q = ray.get(queue.stats.remote())
        return st if st["frames"] >= 2 and q["inflight_by"].get("infer-actor-0") else None

    st = wait_for(busy, 300, "actor 0 to hold a batch")
    os.kill(st["pid"], signal.SIGKILL)
    th.join(600)
    assert not th.is_alive()
    if "error" in box:
        raise box["error"]
    s = box["summary"]
    assert s["queue"]["requeued"] >= 1 and s["queue"]["requeue_events"] >= 1
    a0 = [a for a in s["per_actor"] if a["name"] == "infer-actor-0"][0]
    assert a0["restarted"] and a0["pid"] != st["pid"]
    _check_complete(tmp_path / "o", s, reference)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_writer_rewrites_its_unfinished_shards(data, tmp_path, ray_driver, reference):
    ray = ray_driver
    ns = f"test-kill-writer-{os.getpid()}"
    cfg = _fault_cfg(tmp_path / "o", data, ns)
    th, box = _run_in_thread(cfg)
    writer = _actor(ray, "infer-writer-0", ns)

    def holding():
        st = ray.get(writer.stats.remote())
        return st if st["shards_written"] >= 1 and st["events_held"] > 0 else None

    st = wait_for(holding, 300, "the writer to hold results of an unfinished shard")
    os.kill(st["pid"], signal.SIGKILL)
    th.join(600)
    assert not th.is_alive()
    if "error" in box:
        raise box["error"]
    s = box["summary"]
    w = s["per_writer"][0]
    assert w["restarted"] and w["requeued_at_start"] >= 1
    _check_complete(tmp_path / "o", s, reference)


@pytest.mark.ray
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_job_resumes_from_finished_shards(data, tmp_path, ray_head, ray_driver,
                                                 reference):
    out = tmp_path / "o"
    extra = ["pipeline.actors=1", "pipeline.actor_cpus=0.5", "pipeline.writer_cpus=0.25"]
    args = [f"--{o}" for o in _gen_overrides(out, data, *extra)] + [
        f"--ray.address={ray_head.address}"]
    proc = mpi_job("jobs.infer", args, start_new_session=True)
    try:
        wait_for(lambda: list((out / "shards").glob("*.json")) if (out / "shards").is_dir()
                 else None, 400, "a first finished shard")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    n_done = len(list((out / "shards").glob("*.json")))
    plan = Plan.load(out)
    assert 1 <= n_done < len(plan.shards), "the job was not killed mid-run"
    s = run(load_config(InferConfig, None, _gen_overrides(out, data, *extra)))
    assert s["shards_resumed"] == n_done  # every shard finished before the kill is kept
    assert 0 < s["frames_this_run"] == FAULT_FRAMES - 8 * n_done  # only the others are redone
    _check_complete(out, s, reference)


# --------------------------------------------------------------------------------------------
# Slurm templates
# --------------------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sbatch_templates(data, tmp_path, slurm_cluster):
    """slurm/infer.sbatch (Ray head in the job, srun producers) and slurm/infer_mpi.sbatch
    (legacy ranks) on the local Slurm: both complete, with the same peak lists."""
    import tomli_w

    from peaknet.config import apply_overrides

    outs = {}
    for template in ("infer.sbatch", "infer_mpi.sbatch"):
        out = tmp_path / template.split(".")[0]
        extra = ["pipeline.actors=2", "pipeline.actor_cpus=0.5", "pipeline.writer_cpus=0.25"]
        cfg = apply_overrides({}, overrides(out, data, *extra))
        cfg["source"]["inputs"] = json.loads(cfg["source"]["inputs"]) \
            if isinstance(cfg["source"]["inputs"], str) else cfg["source"]["inputs"]
        path = tmp_path / f"{template}.toml"
        path.write_text(tomli_w.dumps(cfg))
        env = slurm_cluster.env()
        env["PEAKNET_RAY_IP"] = "127.0.0.1"
        env["PEAKNET_REPO"] = str(REPO)
        res = slurm_cluster.sbatch(REPO / "slurm" / template, str(path),
                                   options=["--ntasks=2", "--cpus-per-task=1",
                                            "--mem-per-cpu=1G", "--time=15"],
                                   cwd=tmp_path, env=env, timeout=900)
        assert res.ok, res.output[-5000:]
        summary = json.loads((out / "infer.summary.json").read_text())
        assert summary["shards_done"] == 6
        v = verify_outputs(out)
        assert v["ok"], v["problems"]
        outs[template] = read_outputs(out)
    assert_same_peaks(outs["infer.sbatch"], outs["infer_mpi.sbatch"])
