"""What a job asks the scheduler for, and how a training job starts its processes.

The config's ``resources`` block gives each kind of stage (data, teacher, student, signals, lm_eval,
generate) its GPUs per node, CPUs, nodes, memory, runtime and, for training, its accelerate config and
process count. This module turns one block into the Snakemake resources the SLURM executor plugin reads
(``gpu`` / ``gres``, ``cpus_per_task``, ``mem_mb``, ``runtime``, ``nodes``, ``tasks``) and a training job's
``accelerate launch`` command: on one node the process count comes from the resources, never from the
accelerate YAML; on several nodes ``srun`` starts one ``python -m prefkd.launch`` per node, which reads the
node's rank and the first host of the allocation from SLURM's environment and execs ``accelerate launch``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import yaml

from prefkd.errors import PrefkdError

STAGE_KINDS = ("data", "teacher", "student", "signals", "lm_eval", "generate")
TRAINING_KINDS = ("teacher", "student")
BASE_PORT = 29500  # + the job id modulo PORT_SPREAD, so two jobs sharing a node do not collide
PORT_SPREAD = 2000


def training_kind(role: str) -> str:
    """The resources block of a training job of ``role`` (teacher SFT / DPO pair, or any student stage)."""
    if role not in TRAINING_KINDS:
        raise PrefkdError(f"a training job's role is teacher or student, got {role!r}.")
    return role


def process_count(res: dict) -> int:
    """Processes of a training job over all its nodes: the config's ``processes``, else one per GPU
    (``gpus`` is per node), else one."""
    if res.get("processes"):
        return int(res["processes"])
    return int(res["gpus"]) * int(res["nodes"]) if res["gpus"] else 1


# What a resource absent from one job's request means to the SLURM plugin (nothing asked for): lets a rule
# whose stage kind depends on a wildcard (sft and dpo: the role) declare the same keys for every job.
NEUTRAL = {"gpu": 0, "gpu_model": "", "gres": "", "tasks": 0}


def snakemake_resources(res: dict, gpu_model: str | None = None, keys: set | None = None) -> dict:
    """The Snakemake resources of one job (what the SLURM executor plugin turns into sbatch options).

    One node: ``gpu`` (the plugin's ``--gpus``, with ``gpu_model`` when given). Several nodes: ``gres``
    ``gpu:N`` is per node, which ``--gpus`` (a job total) does not guarantee. ``tasks`` is set only for
    CPU jobs (the plugin maps ``tasks`` of a GPU job to ``--ntasks-per-gpu``); a multi-node job gets one
    task per node by SLURM's default. With ``keys``, every one of them is present (NEUTRAL when unasked)."""
    out = {
        "mem_mb": int(res["mem_mb"]),
        "runtime": int(res["runtime"]),
        "cpus_per_task": int(res["cpus"]),
        "nodes": int(res["nodes"]),
    }
    gpus = int(res["gpus"])
    if gpus and out["nodes"] > 1:
        out["gres"] = f"gpu:{gpu_model}:{gpus}" if gpu_model else f"gpu:{gpus}"
    elif gpus:
        out["gpu"] = gpus
        if gpu_model:
            out["gpu_model"] = gpu_model
    else:
        out["tasks"] = out["nodes"]
    return {**{k: NEUTRAL[k] for k in keys or () if k not in out}, **out}


def accelerate_settings(path: Path) -> dict:
    """The accelerate YAML of a training stage (its distributed type decides how processes may be used)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PrefkdError(f"Could not read the accelerate config {path} ({type(exc).__name__}).") from exc
    if not isinstance(data, dict):
        raise PrefkdError(f"The accelerate config {path} is not a YAML mapping.")
    return data


def check_training_resources(kind: str, res: dict, accelerate: dict) -> None:
    """A training job sees as many processes as GPUs it was given, and a one-process accelerate config is
    not asked to drive several GPUs or nodes (one sentence naming the fix otherwise)."""
    n = process_count(res)
    gpus = int(res["gpus"]) * int(res["nodes"])
    name = accelerate.get("distributed_type", "NO")
    if gpus and n != gpus:
        raise PrefkdError(
            f"resources.{kind}: {gpus} GPU(s) but {n} process(es); a GPU training job runs one process per "
            f"GPU, so set resources.{kind}.processes to {gpus} or leave it null."
        )
    if n > 1 and name == "NO":
        raise PrefkdError(
            f"resources.{kind} asks for {n} processes, but its accelerate config runs one (distributed_type NO); "
            f"use ddp, zero2, zero3 or fsdp (ddp-cpu without GPUs)."
        )
    if n % int(res["nodes"]):
        raise PrefkdError(f"resources.{kind}: {n} processes do not split evenly over {res['nodes']} nodes.")


def launch_prefix(res: dict, config_file: Path | str, threads: int) -> str:
    """The command that precedes ``train ...`` in a training rule's shell line.

    >>> r = {"gpus": 0, "nodes": 1, "processes": None, "cpus": 2}
    >>> launch_prefix(r, "c.yaml", 2)
    'accelerate launch --config_file c.yaml --num_processes 1 --num_machines 1 --num_cpu_threads_per_process 2 -m prefkd.cli'
    """
    n, nodes = process_count(res), int(res["nodes"])
    common = f"--config_file {shlex.quote(str(config_file))} --num_processes {n} --num_machines {nodes}"
    if nodes == 1:
        return f"accelerate launch {common} --num_cpu_threads_per_process {threads} -m prefkd.cli"
    return (
        f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1"
        f" python -m prefkd.launch {common} --num_cpu_threads_per_process {threads} --"
    )


# ---------------------------------------------------------------------------------------------------------
# One node of a multi-node job: python -m prefkd.launch <accelerate options> -- <prefkd command ...>
# ---------------------------------------------------------------------------------------------------------


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` -> ``gpu03`` (scontrol's expansion,
    done here so the launcher does not depend on scontrol being on every node's PATH)."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head or not head.group(1):
        raise PrefkdError(f"Cannot read the SLURM node list {nodelist!r}.")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def node_command(env: dict, accelerate_args: list[str], command: list[str]) -> list[str]:
    """The ``accelerate launch`` argv of this node: machine rank = ``SLURM_NODEID``, main process = the
    first host of ``SLURM_JOB_NODELIST``, port = BASE_PORT + job id modulo PORT_SPREAD."""
    missing = [k for k in ("SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID") if not env.get(k)]
    if missing:
        raise PrefkdError(
            f"prefkd.launch runs one node of a multi-node SLURM job, but {', '.join(missing)} is not set; "
            f"start it through srun inside an allocation."
        )
    port = BASE_PORT + int(env["SLURM_JOB_ID"]) % PORT_SPREAD
    return [
        "accelerate",
        "launch",
        *accelerate_args,
        "--machine_rank",
        env["SLURM_NODEID"],
        "--main_process_ip",
        first_host(env["SLURM_JOB_NODELIST"]),
        "--main_process_port",
        str(port),
        "-m",
        "prefkd.cli",
        *command,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.stderr.write("usage: python -m prefkd.launch <accelerate options> -- <prefkd command ...>\n")
        return 2
    cut = argv.index("--")
    try:
        cmd = node_command(dict(os.environ), argv[:cut], argv[cut + 1 :])
    except PrefkdError as exc:
        sys.stderr.write(f"prefkd.launch: {exc}\n")
        return 2
    sys.stderr.write(f"prefkd.launch: {shlex.join(cmd)}\n")
    sys.stderr.flush()
    os.execvp(cmd[0], cmd)  # this process becomes the node's launcher: srun's signals reach it directly
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
