"""PeakDiff figures (matplotlib, no display needed).

- :func:`plot_counts`: found vs predicted peak counts per frame (the paper's Fig. 3, left);
- :func:`plot_precision_recall`: per-frame precision vs recall with the selection box
  (Fig. 3, right);
- :func:`plot_match_overlay`: one detector image with found peaks (yellow squares), predicted
  peaks (red triangles) and matched pairs (cyan circles) (Fig. 2).

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas, never through pyplot,
so they work on headless batch nodes and in threads without touching the global backend.
Each function takes an optional ``ax`` to draw into and returns the Figure.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from peaknet.match.peakdiff import FrameMatch, MatchTable, as_positions

FOUND_STYLE = dict(marker="s", s=60, facecolors="none", edgecolors="yellow", linewidths=1.2)
PREDICTED_STYLE = dict(marker="^", s=50, facecolors="none", edgecolors="red", linewidths=1.0)
MATCHED_STYLE = dict(marker="o", s=220, facecolors="none", edgecolors="cyan", linewidths=1.2)


def _axes(ax, figsize=(5.0, 4.5)):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: os.PathLike | str, dpi: int = 150) -> Path:
    """Write ``fig`` (format from the suffix: .png, .pdf, .svg)."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def plot_counts(table: MatchTable, selected: Optional[np.ndarray] = None, ax=None) -> Figure:
    """Scatter of found (x) vs predicted (y) peak counts per frame, with the diagonal."""
    fig, ax = _axes(ax)
    nf, npred = table.n_found, table.n_predicted
    sel = np.zeros(len(table), bool) if selected is None else np.asarray(selected, bool)
    ax.scatter(nf[~sel], npred[~sel], s=12, c="0.5", alpha=0.7, label="not selected")
    if sel.any():
        ax.scatter(nf[sel], npred[sel], s=14, c="tab:blue", label="selected")
    top = max(int(nf.max(initial=0)), int(npred.max(initial=0)), 1)
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="found = predicted")
    ax.set_xlabel("found peaks per frame")
    ax.set_ylabel("predicted peaks per frame")
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_precision_recall(table: MatchTable, min_precision: float = 0.8,
                          min_recall: float = 0.0, selected: Optional[np.ndarray] = None,
                          ax=None) -> Figure:
    """Per-frame precision (y) vs recall (x); dashed box = the selection region
    (precision > min_precision, recall >= min_recall). Frames with an undefined ratio are
    left out (counted in the title)."""
    fig, ax = _axes(ax)
    p, r = table.precision, table.recall
    ok = np.isfinite(p) & np.isfinite(r)
    sel = np.zeros(len(table), bool) if selected is None else np.asarray(selected, bool)
    ax.scatter(r[ok & ~sel], p[ok & ~sel], s=12, c="0.5", alpha=0.7, label="not selected")
    if (ok & sel).any():
        ax.scatter(r[ok & sel], p[ok & sel], s=14, c="tab:blue", label="selected")
    ax.add_patch(Rectangle((min_recall, min_precision), 1 - min_recall, 1 - min_precision,
                           fill=False, ls="--", lw=1.2, ec="k", label="selection"))
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall = matched / predicted")
    ax.set_ylabel("precision = matched / found")
    ax.set_title(f"{int(ok.sum())} frames ({int((~ok).sum())} undefined)", fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _on_panel(peaks, panel: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, (K, 2) ss/fs) of the peaks on ``panel`` (all peaks if None)."""
    pn, yx = as_positions(peaks)
    idx = np.arange(len(pn)) if panel is None else np.flatnonzero(pn == panel)
    return idx, yx[idx]


def plot_match_overlay(image: np.ndarray, found, predicted, match: Optional[FrameMatch] = None,
                       panel: Optional[int] = None, ax=None, vmax_percentile: float = 99.5
                       ) -> Figure:
    """Found (yellow squares), predicted (red triangles) and matched (cyan circles) on an image.

    ``image``: (H, W) — a slab, or one module; or (P, H, W) with ``panel`` choosing the module.
    Peak positions (PeakList or (N, 3) panel/ss/fs) must be in the image's coordinates; with
    ``panel`` only that module's peaks are drawn. ``match`` defaults to nothing matched.
    """
    image = np.asarray(image)
    if image.ndim == 3:
        if panel is None:
            raise ValueError("a (P, H, W) image needs panel=")
        image = image[panel]
    fig, ax = _axes(ax, figsize=(7.0, 7.0 * image.shape[0] / max(image.shape[1], 1) + 0.5))
    finite = image[np.isfinite(image)]
    vmax = np.percentile(finite, vmax_percentile) if finite.size else 1.0
    vmin = np.percentile(finite, 1.0) if finite.size else 0.0
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=max(vmax, vmin + 1e-6), origin="upper",
              interpolation="nearest")
    fi, fyx = _on_panel(found, panel)
    pi, pyx = _on_panel(predicted, panel)
    ax.scatter(fyx[:, 1], fyx[:, 0], label=f"found ({fi.size})", **FOUND_STYLE)
    ax.scatter(pyx[:, 1], pyx[:, 0], label=f"predicted ({pi.size})", **PREDICTED_STYLE)
    if match is not None and match.n_matched:
        keep = np.isin(match.found_index, fi)
        _, yx_all = as_positions(found)
        myx = yx_all[match.found_index[keep]]
        ax.scatter(myx[:, 1], myx[:, 0], label=f"matched ({int(keep.sum())})", **MATCHED_STYLE)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_xlabel("fs / px")
    ax.set_ylabel("ss / px")
    ax.legend(loc="upper right", fontsize="small", facecolor="0.2", labelcolor="w")
    return fig
