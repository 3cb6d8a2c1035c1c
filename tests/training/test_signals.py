"""Signals: weight transforms, span log-probs of real tokenized pairs, the planted check,
determinism and the shard contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefkd.assets.models import build_tiny_model, load_model
from prefkd.core.logprobs import model_token_logps
from prefkd.core.weights import TRANSFORMS, WeightSpec, transform_weights
from prefkd.data.batches import PairTable, collate_pairs
from prefkd.data.demo import generate_demo_pairs
from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs
from prefkd.errors import PrefkdError
from prefkd.io.shards import read_shard, shard_stats, write_shard
from prefkd.training.signals import merge_weight_stats, run_shard


def test_ctpd_weights_follow_the_formula_and_ranges():
    spec = WeightSpec()
    d = np.array([-5.0, -0.5, 0.0, 0.7, 1.5, 9.0])
    chosen = transform_weights(d, 1.0, spec)
    rejected = transform_weights(d, -1.0, spec)
    assert chosen.dtype == np.float32
    np.testing.assert_allclose(chosen, np.exp(np.clip(d, -0.5, 1.5)), rtol=1e-6)
    np.testing.assert_allclose(rejected, np.exp(-np.clip(d, -0.5, 1.5)), rtol=1e-6)
    assert chosen.min() == pytest.approx(math.exp(-0.5), rel=1e-6) and chosen.max() == pytest.approx(
        math.exp(1.5), rel=1e-6
    )
    assert 0.22 < rejected.min() < 0.23 and 1.64 < rejected.max() < 1.65  # method.md: [0.22, 1.65]
    assert 0.60 < chosen.min() < 0.61 and 4.48 < chosen.max() < 4.49  # method.md: [0.61, 4.48]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_is_finite_positive_and_deterministic(transform):
    spec = WeightSpec(transform=transform)
    d = np.linspace(-2, 2, 11)
    a = transform_weights(d, 1.0, spec, pair_id=3, side="chosen")
    b = transform_weights(d, 1.0, spec, pair_id=3, side="chosen")
    assert np.array_equal(a, b) and np.all(np.isfinite(a)) and np.all(a > 0) and len(a) == 11
    if transform == "random":
        assert not np.array_equal(a, transform_weights(d, 1.0, spec, pair_id=4, side="chosen"))
    if transform == "uniform":
        assert np.all(a == 1.0)
    if transform in ("rank", "binary_top"):
        assert a[-1] >= a[0]  # larger delta, larger chosen weight


def test_bad_spec_is_one_sentence():
    with pytest.raises(PrefkdError, match="transform must be one of"):
        WeightSpec(transform="softmax")
    with pytest.raises(PrefkdError, match="lower <= upper"):
        WeightSpec(lower=2.0, upper=1.0)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, teacher_tokenizer, student_tokenizer, tiny_models):
    """12 demo pairs at max length 128 (its own token shard) scored by the shared tiny teacher pair."""
    root = tmp_path_factory.mktemp("signals")
    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(12, seed=1))]
    table, stats = tokenize_pairs(records, ModelTokens(teacher_tokenizer), ModelTokens(student_tokenizer), 128, 64)
    tokens = root / "tokens.arrow"
    write_shard(table, tokens, kind="tokens", stats=stats)
    pos, neg = tiny_models["teacher"], tiny_models["teacher-neg"]
    return {"root": root, "tokens": tokens, "pos": pos, "neg": neg}


def test_span_values_are_sums_of_token_logps(shard):
    out = shard["root"] / "sig.arrow"
    run_shard(
        shard["tokens"], out, "teacher", "span", str(shard["pos"]), str(shard["pos"]), str(shard["neg"]), WeightSpec()
    )
    sig = read_shard(out, "signals").to_pylist()
    rows = read_shard(shard["tokens"]).to_pylist()
    pos, neg = load_model(str(shard["pos"])), load_model(str(shard["neg"]))
    row, s = rows[0], sig[0]
    assert s["pair_id"] == row["pair_id"]
    batch = collate_pairs([row], "teacher", "span", pad_id=0)
    with torch.no_grad():
        lp_pos = model_token_logps(pos, batch["input_ids"], batch["attention_mask"])[0]
        lp_neg = model_token_logps(neg, batch["input_ids"], batch["attention_mask"])[0]
    units = batch["unit_ids"][0]
    m = int(batch["num_units"][0])
    assert len(s["chosen_weights"]) == m == row["chosen_num_spans"] + (0 if row["chosen_truncated"] else 1)
    for k in range(m):
        ref = float(lp_pos[units == k].sum())
        delta = ref - float(lp_neg[units == k].sum())
        assert s["chosen_ref_logps"][k] == pytest.approx(ref, abs=1e-4)
        assert s["chosen_delta"][k] == pytest.approx(delta, abs=1e-4)
        assert s["chosen_weights"][k] == pytest.approx(math.exp(min(max(delta, -0.5), 1.5)), rel=1e-4)


def test_identical_contrastive_models_give_unit_weights_and_rerun_is_byte_identical(shard):
    # the same output name in two folders: a shard's provenance records its split folder and name
    a, b = shard["root"] / "run-a" / "train" / "same.arrow", shard["root"] / "run-b" / "train" / "same.arrow"
    for path in (a, b):
        run_shard(
            shard["tokens"],
            path,
            "teacher",
            "span",
            str(shard["pos"]),
            str(shard["pos"]),
            str(shard["pos"]),
            WeightSpec(),
        )
    assert a.read_bytes() == b.read_bytes()
    table = read_shard(a, "signals")
    for side in ("chosen", "rejected"):
        weights = np.concatenate([np.asarray(w) for w in table.column(f"{side}_weights").to_pylist()])
        assert np.all(weights == 1.0)
    stats = shard_stats(a)
    assert stats["unit"] == "span" and stats["pairs"] == 12


def test_signals_join_tokens_by_pair_id_and_catch_misalignment(shard):
    out = shard["root"] / "join.arrow"
    run_shard(shard["tokens"], out, "teacher", "token", str(shard["pos"]), None, None, WeightSpec(transform="uniform"))
    table = PairTable([shard["tokens"]], [out])
    rows = table.rows(range(len(table)))
    batch = collate_pairs(rows, "teacher", "token", pad_id=0, with_signals=True)
    assert batch["weights"].shape == batch["ref_logps"].shape == batch["unit_mask"].shape
    # a shuffled signal row (another pair's values) is caught, not trained on
    rows[0]["signals"], rows[1]["signals"] = rows[1]["signals"], rows[0]["signals"]
    with pytest.raises(PrefkdError, match="misaligned"):
        collate_pairs(rows, "teacher", "token", pad_id=0, with_signals=True)


def test_planted_check_compares_inside_and_outside():
    parts = [
        {
            "pairs": 1,
            "weight_bins": [0, 1],
            "weight_hist": {"chosen": [0, 2], "rejected": [2, 0]},
            "weight_sum": {"chosen": 5.0, "rejected": 1.0},
            "units": {"chosen": 2, "rejected": 2},
            "planted": {
                "chosen": {"inside_sum": 4.0, "inside_n": 1, "outside_sum": 1.0, "outside_n": 1},
                "rejected": {"inside_sum": 1.5, "inside_n": 1, "outside_sum": 0.5, "outside_n": 1},
            },
        }
    ]
    report = merge_weight_stats(parts)
    assert report["planted_check"]["chosen"]["inside"] == 4.0
    assert report["planted_check"]["finds_planted_differences"] is True
    parts[0]["planted"]["rejected"] = {"inside_sum": 0.3, "inside_n": 1, "outside_sum": 0.7, "outside_n": 1}
    assert merge_weight_stats(parts)["planted_check"]["finds_planted_differences"] is False


def test_mixed_roles_share_span_units(shard, student_tokenizer_dir):
    """A teacher pi+ against a student pi- (the mixed-pair ablation) and a student reference."""
    student = shard["root"] / "student"
    build_tiny_model("qwen2", student_tokenizer_dir, student, seed=3)
    out = shard["root"] / "mixed.arrow"
    roles = {"ref": "student", "pos": "teacher", "neg": "student"}
    run_shard(
        shard["tokens"],
        out,
        "teacher",
        "span",
        str(student),
        str(shard["pos"]),
        str(student),
        WeightSpec(),
        roles=roles,
    )
    sig = read_shard(out, "signals").to_pylist()
    rows = read_shard(shard["tokens"]).to_pylist()
    for s, row in zip(sig, rows):
        m = row["chosen_num_spans"] + (0 if row["chosen_truncated"] else 1)
        assert len(s["chosen_weights"]) == len(s["chosen_ref_logps"]) == m
    assert shard_stats(out)["roles"] == roles
    with pytest.raises(PrefkdError, match="token units"):
        run_shard(
            shard["tokens"],
            out,
            "teacher",
            "token",
            str(student),
            str(shard["pos"]),
            str(student),
            WeightSpec(),
            roles=roles,
        )
