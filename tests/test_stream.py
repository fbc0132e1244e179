"""CrystFEL stream reader (peaknet.io.stream) on the real 5-HT2B stream and on broken copies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peaknet.errors import StreamError
from peaknet.io.stream import StreamReader, read_stream


def real_data(rel: str) -> Path:
    """A file of shared/data/real (beside the checkout, or inside it on CI machines)."""
    root = Path(__file__).resolve().parents[1]
    for base in (root / "shared", root.parent / "shared"):
        if (base / "data/real" / rel).exists():
            return base / "data/real" / rel
    pytest.skip(f"real data {rel} not available")


@pytest.fixture(scope="module")
def stream_path() -> Path:
    return real_data("crystfel_5ht2b/test.stream")


@pytest.fixture(scope="module")
def chunks(stream_path):
    return read_stream(stream_path, geometry=False)


def count_by_scanning(path: Path) -> list[dict]:
    """Independent grep-like count per chunk: peak rows, and reflection rows per crystal."""
    out, cur, block = [], None, None
    for line in path.read_text().splitlines():
        s = line.strip()
        if s == "----- Begin chunk -----":
            cur = {"peaks": 0, "refl": [], "first_peak": None}
        elif s == "----- End chunk -----":
            out.append(cur)
            cur = None
        elif cur is None:
            continue
        elif s == "Peaks from peak search":
            block = "peaks-header"
        elif s == "Reflections measured after indexing":
            cur["refl"].append(0)
            block = "refl-header"
        elif s in ("End of peak list", "End of reflections"):
            block = None
        elif block in ("peaks-header", "refl-header"):
            block = block.split("-")[0]  # skip the column header line
        elif block == "peaks":
            cur["peaks"] += 1
            cur["first_peak"] = cur["first_peak"] or s.split()
        elif block == "refl":
            cur["refl"][-1] += 1
    return out


def test_header(stream_path):
    r = StreamReader(stream_path, geometry=False)
    assert r.format_version == "2.3"
    assert r.generated_by.startswith("CrystFEL 0.9.1")
    assert "indexamajig" in r.command_line
    assert r.geometry_text.startswith("adu_per_eV = 0.00105")
    assert "q3a15/corner_y" in r.geometry_text
    assert r.target_cell == {
        "lattice_type": "orthorhombic", "centering": "C", "a": 61.4, "b": 122.6, "c": 168.0,
        "al": 90.0, "be": 90.0, "ga": 90.0,
    }


def test_counts_exactly_as_in_file(stream_path, chunks):
    expect = count_by_scanning(stream_path)
    assert len(chunks) == len(expect) == 70
    assert sum(c.indexed for c in chunks) == 32
    for c, e in zip(chunks, expect):
        assert len(c.peaks) == e["peaks"] == c.num_peaks
        assert [len(cr.reflections) for cr in c.crystals] == e["refl"]
        assert [cr.num_reflections for cr in c.crystals] == e["refl"]
        assert c.indexed == (c.indexed_by != "none")
        if e["first_peak"]:
            fs, ss, d, inten, panel = e["first_peak"]
            assert (c.peaks.fs[0], c.peaks.ss[0], c.peaks.one_over_d[0]) == (
                float(fs), float(ss), float(d))
            assert (c.peaks.intensity[0], c.peaks.panel[0]) == (float(inten), panel)
    assert sum(len(c.peaks) for c in chunks) == sum(e["peaks"] for e in expect)


def test_first_chunk_values(chunks):
    c = chunks[0]
    assert c.filename == "r0092-ab/data1/LCLS_2013_Mar22_r0092_035103_1824f.h5"
    assert c.serial == 1 and c.hit is True and c.event is None
    assert c.indexed_by == "xgandalf-nolatt-cell" and c.n_indexing_tries == 1
    assert c.photon_energy_eV == pytest.approx(9511.868397)
    assert c.headers["hdf5/LCLS/detector0-EncoderValue"] == "-429.998810"
    assert c.event_id == c.filename
    cr = c.crystals[0]
    assert cr.cell == pytest.approx((6.13532, 12.19726, 16.88163, 90.54524, 91.23016, 90.53769))
    np.testing.assert_allclose(cr.astar, [0.0706577, -0.1444151, 0.0270631])
    np.testing.assert_allclose(cr.cstar, [0.0296121, 0.0034501, -0.0512061])
    assert (cr.lattice_type, cr.centering, cr.unique_axis) == ("orthorhombic", "C", "?")
    assert cr.profile_radius == pytest.approx(0.00258)
    assert cr.resolution_limit == pytest.approx(1.80)
    assert cr.det_shift_mm == (0.022, -0.009)
    r = cr.reflections
    assert (r.h[0], r.k[0], r.l[0]) == (-28, 10, 5)
    assert (r.intensity[0], r.sigma[0]) == (185.09, 155.78)
    assert (r.peak[0], r.background[0]) == (217.0, 64.71)
    assert (r.fs[0], r.ss[0], r.panel[0]) == (634.8, 1057.6, "q1a11")
    assert r.h.dtype == np.int32


def test_iterates_lazily_and_repeatably(stream_path):
    r = StreamReader(stream_path, geometry=False)
    it = iter(r)
    first = next(it)
    assert first.serial == 1 and first.line > 600
    assert sum(1 for _ in r) == 70  # a fresh pass from the first chunk


def test_module_coordinates_with_geometry(stream_path):
    pytest.importorskip("peaknet.io.geometry")
    r = StreamReader(stream_path)
    geom = r.geometry
    n_panels = geom.stack_shape[0]
    for chunk in r:
        pl = chunk.peak_list
        assert len(pl) == len(chunk.peaks)
        assert pl.panel.min(initial=0) >= 0 and pl.panel.max(initial=0) < n_panels
        # back to the slab: stream position = slab centre + 0.5
        ss, fs = geom.stack_to_slab_coords(pl.panel, pl.ss, pl.fs)
        np.testing.assert_allclose(ss + 0.5, chunk.peaks.ss, atol=1e-3)
        np.testing.assert_allclose(fs + 0.5, chunk.peaks.fs, atol=1e-3)
        for cr in chunk.crystals:
            assert len(cr.predicted) == len(cr.reflections)
            ss, fs = geom.stack_to_slab_coords(cr.predicted.panel, cr.predicted.ss,
                                               cr.predicted.fs)
            np.testing.assert_allclose(fs + 0.5, cr.reflections.fs, atol=1e-3)


# ------------------------------------------------------------------------------ malformed
def broken_copy(tmp_path, stream_path, edit) -> tuple[Path, int]:
    """Write a copy of the stream with ``edit(lines) -> 1-based line number`` applied."""
    lines = stream_path.read_text().splitlines(keepends=True)
    line_no = edit(lines)
    out = tmp_path / "broken.stream"
    out.write_text("".join(lines))
    return out, line_no


def index_of(lines, text, nth=0) -> int:
    hits = [i for i, ln in enumerate(lines) if ln.strip() == text]
    return hits[nth]


def expect_stream_error(path, match) -> StreamError:
    with pytest.raises(StreamError, match=match) as info:
        for _ in StreamReader(path, geometry=False):
            pass
    assert info.value.path == str(path)
    assert info.value.field.startswith("line ")
    return info.value


@pytest.mark.parametrize("keep,message", [
    (8, "file ends inside the chunk that begins at line {begin}"),
    (20, "file ends inside the peak list"),
])
def test_truncated_chunk(tmp_path, stream_path, keep, message):
    def edit(lines):
        begin = index_of(lines, "----- Begin chunk -----", 69)
        del lines[begin + keep:]
        return begin + 1

    path, begin = broken_copy(tmp_path, stream_path, edit)
    err = expect_stream_error(path, message.format(begin=begin))
    assert err.field == f"line {begin + keep - 1}"  # the last line of the file
    assert str(path) in str(err)


def test_non_numeric_peak_row(tmp_path, stream_path):
    def edit(lines):
        i = index_of(lines, "Peaks from peak search", 3) + 3
        lines[i] = lines[i].replace(".", "x", 1)
        return i + 1

    path, line_no = broken_copy(tmp_path, stream_path, edit)
    err = expect_stream_error(path, "peak list row is not numeric")
    assert err.field == f"line {line_no}"


def test_bad_reflection_row(tmp_path, stream_path):
    def edit(lines):
        i = index_of(lines, "Reflections measured after indexing", 2) + 5
        lines[i] = " 1 2\n"
        return i + 1

    path, line_no = broken_copy(tmp_path, stream_path, edit)
    assert expect_stream_error(path, "reflection list row has 2 fields").field == f"line {line_no}"


def test_missing_end_chunk(tmp_path, stream_path):
    def edit(lines):
        i = index_of(lines, "----- End chunk -----", 10)
        del lines[i]
        return i + 1  # the next Begin chunk moves up to this line

    path, line_no = broken_copy(tmp_path, stream_path, edit)
    err = expect_stream_error(path, "a new chunk begins inside the chunk")
    assert err.field == f"line {line_no}"


def test_missing_end_of_peak_list(tmp_path, stream_path):
    def edit(lines):
        i = index_of(lines, "End of peak list", 5)
        del lines[i]
        return i + 1

    path, line_no = broken_copy(tmp_path, stream_path, edit)
    err = expect_stream_error(path, "missing 'End of peak list'")
    assert err.field == f"line {line_no}"


def test_missing_end_crystal(tmp_path, stream_path):
    def edit(lines):
        i = index_of(lines, "--- End crystal", 0)
        del lines[i]
        return i + 1

    path, line_no = broken_copy(tmp_path, stream_path, edit)
    assert expect_stream_error(path, "missing '--- End crystal'").field == f"line {line_no}"


def test_unterminated_geometry(tmp_path, stream_path):
    path, _ = broken_copy(
        tmp_path, stream_path, lambda lines: lines.remove("----- End geometry file -----\n")
    )
    with pytest.raises(StreamError, match="inside the geometry file that begins at line 5"):
        StreamReader(path)


def test_missing_file(tmp_path):
    with pytest.raises(StreamError, match="does not exist"):
        StreamReader(tmp_path / "none.stream")


SMALL_STREAM = """CrystFEL stream format 2.3
Generated by CrystFEL 0.10.2
indexamajig -i files.lst -o small.stream -g det.geom
----- Begin geometry file -----
p0/min_fs = 0
----- End geometry file -----
----- Begin chunk -----
Image filename: run7.cxi
Event: //3
Image serial number: 4
hit = 1
indexed_by = mosflm-latt-nocell
n_indexing_tries = 1
photon_energy_eV = 9500.000000
header/float//LCLS/detector_1/EncoderValue = -431.000000
num_peaks = 2
Peaks from peak search
  fs/px   ss/px (1/d)/nm^-1   Intensity  Panel
  10.50   20.50       1.00      100.00   p0
  30.25   40.75       2.00      200.00   p0
End of peak list
--- Begin crystal
Cell parameters 7.90 7.90 3.80 nm, 90.0 90.0 90.0 deg
astar = +0.1 +0.0 +0.0 nm^-1
bstar = +0.0 +0.1 +0.0 nm^-1
cstar = +0.0 +0.0 +0.2 nm^-1
lattice_type = tetragonal
centering = P
unique_axis = c
No integrated reflections.
--- End crystal
--- Begin crystal
Cell parameters 7.91 7.91 3.81 nm, 90.0 90.0 90.0 deg
Reflections measured after indexing
   h    k    l          I   sigma(I)       peak background  fs/px  ss/px panel
   1    0    0      10.00       1.00      12.00       2.00   10.7   20.4 p0
End of reflections
--- End crystal
----- End chunk -----
----- Begin chunk -----
Image filename: run7.cxi
Event: //4
Image serial number: 5
hit = 0
indexed_by = none
photon_energy_eV = 9500.000000
num_peaks = 0
Peaks from peak search
  fs/px   ss/px (1/d)/nm^-1   Intensity  Panel
End of peak list
----- End chunk -----
"""


def test_small_stream_events_and_crystals(tmp_path):
    path = tmp_path / "small.stream"
    path.write_text(SMALL_STREAM)
    r = StreamReader(path, geometry=False)
    assert r.target_cell is None and r.geometry_text == "p0/min_fs = 0\n"
    a, b = list(r)
    assert (a.event, a.serial, a.event_id) == ("//3", 4, "run7.cxi //3")
    assert a.headers["header/float//LCLS/detector_1/EncoderValue"] == "-431.000000"
    assert len(a.crystals) == 2 and a.crystals[0].reflections is None
    assert a.crystals[0].unique_axis == "c" and a.crystals[0].lattice_type == "tetragonal"
    assert len(a.crystals[1].reflections) == 1 and a.crystals[1].cell[0] == 7.91
    np.testing.assert_array_equal(a.peaks.fs, [10.5, 30.25])
    assert (b.hit, b.indexed, len(b.peaks), b.event_id) == (False, False, 0, "run7.cxi //4")
