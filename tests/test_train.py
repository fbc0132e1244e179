"""Training: configs, data (sharding, augmentation, label sources), validation metrics, and real
runs: ``torchrun --nproc_per_node=2`` on CPU/gloo with FSDP2 (loss goes down, stop + resume gives
the same parameters as an uninterrupted run), distillation from a cached teacher, and the same
training submitted to the private Slurm (sbatch and submitit).

Data: frames from the generator (``peaknet.simulate.generator.iter_frames``, Epix10ka2M hits)
cut to 80 x 80 windows around their densest peaks, written like the generator's shards
(``shard_*.cxi:/entry_1/data_1/data`` and ``shard_*.truth.h5:/mask`` + ``/static/good_pixels``).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from peaknet.config import load_config
from peaknet.train.config import DistillConfig, PretrainConfig, lr_factor, shipped_config
from peaknet.train.data import (
    IGNORE,
    PeakDataset,
    ShardSampler,
    build_dataset,
    centred_offset,
    cut_window,
    make_loader,
    resolve_sources,
)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
WIN = 80  # side of the stored module windows
PANELS = 2


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def _best_windows(mask: np.ndarray, size: int, k: int) -> list[tuple[int, int, int]]:
    """(panel, y, x) of the ``k`` panels' size x size windows holding the most mask pixels."""
    c = np.pad(mask.astype(np.int64), ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    s = c[:, size:, size:] - c[:, :-size, size:] - c[:, size:, :-size] + c[:, :-size, :-size]
    best = []
    for p in range(mask.shape[0]):
        y, x = np.unravel_index(np.argmax(s[p]), s[p].shape)
        best.append((int(s[p, y, x]), p, int(y), int(x)))
    return [(p, y, x) for _, p, y, x in sorted(best, reverse=True)[:k]]


def _write_shard(folder: Path, name: str, frames: np.ndarray, mask: np.ndarray,
                 good: np.ndarray) -> Path:
    cxi = folder / f"{name}.cxi"
    with h5py.File(cxi, "w") as h:
        h.create_dataset("/entry_1/data_1/data", data=frames, chunks=(1,) + frames.shape[1:],
                         compression="gzip")
    with h5py.File(folder / f"{name}.truth.h5", "w") as h:
        h.create_dataset("/mask", data=mask, chunks=(1,) + mask.shape[1:], compression="gzip")
        h.create_dataset("/static/good_pixels", data=good)
    return cxi


def _generate(folder: Path, name: str, n: int, seed: int) -> Path:
    from peaknet.simulate.config import RunSection, SimulateConfig
    from peaknet.simulate.generator import iter_frames

    cfg = SimulateConfig()
    cfg.run = RunSection(detector="epix10ka2m", frames=n, seed=seed)
    cfg.crystal.hit_fraction = 1.0
    frames = np.zeros((n, PANELS, WIN, WIN), np.float32)
    mask = np.zeros(frames.shape, bool)
    for i, (frame, truth) in enumerate(iter_frames(cfg, 0, n)):
        for j, (p, y, x) in enumerate(_best_windows(truth.mask, WIN, PANELS)):
            frames[i, j] = frame[p, y:y + WIN, x:x + WIN]
            mask[i, j] = truth.mask[p, y:y + WIN, x:x + WIN]
    good = np.ones((PANELS, WIN, WIN), bool)
    good[:, 0, :] = False  # a dead row, to exercise the good-pixel mask
    return _write_shard(folder, name, frames, mask, good)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict:
    """6 training and 2 validation frames of 2 modules of 80 x 80 from the generator."""
    d = tmp_path_factory.mktemp("sim")
    train = _generate(d, "shard_00000", 6, seed=1)
    val = _generate(d, "val_00000", 2, seed=2)
    return {"dir": d, "train": str(train), "val": str(val)}


def _overrides(sim: dict, out: Path, **extra) -> list[str]:
    o = [f'--data.train=["{sim["train"]}"]', f'--data.val=["{sim["val"]}"]',
         "--data.label_pattern={dir}/{stem}.truth.h5", "--data.mask_dataset=/static/good_pixels",
         "--data.mask_source=labels", f"--run.out={out}"]
    return o + [f"--{k}={v}" for k, v in extra.items()]


@pytest.fixture
def toy(tmp_path) -> dict:
    """Frames whose pixels are 0 or 10 with labels = (pixel == 10): after the z-score a pixel is a
    peak exactly where the image is > 0, which makes alignment checks exact."""
    rng = np.random.default_rng(0)
    n, p, h, w = 3, 2, 40, 48
    frames = np.where(rng.random((n, p, h, w)) < 0.1, 10.0, 0.0).astype(np.float32)
    mask = frames == 10
    good = np.ones((p, h, w), bool)
    good[:, :, :2] = False
    cxi = _write_shard(tmp_path, "toy", frames, mask, good)
    return {"cxi": str(cxi), "frames": frames, "mask": mask}


def _toy_dataset(toy, window=(32, 32), **kw) -> PeakDataset:
    cfg = load_config(PretrainConfig, None, [
        f'data.train=["{toy["cxi"]}"]', "data.label_pattern={dir}/{stem}.truth.h5",
        "data.mask_dataset=/static/good_pixels", "data.mask_source=labels",
        "data.input=panels", f"data.crop=[{window[0]}, {window[1]}]"])
    return PeakDataset(resolve_sources(cfg.data), input="panels", window=window, **kw)


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    p, d = PretrainConfig(), DistillConfig()
    assert (p.optim.lr, p.optim.warmup_steps, p.optim.grad_accum, p.optim.clip_grad) == (3e-4, 20, 20, 1.0)
    assert p.optim.schedule == "cosine" and p.data.image_size == 1920 and p.data.batch_size == 1
    assert p.data.input == "assembled" and p.optim.focal_alpha == (0.25, 0.75) and p.optim.focal_gamma == 2
    assert p.model.preset == "teacher" and p.fsdp.mode == "zero3"
    assert (d.data.batch_size, d.optim.grad_accum, d.optim.min_lr, d.run.steps) == (4, 10, 1e-7, 3200)
    assert (d.distill.temperature, d.distill.lam_mse, d.distill.lam_kl, d.distill.lam_focal) == (2.0, 0.4, 0.4, 0.2)
    assert d.fsdp.mode == "zero2" and d.data.image_size == 1920
    # warm-up: lr/20 .. lr over 20 steps, then cosine to the floor at the end of the schedule
    assert lr_factor(0, d.optim, 3200) == pytest.approx(1 / 20)
    assert lr_factor(19, d.optim, 3200) == pytest.approx(1.0)
    assert lr_factor(20, d.optim, 3200) == pytest.approx(1.0)
    assert lr_factor(3200, d.optim, 3200) * d.optim.lr == pytest.approx(1e-7)
    mid = 20 + (3200 - 20) // 2
    assert lr_factor(mid, d.optim, 3200) == pytest.approx(0.5 * (1 + 1e-7 / 3e-4), rel=1e-3)
    for name, cls in (("pretrain-teacher", PretrainConfig), ("distill-student-atto", DistillConfig),
                      ("pretrain-small-cpu", PretrainConfig), ("distill-small-cpu", DistillConfig)):
        cfg = load_config(cls, shipped_config(name), [] if "small" not in name else ['data.train=["x"]'])
        assert cfg.optim.clip_grad == 1.0
    with pytest.raises(Exception, match="data.train"):
        load_config(PretrainConfig, None, [])


# ------------------------------------------------------------------------------------------
# sampling and samples
# ------------------------------------------------------------------------------------------
def test_sampler_shards_and_resumes():
    n, world = 11, 3
    shards = [ShardSampler(n, r, world, shuffle=True, seed=4, drop_last=True) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    got = [[k[0] for k in s] for s in shards]
    flat = sum(got, [])
    assert len(flat) == len(set(flat)) == 9 and all(len(g) == 3 for g in got)
    assert all(k[1] == 2 and k[2] for k in shards[0])
    s = shards[1]
    s.set_start(2)
    assert [k[0] for k in s] == got[1][2:] and len(s) == 1
    s.set_epoch(3)
    s.set_start(0)
    assert [k[0] for k in s] != got[1] or n < 4  # a new permutation each epoch
    # validation: every sample exactly once with keep=True, padding marked keep=False
    val = [list(ShardSampler(n, r, world, shuffle=False, drop_last=False)) for r in range(world)]
    kept = sorted(k[0] for v in val for k in v if k[2])
    assert kept == list(range(n)) and all(len(v) == 4 for v in val)


def test_windows_centred_like_pad_crop():
    from peaknet.model import pad_crop

    for size, extent in ((32, 40), (40, 32), (33, 40), (40, 33), (32, 32)):
        a = np.arange(extent * extent, dtype=np.float32).reshape(extent, extent)
        ours = cut_window(a, centred_offset(size, extent), centred_offset(size, extent), size, size)
        ref, _ = pad_crop(a, size)
        assert np.array_equal(ours, np.asarray(ref).reshape(size, size))


def test_augmentation_identical_on_image_label_mask_and_teacher(toy, tmp_path):
    ds = _toy_dataset(toy, augment=True, flip=True, max_shift=6, seed=3)
    assert len(ds) == 6 and ds.has_labels
    # a fake teacher cache whose logits are (image, -image) on the teacher's window
    k, h, w = ds.teacher_shape()
    cache = tmp_path / "cache.h5"
    with h5py.File(cache, "w") as f:
        arr = np.stack([ds.teacher_inputs(g) for g in range(ds.n_frames)])  # (F, K, 1, h, w)
        f.create_dataset("logits", data=np.concatenate([arr, -arr], 2).astype(np.float16),
                         chunks=(1, k, 2, h, w))
    ds.attach_teacher(str(cache))
    seen_shift = seen_flip = False
    for idx in range(len(ds)):
        for epoch in range(4):
            it = ds[(idx, epoch, True)]
            img, lab, valid = it["image"][0], it["label"], it["valid"]
            assert img.shape == lab.shape == valid.shape == (32, 32)
            assert torch.equal(lab.bool() & valid, (img > 0) & valid)  # label follows the image
            assert not lab[~valid].any() and (img[~valid] == 0).all()
            t = it["teacher"].float()
            assert torch.allclose(t[0][valid], img[valid], atol=0.01)
            assert torch.allclose(t[1][valid], -img[valid], atol=0.01)
            again = ds[(idx, epoch, True)]
            assert all(torch.equal(it[key], again[key]) for key in it)  # (seed, epoch, idx) only
            # the dead columns 0-1 of the module are invalid wherever they land
            seen_flip |= bool((~valid[:, -2:]).all() and valid[:, :2].any())
            seen_shift |= bool((~valid).all(1).any() or (~valid).all(0).sum() > 2)
    assert seen_flip and seen_shift
    # without augmentation the window is the centred one
    plain = _toy_dataset(toy)
    it = plain[1]
    z = plain.canvas(1)[0]
    oy, ox = centred_offset(32, z.shape[0]), centred_offset(32, z.shape[1])
    assert np.allclose(it["image"][0].numpy(), cut_window(z, oy, ox, 32, 32))


def test_loader_workers_give_the_same_batches(toy):
    ds = _toy_dataset(toy, augment=True, flip=True, max_shift=4, seed=1)
    batches = {}
    for workers in (0, 2):
        sampler = ShardSampler(len(ds), 0, 1, shuffle=True, seed=5, drop_last=True)
        sampler.set_epoch(1)
        batches[workers] = list(make_loader(ds, sampler, 2, num_workers=workers))
    assert len(batches[0]) == 3
    for a, b in zip(batches[0], batches[2]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_label_stage_output_as_labels(toy, tmp_path):
    """labels.h5 of the label stage: rows are events "<file>//<frame>", 255 = ignore."""
    frames = toy["frames"]
    lab = toy["mask"].astype(np.uint8)
    lab[2, 1, 10:20, 10:20] = IGNORE
    rows = [(toy["cxi"], 2), (toy["cxi"], 0), ("missing.cxi", 0)]  # the last one was skipped
    lf = tmp_path / "labels.h5"
    with h5py.File(lf, "w") as f:
        f.create_dataset("/events/event_id", data=np.array([f"{a}//{b}".encode() for a, b in rows]))
        f.create_dataset("/events/status", data=np.array([0, 0, 1], np.uint8))
        m = np.zeros((3,) + frames.shape[1:], np.uint8)
        m[0], m[1] = lab[2], lab[0]
        f.create_dataset("/labels/mask", data=m)
    cfg = load_config(PretrainConfig, None, [f'data.train_labels=["{lf}"]', "data.label_source=label",
                                             "data.input=panels"])
    (src,) = resolve_sources(cfg.data)
    assert list(src.frame_index) == [2, 0] and list(src.label_rows) == [0, 1]
    ds = build_dataset(cfg.data, [src], train=False, seed=0)
    z, label, valid = ds.canvas(1)  # frame 2, module 1
    assert not valid[10:20, 10:20].any() and valid.sum() == valid.size - 100
    assert np.array_equal(label.astype(bool) & valid, (frames[2, 1] == 10) & valid)


def test_validation_metrics_of_a_perfect_model(toy):
    """A 'model' that calls a pixel a peak where the z-scored image is > 0 is perfect on the toy
    data: pixel and peak precision / recall are 1."""
    from peaknet.train.config import OptimSection
    from peaknet.train.parallelize import DistEnv, ParallelInfo
    from peaknet.train.trainer import TrainData, evaluate

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.cat([-10 * x, 10 * x], 1)

    ds = _toy_dataset(toy, window=(40, 48))
    td = TrainData(ds, ShardSampler(len(ds)), 2, 0, 2, val_dataset=ds, val_indices=np.arange(len(ds)))
    res = evaluate(Oracle(), ParallelInfo("none", torch.float32, False), td, DistEnv(), OptimSection())
    assert res["samples"] == 6 and res["n_truth"] > 20
    for key in ("pixel_precision", "pixel_recall", "pixel_f1", "peak_precision", "peak_recall"):
        assert res[key] == pytest.approx(1.0), key
    assert res["n_found"] == res["n_truth"] == res["n_matched"]


# ------------------------------------------------------------------------------------------
# real runs: torchrun, 2 processes, gloo, FSDP2
# ------------------------------------------------------------------------------------------
def _torchrun(module: str, config: str, overrides: list[str], nproc: int = 2) -> dict:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", module,
           "--config", str(shipped_config(config)), *overrides]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-8000:]}")
    last = [line for line in p.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)


def _records(path, kind):
    from peaknet.train.plots import read_metrics

    return read_metrics(path).get(kind, [])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_pretrain_torchrun_loss_decreases_and_resume_is_exact(sim, tmp_path):
    common = {"run.steps": 4, "log.val_at_start": "true"}
    full = _torchrun("jobs.pretrain", "pretrain-small-cpu",
                     _overrides(sim, tmp_path / "full", **common, **{"checkpoint.every": 0}))
    assert full["finished"] and full["world_size"] == 2 and full["mode"] == "zero2"
    val = _records(full["metrics"], "val")
    assert [v["step"] for v in val] == [0, 4]
    assert val[-1]["loss"] < 0.8 * val[0]["loss"], val  # the held-out focal loss goes down
    train = _records(full["metrics"], "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "images_per_s_total", "rss_mb"):
        assert all(r[key] is not None for r in train), key
    assert train[0]["lr"] == pytest.approx(5e-4) and train[1]["lr"] == pytest.approx(1e-3)
    assert Path(full["metrics"]).with_suffix(".png").is_file()

    # interrupted after step 2 (mid-epoch: 3 micro-batches of 2 per process and epoch), resumed
    out = tmp_path / "resumed"
    first = _torchrun("jobs.pretrain", "pretrain-small-cpu",
                      _overrides(sim, out, **common, **{"run.stop_after": 2, "checkpoint.every": 1}))
    assert first["step"] == 2 and not first["finished"] and first["weights"] is None
    second = _torchrun("jobs.pretrain", "pretrain-small-cpu",
                       _overrides(sim, out, **common, **{"checkpoint.every": 0}))
    assert second["resumed_from"].endswith("step-00000002") and second["finished"]
    a, b = _weights(full["weights"]), _weights(second["weights"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert _records(second["metrics"], "resume")
    # the exported weights load into a plain model (inference needs no torch.distributed)
    from peaknet.model import build_model

    build_model("small-cpu").load_state_dict(a)


@pytest.mark.slow
def test_distill_torchrun_from_cached_teacher(sim, tmp_path):
    from peaknet.model import build_model
    from safetensors.torch import save_file

    # the teacher: another small-cpu instance (other seed, head without the 1 % peak prior, so
    # its logits differ clearly from the student's at the start)
    torch.manual_seed(123)
    teacher = tmp_path / "teacher.safetensors"
    sd = build_model("small-cpu", prior_prob=None).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(teacher))
    out = tmp_path / "distill"
    ov = _overrides(sim, out, **{"data.label_source": "truth", "distill.teacher_weights": teacher,
                                 "run.steps": 3})
    first = _torchrun("jobs.distill", "distill-small-cpu", ov)
    cache = first["cache"]
    assert first["finished"] and not cache["reused"] and cache["teacher_frames"] == 3  # 6 / 2 ranks
    losses = [r["loss"] for r in _records(first["metrics"], "train")]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    parts = _records(first["metrics"], "train")[0]
    assert {"mse", "kl", "focal"} <= parts.keys()
    with h5py.File(cache["path"]) as f:
        ds = f["logits"]
        assert ds.is_virtual and ds.dtype == np.float16 and ds.shape == (6, PANELS, 2, WIN, WIN)
        assert int(f.attrs["complete"]) == 1 and f.attrs["teacher"] == "small-cpu"
        logits = ds[()].astype(np.float32)
        assert np.isfinite(logits).all() and logits.std() > 0
    with h5py.File(str(cache["path"]) + ".part-00001.h5") as f:
        part = f["logits"]
        assert part.chunks == (1, PANELS, 2, WIN, WIN) and part.compression == "gzip"
    # a longer schedule resumes the student from its checkpoint and reuses the cache
    again = _torchrun("jobs.distill", "distill-small-cpu", ov[:-1] + ["--run.steps=4"])
    assert again["cache"]["reused"] and again["cache"]["teacher_frames"] == 0
    assert again["resumed_from"].endswith("step-00000003") and again["step"] == 4


# ------------------------------------------------------------------------------------------
# Slurm
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.slurm
def test_pretrain_sbatch_on_local_slurm(slurm_cluster, sim, tmp_path):
    env = slurm_cluster.env()
    env["NPROC_PER_NODE"] = "2"
    out = tmp_path / "slurm"
    res = slurm_cluster.sbatch(
        REPO / "slurm" / "pretrain.sbatch", "--config", str(shipped_config("pretrain-small-cpu")),
        *_overrides(sim, out, **{"run.steps": 2}),
        # one CPU: the job starts as soon as one is free on the shared private cluster (its two
        # processes share it; the private Slurm does not pin them)
        options=["--nodes=1", "--cpus-per-task=1", "--time=10"], cwd=REPO, env=env, timeout=600)
    assert "rendezvous" in res.output and "1 node(s) x 2 process(es)" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2
    assert (out / "model.safetensors").is_file() and (out / "train.config.toml").is_file()


@pytest.mark.slow
@pytest.mark.slurm
def test_distill_submitit_on_local_slurm(slurm_env, slurm_cluster, sim, tmp_path):
    from peaknet.launch.submitit_train import submit_train

    out = tmp_path / "submitit"
    ov = _overrides(sim, out, **{"run.steps": 2, "data.label_source": "truth"})
    job = submit_train("distill", str(shipped_config("distill-small-cpu")), ov,
                       folder=tmp_path / "logs", nproc_per_node=2, cpus_per_task=1, timeout_min=10,
                       slurm_partition=slurm_cluster.partition)
    summary = job.result()
    assert summary["world_size"] == 2 and summary["stage"] == "distill" and summary["step"] == 2
    assert (out / "teacher_logits.h5").is_file() and (out / "model.safetensors").is_file()
