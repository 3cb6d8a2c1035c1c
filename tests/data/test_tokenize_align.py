"""The tokenize+align stage: shard contract, truncation at common spans, drops, determinism."""

from __future__ import annotations

import json
import unicodedata

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefkd.assets.tokenizers import special_token_strings
from prefkd.data.demo import generate_demo_pairs
from prefkd.data.spans import check_shard_row
from prefkd.data.tokenize_align import ModelTokens, merge_stats, tokenize_pairs
from prefkd.errors import PrefkdError
from prefkd.io.shards import TOKEN_SCHEMA, read_shard, shard_stats, write_shard


@pytest.fixture(scope="module")
def models(teacher_tokenizer, student_tokenizer):
    return ModelTokens(teacher_tokenizer), ModelTokens(student_tokenizer)


@pytest.fixture(scope="module")
def demo_records():
    return [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(200, seed=1))]


def eos_ids(models):
    return {"teacher": models[0].eos_id, "student": models[1].eos_id}


def check_table(table, records, models):
    by_id = {r["pair_id"]: r for r in records}
    problems = []
    for row in table.to_pylist():
        rec = by_id[row["pair_id"]]
        problems += check_shard_row(row, rec, models[0].vocab, models[1].vocab, eos_ids(models))
    return problems


def test_demo_pairs_full_length(models, demo_records):
    table, stats = tokenize_pairs(demo_records, *models, max_length=1024, max_prompt_length=512)
    assert table.num_rows == len(demo_records)
    for field in TOKEN_SCHEMA:
        assert table.schema.field(field.name).type == field.type
    assert "chosen_planted" in table.column_names and "family" in table.column_names
    assert check_table(table, demo_records, models) == []
    assert stats["responses_truncated"] == {"chosen": 0, "rejected": 0}
    assert 0.85 < stats["one_to_one_spans"] / stats["spans"] <= 1.0
    # prompt tokens are the chat template: Mistral starts with BOS [INST], Qwen with <|im_start|>
    row = table.slice(0, 1).to_pylist()[0]
    t_ids = row["teacher_chosen_input_ids"]
    assert t_ids[:2] == [1, 3]
    assert t_ids[row["teacher_prompt_len"] - 1] == 4  # [/INST] closes the prompt
    assert t_ids[-1] == 2 and row["student_chosen_input_ids"][-1] == models[1].eos_id


def test_truncation_keeps_both_models_on_the_same_text(models, demo_records):
    table, stats = tokenize_pairs(demo_records, *models, max_length=48, max_prompt_length=24)
    assert stats["responses_truncated"]["chosen"] > 0
    assert stats["prompts_truncated"]["student"] > 0
    assert check_table(table, demo_records, models) == []
    for row in table.to_pylist():
        for role in ("teacher", "student"):
            assert len(row[f"{role}_chosen_input_ids"]) <= 48
            assert row[f"{role}_prompt_len"] <= 24
        if row["chosen_truncated"]:
            assert row["teacher_chosen_input_ids"][-1] != 2  # no EOS on a cut response


def test_prompt_truncation_keeps_the_end_and_bos(models):
    teacher, _ = models
    long_prompt = [{"role": "user", "content": "word " * 200 + "FINAL"}]
    values, splits, cut, refused = teacher.prompt_ids([long_prompt], max_prompt_length=16)
    assert not refused.any()
    ids = values[splits[0] : splits[1]].tolist()
    assert cut == 1 and len(ids) == 16
    assert ids[0] == teacher.bos_id
    assert ids[-1] == 4  # [/INST] survives: the end of the prompt is kept


def test_no_room_for_response_is_a_counted_drop(models):
    recs = [
        {"pair_id": 0, "prompt": [{"role": "user", "content": "hi"}], "chosen": "Yes, sure.", "rejected": "No."},
        {"pair_id": 1, "prompt": [{"role": "user", "content": "x " * 400}], "chosen": "Yes.", "rejected": "No."},
    ]
    table, stats = tokenize_pairs(recs, *models, max_length=40, max_prompt_length=39)
    assert table.column("pair_id").to_pylist() == [0]
    assert stats["drops"]["no_room_for_response"] == 1
    assert stats["pairs_in"] == 2 and stats["pairs_out"] == 1


def test_max_prompt_length_must_be_below_max_length(models, demo_records):
    with pytest.raises(PrefkdError, match="max_prompt_length"):
        tokenize_pairs(demo_records[:2], *models, max_length=32, max_prompt_length=32)


@given(
    st.lists(
        st.text(min_size=1, max_size=60).map(lambda s: unicodedata.normalize("NFC", s)).filter(lambda s: s.strip()),
        min_size=2,
        max_size=2,
    ),
    st.integers(20, 60),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_truncation_invariants(models, texts, max_length):
    chosen, rejected = texts
    specials = special_token_strings(models[0].tokenizer) + special_token_strings(models[1].tokenizer)
    assume(not any(s in t for s in specials for t in texts))  # prepare drops such rows
    recs = [{"pair_id": 7, "prompt": [{"role": "user", "content": "Q?"}], "chosen": chosen, "rejected": rejected}]
    table, stats = tokenize_pairs(recs, *models, max_length=max_length, max_prompt_length=16)
    if table.num_rows == 0:
        assert stats["drops"]["no_room_for_response"] == 1
        return
    assert check_table(table, recs, models) == []


def test_shards_are_byte_identical_and_validated(tmp_path, models, demo_records):
    paths = []
    for name in ("a", "b"):
        table, stats = tokenize_pairs(demo_records[:50], *models, max_length=128, max_prompt_length=64)
        path = tmp_path / f"{name}.arrow"
        write_shard(table, path, kind="tokens", stats=stats)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert read_shard(paths[0]).num_rows == 50
    assert shard_stats(paths[0])["pairs_out"] == 50
    with pytest.raises(PrefkdError, match="expected 'signals'"):
        read_shard(paths[0], kind="signals")
    broken = tmp_path / "broken.arrow"
    write_shard(pa.table({"pair_id": pa.array([1], type=pa.int64())}), broken, kind="tokens")
    with pytest.raises(PrefkdError, match="lacks column"):
        read_shard(broken)
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"not arrow")
    with pytest.raises(PrefkdError, match="not a readable Arrow"):
        read_shard(garbage)


def test_merge_stats_sums_shards(models, demo_records):
    parts = [tokenize_pairs(demo_records[i : i + 50], *models, max_length=96, max_prompt_length=48)[1] for i in (0, 50)]
    merged = merge_stats(parts)
    whole = tokenize_pairs(demo_records[:100], *models, max_length=96, max_prompt_length=48)[1]
    assert merged["spans"] == whole["spans"]
    assert merged["one_to_one_spans"] == whole["one_to_one_spans"]
    assert merged["span_size_hist"] == whole["span_size_hist"]
    assert merged["responses_truncated"] == whole["responses_truncated"]
    json.dumps(merged)


def test_prompts_a_template_refuses_are_counted_drops(models):
    two_assistant_turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "assistant", "content": "anything else?"},
        {"role": "user", "content": "no"},
    ]
    recs = [
        {"pair_id": 0, "prompt": [{"role": "user", "content": "hi"}], "chosen": "Yes.", "rejected": "No."},
        {"pair_id": 1, "prompt": two_assistant_turns, "chosen": "Ok.", "rejected": "Bye."},
    ]
    table, stats = tokenize_pairs(recs, *models, max_length=128, max_prompt_length=64)
    assert table.column("pair_id").to_pylist() == [0]
    assert stats["drops"]["teacher_chat_template_rejects_prompt"] == 1  # Mistral's template refuses it
