"""``peaknet match`` end to end: the real 5-HT2B stream, and a finder's CXI output vs generated truth."""
from __future__ import annotations

import csv
import json
import pathlib

import pytest

from peaknet.cli import run_stage
from peaknet.errors import InputError

from realdata import real_data


def test_match_stage_on_real_stream(tmp_path):
    STREAM = real_data("crystfel_5ht2b/test.stream")
    summary = run_stage("match", ["--found", str(STREAM), "--out", str(tmp_path)])
    assert summary["n_frames"] == 32  # the indexed chunks
    assert summary["n_found"] == 833 and summary["n_predicted"] == 7966
    assert summary["n_selected"] == 4  # precision > 0.8 (strict), >= 10 found and predicted
    for name in ("manifest.csv", "matches.csv", "counts.png", "precision_recall.png",
                 "summary.json", "match.config.toml"):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "manifest.csv")))
    assert len(rows) == 32 and sum(r["selected"] in ("True", "1", "true") for r in rows) == 4
    assert json.loads((tmp_path / "summary.json").read_text())["n_selected"] == 4


def test_match_stage_finder_vs_generated_truth(tmp_path):
    sim, peaks, out = tmp_path / "sim", tmp_path / "peaks", tmp_path / "match"
    run_stage("simulate", ["--frames", "4", "--seed", "3", "--out", str(sim),
                           "--run.frames_per_shard=2", "--run.progress=false",
                           "--crystal.hit_fraction=1.0"])
    run_stage("find-peaks", ["--inputs", str(sim / "shard_*.cxi"), "--geometry",
                             str(sim / "geometry.geom"), "--out", str(peaks),
                             "--preset", "om_epix10k2m", "--peakfinder8.min_pix_count=2",
                             "--peakfinder8.min_snr=6"])
    summary = run_stage("match", ["--found", str(peaks / "*.cxi"), "--predicted",
                                  str(sim / "shard_*.cxi"), "--run.geometry", str(sim / "geometry.geom"),
                                  "--out", str(out), "--curation.max_distance=2"])
    assert summary["n_frames"] == 4
    # peakfinder8 on generated hits: most detectable truth peaks are found, few false ones
    assert summary["micro_recall"] > 0.7
    assert summary["micro_precision"] > 0.5
    assert summary["overlays"] and pathlib.Path(summary["overlays"][0]).is_file()


def test_match_stage_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no file matches"):
        run_stage("match", ["--found", str(tmp_path / "*.cxi"), "--predicted", "x", "--out", str(tmp_path)])
    (tmp_path / "a.cxi").write_bytes(b"")
    with pytest.raises(InputError, match="predicted"):
        run_stage("match", ["--found", str(tmp_path / "a.cxi"), "--out", str(tmp_path)])
