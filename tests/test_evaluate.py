"""The shipped default model and the ``evaluate`` stage.

- the shipped weights load with safetensors (no pickle: ``torch.load(weights_only=True)`` never
  runs), stored in float16 or float32 and loaded back as float32, and give finite outputs;
- the evaluate stage runs on 2 generated CSPAD frames (4 modules each, to stay fast) with the
  shipped model and with peakfinder8, and writes a summary with peak P/R/F1;
- with the real thermolysin frames (skipped when shared/data/real is absent): the summary has
  the per-frame counts and the DIALS-spot recall.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peaknet.config import load_config
from peaknet.evaluate import EvaluateConfig, run
from peaknet.models import DEFAULT_MODEL, default_card, load_default_model, load_state_dict

PANELS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def sim_frames(tmp_path_factory) -> Path:
    """2 thermolysin-like CSPAD hits written by the simulate stage."""
    from peaknet.simulate.config import thermolysin_cspad_config
    from peaknet.simulate.generator import run as simulate

    out = tmp_path_factory.mktemp("sim")
    cfg = thermolysin_cspad_config(out=str(out), frames=2, seed=7, progress=False)
    simulate(cfg)
    assert sorted(p.name for p in out.glob("shard_*.cxi")) == ["shard_00000.cxi"]
    return out


def test_shipped_weights_are_safetensors_and_load_as_float32():
    path = DEFAULT_MODEL.weights
    assert path.is_file(), "run tools/train_default_model.sh"
    assert path.stat().st_size < 9 * 2**20
    # safetensors: an 8-byte little-endian header length followed by a JSON header
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes <= {"F16", "F32", "I64"}
    # no pickle anywhere: neither a torch zip archive nor a raw pickle stream
    assert raw[:2] != b"PK" and raw[:1] != b"\x80"
    sd, meta = load_state_dict(path)
    # weights_only semantics: whatever torch.load(weights_only=True) makes of the file is plain
    # tensors (newer torch reads safetensors itself; older ones refuse the file)
    try:
        other = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch archive: fine
        other = None
    if other is not None:
        assert isinstance(other, dict) and set(other) == set(sd)
        assert all(torch.is_tensor(v) for v in other.values())
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    assert meta.get("preset") == DEFAULT_MODEL.preset
    card = default_card()
    assert card["preset"] == "small-cpu"
    assert "threshold" in card and "reproduce" in card


def test_load_default_model_forward_is_finite():
    model = load_default_model()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, 96, generator=g)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (2, 2, 64, 96)
    assert torch.isfinite(y).all()


def _cfg(tmp_path, predictor, shards, **extra):
    ov = [f"run.predictor={predictor}", f"run.out={tmp_path / predictor}", "run.threads=2",
          f"data.shards=[\"{shards}\"]", f"data.panels={PANELS}"]
    ov += [f"{k}={v}" for k, v in extra.items()]
    return load_config(EvaluateConfig, None, ov)


@pytest.mark.parametrize("predictor", ["model", "peakfinder8"])
def test_evaluate_generated_frames(sim_frames, tmp_path, predictor):
    cfg = _cfg(tmp_path, predictor, f"{sim_frames}/shard_*.cxi")
    s = run(cfg)
    g = s["generated"]
    assert g["frames"] == 2
    assert g["truth"] > 0
    assert 0 <= g["matched"] <= min(g["found"], g["truth"])
    for k in ("precision", "recall", "f1"):
        assert g[k] is None or 0.0 <= g[k] <= 1.0
    assert json.loads((tmp_path / predictor / "summary.json").read_text())["stage"] == "evaluate"
    if predictor == "model":
        assert s["weights"].endswith("peaknet-small-cpu.safetensors")
        assert s["threshold"] == DEFAULT_MODEL.threshold
        # the shipped model finds most of the detectable peaks of a thermolysin-like frame
        assert g["recall"] >= 0.5 and g["precision"] >= 0.5


def test_evaluate_real_frames_peakfinder8(tmp_path):
    from realdata import real_data

    folder = real_data("thermolysin_cspad")
    cfg = load_config(EvaluateConfig, None, [
        "run.predictor=peakfinder8", f"run.out={tmp_path}", "peakfinder8.preset=lcls_cspad",
        f"data.cbf=[\"{folder}/*.cbf\"]"])
    s = run(cfg)["real"]
    assert len(s["frames"]) == 4 and s["indexed_frames"] == 3
    assert s["dials_spots"] == 244
    assert [f["found"] for f in s["frames"]] == pytest.approx([250, 197, 204, 127], abs=3)
    assert s["recall"] >= 0.9


def test_config_errors(tmp_path):
    from peaknet.config import ConfigError

    with pytest.raises(ConfigError):
        load_config(EvaluateConfig, None, [f"run.out={tmp_path}"])  # no data
    with pytest.raises(ConfigError):
        load_config(EvaluateConfig, None, ["data.cbf=[\"x.cbf\"]", "model.threshold=1.5"])
    with pytest.raises(ConfigError):
        load_config(EvaluateConfig, None, ["data.cbf=[\"x.cbf\"]", "peakfinder8.preset=nope"])
