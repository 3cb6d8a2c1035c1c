"""The shipped SLURM profile on a real SLURM cluster: the small config .test/config-slurm.yaml, data to report,
through ``snakemake --profile profiles/slurm`` against a single-node cluster this module starts
(slurm_cluster.py: Debian's slurmctld, slurmd, slurm-client and munge; skipped where they are missing).

The run takes the test settings from .test/slurm (given as the workflow profile: Snakemake reads one
--profile) and the partition from the command line. While it runs, the teacher SFT is cancelled with
``scancel`` once it has written a checkpoint, as a preemption would; the profile's retry resubmits it.
Then: every output is there and every rule but the declared local ones ran as a SLURM job; each training
stage's train_summary.json records its SLURM job, CPUs, GPUs and processes, as asked; the 2-process student
ended with the weights of a 1-process run of the same global batch; the cancelled stage resumed from its
checkpoint and ended with the weights of an uninterrupted run. Alongside the main run, in another copy of the
project, the shipped profiles alone (no test profile) run one job given only the partition. Every snakemake
call has a hard timeout; the cluster's daemons are stopped by their PIDs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from slurm_cluster import PARTITION, SlurmCluster, require_slurm, slurm_cluster
from test_workflow import REPO, SHARED, TEST_CONFIGS, Project, job_counts, nothing_to_do

from prefkd.training.engine import train
from prefkd.training.settings import TrainSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG = yaml.safe_load((TEST_CONFIGS / "config-slurm.yaml").read_text(encoding="utf-8"))
EXPERIMENT = CONFIG["experiment"]
RUN_TIMEOUT = 1500  # ~30 jobs, most one after another on 2 CPUs (8 min alone, ~14 min beside other tests)
PLAIN_TIMEOUT = 300  # one job, first checked 40 s after submission
PROFILE = ("--profile", "profiles/slurm", "--default-resources", f"slurm_partition={PARTITION}")
TEST_PROFILE = ("--workflow-profile", ".test/slurm")
PREEMPTED = ("sft", "teacher_sft")  # rule and wildcards (as in the job's comment) of the job cancelled mid-run
PREEMPTED_MODEL = "models/teacher-sft"
TWO_PROCESS_MODEL = "students/ctpd"  # a preference stage: its loss is a mean over pairs, as DDP averages
WEIGHT_TOLERANCE = 1e-5  # max abs difference of float32 weights after a few Adam steps
JOB_LINE = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@dataclass
class SlurmRun:
    project: Project
    cluster: SlurmCluster
    output: str  # snakemake's stdout + stderr
    seconds: float
    cancelled: str  # the SLURM job id of the cancelled teacher SFT
    cancelled_at_step: int  # its newest checkpoint when it was cancelled
    plain: Project  # a copy of the project where one job ran with the shipped profiles alone
    plain_output: str
    plain_returncode: int


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _project(root: Path, cluster: SlurmCluster) -> Project:
    root.mkdir()
    for name in ("workflow", "envs", "configs", "profiles", ".test"):
        shutil.copytree(REPO / name, root / name)
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    if SHARED.is_dir():
        (root.parent / "shared").symlink_to(SHARED, target_is_directory=True)
    p = Project(root)
    p.results = root / "results" / EXPERIMENT
    p.env.update({k: v for k, v in cluster.env.items() if k in ("SLURM_CONF", "PATH")})
    p.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{p.env['PATH']}"
    p.write_config(CONFIG)
    return p


def _newest_checkpoint(ckpt_dir: Path) -> int:
    """The step of the newest complete checkpoint (its state file written last), else 0."""
    done = [int(d.name.removeprefix("step-")) for d in ckpt_dir.glob("step-*") if (d / "prefkd_state.json").exists()]
    return max(done, default=0)


def _stop(proc: subprocess.Popen) -> str:
    """Stop a snakemake that ran past its time (SIGINT cancels its SLURM jobs), then kill it; its output."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                return proc.communicate(timeout=wait)[0]
            except subprocess.TimeoutExpired:
                continue
    return proc.communicate(timeout=10)[0]


def _preempt_while_running(p: Project, cluster: SlurmCluster, proc: subprocess.Popen, deadline: float):
    """Cancel the teacher SFT's SLURM job once it has a checkpoint; (its job id, that checkpoint's step)."""
    ckpt_dir = p.root / "results" / EXPERIMENT / f"{PREEMPTED_MODEL}.checkpoints"
    comment = f"rule_{PREEMPTED[0]}_wildcards_{PREEMPTED[1]}"
    while proc.poll() is None and time.monotonic() < deadline:
        step = _newest_checkpoint(ckpt_dir)
        if step:
            running = [j["id"] for j in cluster.jobs() if j["comment"] == comment and j["state"] == "RUNNING"]
            if running:
                cluster.command("scancel", running[0], check=False)  # it may have finished meanwhile
                return running[0], step
        time.sleep(0.1)
    return None, 0


def _job_logs(p: Project, tail: int = 30) -> str:
    """The end of every SLURM job log the plugin kept (it deletes those of successful jobs)."""
    logs = sorted((p.root / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(f"--- {f}:\n" + "\n".join(f.read_text(errors="replace").splitlines()[-tail:]) for f in logs)


def _snakemake(p: Project, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", *args, "--configfile", "small.yaml"]
    return subprocess.Popen(
        cmd, cwd=p.root, env=p.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, deadline: float, what: str, cluster: SlurmCluster) -> str:
    """The output of a snakemake started by _snakemake, once it ended; stopped and failed past ``deadline``."""
    try:
        return proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        out = _stop(proc)
        pytest.fail(f"{what} ran past its time limit:\n{out[-6000:]}\n{cluster.logs()}")


@pytest.fixture(scope="module")
def run(cluster: SlurmCluster, tmp_path_factory) -> SlurmRun:
    """The whole small config on the cluster, its teacher SFT cancelled once mid-run; alongside, in another copy
    of the project, one job through the shipped profiles alone (its first status check comes after 40 s)."""
    p = _project(tmp_path_factory.mktemp("slurm-run") / "prefkd", cluster)
    plain = _project(tmp_path_factory.mktemp("slurm-plain") / "prefkd", cluster)
    started = time.monotonic()
    proc = _snakemake(p, *PROFILE, *TEST_PROFILE)
    plain_proc = _snakemake(plain, f"results/{EXPERIMENT}/raw/demo_pairs.jsonl", *PROFILE)
    try:
        cancelled, step = _preempt_while_running(p, cluster, proc, started + RUN_TIMEOUT)
        out = _finish(proc, started + RUN_TIMEOUT, "the SLURM run", cluster)
        seconds = round(time.monotonic() - started, 1)
        plain_out = _finish(plain_proc, started + PLAIN_TIMEOUT, "the run with the shipped profiles alone", cluster)
    finally:
        for x in (proc, plain_proc):
            if x.poll() is None:
                _stop(x)
    assert proc.returncode == 0, f"the SLURM run failed ({proc.returncode}):\n{out[-8000:]}\n{_job_logs(p)}"
    states = {j["id"]: j["state"] for j in cluster.jobs()}
    assert cancelled and states.get(cancelled) == "CANCELLED", (
        f"the teacher SFT was not cancelled mid-run (job {cancelled}: {states.get(cancelled)}); give it more steps"
    )
    return SlurmRun(p, cluster, out, seconds, cancelled, step, plain, plain_out, plain_proc.returncode)


def _summary(run: SlurmRun, model: str) -> dict:
    return json.loads((run.project.results / model / "train_summary.json").read_text())


def _local_rules() -> set[str]:
    """The rules the workflow declares local (they run inside snakemake itself, not as SLURM jobs)."""
    text = "".join(p.read_text() for p in (REPO / "workflow").rglob("*.smk"))
    return {name for block in re.findall(r"^localrules:\n((?:    \w+,?\n)+)", text, flags=re.M)
            for name in re.findall(r"\w+", block)}  # fmt: skip


def _weights_max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def _train_locally(run: SlurmRun, model: str, out: Path, monkeypatch, **changes) -> Path:
    """The stage that wrote ``model``, run again here in one process (its settings from its summary)."""
    settings = _summary(run, model)["settings"]
    settings.update(out=str(out), checkpoint_dir=f"{out}.checkpoints", save_every=0, **changes)
    monkeypatch.chdir(run.project.root)  # the summary's paths are relative to the project
    train(TrainSettings(**{f.name: settings[f.name] for f in dataclasses.fields(TrainSettings)}))
    return out


def test_every_output_is_there_and_every_rule_ran_as_a_slurm_job(run: SlurmRun):
    p = run.project
    assert (p.results / "report.md").is_file() and (p.results / "report" / "benchmarks.png").is_file()
    assert nothing_to_do(p.dry_run())
    counts = job_counts(run.output)
    local = _local_rules() | {"all"}
    submitted = JOB_LINE.findall(run.output)
    by_rule: dict[str, set[str]] = {}
    for _, slurm_id, log in submitted:
        by_rule.setdefault(Path(log).relative_to(p.root / ".snakemake" / "slurm_logs").parts[0], set()).add(slurm_id)
    for rule, n in counts.items():
        if rule not in local:
            extra = 1 if rule == PREEMPTED[0] else 0  # the cancelled attempt and its retry
            assert len(by_rule.get(f"rule_{rule}", ())) == n + extra, (rule, n, by_rule.get(f"rule_{rule}"))
    assert set(by_rule) == {f"rule_{r}" for r in counts if r not in local}
    # squeue (no accounting daemon) still knows every job: all completed but the cancelled one
    states = {j["id"]: j["state"] for j in run.cluster.jobs()}
    ids = {slurm_id for _, slurm_id, _ in submitted}
    assert ids <= set(states), ids - set(states)
    assert {i: s for i, s in states.items() if i in ids and s != "COMPLETED"} == {run.cancelled: "CANCELLED"}
    # the job ids are in snakemake's own log file
    log = max((p.root / ".snakemake" / "log").glob("*.snakemake.log"), key=lambda f: f.stat().st_mtime)
    assert set(JOB_LINE.findall(log.read_text())) == set(submitted)
    print(f"SLURM run: {len(ids)} jobs in {run.seconds} s (cluster up in {run.cluster.started_seconds} s)")


def _job(cluster: SlurmCluster, job_id: str) -> str:
    return cluster.command("scontrol", "show", "job", job_id)


@pytest.mark.parametrize(
    "model, kind",
    [("models/teacher-sft", "teacher"), ("models/student-sft", "student"), ("students/ctpd", "student")],
)
def test_the_resources_reached_sbatch(run: SlurmRun, model: str, kind: str):
    want = CONFIG["resources"][kind]
    summary = _summary(run, model)
    rt = summary["runtime"]
    assert rt["slurm_job_id"] and rt["slurm_job_id"] in {i for _, i, _ in JOB_LINE.findall(run.output)}
    assert rt["cpus"] == want["cpus"]
    assert rt["world_size"] == (want.get("processes") or 1) == summary["final"]["world"]
    assert rt["num_machines"] == 1 and rt["gpus"] == 0  # no CUDA here, whatever SLURM granted
    assert rt["slurm_gpus_on_node"] == (str(want["gpus"]) if want.get("gpus") else None)
    job = _job(run.cluster, rt["slurm_job_id"])
    assert f"NumCPUs={want['cpus']}" in job and f"mem={want['mem_mb']}M" in job, job
    assert f"TimeLimit={want['runtime'] // 60:02d}:{want['runtime'] % 60:02d}:00" in job, job
    if want.get("gpus"):
        assert re.search(rf"TresPer(Job|Node)=gres:gpu(:\w+)?:{want['gpus']}\b", job), job


def test_two_processes_end_with_the_weights_of_one_process_of_the_same_global_batch(
    run: SlurmRun, tmp_path, monkeypatch
):
    summary = _summary(run, TWO_PROCESS_MODEL)
    assert summary["runtime"]["world_size"] == 2 and summary["runtime"]["cpus"] == 2
    batch = summary["settings"]["batch_size"]
    assert summary["final"]["pairs"] % (2 * batch) == 0, "a short last batch is padded differently under DDP"
    local = _train_locally(run, TWO_PROCESS_MODEL, tmp_path / "one-process", monkeypatch, batch_size=2 * batch)
    diff = _weights_max_diff(run.project.results / TWO_PROCESS_MODEL, local)
    print(f"2 processes x {batch} pairs vs 1 process x {2 * batch} pairs: max |weight difference| {diff:.3g}")
    assert diff <= WEIGHT_TOLERANCE, diff


def test_the_preempted_job_resumed_from_its_checkpoint_and_ended_with_the_uninterrupted_weights(
    run: SlurmRun, tmp_path, monkeypatch
):
    summary = _summary(run, PREEMPTED_MODEL)
    rt = summary["runtime"]
    assert rt["slurm_job_id"] != run.cancelled  # the retry's job
    assert rt["resumed_from_step"] and rt["resumed_from_step"] >= run.cancelled_at_step >= 2, rt
    assert rt["resumed_from_step"] < summary["final"]["step"]
    log = (run.project.results / "logs" / "sft-teacher.log").read_text()
    resumed = [line for line in log.splitlines() if line.startswith("resuming from")]
    assert resumed and resumed[0].endswith(f"step-{rt['resumed_from_step']:07d} at step {rt['resumed_from_step']}")
    assert not list((run.project.results / f"{PREEMPTED_MODEL}.checkpoints").glob("step-*"))
    steps = [json.loads(x)["step"] for x in (run.project.results / PREEMPTED_MODEL / "metrics.jsonl").open()]
    assert steps == list(range(1, summary["final"]["step"] + 1))  # the log continues across the preemption
    local = _train_locally(run, PREEMPTED_MODEL, tmp_path / "uninterrupted", monkeypatch)
    diff = _weights_max_diff(run.project.results / PREEMPTED_MODEL, local)
    print(f"preempted at step >= {run.cancelled_at_step}, resumed from step {rt['resumed_from_step']}: "
          f"max |weight difference| to an uninterrupted run {diff:.3g}")  # fmt: skip
    assert diff <= WEIGHT_TOLERANCE, diff


def test_the_shipped_profile_needs_only_the_partition(run: SlurmRun):
    """`snakemake --profile profiles/slurm` with only the partition on the command line (and profiles/default as
    the workflow profile, as for any run in the project root) ran its job on the cluster, alongside the main run."""
    out = run.plain_output
    assert run.plain_returncode == 0, f"{out[-6000:]}\n{_job_logs(run.plain)}"
    assert job_counts(out) == {"demo_data": 1}, out[-3000:]
    assert len(JOB_LINE.findall(out)) == 1, out[-3000:]
    ours = (run.plain.root / f"results/{EXPERIMENT}/raw/demo_pairs.jsonl").read_bytes()
    assert ours == (run.project.results / "raw" / "demo_pairs.jsonl").read_bytes()
