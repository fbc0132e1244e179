"""Training curves from a run's ``metrics.jsonl``: loss, learning rate, gradient norm, throughput
and validation metrics, one PNG.

    python -m peaknet.train.plots runs/pretrain/metrics.jsonl [out.png]

Lines of a resumed run may repeat steps (those trained after the last checkpoint before an
interruption); the last record of each step wins.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

__all__ = ["read_metrics", "plot_metrics"]


def read_metrics(path: str | Path) -> dict[str, list[dict]]:
    """Records of a metrics JSONL grouped by ``kind`` ("train", "val", ...), each sorted by step
    with one record per step (the last one written)."""
    by_kind: dict[str, dict[int, dict]] = {}
    events: dict[str, list[dict]] = {}
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            kind = rec.get("kind", "train")
            if kind in ("train", "val") and "step" in rec:
                by_kind.setdefault(kind, {})[int(rec["step"])] = rec
            else:
                events.setdefault(kind, []).append(rec)
    out = {k: [v[s] for s in sorted(v)] for k, v in by_kind.items()}
    out.update(events)
    return out


def plot_metrics(path: str | Path, out: Optional[str | Path] = None) -> Path:
    """Write the curves of ``path`` to ``out`` (default: ``<path stem>.png`` beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    out = Path(out) if out else path.with_suffix(".png")
    m = read_metrics(path)
    train, val = m.get("train", []), m.get("val", [])
    steps = [r["step"] for r in train]

    def series(recs, key):
        xs = [r["step"] for r in recs if r.get(key) is not None]
        ys = [r[key] for r in recs if r.get(key) is not None]
        return xs, ys

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    ax.plot(*series(train, "loss"), label="train loss")
    for key in sorted({k for r in train for k in r} - {"loss", "lr", "grad_norm", "images_per_s",
                                                         "images_per_s_total", "rss_mb",
                                                         "cuda_mem_mb", "epoch", "time", "step",
                                                         "kind"}):
        if all(isinstance(r.get(key), (int, float)) for r in train if key in r):
            ax.plot(*series(train, key), label=key, alpha=0.7)
    if val:
        ax.plot(*series(val, "loss"), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if train and min(r["loss"] for r in train) > 0 else "linear")
    ax.legend(fontsize=8)
    ax.set_title("loss")

    ax = axes[0, 1]
    ax.plot(*series(train, "lr"), color="C2")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax2 = ax.twinx()
    ax2.plot(*series(train, "grad_norm"), color="C3", alpha=0.6)
    ax2.set_ylabel("grad norm", color="C3")
    ax.set_title("learning rate and gradient norm")

    ax = axes[1, 0]
    for key, label in (("pixel_f1", "pixel F1"), ("peak_precision", "peak precision"),
                       ("peak_recall", "peak recall"), ("peak_f1", "peak F1")):
        xs, ys = series(val, key)
        if xs:
            ax.plot(xs, ys, "o-", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("validation")
    if val:
        ax.legend(fontsize=8)

    ax = axes[1, 1]
    ax.plot(*series(train, "images_per_s_total"), label="images/s (all processes)")
    ax.plot(*series(train, "images_per_s"), label="images/s (per process)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title("throughput")

    fig.suptitle(f"{path.parent.name}: {len(steps)} steps")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    print(plot_metrics(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
