"""Submit pre-training or distillation with submitit: the Python twin of ``slurm/*.sbatch``.

    from peaknet.launch.submitit_train import submit_train

    job = submit_train("pretrain", "peaknet/data/configs/pretrain-teacher.toml",
                       ["--run.out=runs/teacher"], folder="runs/teacher/submitit",
                       nodes=2, nproc_per_node=4, gpus_per_node=4, timeout_min=240,
                       slurm_partition="ampere")
    summary = job.result()          # the run's summary (dict), from node 0

or from a shell::

    python -m peaknet.launch.submitit_train pretrain --config F --nodes 2 --nproc-per-node 4 \
        --gpus-per-node 4 --folder runs/teacher/submitit -- --run.out=runs/teacher

Two ways to start the processes:

- ``per_process=False`` (default, like the sbatch templates): submitit starts one task per
  node; each task (:class:`TorchrunTask`) runs ``python -m torch.distributed.run --nnodes N
  --nproc_per_node P --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id JOB -m
  jobs.<stage> ARGS`` with the rendezvous taken from Slurm's variables
  (:func:`peaknet.cluster.slurm_rendezvous`: the first node of the job, a port derived from the
  job id). Outside Slurm (``cluster="local"``) it runs ``--standalone``.
- ``per_process=True``: the generic launcher (:func:`peaknet.launch.submitit_launcher.submit_stage`)
  starts P Slurm tasks per node, each one training process running ``peaknet.cli.run_stage``;
  :func:`peaknet.train.parallelize.init_distributed` takes rank, world size and rendezvous from
  Slurm's variables. Needs the ``train`` / ``distill`` stages registered in ``peaknet.cli``.

On preemption or timeout submitit requeues the job; the training resumes from its latest
checkpoint (``checkpoint.resume = "auto"``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["TorchrunTask", "torchrun_command", "submit_train", "main"]

REPO = Path(__file__).resolve().parents[2]
ENTRIES = {"pretrain": "jobs.pretrain", "train": "jobs.pretrain", "distill": "jobs.distill"}


def torchrun_command(entry: str, argv: Sequence[str], nproc_per_node: int,
                     python: Optional[str] = None, environ=None) -> list[str]:
    """The torchrun command line for this node (rendezvous from Slurm, else standalone)."""
    from peaknet.cluster import slurm_rendezvous

    py = python or sys.executable
    cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    rdv = slurm_rendezvous(environ)
    if rdv is None:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(rdv.num_nodes), "--rdzv_id", str(rdv.job_id),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{rdv.master_addr}:{rdv.master_port}"]
    return cmd + ["-m", entry, *map(str, argv)]


@dataclass
class TorchrunTask:
    """What submitit runs on every node: torchrun of ``entry`` with ``argv``.

    Returns the summary rank 0 prints (a dict) on the node that runs rank 0, else None.
    """

    entry: str
    argv: list = field(default_factory=list)
    nproc_per_node: int = 1
    repo: str = str(REPO)
    python: Optional[str] = None

    def __call__(self) -> Optional[dict]:
        cmd = torchrun_command(self.entry, self.argv, self.nproc_per_node, self.python)
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
            env.pop(k, None)  # torchrun sets them for its children
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.repo, env.get("PYTHONPATH")]))
        print(" ".join(cmd), flush=True)
        summary = None
        with subprocess.Popen(cmd, cwd=self.repo, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                s = line.strip()
                if s.startswith("{") and s.endswith("}"):
                    try:
                        summary = json.loads(s)
                    except json.JSONDecodeError:
                        pass
            rc = proc.wait()
        sys.stdout.flush()
        if rc != 0:
            raise RuntimeError(f"torchrun exited with {rc}: {' '.join(cmd)}")
        return summary

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / timeout hook: requeue the same task (it resumes)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def submit_train(stage: str, config: Optional[str], overrides: Sequence[str] = (), *,
                 folder: str | Path, nodes: int = 1, nproc_per_node: int = 1,
                 gpus_per_node: int = 0, cpus_per_task: Optional[int] = None,
                 timeout_min: int = 60, cluster: Optional[str] = None, python: Optional[str] = None,
                 job_name: Optional[str] = None, per_process: bool = False, **slurm):
    """Submit ``stage`` ("pretrain" / "train" or "distill") and return the submitit Job.

    config: TOML config (None: defaults); overrides: ``--section.key=value`` strings;
    folder: submitit's log folder; nodes, nproc_per_node: the topology (one submitit task per
    node, torchrun starts ``nproc_per_node`` processes on it); gpus_per_node, cpus_per_task,
    timeout_min: resources; cluster: submitit's (None: Slurm if available, "local" to debug);
    python: the interpreter on the nodes (default: this one); per_process: one Slurm task per
    process through the generic launcher instead of torchrun (see the module doc); ``slurm``:
    more submitit parameters (``slurm_partition="..."``, ``slurm_account=...``, ...).
    """
    if stage not in ENTRIES:
        raise ValueError(f"stage must be one of {sorted(ENTRIES)}, not {stage!r}")
    if per_process:
        from peaknet.launch.submitit_launcher import submit_stage

        return submit_stage("distill" if stage == "distill" else "train", config, overrides,
                            folder=folder, nodes=nodes, tasks_per_node=nproc_per_node,
                            cpus_per_task=cpus_per_task, gpus_per_node=gpus_per_node,
                            timeout_min=timeout_min, cluster=cluster, job_name=job_name,
                            mpi="", **slurm)
    from peaknet.launch.submitit_launcher import make_executor, stage_argv

    argv = stage_argv(config, overrides)
    # one submitit task per node: torchrun starts the processes, so srun gets no --mpi
    ex = make_executor(folder, nodes=nodes, tasks_per_node=1, cpus_per_task=cpus_per_task,
                       gpus_per_node=gpus_per_node, timeout_min=timeout_min, cluster=cluster,
                       name=job_name or f"peaknet-{stage}", mpi="", **slurm)
    task = TorchrunTask(ENTRIES[stage], argv, nproc_per_node, str(REPO), python)
    return ex.submit(task)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m peaknet.launch.submitit_train",
                                description="submit peaknet pre-training / distillation")
    p.add_argument("stage", choices=sorted(ENTRIES))
    p.add_argument("--config")
    p.add_argument("--folder", required=True, help="submitit log folder")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--timeout-min", type=int, default=60)
    p.add_argument("--partition")
    p.add_argument("--cluster", help="submitit cluster: slurm (default where available) or local")
    p.add_argument("--per-process", action="store_true",
                   help="one Slurm task per process (generic launcher) instead of torchrun")
    p.add_argument("--wait", action="store_true", help="wait and print the summary")
    a = p.parse_args(argv)
    extra = {"slurm_partition": a.partition} if a.partition else {}
    job = submit_train(a.stage, a.config, rest, folder=a.folder, nodes=a.nodes,
                       nproc_per_node=a.nproc_per_node, gpus_per_node=a.gpus_per_node,
                       cpus_per_task=a.cpus_per_task, timeout_min=a.timeout_min,
                       cluster=a.cluster, per_process=a.per_process, **extra)
    print(f"submitted {a.stage}: job {job.job_id} (logs in {a.folder})", flush=True)
    if a.wait:
        print(json.dumps(job.result(), default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
