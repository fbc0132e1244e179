"""The shipped default PeakNet model: weights, metadata and loading.

``peaknet/data/models/peaknet-small-cpu.safetensors`` holds the weights of a ``small-cpu``
PeakNet (3.7M parameters) trained on a CPU from scratch on simulated frames (a mix of a
thermolysin-like CSPAD, Epix10ka2M and Jungfrau 4M; mostly hits) with the truth masks as
labels. The card next to it (``peaknet-small-cpu.json``) records the preset, the decode
threshold tuned on held-out generated frames, the exact commands that made it and its figures.

Loading uses safetensors only (never pickle). The file may store float16 tensors; they are
loaded back as float32::

    from peaknet.models import load_default_model, DEFAULT_MODEL
    model = load_default_model()            # eval mode, float32, CPU
    threshold = DEFAULT_MODEL.threshold      # peak-probability cut for decode_peaks

``python -m peaknet.models export --weights run/model.safetensors --heldout 'held/*/shard_*.cxi'``
converts a training run's weights into the shipped file (float16 if float32 would exceed
8 MB), tunes the decode threshold on the held-out frames and writes the card
(tools/train_default_model.sh runs it).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_DIR",
    "DefaultModel",
    "DEFAULT_MODEL",
    "default_card",
    "load_state_dict",
    "load_model",
    "load_default_model",
    "save_weights",
]

#: Folder of the shipped weights and their cards.
MODEL_DIR = Path(__file__).resolve().parent / "data" / "models"
_MAX_FP32_BYTES = 8 * 2**20


@dataclass(frozen=True)
class DefaultModel:
    """Metadata of the shipped default model (the card holds the measured figures)."""

    name: str = "peaknet-small-cpu"
    preset: str = "small-cpu"
    weights: Path = MODEL_DIR / "peaknet-small-cpu.safetensors"
    card: Path = MODEL_DIR / "peaknet-small-cpu.json"
    training_config: str = "peaknet/data/configs/pretrain-default-model.toml"
    training_command: str = "tools/train_default_model.sh"
    data: str = ("peaknet simulate: thermolysin-like CSPAD (simulate-thermolysin-cspad.toml, "
                 "240 frames, seeds 11 and 14), Epix10ka2M (160 frames, seeds 12 and 15, "
                 "hit_fraction 0.9), Jungfrau 4M (160 frames, seeds 13 and 16, hit_fraction 0.9); "
                 "phase 1 on seeds 11-13, phase 2 on seeds 11-16; labels = truth masks")
    input: str = "panels: one detector module per sample, z-scored over its good pixels"
    #: Fallback decode threshold when the card has none (None: argmax).
    default_threshold: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def min_pix(self) -> int:
        """Smallest decoded peak (pixels) tuned with the threshold (card), else 1."""
        return int(default_card().get("min_pix", 1))

    @property
    def threshold(self) -> Optional[float]:
        """The peak-probability threshold tuned on held-out generated frames (card), or None
        (argmax)."""
        return default_card().get("threshold", self.default_threshold)


DEFAULT_MODEL = DefaultModel()

#: The commands of tools/train_default_model.sh (W = runs/default-model), recorded in the card.
TRAINING_COMMANDS = [
    "peaknet simulate --config peaknet/data/configs/simulate-thermolysin-cspad.toml "
    "--frames 240 --seed 11 --out $W/sim/cspad",
    "peaknet simulate --detector epix10ka2m --crystal.hit_fraction=0.9 --frames 160 --seed 12 "
    "--out $W/sim/epix",
    "peaknet simulate --detector jungfrau4m --crystal.hit_fraction=0.9 --frames 160 --seed 13 "
    "--out $W/sim/jungfrau",
    "(phase-2 frames: the same with seeds 14, 15, 16 -> $W/sim2/...; held out: --frames 8 and "
    "seeds 21, 22, 23 -> $W/heldout/...; threshold tuning: --frames 2, seeds 31, 32, 33 -> "
    "$W/tune/...)",
    "peaknet train --config peaknet/data/configs/pretrain-default-model.toml "
    "--run.out=$W/train --run.threads=2 --data.train='[\"$W/sim/*/shard_*.cxi\"]'",
    "peaknet train --config peaknet/data/configs/pretrain-default-model.toml "
    "--run.out=$W/train2 --run.threads=2 --model.weights=$W/train/model.safetensors "
    "--optim.lr=5e-4 --optim.warmup_steps=100 --run.steps=5000 "
    "--data.train='[\"$W/sim/*/shard_*.cxi\", \"$W/sim2/*/shard_*.cxi\"]'",
    "python -m peaknet.models export --weights $W/train2/model.safetensors --threads 2 "
    "--heldout '$W/tune/*/shard_*.cxi' --out peaknet/data/models/peaknet-small-cpu.safetensors",
    "python -m peaknet.evaluate --predictor model --weights default "
    "--shards '$W/heldout/*/shard_*.cxi' --out $W/eval/model-generated (and peakfinder8, "
    "and --cbf 'shared/data/real/thermolysin_cspad/*.cbf')",
]


def default_card() -> dict:
    """The card (JSON) of the shipped model; {} when it is missing."""
    p = DEFAULT_MODEL.card
    if not p.is_file():
        return {}
    return json.loads(p.read_text())


def load_state_dict(path: str | Path) -> tuple[dict, dict]:
    """(state dict as float32 CPU tensors, metadata) of a safetensors file. No pickle."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    sd = load_file(str(path), device="cpu")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return sd, meta


def load_model(weights: str | Path, preset: Optional[str] = None, device=None) -> torch.nn.Module:
    """A PeakNet of ``preset`` (default: the file's ``preset`` metadata, else small-cpu) with the
    weights of a safetensors file, float32, eval mode, on ``device`` (default CPU)."""
    from peaknet.model import build_model

    sd, meta = load_state_dict(weights)
    preset = preset or meta.get("preset") or DEFAULT_MODEL.preset
    model = build_model(preset)
    model.load_state_dict(sd, strict=True)
    model = model.float().eval()
    if device is not None:
        model = model.to(device)
    return model


def load_default_model(device=None) -> torch.nn.Module:
    """The shipped default model (``DEFAULT_MODEL``), float32, eval mode."""
    if not DEFAULT_MODEL.weights.is_file():
        raise FileNotFoundError(
            f"the shipped weights {DEFAULT_MODEL.weights} are missing; reproduce them with "
            f"{DEFAULT_MODEL.training_command}")
    return load_model(DEFAULT_MODEL.weights, DEFAULT_MODEL.preset, device)


def save_weights(state: dict, path: str | Path, metadata: Optional[dict] = None,
                 max_fp32_bytes: int = _MAX_FP32_BYTES) -> str:
    """Write a state dict with safetensors: float32, or float16 when float32 would exceed
    ``max_fp32_bytes``. Returns the dtype written."""
    from safetensors.torch import save_file

    fp32 = sum(v.numel() * 4 for v in state.values() if v.is_floating_point())
    dtype = torch.float16 if fp32 > max_fp32_bytes else torch.float32
    out = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
           .contiguous() for k, v in state.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta["dtype"] = str(dtype).replace("torch.", "")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return meta["dtype"]


def _state_from_checkpoint(ckpt: str | Path, preset: str) -> dict:
    """The model weights of a trainer DCP checkpoint folder (single-process runs)."""
    import torch.distributed.checkpoint as dcp

    from peaknet.model import build_model

    model = build_model(preset)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    return model.state_dict()


# ------------------------------------------------------------------------------------------
# export (used by tools/train_default_model.sh)
# ------------------------------------------------------------------------------------------
def export(weights: Optional[str], out: str, heldout: Sequence[str], checkpoint: Optional[str] = None,
           preset: str = "small-cpu", thresholds: Optional[Sequence[float]] = None,
           match_distance: float = 3.0, card_extra: Optional[dict] = None) -> dict:
    """Training weights (safetensors, or a DCP ``checkpoint`` folder) -> the shipped file, with
    the decode threshold tuned on the ``heldout`` generated frames; writes the card."""
    from peaknet.evaluate import TUNING_THRESHOLDS, tune_threshold

    if weights:
        sd, meta = load_state_dict(weights)
    elif checkpoint:
        sd, meta = _state_from_checkpoint(checkpoint, preset), {"checkpoint": str(checkpoint)}
    else:
        raise ValueError("give --weights or --checkpoint")
    out_p = Path(out)
    dtype = save_weights(sd, out_p, {"preset": preset, "name": out_p.stem,
                                     "step": meta.get("step", "")})
    model = load_model(out_p, preset)  # what users get (after the float16 round trip)
    tuning = (tune_threshold(model, heldout, thresholds or TUNING_THRESHOLDS, match_distance)
              if heldout else {})
    card_p = out_p.with_suffix(".json")
    card = json.loads(card_p.read_text()) if card_p.is_file() else {}
    for stale in ("metrics", "notes", "threshold_tuning", "threshold", "min_pix"):
        card.pop(stale, None)  # measured on the weights being replaced
    card.update({
        "name": out_p.stem,
        "preset": preset,
        "parameters": int(sum(v.numel() for v in sd.values())),
        "stored_dtype": dtype,
        "loaded_dtype": "float32",
        "format": "safetensors (no pickle)",
        "input": DEFAULT_MODEL.input,
        "training_config": DEFAULT_MODEL.training_config,
        "reproduce": DEFAULT_MODEL.training_command,
        "data": DEFAULT_MODEL.data,
        "trained_step": meta.get("step"),
        "commands": TRAINING_COMMANDS,
    })
    if tuning:
        card["threshold"] = tuning["best_threshold"]
        card["min_pix"] = tuning["best_min_pix"]
        card["threshold_tuning"] = tuning
    if card_extra:
        card.update(card_extra)
    card_p.write_text(json.dumps(card, indent=1) + "\n")
    return card


def add_metrics(eval_dirs: Sequence[str], card_path: Optional[str] = None) -> dict:
    """Copy the headline figures of ``peaknet evaluate`` summaries into the card."""
    card_p = Path(card_path) if card_path else DEFAULT_MODEL.card
    card = json.loads(card_p.read_text()) if card_p.is_file() else {}
    metrics = card.setdefault("metrics", {})
    for d in eval_dirs:
        s = json.loads((Path(d) / "summary.json").read_text())
        entry: dict = {"predictor": s.get("predictor"), "preset": s.get("preset")}
        if s.get("predictor") == "model":
            entry.update(threshold=s.get("threshold"), min_pix=s.get("min_pix"))
        if "generated" in s:
            g = s["generated"]
            entry["generated"] = {k: g[k] for k in ("frames", "found", "truth", "matched",
                                                    "precision", "recall", "f1",
                                                    "match_distance_px", "by_detector")}
        if "real" in s:
            r = s["real"]
            entry["real"] = {k: r[k] for k in ("frames", "dials_spots", "matched", "recall",
                                               "found_on_indexed_frames", "found_all_frames",
                                               "match_distance_px")}
        metrics[Path(d).name] = entry
    card_p.write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peaknet.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="training weights -> shipped weights + card")
    e.add_argument("--weights", help="model.safetensors of a training run")
    e.add_argument("--checkpoint", help="or a DCP checkpoint folder of a single-process run")
    e.add_argument("--preset", default="small-cpu")
    e.add_argument("--heldout", nargs="*", default=[], help="held-out generated shards (globs)")
    e.add_argument("--thresholds", default=None,
                   help="comma-separated decode thresholds to try (default: "
                        "peaknet.evaluate.TUNING_THRESHOLDS)")
    e.add_argument("--match-distance", type=float, default=3.0)
    e.add_argument("--out", default=str(DEFAULT_MODEL.weights))
    e.add_argument("--threads", type=int, default=None)
    m = sub.add_parser("add-metrics", help="copy evaluate summaries into the card")
    m.add_argument("eval_dirs", nargs="+", help="peaknet evaluate output folders")
    m.add_argument("--card", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "add-metrics":
        add_metrics(a.eval_dirs, a.card)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    card = export(a.weights, a.out, a.heldout, a.checkpoint, a.preset,
                  [float(t) for t in a.thresholds.split(",")] if a.thresholds else None,
                  a.match_distance)
    print(json.dumps(card, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
