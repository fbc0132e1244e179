"""Session fixtures: a private single-node Slurm and a loopback Ray head (tools/cluster).

- ``slurm_cluster``: a :class:`peaknet.cluster.SlurmCluster`, started once per session (or a
  running one reused: a person's, or another session's) and stopped at the end when this
  session started it and nobody else holds it. Its ``.sbatch(script, *args, options=[...])``
  submits with the repo's venv first on PATH and waits.
- ``slurm_env``: per test, points os.environ at the cluster (SLURM_CONF, PATH with the sacct
  stand-in): needed by code that calls sbatch itself, e.g. submitit.
- ``ray_head``: a :class:`peaknet.cluster.RayHead`; connect with
  ``ray.init(address=ray_head.address)`` (or ``ray_head.connect()``) and call
  ``ray.shutdown()`` at the end of the test. This conftest sets
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the whole session (needed for a loopback head).

Without the Slurm binaries the Slurm tests are skipped, with the reason. Set
PEAKNET_REQUIRE_CLUSTER=1 (tools/run_tests.sh does) to make that a failure instead.
"""
from __future__ import annotations

import os

import pytest

# Ray reads this when imported: without it a driver resolves 127.0.0.1 to the machine's eth0
# address and cannot reach the loopback head (ray.init then retries for ever).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from peaknet.cluster import ClusterError, RayHead, SlurmCluster, slurm_binaries_missing


def _unavailable(reason: str):
    if os.environ.get("PEAKNET_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"{reason} (PEAKNET_REQUIRE_CLUSTER=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = slurm_binaries_missing()
    if missing:
        _unavailable(f"Slurm/munge not installed (missing {', '.join(missing)}): "
                     "run tools/install_system.sh")
    cluster = SlurmCluster()
    try:
        cluster.acquire()
    except ClusterError as e:
        pytest.fail(f"could not start the private Slurm:\n{e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.release()


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """os.environ pointed at the private Slurm for the duration of one test."""
    new = slurm_cluster.env()
    for k in list(os.environ):
        if k not in new:
            monkeypatch.delenv(k)
    for k, v in new.items():
        monkeypatch.setenv(k, v)
    return new


@pytest.fixture(scope="session")
def ray_head():
    head = RayHead()
    try:
        head.acquire()
    except ClusterError as e:
        pytest.fail(f"could not start the Ray head:\n{e}", pytrace=False)
    try:
        yield head
    finally:
        head.release()
