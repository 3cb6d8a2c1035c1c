"""The whole workflow, training to report, on a small config: a real Snakemake run with the demo's tiny
models, evaluation through the real lm-evaluation-harness, the report and Snakemake's HTML report.

Checks that the report's numbers are the evaluation JSONs' numbers, that changing only evaluation
settings reruns evaluation and the report but never training, and that a second run does nothing.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from test_workflow import REPO, SHARED, TEST_CONFIGS, Project, job_counts, nothing_to_do

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # its run shares 2 cores with the other worker

PIPELINE_CONFIG = yaml.safe_load((TEST_CONFIGS / "config-pipeline.yaml").read_text(encoding="utf-8"))
MODELS = ["teacher-sft", "teacher-pos", "student-sft", "student-dpo", "student-ctpd"]
EVAL_RULES = {"eval_task_data", "lm_eval", "preference_eval", "generate_and_score", "reward_winrate", "cost", "report", "all"}  # fmt: skip
TRAINING_RULES = {"model_init", "sft", "dpo", "dpo_reference", "signals", "distill", "distill_search", "select_lr",
                  "tokenize_align", "prepare"}  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Project:
    import shutil

    root = tmp_path_factory.mktemp("pipeline") / "prefkd"
    root.mkdir()
    for name in ("workflow", "envs", "configs", "profiles", ".test"):
        shutil.copytree(REPO / name, root / name)
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    if SHARED.is_dir():
        (root.parent / "shared").symlink_to(SHARED, target_is_directory=True)
    p = Project(root)
    p.write_config(PIPELINE_CONFIG)
    out = p.run()
    assert "Traceback" not in out
    return p


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_model_has_its_evaluation_files(pipeline: Project):
    ev = pipeline.results / "eval"
    test_pairs = _json(pipeline.results / "data" / "filter_report.json")["splits"]["test"]
    for m in MODELS:
        pref = _json(ev / m / "preference.json")
        assert (
            pref["pairs"] == test_pairs and 0 <= pref["accuracy"] <= 1 and {"accuracy", "margin", "pairs"} <= set(pref)
        )
        demo = _json(ev / m / "demo.json")
        assert demo["scores"]["prefkd_pref_mc"]["samples"] == test_pairs
        assert demo["lm_eval"]["results"]["prefkd_pref_mc"]
    # the student SFT is its own reference: every pair ties
    assert _json(ev / "student-sft" / "preference.json")["accuracy"] == 0.5
    for m in ("student-sft", "student-dpo", "student-ctpd"):
        reward = _json(ev / m / "reward.json")
        assert reward["prompts"] == 6 and reward["baseline"] == "student-sft"
        assert reward["wins"] + reward["ties"] + reward["losses"] == 6
    assert _json(ev / "student-sft" / "reward.json")["ties"] == 6
    assert not (ev / "teacher-sft" / "reward.json").exists()


def test_lm_eval_keeps_its_dataset_cache_under_the_experiment(pipeline: Project):
    """lm-eval's datasets cache goes to results/<exp>/cache/datasets, not ~/.cache (issue 10, item 9)."""
    cache = pipeline.results / "cache" / "datasets"
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*"))


def test_report_numbers_equal_the_evaluation_jsons(pipeline: Project):
    from prefkd.evaluation.report import table_numbers

    md = (pipeline.results / "report.md").read_text(encoding="utf-8")
    bench = table_numbers(md, "Benchmarks")
    pref = table_numbers(md, "Preference")
    labels = {"teacher-sft": "teacher (SFT)", "teacher-pos": "teacher pi+", "student-sft": "student (SFT)",
              "student-dpo": "DPO", "student-ctpd": "CTPD"}  # fmt: skip
    checked = 0
    for m, label in labels.items():
        scores = _json(pipeline.results / "eval" / m / "demo.json")["scores"]
        values = []
        for task in scores.values():
            if task["value"] is None:
                continue
            assert bench[(label, task["label"])] == round(100 * task["value"], 2)
            values.append(task["value"])
            checked += 1
        assert bench[(label, "avg")] == round(100 * sum(values) / len(values), 2)
        p = _json(pipeline.results / "eval" / m / "preference.json")
        row = {col: v for (lab, col), v in pref.items() if lab == label}
        assert round(100 * p["accuracy"], 2) in row.values(), row
    assert checked >= 5
    for name in ("training_curves", "reward_accuracy", "weight_histograms", "span_sizes", "benchmarks"):
        png = pipeline.results / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"report/{name}.png" in md


def test_snakemake_html_report_holds_the_figures(pipeline: Project):
    html = pipeline.root / "report.html"
    pipeline.snakemake("--report", str(html), "--configfile", "small.yaml", timeout=300)
    text = html.read_text(encoding="utf-8", errors="replace")
    assert len(text) > 10_000
    for name in ("benchmarks.png", "training_curves.png", "report.md"):
        assert name in text


def test_second_run_has_nothing_to_do(pipeline: Project):
    assert nothing_to_do(pipeline.dry_run())


@pytest.mark.parametrize(
    "change",
    [
        {"reward": {"max_prompts": 5, "max_new_tokens": 12}},
        {"beta": 0.2},
        {"suites": {"demo": {"apply_chat_template": False, "tasks": [{"task": "prefkd_pref_mc", "label": "Pref-MC"}]}}},
    ],
    ids=["reward", "beta", "suite"],
)
def test_changing_only_evaluation_settings_never_reruns_training(pipeline: Project, change):
    config = copy.deepcopy(PIPELINE_CONFIG)
    config["evaluation"].update(change)
    pipeline.write_config(config)
    try:
        counts = job_counts(pipeline.dry_run())
    finally:
        pipeline.write_config(PIPELINE_CONFIG)
    assert counts and "report" in counts, counts
    assert set(counts) <= EVAL_RULES, counts
    assert not set(counts) & TRAINING_RULES


@pytest.mark.parametrize(
    "section, key, value, reruns, kept",
    [
        # CTPD's own rate: its two seeds rerun, no other method
        (
            "distill",
            "lrs",
            {"ctpd": 1.0e-4, "dpo": 0.001},
            {"distill": 2},
            {"sft", "dpo", "signals", "distill_search", "model_init"},
        ),
        # the clamp of CTPD and CTPD-Lite weights: both sets, CTPD's seeds, CTPD-Lite's search and its seed 2
        (
            "signals",
            "upper",
            1.0,
            {"signals": 6, "distill": 3, "distill_search": 2, "select_lr": 1, "weights_stats": 1},
            {"sft", "dpo", "model_init"},
        ),
    ],
    ids=["distill.lrs", "signals.upper"],
)
def test_a_training_setting_reruns_its_stage_downstream_only(pipeline: Project, section, key, value, reruns, kept):
    config = copy.deepcopy(PIPELINE_CONFIG)
    config.setdefault(section, {})[key] = value
    pipeline.write_config(config)
    try:
        counts = job_counts(pipeline.dry_run())
    finally:
        pipeline.write_config(PIPELINE_CONFIG)
    for rule, n in reruns.items():
        assert counts.get(rule) == n, counts
    assert counts.get("report") == 1, counts
    assert not kept & set(counts), counts


def test_a_changed_input_never_resumes_an_old_checkpoint(pipeline: Project):
    """Issue 10, item 1, through Snakemake: with `train.save_every` > 0 a finished student keeps no
    checkpoint, and after `signals.k` changes the CTPD student trains from scratch on the new signals
    (before, it resumed the old run's last checkpoint and trained one step on the new signals)."""
    target = f"results/{PIPELINE_CONFIG['experiment']}/students/ctpd"
    ckpt = pipeline.root / f"{target}.checkpoints"
    # upstream jobs keep their outputs: only mtimes trigger reruns, the signals and the student are forced
    only = ("--rerun-triggers", "mtime", "--forcerun", "signals", "distill")
    config = copy.deepcopy(PIPELINE_CONFIG)
    config.setdefault("train", {})["save_every"] = 2
    try:
        pipeline.write_config(config)
        pipeline.run(target, *only)
        assert not list(ckpt.glob("step-*")), "a finished stage kept its checkpoints"
        config.setdefault("signals", {})["k"] = 2.0
        pipeline.write_config(config)
        pipeline.run(target, *only)
        log = (pipeline.results / "logs" / "students" / "ctpd.log").read_text()
        assert not [line for line in log.splitlines() if line.startswith("resuming from")], log[-2000:]
        steps = [
            json.loads(line)["step"] for line in (pipeline.root / target / "metrics.jsonl").read_text().splitlines()
        ]
        assert steps == list(range(1, len(steps) + 1))  # every step trained by this run
    finally:
        pipeline.write_config(PIPELINE_CONFIG)


def test_seeds_learning_rates_cost_and_label_noise_reach_the_report(pipeline: Project):
    """Issue 12: two seeds per method, CTPD-Lite's rate searched on the valid split, CTPD's and DPO's given, the
    compute accounting, 10% label noise and the tokenizer-mismatch table, all in the report."""
    from prefkd.evaluation.report import table_numbers, table_rows
    from prefkd.evaluation.stats import mean_sd

    res = pipeline.results
    md = (res / "report.md").read_text(encoding="utf-8")
    labels = {"dpo": "DPO", "ctpd": "CTPD", "ctpd-lite": "CTPD-Lite"}
    # seeds: mean +- sd of the two runs' held-out accuracies
    seeds = table_numbers(md, "Seeds")
    for method, label in labels.items():
        accs = [100 * _json(res / "eval" / m / "preference.json")["accuracy"] for m in (f"student-{method}", f"student-{method}-seed2")]  # fmt: skip
        assert seeds[(label, "pref acc")] == round(mean_sd(accs)[0], 2) and seeds[(label, "seeds")] == 2
        summary = _json(res / "students" / f"{method}-seed2" / "train_summary.json")
        assert summary["settings"]["seed"] == 2
    # the searched methods: the chosen rate's run is students/<method>, and seed 2 trained at that rate
    _, rows = table_rows(md, "Learning rates")
    shown = {r[0]: r[1:] for r in rows}
    assert shown["CTPD"][:2] == ["0.0005", "configured"] and shown["DPO"][:2] == ["0.001", "configured"]
    for method in ("ctpd-lite",):
        chosen = _json(res / "students-grid" / method / "selected.json")
        assert chosen["lr"] in (0.0005, 0.002) and len(chosen["candidates"]) == 2
        assert _json(res / "students" / f"{method}-seed2" / "train_summary.json")["settings"]["lr"] == chosen["lr"]
        picked = res / "students-grid" / method / f"lr-{chosen['lr']:g}" / "model.safetensors"
        assert (res / "students" / method / "model.safetensors").read_bytes() == picked.read_bytes()
        assert shown[labels[method]][:2] == [f"{chosen['lr']:g}", "searched (valid split)"]
    # cost: every run's own and end-to-end numbers, from the benchmark records and the token shards
    cost = _json(res / "stats" / "cost.json")
    table = table_numbers(md, "Cost")
    for method, label in labels.items():
        c = cost["methods"][method]
        assert c["own_wall_s"] > 0 and c["flops"] > c["own_flops"] > 0
        assert table[(label, "end-to-end wall (s)")] == round(c["wall_s"], 1)
    assert {"dpo-teacher-pos", "dpo-teacher-neg", "signals-ctpd"} <= set(cost["methods"]["ctpd"]["stages"])
    assert not {"dpo-teacher-pos", "dpo-teacher-neg"} & set(cost["methods"]["ctpd-lite"]["stages"])
    assert cost["methods"]["dpo"]["flops"] < cost["methods"]["ctpd"]["flops"]  # CTPD also pays for the teachers
    assert cost["stages"]["sft-teacher"]["jobs"] == 1 and cost["stages"]["other"]["jobs"] > 0
    # label noise: the flipped train pairs are counted and reported
    filters = _json(res / "data" / "filter_report.json")
    flipped = filters["label_noise"]["flipped"]
    assert flipped > 0 and str(flipped) in md.split("## Data", 1)[1].split("## ", 1)[0]
    # the tokenizer-mismatch classes of the aligned spans
    assert "1:1" in md.split("## Alignment", 1)[1] and "n:m" in md


def test_adding_a_seed_trains_only_the_new_runs(pipeline: Project):
    """Seed 3 adds one student run per non-SFT method and nothing upstream. Counted against a dry run of the
    unchanged config: the tests before this one force reruns on the shared project (a changed `signals.k`),
    so only the difference between the two plans is this change's."""
    before = job_counts(pipeline.dry_run())
    config = copy.deepcopy(PIPELINE_CONFIG)
    config["seeds"] = [1, 2, 3]
    pipeline.write_config(config)
    try:
        after = job_counts(pipeline.dry_run())
    finally:
        pipeline.write_config(PIPELINE_CONFIG)
    added = {rule: after.get(rule, 0) - before.get(rule, 0) for rule in set(after) | set(before)}
    assert added["distill"] == 3, (before, after)
    assert not any(added.get(rule) for rule in ("distill_search", "select_lr", "sft", "dpo", "signals", "prepare"))
