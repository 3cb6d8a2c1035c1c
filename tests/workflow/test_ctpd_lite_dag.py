"""The DAG of CTPD-Lite: a run that lists only ``ctpd-lite`` trains no teacher DPO pair (dry runs, seconds)."""

from __future__ import annotations

import copy

import pytest
import yaml
from test_workflow import REPO, Project, copy_project, job_counts


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return copy_project(tmp_path_factory, "lite")


def _dry_run(project: Project, config: dict) -> str:
    project.write_config(config)
    return project.dry_run()


def test_ctpd_lite_alone_trains_no_teacher_pair(project: Project):
    demo = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    lite = copy.deepcopy(demo)
    lite["distill"]["methods"] = ["ctpd-lite"]
    lite["evaluation"]["reward"]["judge"] = "OpenAssistant/reward-model-deberta-v3-large-v2"  # not the teacher pair
    lite["evaluation"]["reward"]["enabled"] = False
    out = _dry_run(project, lite)
    counts = job_counts(out)
    assert counts["distill"] == 1 and counts["signals"] == 3, counts  # ctpd-lite's set on train / valid / test
    assert "dpo" not in counts and "reverse" not in counts, counts
    for absent in ("teacher-dpo-pos", "teacher-dpo-neg", "dpo-ref-teacher-reversed", "signals/ctpd/"):
        assert absent not in out
    assert "signals/ctpd-lite/train/" in out and "students/ctpd-lite" in out
    # the control: the implicit reward judge is the teacher pair, so it brings the pair back
    lite["evaluation"]["reward"].update(judge="implicit", enabled=True)
    assert job_counts(_dry_run(project, lite))["dpo"] == 2
