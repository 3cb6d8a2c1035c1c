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
from prefkd.io.shards import ShardStash, read_shard, shard_stats, write_shard
from prefkd.training import signals as signals_module
from prefkd.training.signals import ScoringModels, merge_weight_stats, run_shard, run_shards


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
def test_every_transform_is_finite_non_negative_and_deterministic(transform):
    # (non-negative, not positive: binary_top gives 0 to the units outside its top share, as TIS-DPO's code does)
    spec = WeightSpec(transform=transform)
    d = np.linspace(-2, 2, 11)
    a = transform_weights(d, 1.0, spec, pair_id=3, side="chosen")
    b = transform_weights(d, 1.0, spec, pair_id=3, side="chosen")
    assert np.array_equal(a, b) and np.all(np.isfinite(a)) and np.all(a >= 0) and len(a) == 11
    if transform == "random":
        assert not np.array_equal(a, transform_weights(d, 1.0, spec, pair_id=4, side="chosen"))
    if transform == "uniform":
        assert np.all(a == 1.0)
    if transform in ("rank", "binary_top"):
        assert a[-1] > a[0]  # larger delta, larger chosen weight


# TIS-DPO's released code (preference_datasets.py: binary_weight_transform, rank_based_transform,
# random_weight_transform) maps the scores mu * delta of one response's tokens to weights:
#   binary: 1 for the top ``int(n * top_percent / 100)`` scores, else 0 (a score value shared across the cut gets 0);
#   rank:   0.7 + 0.6 * rank / (n - 1), rank 0 = lowest score (ties: the earlier token ranks lower); 1.0 when n = 1;
#   random: Uniform(0.7, 1.3) per token, the same on both responses;
# and gives the EOS token weight 0 (tokenize_batch_element appends [0] after the response's weights).
D10 = np.array([0.5, -1.0, 2.0, 0.1, 1.2, -0.3, 0.9, 0.0, 0.4, 3.0])


def test_binary_top_is_one_for_the_top_share_and_zero_elsewhere():
    spec = WeightSpec(transform="binary_top", top_fraction=0.3)  # int(10 * 30 / 100) = 3 units get 1
    chosen = transform_weights(D10, 1.0, spec)  # top scores 3.0 (unit 9), 2.0 (unit 2), 1.2 (unit 4)
    assert chosen.tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 0, 1]
    rejected = transform_weights(D10, -1.0, spec)  # scores -delta: top 1.0 (unit 1), 0.3 (unit 5), -0.0 (unit 7)
    assert rejected.tolist() == [0, 1, 0, 0, 0, 1, 0, 1, 0, 0]
    # 7 units at 30 %: int(2.1) = 2 get 1
    assert transform_weights(D10[:7], 1.0, spec).tolist() == [0, 0, 1, 0, 1, 0, 0]
    # ties across the cut: [1, 1, 1, 0] at 50 % -> 2 places for three equal top scores -> none of them gets 1
    assert transform_weights(
        np.array([1.0, 1.0, 1.0, 0.0]), 1.0, WeightSpec(transform="binary_top", top_fraction=0.5)
    ).tolist() == [0, 0, 0, 0]
    # TIS-DPO's default top_percent = 100: every unit 1
    assert transform_weights(D10, 1.0, WeightSpec(transform="binary_top", top_fraction=1.0)).tolist() == [1] * 10


def test_rank_is_a_linear_range_from_0_7_to_1_3():
    spec = WeightSpec(transform="rank")
    d = D10[:5]  # ascending: -1.0 (unit 1), 0.1 (3), 0.5 (0), 1.2 (4), 2.0 (2)
    np.testing.assert_allclose(transform_weights(d, 1.0, spec), [1.0, 0.7, 1.3, 0.85, 1.15], rtol=1e-6)
    np.testing.assert_allclose(transform_weights(d, -1.0, spec), [1.0, 1.3, 0.7, 1.15, 0.85], rtol=1e-6)
    # ties: the earlier unit ranks lower (a stable sort of the scores)
    np.testing.assert_allclose(transform_weights(np.array([1.0, 1.0, 0.0]), 1.0, spec), [1.0, 1.3, 0.7], rtol=1e-6)
    assert transform_weights(np.array([5.0]), 1.0, spec).tolist() == [1.0]
    custom = WeightSpec(transform="rank", scale_min=0.6, scale_max=2.0)
    np.testing.assert_allclose(transform_weights(d, 1.0, custom), [1.3, 0.6, 2.0, 0.95, 1.65], rtol=1e-6)


def test_random_weights_are_uniform_in_0_7_1_3_on_both_sides():
    spec = WeightSpec(transform="random", seed=1)
    d = np.zeros(4000)
    chosen = transform_weights(d, 1.0, spec, pair_id=7, side="chosen")
    rejected = transform_weights(d, -1.0, spec, pair_id=7, side="rejected")
    for w in (chosen, rejected):
        assert w.min() >= 0.7 and w.max() <= 1.3
        assert w.mean() == pytest.approx(1.0, abs=0.01)  # Uniform(0.7, 1.3): mean 1, sd 0.173 -> 0.003 for 4000
        assert np.histogram(w, bins=6, range=(0.7, 1.3))[0].min() > 550  # flat: ~667 per bin
    assert chosen.mean() / rejected.mean() == pytest.approx(1.0, abs=0.02)  # no built-in chosen/rejected asymmetry
    assert not np.array_equal(chosen, rejected)  # independent draws per side ...
    # ... that do not depend on the deltas: random ablation weights carry no signal
    assert np.array_equal(chosen, transform_weights(np.linspace(-9, 9, 4000), 1.0, spec, pair_id=7, side="chosen"))
    assert not np.array_equal(chosen, transform_weights(d, 1.0, WeightSpec(transform="random", seed=2), 7, "chosen"))


@pytest.mark.parametrize("transform", ["ctpd", "rank", "binary_top", "random", "uniform"])
def test_eos_weight_replaces_the_eos_unit_and_leaves_the_others(transform):
    spec = WeightSpec(transform=transform, eos_weight=0.0)
    d = np.append(D10[:5], 7.0)  # the last unit is the EOS
    with_eos = transform_weights(d, 1.0, spec, pair_id=1, side="chosen", eos=True)
    assert with_eos[-1] == 0.0
    # the other units are weighted as if the EOS were not there (rank and binary_top rank them among themselves)
    alone = transform_weights(d[:-1], 1.0, WeightSpec(transform=transform), pair_id=1, side="chosen")
    np.testing.assert_array_equal(with_eos[:-1], alone)
    # a truncated response has no EOS unit: nothing is replaced; without eos_weight the EOS is a unit like any other
    assert transform_weights(d, 1.0, spec, pair_id=1, side="chosen", eos=False)[-1] != 0.0
    assert transform_weights(d, 1.0, WeightSpec(transform=transform), pair_id=1, side="chosen", eos=True)[-1] > 0.0


def test_tisdpo_signal_set_gives_eos_weight_zero():
    from prefkd.core.methods import SIGNAL_SETS

    assert SIGNAL_SETS["tisdpo"].eos_weight == 0.0
    assert all(s.eos_weight is None for name, s in SIGNAL_SETS.items() if name != "tisdpo")


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


def _unit_token_counts(row: dict, role: str, side: str) -> np.ndarray:
    """Tokens of ``role`` in every unit (aligned spans, then the EOS unit of an untruncated response)."""
    from prefkd.data.batches import unit_ids

    units, m = unit_ids(row, role, side, "span")
    return np.bincount(units[units >= 0], minlength=m)


def test_mean_aggregation_averages_every_span_logprob(shard):
    """Mean aggregation (the CTPD authors' ``average_log_prob`` switch): the delta behind the weight, the
    reference and the policy span log-probs are all per-token means. The shard folds the student's token counts
    n_k into the stored values (weight w_k / n_k, reference n_k * mean_ref_k), so that the trainer's weighted sum
    over the student's summed span log-probs S_k is exactly sum_k w_k (S_k / n_k - mean_ref_k)."""
    out = shard["root"] / "mean.arrow"
    run_shard(
        shard["tokens"],
        out,
        "teacher",
        "span",
        str(shard["pos"]),
        str(shard["pos"]),
        str(shard["neg"]),
        WeightSpec(aggregation="mean"),
    )
    sig = read_shard(out, "signals").to_pylist()
    rows = read_shard(shard["tokens"]).to_pylist()
    pos, neg = load_model(str(shard["pos"])), load_model(str(shard["neg"]))
    batch = collate_pairs(rows[:2], "teacher", "span", pad_id=0)
    with torch.no_grad():
        lp_pos = model_token_logps(pos, batch["input_ids"], batch["attention_mask"])
        lp_neg = model_token_logps(neg, batch["input_ids"], batch["attention_mask"])
    checked = 0
    for j, (row, s) in enumerate(zip(rows[:2], sig[:2])):
        units = batch["unit_ids"][j]
        n_student = _unit_token_counts(row, "student", "chosen")
        assert len(s["chosen_weights"]) == len(n_student)
        for k in range(len(n_student)):
            mean_pos = float(lp_pos[j][units == k].mean())
            delta = mean_pos - float(lp_neg[j][units == k].mean())
            weight = math.exp(min(max(delta, -0.5), 1.5))
            assert s["chosen_delta"][k] == pytest.approx(delta, abs=1e-4)
            assert s["chosen_weights"][k] == pytest.approx(weight / n_student[k], rel=1e-4)
            assert s["chosen_ref_logps"][k] == pytest.approx(n_student[k] * mean_pos, abs=1e-3)
            checked += int(n_student[k] > 1 or int((units == k).sum()) > 1)
    assert checked > 0  # some spans have more than one token, where mean and sum differ
    # the weight statistics describe the weights w_k themselves, not the folded values
    stats = shard_stats(out)
    assert stats["spec"]["aggregation"] == "mean" and sum(stats["weight_hist"]["chosen"]) == stats["units"]["chosen"]

    # end to end: the one preference loss over the folded shard is the mean-aggregated CTPD loss
    from prefkd.core.preference import PairUnits, preference_loss

    table = PairTable([shard["tokens"]], [out])
    trows = table.rows(range(3))
    b = collate_pairs(trows, "student", "span", pad_id=0, with_signals=True)
    g = torch.Generator().manual_seed(0)
    policy = -torch.rand(b["unit_mask"].shape, generator=g) * 5  # student span sums S_k
    out_loss = preference_loss(PairUnits(policy, b["ref_logps"], b["weights"], b["unit_mask"]), beta=0.1)
    margins = []
    for side_i, side in enumerate(("chosen", "rejected")):
        for j, row in enumerate(trows):
            n = _unit_token_counts(row, "student", side)
            w = np.asarray(row["signals"][f"{side}_weights"]) * n  # w_k
            mean_ref = np.asarray(row["signals"][f"{side}_ref_logps"]) / n
            s_k = policy[side_i * len(trows) + j, : len(n)].double().numpy()
            margins.append(float(np.sum(w * (s_k / n - mean_ref))))
    m_w, m_l = np.array(margins[:3]), np.array(margins[3:])
    expected = -np.log(1 / (1 + np.exp(-0.1 * (m_w - m_l))))
    np.testing.assert_allclose(out_loss.losses.numpy(), expected, rtol=1e-5)


def test_eos_weight_in_a_signal_shard(shard, teacher_tokenizer, student_tokenizer):
    # 6 pairs at max length 80: some responses are truncated (no EOS unit), some are not
    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(6, seed=1))]
    table, stats = tokenize_pairs(records, ModelTokens(teacher_tokenizer), ModelTokens(student_tokenizer), 80, 40)
    tokens = shard["root"] / "tokens-80.arrow"
    write_shard(table, tokens, kind="tokens", stats=stats)
    out = shard["root"] / "eos0.arrow"
    run_shard(
        tokens, out, "teacher", "token", str(shard["pos"]), str(shard["pos"]), str(shard["neg"]),
        WeightSpec(eos_weight=0.0),
    )  # fmt: skip
    sig = read_shard(out, "signals").to_pylist()
    rows = read_shard(tokens).to_pylist()
    truncated = 0
    for row, s in zip(rows, sig):
        for side in ("chosen", "rejected"):
            w = s[f"{side}_weights"]
            if row[f"{side}_truncated"]:  # no EOS unit: the last token keeps its weight
                truncated += 1
                assert w[-1] > 0
            else:
                assert w[-1] == 0.0 and min(w[:-1]) > 0
    assert 0 < truncated < 12


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


def _ctpd_models(shard) -> ScoringModels:
    roles = (("neg", "teacher"), ("pos", "teacher"), ("ref", "teacher"))
    return ScoringModels(str(shard["pos"]), str(shard["pos"]), str(shard["neg"]), roles)


def test_a_job_walks_its_shards_with_each_model_loaded_once_and_matches_one_job_per_shard(shard, tmp_path):
    """Issue 11: a scoring job loads each model once (scoring one model at a time) and walks several shards;
    its shards are byte for byte those of one job per shard."""
    second = tmp_path / "tokens-2.arrow"
    write_shard(read_shard(shard["tokens"], "tokens").slice(0, 5), second, kind="tokens")
    tokens = [shard["tokens"], second]
    walked = [tmp_path / "walk" / "train" / f"shard-{k}-of-2.arrow" for k in (1, 2)]
    alone = [tmp_path / "alone" / "train" / f"shard-{k}-of-2.arrow" for k in (1, 2)]
    models = _ctpd_models(shard)
    loads = []
    real_load = signals_module.load_model
    signals_module.load_model = lambda *a, **k: loads.append(a[0]) or real_load(*a, **k)
    try:
        stats = run_shards(list(zip(tokens, walked)), "span", models, WeightSpec())
    finally:
        signals_module.load_model = real_load
    assert sorted(loads) == sorted({str(shard["pos"]), str(shard["neg"])})  # pi+ is also the reference: once
    assert [s["pairs"] for s in stats] == [12, 5]
    for t, out in zip(tokens, alone):
        run_shard(t, out, "teacher", "span", str(shard["pos"]), str(shard["pos"]), str(shard["neg"]), WeightSpec())
    assert [p.read_bytes() for p in walked] == [p.read_bytes() for p in alone]
    assert not (walked[0].parent / ".stash").exists()  # a finished job leaves no stash


def test_a_failed_job_keeps_its_finished_shards_and_its_retry_redoes_only_the_rest(shard, tmp_path):
    second = tmp_path / "tokens-2.arrow"
    write_shard(read_shard(shard["tokens"], "tokens").slice(0, 5), second, kind="tokens")
    outs = [tmp_path / "train" / "shard-1-of-2.arrow", tmp_path / "blocked" / "train" / "shard-2-of-2.arrow"]
    (tmp_path / "blocked").write_text("a file where the second shard's folder must go")
    pairs = list(zip([shard["tokens"], second], outs))
    with pytest.raises(OSError):
        run_shards(pairs, "span", _ctpd_models(shard), WeightSpec())
    first = outs[0].read_bytes()
    outs[0].unlink()  # Snakemake removes every output of a failed job
    (tmp_path / "blocked").unlink()
    stats = run_shards(pairs, "span", _ctpd_models(shard), WeightSpec())
    assert [s["pairs"] for s in stats] == [5]  # only the unfinished shard was computed
    assert outs[0].read_bytes() == first and outs[1].is_file()
    # a changed setting must not reuse a stashed shard: everything is computed again
    outs[1].unlink()
    ShardStash("old key").keep(outs[0])
    stats = run_shards(pairs, "span", _ctpd_models(shard), WeightSpec(k=2.0))
    assert [s["pairs"] for s in stats] == [12, 5]


def test_ctpd_lite_weights_pair_spans_by_index_by_hand():
    from prefkd.core.weights import side_contrast_weights

    # chosen: 4 spans + EOS; rejected: 2 spans + EOS -> spans 0, 1 paired, chosen spans 2, 3 and both EOS: weight 1
    chosen = np.array([-1.0, -2.0, -3.0, -0.5, -9.0])
    rejected = np.array([-3.0, -1.2, -7.0])
    d_c, d_r, w_c, w_r = side_contrast_weights(chosen, rejected, WeightSpec(), eos=(True, True))
    # s = [-1 - -3, -2 - -1.2] = [2.0, -0.8] -> clamp to [-0.5, 1.5] = [1.5, -0.5]
    np.testing.assert_allclose(w_c, [math.exp(1.5), math.exp(-0.5), 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(w_r, [math.exp(-1.5), math.exp(0.5), 1], rtol=1e-6)
    np.testing.assert_allclose(d_c, [2.0, -0.8, 0, 0, 0])
    np.testing.assert_allclose(d_r, [2.0, -0.8, 0])
    assert w_c.dtype == np.float32
    # the longer side rejected, no EOS on a truncated chosen, k = 2, EOS weight set (spec.eos_weight)
    spec = WeightSpec(k=2.0, eos_weight=0.0)
    _, _, w_c, w_r = side_contrast_weights(np.array([-1.0]), np.array([-1.2, -5.0, -1.0]), spec, eos=(False, True))
    np.testing.assert_allclose(w_c, [2 * math.exp(0.2)], rtol=1e-6)  # s = 0.2, inside the clamp
    np.testing.assert_allclose(w_r, [2 * math.exp(-0.2), 1, 0], rtol=1e-6)  # tail 1 (not k), EOS 0


def test_ctpd_lite_shard_scores_both_responses_with_the_teacher_alone(shard):
    out = shard["root"] / "lite" / "train" / "shard.arrow"
    spec = WeightSpec(contrast="sides")
    run_shard(shard["tokens"], out, "teacher", "span", str(shard["pos"]), None, None, spec)
    sig = read_shard(out, "signals").to_pylist()
    rows = read_shard(shard["tokens"]).to_pylist()
    teacher = load_model(str(shard["pos"]))
    batch = collate_pairs(rows[:3], "teacher", "span", pad_id=0)  # [chosen x 3; rejected x 3]
    with torch.no_grad():
        lp = model_token_logps(teacher, batch["input_ids"], batch["attention_mask"])
    unequal = 0
    for j, (row, s) in enumerate(zip(rows[:3], sig[:3])):
        units = {"chosen": batch["unit_ids"][j], "rejected": batch["unit_ids"][j + 3]}
        spans = {side: row[f"{side}_num_spans"] for side in ("chosen", "rejected")}
        n = min(spans.values())
        unequal += spans["chosen"] != spans["rejected"]
        span_lp = {side: [float(lp[j + 3 * (side == "rejected")][units[side] == k].sum()) for k in range(n)]
                   for side in ("chosen", "rejected")}  # fmt: skip
        for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
            w = s[f"{side}_weights"]
            for k in range(n):
                d = span_lp["chosen"][k] - span_lp["rejected"][k]
                assert s[f"{side}_delta"][k] == pytest.approx(d, abs=1e-4)
                assert w[k] == pytest.approx(math.exp(mu * min(max(d, -0.5), 1.5)), rel=1e-4)
            assert all(x == 1.0 for x in w[n:])  # the unpaired tail spans and the EOS unit
            assert s[f"{side}_ref_logps"][0] == pytest.approx(span_lp[side][0], abs=1e-4)  # teacher SFT reference
    assert unequal  # the demo pairs have responses of different span counts
    with pytest.raises(PrefkdError, match="sides contrast"):
        run_shard(
            shard["tokens"], out, "teacher", "span", str(shard["pos"]), str(shard["pos"]), str(shard["neg"]), spec
        )


def test_ctpd_lite_plan_needs_only_the_teacher_sft():
    from prefkd.core.methods import METHODS, models_for_set, signal_plan

    plan = signal_plan(["ctpd-lite"])
    assert list(plan) == ["ctpd-lite"] and models_for_set("ctpd-lite", plan) == ["teacher-sft"]
    assert plan["ctpd-lite"].unit == "span" and plan["ctpd-lite"].contrast == "sides"
    assert list(signal_plan(["sft", "dpo", "ctpd-lite"])) == ["dpo-ref-student", "ctpd-lite"]
    assert "ctpd" in signal_plan(["ctpd", "ctpd-lite"]) and "ctpd" in signal_plan(["sft", "dpo"])
    assert signal_plan(["ctpd-lite"], reference="pos")["ctpd-lite"].ref == ("teacher-sft", "teacher")
    assert METHODS["ctpd-lite"].weights == "ctpd-lite" and METHODS["ctpd-lite"].unit == "span"


def test_normalize_mean_scales_each_responses_weights_to_mean_one(shard, tmp_path):
    """signals.normalize: mean sets k = M / sum w per response (mean weight 1); none keeps the paper's weights."""
    from prefkd.core.weights import normalize_weights

    w = np.array([2.0, 1.0, 1.0], dtype=np.float32)
    np.testing.assert_allclose(normalize_weights(w, "mean"), [1.5, 0.75, 0.75])  # 3 / 4 * w
    assert normalize_weights(w, "none") is w
    assert np.all(normalize_weights(np.zeros(3, dtype=np.float32), "mean") == 0)
    with pytest.raises(PrefkdError, match="normalize"):
        WeightSpec(normalize="max")
    out = tmp_path / "train" / "shard.arrow"
    run_shard(shard["tokens"], out, "teacher", "span", str(shard["pos"]), str(shard["pos"]), str(shard["neg"]),
              WeightSpec(normalize="mean"))  # fmt: skip
    table = read_shard(out, "signals")
    for side in ("chosen", "rejected"):
        for weights in table.column(f"{side}_weights").to_pylist():
            assert np.mean(weights) == pytest.approx(1.0, rel=1e-5)
