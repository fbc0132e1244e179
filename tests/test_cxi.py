"""CXI frames and CrystFEL-compatible peak lists (peaknet.io.cxi)."""
from __future__ import annotations

from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from peaknet.errors import DataError
from peaknet.io.cxi import (
    DEFAULT_DATASET,
    CXIWriter,
    check_finite,
    classify_frame,
    open_frames,
    iter_peak_lists,
    read_peak_event_ids,
    read_peak_lists,
)
from peaknet.peaks import PeakList
from realdata import real_data




def real_geometry():
    """The CSPAD geometry embedded in the 5-HT2B stream (slab 1480 x 1552, stack 32 x 185 x 388)."""
    geometry = pytest.importorskip("peaknet.io.geometry")
    from peaknet.io.stream import StreamReader

    path = real_data("crystfel_5ht2b/test.stream")
    return geometry.parse_geometry(StreamReader(path, geometry=False).geometry_text)


class TwoPanelGeometry:
    """Stand-in geometry: 2 modules of 4 x 6 stacked along ss in a (8, 6) slab."""

    stack_shape = (2, 4, 6)
    slab_shape = (8, 6)

    def stack_to_slab_coords(self, panel, ss, fs):
        return np.asarray(ss) + 4 * np.asarray(panel), np.asarray(fs)

    def slab_to_stack_coords(self, ss, fs):
        panel = np.clip(np.floor((np.asarray(ss) + 0.5) / 4), 0, 1).astype(int)
        return panel, np.asarray(ss) - 4 * panel, np.asarray(fs)


def random_peaks(rng, n, n_panels=4, size=100.0) -> PeakList:
    return PeakList(
        panel=rng.integers(0, n_panels, n), ss=rng.uniform(0, size, n),
        fs=rng.uniform(0, size, n), intensity=rng.uniform(-10, 5000, n),
        max_value=rng.uniform(0, 900, n), snr=rng.uniform(0, 50, n), npix=rng.integers(1, 40, n),
    )


def assert_same_peaks(a: PeakList, b: PeakList):
    assert len(a) == len(b)
    for name, col in a.as_dict().items():
        np.testing.assert_array_equal(col, getattr(b, name), err_msg=name)


# ------------------------------------------------------------------------------ peak lists
def test_round_trip_varying_counts(tmp_path):
    rng = np.random.default_rng(1)
    counts = [0, 1, 7, 0, 64, 3, 128]
    lists = [random_peaks(rng, n) for n in counts]
    events = [f"run14//{i}" for i in range(len(counts))]
    path = tmp_path / "peaks.cxi"
    with CXIWriter(path, max_peaks=128) as w:
        for i, (pk, ev) in enumerate(zip(lists, events)):
            w.append(pk, ev, photon_energy_eV=9500.0 + i, encoder_value=-430.0,
                     event_number=1000 + i)
    back = read_peak_lists(path)
    assert len(back) == len(lists)
    for a, b in zip(lists, back):
        assert_same_peaks(a, b)
    assert read_peak_event_ids(path) == events
    with h5py.File(path) as h5:
        np.testing.assert_array_equal(h5["/LCLS/photon_energy_eV"][()], 9500.0 + np.arange(7))
        np.testing.assert_array_equal(h5["/LCLS/detector_1/EncoderValue"][()], -430.0)
        np.testing.assert_array_equal(h5["/LCLS/eventNumber"][()], 1000 + np.arange(7))


def test_buffered_rows_and_late_scalars(tmp_path):
    rng = np.random.default_rng(7)
    lists = [random_peaks(rng, int(n)) for n in rng.integers(0, 30, 10)]
    path = tmp_path / "peaks.cxi"
    with CXIWriter(path, max_peaks=32, flush_every=3) as w:
        for i, pk in enumerate(lists):
            extra = {"photon_energy_eV": 9000.0 + i} if i >= 4 else {}
            if i % 2:
                extra["hit_score"] = i / 10
            w.append(pk, f"e{i}", **extra)
    for a, b in zip(lists, read_peak_lists(path)):
        assert_same_peaks(a, b)
    for a, b in zip(lists, iter_peak_lists(path, block=3), strict=True):
        assert_same_peaks(a, b)
    with h5py.File(path) as h5:
        energy = h5["/LCLS/photon_energy_eV"][()]
        assert np.isnan(energy[:4]).all()
        np.testing.assert_array_equal(energy[4:], 9000.0 + np.arange(4, 10))
        score = h5["/entry_1/result_1/hit_score"][()]
        np.testing.assert_array_equal(score[1::2], np.arange(1, 10, 2) / 10)
        assert np.isnan(score[0::2]).all()


def test_bad_frame_rejected_without_corrupting(tmp_path):
    path = tmp_path / "f.cxi"
    with CXIWriter(path, data_shape=(4, 5)) as w:
        w.append(PeakList(), "a", frame=np.ones((4, 5)))
        with pytest.raises(DataError, match="frame shape") as info:
            w.append(PeakList(), "b", frame=np.ones((5, 4)))
        assert info.value.field == DEFAULT_DATASET
        with pytest.raises(ValueError, match="no frame"):
            w.append(PeakList(), "c")
        w.append(PeakList(), "d", frame=np.zeros((4, 5)))
    with open_frames(path) as src:
        assert src.shape == (2, 4, 5) and src.event_ids == ["a", "d"]


def test_layout_is_what_crystfel_reads(tmp_path):
    path = tmp_path / "peaks.cxi"
    with CXIWriter(path, max_peaks=16) as w:
        w.append(random_peaks(np.random.default_rng(0), 5), "a")
        w.append(PeakList(), "b")
    with h5py.File(path) as h5:
        g = h5["/entry_1/result_1"]
        assert g["nPeaks"].shape == (2,) and g["nPeaks"].dtype == np.int32
        np.testing.assert_array_equal(g["nPeaks"][()], [5, 0])
        for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakSNR",
                     "peakNPixels", "peakMaximumValue", "peakSegPosRaw"):
            ds = g[name]
            assert ds.shape == (2, 16) and ds.dtype == np.float32, name
            assert ds.maxshape == (None, 16) and ds.chunks == (1, 16), name
        assert np.all(g["peakXPosRaw"][1] == 0)  # padding
        assert h5["/entry_1/event_id"].shape == (2,)


def test_geometry_converts_module_to_slab(tmp_path):
    geom = TwoPanelGeometry()
    peaks = PeakList.from_columns(panel=[0, 1, 1], ss=[1.25, 0.0, 3.5], fs=[2.0, 5.0, 0.5],
                                  intensity=[1, 2, 3])
    path = tmp_path / "peaks.cxi"
    with CXIWriter(path, geometry=geom) as w:
        w.append(peaks, "e0")
    with h5py.File(path) as h5:
        np.testing.assert_allclose(h5["/entry_1/result_1/peakYPosRaw"][0, :3], [1.25, 4.0, 7.5])
        np.testing.assert_allclose(h5["/entry_1/result_1/peakXPosRaw"][0, :3], [2.0, 5.0, 0.5])
        np.testing.assert_allclose(h5["/entry_1/result_1/peakTotalIntensity"][0, :3], [1, 2, 3])
    assert_same_peaks(read_peak_lists(path, geometry=geom)[0], peaks)


def test_real_geometry_round_trip(tmp_path):
    geom = real_geometry()
    p, h, w = geom.stack_shape
    rng = np.random.default_rng(3)
    n = 50
    peaks = PeakList.from_columns(panel=rng.integers(0, p, n), ss=rng.uniform(0, h - 1, n),
                                  fs=rng.uniform(0, w - 1, n), intensity=rng.uniform(0, 1e3, n))
    path = tmp_path / "peaks.cxi"
    with CXIWriter(path, geometry=geom) as wr:
        wr.append(peaks, "e0")
    back = read_peak_lists(path, geometry=geom)[0]
    np.testing.assert_array_equal(back.panel, peaks.panel)
    np.testing.assert_allclose(back.ss, peaks.ss, atol=1e-3)
    np.testing.assert_allclose(back.fs, peaks.fs, atol=1e-3)


def test_reads_om_style_file_with_real_geometry(tmp_path):
    """A peak list written by another program (OM/Cheetah style: int64 nPeaks, no
    peakSegPosRaw, slab coordinates) comes back in module coordinates."""
    geom = real_geometry()
    path = tmp_path / "om.h5"
    slab_ss = np.array([[10.0, 200.0, 0.0], [1479.0, 0.0, 0.0]], np.float32)
    slab_fs = np.array([[20.0, 400.0, 0.0], [1551.0, 0.0, 0.0]], np.float32)
    with h5py.File(path, "w") as h5:
        g = h5.create_group("/entry_1/result_1")
        g["nPeaks"] = np.array([2, 1], np.int64)
        g["peakXPosRaw"], g["peakYPosRaw"] = slab_fs, slab_ss
        g["peakTotalIntensity"] = np.ones((2, 3), np.float32)
    a, b = read_peak_lists(path, geometry=geom)
    assert len(a) == 2 and len(b) == 1
    for pl, ss, fs in ((a, slab_ss[0, :2], slab_fs[0, :2]), (b, slab_ss[1, :1], slab_fs[1, :1])):
        back_ss, back_fs = geom.stack_to_slab_coords(pl.panel, pl.ss, pl.fs)
        np.testing.assert_allclose(back_ss, ss)
        np.testing.assert_allclose(back_fs, fs)
    assert b.panel[0] == geom.n_modules - 1 and (b.ss[0], b.fs[0]) == (184.0, 387.0)


def test_too_many_peaks_truncated_with_warning(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "peaks.cxi"
    big = random_peaks(rng, 20)
    with CXIWriter(path, max_peaks=8) as w:
        w.append(random_peaks(rng, 8), "ok")
        with pytest.warns(RuntimeWarning, match="20 peaks > max_peaks=8"):
            w.append(big, "big")
        assert w.n_truncated_frames == 1 and w.n_dropped_peaks == 12
    back = read_peak_lists(path)
    assert [len(b) for b in back] == [8, 8]
    assert_same_peaks(back[1], big.take(slice(0, 8)))
    with h5py.File(path) as h5:
        assert h5["/entry_1/result_1"].attrs["n_dropped_peaks"] == 12


def test_final_file_appears_only_on_close(tmp_path):
    path = tmp_path / "peaks.cxi"
    w = CXIWriter(path)
    w.append(PeakList(), "e0")
    assert not path.exists() and (tmp_path / "peaks.cxi.tmp").exists()
    w.close()
    assert path.exists() and not (tmp_path / "peaks.cxi.tmp").exists()


def test_exception_inside_with_leaves_no_file(tmp_path):
    path = tmp_path / "peaks.cxi"
    with pytest.raises(KeyError):
        with CXIWriter(path) as w:
            w.append(PeakList(), "e0")
            raise KeyError("worker died")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ frames
@pytest.mark.parametrize("compression", ["gzip", "bitshuffle", None])
def test_writer_frames_readable(tmp_path, compression):
    rng = np.random.default_rng(4)
    frames = rng.normal(100, 10, (3, 2, 16, 24)).astype(np.float32)
    path = tmp_path / f"frames-{compression}.cxi"
    with CXIWriter(path, compression=compression, write_frames=True) as w:
        for i, fr in enumerate(frames):
            w.append(PeakList(), f"e{i}", frame=fr)
    with open_frames(path) as src:
        assert src.layout == "stack" and src.shape == frames.shape
        assert src.event_ids == ["e0", "e1", "e2"]
        np.testing.assert_array_equal(src.read(1), frames[1])
        assert src.read(-1).dtype == np.float32


@pytest.mark.parametrize("filt", [
    dict(hdf5plugin.Bitshuffle(cname="lz4")),
    dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE)),
    dict(hdf5plugin.LZ4()),
    {"compression": "gzip", "compression_opts": 6},
], ids=["bitshuffle-lz4", "blosc-zstd", "lz4", "gzip"])
def test_compressed_slab_stack(tmp_path, filt):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 60000, (5, 40, 30)).astype(np.uint16)
    path = tmp_path / "slab.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset(DEFAULT_DATASET, data=data, chunks=(1, 40, 30), **filt)
        h5["/LCLS/eventNumber"] = np.arange(10, 15)
    with open_frames(path) as src:
        assert src.layout == "slab" and len(src) == 5 and src.frame_shape == (40, 30)
        assert src.event_ids == [str(i) for i in range(10, 15)]
        got = np.concatenate([b for _, b in src.iter_batches(2)])
        np.testing.assert_array_equal(got, data.astype(np.float32))


def test_slab_frames_as_stack_with_real_geometry(tmp_path):
    geom = real_geometry()
    rng = np.random.default_rng(6)
    slab = rng.integers(0, 1000, (2,) + geom.slab_shape).astype(np.int16)
    path = tmp_path / "cspad.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/data/data", data=slab, chunks=(1,) + geom.slab_shape,
                          **hdf5plugin.Bitshuffle())
    with open_frames(path, "/data/data", geometry=geom) as src:
        assert src.layout == "slab" and src.shape == (2, 1480, 1552)
        stack = src.read(1, as_stack=True)
        assert stack.shape == geom.stack_shape == (32, 185, 388)
        origin = geom.module_origins[5]
        np.testing.assert_array_equal(stack[5], slab[1, origin[0]:origin[0] + 185,
                                                      origin[1]:origin[1] + 388])
        _, batch = next(src.iter_batches(2, as_stack=True))
        np.testing.assert_array_equal(batch[1], stack)


def test_iter_batches_indices_and_bounded(tmp_path):
    data = np.arange(10 * 3 * 4, dtype=np.float64).reshape(10, 3, 4)
    path = tmp_path / "slab.h5"
    with h5py.File(path, "w") as h5:
        h5["data"] = data
    with open_frames(path, "data") as src:
        batches = list(src.iter_batches(3, indices=[7, 2, 3, 4, 9, 0, 0]))
        assert [len(i) for i, _ in batches] == [3, 3, 1]
        assert all(b.shape[0] <= 3 and b.dtype == np.float32 for _, b in batches)
        idx = np.concatenate([i for i, _ in batches])
        np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), data[idx])
        with pytest.raises(IndexError):
            next(src.iter_batches(2, indices=[10]))


def test_single_frames_and_explicit_layouts(tmp_path):
    geom = TwoPanelGeometry()
    path = tmp_path / "single.h5"
    with h5py.File(path, "w") as h5:
        h5["stack"] = np.ones(geom.stack_shape, np.int32)
        h5["slab"] = np.ones(geom.slab_shape, np.float32)
        h5["stack_n"] = np.ones((4,) + geom.stack_shape, np.float32)
    with open_frames(path, "stack", geometry=geom) as src:
        assert src.layout == "stack" and len(src) == 1 and src.read(0).shape == (2, 4, 6)
    with open_frames(path, "stack", layout="stack") as src:
        assert len(src) == 1
    with open_frames(path, "stack") as src:  # no geometry: rank 3 means N slab frames
        assert src.layout == "slab" and len(src) == 2
    with open_frames(path, "slab", geometry=geom) as src:
        assert src.layout == "slab" and len(src) == 1 and list(src)[0].shape == (8, 6)
    with open_frames(path, "stack_n", geometry=geom) as src:
        assert src.shape == (4, 2, 4, 6)


# ------------------------------------------------------------------------------ bad input
def expect_data_error(match, fn, *args, **kw) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kw)
    return info.value


def test_missing_file(tmp_path):
    err = expect_data_error("does not exist", open_frames, tmp_path / "nope.h5")
    assert err.path.endswith("nope.h5") and err.field == DEFAULT_DATASET
    expect_data_error("does not exist", read_peak_lists, tmp_path / "nope.h5")


def test_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("this is not HDF5\n" * 100)
    err = expect_data_error("not a readable HDF5", open_frames, path)
    assert str(path) in str(err) and err.field == DEFAULT_DATASET
    err = expect_data_error("not a readable HDF5", read_peak_lists, path)
    assert err.field == "/entry_1/result_1"


def test_truncated_hdf5(tmp_path):
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data", data=np.random.default_rng(0).random((20, 64, 64)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        with open_frames(path, "data") as src:
            src.read(19)
    assert str(path) in str(info.value) and info.value.field == "data"


def test_missing_dataset_lists_nearby(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/frames"] = np.zeros((2, 4, 4))
        h5["/entry_1/data_1/mask"] = np.zeros((4, 4))
    err = expect_data_error("dataset does not exist", open_frames, path)
    assert err.field == DEFAULT_DATASET
    assert "/entry_1/data_1/frames" in str(err) and "/entry_1/data_1/mask" in str(err)
    err = expect_data_error("dataset does not exist", read_peak_lists, path)
    assert err.field == "/entry_1/result_1/nPeaks"


@pytest.mark.parametrize("shape", [(10,), (2, 2, 2, 2, 2)])
def test_wrong_rank(tmp_path, shape):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as h5:
        h5["d"] = np.zeros(shape)
    err = expect_data_error(f"rank {len(shape)}", open_frames, path, "d")
    assert err.field == "d" and str(path) in str(err)


def test_shape_not_matching_geometry(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as h5:
        h5["slab"] = np.zeros((3, 8, 7))
        h5["stack"] = np.zeros((3, 2, 4, 5))
    geom = TwoPanelGeometry()
    err = expect_data_error(r"\(8, 7\) does not match the geometry's slab shape \(8, 6\)",
                            open_frames, path, "slab", geometry=geom)
    assert err.field == "slab"
    expect_data_error("stack shape", open_frames, path, "stack", geometry=geom)


def test_non_numeric_dtype(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("s", data=np.array([[b"a", b"b"], [b"c", b"d"]]))
    err = expect_data_error("not numeric", open_frames, path, "s")
    assert err.field == "s"


def test_bad_peak_lists(tmp_path):
    path = tmp_path / "p.h5"
    with h5py.File(path, "w") as h5:
        g = h5.create_group("/entry_1/result_1")
        g["nPeaks"] = np.array([2, 9], np.int32)
        g["peakXPosRaw"] = np.zeros((2, 4), np.float32)
        g["peakYPosRaw"] = np.zeros((3, 4), np.float32)
    err = expect_data_error("expected \\(2, maxPeaks\\)", read_peak_lists, path)
    assert err.field == "/entry_1/result_1/peakYPosRaw"
    with h5py.File(path, "a") as h5:
        del h5["/entry_1/result_1/peakYPosRaw"]
        h5["/entry_1/result_1/peakYPosRaw"] = np.zeros((2, 4), np.float32)
    err = expect_data_error("row 1: nPeaks=9", read_peak_lists, path)
    assert err.field == "/entry_1/result_1/nPeaks"


# ------------------------------------------------------------------------------ frame checks
def test_check_finite_and_classify():
    frame = np.ones((2, 5, 5), np.float32)
    assert check_finite(frame).ok and classify_frame(frame, (2, 5, 5)).ok
    frame[0, 1, 1] = np.nan
    frame[1, 2, 3] = np.inf
    chk = check_finite(frame)
    assert chk.n_nonfinite == 2 and not chk.mask[0, 1, 1] and chk.mask.sum() == 48
    assert "2 non-finite" in chk.reason
    with pytest.raises(DataError, match="2 non-finite") as info:
        check_finite(frame, path="run.cxi", event=17, raise_error=True)
    assert info.value.field == "event 17" and info.value.path == "run.cxi"
    st = classify_frame(frame, (2, 5, 5))
    assert st.status == "nonfinite" and "2 non-finite" in st.reason
    st = classify_frame(frame, (2, 5, 6))
    assert st.status == "wrong_shape" and "(2, 5, 6)" in st.reason
    assert classify_frame(np.zeros((3, 3), np.int16)).ok

