"""Distillation: cache the teacher's logits once, then train the student on them.

Paper, section 2.2.3.1: the teacher's pre-activation maps (logits) are computed once for the
whole training set and cached on disk; the student is trained with
``0.4 MSE(z_s, z_t) + 0.4 T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + 0.2 focal(z_s, argmax z_t)``
(:func:`peaknet.model.distillation_loss`, T = 2) and never runs the teacher.

The cache
---------
One distributed pass (:func:`build_teacher_cache`): rank r of W takes a contiguous block of the
training frames, runs the teacher (eval mode, no gradients, bf16 autocast where it works) on each
frame's *teacher windows* -- every module of the frame (``input = "panels"``) or the centred
``image_size`` window of the assembled frame -- exactly the canvases the student's samples are
cut from, un-augmented; and writes them to its own part file
``<cache>.part-0000r.h5:/logits`` (float16, one chunk per frame, gzip / lzf). Rank 0 then writes
``<cache>``: an HDF5 *virtual dataset* ``/logits`` of shape (frames, K, classes, h, w) over the
parts (K = modules per frame, or 1), with attributes describing the teacher and the data, and
``complete = 1`` last. Later runs (and resumed runs) reuse a complete cache whose attributes
match; ``distill.rebuild_cache`` forces a new one.

The student's samples read the logits of their frame / module and receive the same window and
flips as image and labels (:class:`peaknet.train.data.PeakDataset`), so augmentation stays
consistent with the cached teacher; pixels the teacher did not see are masked out of the loss.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import h5py
import torch

from .checkpoint import Checkpointer, load_weights
from .config import DistillConfig
from .data import PeakDataset
from .parallelize import (
    DistEnv,
    all_reduce,
    barrier,
    bf16_works,
    destroy_distributed,
    init_distributed,
)
from .trainer import (
    LossFn,
    Trainer,
    build_model,
    build_optimizer,
    build_scheduler,
    build_train_data,
    prepare_run,
)

log = logging.getLogger(__name__)

__all__ = ["cache_path", "cache_signature", "cache_is_complete", "build_teacher_cache",
           "distill_objective", "build_distiller", "run"]

CACHE_DATASET = "logits"


def cache_path(cfg: DistillConfig) -> Path:
    return Path(cfg.distill.cache) if cfg.distill.cache else Path(cfg.run.out) / "teacher_logits.h5"


def cache_signature(cfg: DistillConfig, dataset: PeakDataset) -> dict:
    """What a cache must have been computed from to be reused (stored as HDF5 attributes)."""
    dc = cfg.distill
    w = dc.teacher_weights
    wsig = "random:%d" % cfg.run.seed
    if w:
        st = os.stat(w)
        wsig = f"{os.path.abspath(w)}:{st.st_size}:{int(st.st_mtime)}"
    return {
        "teacher": dc.teacher,
        "teacher_weights": wsig,
        "input": dataset.input,
        "window": json.dumps(list(dataset.teacher_shape())),
        "zscore": dataset.zscore_mode,
        "sources": json.dumps([os.path.abspath(s.frames) for s in dataset.sources]),
        "n_frames": int(dataset.n_frames),
    }


def cache_is_complete(path: Path, signature: dict) -> bool:
    """True if ``path`` is a complete cache with the given signature (and readable)."""
    if not Path(path).is_file():
        return False
    try:
        with h5py.File(path, "r") as h5:
            if int(h5.attrs.get("complete", 0)) != 1 or CACHE_DATASET not in h5:
                return False
            for k, v in signature.items():
                got = h5.attrs.get(k)
                if isinstance(got, bytes):
                    got = got.decode()
                if isinstance(v, int):
                    got = int(got) if got is not None else None
                if got != v:
                    log.warning("teacher cache %s was made with %s = %r, now %r: rebuilding",
                                path, k, got, v)
                    return False
            ds = h5[CACHE_DATASET]
            ds[0, 0, 0, :1, :1]  # the virtual sources resolve
        return True
    except (OSError, KeyError, ValueError) as exc:
        log.warning("teacher cache %s unreadable (%s): rebuilding", path, exc)
        return False


def _compression(dc) -> dict:
    if dc.compression == "gzip":
        return {"compression": "gzip", "compression_opts": int(dc.compression_level),
                "shuffle": True}
    if dc.compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


@torch.no_grad()
def build_teacher_cache(cfg: DistillConfig, env: DistEnv, dataset: PeakDataset,
                        path: Optional[Path] = None) -> dict:
    """Collective: run the teacher over the training frames once and write the cache.

    Returns {"path", "frames" (this rank), "seconds", "frames_per_s"}."""
    from peaknet.model import build_model as build_preset

    dc = cfg.distill
    path = Path(path or cache_path(cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    n = dataset.n_frames
    k, h, w = dataset.teacher_shape()
    lo, hi = env.rank * n // env.world_size, (env.rank + 1) * n // env.world_size
    torch.manual_seed(cfg.run.seed)
    teacher = build_preset(dc.teacher)
    if dc.teacher_weights:
        load_weights(teacher, dc.teacher_weights)
    else:
        log.warning("distill.teacher_weights not set: the teacher is a randomly initialised %s "
                    "(seed %d) -- only useful for tests", dc.teacher, cfg.run.seed)
    teacher.to(env.device).eval()
    use_bf16 = dc.cache_dtype == "bf16" and bf16_works(env.device)
    amp = (torch.autocast(env.device.type, dtype=torch.bfloat16) if use_bf16
           else torch.autocast(env.device.type, enabled=False))
    classes = int(teacher.num_classes)
    part = path.with_name(f"{path.name}.part-{env.rank:05d}.h5")
    t0 = time.perf_counter()
    with h5py.File(part.with_suffix(".tmp"), "w") as h5:
        ds = h5.create_dataset(CACHE_DATASET, shape=(hi - lo, k, classes, h, w), dtype="float16",
                               chunks=(1, k, classes, h, w), **_compression(dc))
        ds.attrs["first_frame"] = lo
        for g in range(lo, hi):
            x = torch.from_numpy(dataset.teacher_inputs(g))
            outs = []
            for s in range(0, x.shape[0], dc.cache_batch):
                with amp:
                    z = teacher(x[s:s + dc.cache_batch].to(env.device))
                outs.append(z.float().clamp(-65000, 65000).to(torch.float16).cpu())
            ds[g - lo] = torch.cat(outs).numpy()
    part.with_suffix(".tmp").replace(part)
    seconds = time.perf_counter() - t0
    del teacher
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    barrier(env)
    if env.is_main:
        tmp = path.with_name(path.name + ".tmp")
        layout = h5py.VirtualLayout(shape=(n, k, classes, h, w), dtype="float16")
        for r in range(env.world_size):
            a, b = r * n // env.world_size, (r + 1) * n // env.world_size
            if b > a:
                src = h5py.VirtualSource(f"{path.name}.part-{r:05d}.h5", CACHE_DATASET,
                                         shape=(b - a, k, classes, h, w))
                layout[a:b] = src
        with h5py.File(tmp, "w") as h5:
            h5.create_virtual_dataset(CACHE_DATASET, layout, fillvalue=0)
            for key, v in cache_signature(cfg, dataset).items():
                h5.attrs[key] = v
            h5.attrs["classes"] = classes
            h5.attrs["dtype"] = "float16"
            h5.attrs["compute"] = "bf16" if use_bf16 else "fp32"
            h5.attrs["parts"] = env.world_size
            h5.attrs["complete"] = 1
        tmp.replace(path)
        log.info("teacher cache %s: %d frames x %s x %d classes", path, n, (k, h, w), classes)
    barrier(env)
    return {"path": str(path), "frames": hi - lo, "seconds": round(seconds, 2),
            "frames_per_s": (hi - lo) / seconds if seconds > 0 else None}


def distill_objective(cfg: DistillConfig) -> LossFn:
    """The paper's distillation loss against the cached logits in ``batch["teacher"]``, over
    valid pixels."""
    from peaknet.model import distillation_loss

    dc, op = cfg.distill, cfg.optim
    alpha, gamma = tuple(op.focal_alpha), float(op.focal_gamma)

    def loss_fn(logits: torch.Tensor, batch: dict):
        parts = distillation_loss(logits, batch["teacher"], dc.temperature, dc.lam_mse, dc.lam_kl,
                                  dc.lam_focal, alpha, gamma, mask=batch["valid"])
        return parts.total, {"mse": parts.mse.detach(), "kl": parts.kl.detach(),
                             "focal": parts.focal.detach()}

    return loss_fn


def build_distiller(cfg: DistillConfig, env: DistEnv) -> tuple[Trainer, dict]:
    """Cache the teacher (unless a matching complete cache exists), then build the student's
    trainer on the cached logits. Returns (trainer, cache info)."""
    prepare_run(cfg, env, "distill")
    data = build_train_data(cfg.data, env, cfg.run.seed, cfg.log)
    path = cache_path(cfg)
    sig = cache_signature(cfg, data.dataset)
    reuse = (not cfg.distill.rebuild_cache) and cache_is_complete(path, sig)
    reuse = bool(all_reduce([float(reuse)], env, op="min")[0])  # every rank decides alike
    if reuse:
        info = {"path": str(path), "reused": True, "teacher_frames": 0}
        log.info("reusing teacher cache %s", path)
    else:
        res = build_teacher_cache(cfg, env, data.dataset, path)
        info = {"path": str(path), "reused": False, "teacher_frames": res["frames"],
                "teacher_seconds": res["seconds"]}
    data.dataset.attach_teacher(str(path), CACHE_DATASET)
    model, pinfo = build_model(cfg.model, cfg.fsdp, env, cfg.run.seed)
    torch.manual_seed(cfg.run.seed * 1000 + env.rank + 1)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.steps)
    ckpt = Checkpointer(cfg.checkpoint, cfg.run.out, env)
    log.info("distill: student %s from teacher %s, %d samples, %s, %s", cfg.model.preset,
             cfg.distill.teacher, len(data.dataset), pinfo.mode,
             str(pinfo.compute_dtype).replace("torch.", ""))
    trainer = Trainer(model, pinfo, optimizer, scheduler, distill_objective(cfg), data, ckpt, env,
                      cfg.run, cfg.optim, cfg.log, export=cfg.checkpoint.export, stage="distill",
                      meta={"preset": cfg.model.preset, "teacher": cfg.distill.teacher})
    trainer.summary_extra["cache"] = info
    return trainer, info


def run(cfg: DistillConfig) -> dict:
    """Stage entry point (``peaknet distill``, ``jobs/distill.py``)."""
    env = init_distributed(cfg.run.device, cfg.run.timeout_min, cfg.run.threads)
    try:
        trainer, _ = build_distiller(cfg, env)
        try:
            return trainer.fit()
        finally:
            trainer.data.dataset.close()
    finally:
        destroy_distributed(env)
