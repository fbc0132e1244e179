"""Checkpoints that resume exactly, and the exported inference weights.

Layout under ``checkpoint.dir`` (default ``<run.out>/checkpoints``)::

    step-00000100/            torch.distributed.checkpoint (DCP) of
        .metadata, __*.distcp     {"model", "optim": sharded state (get_state_dict),
                                   "scheduler": LR scheduler state, "trainer": step, epoch,
                                   batches consumed in the epoch, world size}
        rng-rank00000.pt          per-rank RNG states (torch CPU/CUDA, numpy, python)
        meta.json                 step, world size, time (written last: the checkpoint is complete)
    latest                        name of the newest complete checkpoint

A checkpoint is written into ``step-N.tmp`` and renamed by rank 0 after every rank finished, so
a job killed while saving leaves the previous one intact. ``keep`` limits how many stay.

Resuming restores model, optimizer, scheduler, step, the dataloader position (epoch and batches
consumed: the sampler skips them) and each rank's RNG state, so a resumed run computes the same
parameters as an uninterrupted one.

:func:`export_weights` writes the full float32 state dict (gathered from the shards) as a plain
safetensors file that inference loads without torch.distributed (:func:`load_weights`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .parallelize import DistEnv, barrier

log = logging.getLogger(__name__)

__all__ = ["Checkpointer", "export_weights", "load_weights", "rng_state", "set_rng_state"]


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, numpy's global, python's)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def _quiet(env: DistEnv):
    """DCP warns that it assumes a single process when no group exists: that is intended."""
    with warnings.catch_warnings():
        if not env.distributed:
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _state_dict_options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


class Checkpointer:
    """Save / find / load DCP checkpoints of one run.

    Parameters
    ----------
    cfg: a :class:`~peaknet.train.config.CheckpointSection`.
    out: the run's output folder (default parent of ``checkpoints/``).
    env: the :class:`~peaknet.train.parallelize.DistEnv`.
    """

    def __init__(self, cfg, out: str | Path, env: DistEnv) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else Path(out) / "checkpoints"
        self.env = env

    # -- finding -----------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        done = [p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                and (p / "meta.json").is_file()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Optional[Path]:
        pointer = self.dir / "latest"
        if pointer.is_file():
            p = self.dir / pointer.read_text().strip()
            if (p / "meta.json").is_file():
                return p
        done = self.complete()
        return done[-1] if done else None

    def resume_path(self) -> Optional[Path]:
        """The checkpoint ``cfg.resume`` asks for: "auto" -> latest (or None), "none" -> None,
        else that path (which must be complete)."""
        r = self.cfg.resume
        if r == "none":
            return None
        if r == "auto":
            return self.latest()
        p = Path(r)
        if not (p / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume = {r!r}: not a complete checkpoint "
                                    "(no meta.json)")
        return p

    # -- saving ------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer, scheduler, trainer_state: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.perf_counter()
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f"step-{step:08d}.tmp"
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier(self.env)
        msd, osd = get_state_dict(model, optimizer, options=_state_dict_options())
        state = {
            "model": msd,
            "optim": osd,
            "scheduler": scheduler.state_dict(),
            "trainer": dict(trainer_state, step=int(step), world_size=self.env.world_size),
        }
        with _quiet(self.env):
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng-rank{self.env.rank:05d}.pt")
        barrier(self.env)
        if self.env.is_main:
            (tmp / "meta.json").write_text(json.dumps({
                "step": int(step), "world_size": self.env.world_size, "time": time.time(),
                **{k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))},
            }, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            ptmp = self.dir / "latest.tmp"
            ptmp.write_text(final.name + "\n")
            ptmp.replace(self.dir / "latest")
            self._prune()
        barrier(self.env)
        log.info("checkpoint step %d saved to %s in %.1f s", step, final, time.perf_counter() - t0)
        return final

    def _prune(self) -> None:
        if self.cfg.keep <= 0:
            return
        for p in self.complete()[:-self.cfg.keep]:
            shutil.rmtree(p, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------
    def load(self, path: Path, model: nn.Module, optimizer, scheduler) -> dict:
        """Collective. Restores model, optimizer, scheduler and this rank's RNG state; returns
        the trainer state (step, epoch, batches in epoch, world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer, options=_state_dict_options())
        state = {"model": msd, "optim": osd, "scheduler": scheduler.state_dict(),
                 "trainer": {"step": 0, "epoch": 0, "batch_in_epoch": 0, "world_size": 0}}
        with _quiet(self.env):
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_state_dict_options())
        scheduler.load_state_dict(state["scheduler"])
        trainer = dict(state["trainer"])
        rng_file = Path(path) / f"rng-rank{self.env.rank:05d}.pt"
        if trainer.get("world_size") == self.env.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("checkpoint %s was written by %s processes, now %d: RNG states not "
                        "restored and the data order differs from an uninterrupted run",
                        path, trainer.get("world_size"), self.env.world_size)
        log.info("resumed from %s at step %d", path, trainer["step"])
        return trainer


# ------------------------------------------------------------------------------------------
# plain weights
# ------------------------------------------------------------------------------------------
def export_weights(model: nn.Module, path: str | Path, env: DistEnv,
                   metadata: Optional[dict] = None) -> Optional[Path]:
    """Collective: gather the full state dict (float32, CPU) and write it with safetensors on
    rank 0. Keys are the plain model's (no FSDP / DDP / activation-checkpoint prefixes).
    Returns the path on rank 0, None elsewhere."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if env.distributed:
        sd = get_model_state_dict(model, options=_state_dict_options(full=True))
    else:
        sd = _plain_state_dict(model)
    if not env.is_main:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


def _plain_state_dict(model: nn.Module) -> dict:
    prefixes = ("_checkpoint_wrapped_module.", "module.", "_orig_mod.")
    out = {}
    for k, v in model.state_dict().items():
        key = k
        for p in prefixes:
            key = key.replace(p, "")
        out[key] = v
    return out


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Load a safetensors file written by :func:`export_weights` into a plain (not yet
    sharded) model. Returns the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=strict)
    if missing or unexpected:
        log.warning("weights %s: missing %s, unexpected %s", path, missing, unexpected)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
