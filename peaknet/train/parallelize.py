"""Process groups, FSDP2 sharding, mixed precision and activation checkpointing for PeakNet.

The model file imports nothing distributed (torchtitan's habit); this module applies the
parallelism from the outside, using the model's own unit lists:

- :func:`init_distributed` joins the process group torchrun (or Slurm + torchrun) describes in
  the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...), picks the
  device (``cuda:LOCAL_RANK`` or CPU) and the backend (NCCL on GPUs, gloo on CPU). Without those
  variables it returns a single-process environment and no group is created.
- :func:`parallelize`:

  1. activation checkpointing (optional): every module of ``model.activation_checkpoint_units()``
     (each ConvNeXt block, each BiFPN block) is wrapped with ``checkpoint_wrapper`` in its parent;
  2. FSDP2 (``torch.distributed.fsdp.fully_shard``) on every module of ``model.fsdp_units()``
     (backbone stages, BiFPN blocks), then on the root (stem, BiFPN projections, head).
     ``mode = "zero3"`` reshards parameters after forward (units only; the root keeps its
     parameters since backward starts with it), ``"zero2"`` keeps them gathered
     (``reshard_after_forward=False``: gradients and optimizer states sharded). ``"ddp"`` wraps
     the model in DistributedDataParallel instead.
  3. mixed precision: ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` when
     asked for and bf16 works on the device (checked once with a small conv / norm forward and
     backward); otherwise float32 with a log line. Without a process group the plain module runs
     under ``torch.autocast`` instead.

A single process without a process group trains the plain module (no FSDP, no DDP).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)

__all__ = [
    "DistEnv",
    "ParallelInfo",
    "init_distributed",
    "destroy_distributed",
    "parallelize",
    "apply_activation_checkpointing",
    "bf16_works",
    "clip_grad_norm",
    "grad_sync",
    "all_reduce",
    "barrier",
]


@dataclass
class DistEnv:
    """Where this process stands: rank, world size, device, backend.

    ``initialized_here``: this process created the group (and destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _slurm_torch_env() -> dict:
    """torch.distributed variables from Slurm's, for processes started by ``srun`` (one task per
    process, no torchrun): only inside a job step of more than one task."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) < 2:
        return {}
    from peaknet.cluster import slurm_rendezvous

    rdv = slurm_rendezvous()
    return rdv.torch_env() if rdv is not None else {}


def init_distributed(device: str = "auto", timeout_min: float = 30.0,
                     threads: Optional[int] = None) -> DistEnv:
    """Join the process group described by torchrun's environment variables (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ...) or, for processes started by ``srun`` without torchrun
    (a step of several tasks, e.g. submitit's), by Slurm's (:func:`peaknet.cluster.slurm_rendezvous`:
    rendezvous on the first node, port from the job id).

    device: "auto", "cpu" or "cuda"; threads: ``torch.set_num_threads`` (None: leave it).
    Returns a :class:`DistEnv`; a group that already exists is reused (not re-created).
    """
    if threads:
        torch.set_num_threads(int(threads))
    os.environ.update(_slurm_torch_env())
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    dev = _pick_device(device, local_rank)
    here = False
    backend = None
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
    elif "RANK" in env and "MASTER_ADDR" in env:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = dict(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        here = True
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local_rank, local_world, dev, backend, here)


def destroy_distributed(env: Optional[DistEnv] = None) -> None:
    """Destroy the process group if it exists (and, given ``env``, if this code created it)."""
    if env is not None and not env.initialized_here:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce(values: Iterable[float], env: DistEnv, op: str = "sum") -> list[float]:
    """Reduce a few numbers over all ranks (float64); returns them on every rank."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if env.distributed:
        if env.backend == "nccl":
            t = t.to(env.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                               "min": dist.ReduceOp.MIN}[op])
    return t.cpu().tolist()


# ------------------------------------------------------------------------------------------
# mixed precision
# ------------------------------------------------------------------------------------------
_BF16_CACHE: dict[str, bool] = {}


def bf16_works(device: torch.device) -> bool:
    """Whether a conv + LayerNorm + GELU forward and backward run in bfloat16 on ``device``
    and give finite results close to float32 (checked once per device type)."""
    key = device.type
    if key in _BF16_CACHE:
        return _BF16_CACHE[key]
    ok = False
    try:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("CUDA device without bf16 support")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 16, 16, generator=g).to(device)
        conv = nn.Conv2d(4, 8, 3, padding=1).to(device)
        norm = nn.GroupNorm(1, 8).to(device)
        ref = norm(conv(x)).float()
        conv16 = nn.Conv2d(4, 8, 3, padding=1).to(device=device, dtype=torch.bfloat16)
        conv16.load_state_dict(conv.state_dict())
        norm16 = nn.GroupNorm(1, 8).to(device=device, dtype=torch.bfloat16)
        y = torch.nn.functional.gelu(norm16(conv16(x.bfloat16())))
        y.float().sum().backward()
        got = norm16(conv16(x.bfloat16())).float()
        ok = bool(torch.isfinite(got).all()) and float((got - ref).abs().max()) < 0.1
        ok = ok and conv16.weight.grad is not None and bool(torch.isfinite(conv16.weight.grad).all())
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use bf16"
        log.info("bf16 check on %s failed: %s", device.type, exc)
        ok = False
    _BF16_CACHE[key] = ok
    return ok


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ------------------------------------------------------------------------------------------
# activation checkpointing
# ------------------------------------------------------------------------------------------
def _parents(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    out = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            out[id(child)] = (parent, name)
    return out


def apply_activation_checkpointing(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """Wrap each unit with ``checkpoint_wrapper`` (non-reentrant) in its parent; returns the
    wrappers. Parameter names are unchanged in state dicts produced by
    ``torch.distributed.checkpoint.state_dict`` (the wrapper prefix is stripped there)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    parents = _parents(model)
    wrapped = []
    for unit in units:
        if id(unit) not in parents:
            raise ValueError(f"activation checkpoint unit {type(unit).__name__} is not a submodule")
        parent, name = parents[id(unit)]
        w = checkpoint_wrapper(unit, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                               preserve_rng_state=True)
        parent.register_module(name, w)
        wrapped.append(w)
    return wrapped


# ------------------------------------------------------------------------------------------
# parallelize
# ------------------------------------------------------------------------------------------
@dataclass
class ParallelInfo:
    """What :func:`parallelize` did: ``mode`` ("zero3", "zero2", "ddp", "none"), the compute
    dtype, whether autocast is needed around the forward (plain module with bf16), and the
    number of activation-checkpointed and FSDP units."""

    mode: str
    compute_dtype: torch.dtype
    autocast: bool
    ac_units: int = 0
    fsdp_units: int = 0

    def autocast_context(self, device: torch.device):
        if self.autocast:
            return torch.autocast(device_type=device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()


def parallelize(model: nn.Module, fsdp_cfg, env: DistEnv) -> tuple[nn.Module, ParallelInfo]:
    """Apply activation checkpointing and FSDP2 / DDP to ``model`` according to ``fsdp_cfg``
    (a :class:`peaknet.train.config.FsdpSection`). The model must already be on ``env.device``
    (or on the meta device, for FSDP: materialise it afterwards with ``to_empty``).

    Returns the model to train (the same object for FSDP2, a DDP wrapper for "ddp") and a
    :class:`ParallelInfo`.
    """
    want = fsdp_cfg.mixed_precision
    use_bf16 = want == "bf16" and bf16_works(env.device)
    if want == "bf16" and not use_bf16:
        log.info("bf16 mixed precision does not work on %s here: training in float32",
                 env.device.type)
    compute = torch.bfloat16 if use_bf16 else torch.float32

    n_ac = 0
    if fsdp_cfg.activation_checkpointing:
        units = list(model.activation_checkpoint_units())
        apply_activation_checkpointing(model, units)
        n_ac = len(units)

    if not env.distributed:
        return model, ParallelInfo("none", compute, autocast=use_bf16, ac_units=n_ac)

    if fsdp_cfg.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        ddp = DDP(model, device_ids=ids)
        return ddp, ParallelInfo("ddp", compute, autocast=use_bf16, ac_units=n_ac)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # PeakNet.forward returns a cropped view of the padded logits; the training loop never
    # modifies it in place, which is what FSDP2's warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(
        param_dtype=compute, reduce_dtype=_dtype(fsdp_cfg.reduce_dtype) if use_bf16 else torch.float32
    )
    reshard = fsdp_cfg.mode == "zero3"
    parents = _parents(model)
    units = list(model.fsdp_units())
    for unit in units:
        parent, name = parents[id(unit)]
        current = getattr(parent, name)  # the checkpoint wrapper where one was applied
        fully_shard(current, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    log.info("FSDP2 %s: %d units + root, params %s, reduce %s, activation checkpointing %s",
             fsdp_cfg.mode, len(units), str(compute).replace("torch.", ""),
             str(mp.reduce_dtype).replace("torch.", ""), bool(n_ac))
    return model, ParallelInfo(fsdp_cfg.mode, compute, autocast=False, ac_units=n_ac,
                               fsdp_units=len(units))


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch: gradient reduction only when ``sync`` (the last micro-batch
    of an accumulation). FSDP2: ``set_requires_gradient_sync``; DDP: ``no_sync``."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Global gradient norm over all ranks (DTensor shards included); clips in place when
    ``max_norm > 0``. Returns the norm before clipping as a float (inf/nan propagate)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(total, DTensor):
            total = total.full_tensor()
    except ImportError:  # pragma: no cover
        pass
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)
