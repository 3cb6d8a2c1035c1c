"""The ``runtime`` record of train_summary.json: what SLURM and the launcher gave a training job."""

from __future__ import annotations

import os
import time

from prefkd.training.runinfo import collect_run_info, process_start_time, run_info

BASE = dict(world_size=1, visible_gpus=0, affinity_cpus=8, hostname="node1", resumed_from_step=None, wall_seconds=3.0)


def test_a_slurm_job_reports_its_allocation():
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_JOB_GPUS": "0,1",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "LOCAL_WORLD_SIZE": "2",
    }
    r = run_info(env, **{**BASE, "world_size": 2, "visible_gpus": 2, "resumed_from_step": 6})
    assert r == {
        "slurm_job_id": "42",
        "cpus": 4,  # SLURM's CPUs per task, not the 8 this process could run on
        "gpus": 2,
        "slurm_gpus_on_node": "2",
        "slurm_job_gpus": "0,1",
        "cuda_visible_devices": "0,1",
        "world_size": 2,
        "num_machines": 1,
        "hostname": "node1",
        "resumed_from_step": 6,
        "wall_seconds": 3.0,
    }


def test_outside_slurm_the_cpus_are_the_affinity_and_nothing_is_invented():
    r = run_info({}, **BASE)
    assert r["slurm_job_id"] is None and r["cpus"] == 8 and r["num_machines"] == 1
    assert r["slurm_gpus_on_node"] is r["slurm_job_gpus"] is r["cuda_visible_devices"] is None
    assert r["resumed_from_step"] is None  # a fresh start (step 0 is not a resume either)
    assert run_info({}, **{**BASE, "resumed_from_step": 0})["resumed_from_step"] is None


def test_machines_come_from_the_launcher():
    assert run_info({"GROUP_WORLD_SIZE": "2"}, **{**BASE, "world_size": 8})["num_machines"] == 2
    assert run_info({"LOCAL_WORLD_SIZE": "4"}, **{**BASE, "world_size": 8})["num_machines"] == 2
    assert run_info({"LOCAL_WORLD_SIZE": "x", "SLURM_CPUS_PER_TASK": ""}, **BASE)["num_machines"] == 1


def test_collected_from_this_process(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    r = collect_run_info(1, None)
    assert r["slurm_job_id"] == "7" and r["cpus"] == len(os.sched_getaffinity(0))
    assert r["gpus"] >= 0 and r["hostname"]
    started = process_start_time()
    assert started <= time.time() and 0 <= r["wall_seconds"] < 3600 * 24
