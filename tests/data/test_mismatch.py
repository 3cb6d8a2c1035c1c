"""Tokenizer-mismatch measures: span classes, vocabulary byte strings, Jaccard, and `prefkd mismatch`."""

from __future__ import annotations

import json

import pytest

from prefkd.cli import main
from prefkd.data.mismatch import sample_records
from prefkd.data.span_classes import class_shares, jaccard, span_class_counts, span_class_ids, vocab_byte_strings
from prefkd.data.tokenize_align import merge_stats
from prefkd.errors import PrefkdError


def test_span_classes_by_hand():
    # spans (teacher, student): (1,1) (1,3) (2,1) (2,2) (1,1) (4,1)
    t, s = [1, 1, 2, 2, 1, 4], [1, 3, 1, 2, 1, 1]
    assert span_class_ids(t, s).tolist() == [0, 1, 2, 3, 0, 2]
    counts = span_class_counts(t, s)
    assert counts == {"1:1": 2, "1:n": 1, "n:1": 2, "n:m": 1}
    assert class_shares(counts) == {"1:1": 2 / 6, "1:n": 1 / 6, "n:1": 2 / 6, "n:m": 1 / 6}
    assert class_shares({}) == {"1:1": 0.0, "1:n": 0.0, "n:1": 0.0, "n:m": 0.0}


def test_span_classes_reject_bad_counts():
    with pytest.raises(PrefkdError, match="one teacher and one student count"):
        span_class_counts([1, 2], [1])
    with pytest.raises(PrefkdError, match="at least one token"):
        span_class_counts([1, 0], [1, 1])


def test_jaccard_by_hand():
    assert jaccard({b"a", b" the", b"x"}, {b" the", b"x", b"yz", b"q"}) == 2 / 5
    assert jaccard(set(), set()) == 1.0


def test_vocab_bytes_of_both_tokenizer_kinds(teacher_tokenizer, student_tokenizer):
    mistral, qwen = teacher_tokenizer, student_tokenizer  # SentencePiece byte fallback / byte-level BPE
    m_bytes, q_bytes = vocab_byte_strings(mistral), vocab_byte_strings(qwen)
    # '▁the' (Mistral) and 'Ġthe' (Qwen) are both the bytes " the"
    assert mistral.convert_tokens_to_ids("\u2581the") != mistral.unk_token_id
    assert qwen.convert_tokens_to_ids("\u0120the") is not None
    assert b" the" in m_bytes and b" the" in q_bytes
    assert not any("\u2581".encode() in t for t in m_bytes)  # every '▁' became a space
    # Mistral's byte-fallback token <0xE2> and Qwen's byte token 'â' (GPT-2 table) are the single byte 0xE2
    assert mistral.convert_tokens_to_ids("<0xE2>") == 771 + 0xE2  # byte tokens follow the 771 control ids
    assert b"\xe2" in m_bytes and qwen.convert_tokens_to_ids("\u00e2") is not None and b"\xe2" in q_bytes
    # special tokens are control strings, not text
    assert b"<s>" not in m_bytes and b"[INST]" not in m_bytes and b"<|im_end|>" not in q_bytes
    assert len(q_bytes) == 151643 + 8  # distinct regular byte strings + the 8 non-special added tokens


def test_mismatch_command(tmp_path, teacher_tokenizer_dir, student_tokenizer_dir, capsys):
    out = tmp_path / "m.json"
    args = ["mismatch", "--teacher", str(teacher_tokenizer_dir), "--student", str(student_tokenizer_dir)]
    assert main(args + ["--limit", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| builtin:mistral-v0.3 | builtin:qwen2.5 |" in printed and "n:m" in printed
    result = json.loads(out.read_text())
    assert result["pairs"] == 12 and result["spans"] == sum(result["span_classes"].values()) > 0
    assert abs(sum(result["span_class_share"].values()) - 1) < 1e-9
    assert result["tokens_per_span"]["teacher"] >= 1 and result["tokens_per_span"]["student"] >= 1
    vocab = result["vocab"]
    assert 0 < vocab["shared"] < min(vocab["teacher"], vocab["student"])
    assert result["vocab_jaccard"] == vocab["shared"] / (vocab["teacher"] + vocab["student"] - vocab["shared"])


def test_mismatch_missing_file_is_clear(tmp_path):
    with pytest.raises(PrefkdError, match="There is no file"):
        sample_records(tmp_path / "nope.jsonl", 5)


def test_merge_stats_sums_span_classes():
    part = {
        "pairs_in": 1,
        "pairs_out": 1,
        "spans": 3,
        "one_to_one_spans": 2,
        "drops": {},
        "span_size_hist": {"1": 2, "2": 1},
        "prompts_truncated": {},
        "responses_truncated": {},
        "response_tokens": {"teacher": {"chosen": 4}, "student": {"chosen": 3}},
        "span_classes": {"1:1": 2, "1:n": 0, "n:1": 1, "n:m": 0},
    }
    old = {k: v for k, v in part.items() if k != "span_classes"}
    total = merge_stats([part, part, old])
    assert total["span_classes"] == {"1:1": 4, "1:n": 0, "n:1": 2, "n:m": 0}
    assert total["span_class_share"]["n:1"] == 2 / 6
    assert "span_classes" not in merge_stats([old])
