"""PeakDiff matching, curation, manifest and plots (peaknet.match)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from peaknet.io.cxi import CXIWriter
from peaknet.io.stream import StreamReader
from peaknet.match import (
    CurationRules,
    MatchTable,
    curate,
    frames_from_cxi,
    frames_from_peaklists,
    frames_from_stream,
    match_frames,
    match_peaks,
    read_manifest,
    select_frames,
    write_manifest,
)
from peaknet.peaks import PeakList
from realdata import real_data




def brute_force(a: np.ndarray, b: np.ndarray, cut: float) -> tuple[int, float]:
    """(most pairs within the cut on the same module, least total distance among those),
    by enumerating every partial matching."""
    d = np.hypot(a[:, None, 1] - b[None, :, 1], a[:, None, 2] - b[None, :, 2])
    ok = (a[:, None, 0] == b[None, :, 0]) & (d <= cut)
    best = (0, 0.0)

    def rec(i, used, count, total):
        nonlocal best
        if i == len(a):
            if count > best[0] or (count == best[0] and total < best[1] - 1e-12):
                best = (count, total)
            return
        rec(i + 1, used, count, total)
        for j in range(len(b)):
            if ok[i, j] and not used >> j & 1:
                rec(i + 1, used | 1 << j, count + 1, total + d[i, j])

    rec(0, 0, 0, 0.0)
    return best


def random_set(rng, n, n_panels=2, size=12.0) -> np.ndarray:
    return np.column_stack([rng.integers(0, n_panels, n), rng.uniform(0, size, (n, 2))])


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_matches_brute_force(method):
    rng = np.random.default_rng(11)
    for trial in range(150):
        a = random_set(rng, int(rng.integers(0, 7)))
        b = random_set(rng, int(rng.integers(0, 7)))
        cut = float(rng.choice([1.5, 3.0, 5.0]))
        m = match_peaks(a, b, cut, method=method)
        count, total = brute_force(a, b, cut)
        assert m.n_matched == count, trial
        assert m.distance.sum() == pytest.approx(total, abs=1e-9), trial
        # pairs are valid: same module, within the cut, one-to-one
        assert np.all(a[m.found_index, 0] == b[m.predicted_index, 0])
        assert np.all(m.distance <= cut)
        assert len(set(m.found_index)) == len(set(m.predicted_index)) == m.n_matched


def test_dense_and_sparse_agree_on_thousands():
    rng = np.random.default_rng(3)
    a = random_set(rng, 3000, n_panels=8, size=400.0)
    b = np.concatenate([a[:2000] + np.column_stack([np.zeros(2000), rng.normal(0, 1.5, (2000, 2))]),
                        random_set(rng, 1500, n_panels=8, size=400.0)])
    dense = match_peaks(a, b, method="dense")
    sparse = match_peaks(a, b, method="sparse")
    assert dense.n_matched == sparse.n_matched >= 1900
    assert dense.distance.sum() == pytest.approx(sparse.distance.sum())


def test_empty_and_one_sided():
    some = np.array([[0, 1.0, 1.0], [0, 5.0, 5.0]])
    none = np.zeros((0, 3))
    m = match_peaks(none, none)
    assert (m.n_matched, m.n_found, m.n_predicted) == (0, 0, 0)
    assert math.isnan(m.precision) and math.isnan(m.recall)
    m = match_peaks(some, none)
    assert m.precision == 0.0 and math.isnan(m.recall)
    m = match_peaks(PeakList(), some)
    assert math.isnan(m.precision) and m.recall == 0.0
    np.testing.assert_array_equal(m.unmatched_predicted(), [0, 1])


def test_different_modules_never_match():
    a = np.array([[0, 10.0, 10.0], [1, 50.0, 50.0]])
    b = np.array([[2, 10.0, 10.0], [3, 50.0, 50.0]])  # same positions, other modules
    for method in ("dense", "sparse"):
        assert match_peaks(a, b, max_distance=1e6, method=method).n_matched == 0
    m = match_peaks(a, np.array([[1, 10.0, 10.0], [1, 51.0, 50.0]]))
    np.testing.assert_array_equal(m.found_index, [1])
    np.testing.assert_array_equal(m.predicted_index, [1])
    assert m.distance[0] == pytest.approx(1.0)


def test_cut_is_inclusive_and_maximises_pairs():
    # greedy nearest-first would pair f0-p0 (d=1) and leave f1 alone; the optimum pairs both
    found = np.array([[0, 0.0, 0.0], [0, 0.0, 3.5]])
    pred = np.array([[0, 0.0, 1.0], [0, 0.0, -4.0]])
    m = match_peaks(found, pred, max_distance=4.0)
    assert m.n_matched == 2 and m.distance.sum() == pytest.approx(4.0 + 2.5)
    assert match_peaks(found[:1], pred[:1], max_distance=1.0).n_matched == 1


def test_table_micro_and_nan_aggregation():
    a = np.array([[0, 0.0, 0.0], [0, 9.0, 9.0]])
    frames = [
        ("e0", a, a[:1]),                 # precision 0.5, recall 1
        ("e1", np.zeros((0, 3)), a),      # nothing found: precision undefined
        ("e2", a, np.zeros((0, 3))),      # nothing predicted: recall undefined
    ]
    t = match_frames(frames)
    np.testing.assert_array_equal(t.n_matched, [1, 0, 0])
    np.testing.assert_allclose(t.precision, [0.5, np.nan, 0.0])
    np.testing.assert_allclose(t.recall, [1.0, 0.0, np.nan])
    assert t.micro() == (1 / 4, 1 / 3)
    s = t.summary()
    assert s["precision"]["n"] == 2 and s["precision"]["median"] == 0.25
    assert s["recall"]["n"] == 2
    recs = t.records()
    assert recs[1]["precision"] is None and recs[0]["precision"] == 0.5
    json.dumps(s)
    json.dumps(recs)


# ------------------------------------------------------------------------------ curation
def test_rules_and_reasons():
    t = MatchTable(
        event=["good", "low-p", "few", "none", "many-pred"],
        n_found=np.array([20, 20, 5, 0, 20]), n_predicted=np.array([100, 100, 100, 50, 900]),
        n_matched=np.array([17, 16, 5, 0, 20]), mean_distance=np.ones(5),
    )
    rules = CurationRules(min_precision=0.8, min_found=10, min_predicted=10, max_predicted=500)
    sel, why = select_frames(t, rules)
    np.testing.assert_array_equal(sel, [True, False, False, False, False])
    assert why[0] == "selected"
    assert why[1] == "precision 0.800 <= 0.8"  # strict: exactly 0.8 is not enough
    assert why[2] == "found 5 < 10"
    assert why[3] == "no found peaks"
    assert why[4] == "predicted 900 > 500"
    with pytest.raises(ValueError, match="max_found"):
        CurationRules(min_found=10, max_found=5).validate()


def test_manifest_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    truth = [random_set(rng, int(n), size=100.0) for n in (30, 12, 0)]
    found = [np.concatenate([t[:25], random_set(rng, 3, size=100.0)]) for t in truth]
    res = curate(frames_from_peaklists(found, truth, events=["a", "b", "c"]))
    assert res.summary()["n_selected"] == int(res.selected.sum())
    for suffix in (".jsonl", ".csv"):
        path = write_manifest(tmp_path / f"manifest{suffix}", res)
        rows = read_manifest(path)
        assert [r["event"] for r in rows] == ["a", "b", "c"]
        assert rows == res.records()
        assert rows[2]["recall"] is None and rows[2]["selected"] is False


def test_frames_from_cxi_pairs_by_event(tmp_path):
    rng = np.random.default_rng(5)
    truth = {f"ev{i}": random_set(rng, 20, size=200.0) for i in range(4)}

    def as_peaks(arr):
        return PeakList.from_columns(panel=arr[:, 0], ss=arr[:, 1], fs=arr[:, 2])

    with CXIWriter(tmp_path / "found.cxi") as w:
        for ev in ["ev3", "ev0", "ev1"]:
            w.append(as_peaks(truth[ev][:15] + [0, 0.5, 0.0]), ev)
    with CXIWriter(tmp_path / "pred.cxi") as w:
        for ev in ["ev0", "ev1", "ev2", "ev3"]:
            w.append(as_peaks(truth[ev]), ev)
    t = match_frames(frames_from_cxi(tmp_path / "found.cxi", tmp_path / "pred.cxi"))
    assert t.event == ["ev3", "ev0", "ev1"]
    np.testing.assert_array_equal(t.n_matched, [15, 15, 15])
    np.testing.assert_allclose(t.mean_distance, 0.5, rtol=1e-6)


# ------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def stream_path() -> Path:
    return real_data("crystfel_5ht2b/test.stream")


def test_5ht2b_precision_recall(stream_path, capsys):
    """PeakDiff of found peaks vs predicted reflections (first crystal) of the 32 indexed
    chunks, 5 px cut. Module coordinates when the geometry parses, else per-panel slab."""
    table = match_frames(frames_from_stream(StreamReader(stream_path), indexed_only=True))
    plain = match_frames(frames_from_stream(StreamReader(stream_path, geometry=False),
                                            indexed_only=True))
    assert len(table) == 32
    # the geometry-free path (panels told apart by name) gives the same matching
    np.testing.assert_array_equal(table.n_matched, plain.n_matched)
    s = table.summary()
    assert s["n_found"] == 833 and s["n_predicted"] == 7966
    assert s["n_matched"] == 549
    assert s["precision"]["median"] == pytest.approx(0.6786, abs=1e-4)
    assert 0.0 < s["recall"]["median"] < 0.2  # most predicted reflections are too weak to find
    with capsys.disabled():
        p, r = s["precision"], s["recall"]
        print(f"\n5-HT2B, 32 indexed chunks, cut 5 px: micro precision {s['micro_precision']:.3f}"
              f" recall {s['micro_recall']:.4f}; per-frame precision median {p['median']:.3f}"
              f" (q25 {p['q25']:.3f}, q75 {p['q75']:.3f}, min {p['min']:.3f}, max {p['max']:.3f});"
              f" recall median {r['median']:.4f} (q25 {r['q25']:.4f}, q75 {r['q75']:.4f})")


def test_5ht2b_curation_and_crystal_choice(stream_path, tmp_path):
    reader = StreamReader(stream_path, geometry=False)
    res = curate(frames_from_stream(reader), CurationRules())
    assert len(res.table) == 70
    assert sum(r.startswith("no predicted peaks") for r in res.reasons) == 38  # not indexed
    assert int(res.selected.sum()) == 4
    rows = read_manifest(write_manifest(tmp_path / "m.jsonl", res))
    assert sum(r["selected"] for r in rows) == 4
    best = match_frames(frames_from_stream(reader, crystal="best", indexed_only=True))
    first = match_frames(frames_from_stream(reader, crystal="first", indexed_only=True))
    assert np.all(best.n_matched >= first.n_matched)


def test_plots(tmp_path, stream_path):
    from peaknet.match.plots import (plot_counts, plot_match_overlay, plot_precision_recall,
                                     save_figure)

    res = curate(frames_from_stream(StreamReader(stream_path, geometry=False), indexed_only=True),
                 keep_matches=True)
    save_figure(plot_counts(res.table, res.selected), tmp_path / "counts.png")
    save_figure(plot_precision_recall(res.table, 0.8, selected=res.selected), tmp_path / "pr.png")
    rng = np.random.default_rng(0)
    found = random_set(rng, 30, n_panels=2, size=60.0)
    pred = np.concatenate([found[:20] + [0, 1.0, -1.0], random_set(rng, 10, 2, 60.0)])
    m = match_peaks(found, pred)
    image = rng.normal(0, 1, (2, 64, 64))
    fig = plot_match_overlay(image, found, pred, m, panel=1)
    save_figure(fig, tmp_path / "overlay.png")
    for name in ("counts.png", "pr.png", "overlay.png"):
        assert (tmp_path / name).stat().st_size > 5000
