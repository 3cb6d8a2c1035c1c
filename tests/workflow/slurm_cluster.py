"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages, started
under a temporary folder on 127.0.0.1, stopped by the PIDs recorded when they were started.

One partition ``main`` (the default) holds this machine as its only node, declared with its real CPUs and
memory (``slurmd -C``) and two GPUs: ``GresTypes=gpu``, ``Gres=gpu:2`` and a ``gres.conf`` whose ``File=``
points at two plain files make GPU requests schedulable on a machine without GPUs (``CUDA_VISIBLE_DEVICES``
then stays empty inside the job). No slurmdbd: ``sacct`` does not work, so job status comes from ``squeue``
and finished jobs stay visible for ``MinJobAge`` seconds.

Inside a job the job-step plugin (and Snakemake's slurm-jobstep executor) drops ``SLURM_CONF``, so ``srun``
would find no configuration; an ``srun`` wrapper on the cluster's ``PATH`` sets it again (no file is
written to /etc/slurm).

    with slurm_cluster(tmp_path) as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env, timeout=30)
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = "slurmctld slurmd slurm-client munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scancel", "scontrol")
PARTITION = "main"
GPUS = 2
MIN_JOB_AGE = 3600  # seconds a finished job stays in squeue: the only job status without slurmdbd
START_TIMEOUT = 60
COMMAND_TIMEOUT = 30


def missing_reason() -> str | None:
    """Why no cluster can be started here (one sentence saying how to enable it), or None."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return (
            f"the SLURM test needs Debian's {PACKAGES} (missing here: {', '.join(missing)}): run it through "
            f".ci/run as root, which installs them, or `apt-get install {PACKAGES}` and run pytest as root."
        )
    if os.geteuid() != 0:
        return "the SLURM test starts slurmd, which must run as root: run pytest (or .ci/run) as root."
    return None


def require_slurm() -> None:
    """Skip the calling test (with one sentence saying how to enable it) where no cluster can start."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(name: str) -> str:
    path = shutil.which(name, path=_sbin_path())
    assert path, f"{name} is not installed ({PACKAGES})"
    return path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _hardware() -> dict[str, int]:
    """This machine as slurmd sees it: CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore, RealMemory."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT).stdout
    found = dict(re.findall(r"(\w+)=(\d+)", out.splitlines()[0] if out else ""))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    if not all(k in found for k in keys):
        return {"CPUs": os.cpu_count() or 1, "RealMemory": 2000}
    return {k: int(found[k]) for k in keys}


@dataclass
class SlurmCluster:
    """A running cluster: its folder, configuration and the environment to reach it with."""

    root: Path
    node: str
    cpus: int
    mem_mb: int
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    started_seconds: float = 0.0

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def command(self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job squeue knows (running, pending and finished ones younger than MinJobAge)."""
        out = self.command("squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%k", check=False)
        rows = [line.split("|", 3) for line in out.splitlines() if line.count("|") == 3]
        return [dict(zip(("id", "name", "state", "comment"), r, strict=True)) for r in rows]

    def logs(self, tail: int = 40) -> str:
        """The last lines of each daemon's log, for failure messages."""
        parts = []
        for name in DAEMONS:
            path = self.root / "log" / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"--- {name} ({path}):\n" + "\n".join(text.splitlines()[-tail:]))
        return "\n".join(parts)


def _write_config(c: SlurmCluster, hw: dict[str, int], ports: list[int]) -> None:
    etc, gpu_dir = c.root / "etc", c.root / "gpus"
    for d in (etc, gpu_dir, c.root / "state", c.root / "spool", c.root / "log", c.root / "bin"):
        d.mkdir(parents=True, exist_ok=True)
    devices = [gpu_dir / f"gpu{i}" for i in range(GPUS)]
    for path in devices:
        path.touch()
    layout = " ".join(f"{k}={v}" for k, v in hw.items() if k not in ("CPUs", "RealMemory"))
    conf = f"""\
ClusterName=prefkdtest
SlurmctldHost={c.node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c.root / "munge" / "munge.socket.2"}
StateSaveLocation={c.root / "state"}
SlurmdSpoolDir={c.root / "spool"}
SlurmctldPidFile={c.root / "slurmctld.pid"}
SlurmdPidFile={c.root / "slurmd.pid"}
SlurmctldLogFile={c.root / "log" / "slurmctld.log"}
SlurmdLogFile={c.root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge={MIN_JOB_AGE}
DefMemPerCPU={max(100, c.mem_mb // (2 * c.cpus))}
KillWait=5
GresTypes=gpu
NodeName={c.node} NodeAddr=127.0.0.1 CPUs={c.cpus} {layout} RealMemory={c.mem_mb} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={c.node} Default=YES MaxTime=INFINITE State=UP
"""
    (etc / "slurm.conf").write_text(conf)
    (etc / "gres.conf").write_text(f"NodeName={c.node} Name=gpu File={gpu_dir}/gpu[0-{GPUS - 1}]\n")
    wrapper = c.root / "bin" / "srun"  # SLURM_CONF is dropped inside jobs: srun finds it again here
    wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{etc / "slurm.conf"}" exec {_which("srun")} "$@"\n')
    wrapper.chmod(0o755)


def _start_munge(c: SlurmCluster) -> subprocess.Popen:
    home = c.root / "munge"
    home.mkdir(mode=0o755, exist_ok=True)
    home.chmod(0o755)  # munged refuses a socket folder others can write to, and clients need to reach it
    key = home / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    cmd = [
        _which("munged"), "--foreground", "--force", f"--socket={home / 'munge.socket.2'}", f"--key-file={key}",
        f"--pid-file={home / 'munged.pid'}", f"--seed-file={home / 'munged.seed'}",
        f"--log-file={c.root / 'log' / 'munged.log'}",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, check, c: SlurmCluster, procs: dict[str, subprocess.Popen], timeout: float) -> None:
    """Poll ``check()`` until it is true; fail with the daemons' logs when a daemon died or time ran out."""
    deadline = time.monotonic() + timeout
    while not check():
        dead = [f"{name} exited with {p.returncode}" for name, p in procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = ", ".join(dead) or f"not within {timeout:.0f} s"
            pytest.fail(f"the test SLURM cluster did not start ({what}: {why}); its logs:\n{c.logs()}")
        time.sleep(0.2)


def _node_idle(c: SlurmCluster) -> bool:
    try:
        out = c.command("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t", timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return f"{c.node} idle" in out.split("\n")


def _stop(c: SlurmCluster, procs: dict[str, subprocess.Popen]) -> None:
    """Cancel every job, then stop the daemons by their recorded PIDs (slurmd, slurmctld, munged)."""
    if "slurmctld" in procs and procs["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            c.command("scancel", "--full", "-u", "root", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(j["state"] in ("RUNNING", "COMPLETING") for j in c.jobs()):
                time.sleep(0.5)
    for name in reversed(list(procs)):
        proc = procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@contextlib.contextmanager
def slurm_cluster(root: Path, timeout: float = START_TIMEOUT) -> Iterator[SlurmCluster]:
    """Start the cluster under ``root``; yield it once its node is idle; stop it (also on failure)."""
    require_slurm()
    started = time.monotonic()
    hw = _hardware()
    node = socket.gethostname().split(".")[0]
    # RealMemory a little under the real one (slurmd drains a node that has less than declared)
    c = SlurmCluster(root=root, node=node, cpus=hw.pop("CPUs"), mem_mb=int(hw.pop("RealMemory") * 0.9))
    _write_config(c, hw, _free_ports(2))
    c.env = dict(os.environ)
    c.env.update(SLURM_CONF=str(c.conf), PATH=f"{root / 'bin'}{os.pathsep}{_sbin_path()}")
    for var in [v for v in c.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_")) and v != "SLURM_CONF"]:
        del c.env[var]  # a test run inside a job must not hand its allocation to this cluster's jobs
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["munged"] = _start_munge(c)
        _wait("munged", lambda: (root / "munge" / "munge.socket.2").exists(), c, procs, timeout)
        for name in ("slurmctld", "slurmd"):  # in the foreground (-D): the PID is the daemon's
            cmd = [_which(name), "-D", "-f", str(c.conf)] + (["-c", "-i"] if name == "slurmctld" else ["-N", node])
            with (root / "log" / f"{name}.out").open("w") as log:
                procs[name] = subprocess.Popen(
                    cmd, env=c.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        c.pids = {name: p.pid for name, p in procs.items()}
        _wait(f"node {node} idle in sinfo", lambda: _node_idle(c), c, procs, timeout)
        c.started_seconds = round(time.monotonic() - started, 2)
        yield c
    finally:
        _stop(c, procs)
