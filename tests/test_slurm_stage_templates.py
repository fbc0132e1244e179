"""slurm/{simulate,find_peaks,match}.sbatch submitted with sbatch to the private local Slurm."""
from __future__ import annotations

import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_simulate_find_peaks_match_chain_on_slurm(slurm_cluster, tmp_path):
    sim, peaks, match = tmp_path / "sim", tmp_path / "peaks", tmp_path / "match"
    opts = ["--cpus-per-task=1", "--mem=2G", "--time=00:10:00"]
    job = slurm_cluster.sbatch(
        REPO / "slurm/simulate.sbatch", "--run.frames=4", "--run.frames_per_shard=2",
        f"--run.out={sim}", "--run.progress=false", "--crystal.hit_fraction=1.0",
        options=opts, cwd=REPO, timeout=300,
    )
    assert job.state == "COMPLETED", job.output
    assert "simulate.sbatch: job" in job.output
    assert len(list(sim.glob("shard_*.cxi"))) == 2
    assert (sim / "simulate.config.toml").is_file()

    job = slurm_cluster.sbatch(
        REPO / "slurm/find_peaks.sbatch", f"--run.inputs=['{sim}/shard_*.cxi']",
        f"--run.geometry={sim / 'geometry.geom'}", f"--run.out={peaks}",
        "--peakfinder8.preset=om_epix10k2m", "--peakfinder8.min_pix_count=2",
        options=opts, cwd=REPO, timeout=300,
    )
    assert job.state == "COMPLETED", job.output
    assert len(list(peaks.glob("*.peaks.cxi"))) == 2

    job = slurm_cluster.sbatch(
        REPO / "slurm/match.sbatch", f"--run.found={peaks}/*.cxi",
        f"--run.predicted={sim}/shard_*.cxi", f"--run.geometry={sim / 'geometry.geom'}",
        f"--run.out={match}", options=opts, cwd=REPO, timeout=300,
    )
    assert job.state == "COMPLETED", job.output
    summary = json.loads((match / "summary.json").read_text())
    assert summary["n_frames"] == 4
