"""Where and how a training job ran, for its ``train_summary.json``: the SLURM job, the CPUs and GPUs it was
given, its processes and machines, the checkpoint it resumed from and its wall-clock time.

``run_info`` is pure (everything it reports comes in as arguments); ``collect_run_info`` reads them from this
process (environment, CPU affinity, torch, host name, process start time).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import torch

# GPU settings a scheduler or launcher hands a job, reported as given (SLURM's are set only for GPU jobs)
GPU_ENV = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
_IMPORTED_AT = time.time()


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def run_info(
    env: Mapping[str, str],
    *,
    world_size: int,
    visible_gpus: int,
    affinity_cpus: int,
    hostname: str,
    resumed_from_step: int | None,
    wall_seconds: float,
) -> dict:
    """The ``runtime`` record of a training job.

    ``cpus`` is SLURM's CPUs per task where SLURM gave them, else the CPUs this process may run on;
    ``num_machines`` is torchrun's node count (``GROUP_WORLD_SIZE``), else ``world_size`` over the processes
    per node (``LOCAL_WORLD_SIZE``), else 1.

    >>> r = run_info({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "2"}, world_size=2, visible_gpus=0,
    ...              affinity_cpus=8, hostname="n1", resumed_from_step=None, wall_seconds=1.234)
    >>> r["slurm_job_id"], r["cpus"], r["num_machines"], r["wall_seconds"]
    ('7', 2, 1, 1.23)
    """
    per_node = _int_or_none(env.get("LOCAL_WORLD_SIZE"))
    machines = _int_or_none(env.get("GROUP_WORLD_SIZE")) or (max(1, world_size // per_node) if per_node else 1)
    return {
        "slurm_job_id": env.get("SLURM_JOB_ID") or None,
        "cpus": _int_or_none(env.get("SLURM_CPUS_PER_TASK")) or affinity_cpus,
        "gpus": visible_gpus,
        **{name.lower(): env.get(name) for name in GPU_ENV},
        "world_size": world_size,
        "num_machines": machines,
        "hostname": hostname,
        "resumed_from_step": resumed_from_step or None,
        "wall_seconds": round(wall_seconds, 2),
    }


def process_start_time() -> float:
    """When this process started (Unix time): from /proc on Linux, else when this module was imported."""
    try:
        fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def collect_run_info(world_size: int, resumed_from_step: int | None) -> dict:
    """``run_info`` of this process."""
    return run_info(
        os.environ,
        world_size=world_size,
        visible_gpus=torch.cuda.device_count(),
        affinity_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        hostname=socket.gethostname(),
        resumed_from_step=resumed_from_step,
        wall_seconds=max(0.0, time.time() - process_start_time()),
    )
