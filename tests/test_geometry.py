"""CrystFEL geometry: parsing, bad input, layouts, lab maps, projection, shipped geometries,
and the real check against the peak resolutions CrystFEL wrote into a stream."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from peaknet.errors import GeometryError
from peaknet.io.geometry import (
    BUILTIN_GEOMETRIES,
    HC_EV_NM,
    Geometry,
    builtin_geometry_path,
    load_builtin_geometry,
    parse_geometry,
    parse_vector,
    write_geometry,
)
from realdata import real_data




def stream_text() -> str:
    return real_data("crystfel_5ht2b/test.stream").read_text()


def stream_geometry_text(text: str) -> str:
    begin, end = "----- Begin geometry file -----", "----- End geometry file -----"
    return text[text.index(begin) + len(begin) : text.index(end)]


@pytest.fixture(scope="module")
def cspad_stream_geom() -> Geometry:
    return parse_geometry(stream_geometry_text(stream_text()))


def small_geom(extra: str = "", panels: str | None = None) -> str:
    """Two 10 x 20 panels side by side in a 10 x 40 slab."""
    if panels is None:
        panels = """
p0/min_fs = 0
p0/max_fs = 19
p0/min_ss = 0
p0/max_ss = 9
p0/fs = +1.0x
p0/ss = -1.0y
p0/corner_x = -25
p0/corner_y = 5

p1/min_fs = 20
p1/max_fs = 39
p1/min_ss = 0
p1/max_ss = 9
p1/fs = +1.0x
p1/ss = -1.0y
p1/corner_x = 5
p1/corner_y = 5
"""
    return f"""; small test geometry
photon_energy = 9000
clen = 0.1
res = 10000
{extra}
{panels}
"""


# ============================================================================================
# parsing
# ============================================================================================
@pytest.mark.parametrize(
    "text, expected",
    [
        ("-0.0048x +0.99998y", (-0.0048, 0.99998, 0.0)),
        ("+0.000023x +1.000000y", (0.000023, 1.0, 0.0)),
        ("x", (1.0, 0.0, 0.0)),
        ("-y", (0.0, -1.0, 0.0)),
        ("0.5 x + 0.5 y", (0.5, 0.5, 0.0)),
        ("1e-3x -1y +0.01z", (0.001, -1.0, 0.01)),
        ("-1.0y+.5x", (0.5, -1.0, 0.0)),
    ],
)
def test_parse_vector_forms(text, expected):
    assert parse_vector(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["1.0a", "x x", "0x +0y", "1.0", "+-1x", "x1", "fs"])
def test_parse_vector_rejects(text):
    with pytest.raises(ValueError):
        parse_vector(text)


def test_stream_geometry_parses(cspad_stream_geom):
    g = cspad_stream_geom
    assert len(g.panels) == 64
    assert g.slab_shape == (1480, 1552)
    assert g.stack_shape == (32, 185, 388)
    assert g.clen == "/LCLS/detector0-EncoderValue" and g.clen_scale == 1e-3
    assert g.photon_energy == "/LCLS/photon_energy_eV" and g.photon_energy_eV is None
    assert g.peak_list == "/processing/hitfinder/peakinfo-raw"
    p = g.panels[g.panel_index("q0a0")]
    assert p.fs == pytest.approx((-0.005902, 0.999983, 0.0))
    assert (p.corner_x, p.corner_y, p.res, p.coffset) == pytest.approx(
        (449.314461, -28.273254, 9097.525473, 0.582)
    )
    assert (
        p.adu_per_eV == 0.00105
        and p.mask == "/data/data"
        and p.mask_good == 1
        and p.mask_bad == 0xFFFE
    )
    assert p.data == "/data/data"
    assert [r.name for r in g.bad_regions] == ["bad_thing", "bad_sparkly", "bad_squiggle"]
    assert g.bad_regions[0].kind == "xy" and g.bad_regions[0].min_x == -390
    assert g.rigid_groups["q0"][:2] == ["q0a0", "q0a1"] and len(g.rigid_groups) == 36
    assert g.rigid_group_collections["quadrants"] == ["q0", "q1", "q2", "q3"]
    assert p.mask_file == "/home/taw/experiments/5HT2B/r0092-ab/badpixelmap.h5"


def test_cspad_modules_follow_psana_order(cspad_stream_geom):
    g = cspad_stream_geom
    names = g.panel_names
    mod = g.module_of_panel
    off = g.panel_offsets
    for q in range(4):
        for s in range(8):
            for a in range(2):
                i = names.index(f"q{q}a{2 * s + a}")
                assert mod[i] == q * 8 + s
                assert tuple(off[i]) == (0, 194 * a)
    assert tuple(g.module_origins[9]) == (185, 388)  # q1, sensor 1


def test_path_str_and_text_inputs(tmp_path, cspad_stream_geom):
    text = stream_geometry_text(stream_text())
    f = tmp_path / "det.geom"
    f.write_text(text)
    for src in (f, str(f)):
        g = parse_geometry(src)
        assert g.source == str(f) and g.panels == cspad_stream_geom.panels
    assert Geometry.from_file(f).panels == cspad_stream_geom.panels
    with pytest.raises(GeometryError) as err:
        parse_geometry(tmp_path / "missing.geom")
    assert "missing.geom" in str(err.value)


def test_global_defaults_apply_to_panels_mentioned_later():
    text = small_geom(panels="""
p0/min_fs = 0
p0/max_fs = 19
p0/min_ss = 0
p0/max_ss = 9
p0/fs = x
p0/ss = -y
p0/corner_x = -25
p0/corner_y = 5
coffset = 0.002
adu_per_eV = 0.5
p1/min_fs = 20
p1/max_fs = 39
p1/min_ss = 0
p1/max_ss = 9
p1/fs = x
p1/ss = -y
p1/corner_x = 5
p1/corner_y = 5
p1/adu_per_eV = 0.25
""")
    g = parse_geometry(text)
    p0, p1 = g.panels
    assert (p0.coffset, p0.adu_per_eV) == (0.0, None)
    assert (p1.coffset, p1.adu_per_eV) == (0.002, 0.25)
    assert p0.res == p1.res == 10000 and p0.clen == p1.clen == 0.1


def test_group_defaults_and_rigid_groups():
    text = small_geom(
        extra="rigid_group_q0 = p0,p1\nrigid_group_collection_all = q0\nq0/coffset = 0.003\n"
        "q0/max_adu = 1000\np1/max_adu = 2000"
    )
    g = parse_geometry(text)
    assert [p.coffset for p in g.panels] == [0.003, 0.003]
    assert {p.name: p.max_adu for p in g.panels} == {"p0": 1000, "p1": 2000}
    assert g.rigid_groups == {"q0": ["p0", "p1"]} and g.rigid_group_collections == {"all": ["q0"]}
    assert g.panel_names == ["p1", "p0"]  # order of first mention (p1/max_adu comes first)


def test_units_and_paths():
    g = parse_geometry(
        small_geom()
        .replace("clen = 0.1", "clen = 95.3 mm")
        .replace("photon_energy = 9000", "photon_energy = 9.5 keV")
    )
    assert g.clen == pytest.approx(0.0953) and g.photon_energy_eV == pytest.approx(9500)
    g = parse_geometry(
        small_geom()
        .replace("clen = 0.1", "clen = /LCLS/detector_1/EncoderValue m")
        .replace("photon_energy = 9000", "wavelength = 1.3 A")
    )
    assert g.clen == "/LCLS/detector_1/EncoderValue" and g.clen_from_file_value(0.2) == 0.2
    assert g.photon_energy_eV == pytest.approx(HC_EV_NM / 0.13)
    g = parse_geometry(small_geom().replace("clen = 0.1", "clen = /LCLS/det"))
    assert g.clen_from_file_value(-430.0) == pytest.approx(-0.43)
    with pytest.raises(GeometryError, match="pass clen="):
        g.pixel_positions()
    assert np.isfinite(g.pixel_positions(clen=0.1)).all()
    assert g.with_values(clen=0.2).clen == 0.2


def test_unknown_keys_are_kept_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="peaknet.io.geometry"):
        g = parse_geometry(
            small_geom(extra="future_key = 7\np0/shiny = yes\np0/flag_morethan = 9000")
        )
    assert g.extra["future_key"] == "7"
    assert g.panels[0].extra == {"shiny": "yes", "flag_morethan": "9000"}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "future_key" in messages and "shiny" in messages and "flag_morethan" not in messages


# ============================================================================================
# bad input
# ============================================================================================
def _line_of(text: str, fragment: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if fragment in line:
            return number
    raise AssertionError(fragment)


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("p0/corner_x = left", "number"),
        ("p0/fs = 1.0a +0.5b", "direction vector"),
        ("p0/ss = 0x + 0y", "zero"),
        ("p0/min_fs = 1.5", "integer"),
        ("p0/max_fs = 40 7", "number"),
        ("this line has no equals sign", "key = value"),
        ("p0/res =", "key = value"),
        ("p0/no_index = maybe", "true"),
        ("p0/mask_good = 0xZZ", "bit mask"),
        ("clen = 0.1x", "clen must be a number or a data path"),
        ("photon_energy = lots", "photon_energy"),
        ("a/b/c = 1", "panel/key"),
        ("group_x/res = 1", "group"),
        ("badA/min_x = 3\nbadA/max_x = 2\nbadA/min_y = 0\nbadA/max_y = 1", "max_x < min_x"),
        ("badB/min_x = 3\nbadB/max_x = 4\nbadB/min_fs = 0\nbadB/max_y = 1", "mixes"),
        ("badC/min_fs = 0\nbadC/max_fs = 1\nbadC/min_ss = 0\nbadC/max_ss = 1", "lacks"),
        (
            "badD/min_fs = 0\nbadD/max_fs = 1\nbadD/min_ss = 0\nbadD/max_ss = 1\nbadD/color = red",
            "unknown key",
        ),
    ],
)
def test_malformed_line_names_the_line(bad_line, problem):
    text = small_geom() + bad_line + "\n"
    with pytest.raises(GeometryError) as err:
        parse_geometry(text)
    lines = [_line_of(text, line) for line in bad_line.splitlines()]
    assert err.value.field in {f"line {n}" for n in lines}, (err.value.field, lines)
    assert problem in err.value.problem
    assert err.value.path is None and "<memory>" in str(err.value)


def test_max_below_min_names_the_max_line():
    text = small_geom().replace("p1/max_ss = 9", "p1/max_ss = -3")
    with pytest.raises(GeometryError) as err:
        parse_geometry(text)
    assert err.value.field == f"line {_line_of(text, 'p1/max_ss')}"
    assert "max_ss" in err.value.problem and "min_ss" in err.value.problem


@pytest.mark.parametrize("key", ["min_fs", "max_ss", "fs", "ss", "corner_x", "corner_y"])
def test_missing_panel_key(key):
    text = "\n".join(
        line for line in small_geom().splitlines() if not line.startswith(f"p1/{key} ")
    )
    with pytest.raises(GeometryError) as err:
        parse_geometry(text)
    assert err.value.field == f"panel p1 {key}"
    assert key in err.value.problem


def test_missing_res_and_file_errors_name_the_file(tmp_path):
    f = tmp_path / "nores.geom"
    f.write_text(small_geom().replace("res = 10000", ""))
    with pytest.raises(GeometryError) as err:
        parse_geometry(f)
    assert err.value.path == str(f) and err.value.field == "panel p0 res"
    assert str(f) in str(err.value)


def test_overlapping_panels_rejected():
    text = small_geom().replace("p1/min_fs = 20", "p1/min_fs = 19")
    with pytest.raises(GeometryError, match="overlap"):
        parse_geometry(text)


def test_no_panels_and_unknown_bad_region_panel():
    with pytest.raises(GeometryError, match="no panels"):
        parse_geometry("clen = 0.1\nres = 100\n")
    text = small_geom(
        extra="badq/min_fs = 0\nbadq/max_fs = 1\nbadq/min_ss = 0\nbadq/max_ss = 1\n"
        "badq/panel = nope"
    )
    with pytest.raises(GeometryError, match="unknown panel"):
        parse_geometry(text)


# ============================================================================================
# layouts and coordinates
# ============================================================================================
def test_slab_stack_roundtrip_with_batch(cspad_stream_geom):
    g = cspad_stream_geom
    rng = np.random.default_rng(0)
    slab = rng.normal(size=(2, 3) + g.slab_shape).astype(np.float32)
    stack = g.slab_to_stack(slab)
    assert stack.shape == (2, 3, 32, 185, 388) and stack.dtype == np.float32
    assert np.array_equal(g.stack_to_slab(stack), slab)
    # psana order: module 9 = quadrant 1, sensor 1 at slab rows 185.., columns 388..
    assert np.array_equal(stack[0, 0, 9], slab[0, 0, 185:370, 388:776])
    with pytest.raises(ValueError):
        g.slab_to_stack(np.zeros((10, 10)))


def test_coordinate_roundtrip(cspad_stream_geom):
    g = cspad_stream_geom
    rng = np.random.default_rng(1)
    panel = rng.integers(0, 32, 500)
    ss = rng.uniform(-0.49, 184.49, 500)
    fs = rng.uniform(-0.49, 387.49, 500)
    s_ss, s_fs = g.stack_to_slab_coords(panel, ss, fs)
    back = g.slab_to_stack_coords(s_ss, s_fs)
    assert np.array_equal(back[0], panel)
    assert np.allclose(back[1], ss) and np.allclose(back[2], fs)
    p, lss, lfs = g.slab_to_stack_coords([-5.0, 10.0], [3.0, 2000.0])
    assert list(p) == [-1, -1] and np.isnan(lss).all() and np.isnan(lfs).all()
    by_name = g.slab_to_stack_coords_by_name(["q1a3"], [200.0], [590.0])
    assert (
        by_name[0][0] == 9
        and by_name[1][0] == pytest.approx(15.0)
        and by_name[2][0] == pytest.approx(202.0)
    )
    with pytest.raises(KeyError):
        g.slab_to_stack_coords_by_name(["zz"], [0.0], [0.0])
    assert list(g.raw_panel_at_slab([0.0, 0.0], [193.4, 193.6])) == [0, 1]


def test_pixel_positions_follow_crystfel_convention(cspad_stream_geom):
    g = cspad_stream_geom
    pos = g.pixel_positions(clen=-0.43)
    p = g.panels[g.panel_index("q0a1")]
    fs, ss = 10, 7  # panel pixel; centre at +0.5 in CrystFEL's corner convention
    x = (p.corner_x + (fs + 0.5) * p.fs[0] + (ss + 0.5) * p.ss[0]) / p.res
    y = (p.corner_y + (fs + 0.5) * p.fs[1] + (ss + 0.5) * p.ss[1]) / p.res
    assert pos[0, ss, 194 + fs] == pytest.approx([x, y, -0.43 + 0.582])
    radius = g.radius_map()
    assert radius[0, ss, 194 + fs] == pytest.approx(np.hypot(x, y) * p.res)
    assert np.isfinite(pos).all() and 40 < np.nanmin(radius) < 60 and np.nanmax(radius) < 1200


def test_resolution_and_two_theta(cspad_stream_geom):
    g = cspad_stream_geom
    res = g.resolution_map(photon_energy_eV=9500, clen=-0.43)
    two_theta = g.two_theta_map(clen=-0.43)
    np.testing.assert_allclose(res, 2 * np.sin(two_theta / 2) / (HC_EV_NM / 9500), rtol=1e-12)
    with pytest.raises(GeometryError, match="photon_energy"):
        g.resolution_map(clen=-0.43)
    at = g.resolution_at([3, 3], [10.0, 10.4], [20.0, 20.0], photon_energy_eV=9500, clen=-0.43)
    assert at[0] == pytest.approx(res[3, 10, 20])
    assert at[1] != at[0]


def test_good_pixel_mask():
    extra = (
        "badA/min_fs = 22\nbadA/max_fs = 23\nbadA/min_ss = 4\nbadA/max_ss = 100\nbadA/panel = p1\n"
        "badB/min_x = -25\nbadB/max_x = -23\nbadB/min_y = -10\nbadB/max_y = 10\n"
        "p0/mask_edge_pixels = 1"
    )
    g = parse_geometry(small_geom(extra=extra))
    m = g.good_pixel_mask()
    assert m.shape == (2, 10, 20)
    assert not m[1, 4:, 2:4].any() and m[1, :4, 2:4].all() and m[1, :, 4:-1].all()
    # p0: edge pixels off, lab x in [-25, -23] (pixel centres -24.5, -23.5) off
    assert not m[0, 0].any() and not m[0, :, :2].any() and m[0, 1:-1, 2:-1].all()
    g = parse_geometry(small_geom(extra="p1/no_index = 1"))
    m1 = g.module_of_panel[g.panel_index("p1")]
    assert not g.good_pixel_mask()[m1].any() and g.good_pixel_mask()[1 - m1].all()


def test_stream_bad_regions_mask_pixels(cspad_stream_geom):
    g = cspad_stream_geom
    m = g.good_pixel_mask()
    radius = g.radius_map()
    assert 0.95 < m.mean() < 1.0 and np.isfinite(radius[~m]).all()


def test_asic_geometries_group_into_modules():
    """64 Jungfrau ASICs of 256 x 256 in a 4096 x 1024 slab form (8, 512, 1024)."""
    lines = ["clen = 0.1", "res = 13333.3", "photon_energy = 12000"]
    for m in range(8):
        for a in range(8):
            r, c = divmod(a, 4)
            name = f"m{m}a{a}"
            lines += [
                f"{name}/min_ss = {512 * m + 256 * r}",
                f"{name}/max_ss = {512 * m + 256 * r + 255}",
                f"{name}/min_fs = {256 * c}",
                f"{name}/max_fs = {256 * c + 255}",
                f"{name}/fs = x",
                f"{name}/ss = -y",
                f"{name}/corner_x = {258 * c - 520}",
                f"{name}/corner_y = {1100 - 550 * m - 258 * r}",
            ]
    g = parse_geometry("\n".join(lines))
    assert g.stack_shape == (8, 512, 1024)
    assert list(g.module_of_panel[:9]) == [0] * 8 + [1]
    assert tuple(g.panel_offsets[5]) == (256, 256)
    g1 = parse_geometry("\n".join(lines), module_shape=(256, 256))
    assert g1.stack_shape == (64, 256, 256)


def test_per_dataset_layout():
    """AGIPD-style panels in one dataset each (fixed dim1) stack one module per dataset."""
    lines = ["clen = 0.1", "res = 5000", "dim0 = %", "dim2 = ss", "dim3 = fs"]
    for m in range(4):
        for a in range(2):
            n = f"p{m}a{a}"
            lines += [
                f"{n}/dim1 = {m}",
                f"{n}/min_ss = {64 * a}",
                f"{n}/max_ss = {64 * a + 63}",
                f"{n}/min_fs = 0",
                f"{n}/max_fs = 127",
                f"{n}/fs = x",
                f"{n}/ss = -y",
                f"{n}/corner_x = {140 * m}",
                f"{n}/corner_y = {-70 * a}",
            ]
    g = parse_geometry("\n".join(lines))
    assert g.stack_shape == (4, 128, 128) and g.slab_shape == (512, 128)
    assert g.panels[3].dims == {0: "%", 1: "1", 2: "ss", 3: "fs"}


def test_write_roundtrip(tmp_path, cspad_stream_geom):
    for geom in [cspad_stream_geom] + [load_builtin_geometry(n) for n in BUILTIN_GEOMETRIES]:
        f = tmp_path / "out.geom"
        write_geometry(geom, f)
        back = parse_geometry(f)
        assert back.panels == geom.panels
        assert back.bad_regions == geom.bad_regions
        assert (back.photon_energy, back.clen_scale, back.peak_list) == (
            geom.photon_energy,
            geom.clen_scale,
            geom.peak_list,
        )
        assert back.rigid_groups == geom.rigid_groups and back.stack_shape == geom.stack_shape


# ============================================================================================
# projection and assembly
# ============================================================================================
@pytest.mark.parametrize("name", BUILTIN_GEOMETRIES)
def test_project_inverts_lab_positions(name):
    g = load_builtin_geometry(name)
    P, H, W = g.stack_shape
    rng = np.random.default_rng(2)
    panel = rng.integers(0, P, 2000)
    ss = rng.integers(0, H, 2000) + rng.uniform(-0.45, 0.45, 2000)  # inside a pixel
    fs = rng.integers(0, W, 2000) + rng.uniform(-0.45, 0.45, 2000)
    pos = g.lab_positions(panel, ss, fs)
    assert np.isfinite(pos).all()
    scale = rng.uniform(0.5, 3.0, (2000, 1))  # any ray length
    p2, ss2, fs2, ok = g.project(pos * scale)
    assert ok.all() and np.array_equal(p2, panel)
    assert np.allclose(ss2, ss, atol=1e-6) and np.allclose(fs2, fs, atol=1e-6)
    p3, ss3, fs3, ok3 = g.project(-pos)  # rays going backwards never hit
    assert not ok3.any() and (p3 == -1).all() and np.isnan(ss3).all()


def test_assemble_places_pixels(cspad_stream_geom):
    g = cspad_stream_geom.with_values(clen=0.15)
    stack = np.arange(np.prod(g.stack_shape), dtype=np.float64).reshape(g.stack_shape)
    img, index = g.assemble(np.stack([stack, -stack]))
    assert img.shape == (2,) + index.shape
    m, s, f = 12, 100, 300
    assert img[0, index.rows[m, s, f], index.cols[m, s, f]] == stack[m, s, f]
    assert img[1, index.rows[m, s, f], index.cols[m, s, f]] == -stack[m, s, f]
    # the beam pixel is in the central hole; ~ (1 - fill factor) of the image is NaN
    assert np.isnan(img[0][index.beam])
    pos = g.pixel_positions()
    ps = index.pixel_size
    assert index.cols[m, s, f] - index.beam[1] == np.rint(pos[m, s, f, 0] / ps)
    assert index.beam[0] - index.rows[m, s, f] == np.rint(pos[m, s, f, 1] / ps)
    small, idx2 = g.assemble(stack.astype(np.int32), pixel_size=2 * ps, fill=-1)
    assert small.dtype == np.int32 and small.shape[0] < index.shape[0] // 2 + 2


# ============================================================================================
# shipped geometries
# ============================================================================================
EXPECTED = {
    "cspad": ((1480, 1552), (32, 185, 388), 110e-6),
    "epix10ka2m": ((16 * 352, 384), (16, 352, 384), 100e-6),
    "jungfrau4m": ((8 * 512, 1024), (8, 512, 1024), 75e-6),
}


def _module_outline(pos_m: np.ndarray) -> np.ndarray:
    """(4, 2) lab x/y corners of a module from its pixel-centre positions (half a pixel out)."""
    c = pos_m[[0, 0, -1, -1], [0, -1, -1, 0], :2]
    centre = c.mean(0)
    step = np.linalg.norm(pos_m[0, 1, :2] - pos_m[0, 0, :2])
    return centre + (c - centre) * (1 + step / np.linalg.norm(c - centre, axis=1, keepdims=True))


def _separated(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test for two convex quadrilaterals."""
    for poly in (a, b):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() <= pb.min() or pb.max() <= pa.min():
                return True
    return False


@pytest.mark.parametrize("name", BUILTIN_GEOMETRIES)
def test_builtin_geometry(name):
    assert builtin_geometry_path(name).is_file()
    g = load_builtin_geometry(name)
    slab, stack, pixel = EXPECTED[name]
    assert g.slab_shape == slab and g.stack_shape == stack
    assert all(p.res == pytest.approx(1 / pixel, rel=1e-6) for p in g.panels)
    assert isinstance(g.clen, float) and 0.05 < g.clen < 0.2 and 8000 < g.photon_energy_eV < 13000
    pos = g.pixel_positions()
    assert np.isfinite(pos).all()
    # modules do not overlap as seen along the beam (raw ASICs for CSPAD)
    outlines = [_module_outline(pos[m, :, s : s + w]) for m, s, w in _outline_blocks(g)]
    for i in range(len(outlines)):
        for j in range(i + 1, len(outlines)):
            assert _separated(outlines[i], outlines[j]), (name, i, j)
    # the direct beam passes through the central hole
    _, _, _, hit = g.project([[0.0, 0.0, 1.0]])
    assert not hit[0]
    radius = g.radius_map()
    assert 20 < radius.min() < 60 and 1000 < radius.max() < 1600
    res = g.resolution_map()
    assert 0.1 < res.min() < 0.5 and 5 < res.max() < 8  # 1/d nm^-1: ~20 A to ~1.5 A
    assert g.good_pixel_mask().all()


def _outline_blocks(g):
    """(module, first column, width) of each raw panel, for outlines of flat rectangles."""
    out = []
    for i, p in enumerate(g.panels):
        out.append((g.module_of_panel[i], g.panel_offsets[i][1], p.width))
    return out


def test_builtin_unknown_name():
    with pytest.raises(KeyError):
        builtin_geometry_path("pilatus")


# ============================================================================================
# REAL CHECK: 1/d of every peak in the CrystFEL stream
# ============================================================================================
def _chunks(text: str):
    for chunk in text.split("----- Begin chunk -----")[1:]:
        energy = float(re.search(r"^photon_energy_eV = (\S+)", chunk, re.M).group(1))
        encoder = re.search(r"^hdf5/LCLS/detector0-EncoderValue = (\S+)", chunk, re.M)
        block = re.search(
            r"Peaks from peak search\n[^\n]*\n(.*?)End of peak list", chunk, re.S
        ).group(1)
        rows = [line.split() for line in block.strip().splitlines() if line.strip()]
        shift = re.search(r"det_shift x = (\S+) y = (\S+) mm", chunk)
        yield energy, float(encoder.group(1)), rows, shift


def test_stream_peak_resolutions_match_crystfel(cspad_stream_geom):
    """For every found peak in the stream, 1/d from our geometry matches CrystFEL's column.

    Conventions: stream fs/ss are slab coordinates with pixel corners on integers (subtract
    0.5 for peaknet); clen = EncoderValue (mm, from the chunk's hdf5/... line) + coffset;
    the chunk's photon_energy_eV sets lambda. CrystFEL printed 1/d after refining the detector
    position for indexed chunks (``predict_refine/det_shift``): the raw geometry matches to
    0.01 nm^-1 everywhere, and to the printed rounding (0.005) once the shift is applied.
    """
    g = cspad_stream_geom
    raw_dev, shifted_dev, n = [], [], 0
    for energy, encoder, rows, shift in _chunks(stream_text()):
        fs = np.array([float(r[0]) for r in rows])
        ss = np.array([float(r[1]) for r in rows])
        expected = np.array([float(r[2]) for r in rows])
        names = [r[4] for r in rows]
        module, lss, lfs = g.slab_to_stack_coords(ss - 0.5, fs - 0.5)
        assert (module >= 0).all()
        assert [g.panel_names[i] for i in g.raw_panel_at_slab(ss - 0.5, fs - 0.5)] == names
        clen = g.clen_from_file_value(encoder)
        got = g.resolution_at(module, lss, lfs, photon_energy_eV=energy, clen=clen)
        raw_dev.append(got - expected)
        pos = g.lab_positions(module, lss, lfs, clen=clen)
        if shift is not None:
            pos[:, :2] += np.array([float(shift.group(1)), float(shift.group(2))]) * 1e-3
        two_theta = np.arctan2(np.hypot(pos[:, 0], pos[:, 1]), pos[:, 2])
        shifted_dev.append(2 * np.sin(two_theta / 2) / (HC_EV_NM / energy) - expected)
        n += len(rows)
    raw = np.abs(np.concatenate(raw_dev))
    shifted = np.abs(np.concatenate(shifted_dev))
    print(
        f"\n{n} peaks: max |1/d - stream| = {raw.max():.4f} nm^-1 "
        f"(rms {np.sqrt((raw ** 2).mean()):.4f}); "
        f"with det_shift: max {shifted.max():.4f}, {np.mean(shifted <= 0.0051):.1%} within rounding"
    )
    assert n > 2000
    assert raw.max() < 0.01
    assert np.sqrt((raw**2).mean()) < 0.0035  # ~ the 0.0029 of uniform rounding to 0.01
    assert np.mean(shifted <= 0.0051) > 0.98
