"""`prefkd study`: a list of label-noise levels runs one real experiment per level (data stages of the small
config: no models) and puts them side by side; study tables from evaluation files; Snakemake alone refuses a
list with one sentence."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml
from test_workflow import SMALL_CONFIG, Project, copy_project

from prefkd.study import level_results, study_markdown

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return copy_project(tmp_path_factory, "study")


def _noise_config(project: Project) -> str:
    config = copy.deepcopy(SMALL_CONFIG)
    config["experiment"] = "noisy"
    config["data"].update(label_noise=[0, 0.2], demo_pairs=80)  # two experiments of the data stages: small ones
    config["tokenize"]["shards"] = 1
    (project.root / "noisy.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return "noisy.yaml"


def test_snakemake_alone_refuses_a_list_of_levels_with_one_sentence(project: Project):
    _noise_config(project)
    out = project.snakemake("-n", "--configfile", "noisy.yaml", check=False)
    assert "prefkd config error: data.label_noise lists 2 levels, a study axis" in out
    assert "`prefkd study --configfile" in out and "Traceback" not in out


def test_a_study_runs_every_level_and_reports_them_side_by_side(project: Project):
    name = _noise_config(project)
    cmd = [sys.executable, "-m", "prefkd.cli", "study", "--configfile", name, "--snakemake-args", "--cores 2"]
    proc = subprocess.run(cmd, cwd=project.root, env=project.env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    flipped = {}
    for level in ("0", "0.2"):
        res = project.root / "results" / f"noisy-noise{level}"
        written = yaml.safe_load(
            (project.root / "results" / "noisy" / "study" / f"noisy-noise{level}.yaml").read_text()
        )
        assert written["data"]["label_noise"] == float(level) and written["experiment"] == f"noisy-noise{level}"
        report = json.loads((res / "data" / "filter_report.json").read_text())
        flipped[level] = report["label_noise"]["flipped"]
        assert flipped[level] == int(float(level) * report["splits"]["train"] + 0.5)
        assert (res / "stats" / "alignment.json").exists()
    assert flipped["0"] == 0 < flipped["0.2"]
    md = (project.root / "results" / "noisy" / "study.md").read_text()
    assert f"| 0.2 | {json.loads((project.root / 'results/noisy-noise0.2/data/filter_report.json').read_text())['splits']['train']} | {flipped['0.2']} |" in md  # fmt: skip
    study = json.loads((project.root / "results" / "noisy" / "study.json").read_text())
    assert study["0.2"]["flipped"] == flipped["0.2"] and study["0"]["models"] == {}
    # a second study run has nothing left to do: every level is cached
    again = subprocess.run(
        cmd + ["-n"][:0], cwd=project.root, env=project.env, capture_output=True, text=True, timeout=300
    )
    assert (
        again.returncode == 0
        and again.stdout.count("Nothing to be done") + again.stderr.count("Nothing to be done") == 2
    )


def _pref(accuracy: float, n: int = 10) -> dict:
    wins = round(accuracy * n)
    return {"accuracy": accuracy, "per_pair": [{"pair_id": i, "outcome": float(i < wins)} for i in range(n)]}


def test_study_tables_show_seeds_as_mean_and_sd_and_one_seed_with_its_interval(tmp_path):
    from prefkd.evaluation.stats import bootstrap_ci, mean_sd

    levels = {}
    for level, accs in ((0.0, (0.8, 0.6)), (0.2, (0.5, 0.7))):
        res = tmp_path / f"e-noise{level:g}"
        for model, acc in (("student-ctpd", accs[0]), ("student-ctpd-seed2", accs[1]), ("student-dpo", 0.6)):
            (res / "eval" / model).mkdir(parents=True)
            (res / "eval" / model / "preference.json").write_text(json.dumps(_pref(acc)))
        (res / "data").mkdir()
        (res / "data" / "filter_report.json").write_text(json.dumps({"splits": {"train": 50}, "label_noise": {"flipped": int(50 * level)}}))  # fmt: skip
        levels[level] = level_results(res)
    md = study_markdown("e", levels)
    mean, sd = mean_sd([80.0, 60.0])
    lo, hi = bootstrap_ci([1.0] * 6 + [0.0] * 4)
    assert f"| CTPD | {mean:.2f} \u00b1 {sd:.2f} | 60.00 \u00b1 14.14 |" in md
    assert f"| DPO | 60.00 [{100 * lo:.2f}, {100 * hi:.2f}] | 60.00 [{100 * lo:.2f}, {100 * hi:.2f}] |" in md
    assert "| 0.2 | 50 | 10 |" in md and levels[0.2]["models"]["student-ctpd"]["seeds"] == 2
