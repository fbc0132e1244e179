"""Tests of the synthetic-data generator (peaknet.simulate): crystallography, prediction,
noise, determinism, truth consistency, shards, config errors.

Most tests use a small 4-module detector (96 x 96 pixels of 0.4 mm) so frames take
milliseconds; one test runs the shipped Epix10ka2M geometry.
"""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from peaknet.config import load_config
from peaknet.errors import ConfigError
from peaknet.io.geometry import parse_geometry
from peaknet.simulate import SimulateConfig, Simulator, iter_frames
from peaknet.simulate.crystal import (
    SYSTEMS,
    UnitCell,
    check_cell,
    d_spacing_formula,
    enumerate_hkl,
    random_rotations,
    systematic_absent,
)
from peaknet.simulate.detector import NORMAL_TABLE, normal_sample, poisson_sample
from peaknet.simulate.diffraction import HC_EV_A, predict_still, wilson_intensities
from peaknet.simulate.writer import read_truth_frame, read_truth_reflections, run

# --------------------------------------------------------------------------- small detector
SMALL_GEOM = """
photon_energy = 9500 eV
clen = 0.06 m
res = 2500
adu_per_photon = 10
max_adu = 20000
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
"""
for _m, (_cx, _cy) in enumerate([(-98, 98), (2, 98), (-98, -2), (2, -2)]):
    SMALL_GEOM += f"""
m{_m}/min_fs = 0
m{_m}/max_fs = 95
m{_m}/min_ss = {96 * _m}
m{_m}/max_ss = {96 * _m + 95}
m{_m}/fs = +1.0x
m{_m}/ss = -1.0y
m{_m}/corner_x = {_cx}
m{_m}/corner_y = {_cy}
"""


@pytest.fixture(scope="module")
def small_geom():
    return parse_geometry(SMALL_GEOM)


def small_config(**crystal) -> SimulateConfig:
    cfg = SimulateConfig()
    cfg.run.progress = False
    cfg.run.frames_per_shard = 3
    cfg.crystal.hit_fraction = 1.0
    cfg.crystal.multi_lattice_fraction = 0.0
    cfg.crystal.d_min = 2.0
    cfg.artifacts.beamstop_radius_mm = 1.0
    for k, v in crystal.items():
        setattr(cfg.crystal, k, v)
    return cfg


# ============================================================================ crystallography
CELLS = {
    "triclinic": (UnitCell(41.0, 52.0, 63.0, 81.0, 97.0, 105.0), "P"),
    "monoclinic": (UnitCell(61.2, 42.5, 75.0, 90.0, 108.3, 90.0), "C"),
    "orthorhombic": (UnitCell(51.0, 62.0, 73.0), "P"),
    "tetragonal": (UnitCell(79.1, 79.1, 37.9), "P"),
    "trigonal": (UnitCell(60.0, 60.0, 60.0, 75.0, 75.0, 75.0), "P"),
    "hexagonal": (UnitCell(93.0, 93.0, 130.4, 90.0, 90.0, 120.0), "P"),
    "cubic": (UnitCell(50.0, 50.0, 50.0), "F"),
}


@pytest.mark.parametrize("system", SYSTEMS)
def test_metric_tensor_gives_textbook_d_spacings(system):
    cell, centering = CELLS[system]
    check_cell(cell, system, centering)
    hkl = enumerate_hkl(cell, 4.0, centering)
    assert len(hkl) > 100
    d_metric = cell.d_spacing(hkl)
    d_book = d_spacing_formula(cell, system, hkl)
    np.testing.assert_allclose(d_metric, d_book, rtol=1e-10)
    # the reciprocal basis is consistent with the metric: |B h| = 1/d, A^T B = I
    B = cell.reciprocal_basis()
    np.testing.assert_allclose(np.linalg.norm(hkl @ B.T, axis=1), 1.0 / d_metric, rtol=1e-10)
    np.testing.assert_allclose(cell.real_basis().T @ B, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(cell.volume, abs(np.linalg.det(cell.real_basis())), rtol=1e-12)
    assert d_metric.min() >= 4.0 - 1e-9
    assert not systematic_absent(hkl, centering).any()


def test_hexagonal_axes_trigonal_and_cubic_known_values():
    cell = UnitCell(93.0, 93.0, 130.4, 90, 90, 120)  # thermolysin
    # d(100) = a sin(60°) for hexagonal axes; d(001) = c
    assert cell.d_spacing(np.array([[1, 0, 0]]))[0] == pytest.approx(93.0 * math.sqrt(3) / 2)
    assert cell.d_spacing(np.array([[0, 0, 1]]))[0] == pytest.approx(130.4)
    cubic = UnitCell(50.0, 50.0, 50.0)
    assert cubic.d_spacing(np.array([[1, 1, 1]]))[0] == pytest.approx(50.0 / math.sqrt(3))


def test_centering_absences():
    hkl = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [2, 0, 0], [1, 1, 2], [1, 0, 1]])
    assert systematic_absent(hkl, "I").tolist() == [True, False, True, False, False, False]
    assert systematic_absent(hkl, "F").tolist() == [True, True, False, False, True, True]
    assert systematic_absent(hkl, "C").tolist() == [True, False, False, False, False, True]
    hexr = np.array([[1, 0, 1], [0, 1, 2], [1, 0, 0], [0, 0, 3]])
    assert systematic_absent(hexr, "R").tolist() == [False, False, True, False]


@pytest.mark.parametrize(
    "system, cell, centering, words",
    [
        ("cubic", (50, 51, 50, 90, 90, 90), "P", "a, b and c must be equal"),
        ("tetragonal", (79, 79, 38, 90, 90, 120), "P", "gamma must be 90"),
        ("hexagonal", (93, 93, 130, 90, 90, 90), "P", "gamma = 120"),
        ("monoclinic", (60, 40, 70, 95, 110, 90), "P", "alpha"),
        ("orthorhombic", (50, 60, 70, 90, 90, 90), "R", "not a orthorhombic Bravais"),
        ("hexagonal", (93, 93, 130, 90, 90, 120), "I", "not a hexagonal Bravais"),
        ("trigonal", (60, 60, 70, 80, 80, 80), "P", "not trigonal"),
    ],
)
def test_bad_cell_for_system(system, cell, centering, words):
    with pytest.raises(ValueError, match=words):
        check_cell(UnitCell(*cell), system, centering)


def test_impossible_cells():
    with pytest.raises(ValueError, match="must be positive"):
        UnitCell(-79.0, 79.0, 38.0)
    with pytest.raises(ValueError, match="between 0 and 180"):
        UnitCell(79.0, 79.0, 38.0, 90, 0, 90)
    with pytest.raises(ValueError, match="do not form a cell"):
        UnitCell(50, 50, 50, 170, 170, 170)


def test_bad_config_gives_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(SimulateConfig, None, ["crystal.cell=[-79.1, 79.1, 37.9, 90, 90, 90]"])
    assert e.value.field == "crystal.cell" and "must be positive" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(SimulateConfig, None, ["crystal.system=cubic"])  # lysozyme cell is not cubic
    assert e.value.field == "crystal.cell" and "not cubic" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(SimulateConfig, None, ["crystal.hit_fraction=1.5"])
    assert e.value.field == "crystal.hit_fraction"
    with pytest.raises(ConfigError) as e:
        load_config(SimulateConfig, None, ["run.detector=pilatus"])
    assert e.value.field == "run.detector"
    toml = tmp_path / "sim.toml"
    toml.write_text('[crystal]\nsystem = "hexagonal"\ncell = [93.0, 93.0, 130.4, 90, 90, 120]\n'
                    '[run]\nframes = 7\n')
    cfg = load_config(SimulateConfig, toml, ["run.seed=5"])
    assert cfg.crystal.system == "hexagonal" and cfg.run.frames == 7 and cfg.run.seed == 5


def test_random_rotations_uniform_on_so3():
    R = random_rotations(np.random.default_rng(1), 20000)
    np.testing.assert_allclose(R @ np.transpose(R, (0, 2, 1)), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # uniform on SO(3): E[R] = 0 and the image of any axis is uniform on the sphere
    assert np.abs(R.mean(axis=0)).max() < 0.02
    z = R[:, :, 2]
    assert abs(z[:, 2].mean()) < 0.02 and abs((z[:, 2] ** 2).mean() - 1 / 3) < 0.01
    # rotation angle density (1 - cos t) / pi: E[cos t] = -1/2... E[trace] = 0
    assert abs(np.trace(R, axis1=1, axis2=2).mean()) < 0.03


def test_wilson_intensities():
    cell = UnitCell(79.1, 79.1, 37.9)
    hkl = enumerate_hkl(cell, 2.0)
    j = wilson_intensities(hkl, 7)
    assert j.mean() == pytest.approx(1.0, abs=0.02)
    assert j.var() == pytest.approx(1.0, abs=0.05)  # exponential (acentric)
    np.testing.assert_array_equal(j, wilson_intensities(hkl, 7))
    np.testing.assert_array_equal(wilson_intensities(-hkl, 7), j)  # Friedel mates
    assert not np.array_equal(wilson_intensities(hkl, 8), j)


def test_prediction_satisfies_bragg_and_partiality():
    cell = UnitCell(79.1, 79.1, 37.9)
    hkl = enumerate_hkl(cell, 2.0)
    jh = wilson_intensities(hkl, 1)
    lam = HC_EV_A / 9500.0
    U = random_rotations(np.random.default_rng(3), 1)[0]
    pred = predict_still(
        hkl, jh, cell.reciprocal_basis(), U, lam, mosaicity_rad_sigma=1e-3, divergence_rad_sigma=1e-4,
        bandwidth_sigma=1e-3, rlp_radius=1e-4, b_factor=20.0, scale=100.0, min_partiality=0.01,
    )
    assert 50 < len(pred) < 5000
    assert pred.partiality.min() >= 0.01 - 1e-12 and pred.partiality.max() <= 1.0
    # within the reflecting range, and Bragg's law up to the excitation error
    assert np.all(np.abs(pred.excitation) <= 3.1 * pred.sigma_eps)
    sin_theta = np.sin(pred.two_theta / 2)
    np.testing.assert_allclose(sin_theta, lam / (2 * pred.d), atol=5e-3)
    # excitation error and partiality as documented: ε = |q + k z| - k, p = exp(-ε²/2σ²)
    k = 1 / lam
    eps = np.linalg.norm(pred.q + np.array([0.0, 0.0, k]), axis=1) - k
    np.testing.assert_allclose(pred.excitation, eps, atol=1e-12)
    np.testing.assert_allclose(pred.partiality, np.exp(-0.5 * (eps / pred.sigma_eps) ** 2), rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(pred.directions, axis=1), 1.0)
    # wider reflecting range (mosaicity) excites more reflections
    pred2 = predict_still(
        hkl, jh, cell.reciprocal_basis(), U, lam, mosaicity_rad_sigma=3e-3, divergence_rad_sigma=1e-4,
        bandwidth_sigma=1e-3, rlp_radius=1e-4, b_factor=20.0, scale=100.0, min_partiality=0.01,
    )
    assert len(pred2) > 1.5 * len(pred)


# ============================================================================ random numbers
def test_counter_based_poisson_and_normal():
    from scipy import stats

    for lam in (0.2, 1.5, 5.0, 40.0):
        x = poisson_sample(np.full(200000, lam), np.uint64(11))
        assert x.mean() == pytest.approx(lam, rel=0.02, abs=0.005)
        assert x.var() == pytest.approx(lam, rel=0.03, abs=0.01)
        assert np.all(x == np.round(x)) and x.min() >= 0
    z = normal_sample(400000, np.uint64(5), NORMAL_TABLE)
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)
    assert stats.kstest(z[:50000], "norm").pvalue > 1e-3
    np.testing.assert_array_equal(z, normal_sample(400000, np.uint64(5), NORMAL_TABLE))


# ============================================================================ frames
def test_determinism_and_frame_independence(small_geom):
    cfg = small_config()
    cfg.crystal.hit_fraction = 0.7
    a = list(iter_frames(cfg, 0, 5, geometry=small_geom))
    b = list(iter_frames(cfg, 3, 5, geometry=small_geom))  # frames 3, 4 alone
    for (fa, ta), (fb, tb) in zip(a[3:], b):
        assert fa.dtype == np.float32 and fa.shape == (4, 96, 96)
        assert fa.tobytes() == fb.tobytes()
        np.testing.assert_array_equal(ta.mask, tb.mask)
        for k in ta.reflections:
            np.testing.assert_array_equal(ta.reflections[k], tb.reflections[k])
    sim = Simulator(cfg, small_geom)
    f2, t2 = sim.frame(2)
    assert f2.tobytes() == a[2][0].tobytes()
    cfg2 = small_config()
    cfg2.crystal.hit_fraction = 0.7
    cfg2.run.seed = 1
    f2b, _ = Simulator(cfg2, small_geom).frame(2)
    assert f2b.tobytes() != f2.tobytes()


def test_hit_fraction_respected(small_geom):
    cfg = small_config()
    cfg.crystal.hit_fraction = 0.3
    sim = Simulator(cfg, small_geom)
    n = 300
    hits = sum(sim.frame(i)[1].hit for i in range(n))
    # binomial(300, 0.3): sd 7.9 -> 4 sd
    assert abs(hits - 0.3 * n) < 32
    blank = next(t for _, t in (sim.frame(i) for i in range(20)) if not t.hit)
    assert blank.n_reflections == 0 and not blank.mask.any()


def test_truth_consistent_with_pixels(small_geom):
    cfg = small_config()
    cfg.artifacts.dead_module_prob = 0.0
    cfg.artifacts.noisy_module_prob = 0.0
    sim = Simulator(cfg, small_geom)
    g = sim.adu_per_photon
    checked = 0
    for i in range(6):
        frame, truth = sim.frame(i)
        r = truth.reflections
        det = r["detectable"]
        assert truth.n_detectable > 0
        # reflections lie on modules, in pixel-centre coordinates
        assert np.all((r["ss"] >= -0.5) & (r["ss"] < 95.5) & (r["fs"] >= -0.5) & (r["fs"] < 95.5))
        assert np.all(r["partiality"] >= cfg.truth.min_partiality - 1e-6)
        # strong truth peaks sit on bright pixels
        strong = np.flatnonzero(det & (r["snr"] >= 10))
        bright = 0
        for k in strong:
            p, y, x = r["panel"][k], int(round(float(r["ss"][k]))), int(round(float(r["fs"][k])))
            win = frame[p, max(0, y - 1):y + 2, max(0, x - 1):x + 2]
            ring = frame[p, max(0, y - 8):y + 9, max(0, x - 8):x + 9]
            noise = math.sqrt(np.median(ring) / g + 0.05) * g
            bright += win.max() > np.median(ring) + 3 * noise
        assert bright >= 0.95 * len(strong)
        checked += len(strong)
        # every mask pixel is near a detectable reflection on the same module; every detectable
        # reflection has mask pixels; undetectable ones alone do not make mask pixels
        pm, ym, xm = np.nonzero(truth.mask)
        for p in np.unique(pm):
            sel = pm == p
            tp = det & (r["panel"] == p)
            assert tp.any()
            dist = np.hypot(ym[sel, None] - r["ss"][tp][None], xm[sel, None] - r["fs"][tp][None]).min(axis=1)
            assert dist.max() <= 8.0
        assert np.all(r["npix_mask"][det] >= 1)
        assert np.all(r["npix_mask"][~det] == 0)
        assert truth.mask.sum() <= r["npix_mask"].sum()
        # the CXI-style peak list is the detectable truth
        pk = truth.peaks()
        assert len(pk) == truth.n_detectable
        np.testing.assert_allclose(pk.intensity, r["photons"][det] * g, rtol=1e-5)
    assert checked > 20


def test_detectability_follows_snr(small_geom):
    cfg = small_config()
    sim = Simulator(cfg, small_geom)
    _, t = sim.frame(1)
    r = t.reflections
    ok = r["detectable"]
    assert np.all(r["snr"][ok] >= cfg.truth.snr_threshold)
    s, b, n = r["photons"], r["background"], r["npix_area"]
    # brighter reflections (more photons at similar background) are more often detectable
    assert r["photons"][ok].mean() > r["photons"][~ok].mean()
    assert np.all(n >= 1) and np.all(b >= 0) and np.all(s > 0)


def test_artifacts_dead_module_and_saturation(small_geom):
    cfg = small_config(photons_per_reflection=1e6)
    cfg.artifacts.dead_module_prob = 1.0
    cfg.artifacts.dead_pixel_fraction = 0.01
    cfg.artifacts.hot_pixel_fraction = 0.001
    sim = Simulator(cfg, small_geom)
    frame, t = sim.frame(0)
    dm = t.scalars["dead_module"]
    assert 0 <= dm < 4 and np.all(frame[dm] == 0)
    r = t.reflections
    assert not r["detectable"][r["panel"] == dm].any()
    assert frame.max() == pytest.approx(sim.max_adu)
    assert np.all(frame[sim.maps.dead & (np.arange(4) != dm)[:, None, None]] == 0)
    assert np.all(frame == np.round(frame))  # integer ADU (adu_step 1 at 10 ADU/photon)


def test_epix10ka2m_frame_shape_and_levels():
    cfg = SimulateConfig()
    cfg.crystal.hit_fraction = 1.0
    sim = Simulator(cfg)
    frame, truth = sim.frame(0)
    assert frame.shape == (16, 352, 384) and frame.dtype == np.float32
    assert sim.adu_per_photon == pytest.approx(0.0147 * 9500)
    bg = np.median(frame[sim.maps.good]) / sim.adu_per_photon
    assert 0.05 < bg < 5  # photons per pixel
    assert truth.n_reflections > 0 and truth.mask.shape == frame.shape


# ============================================================================ shards
def test_shards_truth_and_resume(tmp_path, small_geom):
    from peaknet.io.cxi import open_frames, read_peak_event_ids, read_peak_lists

    geom_file = tmp_path / "small.geom"
    geom_file.write_text(SMALL_GEOM)
    cfg = small_config()
    cfg.crystal.hit_fraction = 0.6
    cfg.run.geometry = str(geom_file)
    cfg.run.frames = 7
    cfg.run.frames_per_shard = 3
    cfg.run.out = str(tmp_path / "out")
    summary = run(cfg)
    out = tmp_path / "out"
    assert summary["frames"] == 7 and summary["shards"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["n_frames"] for s in manifest["shards"]] == [3, 3, 1]
    assert json.loads((out / "summary.json").read_text())["hits"] == summary["hits"]
    assert (out / "simulate.config.toml").is_file() and (out / "geometry.geom").is_file()
    assert not list(out.glob("*.tmp"))
    sim = Simulator(cfg)
    seen = []
    for entry in manifest["shards"]:
        cxi = out / entry["cxi"]
        truth = out / entry["truth"]
        ids = read_peak_event_ids(cxi)
        peaks = read_peak_lists(cxi, geometry=sim.geom)
        with open_frames(cxi) as src:
            assert src.shape == (entry["n_frames"], 4, 96, 96)
            frames = [src.read(i) for i in range(len(src))]
        with h5py.File(truth) as h:
            assert h["mask"].shape == (entry["n_frames"], 4, 96, 96)
            assert h["mask"].chunks == (1, 4, 96, 96)
            idx = h["frames/index"][()]
        refl = read_truth_reflections(truth)
        for row, i in enumerate(idx):
            seen.append(int(i))
            f, t = sim.frame(int(i))
            assert ids[row] == t.event_id
            np.testing.assert_array_equal(frames[row], f)
            tr = read_truth_frame(truth, row)
            np.testing.assert_array_equal(tr["mask"], t.mask)
            assert tr["n_detectable"] == t.n_detectable
            for k in ("h", "k", "l", "panel", "ss", "fs", "photons", "detectable"):
                np.testing.assert_array_equal(tr["reflections"][k], t.reflections[k])
            assert np.all(refl["frame_index"][refl["frame"] == row] == i)
            pk = peaks[row]
            assert len(pk) == t.n_detectable
            np.testing.assert_allclose(pk.ss, t.reflections["ss"][t.detectable], atol=1e-3)
            np.testing.assert_allclose(pk.fs, t.reflections["fs"][t.detectable], atol=1e-3)
            np.testing.assert_array_equal(pk.panel, t.reflections["panel"][t.detectable])
    assert sorted(seen) == list(range(7))
    # a second run with the same config keeps the shards; a changed config rewrites them
    mtime = (out / "shard_00000.cxi").stat().st_mtime_ns
    again = run(cfg)
    assert again["frames_generated"] == 0 and (out / "shard_00000.cxi").stat().st_mtime_ns == mtime
    cfg.run.seed = 3
    assert run(cfg)["frames_generated"] == 7


def test_slab_layout_shard_reads_back_as_stack(tmp_path, small_geom):
    from peaknet.io.cxi import open_frames

    geom_file = tmp_path / "small.geom"
    geom_file.write_text(SMALL_GEOM)
    cfg = small_config()
    cfg.run.geometry = str(geom_file)
    cfg.run.frames = 2
    cfg.run.frame_layout = "slab"
    cfg.run.write_mask = False
    cfg.run.out = str(tmp_path / "slab")
    run(cfg)
    sim = Simulator(cfg)
    with open_frames(tmp_path / "slab" / "shard_00000.cxi", geometry=sim.geom) as src:
        assert src.layout == "slab" and src.frame_shape == sim.geom.slab_shape
        for i in range(2):
            np.testing.assert_array_equal(src.read(i, as_stack=True), sim.frame(i)[0])
    with h5py.File(tmp_path / "slab" / "shard_00000.truth.h5") as h:
        assert "mask" not in h and h["frames/n_mask_pixels"].shape == (2,)


def test_peak_density_follows_crystal(small_geom):
    """Bigger crystals (and a bigger cell) give more detectable peaks per hit."""

    def mean_detectable(**crystal):
        sim = Simulator(small_config(**crystal), small_geom)
        return np.mean([sim.frame(i)[1].n_detectable for i in range(8)])

    sparse = mean_detectable(size_um=(1.0, 1.5))
    crowded = mean_detectable(size_um=(6.0, 8.0))
    assert crowded > 2 * max(sparse, 1)
    big_cell = mean_detectable(size_um=(6.0, 8.0), system="orthorhombic", cell=(150.0, 160.0, 170.0, 90, 90, 90))
    assert big_cell > crowded
