"""Per-stage resources -> Snakemake resources and launch commands (prefkd/launch.py), against hand-written
expectations: the SLURM plugin's resource names, one process per GPU, and the per-node command a multi-node
training job runs under srun."""

from __future__ import annotations

import pytest

from prefkd.errors import PrefkdError
from prefkd.launch import (
    NEUTRAL,
    check_training_resources,
    first_host,
    launch_prefix,
    node_command,
    process_count,
    snakemake_resources,
)


def res(**kw):
    base = {
        "gpus": 0,
        "cpus": 2,
        "nodes": 1,
        "mem_mb": 16000,
        "runtime": 600,
        "accelerate": "single",
        "processes": None,
    }
    return {**base, **kw}


def test_cpu_job_asks_for_one_task_and_no_gpu():
    assert snakemake_resources(res(cpus=4)) == {
        "mem_mb": 16000,
        "runtime": 600,
        "cpus_per_task": 4,
        "nodes": 1,
        "tasks": 1,
    }


def test_single_node_gpu_job_uses_the_plugins_gpu_resource_with_its_model():
    out = snakemake_resources(res(gpus=8, cpus=64, mem_mb=900000), gpu_model="h100")
    assert out == {"mem_mb": 900000, "runtime": 600, "cpus_per_task": 64, "nodes": 1, "gpu": 8, "gpu_model": "h100"}


def test_multi_node_gpu_job_asks_for_gpus_per_node_through_gres():
    out = snakemake_resources(res(gpus=8, nodes=2))
    assert out["gres"] == "gpu:8" and out["nodes"] == 2
    assert "gpu" not in out and "tasks" not in out  # tasks of a GPU job would become --ntasks-per-gpu
    assert snakemake_resources(res(gpus=4, nodes=2), gpu_model="a100")["gres"] == "gpu:a100:4"


def test_role_dependent_rules_get_the_same_keys_neutral_where_unasked():
    keys = set(snakemake_resources(res(gpus=8))) | set(snakemake_resources(res()))
    cpu = snakemake_resources(res(), keys=keys)
    assert set(cpu) == keys and cpu["gpu"] == NEUTRAL["gpu"] == 0
    gpu = snakemake_resources(res(gpus=8), keys=keys)
    assert gpu["tasks"] == 0 and gpu["gpu"] == 8


@pytest.mark.parametrize(
    "kw, n",
    [({}, 1), ({"gpus": 8}, 8), ({"gpus": 8, "nodes": 2}, 16), ({"processes": 2, "accelerate": "ddp-cpu"}, 2)],
)
def test_process_count_is_one_per_gpu_unless_given(kw, n):
    assert process_count(res(**kw)) == n


def test_single_node_launch_takes_its_process_count_from_the_resources():
    assert launch_prefix(res(gpus=8), "/p/configs/accelerate/zero3.yaml", 16) == (
        "accelerate launch --config_file /p/configs/accelerate/zero3.yaml --num_processes 8 --num_machines 1"
        " --num_cpu_threads_per_process 16 -m prefkd.cli"
    )


def test_multi_node_launch_is_one_launcher_per_node_through_srun():
    assert launch_prefix(res(gpus=8, nodes=2), "/p/zero3.yaml", 8) == (
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 python -m prefkd.launch"
        " --config_file /p/zero3.yaml --num_processes 16 --num_machines 2 --num_cpu_threads_per_process 8 --"
    )


def test_each_node_runs_accelerate_with_its_rank_and_the_first_host():
    env = {"SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    args = ["--config_file", "/p/zero3.yaml", "--num_processes", "16", "--num_machines", "2"]
    cmd = node_command(env, args, ["train", "--init", "m", "--out", "o"])
    assert cmd == [
        "accelerate", "launch", "--config_file", "/p/zero3.yaml", "--num_processes", "16", "--num_machines", "2",
        "--machine_rank", "1", "--main_process_ip", "gpu07", "--main_process_port", str(29500 + 123456 % 2000),
        "-m", "prefkd.cli", "train", "--init", "m", "--out", "o",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node1", "node1"),
        ("gpu[03-05,07]", "gpu03"),
        ("gpu[12,3]", "gpu12"),
        ("a-1,b-2", "a-1"),
        ("n[001-004]", "n001"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_node_command_outside_slurm_says_how_to_start_it():
    with pytest.raises(PrefkdError, match="through srun"):
        node_command({}, [], ["train"])


@pytest.mark.parametrize(
    "kw, dist, match",
    [
        ({"gpus": 8}, "NO", "one"),  # 8 GPUs driven by a one-process config
        ({"gpus": 8, "processes": 4}, "DEEPSPEED", "one process per GPU"),
        ({"processes": 3, "nodes": 2}, "MULTI_GPU", "evenly"),
    ],
)
def test_training_resources_that_cannot_work_are_refused(kw, dist, match):
    with pytest.raises(PrefkdError, match=match):
        check_training_resources("teacher", res(**kw), {"distributed_type": dist})


def test_training_resources_that_work_pass():
    check_training_resources("teacher", res(gpus=8, nodes=2), {"distributed_type": "DEEPSPEED"})
    check_training_resources("student", res(processes=2), {"distributed_type": "MULTI_GPU"})
    check_training_resources("student", res(), {"distributed_type": "NO"})
