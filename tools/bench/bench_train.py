"""Training throughput of PeakNet on CPU: images per second per process.

    .venv/bin/python tools/bench/bench_train.py --preset small-cpu --sizes 64,128,256 \
        --batch 2 --steps 6 --nproc 1,2 --write-docs

For each input size, one training step = forward + focal loss + backward + gradient clipping +
AdamW step on a micro-batch of ``--batch`` synthetic z-scored images (bright spots on noise,
labels = the spots), exactly the operations of :class:`peaknet.train.trainer.Trainer` without
data loading. ``--nproc 1`` runs the plain model in this process (``--threads`` torch threads);
``--nproc N`` (N > 1) runs the same under ``torchrun --standalone --nproc_per_node=N`` with FSDP2
(ZeRO-2, gloo, one thread per process, as torchrun sets it). The figure is the median over
``--steps`` timed steps after ``--warmup`` steps. ``--write-docs`` replaces the section between
``<!-- bench:train -->`` and ``<!-- /bench:train -->`` of docs/benchmarks.md (creating the file
or the section if absent) and touches nothing else.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DOCS = REPO / "docs" / "benchmarks.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section  # noqa: E402

SECTION = "train"


def synthetic_batch(batch: int, size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 1, size, size, generator=g)
    label = torch.zeros(batch, size, size, dtype=torch.int64)
    n = max(4, size * size // 2000)
    ys = torch.randint(2, size - 2, (batch, n), generator=g)
    xs = torch.randint(2, size - 2, (batch, n), generator=g)
    for b in range(batch):
        for y, x in zip(ys[b].tolist(), xs[b].tolist()):
            img[b, 0, y - 1:y + 2, x - 1:x + 2] += 6.0
            label[b, y - 1:y + 2, x - 1:x + 2] = 1
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    return img, label, valid


def measure(preset: str, sizes: list[int], batch: int, steps: int, warmup: int,
            mode: str = "zero2") -> dict:
    """Per-size median step time and images/s of this process (collective under torchrun)."""
    import psutil
    import torch

    from peaknet.model import focal_loss
    from peaknet.train.config import FsdpSection, ModelSection, OptimSection
    from peaknet.train.parallelize import all_reduce, clip_grad_norm, init_distributed
    from peaknet.train.trainer import build_model, build_optimizer

    env = init_distributed("cpu")
    model, info = build_model(ModelSection(preset=preset),
                              FsdpSection(mode=mode, mixed_precision="fp32"), env, seed=0)
    opt = build_optimizer(model, OptimSection())
    out = {"world_size": env.world_size, "mode": info.mode, "threads": torch.get_num_threads(),
           "sizes": {}}
    for size in sizes:
        img, label, valid = synthetic_batch(batch, size, seed=env.rank)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            logits = model(img)
            loss = focal_loss(logits, label, mask=valid)
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
        med = statistics.median(times)
        slowest = all_reduce([med], env, op="max")[0]
        out["sizes"][size] = {"step_s": med, "images_per_s": batch / med,
                              "images_per_s_all": env.world_size * batch / slowest}
    out["rss_mb"] = all_reduce([psutil.Process().memory_info().rss / 2**20], env, op="max")[0]
    if env.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out


def run_torchrun(nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "res.json"
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
               f"--nproc_per_node={nproc}", __file__, "--worker", str(res),
               "--preset", args.preset, "--sizes", args.sizes, "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        subprocess.run(cmd, check=True, cwd=REPO)
        return json.loads(res.read_text())


def report(results: dict, args, cmdline: str) -> str:
    load = os.getloadavg()[0]
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sizes = [int(s) for s in args.sizes.split(",")]
    lines = [
        f"## Training throughput: {args.preset} on CPU",
        "",
        f"Command: `{cmdline}`  ",
        f"Date: {now}. Machine: {cpu}, nproc {os.cpu_count()} (load average {load:.1f} at the "
        "end; the machine is shared, so absolute figures move with its load).  ",
        f"Step: forward + focal loss + backward + clip 1.0 + AdamW on a micro-batch of "
        f"{args.batch} synthetic images (no data loading), median of {args.steps} steps after "
        f"{args.warmup} warm-up steps, float32.",
        "",
        "| processes | mode | threads/process | " + " | ".join(
            f"{s}x{s} img/s per process (all)" for s in sizes) + " | max RSS MB |",
        "|---|---|---|" + "---|" * len(sizes) + "---|",
    ]
    for n, r in results.items():
        cells = []
        for s in sizes:
            d = r["sizes"][str(s)] if str(s) in r["sizes"] else r["sizes"][s]
            cells.append(f"{d['images_per_s']:.1f} ({d['images_per_s_all']:.1f})")
        lines.append(f"| {n} | {r['mode']} | {r['threads']} | " + " | ".join(cells)
                     + f" | {r['rss_mb']:.0f} |")
    lines += ["", "ZeRO-2 over gloo adds a reduce-scatter of the gradients and an all-gather of "
              "the parameters every step; on one machine the processes also share its cores."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--sizes", default="64,128,256")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", default="1,2", help="process counts, e.g. 1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --nproc 1")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        res = measure(args.preset, sizes, args.batch, args.steps, args.warmup)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.worker).write_text(json.dumps(res))
        return 0
    import torch

    results = {}
    for n in [int(x) for x in args.nproc.split(",")]:
        if n == 1:
            torch.set_num_threads(args.threads)
            results[n] = json.loads(json.dumps(measure(args.preset, sizes, args.batch, args.steps,
                                                       args.warmup)))
        else:
            results[n] = run_torchrun(n, args)
        print(json.dumps({n: results[n]}), flush=True)
    cmdline = ".venv/bin/python tools/bench/bench_train.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    text = report(results, args, cmdline)
    print(text)
    if args.write_docs:
        write_section(SECTION, text)
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
