"""The private Slurm, MPI, Ray and submitit, for real (no mocks): tools/cluster + peaknet.cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peaknet.cluster import (
    SlurmCluster,
    SlurmJobError,
    expand_nodelist,
    slurm_binaries_missing,
    slurm_rendezvous,
)

pytestmark = pytest.mark.timeout(180)  # a hung launcher fails in 3 minutes, not 10

PY = sys.executable  # the venv's python: it has mpi4py, ray, submitit
MPIEXEC = str(Path(PY).parent / "mpiexec")

# Rank 0 gathers every rank's record and prints them, one line each: two ranks printing at once can
# interleave their lines on a shared stdout ("RANKRANK {...}").
MPI_SNIPPET = (
    "import json; from mpi4py import MPI; from peaknet.cluster import slurm_rendezvous; "
    "c = MPI.COMM_WORLD; r = slurm_rendezvous(); "
    "rec = {'rank': c.rank, 'size': c.size, 'sum': c.allreduce(c.rank + 1), "
    "'rdv': None if r is None else [r.rank, r.world_size, r.local_rank, r.master_addr, r.master_port]}; "
    "recs = c.gather(rec, root=0); "
    "[print('RANK', json.dumps(x), flush=True) for x in (recs or [])]"
)


def _ranks(output: str) -> list[dict]:
    return sorted((json.loads(line.split("RANK", 1)[1]) for line in output.splitlines()
                   if line.startswith("RANK ")), key=lambda d: d["rank"])


# ----- pure helpers (no cluster) ---------------------------------------------------------------

def test_expand_nodelist():
    assert expand_nodelist("vm") == ["vm"]
    assert expand_nodelist("gpu[001-003,7],login1") == ["gpu001", "gpu002", "gpu003", "gpu7", "login1"]
    assert expand_nodelist("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]
    assert expand_nodelist("") == []


def test_slurm_rendezvous_table():
    assert slurm_rendezvous({}) is None
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "nid[007-008]",
           "SLURM_TASKS_PER_NODE": "4(x2)"}
    r = slurm_rendezvous(env)
    assert (r.rank, r.world_size, r.local_rank, r.local_world_size, r.node_rank) == (5, 8, 1, 4, 1)
    assert r.nodes == ("nid007", "nid008") and r.master_addr == "nid007"
    assert r.master_port == 20000 + 4242 % 20000 and not r.is_main
    assert r.torch_env()["WORLD_SIZE"] == "8" and r.torch_env()["LOCAL_RANK"] == "1"
    r = slurm_rendezvous({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
                          "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "nid008"})
    assert (r.master_addr, r.master_port, r.world_size, r.nodes) == ("10.0.0.1", 1234, 2, ("nid008",))


# ----- MPI without Slurm --------------------------------------------------------------------------

@pytest.mark.mpi
def test_mpiexec_allreduce():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_"))}
    p = subprocess.run([MPIEXEC, "-n", "2", PY, "-c", MPI_SNIPPET], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    ranks = _ranks(p.stdout)
    assert [(d["rank"], d["size"], d["sum"]) for d in ranks] == [(0, 2, 3), (1, 2, 3)], p.stdout
    assert all(d["rdv"] is None for d in ranks)  # not a Slurm job


# ----- Slurm ----------------------------------------------------------------------------------------

@pytest.mark.slurm
def test_cluster_is_up_and_idempotent(slurm_cluster):
    assert slurm_cluster.is_up()
    pids = [(slurm_cluster.dir / f).read_text() for f, _ in slurm_cluster._pidfiles]
    slurm_cluster.start()  # a second slurm_up.sh keeps the running daemons
    assert [(slurm_cluster.dir / f).read_text() for f, _ in slurm_cluster._pidfiles] == pids
    p = slurm_cluster.run(["sinfo", "-h", "-o", "%P %a %D"])
    assert p.stdout.split()[:3] == [slurm_cluster.partition + "*", "up", "1"], p.stdout
    assert (slurm_cluster.root / "env.sh").is_file()


@pytest.mark.slurm
@pytest.mark.mpi
def test_sbatch_srun_pmi2_two_ranks(slurm_cluster):
    script = f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --time=5
#SBATCH --job-name=pk-mpi
set -e
srun --mpi=pmi2 {PY} -c "{MPI_SNIPPET}"
"""
    res = slurm_cluster.sbatch(script, timeout=120)
    ranks = _ranks(res.output)
    assert [(d["rank"], d["size"], d["sum"]) for d in ranks] == [(0, 2, 3), (1, 2, 3)], res.output
    for d in ranks:  # slurm_rendezvous inside the srun step
        rank, world, local, addr, port = d["rdv"]
        assert (rank, world, local, addr) == (d["rank"], 2, d["rank"], slurm_cluster.node)
        assert port == 20000 + int(res.job_id) % 20000


@pytest.mark.slurm
def test_sbatch_array_and_sacct_standin(slurm_cluster):
    res = slurm_cluster.sbatch('#!/bin/bash\necho "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID"\n',
                               options=["--array=0-3", "--time=2"], timeout=120)
    keys = [f"{res.job_id}_{i}" for i in range(4)]
    assert list(res.states) == keys and set(res.states.values()) == {"COMPLETED"}, res.states
    for i, k in enumerate(keys):
        assert res.outputs[k].strip() == f"task {i} of {res.job_id}"
    # the sacct stand-in answers what submitit asks
    from submitit.slurm.slurm import SlurmInfoWatcher

    p = slurm_cluster.run(["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", res.job_id])
    info = SlurmInfoWatcher().read_info(p.stdout)
    assert {k: info[k]["State"] for k in keys} == dict.fromkeys(keys, "COMPLETED"), p.stdout
    assert info[keys[0]]["NodeList"] == slurm_cluster.node


@pytest.mark.slurm
def test_sbatch_failure_and_args(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/bash\necho "args: $*"; echo "python: $(command -v python)"; exit 3\n')
    with pytest.raises(SlurmJobError) as err:
        slurm_cluster.sbatch(script, "a b", "c", options=["--time=1"], cwd=tmp_path, timeout=60)
    res = err.value.result
    assert res.state == "FAILED" and list(res.exit_codes.values()) == ["3:0"]
    assert "args: a b c" in res.output
    # the repo's venv is first on the job's PATH
    assert f"python: {slurm_cluster.venv / 'bin' / 'python'}" in res.output


@pytest.mark.slurm
def test_submitit_autoexecutor(slurm_cluster, slurm_env, tmp_path):
    import submitit
    from submitit.core.utils import UncompletedJobError

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=5, cpus_per_task=1)
    job = ex.submit(pow, 2, 10)
    assert job.result() == 1024
    # a job that dies without writing its result: found out through the sacct stand-in
    job = ex.submit(os._exit, 3)
    job._results_timeout_s = 0
    t0 = time.monotonic()
    with pytest.raises(UncompletedJobError, match="FAILED"):
        job.result()
    assert time.monotonic() - t0 < 60


@pytest.mark.slurm
@pytest.mark.slow
def test_second_private_cluster_up_down(tmp_path):
    """slurm_up.sh / slurm_down.sh on another folder: up, a job, down with no daemon left."""
    if slurm_binaries_missing():
        pytest.skip("Slurm not installed")
    c = SlurmCluster(root=tmp_path / "c")
    c.start()
    try:
        assert c.is_up() and c.started_here
        assert c.sbatch("#!/bin/bash\nhostname -s\n", timeout=60).output.strip() == c.node
    finally:
        pids = [int((c.dir / f).read_text()) for f, _ in c._pidfiles if (c.dir / f).exists()]
        c.stop()
    assert len(pids) == 3 and not c.is_up()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    c.stop()  # idempotent


# ----- Ray ------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_ray_head_actor(ray_head):
    import ray
    from ray._private import ray_constants

    assert ray_head.address.startswith("127.0.0.1:")
    # else the driver resolves 127.0.0.1 to eth0's address and ray.init retries for ever
    assert not ray_constants.ENABLE_RAY_CLUSTER, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was not set before `import ray`"
    ray.init(address=ray_head.address, log_to_driver=False, namespace="peaknet-test")
    try:
        @ray.remote
        class Counter:
            def __init__(self):
                self.n = 0

            def add(self, k):
                self.n += k
                return self.n

        c = Counter.remote()
        assert ray.get([c.add.remote(i) for i in range(1, 5)])[-1] == 10
        assert ray.get_runtime_context().gcs_address == ray_head.address
    finally:
        ray.shutdown()
