"""Submit any peaknet stage to Slurm with submitit: the Python twin of ``slurm/<stage>.sbatch``.

    from peaknet.launch.submitit_launcher import submit_stage

    job = submit_stage("label", "label.toml", ["--run.out=runs/label"],
                       folder="runs/label/submitit", nodes=2, tasks_per_node=32,
                       timeout_min=120, slurm_partition="milano")
    summary = job.results()[0]   # rank 0's summary (dict); the other tasks return {}

or from a shell::

    python -m peaknet.launch.submitit_launcher label --config label.toml --tasks-per-node 32 \\
        --nodes 2 --partition milano --folder runs/label/submitit --wait -- --run.out=runs/label

Every Slurm task runs :class:`StageTask`, which calls :func:`peaknet.cli.run_stage` in the task's
own Python (the same typed config, saved config and summary as ``peaknet <stage>``). With more
than one task, submitit's ``srun`` gets ``--mpi=pmi2`` so that mpi4py sees one world (stages
with an MPI backend, e.g. ``label`` with ``run.backend = "auto"`` or ``"mpi"``, split their
shards over it). On preemption or timeout the job is requeued with the same arguments; sharded
stages resume from their complete shards.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["StageTask", "submit_stage", "make_executor", "stage_argv", "main"]


@dataclass
class StageTask:
    """What submitit runs in every task: ``peaknet.cli.run_stage(stage, argv)``.

    Returns the stage's summary (rank 0; other ranks of an MPI stage return ``{}``): use
    ``job.result()`` for one task, ``job.results()[0]`` for several.
    """

    stage: str
    argv: list = field(default_factory=list)

    def __call__(self) -> dict:
        import peaknet.cli

        return peaknet.cli.run_stage(self.stage, list(self.argv))

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / timeout hook: requeue the same task (it resumes)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def stage_argv(config, overrides: Sequence[str]) -> list:
    """The stage's command line: ``--config FILE`` (if any) and ``--section.key=value`` items."""
    return (["--config", str(config)] if config else []) + [
        o if o.startswith("--") else f"--{o}" for o in overrides]


def make_executor(folder, *, nodes: int = 1, tasks_per_node: int = 1,
                  cpus_per_task: Optional[int] = None, gpus_per_node: int = 0,
                  mem_gb: Optional[float] = None, timeout_min: int = 60,
                  cluster: Optional[str] = None, name: str = "peaknet", mpi: str = "pmi2",
                  **slurm):
    """A submitit AutoExecutor with peaknet's resources set: nodes x tasks_per_node tasks,
    ``srun --mpi=<mpi>`` when there is more than one task, ``slurm_*`` parameters passed on
    (and dropped for the local/debug executors)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict = dict(nodes=nodes, tasks_per_node=tasks_per_node, timeout_min=timeout_min,
                        name=name)
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if mem_gb:
        params["mem_gb"] = mem_gb
    if mpi and nodes * tasks_per_node > 1:
        params["slurm_srun_args"] = [f"--mpi={mpi}", *slurm.pop("slurm_srun_args", [])]
    params.update(slurm)
    if ex.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    ex.update_parameters(**params)
    return ex


def submit_stage(stage: str, config: Optional[str | Path] = None, overrides: Sequence[str] = (), *,
                 folder: str | Path, nodes: int = 1, tasks_per_node: int = 1,
                 cpus_per_task: Optional[int] = None, gpus_per_node: int = 0,
                 mem_gb: Optional[float] = None, timeout_min: int = 60,
                 cluster: Optional[str] = None, job_name: Optional[str] = None,
                 mpi: str = "pmi2", **slurm):
    """Submit ``peaknet <stage>`` and return the submitit Job.

    config: TOML file (None: defaults); overrides: ``section.key=value`` strings (a leading
    ``--`` is optional); folder: submitit's log folder; nodes x tasks_per_node tasks (MPI ranks
    for sharded stages); cpus_per_task, gpus_per_node, mem_gb, timeout_min: resources;
    cluster: submitit's (None: Slurm where available; "local" / "debug" to try it out);
    mpi: ``srun --mpi=`` value when there is more than one task ("" to leave srun alone);
    ``slurm``: more submitit parameters: ``slurm_partition``, ``slurm_account``,
    ``slurm_additional_parameters``, ...
    """
    from peaknet.cli import STAGES

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    argv = stage_argv(config, overrides)
    ex = make_executor(folder, nodes=nodes, tasks_per_node=tasks_per_node,
                       cpus_per_task=cpus_per_task, gpus_per_node=gpus_per_node, mem_gb=mem_gb,
                       timeout_min=timeout_min, cluster=cluster,
                       name=job_name or f"peaknet-{stage}", mpi=mpi, **slurm)
    return ex.submit(StageTask(stage, argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m peaknet.launch.submitit_launcher",
                                description="submit a peaknet stage to Slurm with submitit")
    p.add_argument("stage")
    p.add_argument("--config")
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
    job = submit_stage(a.stage, a.config, rest, folder=a.folder, nodes=a.nodes,
                       tasks_per_node=a.tasks_per_node, cpus_per_task=a.cpus_per_task,
                       gpus_per_node=a.gpus_per_node, mem_gb=a.mem_gb,
                       timeout_min=a.timeout_min, cluster=a.cluster, **extra)
    print(f"submitted {a.stage}: job {job.job_id} (logs in {a.folder})", flush=True)
    if a.wait:
        print(json.dumps(job.results()[0], default=str, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
