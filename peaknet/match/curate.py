"""Curation: pick the frames whose found peaks agree with the predicted ones (the data engine).

The paper (section 2.1.1) keeps frames with precision > 0.8, where precision = matched / found
and recall = matched / predicted (PeakDiff, :mod:`peaknet.match.peakdiff`), and bounds the peak
counts so the training set is neither trivial nor dominated by odd frames. The rules are a
dataclass (:class:`CurationRules`, usable as a config section); every frame gets a reason,
and :func:`write_manifest` records them (JSON lines or CSV).

Inputs come from adapters that yield ``(event_id, found, predicted)`` triples of PeakLists:
:func:`frames_from_stream` (found peaks vs the reflections predicted by indexing),
:func:`frames_from_cxi` (two CXI peak-list files), :func:`frames_from_peaklists` (e.g. a
peak finder vs the generator's truth).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from peaknet.errors import InputError
from peaknet.match.peakdiff import DEFAULT_MAX_DISTANCE, MatchTable, match_frames, match_peaks
from peaknet.peaks import PeakList

MANIFEST_FIELDS = (
    "event", "n_found", "n_predicted", "n_matched", "precision", "recall", "mean_distance",
    "selected", "reason",
)


@dataclass
class CurationRules:
    """Which frames to keep.

    A frame is selected when precision > ``min_precision`` (strict, as in the paper),
    recall >= ``min_recall``, ``min_found <= n_found <= max_found`` and
    ``min_predicted <= n_predicted <= max_predicted`` (a ``None`` maximum is no bound).
    ``max_distance`` is PeakDiff's cut in pixels.
    """

    min_precision: float = 0.8
    min_recall: float = 0.0
    min_found: int = 10
    max_found: Optional[int] = None
    min_predicted: int = 10
    max_predicted: Optional[int] = None
    max_distance: float = DEFAULT_MAX_DISTANCE

    def validate(self) -> None:
        if not 0.0 <= self.min_precision <= 1.0:
            raise ValueError("min_precision must be within [0, 1]")
        if not 0.0 <= self.min_recall <= 1.0:
            raise ValueError("min_recall must be within [0, 1]")
        if self.min_found < 0 or self.min_predicted < 0:
            raise ValueError("min_found and min_predicted must be >= 0")
        if self.max_found is not None and self.max_found < self.min_found:
            raise ValueError("max_found must be >= min_found")
        if self.max_predicted is not None and self.max_predicted < self.min_predicted:
            raise ValueError("max_predicted must be >= min_predicted")
        if self.max_distance <= 0:
            raise ValueError("max_distance must be > 0")


def _frame_reasons(nf: int, npred: int, prec: float, rec: float, rules: CurationRules) -> list:
    """Every rule the frame breaks, in words (empty: selected)."""
    out = []
    if nf == 0:
        out.append("no found peaks")
    elif nf < rules.min_found:
        out.append(f"found {nf} < {rules.min_found}")
    if rules.max_found is not None and nf > rules.max_found:
        out.append(f"found {nf} > {rules.max_found}")
    if npred == 0:
        out.append("no predicted peaks")
    elif npred < rules.min_predicted:
        out.append(f"predicted {npred} < {rules.min_predicted}")
    if rules.max_predicted is not None and npred > rules.max_predicted:
        out.append(f"predicted {npred} > {rules.max_predicted}")
    if np.isfinite(prec) and not prec > rules.min_precision:
        out.append(f"precision {prec:.3f} <= {rules.min_precision}")
    if np.isfinite(rec) and rec < rules.min_recall:
        out.append(f"recall {rec:.3f} < {rules.min_recall}")
    return out


def select_frames(table: MatchTable, rules: Optional[CurationRules] = None
                  ) -> tuple[np.ndarray, list[str]]:
    """(selected (F,) bool, reasons: "selected" or the broken rules joined by "; ").

    ``rules`` default: :class:`CurationRules` ().
    """
    rules = rules or CurationRules()
    rules.validate()
    prec, rec = table.precision, table.recall
    selected = np.zeros(len(table), bool)
    reasons = []
    for k in range(len(table)):
        broken = _frame_reasons(int(table.n_found[k]), int(table.n_predicted[k]),
                                float(prec[k]), float(rec[k]), rules)
        selected[k] = not broken
        reasons.append("; ".join(broken) if broken else "selected")
    return selected, reasons


@dataclass
class CurationResult:
    """The PeakDiff table, the selection (F,) bool and one reason per frame."""

    table: MatchTable
    selected: np.ndarray
    reasons: list
    rules: CurationRules

    def summary(self) -> dict:
        """JSON-able: the PeakDiff summary plus selection counts."""
        out = self.table.summary()
        out["n_selected"] = int(self.selected.sum())
        out["selected_fraction"] = float(self.selected.mean()) if len(self.selected) else 0.0
        return out

    def records(self) -> list[dict]:
        rows = self.table.records()
        for row, sel, why in zip(rows, self.selected, self.reasons):
            row["selected"] = bool(sel)
            row["reason"] = why
        return rows


def curate(frames: Iterable[tuple], rules: Optional[CurationRules] = None,
           keep_matches: bool = False) -> CurationResult:
    """PeakDiff every ``(event, found, predicted)`` triple and apply ``rules`` (default:
    :class:`CurationRules` ())."""
    rules = rules or CurationRules()
    rules.validate()
    table = match_frames(frames, rules.max_distance, keep_matches=keep_matches)
    selected, reasons = select_frames(table, rules)
    return CurationResult(table, selected, reasons, rules)


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def write_manifest(path: os.PathLike | str, result: CurationResult) -> Path:
    """One row per frame: event, counts, precision, recall, mean_distance, selected, reason.

    ``.csv`` -> CSV with a header (empty cells for undefined ratios); anything else -> JSON
    lines (null for undefined ratios). Written to a temporary sibling and renamed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rows = result.records()
    with open(tmp, "w", newline="") as fh:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        else:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: os.PathLike | str) -> list[dict]:
    """Rows of a manifest written by :func:`write_manifest`, with their types restored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "manifest does not exist")
    with open(path, newline="") as fh:
        if path.suffix.lower() != ".csv":
            return [json.loads(line) for line in fh if line.strip()]
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("n_found", "n_predicted", "n_matched"):
            row[key] = int(row[key])
        for key in ("precision", "recall", "mean_distance"):
            row[key] = float(row[key]) if row[key] != "" else None
        row["selected"] = row["selected"] == "True"
    return rows


# --------------------------------------------------------------------------------------------
# input adapters: each yields (event_id, found PeakList, predicted PeakList)
# --------------------------------------------------------------------------------------------
def frames_from_peaklists(found: Sequence[PeakList], predicted: Sequence[PeakList],
                          events: Optional[Sequence] = None) -> Iterator[tuple]:
    """Pair two equally long sequences of PeakLists (e.g. a finder vs generator truth)."""
    if len(found) != len(predicted):
        raise ValueError(f"{len(found)} found peak lists but {len(predicted)} predicted ones")
    events = range(len(found)) if events is None else events
    if len(events) != len(found):
        raise ValueError(f"{len(events)} events for {len(found)} frames")
    yield from zip((str(e) for e in events), found, predicted)


def frames_from_cxi(found_path, predicted_path, geometry=None) -> Iterator[tuple]:
    """Pair the peak lists of two CXI files, by event id when both files have ids, else by row.

    Events present in only one file are skipped.
    """
    from peaknet.io.cxi import read_peak_event_ids, read_peak_lists

    found = read_peak_lists(found_path, geometry)
    pred = read_peak_lists(predicted_path, geometry)
    ids_f, ids_p = read_peak_event_ids(found_path), read_peak_event_ids(predicted_path)
    if ids_f is None or ids_p is None:
        if len(found) != len(pred):
            raise InputError(predicted_path, None, f"{len(pred)} frames but {found_path} has "
                             f"{len(found)} and neither has event ids to pair them")
        yield from frames_from_peaklists(found, pred)
        return
    row_p = {e: k for k, e in enumerate(ids_p)}
    for k, event in enumerate(ids_f):
        if event in row_p:
            yield event, found[k], pred[row_p[event]]


class _PanelIds:
    """Stable integer ids for panel names (geometry-free matching keeps modules apart)."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, names) -> np.ndarray:
        return np.array([self.ids.setdefault(n, len(self.ids)) for n in names], np.int32)


def _slab_peaklist(names, ss, fs, panel_ids: _PanelIds, **cols) -> PeakList:
    """Stream positions (pixel corners on integers) as pixel-centre slab positions, with panel
    ids from names: distances within a panel equal those in module coordinates."""
    return PeakList.from_columns(
        len(ss), panel=panel_ids(names), ss=np.asarray(ss) - 0.5, fs=np.asarray(fs) - 0.5, **cols
    )


def _chunk_found(chunk, panel_ids) -> PeakList:
    if chunk.peak_list is not None:
        return chunk.peak_list
    if chunk.peaks is None:
        return PeakList()
    p = chunk.peaks
    return _slab_peaklist(p.panel, p.ss, p.fs, panel_ids, intensity=p.intensity)


def _crystal_predicted(crystal, panel_ids) -> PeakList:
    if crystal.predicted is not None:
        return crystal.predicted
    r = crystal.reflections
    if r is None:
        return PeakList()
    return _slab_peaklist(r.panel, r.ss, r.fs, panel_ids, intensity=r.intensity)


def frames_from_stream(stream, crystal: str = "first", indexed_only: bool = False,
                       max_distance: float = DEFAULT_MAX_DISTANCE) -> Iterator[tuple]:
    """Found peaks vs predicted reflections per chunk of a CrystFEL stream.

    ``stream``: a :class:`peaknet.io.stream.StreamReader` or a path. Uses module coordinates
    when the reader has a geometry; otherwise slab positions with panels told apart by name
    (the same distances). ``crystal``: "first", "best" (the crystal with most matches within
    ``max_distance``) or "all" (union of every crystal's predictions). Unindexed chunks give an
    empty predicted list unless ``indexed_only``.
    """
    from peaknet.io.stream import StreamReader

    if crystal not in ("first", "best", "all"):
        raise ValueError(f"crystal must be 'first', 'best' or 'all', not {crystal!r}")
    reader = stream if isinstance(stream, StreamReader) else StreamReader(stream)
    panel_ids = _PanelIds()
    for chunk in reader:
        if indexed_only and not chunk.indexed:
            continue
        found = _chunk_found(chunk, panel_ids)
        preds = [_crystal_predicted(c, panel_ids) for c in chunk.crystals]
        yield chunk.event_id, found, _pick_crystal(found, preds, crystal, max_distance)


def _pick_crystal(found: PeakList, preds: list, how: str, max_distance: float) -> PeakList:
    if not preds:
        return PeakList()
    if how == "first":
        return preds[0]
    if how == "all":
        return PeakList.concatenate(preds)
    n_matched = [match_peaks(found, p, max_distance).n_matched for p in preds]
    return preds[int(np.argmax(n_matched))]
