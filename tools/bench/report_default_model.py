"""Write the ``default-model`` section of docs/benchmarks.md from the shipped model's card.

The figures come from ``peaknet/data/models/peaknet-small-cpu.json`` (filled by
``tools/train_default_model.sh``: ``python -m peaknet.models export`` then ``add-metrics``) and
the training summaries of the run folder (``<work>/train*/summary.json``); nothing is measured
here, so the section always matches the weights that ship.

    python tools/bench/report_default_model.py [--work runs/default-model] [--write-docs]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import ROOT, write_section  # noqa: E402

SECTION = "default-model"
CARD = ROOT / "peaknet" / "data" / "models" / "peaknet-small-cpu.json"


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _training(work: Path) -> list[dict]:
    rows = []
    for d in sorted(work.glob("train*")):
        s = d / "summary.json"
        if s.is_file():
            rows.append({"dir": d.name, **json.loads(s.read_text())})
    return rows


def render(card: dict, work: Path) -> str:
    """Markdown of the section (without its markers)."""
    m = card.get("metrics", {})
    gen, pgen = m.get("model-generated", {}).get("generated"), m.get("pf8-generated", {}).get("generated")
    real, preal = m.get("model-real", {}).get("real"), m.get("pf8-real", {}).get("real")
    thr, min_pix = card.get("threshold"), card.get("min_pix", 1)
    train = _training(work)
    steps = " + ".join(str(t.get("step")) for t in train) or card.get("trained_step")
    minutes = sum(float(t.get("time_s") or 0) for t in train) / 60
    ips = ", ".join(f"{t['dir']} {t['images_per_s']:.1f}" for t in train if t.get("images_per_s"))
    lines = [
        "## Shipped default model (peaknet-small-cpu) vs peakfinder8",
        "",
        "Command: `tools/train_default_model.sh` (simulate, train, export, evaluate, card), then "
        "`python tools/bench/report_default_model.py --write-docs` (this section, from the card "
        "`peaknet/data/models/peaknet-small-cpu.json`).  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}, CPU only "
        f"(training: 1 process, 2 torch threads, {minutes:.1f} min over {len(train)} phase(s), "
        f"images/s: {ips or '-'}; evaluation: 2 threads).  ",
        f"Model: `peaknet/data/models/peaknet-small-cpu.safetensors` ({card.get('preset')} preset, "
        f"{card.get('parameters', 0) / 1e6:.1f}M parameters, stored {card.get('stored_dtype')}, "
        f"loaded float32), {steps} optimizer steps of batch 8 (per-panel 128 x 128 windows). "
        f"Data: {card.get('data')}. Decode: peak probability >= {thr}, peaks of >= {min_pix} "
        "pixels, both tuned on 6 separate generated frames (seeds 31-33) for the best F1.",
        "",
    ]
    if gen and pgen:
        lines += [
            "### Held-out generated frames (seeds 21, 22, 23; 8 frames per detector; truth = the "
            f"shards' detectable peaks, matched within {gen.get('match_distance_px', 3.0):g} px)",
            "",
            "| detector | frames | truth peaks | model found | model P | model R | **model F1** "
            "| pf8 (lcls_cspad) P | pf8 R | pf8 F1 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for det, g in list(gen["by_detector"].items()) + [("**all**", gen)]:
            p = pgen["by_detector"].get(det, pgen) if det != "**all**" else pgen
            lines.append(f"| {det} | {g['frames']} | {g['truth']} | {g['found']} | "
                         f"{_f(g['precision'])} | {_f(g['recall'])} | **{_f(g['f1'])}** | "
                         f"{_f(p['precision'])} | {_f(p['recall'])} | {_f(p['f1'])} |")
        lines.append("")
    if real and preal:
        lines += [
            "### Real thermolysin CSPAD frames (LCLS cxi78513; DIALS-indexed spots matched "
            f"within {real.get('match_distance_px', 2.0):g} px)",
            "",
            "| frame | DIALS spots | model found | model matched | **model recall** | pf8 found "
            "| pf8 matched | **pf8 recall** |",
            "|---|---|---|---|---|---|---|---|",
        ]
        pf = {r["image"]: r for r in preal["frames"]}
        for r in real["frames"]:
            q = pf.get(r["image"], {})
            if "dials_spots" in r:
                lines.append(f"| {r['image']} | {r['dials_spots']} | {r['found']} | {r['matched']} "
                             f"| {_f(r['recall'])} | {q.get('found', '-')} | "
                             f"{q.get('matched', '-')} | {_f(q.get('recall'))} |")
            else:
                lines.append(f"| {r['image']} | - (not indexed) | {r['found']} | - | n/a | "
                             f"{q.get('found', '-')} | - | n/a |")
        lines += [
            f"| **indexed frames** | {real['dials_spots']} | {real['found_on_indexed_frames']} | "
            f"{real['matched']} | **{_f(real['recall'])}** | {preal['found_on_indexed_frames']} | "
            f"{preal['matched']} | **{_f(preal['recall'])}** |",
            "",
        ]
        sens = sorted(((v["threshold"], v["real"]) for k, v in m.items()
                       if k.startswith("model-real-thr") and "real" in v), key=lambda t: -t[0])
        if sens:
            lines += [
                "Decode-threshold sensitivity on the same real frames (a check, not a tuned "
                "figure: the shipped threshold is the one tuned on generated frames):",
                "",
                "| model threshold | peaks found (all frames) | found on the indexed | DIALS spots "
                "matched | recall |",
                "|---|---|---|---|---|",
                f"| {thr} (shipped) | {real['found_all_frames']} | {real['found_on_indexed_frames']} "
                f"| {real['matched']}/{real['dials_spots']} | {_f(real['recall'])} |",
            ]
            for t, r in sens:
                lines.append(f"| {t} | {r['found_all_frames']} | {r['found_on_indexed_frames']} | "
                             f"{r['matched']}/{r['dials_spots']} | {_f(r['recall'])} |")
            lines.append(f"| peakfinder8 lcls_cspad | {preal['found_all_frames']} | "
                         f"{preal['found_on_indexed_frames']} | {preal['matched']}/"
                         f"{preal['dials_spots']} | {_f(preal['recall'])} |")
            lines.append("")
    if gen and real and preal:
        f1_ok, rec_ok = gen["f1"] >= 0.9, real["recall"] >= preal["recall"]
        lines.append(
            f"Aim (F1 >= 0.9 on generated frames; real recall >= peakfinder8's): generated F1 "
            f"{_f(gen['f1'])} ({'met' if f1_ok else 'not met'}); real recall {_f(real['recall'])} "
            f"vs peakfinder8 {_f(preal['recall'])} ({'met' if rec_ok else 'not met'}).")
    if card.get("notes"):
        lines += ["", card["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/default-model", help="tools/train_default_model.sh's folder")
    ap.add_argument("--card", default=str(CARD))
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args(argv)
    text = render(json.loads(Path(a.card).read_text()), Path(a.work))
    print(text)
    if a.write_docs:
        print(f"wrote {write_section(SECTION, text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
