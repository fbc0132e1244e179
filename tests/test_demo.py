"""The README's main job (`peaknet demo`), end to end on a few generated frames: every step runs
(simulate, find-peaks, match, label, the hybrid inference pipeline on a real local Ray with the
shipped model), every event is accounted for, and the headline is printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_demo_main_job_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    p = subprocess.run([sys.executable, "-m", "peaknet.cli", "demo", "--frames", "6",
                        "--run.frames_per_shard=3", f"--out={out}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "headline" in p.stderr  # the log's last lines say what the job did
    s = json.loads((out / "summary.json").read_text())
    assert list(s["steps"]) == ["simulate", "find-peaks", "match", "label", "infer"]
    h = s["headline"]
    assert h["events"] == 6 and h["skipped"] == 0 and h["frames_per_s"] > 0
    assert h["peaks_per_hit"] > 10  # the shipped model finds the generated Bragg peaks
    assert s["label_vs_truth"]["frames"] > 0 and s["label_vs_truth"]["precision"] > 0.8
    for stage in ("simulate", "find-peaks", "match", "label", "infer"):
        assert (out / stage).is_dir(), stage
    assert list((out / "infer").glob("*.cxi")), "no CXI peak lists written"
    assert (out / "demo.config.toml").is_file()  # the resolved config beside the outputs
