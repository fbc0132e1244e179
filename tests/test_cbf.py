"""CBF reading: the real LCLS CSPAD thermolysin stills, their metrology checked against
physics (DIALS-indexed spots on bright pixels, 1/d of indexed spots vs the unit cell, the
CrystFEL CSPAD geometry of another experiment) and bad files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycbf")

from peaknet.errors import DataError  # noqa: E402
from peaknet.io.cbf import CBFFrame, cbf_asic_to_stack, read_cbf  # noqa: E402
from peaknet.io.geometry import parse_geometry  # noqa: E402
from realdata import real_data

FRAMES = [
    "idx-20130301060858401.cbf",
    "idx-20130301060858601.cbf",
    "idx-20130301060858701.cbf",
    "idx-20130301060858801.cbf",
]
WAVELENGTH_A = 1.2726  # per frame 1.27092 .. 1.27261 (header of each file)
CELL_A, CELL_C = 93.4, 131.0  # thermolysin P6(1)22 as refined by DIALS




@pytest.fixture(scope="module")
def frames() -> dict[str, CBFFrame]:
    return {name: read_cbf(real_data(f"thermolysin_cspad/{name}")) for name in FRAMES}


@pytest.fixture(scope="module")
def spots() -> list[dict]:
    with open(real_data("thermolysin_cspad/dials_indexed_spots.csv")) as fh:
        return list(csv.DictReader(fh))


def test_read_frames(frames):
    for name, frame in frames.items():
        assert frame.stack.shape == (32, 185, 388) and frame.stack.dtype == np.int32
        assert frame.wavelength_A == pytest.approx(WAVELENGTH_A, abs=2e-3)
        assert frame.photon_energy_eV == pytest.approx(12398.42 / frame.wavelength_A, rel=1e-5)
        assert 0.125 < frame.distance_m < 0.135
        g = frame.geometry
        assert (
            len(g.panels) == 64 and g.slab_shape == (1480, 1552) and g.stack_shape == (32, 185, 388)
        )
        assert g.photon_energy_eV == pytest.approx(frame.photon_energy_eV)
        assert frame.slab.shape == (1480, 1552)
        assert np.array_equal(g.slab_to_stack(frame.slab), frame.stack)
        assert frame.stack.max() > 1000 and np.median(frame.stack) < 100
        assert g.source == frame.path and name in frame.path


def test_metrology_layout(frames):
    g = frames[FRAMES[0]].geometry
    # ASIC k of the file is module k // 2, fast-scan offset 194 (k % 2): cbf_asic_to_stack's map
    assert list(g.module_of_panel) == [k // 2 for k in range(64)]
    assert [int(o[1]) for o in g.panel_offsets] == [194 * (k % 2) for k in range(64)]
    pixel = 1 / g.panels[0].res
    assert pixel == pytest.approx(0.10992e-3)
    # ASICs of one sensor are parallel, 3 pixels apart in the lab (194 + 3 between corners)
    a0, a1 = g.panels[0], g.panels[1]
    assert np.dot(a0.fs, a1.fs) == pytest.approx(1, abs=1e-9)
    gap = np.hypot(a1.corner_x - a0.corner_x, a1.corner_y - a0.corner_y)
    assert gap == pytest.approx(197, abs=0.5)
    # the beam passes through the central hole
    _, _, _, hit = g.project([[0.0, 0.0, 1.0]])
    assert not hit[0]
    radius = g.radius_map()
    assert 30 < radius.min() < 60 and radius.max() < 1250


def test_metrology_matches_crystfel_cspad_geometry(frames):
    """The CBF metrology (converted from imgCIF to CrystFEL axes) orients and places every
    ASIC like the CrystFEL CSPAD geometry of another LCLS experiment (5-HT2B stream)."""
    text = real_data("crystfel_5ht2b/test.stream").read_text()
    begin, end = "----- Begin geometry file -----", "----- End geometry file -----"
    crystfel = parse_geometry(text[text.index(begin) + len(begin) : text.index(end)])
    cbf = frames[FRAMES[0]].geometry
    for a, b in zip(crystfel.panels, cbf.panels):
        assert (a.name, a.min_fs, a.min_ss) == (b.name, b.min_fs, b.min_ss)
        assert np.dot(a.fs, b.fs) > 0.999 and np.dot(a.ss, b.ss) > 0.999
        assert np.hypot(a.corner_x - b.corner_x, a.corner_y - b.corner_y) < 20


def test_metrology_writes_as_crystfel_geometry(frames, tmp_path):
    g = frames[FRAMES[0]].geometry
    back = parse_geometry(g.to_text())
    assert back.panels == g.panels and back.photon_energy_eV == g.photon_energy_eV
    assert back.stack_shape == (32, 185, 388)


def _spot_table(spots, image):
    rows = [r for r in spots if r["image"] == image]
    get = lambda key, t=float: np.array([t(r[key]) for r in rows])  # noqa: E731
    return (
        get("panel64", int),
        get("fs_px"),
        get("ss_px"),
        get("h", int),
        get("k", int),
        get("l", int),
    )


def _bright_fraction(stack, module, ss, fs, nsigma=5.0):
    """Fraction of positions whose 5 x 5 neighbourhood peaks > nsigma robust sigmas above
    the module median."""
    data = stack.astype(np.float64)
    med = np.median(data, axis=(1, 2))
    sigma = 1.4826 * np.median(np.abs(data - med[:, None, None]), axis=(1, 2))
    bright = 0
    for m, s, f in zip(module, np.rint(ss).astype(int), np.rint(fs).astype(int)):
        window = data[m, max(s - 2, 0) : s + 3, max(f - 2, 0) : f + 3]
        bright += window.max() > med[m] + nsigma * sigma[m]
    return bright / len(module)


def test_dials_spots_land_on_bright_pixels(frames, spots):
    images = sorted({r["image"] for r in spots})
    assert len(images) == 3
    for image in images:
        p64, fs, ss, *_ = _spot_table(spots, image)
        module, lss, lfs = cbf_asic_to_stack(p64, fs, ss)
        stack = frames[image].stack
        assert _bright_fraction(stack, module, lss, lfs) > 0.9
        # controls: the same spots moved 40 rows, or onto the other ASIC of the sensor
        assert _bright_fraction(stack, module, np.clip(lss + 40, 0, 184), lfs) < 0.5
        assert _bright_fraction(stack, module, lss, (lfs + 194) % 388) < 0.5
        # the brightest pixel of a 3 x 3 box sits on the spot's pixel on average
        offsets = []
        for m, s, f in zip(module, np.rint(lss).astype(int), np.rint(lfs).astype(int)):
            box = stack[m, s - 1 : s + 2, f - 1 : f + 2]
            if box.shape == (3, 3):
                offsets.append(np.subtract(np.unravel_index(box.argmax(), box.shape), 1))
        assert np.abs(np.mean(offsets, axis=0)).max() < 0.2


def test_indexed_spot_resolution_matches_unit_cell(frames, spots):
    """1/d from the CBF metrology (distance, wavelength, panel positions) vs 1/d of the
    spot's Miller index in the hexagonal cell: agreement to well under 1%."""
    for image in sorted({r["image"] for r in spots}):
        p64, fs, ss, h, k, l = _spot_table(spots, image)
        module, lss, lfs = cbf_asic_to_stack(p64, fs, ss)
        measured = frames[image].geometry.resolution_at(module, lss, lfs)
        d_star = 10 * np.sqrt(4 / 3 * (h * h + h * k + k * k) / CELL_A**2 + l * l / CELL_C**2)
        rel = measured / d_star - 1
        assert abs(np.median(rel)) < 0.002 and np.abs(rel).max() < 0.01


def test_cbf_asic_to_stack():
    m, ss, fs = cbf_asic_to_stack([0, 1, 63], [0.5, 0.5, 193.5], [10.5, 10.5, 184.5])
    assert list(m) == [0, 0, 31]
    assert list(fs) == [0.0, 194.0, 193.0 + 194] and list(ss) == [10.0, 10.0, 184.0]
    with pytest.raises(ValueError):
        cbf_asic_to_stack([64], [0.0], [0.0])


# ============================================================================================
# bad files
# ============================================================================================
@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    return real_data(f"thermolysin_cspad/{FRAMES[0]}").read_bytes()


@pytest.mark.parametrize(
    "damage", ["truncated_binary", "truncated_header", "corrupt", "garbage", "empty", "bad_size"]
)
def test_bad_cbf_raises_data_error(tmp_path, good_bytes, damage):
    data = {
        "truncated_binary": good_bytes[:1_000_000],
        "truncated_header": good_bytes[:30_000],
        "corrupt": good_bytes[:200_000]
        + bytes(b ^ 0x5A for b in good_bytes[200_000:200_064])
        + good_bytes[200_064:],
        "garbage": b"this is not a CBF file\n" * 20,
        "empty": b"",
        "bad_size": good_bytes.replace(b"X-Binary-Size: 425368", b"X-Binary-Size: 9999999", 1),
    }[damage]
    path = tmp_path / f"{damage}.cbf"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        read_cbf(path)
    assert err.value.path == str(path) and str(path) in str(err.value)
    if damage in ("truncated_binary", "corrupt", "bad_size"):
        assert err.value.field.startswith("binary section")


def test_missing_cbf(tmp_path):
    with pytest.raises(DataError, match="no such file") as err:
        read_cbf(tmp_path / "nope.cbf")
    assert err.value.path == str(tmp_path / "nope.cbf")
