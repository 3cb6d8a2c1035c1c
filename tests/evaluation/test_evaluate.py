"""Evaluation: held-out preference metrics and benchmarks through the real lm-evaluation-harness.

Preference metrics are checked against invariants (the reference scores 0.5 with margin 0) and an
independent per-pair computation; the lm-eval path runs the real harness offline on the demo's
local tasks with tiny real models, and its multiple-choice accuracy is recomputed by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prefkd.assets.models import build_tiny_model, load_model
from prefkd.data.demo import generate_demo_pairs
from prefkd.errors import PrefkdError
from prefkd.evaluation.lmeval import (
    arithmetic_answer,
    check_task_extras,
    missing_extras,
    normalise_suite,
    pick_metric,
    run_suite,
    scores_from_results,
    task_records,
    write_task_data,
)
from prefkd.evaluation.preference import TIE_NATS, evaluate_preference, preference_summary
from prefkd.evaluation.stats import bootstrap_ci
from prefkd.io.shards import read_shard

PAIRS = 16  # the shared session pairs (conftest.py)


# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------


def test_preference_summary_hand_computed():
    # pair 0: log-ratio margin (2-1)-(0-0) = 1 > 0; pair 1: (0-0)-(1-0) = -1; pair 2: tie
    out = preference_summary([2.0, 0.0, 5.0], [0.0, 1.0, 5.0], [1.0, 0.0, 5.0], [0.0, 0.0, 5.0], beta=0.5)
    assert out["accuracy"] == pytest.approx((1 + 0.5) / 3)
    assert out["margin"] == pytest.approx(0.5 * (1 - 1 + 0) / 3)
    assert out["ties"] == 1 and out["pairs"] == 3 and out["beta"] == 0.5
    # logp: 2 > 0 yes, 0 > 1 no, 5 == 5 tie
    assert out["logp_accuracy"] == pytest.approx(1.5 / 3)
    # float noise below TIE_NATS is a tie, not a win
    noisy = preference_summary([1.0 + TIE_NATS / 10], [1.0], [1.0], [1.0], beta=0.1)
    assert noisy["accuracy"] == 0.5 and noisy["ties"] == 1
    with pytest.raises(PrefkdError, match="empty"):
        preference_summary([], [], [], [], beta=0.1)


def test_preference_summary_keeps_per_pair_outcomes_and_intervals():
    """The accuracy is the mean of the per-pair outcomes (1 win, 0.5 tie, 0 loss) kept with their pair ids."""
    out = preference_summary([2.0, 0.0, 5.0], [0.0, 1.0, 5.0], [1.0, 0.0, 5.0], [0.0, 0.0, 5.0], 0.5, [7, 3, 9])
    assert [(r["pair_id"], r["outcome"], r["logp_outcome"]) for r in out["per_pair"]] == [
        (7, 1.0, 1.0),
        (3, 0.0, 0.0),
        (9, 0.5, 0.5),
    ]
    assert [r["margin"] for r in out["per_pair"]] == pytest.approx([0.5, -0.5, 0.0])
    assert sum(r["outcome"] for r in out["per_pair"]) / 3 == pytest.approx(out["accuracy"])
    lo, hi = out["accuracy_ci"]
    assert 0.0 <= lo < out["accuracy"] < hi <= 1.0
    assert out["accuracy_ci"] == list(bootstrap_ci([1.0, 0.0, 0.5]))
    assert out["logp_accuracy_ci"] == list(bootstrap_ci([1.0, 0.0, 0.5]))
    assert [r["pair_id"] for r in preference_summary([1.0], [0.0], [0.0], [0.0], 0.1)["per_pair"]] == [0]
    with pytest.raises(PrefkdError, match="one id per pair"):
        preference_summary([1.0], [0.0], [0.0], [0.0], 0.1, pair_ids=[1, 2])


def test_arithmetic_answers_come_from_the_question():
    assert arithmetic_answer("What is 17 + 25?") == 42
    assert arithmetic_answer("Can you compute 6 × 8 for me? ☕") == 48
    assert arithmetic_answer("Please calculate 10 * 5.") == 50
    assert arithmetic_answer("What is 9 - 12?") == -3
    assert arithmetic_answer("How do I clean a cast iron pan?") is None


def test_task_records_put_the_chosen_response_at_the_label():
    rows = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(60, seed=1))]
    recs = task_records(rows, seed=1)
    assert len(recs["prefkd_pref_mc"]) == 60 and len(recs["prefkd_reply"]) == 60
    assert all(r["answer"] == row["chosen"] for r, row in zip(recs["prefkd_reply"], rows))
    labels = []
    for rec, row in zip(recs["prefkd_pref_mc"], rows):
        assert rec["choices"][rec["label"]] == row["chosen"]
        assert rec["choices"][1 - rec["label"]] == row["rejected"]
        labels.append(rec["label"])
    assert 15 < sum(labels) < 45  # both positions used
    arith = recs["prefkd_arith"]
    assert arith and all(int(r["answer"]) == arithmetic_answer(r["question"].splitlines()[-1]) for r in arith)
    # the true result, not whatever the chosen response claims
    assert all(r["answer"] in next(x["chosen"] for x in rows if x["pair_id"] == r["pair_id"]) for r in arith)
    assert task_records(rows, seed=1) == recs


def test_pick_metric_and_groups():
    entry = {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.2, "alias": "x"}
    assert pick_metric(entry, "acc_norm") == (0.6, 0.2, "acc_norm,none")
    gsm = {
        "exact_match,strict-match": 0.3,
        "exact_match_stderr,strict-match": 0.01,
        "exact_match,flexible-extract": 0.4,
    }
    assert pick_metric(gsm, "exact_match,flexible-extract")[0] == 0.4
    assert pick_metric(gsm, "exact_match")[2] in ("exact_match,flexible-extract", "exact_match,strict-match")
    # sacrebleu metrics come on a 0-100 scale; scores are fractions
    assert pick_metric({"chrf,none": 31.5, "chrf_stderr,none": "N/A"}, "chrf") == (0.315, None, "chrf,none")
    results = {
        "results": {"mmlu": {"acc,none": 0.1}, "arc_challenge": {"acc_norm,none": 0.7}},
        "groups": {"mmlu": {"acc,none": 0.45, "acc_stderr,none": 0.01}},
        "n-samples": {"arc_challenge": {"effective": 100, "original": 1172}},
    }
    tasks = normalise_suite(
        {"tasks": [{"task": "mmlu", "num_fewshot": 5, "label": "MMLU"}, {"task": "arc_challenge", "num_fewshot": 25}]}
    )["tasks"]
    scores = scores_from_results(results, tasks)
    assert scores["mmlu"]["value"] == 0.45 and scores["mmlu"]["label"] == "MMLU"  # the group's aggregate
    assert scores["arc_challenge"] == {"metric": "acc_norm,none", "value": 0.7, "stderr": None, "samples": 100,
                                       "label": "arc_challenge", "num_fewshot": 25}  # fmt: skip
    with pytest.raises(PrefkdError, match="no metric 'f1'"):
        scores_from_results(results, [{**tasks[1], "metric": "f1"}])
    with pytest.raises(PrefkdError, match="at least one task"):
        normalise_suite({"tasks": []})


@pytest.mark.skipif(
    importlib.util.find_spec("langdetect") is not None, reason="lm-eval's ifeval extra is installed here"
)
def test_a_missing_lm_eval_extra_names_the_extra(tmp_path, capsys):
    problems = missing_extras(["leaderboard_ifeval", "arc_challenge"])
    assert len(problems) == 1 and "pip install 'lm-eval[ifeval]'" in problems[0] and "langdetect" in problems[0]
    with pytest.raises(PrefkdError, match=r"lm-eval\[ifeval\]"):
        check_task_extras(["leaderboard_ifeval"])
    # through the CLI: one sentence, exit code 2, before any model is loaded
    from prefkd.cli import main

    suite = json.dumps({"tasks": [{"task": "leaderboard_ifeval"}]})
    code = main(
        [
            "lm-eval",
            "--model",
            str(tmp_path / "no-model"),
            "--name",
            "x",
            "--suite-name",
            "s",
            "--suite",
            suite,
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "lm-eval[ifeval]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------------------
# On tiny real models
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_pairs, shared_tokens, tiny_models, student_dpo_ref, student_tokenizer_dir):
    """The shared session fixtures (conftest.py) plus a second student and the pairs as a test split."""
    root = tmp_path_factory.mktemp("evaluate")
    pairs, tokens, student, ref = shared_pairs, shared_tokens, tiny_models["student"], student_dpo_ref
    other = root / "student-other"
    build_tiny_model("qwen2", student_tokenizer_dir, other, seed=2, hidden_size=16, intermediate_size=32)
    data = root / "test.parquet"
    pq.write_table(
        pa.Table.from_pylist([{k: p[k] for k in ("pair_id", "prompt", "chosen", "rejected")} for p in pairs]), data
    )
    return dict(root=root, tokens=tokens, student=student, other=other, ref=ref, data=data)


def test_the_reference_model_scores_one_half_with_zero_margin(setup):
    out = evaluate_preference(setup["student"], "student", [setup["tokens"]], [setup["ref"]], beta=0.1, batch_size=5)
    assert out["pairs"] == PAIRS and out["ties"] == PAIRS
    assert out["accuracy"] == 0.5 and abs(out["margin"]) < 1e-4


def _summed_logps(model, ids: list[int], span_ids: list[int]) -> float:
    """Independent: one unpadded forward, full log_softmax, sum over the response tokens."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    picked = logp.gather(1, x[0, 1:, None])[:, 0]
    mask = torch.tensor(span_ids[1:]) >= 0
    return float(picked[mask].sum())


def test_preference_accuracy_equals_an_independent_computation(setup):
    out = evaluate_preference(setup["other"], "student", [setup["tokens"]], [setup["ref"]], beta=0.1, batch_size=4)
    policy, reference = load_model(str(setup["other"])).eval(), load_model(str(setup["student"])).eval()
    wins = ties = 0
    margins = []
    for row in read_shard(setup["tokens"], "tokens").to_pylist():
        r = {}
        for side in ("chosen", "rejected"):
            ids, spans = row[f"student_{side}_input_ids"], row[f"student_{side}_span_ids"]
            r[side] = _summed_logps(policy, ids, spans) - _summed_logps(reference, ids, spans)
        m = r["chosen"] - r["rejected"]
        margins.append(0.1 * m)
        wins += m > TIE_NATS
        ties += abs(m) <= TIE_NATS
    assert out["accuracy"] == pytest.approx((wins + 0.5 * ties) / PAIRS)
    ids = [r["pair_id"] for r in read_shard(setup["tokens"], "tokens").to_pylist()]
    assert [r["pair_id"] for r in out["per_pair"]] == ids
    assert [r["margin"] for r in out["per_pair"]] == pytest.approx(margins, abs=1e-3)  # float32, batched
    assert out["margin"] == pytest.approx(sum(margins) / PAIRS, abs=1e-4)


def _lm_eval_choice_logps(model, tokenizer, context: str, continuation: str) -> float:
    """Independent log P(continuation | context), encoding as lm-eval does (whole minus context)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    x = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_lm_eval_runs_the_local_tasks_offline_and_matches_a_hand_computation(setup, tmp_path):
    counts = write_task_data(setup["data"], tmp_path / "tasks")
    assert counts["prefkd_pref_mc"] == PAIRS and counts["prefkd_arith"] > 0
    tasks = [
        {"task": "prefkd_pref_mc", "label": "Pref-MC"},
        {"task": "prefkd_arith", "label": "Arith"},
        {"task": "prefkd_reply"},
    ]
    result = run_suite(
        setup["student"], {"tasks": tasks, "batch_size": 4, "limit": 8}, tmp_path / "tasks", seed=1, device="cpu"
    )
    assert result["scores"]["prefkd_reply"]["samples"] == 8 and 0 <= result["scores"]["prefkd_reply"]["value"] <= 1
    result = run_suite(
        setup["student"], {"tasks": tasks[:2], "batch_size": 4}, tmp_path / "tasks", seed=1, device="cpu"
    )
    mc, arith = result["scores"]["prefkd_pref_mc"], result["scores"]["prefkd_arith"]
    assert mc["samples"] == PAIRS and arith["samples"] == counts["prefkd_arith"]
    assert arith["metric"] == "exact_match,extract" and 0 <= arith["value"] <= 1
    assert result["settings"]["lm_eval_version"] and result["lm_eval"]["results"]["prefkd_pref_mc"]
    # the harness's multiple-choice accuracy, recomputed by hand (context, then " " + choice)
    from transformers import AutoTokenizer

    model, tok = load_model(str(setup["student"])).eval(), AutoTokenizer.from_pretrained(str(setup["student"]))
    recs = [json.loads(x) for x in (tmp_path / "tasks" / "prefkd_pref_mc.jsonl").read_text().splitlines()]
    hits = 0
    for rec in recs:
        scores = [_lm_eval_choice_logps(model, tok, rec["question"], " " + c) for c in rec["choices"]]
        hits += int(max(range(2), key=lambda i: scores[i]) == rec["label"])
    assert mc["value"] == pytest.approx(hits / len(recs))
    assert math.isfinite(mc["stderr"])


def test_a_local_task_without_data_is_reported_as_skipped(setup, tmp_path):
    rows = [
        r for r in pq.read_table(setup["data"]).to_pylist() if arithmetic_answer(r["prompt"][-1]["content"]) is None
    ][:4]
    data = tmp_path / "no-arith.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    assert write_task_data(data, tmp_path / "tasks")["prefkd_arith"] == 0
    result = run_suite(
        setup["student"], {"tasks": ["prefkd_arith", "prefkd_pref_mc"]}, tmp_path / "tasks", device="cpu"
    )
    assert (
        result["scores"]["prefkd_arith"]["value"] is None
        and "no held-out prompts" in result["scores"]["prefkd_arith"]["skipped"]
    )
    assert result["scores"]["prefkd_pref_mc"]["samples"] == 4
    with pytest.raises(PrefkdError, match="unknown local lm-eval task"):
        run_suite(setup["student"], {"tasks": ["prefkd_nope"]}, tmp_path / "tasks", device="cpu")


def test_the_harness_task_index_is_built_once_and_rebuilt_for_a_name_it_lacks(tmp_path, monkeypatch):
    """The preflight's lm-eval task check reads a cached index after the first real one (every Snakemake start and
    SLURM job step paid 10-30 s for it); a name the cache lacks is looked up in a fresh index before it is refused."""
    from prefkd.evaluation import lmeval

    monkeypatch.setenv("PREFKD_CACHE_DIR", str(tmp_path))
    assert lmeval.unknown_tasks(["arc_challenge", "no_such_task_xyz", "mmlu"]) == ["no_such_task_xyz"]
    cache = lmeval.task_index_cache()
    assert cache.parent == tmp_path and "arc_challenge" in json.loads(cache.read_text())
    calls = []
    real = json.loads(cache.read_text())

    def index():
        calls.append(1)
        return real + ["my_new_task"]

    monkeypatch.setattr(lmeval, "_index_tasks", index)
    assert lmeval.unknown_tasks(["arc_challenge", "gsm8k"]) == [] and not calls  # from the cache
    assert lmeval.unknown_tasks(["my_new_task"]) == [] and len(calls) == 1  # not cached: indexed again
    assert "my_new_task" in json.loads(cache.read_text())
    cache.write_text("{not json")
    assert lmeval.unknown_tasks(["gsm8k"]) == [] and len(calls) == 2  # a broken cache is rebuilt, not trusted
