"""A private single-node Slurm and a loopback Ray head, and Slurm rendezvous variables.

``SlurmCluster`` and ``RayHead`` wrap the scripts in ``tools/cluster/`` (``slurm_up.sh``,
``slurm_down.sh``, ``ray_up.sh``, ``ray_down.sh``): every file they use lives under a private
folder (default ``<repo>/.cluster``), daemons are tracked and stopped by pid.

    with SlurmCluster() as slurm:              # starts it, or reuses a running one
        res = slurm.sbatch("slurm/infer.sbatch", "--config", "x.toml",
                           options=["--ntasks=2"])
        print(res.job_id, res.state, res.output)

The context manager (and :meth:`acquire`/:meth:`release`) keep a lease: a cluster that was
already running (started by a person, or by another pytest session) is reused and left running;
one started here is stopped when the last process holding a lease releases it.

``slurm_rendezvous()`` reads the SLURM_* variables of a job step (one table, like submitit's
``SlurmJobEnvironment``) and returns master address/port, world size, ranks and nodes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

__all__ = [
    "REPO",
    "ClusterError",
    "SlurmJobError",
    "JobResult",
    "SlurmCluster",
    "RayHead",
    "SlurmRendezvous",
    "slurm_rendezvous",
    "expand_nodelist",
    "slurm_binaries_missing",
]

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("PEAKNET_CLUSTER_TOOLS", REPO / "tools" / "cluster"))

#: job states after which a job does not change any more
FINAL_STATES = frozenset(
    {
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
    }
)

SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")


class ClusterError(RuntimeError):
    """A daemon did not start or stop; the message holds the script's output (daemon logs)."""


class SlurmJobError(RuntimeError):
    """A job ended in a state other than COMPLETED, or did not end in time."""

    def __init__(self, message: str, result: Optional["JobResult"] = None):
        super().__init__(message)
        self.result = result


def _which(name: str) -> Optional[str]:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(("/usr/sbin", "/sbin", "/usr/local/sbin"))
    return shutil.which(name, path=path)


def slurm_binaries_missing() -> list[str]:
    """The Slurm/munge programs ``slurm_up.sh`` needs that are not installed."""
    return [b for b in SLURM_BINARIES if _which(b) is None]


def _default_venv() -> Path:
    if os.environ.get("PEAKNET_VENV"):
        return Path(os.environ["PEAKNET_VENV"])
    if sys.prefix != sys.base_prefix:  # running inside a venv: use it
        return Path(sys.prefix)
    return REPO / ".venv"


def _pid_alive(pidfile: Path, name: str) -> bool:
    """The pid in ``pidfile`` runs, is no zombie, and its command line mentions ``name``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z" and name in cmdline


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"----- {path} (last {n} lines) -----\n" + "\n".join(lines[-n:]) + "\n"


class _Service:
    """Common part of SlurmCluster and RayHead: the scripts, the folders, the lease."""

    up_script = ""
    down_script = ""
    _pidfiles: tuple[tuple[str, str], ...] = ()  # (pidfile relative to self.dir, process name)

    def __init__(self, root: Union[str, Path, None] = None, *, venv: Union[str, Path, None] = None,
                 timeout: float = 60):
        root = root or os.environ.get("PEAKNET_CLUSTER_DIR") or REPO / ".cluster"
        self.root = Path(root).resolve()
        self.venv = Path(venv) if venv else _default_venv()
        self.timeout = timeout
        self.started_here = False  # set by start() when this object actually started the daemons
        self._leased = False

    # ----- environment -------------------------------------------------------------------
    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    def _script_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PEAKNET_CLUSTER_DIR"] = str(self.root)
        env["PEAKNET_VENV"] = str(self.venv)
        env["PEAKNET_CLUSTER_TIMEOUT"] = str(int(self.timeout))
        env.update(self._extra_script_env())
        return env

    def _extra_script_env(self) -> dict[str, str]:
        return {}

    def _run_script(self, name: str) -> None:
        script = TOOLS / name
        if not script.exists():
            raise ClusterError(f"{script} not found (tools/cluster is part of the source tree, "
                               "set PEAKNET_CLUSTER_TOOLS when peaknet is installed elsewhere)")
        p = subprocess.run(["bash", str(script)], env=self._script_env(), capture_output=True,
                           text=True, timeout=self.timeout * 4 + 30)
        if p.returncode != 0:
            raise ClusterError(f"{script} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")

    # ----- life cycle --------------------------------------------------------------------
    def is_up(self) -> bool:
        return bool(self._pidfiles) and all(_pid_alive(self.dir / f, n) for f, n in self._pidfiles)

    def start(self) -> "_Service":
        """Start the daemons (keeps those already running)."""
        was_up = self.is_up()
        self._run_script(self.up_script)
        self.started_here = self.started_here or not was_up
        return self

    def stop(self) -> None:
        """Stop the daemons by pid, whoever started them."""
        self._run_script(self.down_script)
        self.started_here = False

    @contextlib.contextmanager
    def _lock(self):
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lease.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _live_users(self) -> list[Path]:
        users = self.dir / "users"
        live = []
        for f in users.glob("*") if users.is_dir() else ():
            try:
                os.kill(int(f.name), 0)
                live.append(f)
            except (ValueError, ProcessLookupError):
                f.unlink(missing_ok=True)
            except PermissionError:
                live.append(f)
        return live

    def acquire(self) -> "_Service":
        """Start (or reuse) the daemons and hold a lease on them for this process."""
        with self._lock():
            if not self.is_up():
                self.start()
                (self.dir / "owner").write_text("lease\n")  # stop when the last lease goes
            else:
                self._run_script(self.up_script)  # cheap: refreshes env.sh, checks health
            (self.dir / "users").mkdir(exist_ok=True)
            (self.dir / "users" / str(os.getpid())).write_text("")
            self._leased = True
        return self

    def release(self) -> None:
        """Drop this process's lease; stop the daemons if a lease started them and none is left."""
        if not self._leased:
            return
        with self._lock():
            (self.dir / "users" / str(os.getpid())).unlink(missing_ok=True)
            self._leased = False
            if not self._live_users() and (self.dir / "owner").exists():
                self.stop()
                (self.dir / "owner").unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@dataclasses.dataclass
class JobResult:
    """What a finished (or still running, with ``wait=False``) batch job looks like."""

    job_id: str
    state: str  # COMPLETED only if every task completed; else the first other state
    output: str  # the batch output (stdout+stderr unless split); array tasks joined in order
    states: dict[str, str] = dataclasses.field(default_factory=dict)  # "12" or "12_3" -> state
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    exit_codes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.state}\n{self.output}"


def _fields(line: str) -> dict[str, str]:
    """``scontrol show job -o`` record -> dict (values never contain ' Key=')."""
    out = {}
    for m in re.finditer(r"(?:^| )([A-Za-z_:/]+)=(.*?)(?= [A-Za-z_:/]+=|$)", line):
        out[m.group(1)] = m.group(2)
    return out


def _task_key(f: Mapping[str, str]) -> str:
    aj, at = f.get("ArrayJobId"), f.get("ArrayTaskId")
    if aj and at:
        return f"{aj}_{at}" if at.isdigit() else f"{aj}_[{at}]"
    return f.get("JobId", "")


def _sort_key(key: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"[_\[\]-]", key)]


class SlurmCluster(_Service):
    """A private single-node Slurm (munged + slurmctld + slurmd) under ``<root>/slurm``."""

    up_script = "slurm_up.sh"
    down_script = "slurm_down.sh"
    _pidfiles = (("run/munged.pid", "munged"), ("run/slurmctld.pid", "slurmctld"),
                 ("run/slurmd.pid", "slurmd"))

    def __init__(self, root=None, *, slurm_dir=None, venv=None, timeout: float = 60,
                 partition: Optional[str] = None):
        super().__init__(root, venv=venv, timeout=timeout)
        self.dir = Path(slurm_dir or os.environ.get("PEAKNET_SLURM_DIR") or self.root / "slurm").resolve()
        self._partition = partition

    def _extra_script_env(self):
        env = {"PEAKNET_SLURM_DIR": str(self.dir)}
        if self._partition:
            env["PEAKNET_SLURM_PARTITION"] = self._partition
        return env

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def jobs_dir(self) -> Path:
        """Default folder of batch outputs (``<id>.out``) and of scripts given as text."""
        return self.dir / "jobs"

    @property
    def partition(self) -> str:
        """The (default) partition of the private cluster, from slurm.conf."""
        try:
            for line in self.conf.read_text().splitlines():
                if line.startswith("PartitionName="):
                    return line.split()[0].split("=", 1)[1]
        except OSError:
            pass
        return self._partition or os.environ.get("PEAKNET_SLURM_PARTITION", "local")

    @property
    def node(self) -> str:
        return socket.gethostname().split(".")[0]

    # ----- environment for clients -------------------------------------------------------
    def env(self, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """``base`` (default os.environ) pointed at this cluster: SLURM_CONF, and PATH with the
        sacct stand-in and the project venv first. SLURM_* variables of an enclosing job (the
        caller may itself run inside a real cluster's job) are dropped."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not (k.startswith("SLURM_") or k.startswith("SBATCH_") or k.startswith("SALLOC_")
                       or k.startswith("SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PEAKNET_CLUSTER_DIR"] = str(self.root)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # jobs may reach a loopback Ray head
        parts = [p for p in env.get("PATH", os.defpath).split(os.pathsep)
                 if p and p not in (str(self.bin_dir), str(self.venv / "bin"))]
        env["PATH"] = os.pathsep.join([str(self.bin_dir), str(self.venv / "bin")] + parts)
        return env

    def activate(self) -> None:
        """Point this process's environment (os.environ) at the cluster, e.g. for submitit."""
        new = self.env()
        for k in [k for k in os.environ if k not in new]:
            del os.environ[k]
        os.environ.update(new)

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``["squeue"]``, ``["srun", ...]``) against this cluster."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(list(cmd), env=kw.pop("env", None) or self.env(), check=check,
                              timeout=timeout, **kw)

    def logs(self, n: int = 40) -> str:
        """Tails of the daemon logs, for error messages."""
        return "".join(_tail(self.dir / "log" / f, n) for f in ("slurmctld.log", "slurmd.log", "munged.log"))

    # ----- jobs ---------------------------------------------------------------------------
    def sbatch(self, script: Union[str, Path], *args: str, options: Iterable[str] = (),
               wait: bool = True, timeout: float = 300, check: bool = True,
               cwd: Union[str, Path, None] = None, env: Optional[Mapping[str, str]] = None) -> JobResult:
        """Submit a batch script and (by default) wait for it.

        ``script``: a path to a script file, or the text of a script (anything with a newline).
        ``args``: the script's arguments. ``options``: sbatch options (``"--ntasks=2"``,
        ``"--array=0-3"``); without ``--output``/``-o`` the output goes to
        ``<jobs_dir>/<id>.out``. The job runs in ``cwd`` (default: the current directory) with
        ``env`` (default :meth:`env`: the repo's venv first on PATH, so ``python`` and
        ``mpiexec`` are the project's). With ``check`` a job that ends in another state than
        COMPLETED raises :class:`SlurmJobError` whose message holds the job's output.
        """
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        s = str(script)
        if "\n" in s:
            path = self.jobs_dir / f"script-{uuid.uuid4().hex[:12]}.sh"
            path.write_text(s if s.startswith("#!") else "#!/bin/bash\n" + s)
        else:
            path = Path(s)
            if not path.is_file():
                raise FileNotFoundError(f"batch script {path} not found")
        options = list(options)
        if not any(o in ("-o", "--output") or o.startswith(("--output=", "-o")) for o in options):
            array = any(o.startswith(("--array", "-a")) for o in options)
            options.append(f"--output={self.jobs_dir}/{'%A_%a' if array else '%j'}.out")
        cmd = ["sbatch", "--parsable", *options, str(path), *map(str, args)]
        p = self.run(cmd, check=False, cwd=cwd, env=dict(env) if env is not None else None)
        if p.returncode != 0:
            raise SlurmJobError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
        job_id = p.stdout.strip().split(";")[0]
        if not wait:
            return JobResult(job_id=job_id, state="PENDING", output="")
        return self.wait(job_id, timeout=timeout, check=check)

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o ID`` as dicts (one per array task); [] when unknown."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return [_fields(line) for line in p.stdout.splitlines() if line.startswith("JobId=")]

    def result(self, job_id: str) -> JobResult:
        """The job's state(s) and output(s) now."""
        recs = self.job_records(job_id)
        states, outputs, codes = {}, {}, {}
        for f in sorted(recs, key=lambda f: _sort_key(_task_key(f))):
            key = _task_key(f)
            states[key] = f.get("JobState", "UNKNOWN")
            codes[key] = f.get("ExitCode", "")
            out = f.get("StdOut", "")
            try:
                outputs[key] = Path(out).read_text(errors="replace") if out else ""
            except OSError:
                outputs[key] = ""
        if not states:
            state = "UNKNOWN"
        else:
            bad = [s for s in states.values() if s != "COMPLETED"]
            state = bad[0] if bad else "COMPLETED"
        return JobResult(job_id=str(job_id), state=state, output="".join(outputs.values()),
                         states=states, outputs=outputs, exit_codes=codes)

    def wait(self, job_id: str, *, timeout: float = 300, check: bool = True, poll: float = 0.25) -> JobResult:
        """Wait until every task of the job is in a final state."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.job_records(job_id)
            if recs and all((f.get("JobState") or "?").split()[0] in FINAL_STATES
                            and (f.get("ArrayTaskId", "0").isdigit()) for f in recs):
                break
            if time.monotonic() > deadline:
                self.run(["scancel", str(job_id)], check=False)
                res = self.result(job_id)
                raise SlurmJobError(f"job {job_id} not finished after {timeout:.0f}s (cancelled): "
                                    f"{res.states}\n{res.output}\n{self.logs()}", res)
            time.sleep(poll)
        res = self.result(job_id)
        if check and not res.ok:
            raise SlurmJobError(f"job {job_id} ended {res.state} ({res.states}, exit codes "
                                f"{res.exit_codes}); output:\n{res.output}", res)
        return res


class RayHead(_Service):
    """A loopback-only Ray head (``ray start --head --block``) under ``<root>/ray``.

    Drivers must run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in their environment before
    ``import ray`` (see :meth:`env`, :meth:`connect`), and pass the address explicitly.
    """

    up_script = "ray_up.sh"
    down_script = "ray_down.sh"
    _pidfiles = (("head.pid", "ray"),)

    def __init__(self, root=None, *, ray_dir=None, venv=None, timeout: float = 90):
        super().__init__(root, venv=venv, timeout=timeout)
        self.dir = Path(ray_dir or os.environ.get("PEAKNET_RAY_DIR") or self.root / "ray").resolve()

    def _extra_script_env(self):
        return {"PEAKNET_RAY_DIR": str(self.dir)}

    def is_up(self) -> bool:
        return super().is_up() and (self.dir / "address").is_file()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, for ``ray.init(address=...)``."""
        try:
            return (self.dir / "address").read_text().strip()
        except OSError:
            raise ClusterError(f"the Ray head under {self.dir} is not running") from None

    def env(self, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """``base`` (default os.environ) with RAY_ADDRESS and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
        (without the latter a driver turns 127.0.0.1 into the machine's eth0 address and
        never reaches the loopback head)."""
        env = dict(os.environ if base is None else base)
        env["RAY_ADDRESS"] = self.address
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def connect(self, **kwargs):
        """``ray.init(address=<this head>, **kwargs)`` from this process, loopback-safe.

        Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported; where ``ray`` was
        imported without it, its constant is switched off here before connecting.
        """
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.setdefault("log_to_driver", False)
        return ray.init(address=self.address, **kwargs)

    def logs(self, n: int = 40) -> str:
        logs = self.dir / "tmp" / "session_latest" / "logs"
        return _tail(self.dir / "log" / "head.out", n) + "".join(
            _tail(logs / f, n) for f in ("raylet.err", "gcs_server.err", "raylet.out"))


# --------------------------------------------------------------------------------------------
# Rendezvous from a Slurm job step
# --------------------------------------------------------------------------------------------

#: field -> (environment variables, first one set wins; default; type). The one place that
#: knows Slurm's variable names (cf. submitit.slurm.slurm.SlurmJobEnvironment._env).
_SLURM_TABLE: dict[str, tuple[tuple[str, ...], object, type]] = {
    "job_id":         (("SLURM_JOB_ID", "SLURM_JOBID"), None, str),
    "array_job_id":   (("SLURM_ARRAY_JOB_ID",), None, str),
    "array_task_id":  (("SLURM_ARRAY_TASK_ID",), None, int),
    "world_size":     (("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"), 1, int),
    "rank":           (("SLURM_PROCID",), 0, int),
    "local_rank":     (("SLURM_LOCALID",), 0, int),
    "node_rank":      (("SLURM_NODEID",), 0, int),
    "num_nodes":      (("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), 1, int),
    "nodelist":       (("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"), "", str),
    "tasks_per_node": (("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"), "", str),
    "cpus_per_task":  (("SLURM_CPUS_PER_TASK",), 1, int),
    "master_addr":    (("MASTER_ADDR",), None, str),  # user overrides win over derived values
    "master_port":    (("MASTER_PORT",), None, int),
}


def expand_nodelist(nodelist: str) -> list[str]:
    """``"gpu[001-003,7],login1"`` -> ``["gpu001", "gpu002", "gpu003", "gpu7", "login1"]``."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        prefixes = [""]
        for text, brackets in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", group):
            prefixes = [p + text for p in prefixes]
            if brackets:
                items = []
                for part in brackets.split(","):
                    if "-" in part:
                        lo, hi = part.split("-", 1)
                        items += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
                    else:
                        items.append(part)
                prefixes = [p + i for p in prefixes for i in items]
        hosts += [p for p in prefixes if p]
    return hosts


def _expand_counts(spec: str) -> list[int]:
    """``"2(x3),1"`` -> ``[2, 2, 2, 1]`` (SLURM_TASKS_PER_NODE)."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


@dataclasses.dataclass(frozen=True)
class SlurmRendezvous:
    job_id: str
    array_job_id: Optional[str]
    array_task_id: Optional[int]
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    nodes: tuple[str, ...]
    cpus_per_task: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def torch_env(self) -> dict[str, str]:
        """The variables ``torch.distributed`` (env://) reads."""
        return {
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
            "WORLD_SIZE": str(self.world_size), "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank), "NODE_RANK": str(self.node_rank),
        }


def slurm_rendezvous(environ: Optional[Mapping[str, str]] = None) -> Optional[SlurmRendezvous]:
    """Rendezvous information of the current Slurm task, or None outside Slurm.

    master_addr: MASTER_ADDR, else the first node of the step's node list; master_port:
    MASTER_PORT, else 20000 + job id % 20000 (the same for every task of a job, different
    for concurrent jobs). In a batch script (no srun) rank is 0 and world_size SLURM_NTASKS.
    """
    env = os.environ if environ is None else environ
    vals: dict[str, object] = {}
    for name, (keys, default, typ) in _SLURM_TABLE.items():
        raw = next((env[k] for k in keys if env.get(k) not in (None, "")), None)
        try:
            vals[name] = typ(raw) if raw is not None else default
        except ValueError:
            raise ValueError(f"{next(k for k in keys if env.get(k))}={raw!r} is not a {typ.__name__}") from None
    if not vals["job_id"]:
        return None
    nodes = tuple(expand_nodelist(str(vals.pop("nodelist")))) or (socket.gethostname().split(".")[0],)
    counts = _expand_counts(str(vals.pop("tasks_per_node")))
    node_rank = int(vals["node_rank"])
    local_world = counts[node_rank] if node_rank < len(counts) else (
        int(vals["world_size"]) // max(int(vals["num_nodes"]), 1) or 1)
    if vals["master_addr"] is None:
        vals["master_addr"] = nodes[0]
    if vals["master_port"] is None:
        digits = re.sub(r"\D", "", str(vals["job_id"])) or "0"
        vals["master_port"] = 20000 + int(digits) % 20000
    return SlurmRendezvous(nodes=nodes, local_world_size=local_world, **vals)  # type: ignore[arg-type]
