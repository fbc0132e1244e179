"""Label quality: labels against the generator's truth masks, and the real thermolysin peaks.

- Generated frames (Epix10ka2M at ~140 ADU/photon, thermolysin CSPAD at 10 ADU/photon): the
  detectable truth peaks, their positions jittered by 0.3 px as a peak finder would report
  them, through :func:`peaknet.label.label_peaks` with the default config and the generator's
  geometry (gain "auto"). The label mask (``label_threshold`` 0.5 of the fitted profile's
  maximum) is compared pixel by pixel with the truth mask (pixels whose expected spot photons
  are >= 0.25 x the spot's brightest pixel): the labels are nearly all inside the truth
  (precision), and cover about half of it (recall) because the truth's threshold is lower;
  with ``label_threshold`` = 0.25 both agree closely (IoU ~0.85).
- Real CSPAD frames: >= 80% of the DIALS-indexed spots get status ok and a non-empty label.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

from peaknet.label import LabelFitConfig, Status, label_peaks

from realdata import real_data


def _pixel_scores(label: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    lab = label == 1
    return (int(np.count_nonzero(lab & truth)), int(np.count_nonzero(lab & ~truth)),
            int(np.count_nonzero(~lab & truth)))


def _generated(detector: str, n_frames: int, modules=None):
    from peaknet.config import config_from_dict
    from peaknet.simulate.config import SimulateConfig, thermolysin_cspad_config
    from peaknet.simulate.generator import Simulator

    if detector == "thermolysin":
        cfg = thermolysin_cspad_config(frames=n_frames, seed=3)
    else:
        cfg = config_from_dict(SimulateConfig, {"run": {"detector": detector, "frames": n_frames,
                                                        "seed": 3},
                                                "crystal": {"hit_fraction": 1.0}})
    sim = Simulator(cfg)
    out = []
    for i in range(n_frames):
        frame, truth = sim.frame(i)
        pk = truth.peaks()
        keep = np.ones(len(pk), bool) if modules is None else pk.panel < modules
        rng = np.random.default_rng(100 + i)
        k = int(keep.sum())
        pos = np.stack([pk.panel[keep], pk.ss[keep] + rng.normal(0, 0.3, k),
                        pk.fs[keep] + rng.normal(0, 0.3, k)], axis=1)
        frame = np.asarray(frame, np.float64)
        tmask = truth.mask
        if modules is not None:
            frame, tmask = frame[:modules], tmask[:modules]
        out.append((frame, pos, tmask))
    return sim, out


@pytest.mark.parametrize("detector, n_frames, modules, gain",
                         [("epix10ka2m", 2, None, 0.0147 * 9500), ("thermolysin", 1, 8, 10.0)])
def test_labels_against_truth_masks(detector, n_frames, modules, gain):
    sim, frames = _generated(detector, n_frames, modules)
    assert sim.adu_per_photon == pytest.approx(gain)
    cfg = LabelFitConfig(device="cpu")
    tp = fp = fn = 0
    tp25 = fp25 = fn25 = 0
    n_ok = n_peaks = 0
    for frame, pos, tmask in frames:
        res = label_peaks(frame, pos, None, cfg, geometry=sim.geom)
        a, b, c = _pixel_scores(res.label, tmask)
        tp, fp, fn = tp + a, fp + b, fn + c
        n_ok += int(np.count_nonzero(res.table["status"] == Status.OK))
        n_peaks += len(pos)
        loose = label_peaks(frame, pos, None, LabelFitConfig(device="cpu", label_threshold=0.25),
                            gain=sim.adu_per_photon)
        a, b, c = _pixel_scores(loose.label, tmask)
        tp25, fp25, fn25 = tp25 + a, fp25 + b, fn25 + c
    precision, recall, iou = tp / (tp + fp), tp / (tp + fn), tp / (tp + fp + fn)
    iou25 = tp25 / (tp25 + fp25 + fn25)
    print(f"{detector}: {n_peaks} peaks, ok {n_ok / n_peaks:.3f}; label vs truth pixels: "
          f"precision {precision:.3f} recall {recall:.3f} IoU {iou:.3f}; "
          f"label_threshold 0.25: IoU {iou25:.3f}")
    assert n_peaks >= 50
    assert n_ok >= 0.95 * n_peaks  # gain-aware redchi: good fits are kept on any detector
    assert precision >= 0.95
    assert recall >= 0.4
    assert iou25 >= 0.7


def test_real_dials_peaks_are_labelled():
    """>= 80% of the DIALS-indexed spots of the real thermolysin CSPAD frames (10 ADU/photon)
    get status ok and a non-empty label, frame by frame and overall."""
    from peaknet.io.cbf import cbf_asic_to_stack, read_cbf

    spots = real_data("thermolysin_cspad/dials_indexed_spots.csv")
    rows = list(csv.DictReader(open(spots)))
    cfg = LabelFitConfig(device="cpu", tile_shape=(185, 194), saturation=16383.0,
                         adu_per_photon=10.0)
    n_good = n_all = 0
    for image in sorted({r["image"] for r in rows}):
        rr = [r for r in rows if r["image"] == image]
        stack = read_cbf(spots.parent / image).stack.astype(np.float64)
        mod, ss, fs = cbf_asic_to_stack(np.array([int(r["panel64"]) for r in rr]),
                                        np.array([float(r["fs_px"]) for r in rr]),
                                        np.array([float(r["ss_px"]) for r in rr]))
        res = label_peaks(stack, np.stack([mod, ss, fs], axis=1), stack > -100, cfg)
        t = res.table
        good = (t["status"] == Status.OK) & (t["npix_label"] > 0)
        print(f"{image}: {good.sum()} of {len(good)} DIALS spots ok and labelled")
        assert good.mean() >= 0.8, image
        n_good, n_all = n_good + int(good.sum()), n_all + len(good)
    assert n_all == 244
    assert n_good / n_all >= 0.9


def test_demo_label_vs_truth(tmp_path):
    """The demo's summary block: labelled frames only, label value 1 only, per shard truth."""
    import h5py

    from peaknet.demo import label_vs_truth

    truth = np.zeros((3, 1, 6, 6), bool)
    truth[0, 0, 1:3, 1:3] = True  # 4 truth pixels in frame 0
    truth[2, 0, 0, 0] = True  # frame 2 is skipped: not counted
    with h5py.File(tmp_path / "shard_00000.truth.h5", "w") as h:
        h["mask"] = truth
    lab = np.zeros((3, 1, 6, 6), np.uint8)
    lab[0, 0, 1, 1:4] = 1  # 2 tp, 1 fp
    lab[0, 0, 2, 2] = 255  # ignore: not a label (a truth pixel under ignore)
    ev = [f"{tmp_path / 'shard_00000.cxi'}//{i}" for i in (0, 1, 2)]
    with h5py.File(tmp_path / "labels.h5", "w") as h:
        h["labels/mask"] = lab
        h["events/event_id"] = np.array(ev, dtype=h5py.string_dtype())
        h["events/status"] = np.array([0, 0, 1], np.int8)
    got = label_vs_truth(tmp_path / "labels.h5")
    assert got == {"frames": 2, "tp": 2, "fp": 1, "fn": 2, "precision": round(2 / 3, 4),
                   "recall": 0.5, "iou": 0.4, "truth_in_ignore": 0.25}
