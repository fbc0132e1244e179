"""Submit ``peaknet infer`` with submitit: the Python twin of ``slurm/infer*.sbatch``.

    from peaknet.launch.submitit_infer import submit_infer

    job = submit_infer("infer.toml", ["--run.out=runs/infer"], folder="runs/infer/submitit",
                       mode="legacy", tasks_per_node=8, timeout_min=120,
                       slurm_partition="milano")
    summary = job.result()          # rank 0's summary (dict)

or from a shell::

    python -m peaknet.launch.submitit_infer --config infer.toml --mode hybrid \\
        --tasks-per-node 4 --folder runs/infer/submitit --wait -- --ray.address=HOST:PORT

Every Slurm task runs :class:`InferTask`, i.e. :func:`peaknet.infer.stage.run_job` (the same
typed config, saved config and summary as ``peaknet infer``); with more than one task srun gets
``--mpi=pmi2`` so the tasks form one MPI world (producers for ``hybrid``, ranks for ``legacy``).

``mode="hybrid"`` needs Ray: give ``--ray.address`` of a running cluster, or, on a single node,
nothing (rank 0 starts a private loopback Ray for the job). Multi-node hybrid runs that start
their own Ray cluster are what ``slurm/infer.sbatch`` does (a head plus a ``ray start`` per
node); submitit has no hook for that. On preemption or timeout the job is requeued with the
same arguments and resumes from its finished shards.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["InferTask", "submit_infer", "main"]


@dataclass
class InferTask:
    """What submitit runs in every task: ``run_job(argv, mode)``; returns the summary on
    rank 0 (``{}`` on other ranks)."""

    argv: list = field(default_factory=list)
    mode: str = "hybrid"

    def __call__(self) -> dict:
        from peaknet.infer.stage import run_job

        return run_job(list(self.argv), self.mode)

    def checkpoint(self, *args, **kwargs):
        """Preemption / timeout: requeue the same task (finished shards are kept)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def submit_infer(config: Optional[str | Path] = None, overrides: Sequence[str] = (), *,
                 folder: str | Path, mode: str = "hybrid", nodes: int = 1,
                 tasks_per_node: int = 1, cpus_per_task: Optional[int] = None,
                 gpus_per_node: int = 0, mem_gb: Optional[float] = None, timeout_min: int = 60,
                 cluster: Optional[str] = None, job_name: Optional[str] = None,
                 mpi: str = "pmi2", **slurm):
    """Submit ``peaknet infer`` and return the submitit Job.

    config: TOML file (None: defaults); overrides: ``section.key=value`` strings (leading ``--``
    optional); folder: submitit's log folder; mode: ``hybrid`` or ``legacy``; nodes x
    tasks_per_node MPI ranks; cpus_per_task, gpus_per_node, mem_gb, timeout_min: resources;
    cluster: submitit's (None: Slurm where available; ``local``/``debug`` to try it out);
    mpi: ``srun --mpi=`` value with more than one task (``""`` leaves srun alone); ``slurm``:
    more submitit parameters (``slurm_partition``, ``slurm_account``, ...).
    """
    if mode not in ("hybrid", "legacy"):
        raise ValueError(f"mode must be 'hybrid' or 'legacy', not {mode!r}")
    from .submitit_launcher import make_executor, stage_argv

    argv = stage_argv(config, overrides)
    ex = make_executor(folder, nodes=nodes, tasks_per_node=tasks_per_node,
                       cpus_per_task=cpus_per_task, gpus_per_node=gpus_per_node, mem_gb=mem_gb,
                       timeout_min=timeout_min, cluster=cluster,
                       name=job_name or f"peaknet-infer-{mode}", mpi=mpi, **slurm)
    return ex.submit(InferTask(argv, mode))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m peaknet.launch.submitit_infer",
                                description="submit peaknet infer to Slurm with submitit")
    p.add_argument("--config")
    p.add_argument("--mode", default="hybrid", choices=("hybrid", "legacy"))
    p.add_argument("--folder", required=True, help="submitit log folder")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1)
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--mem-gb", type=float)
    p.add_argument("--timeout-min", type=int, default=60)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--cluster", help="submitit cluster: slurm (default where available), local, debug")
    p.add_argument("--wait", action="store_true", help="wait and print the summary")
    a = p.parse_args(argv)
    extra = {k: v for k, v in (("slurm_partition", a.partition), ("slurm_account", a.account)) if v}
    job = submit_infer(a.config, rest, folder=a.folder, mode=a.mode, nodes=a.nodes,
                       tasks_per_node=a.tasks_per_node, cpus_per_task=a.cpus_per_task,
                       gpus_per_node=a.gpus_per_node, mem_gb=a.mem_gb,
                       timeout_min=a.timeout_min, cluster=a.cluster, **extra)
    print(f"submitted infer ({a.mode}): job {job.job_id} (logs in {a.folder})", flush=True)
    if a.wait:
        print(json.dumps(job.result(), default=str, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
