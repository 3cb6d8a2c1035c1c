"""Seeds, per-method learning rates and the learning-rate search in the DAG (dry runs of the pipeline config with
DPO's rate searched too: seconds). The pipeline test runs that config for real, searching CTPD-Lite's only."""

from __future__ import annotations

import copy
import json
import re
import shlex

import pytest
import yaml
from test_workflow import TEST_CONFIGS, Project, copy_project, job_counts

PIPELINE = yaml.safe_load((TEST_CONFIGS / "config-pipeline.yaml").read_text(encoding="utf-8"))
PIPELINE["distill"]["lrs"] = {"ctpd": 0.0005}  # DPO and CTPD-Lite searched over the grid


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return copy_project(tmp_path_factory, "seeds")


def _shells(output: str) -> dict[str, str]:
    """{--out of a train / select-lr job: its shell command} of a `snakemake -n -p` output."""
    out = {}
    for cmd in re.findall(r"Shell command: (.*)", output):
        if "prefkd.cli train " in cmd or cmd.startswith("prefkd select-lr"):
            out[re.search(r"--out (\S+)", cmd).group(1).split("/", 2)[2]] = cmd
    return out


@pytest.fixture(scope="module")
def planned(project: Project):
    project.write_config(PIPELINE)
    output = project.dry_run("-p")
    return job_counts(output), _shells(output), output


def test_each_method_trains_once_per_seed_and_searched_methods_once_per_rate(planned):
    counts, shells, _ = planned
    # dpo and ctpd-lite searched (2 rates each, seed 1); ctpd's rate given; seed 2 of all three
    assert counts["distill_search"] == 4 and counts["select_lr"] == 2, counts
    assert counts["distill"] == 4, counts  # ctpd, ctpd-seed2, dpo-seed2, ctpd-lite-seed2
    assert counts["preference_eval"] == 9 and counts["cost"] == 1, counts
    assert sorted(k for k in shells if k.startswith("students/")) == [
        "students/ctpd", "students/ctpd-lite-seed2", "students/ctpd-seed2", "students/dpo-seed2",
    ]  # fmt: skip


def test_seeds_and_rates_reach_the_training_jobs(planned):
    _, shells, _ = planned
    args = {k: shlex.split(v) for k, v in shells.items()}

    def flag(key, name):
        return args[key][args[key].index(name) + 1] if name in args[key] else None

    assert flag("students/ctpd", "--seed") == "1" and flag("students/ctpd", "--lr") == "0.0005"
    assert flag("students/ctpd-seed2", "--seed") == "2" and flag("students/ctpd-seed2", "--lr") == "0.0005"
    for method in ("dpo", "ctpd-lite"):
        seed2 = f"students/{method}-seed2"
        assert flag(seed2, "--seed") == "2" and flag(seed2, "--lr") is None
        assert flag(seed2, "--lr-from").endswith(f"students-grid/{method}/selected.json")
        for rate in ("0.0005", "0.002"):
            grid = f"students-grid/{method}/lr-{rate}"
            assert flag(grid, "--lr") == rate and flag(grid, "--seed") == "1"
            assert "/tokens/valid/" in flag(grid, "--eval-tokens")  # the search never sees the test split
        select = args[f"students-grid/{method}/selected.json"]
        assert select[select.index("--model-out") + 1].endswith(f"students/{method}")


def test_the_cost_plan_names_every_student_run(planned):
    _, _, output = planned
    cmd = next(c for c in re.findall(r"Shell command: (.*)", output) if c.startswith("prefkd cost"))
    args = shlex.split(cmd)
    plan = json.loads(args[args.index("--plan") + 1])
    runs = {"sft", "dpo", "ctpd", "ctpd-lite", "dpo-seed2", "ctpd-seed2", "ctpd-lite-seed2"}
    assert set(plan["methods"]) == runs
    stages = plan["stages"]
    assert "signals-ctpd" in stages["student-ctpd"]["needs"] and "student-dpo" in stages["student-dpo-seed2"]["needs"]
    assert stages["student-dpo"]["match"] == "students-grid/dpo-(lr-.*|select)"  # the search is the run's cost
    assert stages["student-dpo"]["flops"][0][4] == 2  # two runs of one epoch


def test_changing_a_method_rate_reruns_that_method_only(project: Project):
    config = copy.deepcopy(PIPELINE)
    config["distill"]["lrs"] = {"ctpd": 1.0e-3}
    project.write_config(config)
    try:
        output = project.dry_run("-p")
    finally:
        project.write_config(PIPELINE)
    shells = _shells(output)
    assert "--lr 0.001" in shells["students/ctpd"] and "--lr 0.001" in shells["students/ctpd-seed2"]


def test_a_grid_without_methods_to_search_is_a_plain_run(project: Project):
    config = copy.deepcopy(PIPELINE)
    config["distill"]["lrs"] = {"dpo": 1e-4, "ctpd": 1e-4, "ctpd-lite": 1e-4}
    config["seeds"] = None
    project.write_config(config)
    try:
        counts = job_counts(project.dry_run())
    finally:
        project.write_config(PIPELINE)
    assert "distill_search" not in counts and "select_lr" not in counts and counts["distill"] == 3, counts
