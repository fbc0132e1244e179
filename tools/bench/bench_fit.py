"""Benchmark the label fits: lmfit (reference) vs the batched solver, side by side, one core.

Both solvers fit the *same* windows in one process with one thread (``torch.set_num_threads(1)``,
OMP/MKL threads 1), with the same config (the defaults of ``LabelFitConfig``, plus the CSPAD
tiles and saturation):

- synthetic: ``--synthetic`` seeded windows (known pseudo-Voigt peaks + Poisson noise);
- real: the 239 windows around the DIALS-indexed spots of the three indexed thermolysin CSPAD
  frames (``shared/data/real/thermolysin_cspad``) plus ``--real-copies - 1`` Poisson
  resamplings of them.

Rates are fits per second on one core over the whole set (the batched solver is built to fit
thousands of windows per call; its rate on the 239 original real windows alone is reported
too). Agreement: the fraction of lmfit-converged fits whose centre is within 0.05 px and
reduced chi-square within 2% of lmfit's.

Usage::

    python tools/bench/bench_fit.py                    # print a JSON summary
    python tools/bench/bench_fit.py --write-docs       # also update docs/benchmarks.md

``--write-docs`` rewrites only the section between ``<!-- bench:fit -->`` and
``<!-- /bench:fit -->`` of docs/benchmarks.md (creating the file or the section if absent).
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from peaknet.label import LabelFitConfig, cut_windows  # noqa: E402
from peaknet.label.fit_batched import fit_batched  # noqa: E402
from peaknet.label.fit_lmfit import fit_lmfit, fit_scipy  # noqa: E402
from peaknet.label.pvoigt import IDX, NPARAMS, model, window_grid  # noqa: E402
from peaknet.label.windows import Status  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section  # noqa: E402

SECTION = "fit"


def synthetic(n: int, seed: int, w: int = 9):
    rng = np.random.default_rng(seed)
    y, x = window_grid(w)
    p = np.zeros((n, NPARAMS))
    p[:, IDX["A"]] = rng.uniform(20, 2000, n)
    p[:, IDX["cy"]] = (w - 1) / 2 + rng.uniform(-1, 1, n)
    p[:, IDX["cx"]] = (w - 1) / 2 + rng.uniform(-1, 1, n)
    p[:, IDX["sy"]] = rng.uniform(0.6, 2.0, n)
    p[:, IDX["sx"]] = rng.uniform(0.6, 2.0, n)
    p[:, IDX["gy"]] = p[:, IDX["sy"]] * rng.uniform(0.8, 1.5, n)
    p[:, IDX["gx"]] = p[:, IDX["sx"]] * rng.uniform(0.8, 1.5, n)
    p[:, IDX["eta"]] = rng.uniform(0, 1, n)
    p[:, IDX["a"]] = rng.normal(0, 1, n)
    p[:, IDX["b"]] = rng.normal(0, 1, n)
    p[:, IDX["c"]] = rng.uniform(5, 100, n)
    d = rng.poisson(np.clip(model(p, y, x), 0, None)).astype(np.float64).reshape(n, w, w)
    return d, np.ones_like(d, bool)


def real_windows(cfg: LabelFitConfig):
    from peaknet.io.cbf import cbf_asic_to_stack, read_cbf

    base = None
    for b in (REPO / "shared", REPO.parent / "shared"):
        if (b / "data/real/thermolysin_cspad").is_dir():
            base = b / "data/real/thermolysin_cspad"
    if base is None:
        return None
    rows = list(csv.DictReader(open(base / "dials_indexed_spots.csv")))
    data, good = [], []
    for image in sorted({r["image"] for r in rows}):
        rr = [r for r in rows if r["image"] == image]
        stack = read_cbf(base / image).stack.astype(np.float64)
        mod, ss, fs = cbf_asic_to_stack(np.array([int(r["panel64"]) for r in rr]),
                                        np.array([float(r["fs_px"]) for r in rr]),
                                        np.array([float(r["ss_px"]) for r in rr]))
        w = cut_windows(stack, np.stack([mod, ss, fs], 1), stack > -100, cfg)
        ok = w.status == Status.OK
        data.append(w.data[ok])
        good.append(w.good[ok])
    return np.concatenate(data), np.concatenate(good)


def compare(ref, bat) -> dict:
    dc = np.hypot(bat.params[:, 1] - ref.params[:, 1], bat.params[:, 2] - ref.params[:, 2])
    dr = np.abs(bat.redchi / ref.redchi - 1)
    ok = ref.converged
    agree = (dc < 0.05) & (dr < 0.02)
    return {
        "n": int(len(ref)), "lmfit_converged": int(ok.sum()),
        "batched_converged": int(bat.converged.sum()),
        "agree_frac": float(agree[ok].mean()) if ok.any() else float("nan"),
        "disagree": int((~agree[ok]).sum()),
        "centre_diff_median_px": float(np.median(dc[ok])),
        "centre_diff_p99_px": float(np.percentile(dc[ok], 99)),
        "redchi_reldiff_median": float(np.median(dr[ok])),
    }


def timed(fit, *args):
    """Run a fit; return it with its CPU seconds (process time: the per-core cost, which the
    other work on a shared machine does not inflate the way it inflates wall time)."""
    c0 = time.process_time()
    res = fit(*args)
    res.extra["cpu_s"] = time.process_time() - c0
    return res


def rate(fits) -> float:
    """Fits per CPU-second (per core)."""
    return len(fits) / fits.extra["cpu_s"]


def wall_rate(fits) -> float:
    return len(fits) / fits.seconds


def machine() -> str:
    model_name = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        model_name = m.group(1).strip() if m else model_name
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import lmfit

    return (f"{model_name}, {os.cpu_count()} cores (1 used), Python {platform.python_version()}, "
            f"torch {torch.__version__}, lmfit {lmfit.__version__}, numpy {np.__version__}; "
            f"load average at start {load:.2f}")


def run(args) -> dict:
    torch.set_num_threads(1)
    cfg = LabelFitConfig(device="cpu", batch_size=args.batch_size, tile_shape=(185, 194),
                         saturation=16383.0)
    out = {"config": {"batch_size": cfg.batch_size, "max_nfev": cfg.max_nfev,
                      "restart_nfev": cfg.restart_nfev, "guess_core_fraction": cfg.guess_core_fraction},
           "machine": machine(), "date": datetime.date.today().isoformat()}
    fit_batched(*synthetic(64, 99), cfg)  # warm-up (imports, first allocations)

    d, g = synthetic(args.synthetic, args.seed)
    ref = timed(fit_lmfit, d, g, cfg)
    bat = timed(fit_batched, d, g, cfg)
    out["synthetic"] = {"lmfit_per_s": rate(ref), "batched_per_s": rate(bat),
                        "lmfit_per_s_wall": wall_rate(ref), "batched_per_s_wall": wall_rate(bat),
                        "agreement": compare(ref, bat)}

    rw = real_windows(cfg)
    if rw is not None:
        d0, g0 = rw
        small = timed(fit_batched, d0, g0, cfg)
        rng = np.random.default_rng(args.seed)
        d = np.concatenate([d0] + [rng.poisson(np.clip(d0, 0, None)).astype(np.float64)
                                   for _ in range(args.real_copies - 1)])
        g = np.concatenate([g0] * args.real_copies)
        ref = timed(fit_lmfit, d, g, cfg)
        bat = timed(fit_batched, d, g, cfg)
        out["settings"] = settings_study(d0, g0, cfg)
        out["real"] = {"lmfit_per_s": rate(ref), "batched_per_s": rate(bat),
                       "lmfit_per_s_wall": wall_rate(ref), "batched_per_s_wall": wall_rate(bat),
                       "agreement": compare(ref, bat),
                       "original_239": {"batched_per_s": rate(small),
                                        "agreement": compare(ref.take(slice(0, len(d0))), small)}}
    return out


def settings_study(d, g, cfg) -> dict:
    """lmfit on the real windows with the authors' settings (second moments of all the positive
    signal, 2000 evaluations, no restarts) and with peaknet's defaults, against scipy's TRF
    (an independent referee on the same objective)."""
    import dataclasses

    authors = dataclasses.replace(cfg, guess_core_fraction=0.0, max_nfev=2000, restart_nfev=0)
    sci = fit_scipy(d, g, cfg)
    out = {}
    for name, c in (("authors", authors), ("defaults", cfg)):
        r = fit_lmfit(d, g, c)
        ok = r.converged & sci.converged
        out[name] = {
            "n": int(len(r)), "converged": float(r.converged.mean()),
            "eta_at_1": float((r.params[:, IDX["eta"]] > 0.999).mean()),
            "redchi_over_scipy_median": float(np.median(r.chisqr[ok] / sci.chisqr[ok])),
            "within_2pct_of_scipy": float((r.chisqr[ok] <= 1.02 * sci.chisqr[ok]).mean()),
        }
    return out


def markdown(res: dict, command: str) -> str:
    lines = ["## Label fits: lmfit vs the batched solver (one core)", "",
             f"- Command: `{command}`", f"- Date: {res['date']}", f"- Machine: {res['machine']}",
             f"- Config: {res['config']} (defaults of `LabelFitConfig`, CSPAD tiles and "
             "saturation); `torch.set_num_threads(1)`, one process, both solvers on the same "
             "windows in the same run.", "",
             "Rates are fits per CPU-second of the process (one thread: the per-core rate); wall-clock "
             "rates in parentheses.", "",
             "| windows | lmfit fits/s/core | batched fits/s/core | speed-up | agree (0.05 px, "
             "2% redchi) | converged lmfit / batched |", "|---|---|---|---|---|---|"]
    for key, label in (("synthetic", "synthetic (known peaks + Poisson noise)"),
                       ("real", "real-like: the 239 real windows and Poisson resamplings")):
        r = res.get(key)
        if not r:
            continue
        a = r["agreement"]
        lines.append(
            f"| {label}, {a['n']} | {r['lmfit_per_s']:.1f} ({r['lmfit_per_s_wall']:.1f}) | "
            f"{r['batched_per_s']:.0f} ({r['batched_per_s_wall']:.0f}) | "
            f"{r['batched_per_s'] / r['lmfit_per_s']:.1f}x | {a['agree_frac']:.4f} "
            f"({a['disagree']} of {a['lmfit_converged']} differ) | "
            f"{a['lmfit_converged']} / {a['batched_converged']} |")
    if "real" in res:
        o = res["real"]["original_239"]
        lines.append(
            f"| **real**: the 239 windows of the DIALS-indexed spots alone (lmfit: first rows "
            f"above) | (as above) | {o['batched_per_s']:.0f} | "
            f"{o['batched_per_s'] / res['real']['lmfit_per_s']:.1f}x | {o['agreement']['agree_frac']:.4f} "
            f"({o['agreement']['disagree']} of {o['agreement']['lmfit_converged']} differ) | "
            f"{o['agreement']['lmfit_converged']} / {o['agreement']['batched_converged']} |")
    lines += ["",
              "Agreement is over the fits lmfit converges on. Centre differences: "
              + "; ".join(f"{k} median {res[k]['agreement']['centre_diff_median_px']:.1e} px, "
                          f"p99 {res[k]['agreement']['centre_diff_p99_px']:.1e} px"
                          for k in ("synthetic", "real") if k in res) + ".",
              "The batched solver runs MINPACK's lmdif step for step (see "
              "`peaknet/label/fit_batched.py`), so it lands in lmfit's minimum, not just near it. "
              "Its cost per pass is shared by the windows in flight: small calls (one frame's "
              "peaks) pay for the slowest window's passes; fit many frames' peaks per call. "
              "The real-like set adds Poisson resamplings of the real windows (noisier than the "
              "originals, so more of them are ambiguous: a few fits land in different minima along "
              "the model's near-degenerate directions, e.g. Lorentzian widths when eta ~ 0); the "
              "genuine real peaks are the 239 DIALS-indexed spots.",
              "The machine is shared with other jobs (see the load average): compare rates "
              "measured in the same run."]
    st = res.get("settings")
    if st:
        lines += ["", "Why the defaults differ from the authors' settings, lmfit alone on the 239 real "
                  "windows, against scipy's TRF on the same objective (an independent referee):", "",
                  "| lmfit settings | converged | eta at its bound 1 | chi-square / scipy's (median) "
                  "| within 2% of scipy's chi-square |", "|---|---|---|---|---|"]
        for key, label in (("authors", "authors': sigma from all positive signal, max_nfev 2000, "
                                       "no restarts"),
                           ("defaults", "peaknet: sigma from the half-maximum core, max_nfev 4000, "
                                        "restart every 500")):
            a = st[key]
            lines.append(f"| {label} | {a['converged']:.1%} | {a['eta_at_1']:.1%} | "
                         f"{a['redchi_over_scipy_median']:.3f} | {a['within_2pct_of_scipy']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", type=int, default=4096, help="synthetic windows")
    ap.add_argument("--real-copies", type=int, default=16, help="real windows x this (resampled)")
    ap.add_argument("--batch-size", type=int, default=LabelFitConfig().batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args(argv)
    res = run(args)
    command = "python tools/bench/bench_fit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.write_docs:
        write_section(SECTION, markdown(res, command.strip()), REPO / "docs" / "benchmarks.md")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
