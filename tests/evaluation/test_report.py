"""The report: every number in report.md equals its source JSON, missing values are marked, plots are
valid, deterministic PNGs, optional inputs only drop their part, required ones fail by name."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from prefkd.core.settings import add_options, from_args
from prefkd.errors import PrefkdError
from prefkd.evaluation.report import (
    PAPER_AVG_COLUMN,
    ReportSettings,
    build_report,
    run,
    table_intervals,
    table_numbers,
    table_rows,
)
from prefkd.evaluation.stats import bootstrap_ci, compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("benchmarks", "training_curves", "reward_accuracy", "objective", "weight_histograms", "span_sizes")
SUITES = {
    # suite -> task -> label in the suite's order (not alphabetical on purpose: settings.tasks gives the order)
    "demo": {"pref_mc": "Pref-MC", "arith": "Arith"},
    "extra": {"arc_tiny": "ARC"},
}
LABELS = ["Pref-MC", "Arith", "ARC"]
MODELS = {
    "teacher-sft": {"pref_mc": 0.912345, "arith": 0.70125, "arc_tiny": 0.55},
    "teacher-pos": {"pref_mc": 0.95, "arith": 0.7, "arc_tiny": 0.5612},
    "student-sft": {"pref_mc": 0.501, "arith": 0.33335, "arc_tiny": 0.25},
    "student-dpo": {"pref_mc": 0.6133, "arith": 0.3, "arc_tiny": 0.2875},
    "student-ctpd": {"pref_mc": 0.7, "arith": 0.36667, "arc_tiny": 0.3},
    "student-uld": {"pref_mc": 0.52, "arc_tiny": 0.31},  # no "arith" score
}
ROWS = {
    "teacher-sft": "teacher (SFT)",
    "teacher-pos": "teacher pi+",
    "student-sft": "student (SFT)",
    "student-dpo": "DPO",
    "student-ctpd": "CTPD",
    "student-uld": "ULD",
}
REWARDS = {"student-dpo": (0.55, 30, 6, 24), "student-ctpd": (0.6833, 38, 6, 16)}
NO_OUTCOMES = "student-uld"  # its preference.json predates the per-pair outcomes
PAIR_IDS = list(range(100, 160))

# Same shape as a real run's stats/alignment.json (prefkd.data.tokenize_align.gather_stats), trimmed.
ALIGN_SPLIT = {
    "drops": {"empty_tokenization": 0, "no_room_for_response": 1, "teacher_bytes_mismatch": 0},
    "one_to_one_share": 0.9470348574015391,
    "one_to_one_spans": 43932,
    "pairs_in": 601,
    "pairs_out": 600,
    "prompts_truncated": {"student": 0, "teacher": 2},
    "response_tokens": {
        "student": {"chosen": 23661, "rejected": 23031},
        "teacher": {"chosen": 24986, "rejected": 24362},
    },
    "responses_truncated": {"chosen": 3, "rejected": 1},
    "span_size_hist": {"1": 43932, "2": 1972, "3": 343, "4": 140, "9+": 2},
    "spans": 46389,
    "tokens_per_span": {"student": 1.0065317208821056, "teacher": 1.0637866735648538},
}
BINS = [round(0.2 * i, 2) for i in range(26)]
# Same shape as stats/weights.json (prefkd.training.signals.merge_weight_stats), one entry per signal set.
WEIGHTS = {
    "ctpd": {
        "mean_weight": {"chosen": 1.5769951033105818, "rejected": 0.932019369199879},
        "pairs": 600,
        "planted_check": {
            "chosen": {
                "inside": 1.7375492334112117,
                "inside_units": 8457,
                "outside": 1.4902841911605815,
                "outside_units": 15659,
            },
            "finds_planted_differences": True,
            "rejected": {
                "inside": 1.0869221956430264,
                "inside_units": 7814,
                "outside": 0.854721309475016,
                "outside_units": 15659,
            },
        },
        "spec": {"aggregation": "sum", "k": 1.0, "lower": -0.5, "seed": 1, "transform": "ctpd", "upper": 1.5},
        "unit": "span",
        "weight_bins": BINS,
        "weight_hist": {
            "chosen": [
                0,
                0,
                0,
                2887,
                3525,
                5515,
                2835,
                2054,
                1324,
                1104,
                758,
                585,
                437,
                338,
                303,
                244,
                199,
                147,
                146,
                121,
                102,
                119,
                1373,
                0,
                0,
                0,
            ],
            "rejected": [0, 2696, 2941, 3900, 5362, 2728, 1245, 651, 3950] + [0] * 17,
        },
    },
    "dpo-ref-student": {
        "mean_weight": {"chosen": 1.0, "rejected": 1.0},
        "pairs": 600,
        "planted_check": {},
        "spec": {"aggregation": "sum", "transform": "uniform"},
        "unit": "token",
        "weight_bins": BINS,
        "weight_hist": {"chosen": [0] * 5 + [24261] + [0] * 20, "rejected": [0] * 5 + [23631] + [0] * 20},
    },
}


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def _suite_json(model: str, suite: str, values: dict) -> dict:
    scores = {
        task: {
            "metric": "acc,none",
            "value": values[task],
            "stderr": 0.05,
            "samples": 60,
            "label": label,
            "num_fewshot": 0,
        }
        for task, label in SUITES[suite].items()
        if task in values
    }
    # like prefkd.evaluation.lmeval: the file's keys are sorted, the suite's task order is in settings.tasks
    tasks = [{"task": t, "num_fewshot": 0, "metric": "acc", "label": label} for t, label in SUITES[suite].items()]
    scores = dict(sorted(scores.items()))
    return {"model": model, "suite": suite, "scores": scores, "settings": {"tasks": tasks, "limit": 60}, "lm_eval": {}}


def _outcomes(wins: int, ties: int, n: int, seed: int) -> list[float]:
    """wins 1s, ties 0.5s, the rest 0s, in a per-model order (so pairings differ between models)."""
    x = [1.0] * wins + [0.5] * ties + [0.0] * (n - wins - ties)
    return [x[k] for k in np.random.default_rng(seed).permutation(n)]


def _pref(model: str, i: int) -> dict:
    ties = 60 if model == "student-sft" else 0  # the reference itself: every pair ties
    outcome = _outcomes(min(60, 28 + 4 * i) if not ties else 0, ties, 60, i)
    logp = _outcomes(25 + 3 * i, 0, 60, 100 + i)
    out = {
        "model": model,
        "accuracy": sum(outcome) / 60,
        "margin": 0.12345 * i - 0.1,
        "pairs": 60,
        "ties": ties,
        "beta": 0.1,
        "reference": "student-sft",
        "logp_accuracy": sum(logp) / 60,
    }
    if model != NO_OUTCOMES:
        out["per_pair"] = [
            {"pair_id": p, "margin": 0.1, "outcome": o, "logp_outcome": lo} for p, o, lo in zip(PAIR_IDS, outcome, logp)
        ]
    return out


def _reward_outcomes(model: str) -> list[float]:
    _, wins, ties, _ = REWARDS[model]
    return _outcomes(wins, ties, 60, len(model))


def _metrics(kind: str, steps: int = 30) -> str:
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "epoch": s / steps, "lr": 1e-3, "loss": 10.0 / s if kind == "sft" else 0.7 - 0.01 * s}
        if kind == "pref":
            row.update(
                {
                    "rewards/accuracy": float(s % 3 != 0),
                    "rewards/margin": 0.1 * s,
                    "rewards/chosen": 0.0,
                    "rewards/rejected": -0.1 * s,
                    "objective/beta_margin": 0.1 * s,
                    "objective/saturated": float(s < 5),
                }
            )
        if kind == "kd":
            row.update({"kd/loss": 1.5 - 0.01 * s, "nll": 6.0})
        rows.append(json.dumps(row))
    return "\n".join(rows) + "\n"


def make_tree(root: Path, extra_models: dict | None = None) -> dict:
    """A results/<exp> tree in the contract's format; returns the build_report keyword arguments."""
    exp = root / "results" / "t"
    models = {}
    for i, (model, values) in enumerate({**MODELS, **(extra_models or {})}.items()):
        d = exp / "eval" / model
        for suite in SUITES:
            _write(d / f"{suite}.json", _suite_json(model, suite, values))
        _write(d / "preference.json", _pref(model, i))
        if model in REWARDS:
            rate, wins, ties, losses = REWARDS[model]
            _write(
                d / "reward.json",
                {
                    "model": model,
                    "baseline": "student-sft",
                    "judge": "implicit:teacher-pos/teacher-neg",
                    "prompts": 60,
                    "mean_score": 0.3,
                    "baseline_mean_score": 0.1,
                    "win_rate": rate,
                    "wins": wins,
                    "ties": ties,
                    "losses": losses,
                    "per_prompt": [
                        {"pair_id": p, "score": o, "baseline_score": 0.5, "outcome": o}
                        for p, o in zip(PAIR_IDS, _reward_outcomes(model))
                    ],
                },
            )
        models[model] = d
    alignment = _write(
        exp / "stats" / "alignment.json",
        {"all": ALIGN_SPLIT, "test": ALIGN_SPLIT, "train": ALIGN_SPLIT, "valid": ALIGN_SPLIT},
    )
    weights = _write(exp / "stats" / "weights.json", WEIGHTS)
    runs = {}
    for name, kind, sub in (
        ("teacher-sft", "sft", "models"),
        ("teacher-pos", "pref", "models"),
        ("student-ctpd", "pref", "students"),
        ("student-uld", "kd", "students"),
    ):
        d = exp / sub / name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(_metrics(kind))
        runs[name] = d
    return dict(
        experiment="t",
        models=models,
        suites=list(SUITES),
        alignment=alignment,
        weights=weights,
        runs=runs,
        out_md=exp / "report.md",
        plots_dir=exp / "report",
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    kw = make_tree(tmp_path_factory.mktemp("report"))
    result = build_report(**kw)
    return kw, result, kw["out_md"].read_text()


def test_benchmark_table_equals_the_jsons(built):
    kw, result, md = built
    numbers = table_numbers(md, "Benchmarks")
    header, rows = table_rows(md, "Benchmarks")
    assert header == ["model"] + LABELS + ["avg"]
    assert [r[0] for r in rows] == list(ROWS.values())  # the paper's row order
    tasks = [t for suite in SUITES.values() for t in suite]
    for model, label in ROWS.items():
        values = MODELS[model]
        for task, column in zip(tasks, LABELS):
            if task in values:
                assert numbers[(label, column)] == round(values[task] * 100, 2)
            else:
                assert (label, column) not in numbers
        present = [values[t] for t in tasks if t in values]
        assert numbers[(label, "avg")] == round(sum(present) / len(present) * 100, 2)
    assert numbers == result["tables"]["Benchmarks"]
    assert numbers == {k: v for k, v in result["tables"]["Benchmarks"].items()}


def test_missing_value_is_a_dash_with_a_starred_average(built):
    _, _, md = built
    header, rows = table_rows(md, "Benchmarks")
    uld = next(r for r in rows if r[0] == "ULD")
    assert uld[header.index("Arith")] == "\u2013"
    assert uld[header.index("avg")].endswith("\\*")
    assert all(not r[header.index("avg")].endswith("\\*") for r in rows if r[0] != "ULD")
    assert "\\* average over the tasks that have a score only (ULD)" in md


def test_best_student_value_is_bold_and_teachers_never(built):
    _, _, md = built
    header, rows = table_rows(md, "Benchmarks")
    by = {r[0]: dict(zip(header, r)) for r in rows}
    assert by["CTPD"]["Pref-MC"] == "**70.00** \u00b1 5.00"  # teachers are higher but excluded
    assert by["CTPD"]["Arith"] == "**36.67** \u00b1 5.00"
    assert by["ULD"]["ARC"] == "**31.00** \u00b1 5.00"
    assert by["teacher pi+"]["Pref-MC"] == "95.00 \u00b1 5.00"
    bold = [(r[0], c) for r in rows for c, cell in zip(header, r) if cell.startswith("**")]
    assert len(bold) == len(LABELS) + 1  # one best per column, no ties here


def test_preference_table_equals_the_jsons(built):
    kw, result, md = built
    numbers = table_numbers(md, "Preference")
    header, rows = table_rows(md, "Preference")
    assert header == ["model", "pref acc", "margin", "logp acc", "pairs", "win rate", "wins", "ties", "losses", "judge"]
    for i, (model, label) in enumerate(ROWS.items()):
        p = _pref(model, i)
        assert numbers[(label, "pref acc")] == round(p["accuracy"] * 100, 2)
        assert numbers[(label, "margin")] == round(p["margin"], 3)
        assert numbers[(label, "logp acc")] == round(p["logp_accuracy"] * 100, 2)
        assert numbers[(label, "pairs")] == 60
        if model in REWARDS:
            rate, wins, ties, losses = REWARDS[model]
            assert numbers[(label, "win rate")] == round(rate * 100, 2)
            assert (numbers[(label, "wins")], numbers[(label, "ties")], numbers[(label, "losses")]) == (
                wins,
                ties,
                losses,
            )
        else:
            assert (label, "win rate") not in numbers
    assert "implicit:teacher-pos/teacher-neg" in md
    assert numbers == result["tables"]["Preference"]


def test_alignment_weights_and_training_sections(built):
    kw, result, md = built
    align = table_numbers(md, "Alignment")
    assert align[("1:1 span share (%)", "all")] == 94.70
    assert align[("pairs out", "train")] == 600
    assert align[("dropped: no_room_for_response", "all")] == 1
    assert align[("prompts truncated (teacher)", "valid")] == 2
    w = table_numbers(md, "Span weights")
    assert w[("ctpd", "mean w chosen")] == round(WEIGHTS["ctpd"]["mean_weight"]["chosen"], 3)
    assert w[("ctpd", "inside rejected")] == round(WEIGHTS["ctpd"]["planted_check"]["rejected"]["inside"], 3)
    header, rows = table_rows(md, "Span weights")
    assert dict(zip(header, rows[0]))["finds planted"] == "yes"
    t = table_numbers(md, "Training")
    assert t[("teacher-sft", "steps")] == 30
    assert t[("teacher-sft", "final loss")] == round(10.0 / 30, 4)
    assert t[("student-ctpd", "reward acc")] == round(sum(float(s % 3 != 0) for s in range(21, 31)) / 10 * 100, 2)
    assert ("teacher-sft", "reward acc") not in t
    assert t[("student-uld", "kd loss")] == round(sum(1.5 - 0.01 * s for s in range(21, 31)) / 10, 4)
    for section in ("Alignment", "Span weights", "Training"):
        assert table_numbers(md, section) == result["tables"][section]


def test_all_plots_written_as_png_and_linked(built):
    kw, result, md = built
    for name in PLOTS:
        path = kw["plots_dir"] / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert f"](report/{name}.png)" in md
    assert sorted(p.name for p in kw["plots_dir"].iterdir()) == sorted(f"{n}.png" for n in PLOTS)


def test_no_ablation_means_one_sentence(built):
    _, result, md = built
    assert "distill.methods: [all]" in md
    assert table_rows(md, "Ablations") == ([], [])
    assert result["tables"]["Ablations"] == {}


def test_ablation_table_with_paper_averages(tmp_path):
    extra = {
        "student-uniform": {"pref_mc": 0.6, "arith": 0.31, "arc_tiny": 0.27},
        "student-mean": {"pref_mc": 0.58, "arith": 0.3, "arc_tiny": 0.26},
    }
    kw = make_tree(tmp_path, extra)
    result = build_report(**kw)
    md = kw["out_md"].read_text()
    header, rows = table_rows(md, "Ablations")
    assert [r[0] for r in rows] == ["CTPD", "uniform weights", "mean aggregation"]
    assert header[-3:] == ["avg", "pref acc", PAPER_AVG_COLUMN]
    numbers = table_numbers(md, "Ablations")
    assert numbers[("CTPD", PAPER_AVG_COLUMN)] == 67.42
    assert numbers[("uniform weights", PAPER_AVG_COLUMN)] == 65.47
    assert ("mean aggregation", PAPER_AVG_COLUMN) not in numbers
    assert numbers[("uniform weights", "Arith")] == 31.0
    assert numbers[("mean aggregation", "avg")] == round((0.58 + 0.3 + 0.26) / 3 * 100, 2)
    assert numbers[("uniform weights", "pref acc")] == round(_pref("student-uniform", 6)["accuracy"] * 100, 2)
    assert "not a number of this run" in md
    # ablations stay out of the Table-1 rows but are in the preference table
    assert "uniform weights" not in [r[0] for r in table_rows(md, "Benchmarks")[1]]
    assert "uniform weights" in [r[0] for r in table_rows(md, "Preference")[1]]
    assert numbers == result["tables"]["Ablations"]


def test_missing_optional_files_skip_their_parts(tmp_path):
    kw = make_tree(tmp_path)
    build_report(**kw)  # a first report with every plot, so stale PNGs would be visible
    (kw["models"]["student-dpo"] / "reward.json").unlink()
    (kw["models"]["student-ctpd"] / "reward.json").unlink()
    kw["weights"].unlink()
    for d in kw["runs"].values():
        (d / "metrics.jsonl").unlink()
    result = build_report(**kw)
    md = kw["out_md"].read_text()
    assert "No reward.json for any model" in md
    assert "win rate" not in table_rows(md, "Preference")[0]
    assert "No span-weight statistics" in md and "weights.json does not exist" in md
    assert "No training curves plot: no run has a metrics.jsonl." in md
    assert "No reward accuracy plot" in md
    assert "No metrics.jsonl for teacher-sft" in md
    assert sorted(p.name for p in kw["plots_dir"].iterdir()) == ["benchmarks.png", "span_sizes.png"]
    assert result["plots"]["weight_histograms"] is None
    # weights=None (not configured) is fine too
    build_report(**{**kw, "weights": None, "runs": {}})
    assert "No training runs were given." in kw["out_md"].read_text()


@pytest.mark.parametrize("name", ["extra.json", "preference.json"])
def test_missing_required_file_names_it(tmp_path, name):
    kw = make_tree(tmp_path)
    missing = kw["models"]["student-dpo"] / name
    missing.unlink()
    with pytest.raises(PrefkdError, match=str(missing)):
        build_report(**kw)
    assert not kw["out_md"].exists()


def test_missing_alignment_report_names_it(tmp_path):
    kw = make_tree(tmp_path)
    kw["alignment"].unlink()
    with pytest.raises(PrefkdError, match="alignment.json"):
        build_report(**kw)


def test_twice_gives_identical_bytes(tmp_path):
    kw = make_tree(tmp_path)
    build_report(**kw)
    first = {p.name: p.read_bytes() for p in kw["plots_dir"].iterdir()}
    md = kw["out_md"].read_bytes()
    # from scratch again: no timestamps or other run-dependent metadata in the PNGs
    shutil.rmtree(kw["plots_dir"])
    build_report(**kw)
    assert kw["out_md"].read_bytes() == md
    assert {p.name: p.read_bytes() for p in kw["plots_dir"].iterdir()} == first
    assert len(first) == len(PLOTS)


def test_cli(tmp_path, capsys):
    kw = make_tree(tmp_path)
    p = argparse.ArgumentParser()
    add_options(p, ReportSettings)
    argv = [
        "--experiment",
        "t",
        "--alignment",
        str(kw["alignment"]),
        "--weights",
        str(kw["weights"]),
        "--out",
        str(kw["out_md"]),
        "--plots",
        str(kw["plots_dir"]),
    ]
    # one flag, many values (the rule's form)
    argv += ["--model"] + [f"{m}={d}" for m, d in kw["models"].items()]
    argv += ["--suite", *kw["suites"]]
    argv += ["--run"] + [f"{r}={d}" for r, d in kw["runs"].items()]
    assert run(from_args(ReportSettings, p.parse_args(argv))) == 0
    assert json.loads(capsys.readouterr().out)["plots"] == sorted(PLOTS)
    md = kw["out_md"].read_text()
    assert md.startswith("# prefkd report: t\n")
    assert table_numbers(md)[("CTPD", "Pref-MC")] == 70.0
    with pytest.raises(PrefkdError, match="NAME=PATH"):
        run(from_args(ReportSettings, p.parse_args(argv + ["--model", "oops"])))


def test_prepare_drops_are_in_the_report(tmp_path):
    """The prepare stage's counted drops (with line numbers) and splits show in the Data section."""
    kw = make_tree(tmp_path)
    filters = tmp_path / "filter_report.json"
    filters.write_text(
        json.dumps(
            {
                "source": "pairs.jsonl",
                "rows_in": 10,
                "kept": 7,
                "dropped": {"invalid_utf8": 2, "malformed_json": 1, "empty_prompt": 0},
                "example_lines": {"invalid_utf8": [3, 8], "malformed_json": [5]},
                "splits": {"train": 5, "valid": 1, "test": 1},
            }
        )
    )
    result = build_report(**kw, filters=filters)
    md = kw["out_md"].read_text()
    assert "## Data" in md and "dropped: invalid_utf8 (lines 3, 8)" in md and "empty_prompt" not in md
    table = result["tables"]["Data"]
    assert table[("kept", "count")] == 7 and table[("dropped: malformed_json (lines 5)", "count")] == 1
    assert table[("test pairs", "count")] == 1
    assert not [k for k in table if "flipped" in k[0]]  # a filter report without the label-noise record


@pytest.mark.parametrize("rate, flipped", [(0.0, 0), (0.2, 9)])
def test_label_noise_is_always_stated(tmp_path, rate, flipped):
    kw = make_tree(tmp_path)
    record = {"splits": {"train": 45}, "label_noise": {"rate": rate, "flipped": flipped, "examples": []}}
    filters = _write(tmp_path / "filter_report.json", record)
    table = build_report(**kw, filters=filters)["tables"]["Data"]
    assert table[(f"train pairs flipped (label noise {rate:g})", "count")] == flipped


def test_rates_carry_the_bootstrap_interval_of_their_outcomes(built):
    kw, _, md = built
    ci = table_intervals(md, "Preference")
    for i, (model, label) in enumerate(ROWS.items()):
        p = _pref(model, i)
        if model == NO_OUTCOMES:
            assert (label, "pref acc") not in ci and (label, "logp acc") not in ci
            continue
        expected = tuple(round(v * 100, 2) for v in bootstrap_ci([r["outcome"] for r in p["per_pair"]]))
        assert ci[(label, "pref acc")] == expected
        assert ci[(label, "pref acc")][0] <= round(p["accuracy"] * 100, 2) <= ci[(label, "pref acc")][1]
        logp = tuple(round(v * 100, 2) for v in bootstrap_ci([r["logp_outcome"] for r in p["per_pair"]]))
        assert ci[(label, "logp acc")] == logp
    assert ci[("student (SFT)", "pref acc")] == (50.0, 50.0)  # all ties
    for model in REWARDS:
        expected = tuple(round(v * 100, 2) for v in bootstrap_ci(_reward_outcomes(model)))
        assert ci[(ROWS[model], "win rate")] == expected
    assert ("CTPD", "margin") not in ci and ("CTPD", "pairs") not in ci
    assert "95% percentile bootstrap interval over the test pairs" in md


def test_benchmark_scores_carry_lm_evals_standard_error(built):
    _, _, md = built
    header, rows = table_rows(md, "Benchmarks")
    by = {r[0]: dict(zip(header, r)) for r in rows}
    assert by["CTPD"]["Pref-MC"] == "**70.00** \u00b1 5.00"  # bold value, then lm-eval's stderr x100
    assert by["ULD"]["avg"].endswith("\u00b1 3.54\\*")  # sqrt(2 * 5^2) / 2 over its 2 tasks, partial
    ci = table_intervals(md, "Benchmarks")
    assert ci[("CTPD", "Arith")] == (36.67 - 5.0, 36.67 + 5.0)
    avg, se_avg = table_numbers(md)[("CTPD", "avg")], round(np.sqrt(3 * 0.05**2) / 3 * 100, 2)
    assert se_avg == 2.89 and ci[("CTPD", "avg")] == pytest.approx((avg - se_avg, avg + se_avg))
    assert "No \u00b1 on" not in md  # every task has a stderr here


def test_ctpd_is_tested_paired_against_every_baseline(built):
    _, result, md = built
    numbers = table_numbers(md, "CTPD vs")
    header, rows = table_rows(md, "CTPD vs")
    assert header == ["CTPD vs", "diff [95% CI]", "p (bootstrap)", "p (sign test)", "n"]
    assert [r[0] for r in rows] == ["student (SFT): pref acc", "DPO: pref acc", "DPO: win rate"]
    ctpd_i = list(ROWS).index("student-ctpd")
    mine = [r["outcome"] for r in _pref("student-ctpd", ctpd_i)["per_pair"]]
    for model in ("student-sft", "student-dpo"):
        theirs = [r["outcome"] for r in _pref(model, list(ROWS).index(model))["per_pair"]]
        c = compare(mine, theirs)
        row = f"{ROWS[model]}: pref acc"
        assert numbers[(row, "diff [95% CI]")] == round(c["difference"] * 100, 2)
        assert table_intervals(md, "CTPD vs")[(row, "diff [95% CI]")] == (
            round(c["lo"] * 100, 2),
            round(c["hi"] * 100, 2),
        )
        cells = dict(zip(header, next(r for r in rows if r[0] == row)))
        for column, key in (("p (bootstrap)", "p_value"), ("p (sign test)", "sign_p_value")):
            assert cells[column] == ("<0.001" if c[key] < 0.001 else f"{c[key]:.3f}")
        assert numbers[(row, "n")] == 60
    win = compare(_reward_outcomes("student-ctpd"), _reward_outcomes("student-dpo"))
    assert numbers[("DPO: win rate", "diff [95% CI]")] == round(win["difference"] * 100, 2)
    assert "Not compared (no per-item outcomes in its JSON or CTPD's): ULD (pref acc)." in md
    assert numbers == result["tables"]["Comparisons"]


def test_no_outcomes_anywhere_means_no_comparison_table(tmp_path):
    kw = make_tree(tmp_path)
    for d in kw["models"].values():
        for name in ("preference.json", "reward.json"):
            if (d / name).exists():
                data = json.loads((d / name).read_text())
                data.pop("per_pair", None), data.pop("per_prompt", None)
                (d / name).write_text(json.dumps(data))
    result = build_report(**kw)
    md = kw["out_md"].read_text()
    assert "No paired comparison: no two evaluation files keep per-item outcomes" in md
    assert table_intervals(md, "Preference") == {} and result["tables"]["Comparisons"] == {}
    assert table_numbers(md, "Preference")[("CTPD", "pref acc")] == round(_pref("student-ctpd", 4)["accuracy"] * 100, 2)


def test_seeds_are_grouped_shown_as_mean_and_sd_and_compared_on_seed_means(tmp_path):
    from prefkd.evaluation.stats import mean_sd, seed_mean_outcomes

    extra = {
        "student-dpo-seed2": {"pref_mc": 0.6, "arith": 0.31},
        "student-ctpd-seed2": {"pref_mc": 0.65, "arith": 0.4},
    }
    kw = make_tree(tmp_path, extra)
    index = {m: i for i, m in enumerate({**MODELS, **extra})}
    build_report(**kw)
    md = kw["out_md"].read_text()
    # the main tables show each method's run of the experiment's seed only
    assert [r[0] for r in table_rows(md, "Preference")[1]] == list(ROWS.values())
    seeds = table_numbers(md, "Seeds")
    header, rows = table_rows(md, "Seeds")
    assert [r[0] for r in rows] == ["DPO", "CTPD"]
    for base, label in (("student-dpo", "DPO"), ("student-ctpd", "CTPD")):
        accs = [_pref(m, index[m])["accuracy"] * 100 for m in (base, f"{base}-seed2")]
        mean, sd = mean_sd(accs)
        assert seeds[(label, "pref acc")] == round(mean, 2) and seeds[(label, "seeds")] == 2
        assert table_intervals(md, "Seeds")[(label, "pref acc")] == pytest.approx((mean - sd, mean + sd), abs=0.011)
        pref_mc = [{**MODELS, **extra}[m]["pref_mc"] * 100 for m in (base, f"{base}-seed2")]
        assert seeds[(label, "Pref-MC")] == round(mean_sd(pref_mc)[0], 2)

    # CTPD vs DPO on each pair's mean outcome over the two seeds
    def outcomes(m):
        return {r["pair_id"]: r["outcome"] for r in _pref(m, index[m])["per_pair"]}

    mine = seed_mean_outcomes([outcomes("student-ctpd"), outcomes("student-ctpd-seed2")])
    theirs = seed_mean_outcomes([outcomes("student-dpo"), outcomes("student-dpo-seed2")])
    c = compare(list(mine.values()), [theirs[k] for k in mine])
    assert table_numbers(md, "CTPD vs")[("DPO: pref acc", "diff [95% CI]")] == round(c["difference"] * 100, 2)
    assert "each item's outcome is its mean over the method's seeds" in md


def test_one_seed_says_how_to_ask_for_more(built):
    _, _, md = built
    assert "One seed per method (set `seeds: [1, 2, 3]`" in md


def test_learning_rates_and_cost_sections(tmp_path):
    kw = make_tree(tmp_path)
    search = _write(
        tmp_path / "selected.json",
        {"lr": 0.001, "candidates": [{"lr": 0.0001, "accuracy": 0.5}, {"lr": 0.001, "accuracy": 0.625}]},
    )
    stage = {"jobs": 1, "wall_s": 10.0, "cpu_s": 9.0, "max_rss_mb": 1.0, "processes": 1, "flops": 2e15}
    cost = {
        "stages": {"sft-student": stage, "student-ctpd": {**stage, "wall_s": 30.0, "flops": 6e15}},
        "methods": {
            "sft": {"stage": "sft-student", "stages": ["sft-student"], "own_wall_s": 10.0, "own_flops": 2e15,
                    "wall_s": 10.0, "cpu_s": 9.0, "flops": 2e15},
            "ctpd": {"stage": "student-ctpd", "stages": ["student-ctpd", "sft-student"], "own_wall_s": 30.0,
                     "own_flops": 6e15, "wall_s": 40.0, "cpu_s": 18.0, "flops": 8e15},
        },
        "total": {"wall_s": 40.0, "flops": 8e15},
    }  # fmt: skip
    result = build_report(
        **kw, rates={"dpo": "0.0005"}, searches={"ctpd": search}, cost=_write(tmp_path / "c.json", cost)
    )
    md = kw["out_md"].read_text()
    header, rows = table_rows(md, "Learning rates")
    assert rows == [["DPO", "0.0005", "configured", "\u2013"], ["CTPD", "0.001", "searched (valid split)", "0.0001: 50.00; 0.001: 62.50"]]  # fmt: skip
    costs = table_numbers(md, "Cost")
    assert costs[("CTPD", "own wall (s)")] == 30.0 and costs[("CTPD", "end-to-end PFLOP")] == 8.0  # 8e15 FLOPs
    assert costs[("student (SFT)", "end-to-end wall (s)")] == 10.0
    assert result["tables"]["Cost"][("CTPD", "own PFLOP")] == 6.0
    assert "| student-ctpd | 1 | 30.0 | 9.0 | 1 | 6.000 |" in md  # the per-stage table


def test_no_cost_file_is_one_sentence(built):
    _, _, md = built
    assert "No cost.json: the run's compute was not accounted" in md
