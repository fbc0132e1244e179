"""Realism check: simulated CSPAD frames (``thermolysin_cspad_config``) against the four real
thermolysin CSPAD stills (LCLS cxi78513) in shared/data/real/thermolysin_cspad.

The same estimators (peaknet.simulate.realism) run on both:

- background: median ADU in rings of 1/d, where the real median is above 3 ADU;
- bright spots: groups of >= 2 pixels above median + 8 x MAD of their 1/d ring;
- spot shape and strength: second moments (sigma), brightest pixel and integrated value of the
  DIALS-indexed spots (real) and of the strongest detectable truth spots (simulated, as many
  per frame as DIALS indexed on average).

Each figure must agree within a factor of 2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peaknet.simulate import Simulator, thermolysin_cspad_config
from peaknet.simulate.realism import (
    count_bright_spots,
    dials_spots,
    radial_profile,
    read_cspad_cbf,
    spot_moments,
    two_theta_map,
)
from realdata import real_data

FRAMES = [
    "idx-20130301060858401.cbf",
    "idx-20130301060858601.cbf",
    "idx-20130301060858701.cbf",
    "idx-20130301060858801.cbf",
]
EDGES = np.linspace(0.02, 0.6, 30)  # 1/d bins, 1/Å




@pytest.fixture(scope="module")
def real_stats():
    csv_path = real_data("thermolysin_cspad/dials_indexed_spots.csv")
    prof, nbright, sig, peak, tot, ndials = [], [], [], [], [], []
    for name in FRAMES:
        f = read_cspad_cbf(real_data(f"thermolysin_cspad/{name}"))
        s = 2 * np.sin(two_theta_map(f.positions) / 2) / f.wavelength_A
        prof.append(radial_profile(f.data, s, EDGES, f.valid))
        nbright.append(count_bright_spots(f.data, s, f.valid))
        p, ss, fs = dials_spots(csv_path, name)
        if len(p):
            ndials.append(len(p))
            m = spot_moments(f.data.astype(np.float64), p, ss, fs, valid=f.valid)
            sig += list(np.sqrt(m["sigma_ss"] * m["sigma_fs"]))
            peak += list(m["peak"])
            tot += list(m["total"])
    return dict(prof=np.nanmedian(prof, axis=0), nbright=np.median(nbright), sig=np.median(sig),
                peak=np.median(peak), tot=np.median(tot), ndials=int(np.mean(ndials)))


@pytest.fixture(scope="module")
def sim_stats(real_stats):
    cfg = thermolysin_cspad_config()
    sim = Simulator(cfg)
    good = sim.maps.good
    prof, nbright, sig, peak, tot = [], [], [], [], []
    for i in range(6):
        f, t = sim.frame(i)
        prof.append(radial_profile(f, sim.maps.s, EDGES, good))
        nbright.append(count_bright_spots(f, sim.maps.s, good))
        r = t.reflections
        det = np.flatnonzero(r["detectable"])
        top = det[np.argsort(-r["photons"][det])][: real_stats["ndials"]]
        m = spot_moments(f.astype(np.float64), r["panel"][top], r["ss"][top], r["fs"][top], valid=good)
        sig += list(np.sqrt(m["sigma_ss"] * m["sigma_fs"]))
        peak += list(m["peak"])
        tot += list(m["total"])
    return dict(prof=np.nanmedian(prof, axis=0), nbright=np.median(nbright), sig=np.median(sig),
                peak=np.median(peak), tot=np.median(tot))


def _within(a, b, factor=2.0):
    return (a / b <= factor) and (b / a <= factor)


def test_background_radial_profile(real_stats, sim_stats):
    real, sim = real_stats["prof"], sim_stats["prof"]
    sel = np.isfinite(real) & np.isfinite(sim) & (real > 3.0)
    assert sel.sum() >= 20
    ratio = sim[sel] / real[sel]
    assert ratio.min() >= 0.5 and ratio.max() <= 2.0, dict(real=real.round(1), sim=sim.round(1))
    # the water ring is where it is on the real frames (peak of the profile within 0.04 1/Å)
    centres = 0.5 * (EDGES[1:] + EDGES[:-1])
    assert abs(centres[np.nanargmax(real)] - centres[np.nanargmax(sim)]) <= 0.041


def test_bright_spot_count(real_stats, sim_stats):
    assert _within(sim_stats["nbright"], real_stats["nbright"]), (sim_stats["nbright"], real_stats["nbright"])


def test_spot_widths_and_strength(real_stats, sim_stats):
    for key in ("sig", "peak", "tot"):
        assert _within(sim_stats[key], real_stats[key], 2.2), (key, sim_stats[key], real_stats[key])
    assert 0.5 < real_stats["sig"] < 1.5  # sharp XFEL spots: ~1 pixel
