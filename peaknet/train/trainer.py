"""The training loop shared by pre-training (``train`` stage) and distillation (``distill``).

One optimizer step = ``optim.grad_accum`` micro-batches of ``data.batch_size`` samples on every
process (gradients reduced once per step, on the last micro-batch); then the global gradient norm
is clipped at ``optim.clip_grad`` (1.0), AdamW steps, and the learning rate follows linear
warm-up + cosine decay (:func:`peaknet.train.config.lr_factor`). A step whose gradient norm is
not finite is skipped (logged, counted), not applied.

Validation (every ``log.val_every`` steps and at the end, on ``data.val``): focal loss, pixel
precision / recall / F1 of the argmax mask against the labels over valid pixels, and peak-level
precision / recall / F1: the predicted mask and the label mask are both turned into peak lists
(:func:`peaknet.model.decode_peaks`: 8-connected components, weighted centroids) and matched one
to one within ``log.match_distance`` pixels (:func:`peaknet.match.peakdiff.match_peaks`);
counts are summed over frames and ranks (micro averages).

Logs: a tqdm bar on rank 0 and ``metrics.jsonl`` (rank 0): every ``log.every`` steps one line
``{"kind": "train", "step", "loss", (loss parts), "lr", "grad_norm", "images_per_s",
"images_per_s_total", "rss_mb", "cuda_mem_mb", "epoch", "time"}`` (loss averaged over
micro-batches and ranks; memory the maximum over ranks), one ``{"kind": "val", ...}`` line per
validation, ``{"kind": "checkpoint"}`` / ``{"kind": "resume"}`` events.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from peaknet.config import save_config

from .checkpoint import Checkpointer, export_weights, load_weights
from .config import PretrainConfig, lr_factor
from .data import PeakDataset, ShardSampler, build_dataset, make_loader, resolve_sources
from .parallelize import (
    DistEnv,
    ParallelInfo,
    all_reduce,
    barrier,
    clip_grad_norm,
    destroy_distributed,
    grad_sync,
    init_distributed,
    parallelize,
)

log = logging.getLogger(__name__)

__all__ = [
    "Trainer",
    "TrainData",
    "LossFn",
    "focal_objective",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_train_data",
    "evaluate",
    "build_pretrainer",
    "run",
]

#: loss_fn(logits, batch) -> (loss to backpropagate, {name: float32 scalar tensors to log})
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


# ------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------
def focal_objective(optim) -> LossFn:
    """The pre-training loss: softmax focal loss over valid pixels."""
    from peaknet.model import focal_loss

    alpha, gamma = tuple(optim.focal_alpha), float(optim.focal_gamma)

    def loss_fn(logits: torch.Tensor, batch: dict):
        loss = focal_loss(logits, batch["label"], alpha, gamma, ignore_index=None,
                          mask=batch["valid"])
        return loss, {}

    return loss_fn


def build_model(model_cfg, fsdp_cfg, env: DistEnv, seed: int) -> tuple[nn.Module, ParallelInfo]:
    """Build the preset (same seed on every rank), load ``model_cfg.weights`` if given, and
    parallelize it. ``model_cfg.meta_init`` (with FSDP): build on the meta device, shard, then
    materialise and initialise each rank's shard (weights are then broadcast from rank 0)."""
    from peaknet.model import build_model as build_preset

    torch.manual_seed(seed)
    kw = {"drop_path_rate": model_cfg.drop_path_rate} if model_cfg.drop_path_rate else {}
    meta = model_cfg.meta_init and env.distributed and fsdp_cfg.mode != "ddp"
    if meta:
        model = build_preset(model_cfg.preset, device="meta", **kw)
        model, info = parallelize(model, fsdp_cfg, env)
        model.to_empty(device=env.device)
        with torch.no_grad():
            model.init_weights()
        if model_cfg.weights:
            _broadcast_weights(model, model_cfg.weights, env)
    else:
        model = build_preset(model_cfg.preset, **kw)
        if model_cfg.weights:
            load_weights(model, model_cfg.weights)
        model.to(env.device)
        model, info = parallelize(model, fsdp_cfg, env)
    return model, info


def _broadcast_weights(model: nn.Module, path: str, env: DistEnv) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sd = load_file(path, device="cpu") if env.is_main else {}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True,
                                                             broadcast_from_rank0=True))


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """AdamW; weight decay on weights of rank >= 2 only (not on biases and norm scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def build_scheduler(optimizer, optim, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, total_steps))


@dataclass
class TrainData:
    """Training samples, their sampler and loader settings, and the validation set."""

    dataset: PeakDataset
    sampler: ShardSampler
    batch_size: int
    num_workers: int
    prefetch_factor: int
    val_dataset: Optional[PeakDataset] = None
    val_indices: Optional[np.ndarray] = None

    def batches_per_epoch(self) -> int:
        s = self.sampler
        saved = s.start
        s.set_start(0)
        n = len(s) // self.batch_size
        s.set_start(saved)
        return n


def build_train_data(data, env: DistEnv, seed: int, log_cfg=None) -> TrainData:
    """Resolve the sources of ``data`` (a DataSection) and build datasets and the sampler."""
    train = build_dataset(data, resolve_sources(data, "train"), train=True, seed=seed)
    sampler = ShardSampler(len(train), env.rank, env.world_size, shuffle=data.shuffle, seed=seed,
                           drop_last=True)
    td = TrainData(train, sampler, data.batch_size, data.num_workers, data.prefetch_factor)
    if td.batches_per_epoch() < 1:
        raise ValueError(f"data: {len(train)} training samples give no full batch of "
                         f"{data.batch_size} on each of {env.world_size} processes")
    if data.val:
        val = build_dataset(data, resolve_sources(data, "val"), train=False, seed=seed)
        n = len(val)
        k = getattr(log_cfg, "val_max_samples", None) if log_cfg is not None else None
        idx = np.arange(n) if not k or k >= n else np.unique(np.linspace(0, n - 1, k).round()
                                                              .astype(np.int64))
        td.val_dataset, td.val_indices = val, idx
    return td


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, info: ParallelInfo, data: TrainData, env: DistEnv, optim,
             match_distance: float = 5.0, batch_size: Optional[int] = None) -> dict:
    """Validation metrics over ``data.val_dataset`` (collective: every rank calls it)."""
    from peaknet.match.peakdiff import match_peaks
    from peaknet.model import decode_peaks, focal_loss

    ds = data.val_dataset
    if ds is None or not ds.has_labels:
        return {}
    sampler = ShardSampler(len(ds), env.rank, env.world_size, shuffle=False, drop_last=False,
                           indices=data.val_indices)
    loader = make_loader(ds, sampler, batch_size or data.batch_size, data.num_workers,
                         data.prefetch_factor, drop_last=False, pin_memory=env.device.type == "cuda")
    was_training = model.training
    model.eval()
    sums = np.zeros(9)  # loss_sum, n_valid, tp, fp, fn, found, truth, matched, frames
    alpha, gamma = tuple(optim.focal_alpha), float(optim.focal_gamma)
    t0 = time.perf_counter()
    for batch in loader:
        b = _to_device(batch, env.device)
        with info.autocast_context(env.device):
            logits = model(b["image"])
        logits = logits.float()
        keep = b["keep"]
        valid = b["valid"] & keep[:, None, None]
        label = b["label"]
        loss_sum = focal_loss(logits, label, alpha, gamma, ignore_index=None, mask=valid,
                              reduction="sum")
        pred = logits.argmax(1) == 1
        truth = label == 1
        sums[0] += float(loss_sum)
        sums[1] += float(valid.sum())
        sums[2] += float((pred & truth & valid).sum())
        sums[3] += float((pred & ~truth & valid).sum())
        sums[4] += float((~pred & truth & valid).sum())
        sel = keep.cpu().numpy().astype(bool)
        if sel.any():
            lg = logits.cpu()[sel]
            img = b["image"][:, 0].float().cpu()[sel]
            vm = b["valid"].cpu()[sel]
            onehot = torch.stack([(label.cpu()[sel] != 1), (label.cpu()[sel] == 1)], 1).float()
            found = decode_peaks(lg, img, vm)
            true_peaks = decode_peaks(onehot, img, vm, from_probs=True)
            for f, t in zip(found, true_peaks):
                m = match_peaks(f, t, max_distance=match_distance)
                sums[5] += m.n_found
                sums[6] += m.n_predicted
                sums[7] += m.n_matched
                sums[8] += 1
    tot = np.array(all_reduce(sums.tolist(), env))
    if was_training:
        model.train()

    def ratio(a, b):
        return float(a / b) if b > 0 else float("nan")

    def f1(p, r):
        return float(2 * p * r / (p + r)) if p + r > 0 else float("nan")

    pp, pr = ratio(tot[2], tot[2] + tot[3]), ratio(tot[2], tot[2] + tot[4])
    kp, kr = ratio(tot[7], tot[5]), ratio(tot[7], tot[6])
    return {
        "loss": ratio(tot[0], tot[1]),
        "pixel_precision": pp, "pixel_recall": pr, "pixel_f1": f1(pp, pr),
        "peak_precision": kp, "peak_recall": kr, "peak_f1": f1(kp, kr),
        "n_found": int(tot[5]), "n_truth": int(tot[6]), "n_matched": int(tot[7]),
        "samples": int(tot[8]), "time_s": round(time.perf_counter() - t0, 3),
    }


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


class _JsonlLog:
    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _finite(x: float) -> Optional[float]:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class Trainer:
    """Runs the optimisation loop; see the module doc.

    Parameters
    ----------
    model, info: from :func:`build_model`.
    optimizer, scheduler: from :func:`build_optimizer` / :func:`build_scheduler`.
    loss_fn: ``loss_fn(logits, batch) -> (loss, parts)``.
    data: :class:`TrainData`.
    checkpointer: :class:`~peaknet.train.checkpoint.Checkpointer`.
    env: :class:`~peaknet.train.parallelize.DistEnv`.
    run, optim, log_cfg: the [run], [optim], [log] sections; export: write model.safetensors.
    stage: "train" or "distill" (recorded in logs and the weights' metadata).
    meta: extra entries for the summary and the weights' metadata (preset, ...).
    """

    def __init__(self, model, info, optimizer, scheduler, loss_fn: LossFn, data: TrainData,
                 checkpointer: Checkpointer, env: DistEnv, run, optim, log_cfg,
                 export: bool = True, stage: str = "train", meta: Optional[dict] = None) -> None:
        self.model, self.info = model, info
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loss_fn = loss_fn
        self.data = data
        self.ckpt = checkpointer
        self.env = env
        self.run, self.optim, self.log_cfg = run, optim, log_cfg
        self.export = export
        self.stage = stage
        self.meta = dict(meta or {})
        self.out = Path(run.out)
        jsonl = Path(log_cfg.jsonl) if log_cfg.jsonl else self.out / "metrics.jsonl"
        self.jsonl_path = jsonl
        self.jsonl = _JsonlLog(jsonl if env.is_main else None)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped = 0
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.summary_extra: dict = {}  # more entries for summary.json (e.g. the teacher cache)

    # -- data ---------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        """Endless micro-batches; ``self.epoch`` / ``self.batch_in_epoch`` count consumption."""
        d = self.data
        while True:
            d.sampler.set_epoch(self.epoch)
            d.sampler.set_start(self.batch_in_epoch * d.batch_size)
            loader = make_loader(d.dataset, d.sampler, d.batch_size, d.num_workers,
                                 d.prefetch_factor, drop_last=True,
                                 pin_memory=self.env.device.type == "cuda")
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # -- state ----------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped": self.skipped}

    def maybe_resume(self) -> Optional[Path]:
        path = self.ckpt.resume_path()
        if path is None:
            return None
        st = self.ckpt.load(path, self.model, self.optimizer, self.scheduler)
        self.step = int(st["step"])
        self.epoch = int(st.get("epoch", 0))
        self.batch_in_epoch = int(st.get("batch_in_epoch", 0))
        self.skipped = int(st.get("skipped", 0))
        if int(st.get("world_size", self.env.world_size)) != self.env.world_size:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0  # shards differ: new epoch
        self.jsonl.write({"kind": "resume", "step": self.step, "checkpoint": str(path),
                          "time": time.time()})
        return path

    def save(self) -> Path:
        path = self.ckpt.save(self.step, self.model, self.optimizer, self.scheduler,
                              self.trainer_state())
        self.jsonl.write({"kind": "checkpoint", "step": self.step, "path": str(path),
                          "time": time.time()})
        return path

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, batches: Iterator[dict]) -> dict:
        accum = self.optim.grad_accum
        model, dev = self.model, self.env.device
        loss_sum = torch.zeros((), device=dev)  # summed on the device: one sync per step
        parts_sum: dict[str, torch.Tensor] = {}
        n_images = 0
        t0 = time.perf_counter()
        for micro in range(accum):
            batch = _to_device(next(batches), dev)
            with grad_sync(model, micro == accum - 1):
                with self.info.autocast_context(dev):
                    logits = model(batch["image"])
                loss, parts = self.loss_fn(logits, batch)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float()
            n_images += int(batch["image"].shape[0])
        gnorm = clip_grad_norm(model.parameters(), self.optim.clip_grad)
        if math.isfinite(gnorm):
            self.optimizer.step()
        else:
            self.skipped += 1
            log.warning("step %d: gradient norm %s, update skipped", self.step + 1, gnorm)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        out = {"loss": float(loss_sum) / accum, "lr": float(lr), "grad_norm": gnorm,
               "images": n_images, "time": dt}
        out.update({k: float(v) / accum for k, v in parts_sum.items()})
        return out

    def _log_step(self, st: dict, window: list[dict]) -> dict:
        keys = ["loss"] + sorted(k for k in st if k not in ("loss", "lr", "grad_norm", "images",
                                                           "time"))
        vals = [np.mean([w[k] for w in window]) for k in keys]
        n_img = sum(w["images"] for w in window)
        t = sum(w["time"] for w in window)
        red = all_reduce(vals + [n_img], self.env)
        mem = [_rss_mb(), (torch.cuda.max_memory_allocated(self.env.device) / 2**20
                           if self.env.device.type == "cuda" else 0.0)]
        mem = all_reduce(mem, self.env, op="max")
        w = self.env.world_size
        rec = {"kind": "train", "step": self.step}
        rec.update({k: v / w for k, v in zip(keys, red[:-1])})
        rec.update({
            "lr": st["lr"], "grad_norm": _finite(st["grad_norm"]),
            "images_per_s": n_img / t if t > 0 else None,
            "images_per_s_total": red[-1] / t if t > 0 else None,
            "rss_mb": round(mem[0], 1), "cuda_mem_mb": round(mem[1], 1),
            "epoch": self.epoch, "time": time.time(),
        })
        return rec

    def _should_stop(self, t_start: float, step_time: float) -> bool:
        stop = 0.0
        limit = getattr(self.run, "time_limit_min", None)
        if limit:
            elapsed = time.perf_counter() - t_start
            stop = float(elapsed + 2 * step_time > 60 * limit)
        return bool(all_reduce([stop], self.env, op="max")[0]) if limit else False

    # -- the loop -----------------------------------------------------------------------------
    def validate(self) -> dict:
        if self.data.val_dataset is None:
            return {}
        res = evaluate(self.model, self.info, self.data, self.env, self.optim,
                       self.log_cfg.match_distance)
        if res:
            rec = {"kind": "val", "step": self.step, **{k: _finite(v) if isinstance(v, float)
                                                         else v for k, v in res.items()},
                   "time": time.time()}
            self.jsonl.write(rec)
            self.val_history.append(rec)
            log.info("validation at step %d: loss %.4g, pixel F1 %.3f, peak P/R %.3f/%.3f",
                     self.step, res["loss"], res["pixel_f1"], res["peak_precision"],
                     res["peak_recall"])
        return res

    def fit(self) -> dict:
        from tqdm import tqdm

        run, env = self.run, self.env
        t_start = time.perf_counter()
        resumed = self.maybe_resume()
        target = run.steps if run.stop_after is None else min(run.steps, run.stop_after)
        model = self.model
        model.train()
        if self.log_cfg.val_at_start and self.step == 0:
            self.validate()
        bar = tqdm(total=run.steps, initial=self.step, desc=self.stage, dynamic_ncols=True,
                   disable=not (env.is_main and self.log_cfg.tqdm), mininterval=1.0)
        batches = self._batches()
        window: list[dict] = []
        last_saved = self.step if resumed else None
        stopped_early = False
        step_time = 0.0
        n_images = 0
        t_train = 0.0
        while self.step < target:
            st = self.train_step(batches)
            step_time = st["time"]
            n_images += st["images"]
            t_train += st["time"]
            window.append(st)
            bar.update(1)
            if self.step % self.log_cfg.every == 0 or self.step == target:
                rec = self._log_step(st, window)
                window = []
                self.jsonl.write(rec)
                self.history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{rec['lr']:.2e}")
            ve = self.log_cfg.val_every
            if ve and self.step % ve == 0 and self.step < run.steps:
                self.validate()
            every = self.ckpt.cfg.every
            if every and self.step % every == 0 and self.step < target:
                self.save()
                last_saved = self.step
            if self._should_stop(t_start, step_time):
                log.info("time limit reached after step %d: checkpointing and stopping", self.step)
                stopped_early = True
                break
        bar.close()
        done = self.step >= run.steps
        val = self.validate() if done and self.data.val_dataset is not None else {}
        if last_saved != self.step:
            ckpt = self.save()
        else:
            ckpt = self.ckpt.latest()
        weights = None
        if done and self.export:
            weights = export_weights(self.model, self.out / "model.safetensors", env,
                                     metadata={"stage": self.stage, "step": self.step, **self.meta})
        barrier(env)
        losses = [h["loss"] for h in self.history]
        summary = {
            "stage": self.stage,
            "step": self.step,
            "steps": run.steps,
            "finished": done,
            "stopped_early": stopped_early or (not done),
            "resumed_from": str(resumed) if resumed else None,
            "world_size": env.world_size,
            "mode": self.info.mode,
            "compute_dtype": str(self.info.compute_dtype).replace("torch.", ""),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "skipped_steps": self.skipped,
            "images_per_s": n_images / t_train if t_train > 0 else None,
            "val": {k: _finite(v) if isinstance(v, float) else v for k, v in val.items()},
            "checkpoint": str(ckpt) if ckpt else None,
            "weights": str(weights) if weights else (str(self.out / "model.safetensors")
                                                     if done and self.export else None),
            "metrics": str(self.jsonl_path),
            "time_s": round(time.perf_counter() - t_start, 2),
            **self.meta,
            **self.summary_extra,
        }
        if env.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            if self.log_cfg.plots:
                try:
                    from .plots import plot_metrics

                    summary["plot"] = str(plot_metrics(self.jsonl_path))
                except Exception as exc:  # noqa: BLE001 - plots never fail a run
                    log.warning("plotting %s failed: %s", self.jsonl_path, exc)
        return summary


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------
def prepare_run(cfg, env: DistEnv, stage: str) -> None:
    """Create the output folder and save the resolved config there (rank 0 only: every rank
    loads the same config, one writes it)."""
    out = Path(cfg.run.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out, stage)
    barrier(env)


def build_pretrainer(cfg: PretrainConfig, env: DistEnv) -> Trainer:
    """Everything the ``train`` stage needs, each part from its own section."""
    prepare_run(cfg, env, "train")
    data = build_train_data(cfg.data, env, cfg.run.seed, cfg.log)
    model, info = build_model(cfg.model, cfg.fsdp, env, cfg.run.seed)
    torch.manual_seed(cfg.run.seed * 1000 + env.rank + 1)  # per-rank stream (drop path)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.steps)
    ckpt = Checkpointer(cfg.checkpoint, cfg.run.out, env)
    log.info("train: preset %s, %d training samples (%d per epoch and process), %s, %s",
             cfg.model.preset, len(data.dataset), len(data.sampler), info.mode,
             str(info.compute_dtype).replace("torch.", ""))
    return Trainer(model, info, optimizer, scheduler, focal_objective(cfg.optim), data, ckpt, env,
                   cfg.run, cfg.optim, cfg.log, export=cfg.checkpoint.export, stage="train",
                   meta={"preset": cfg.model.preset})


def run(cfg: PretrainConfig) -> dict:
    """Stage entry point (``peaknet train``, ``jobs/pretrain.py``): join the process group
    torchrun describes (if any), train, leave the group. Returns the summary."""
    env = init_distributed(cfg.run.device, cfg.run.timeout_min, cfg.run.threads)
    try:
        trainer = build_pretrainer(cfg, env)
        try:
            return trainer.fit()
        finally:
            trainer.data.dataset.close()
    finally:
        destroy_distributed(env)
