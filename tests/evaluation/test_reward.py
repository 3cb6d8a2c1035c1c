"""prefkd.evaluation.reward: greedy generation, the implicit and reward-model judges, win rate and the two CLI stages,
on tiny real models (no mocks)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")

from prefkd.assets.models import build_tiny_model  # noqa: E402
from prefkd.core.settings import add_options, from_args  # noqa: E402
from prefkd.data.demo import generate_demo_pairs  # noqa: E402
from prefkd.data.prepare import write_split  # noqa: E402
from prefkd.errors import PrefkdError  # noqa: E402
from prefkd.evaluation import reward  # noqa: E402

PROMPTS = 6
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, student_tokenizer_dir):
    """The shared tiny teacher pair (conftest.py) as the implicit judge, and a student with an untied head."""
    root = tmp_path_factory.mktemp("reward")
    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(10, seed=3))]
    data = root / "test.parquet"
    write_split(records[::-1], data)  # stored out of order: load_prompts sorts by pair_id
    teacher, teacher_neg, student = tiny_models["teacher"], tiny_models["teacher-neg"], root / "student"
    # untied head: a tied random tiny Qwen2 only repeats the last prompt token ("\n"), i.e. empty answers
    build_tiny_model(
        "qwen2", student_tokenizer_dir, student, seed=1, hidden_size=16, intermediate_size=32, tie_word_embeddings=False
    )
    rows = reward.load_prompts(data, PROMPTS)
    return dict(root=root, data=data, teacher=teacher, teacher_neg=teacher_neg, student=student, rows=rows,
                prompts=[r["prompt"] for r in rows])  # fmt: skip


def test_load_prompts_takes_the_first_pair_ids(setup):
    assert [r["pair_id"] for r in setup["rows"]] == list(range(PROMPTS))
    assert len(reward.load_prompts(setup["data"], 0)) == 10
    assert all(m["role"] in ("system", "user", "assistant") for r in setup["rows"] for m in r["prompt"])
    with pytest.raises(PrefkdError, match="no prepared split"):
        reward.load_prompts(setup["root"] / "missing.parquet", 3)


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_generation_is_deterministic_and_independent_of_batching(setup, who):
    run = lambda bs: reward.generate_answers(setup[who], setup["prompts"], NEW_TOKENS, batch_size=bs, device="cpu")  # noqa: E731
    first = run(4)
    assert len(first) == PROMPTS and all(isinstance(a, str) for a in first)
    assert any(first)  # a random tiny model still emits some text
    assert run(4) == first
    assert run(1) == first  # left padding does not change greedy answers


def _independent_implicit(pos_dir, neg_dir, prompt, answer):
    """Reference: each model on the one unpadded sequence, log_softmax of the logits, answer positions."""
    from prefkd.assets.models import load_model
    from prefkd.assets.tokenizers import load_tokenizer

    tok = load_tokenizer(pos_dir)
    p_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    p_ids = tok(p_ids, add_special_tokens=False).input_ids
    a_ids = tok(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([p_ids + a_ids + [tok.eos_token_id]])
    total = 0.0
    for sign, d in ((1.0, pos_dir), (-1.0, neg_dir)):
        with torch.no_grad():
            logp = torch.log_softmax(load_model(str(d))(input_ids=ids).logits[0].double(), -1)
        total += sign * sum(float(logp[t - 1, ids[0, t]]) for t in range(len(p_ids), len(p_ids) + len(a_ids)))
    return total


def test_implicit_judge(setup):
    answers = ["Blue, mostly.", "", "The capital is Paris 🇫🇷 and 4 + 5 = 9.", "Sure – here it is."] + ["ok"] * (
        PROMPTS - 4
    )
    same = reward.ImplicitJudge(setup["teacher"], setup["teacher"], batch_size=3, device="cpu")
    assert same.score(setup["prompts"], answers) == [0.0] * PROMPTS
    judge = reward.make_judge("implicit", setup["teacher"], setup["teacher_neg"], batch_size=3, device="cpu")
    scores = judge.score(setup["prompts"], answers)
    assert scores[1] == 0.0  # empty answer
    for i in (0, 2, 3, 5):
        expected = _independent_implicit(setup["teacher"], setup["teacher_neg"], setup["prompts"][i], answers[i])
        assert scores[i] == pytest.approx(expected, abs=1e-4)
    assert len(set(scores)) > 2
    with pytest.raises(PrefkdError, match="--pos DIR and --neg DIR"):
        reward.make_judge("implicit", setup["teacher"], None)


@pytest.fixture(scope="module")
def reward_model_dir(setup, student_tokenizer_dir):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from prefkd.assets.tokenizers import load_tokenizer

    tok = load_tokenizer(student_tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config).eval()
    out = setup["root"] / "rm"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_reward_model_judge_matches_the_model_run_by_hand(setup, reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    answers = ["Blue.", "", "Paris is the capital of France, as far as I know.", "ok", "Fine 🙂", "4"]
    judge = reward.make_judge(str(reward_model_dir), batch_size=4, device="cpu")
    scores = judge.score(setup["prompts"], answers)
    tok = AutoTokenizer.from_pretrained(str(reward_model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_model_dir)).eval()
    for prompt, answer, score in zip(setup["prompts"], answers, scores):
        text = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            expected = float(model(**ids).logits[0, 0])
        assert score == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) > 1
    with pytest.raises(PrefkdError, match="Could not load the reward model"):
        reward.RewardModelJudge(str(setup["root"] / "no-such-rm"))


def test_win_rate():
    r = reward.win_rate([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.0])
    assert (r["prompts"], r["wins"], r["ties"], r["losses"]) == (4, 2, 1, 1)
    assert r["win_rate"] == pytest.approx(2.5 / 4)
    assert r["mean_score"] == pytest.approx(6.5 / 4) and r["baseline_mean_score"] == pytest.approx(1.5)
    assert reward.win_rate([1.0, 1.0], [1.0, 1.0])["win_rate"] == 0.5
    assert reward.win_rate([1.0, 1.0], [1.0, 1.0])["win_rate_ci"] == [0.5, 0.5]
    assert reward.outcomes([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.0]) == [1.0, 0.5, 0.0, 1.0]
    lo, hi = r["win_rate_ci"]
    assert 0.0 <= lo < r["win_rate"] < hi <= 1.0
    assert reward.win_rate([0.0], [-1.0])["win_rate"] == 1.0
    with pytest.raises(PrefkdError, match="must match"):
        reward.win_rate([1.0, 2.0], [1.0])
    with pytest.raises(PrefkdError):
        reward.win_rate([], [])


def _generate_args(setup, model, out, **kw):
    p = argparse.ArgumentParser()
    add_options(p, reward.GenerateSettings)
    argv = ["--model", str(setup[model]), "--data", str(setup["data"]), "--out", str(out), "--pos", str(setup["teacher"]),
            "--neg", str(setup["teacher_neg"]), "--max-prompts", "4", "--max-new-tokens", "6", "--device", "cpu"]  # fmt: skip
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return from_args(reward.GenerateSettings, p.parse_args(argv))


def _winrate_args(scores, baseline, out):
    p = argparse.ArgumentParser()
    add_options(p, reward.WinrateSettings)
    args = p.parse_args(["--scores", str(scores), "--baseline", str(baseline), "--model", "student-ctpd",
                         "--baseline-name", "student-sft", "--judge-name", "implicit:teacher-pos/teacher-neg",
                         "--out", str(out)])  # fmt: skip
    return from_args(reward.WinrateSettings, args)


def test_cli_end_to_end(setup, capsys):
    root = setup["root"] / "cli"
    model_out, base_out = root / "student-ctpd" / "generations.jsonl", root / "student-sft" / "generations.jsonl"
    assert reward.run_generate(_generate_args(setup, "student", model_out)) == 0
    assert reward.run_generate(_generate_args(setup, "teacher", base_out, batch_size=3)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 4 and summary["skipped"] == 0
    rows = [json.loads(line) for line in model_out.read_text(encoding="utf-8").splitlines()]
    assert [r["pair_id"] for r in rows] == [0, 1, 2, 3]
    assert all(set(r) == {"pair_id", "prompt", "answer", "score"} for r in rows)
    assert rows[0]["prompt"] == setup["prompts"][0] and isinstance(rows[0]["score"], float)
    assert not list(model_out.parent.glob(".*.tmp"))

    out = root / "student-ctpd" / "reward.json"
    assert reward.run_winrate(_winrate_args(model_out, base_out, out)) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"model", "baseline", "judge", "prompts", "mean_score", "baseline_mean_score", "win_rate",
                           "win_rate_ci", "wins", "ties", "losses", "per_prompt"}  # fmt: skip
    base = [json.loads(line)["score"] for line in base_out.read_text().splitlines()]
    per_prompt = report.pop("per_prompt")
    assert report == {"model": "student-ctpd", "baseline": "student-sft", "judge": "implicit:teacher-pos/teacher-neg",
                      **reward.win_rate([r["score"] for r in rows], base)}  # fmt: skip
    assert [(p["pair_id"], p["score"], p["baseline_score"]) for p in per_prompt] == [
        (r["pair_id"], r["score"], b) for r, b in zip(rows, base)
    ]
    assert sum(p["outcome"] for p in per_prompt) / len(per_prompt) == pytest.approx(report["win_rate"])
    assert reward.run_winrate(_winrate_args(model_out, model_out, root / "self.json")) == 0
    assert json.loads((root / "self.json").read_text())["win_rate"] == 0.5

    # different prompt sets are refused
    short = root / "short.jsonl"
    reward.write_jsonl(short, rows[:3])
    with pytest.raises(PrefkdError, match="same pair_ids"):
        reward.run_winrate(_winrate_args(model_out, short, root / "bad.json"))
    assert not (root / "bad.json").exists()
