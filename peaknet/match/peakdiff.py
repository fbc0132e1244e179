"""PeakDiff: match two peak sets of a frame and measure how well they agree.

Given "found" peaks (a peak finder) and "predicted" peaks (indexing predictions, another finder,
generator truth), :func:`match_peaks` pairs them one-to-one by solving a linear sum assignment
(``scipy.optimize.linear_sum_assignment``) on the Euclidean distance matrix in module
coordinates (pixels):

- only pairs on the same module and at most ``max_distance`` apart (default 5 px) can match;
- the assignment first maximises the number of such pairs, then minimises their total distance
  (infeasible pairs cost more than any sum of feasible ones, so they are never preferred).

Figures per frame: ``precision = matched / found`` and ``recall = matched / predicted``. A ratio
with a zero denominator is **undefined (NaN)**, never 0 or 1: a frame with no found peaks says
nothing about precision. Aggregates stay correct that way: the micro figures sum counts over
frames (``sum matched / sum found``), and per-frame distributions ignore NaN.

Large frames are split into independent groups (connected components of the "within the cut"
graph, found with a k-d tree), each solved exactly, so thousands of peaks per frame are cheap;
the result equals the dense solution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from peaknet.peaks import PeakList

DEFAULT_MAX_DISTANCE = 5.0
#: Above this many candidate pairs (found x predicted), "auto" uses the sparse method.
DENSE_LIMIT = 20_000

PeaksLike = Union[PeakList, np.ndarray]


def as_positions(peaks: PeaksLike) -> tuple[np.ndarray, np.ndarray]:
    """(panel (N,) int64, yx (N, 2) float64 = (ss, fs)) from a PeakList or an (N, 3) array of
    (panel, ss, fs) or an (N, 2) array of (ss, fs) on one module."""
    if isinstance(peaks, PeakList):
        return peaks.panel.astype(np.int64), np.stack([peaks.ss, peaks.fs], 1).astype(np.float64)
    arr = np.asarray(peaks, np.float64)
    if arr.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(
            f"peak positions must be (N, 3) (panel, ss, fs) or (N, 2), got {arr.shape}"
        )
    if arr.shape[1] == 2:
        return np.zeros(len(arr), np.int64), arr
    return np.rint(arr[:, 0]).astype(np.int64), arr[:, 1:3]


@dataclass
class FrameMatch:
    """The matching of one frame.

    found_index, predicted_index (M,) int64: matched pairs (row numbers into each input);
    distance (M,) float64: their distances in pixels; n_found, n_predicted: input sizes.
    """

    found_index: np.ndarray
    predicted_index: np.ndarray
    distance: np.ndarray
    n_found: int
    n_predicted: int

    @property
    def n_matched(self) -> int:
        return int(self.found_index.size)

    @property
    def precision(self) -> float:
        """matched / found; NaN when nothing was found."""
        return self.n_matched / self.n_found if self.n_found else float("nan")

    @property
    def recall(self) -> float:
        """matched / predicted; NaN when nothing was predicted."""
        return self.n_matched / self.n_predicted if self.n_predicted else float("nan")

    def unmatched_found(self) -> np.ndarray:
        """Row numbers of found peaks without a partner."""
        return np.setdiff1d(np.arange(self.n_found), self.found_index)

    def unmatched_predicted(self) -> np.ndarray:
        """Row numbers of predicted peaks without a partner."""
        return np.setdiff1d(np.arange(self.n_predicted), self.predicted_index)


def _empty_match(n_found: int, n_pred: int) -> FrameMatch:
    z = np.zeros(0, np.int64)
    return FrameMatch(z, z.copy(), np.zeros(0), n_found, n_pred)


def _assign(cost: np.ndarray, feasible: np.ndarray, big: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows/cols of the optimal assignment restricted to feasible pairs."""
    rows, cols = linear_sum_assignment(np.where(feasible, cost, big))
    keep = feasible[rows, cols]
    return rows[keep], cols[keep]


def _big_cost(n: int, m: int, max_distance: float) -> float:
    """A cost larger than any sum of feasible distances of an n x m problem."""
    return float(max_distance) * (min(n, m) + 1) + 1.0


def _match_dense(pa, ya, pb, yb, max_distance):
    """All-pairs cost matrix (N, M); different modules and pairs beyond the cut are infeasible."""
    d = np.hypot(ya[:, None, 0] - yb[None, :, 0], ya[:, None, 1] - yb[None, :, 1])
    feasible = (pa[:, None] == pb[None, :]) & (d <= max_distance)
    rows, cols = _assign(d, feasible, _big_cost(len(pa), len(pb), max_distance))
    return rows, cols, d[rows, cols]


def _candidate_pairs(pa, ya, pb, yb, max_distance):
    """(i, j, d) of all pairs on the same module within the cut, via a k-d tree."""
    # different modules are placed far apart along a third axis, so they never come within the cut
    span = np.ptp(np.concatenate([ya, yb]), axis=0).max() + 4 * max_distance + 1.0
    ta = cKDTree(np.column_stack([pa * span, ya]))
    tb = cKDTree(np.column_stack([pb * span, yb]))
    pairs = ta.sparse_distance_matrix(tb, max_distance, output_type="ndarray")
    return pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"].astype(np.float64)


def _match_sparse(pa, ya, pb, yb, max_distance):
    """Solve each connected group of candidate pairs separately (exact, and fast when sparse)."""
    n, m = len(pa), len(pb)
    i, j, d = _candidate_pairs(pa, ya, pb, yb, max_distance)
    if i.size == 0:
        return i, j, d
    graph = coo_matrix((np.ones(i.size), (i, n + j)), shape=(n + m, n + m))
    _, label = connected_components(graph, directed=False)
    comp = label[i]
    edges_per_comp = np.bincount(comp, minlength=label.max() + 1)
    single = edges_per_comp[comp] == 1  # a lone pair: match it directly
    out_i, out_j, out_d = [i[single]], [j[single]], [d[single]]
    multi = np.flatnonzero(~single)
    order = multi[np.argsort(comp[multi], kind="stable")]
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for group in np.split(order, bounds) if order.size else []:
        gi, ri = np.unique(i[group], return_inverse=True)
        gj, rj = np.unique(j[group], return_inverse=True)
        cost = np.zeros((gi.size, gj.size))
        feasible = np.zeros(cost.shape, bool)
        cost[ri, rj] = d[group]
        feasible[ri, rj] = True
        rows, cols = _assign(cost, feasible, _big_cost(gi.size, gj.size, max_distance))
        out_i.append(gi[rows])
        out_j.append(gj[cols])
        out_d.append(cost[rows, cols])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def match_peaks(
    found: PeaksLike,
    predicted: PeaksLike,
    max_distance: float = DEFAULT_MAX_DISTANCE,
    method: str = "auto",
) -> FrameMatch:
    """Match two peak sets of one frame (see the module doc for the rules).

    Parameters
    ----------
    found, predicted:
        PeakLists, or (N, 3) arrays of (panel, ss, fs) in module pixel coordinates.
    max_distance:
        The cut in pixels; pairs farther apart (or on different modules) never match.
    method:
        "dense" (one cost matrix), "sparse" (k-d tree + connected groups) or "auto".

    Returns a :class:`FrameMatch` with pairs sorted by found index.
    """
    if max_distance <= 0:
        raise ValueError("max_distance must be > 0")
    pa, ya = as_positions(found)
    pb, yb = as_positions(predicted)
    n, m = len(pa), len(pb)
    if n == 0 or m == 0:
        return _empty_match(n, m)
    if method == "auto":
        method = "dense" if n * m <= DENSE_LIMIT else "sparse"
    if method == "dense":
        rows, cols, dist = _match_dense(pa, ya, pb, yb, max_distance)
    elif method == "sparse":
        rows, cols, dist = _match_sparse(pa, ya, pb, yb, max_distance)
    else:
        raise ValueError(f"method must be 'auto', 'dense' or 'sparse', not {method!r}")
    order = np.argsort(rows, kind="stable")
    return FrameMatch(
        rows[order].astype(np.int64), cols[order].astype(np.int64),
        np.asarray(dist, np.float64)[order], n, m,
    )


# --------------------------------------------------------------------------------------------
# many frames
# --------------------------------------------------------------------------------------------
def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _quartiles(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0, "mean": float("nan"), "q25": float("nan"), "median": float("nan"),
                "q75": float("nan"), "min": float("nan"), "max": float("nan")}
    q25, med, q75 = np.percentile(x, [25, 50, 75])
    return {"n": int(x.size), "mean": float(x.mean()), "q25": float(q25), "median": float(med),
            "q75": float(q75), "min": float(x.min()), "max": float(x.max())}


@dataclass
class MatchTable:
    """Per-frame PeakDiff results as columns of length F.

    event: list of F event ids; n_found, n_predicted, n_matched (F,) int64; mean_distance
    (F,) float64 pixels (NaN without matches); matches: the FrameMatch objects when kept.
    """

    event: list = field(default_factory=list)
    n_found: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    n_predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    n_matched: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mean_distance: np.ndarray = field(default_factory=lambda: np.zeros(0))
    matches: Optional[list] = None

    def __len__(self) -> int:
        return len(self.event)

    @property
    def precision(self) -> np.ndarray:
        """(F,) matched / found per frame, NaN where nothing was found."""
        return _ratio(self.n_matched, self.n_found)

    @property
    def recall(self) -> np.ndarray:
        """(F,) matched / predicted per frame, NaN where nothing was predicted."""
        return _ratio(self.n_matched, self.n_predicted)

    @classmethod
    def from_matches(cls, events: Sequence, matches: Sequence[FrameMatch], keep: bool = False
                     ) -> "MatchTable":
        def col(attr, dtype):
            return np.array([getattr(mt, attr) for mt in matches], dtype).reshape(-1)

        mean_d = np.array([mt.distance.mean() if mt.n_matched else np.nan for mt in matches],
                          np.float64).reshape(-1)
        return cls(
            event=[str(e) for e in events], n_found=col("n_found", np.int64),
            n_predicted=col("n_predicted", np.int64), n_matched=col("n_matched", np.int64),
            mean_distance=mean_d, matches=list(matches) if keep else None,
        )

    def micro(self) -> tuple[float, float]:
        """Overall (precision, recall) from summed counts; NaN if a denominator is zero."""
        m, f, p = self.n_matched.sum(), self.n_found.sum(), self.n_predicted.sum()
        return (m / f if f else float("nan"), m / p if p else float("nan"))

    def summary(self) -> dict:
        """JSON-able overall figures: counts, micro precision/recall, and the per-frame
        distributions (mean, quartiles, min, max over frames where each is defined)."""
        micro_p, micro_r = self.micro()
        return {
            "n_frames": len(self),
            "n_found": int(self.n_found.sum()),
            "n_predicted": int(self.n_predicted.sum()),
            "n_matched": int(self.n_matched.sum()),
            "micro_precision": float(micro_p),
            "micro_recall": float(micro_r),
            "precision": _quartiles(self.precision),
            "recall": _quartiles(self.recall),
        }

    def records(self) -> list[dict]:
        """One dict per frame: event, counts, precision, recall (None for NaN), mean_distance."""
        def num(x):
            return None if not np.isfinite(x) else float(x)

        p, r = self.precision, self.recall
        return [
            {"event": self.event[k], "n_found": int(self.n_found[k]),
             "n_predicted": int(self.n_predicted[k]), "n_matched": int(self.n_matched[k]),
             "precision": num(p[k]), "recall": num(r[k]),
             "mean_distance": num(self.mean_distance[k])}
            for k in range(len(self))
        ]


def match_frames(
    frames: Iterable[tuple],
    max_distance: float = DEFAULT_MAX_DISTANCE,
    keep_matches: bool = False,
) -> MatchTable:
    """Run :func:`match_peaks` on ``(event, found, predicted)`` triples; return the table.

    ``keep_matches`` also keeps every FrameMatch (for plots); off by default to bound memory.
    """
    events, matches, counts = [], [], []
    for event, found, predicted in frames:
        mt = match_peaks(found, predicted, max_distance)
        events.append(str(event))
        counts.append((mt.n_found, mt.n_predicted, mt.n_matched,
                       mt.distance.mean() if mt.n_matched else np.nan))
        if keep_matches:
            matches.append(mt)
    c = np.array(counts, np.float64).reshape(-1, 4)
    return MatchTable(
        event=events, n_found=c[:, 0].astype(np.int64), n_predicted=c[:, 1].astype(np.int64),
        n_matched=c[:, 2].astype(np.int64), mean_distance=c[:, 3],
        matches=matches if keep_matches else None,
    )
