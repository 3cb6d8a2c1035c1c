"""Tests of the prepare stage (prefkd.data.prepare)."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefkd.core.settings import add_options, from_args
from prefkd.data import prepare
from prefkd.data.demo import generate_demo_pairs, write_demo_pairs
from prefkd.data.prepare import (
    DROP_REASONS,
    load_source,
    normalise_rows,
    parse_hh,
    run_prepare,
    split_records,
    split_sizes,
)
from prefkd.errors import PrefkdError

PROJECT = Path(__file__).resolve().parents[2]
HH_FILE = Path(__file__).resolve().parents[3] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_arrow(path: Path, rows, stream: bool) -> Path:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        writer.write_table(table)
        writer.close()
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def hh(*turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


PAIRS_ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "Capital of Japan? 東京?", "chosen": "Tokyo (東京) 👩‍💻", "rejected": "Osaka."},
]

MESSAGES_ROWS = [
    {
        "prompt": "hi?",  # ignored in favour of the message prefix
        "chosen": msgs(("user", "hi?"), ("assistant", "Hello!")),
        "rejected": msgs(("user", "hi?"), ("assistant", "Go away.")),
    },
    {
        "prompt": "Q2",
        "chosen": msgs(
            ("system", "Be nice."), ("user", "Q2"), ("assistant", "A"), ("user", "more"), ("assistant", "Good")
        ),
        "rejected": msgs(
            ("system", "Be nice."), ("user", "Q2"), ("assistant", "A"), ("user", "more"), ("assistant", "Bad")
        ),
    },
    {  # prompt prefixes differ
        "prompt": "x",
        "chosen": msgs(("user", "x"), ("assistant", "a")),
        "rejected": msgs(("user", "y"), ("assistant", "b")),
    },
    {  # last message is not an assistant turn
        "prompt": "x",
        "chosen": msgs(("user", "x"), ("assistant", "a"), ("user", "?")),
        "rejected": msgs(("user", "x"), ("assistant", "b")),
    },
]


# --------------------------------------------------------------------------------------
# shapes and file types
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_pairs_jsonl(tmp_path, gz):
    path = write_jsonl(tmp_path / ("p.jsonl.gz" if gz else "p.jsonl"), PAIRS_ROWS, gz=gz)
    rows, fmt = load_source(path)
    assert fmt == "pairs" and len(rows) == 3
    records, drops, _, _ = normalise_rows(rows, fmt)
    assert sum(drops.values()) == 0
    assert records[2] == {
        "pair_id": 2,
        "prompt": [{"role": "user", "content": "Capital of Japan? 東京?"}],
        "chosen": "Tokyo (東京) 👩‍💻",
        "rejected": "Osaka.",
    }


def test_pairs_conversational_parquet(tmp_path):
    rows = [
        {
            "prompt": msgs(("system", "sys"), ("user", "Hi")),
            "chosen": msgs(("assistant", "Hello there.")),
            "rejected": msgs(("assistant", "What.")),
        },
        {
            "prompt": msgs(("user", "Q")),
            "chosen": msgs(("assistant", "A1")),
            "rejected": msgs(("assistant", "A2")),
        },
    ]
    path = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded, fmt = load_source(path)
    assert fmt == "pairs"
    records, drops, _, _ = normalise_rows(loaded, fmt)
    assert sum(drops.values()) == 0
    assert records[0]["prompt"] == msgs(("system", "sys"), ("user", "Hi"))
    assert records[0]["chosen"] == "Hello there." and records[0]["rejected"] == "What."


def test_pairs_string_responses_with_message_prompt(tmp_path):
    rows = [{"prompt": msgs(("user", "Q")), "chosen": "yes", "rejected": "no"}]
    loaded, fmt = load_source(write_jsonl(tmp_path / "x.jsonl", rows))
    assert fmt == "pairs"
    records, _, _, _ = normalise_rows(loaded, fmt)
    assert records[0]["prompt"] == msgs(("user", "Q"))


@pytest.mark.parametrize("stream", [False, True])
def test_messages_arrow(tmp_path, stream):
    path = write_arrow(tmp_path / "m.arrow", MESSAGES_ROWS, stream=stream)
    rows, fmt = load_source(path)
    assert fmt == "messages"
    records, drops, examples, _ = normalise_rows(rows, fmt)
    assert [r["pair_id"] for r in records] == [0, 1]
    assert records[0]["prompt"] == msgs(("user", "hi?"))
    assert records[0]["chosen"] == "Hello!" and records[0]["rejected"] == "Go away."
    assert records[1]["prompt"] == msgs(("system", "Be nice."), ("user", "Q2"), ("assistant", "A"), ("user", "more"))
    assert drops["prompt_mismatch"] == 1 and examples["prompt_mismatch"] == [2]
    assert drops["unparseable_transcript"] == 1 and examples["unparseable_transcript"] == [3]


def test_messages_without_prompt_column_json(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "prompt"} for r in MESSAGES_ROWS[:2]]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    loaded, fmt = load_source(path)
    assert fmt == "messages" and len(loaded) == 2


def test_json_wrapped_and_columnar(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"data": PAIRS_ROWS}), encoding="utf-8")
    assert len(load_source(a)[0]) == 3
    b = tmp_path / "b.json"
    cols = {k: [r[k] for r in PAIRS_ROWS] for k in ("prompt", "chosen", "rejected")}
    b.write_text(json.dumps(cols), encoding="utf-8")
    assert load_source(b)[0] == PAIRS_ROWS
    c = write_jsonl(tmp_path / "c.json", PAIRS_ROWS)  # JSON lines named .json
    assert load_source(c)[0] == PAIRS_ROWS


def test_hh_shape(tmp_path):
    rows = [
        {
            "chosen": hh(
                ("Human", "Hi"),
                ("Assistant", "Hello."),
                ("Human", "Tell me a joke.\n"),
                ("Assistant", "Why did the chicken cross the road?"),
            ),
            "rejected": hh(
                ("Human", "Hi"), ("Assistant", "Hello."), ("Human", "Tell me a joke.\n"), ("Assistant", "No.")
            ),
        },
        {"chosen": "no markers at all", "rejected": hh(("Human", "a"), ("Assistant", "b"))},
        {
            "chosen": hh(("Human", "a"), ("Assistant", "b"), ("Human", "c")),
            "rejected": hh(("Human", "a"), ("Assistant", "d")),
        },
        {"chosen": hh(("Human", "a"), ("Assistant", "b")), "rejected": hh(("Human", "different"), ("Assistant", "d"))},
        {"chosen": hh(("Human", "a"), ("Assistant", "")), "rejected": hh(("Human", "a"), ("Assistant", "d"))},
        {"chosen": hh(("Human", "a"), ("Assistant", "same ")), "rejected": hh(("Human", "a"), ("Assistant", "same"))},
        {"chosen": hh(("Human", "  "), ("Assistant", "x")), "rejected": hh(("Human", " "), ("Assistant", "y"))},
        {"chosen": None, "rejected": hh(("Human", "a"), ("Assistant", "y"))},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl.gz", rows, gz=True)
    loaded, fmt = load_source(path)
    assert fmt == "hh"
    records, drops, examples, _ = normalise_rows(loaded, fmt)
    assert len(records) == 1
    assert records[0]["prompt"] == msgs(("user", "Hi"), ("assistant", "Hello."), ("user", "Tell me a joke."))
    assert records[0]["chosen"] == "Why did the chicken cross the road?"
    assert records[0]["rejected"] == "No."
    assert examples["unparseable_transcript"] == [1, 2]
    assert examples["prompt_mismatch"] == [3]
    assert examples["empty_response"] == [4]
    assert examples["identical_responses"] == [5]
    assert examples["empty_prompt"] == [6]
    assert examples["missing_field"] == [7]


def test_parse_hh_details():
    prompt, resp = parse_hh("Human: hi\n\nAssistant:  hello  \n")
    assert prompt == msgs(("user", "hi")) and resp == "hello"
    prompt, resp = parse_hh(
        hh(("Human", "q"), ("Assistant", "a"), ("Assistant", "b"), ("Human", "q2"), ("Assistant", "r"))
    )
    assert [m["role"] for m in prompt] == ["user", "assistant", "assistant", "user"] and resp == "r"


# --------------------------------------------------------------------------------------
# drop reasons
# --------------------------------------------------------------------------------------


def test_every_drop_reason_pairs(tmp_path):
    lines = [
        {"prompt": "ok", "chosen": "good", "rejected": "bad"},  # 0 kept
        {"prompt": None, "chosen": "a", "rejected": "b"},  # 1 missing_field
        {"prompt": "q", "rejected": "b"},  # 2 missing_field (absent)
        "{this is not json",  # 3 malformed_json (corrupt line)
        {"prompt": "q", "chosen": "   \n", "rejected": "b"},  # 4 empty_response
        {"prompt": "q", "chosen": "", "rejected": "b"},  # 5 empty_response
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # 6 identical_responses
        {"prompt": "q", "chosen": "text <|endoftext|> more", "rejected": "b"},  # 7 special_token_in_text
        {"prompt": "q <s>", "chosen": "a", "rejected": "b"},  # 8 special_token_in_text (prompt)
        {"prompt": "  ", "chosen": "a", "rejected": "b"},  # 9 empty_prompt
        {"prompt": [], "chosen": "a", "rejected": "b"},  # 10 empty_prompt
        {"prompt": "q", "chosen": msgs(("user", "x"), ("assistant", "a")), "rejected": "b"},  # 11 unparseable
        {"prompt": "q", "chosen": 5, "rejected": "b"},  # 12 missing_field (wrong type)
        {"prompt": "fine", "chosen": "A", "rejected": "B"},  # 13 kept
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    rows, fmt = load_source(path)
    assert fmt == "pairs" and len(rows) == 14
    records, drops, examples, _ = normalise_rows(rows, fmt, special_tokens=["<|endoftext|>", "<s>", ""])
    assert [r["pair_id"] for r in records] == [0, 13]
    assert dict(drops) == {
        "invalid_utf8": 0,
        "malformed_json": 1,
        "missing_field": 3,
        "unparseable_transcript": 1,
        "prompt_mismatch": 0,
        "lone_surrogate": 0,
        "empty_prompt": 2,
        "empty_response": 2,
        "identical_responses": 1,
        "special_token_in_text": 2,
        "duplicate_pair": 0,
    }
    assert examples["missing_field"] == [1, 2, 12]
    assert examples["malformed_json"] == [3]
    assert examples["special_token_in_text"] == [7, 8]
    assert examples["prompt_mismatch"] == []
    assert sum(drops.values()) + len(records) == len(rows)
    # Without special tokens those rows survive.
    records2, drops2, _, _ = normalise_rows(rows, fmt)
    assert drops2["special_token_in_text"] == 0 and len(records2) == 4


def test_examples_capped_at_five():
    rows = [{"prompt": "q", "chosen": "x", "rejected": "x"} for _ in range(9)] + [
        {"prompt": "q", "chosen": "x", "rejected": "y"}
    ]
    records, drops, examples, _ = normalise_rows(rows, "pairs")
    assert drops["identical_responses"] == 9 and examples["identical_responses"] == [0, 1, 2, 3, 4]
    assert set(drops) == set(DROP_REASONS) and set(examples) == set(DROP_REASONS)


def test_non_dict_rows_never_crash():
    rows = [
        None,
        3,
        "text",
        ["a"],
        {"prompt": {"x": 1}, "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": 7}], "chosen": "a", "rejected": "b"},
    ]
    for fmt in ("pairs", "messages", "hh"):
        records, drops, _, _ = normalise_rows(rows, fmt)
        assert records == [] and sum(drops.values()) == len(rows)


def test_special_token_filter_in_prompt_messages():
    rows = [
        {"prompt": msgs(("system", "<|im_start|>"), ("user", "q")), "chosen": "a", "rejected": "b"},
        {"prompt": msgs(("user", "q")), "chosen": "a", "rejected": "b [INST]"},
        {"prompt": msgs(("user", "q <im_start> not quite")), "chosen": "a", "rejected": "b"},
    ]
    records, drops, examples, _ = normalise_rows(rows, "pairs", special_tokens=("<|im_start|>", "[INST]"))
    assert [r["pair_id"] for r in records] == [2]
    assert examples["special_token_in_text"] == [0, 1]


# --------------------------------------------------------------------------------------
# detection and source errors
# --------------------------------------------------------------------------------------


def test_auto_detect_error_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(PrefkdError, match=r"columns found \(question, answer\)"):
        load_source(path)
    # chosen/rejected strings without a prompt column and without HH markers.
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(PrefkdError, match="chosen, rejected"):
        load_source(path)


def test_explicit_format_checks_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(PrefkdError, match="prompt"):
        load_source(path, fmt="pairs")
    with pytest.raises(PrefkdError, match="Unknown format"):
        load_source(path, fmt="nope")
    rows, fmt = load_source(path, fmt="hh")
    assert fmt == "hh"
    assert normalise_rows(rows, fmt)[1]["unparseable_transcript"] == 1


def test_local_file_errors(tmp_path):
    with pytest.raises(PrefkdError, match="does not exist"):
        load_source(tmp_path / "missing.jsonl")
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(PrefkdError, match="unsupported extension"):
        load_source(other)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PrefkdError, match="no rows"):
        load_source(empty)
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow at all")
    with pytest.raises(PrefkdError, match="Arrow IPC"):
        load_source(junk)


def test_max_pairs(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    assert len(load_source(path, max_pairs=4)[0]) == 4
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    loaded = load_source(tmp_path / "m.parquet", max_pairs=3)[0]
    assert [r["prompt"] for r in loaded] == ["q0", "q1", "q2"]
    with pytest.raises(PrefkdError):
        load_source(path, max_pairs=0)


def test_hf_id_unloadable_offline(tmp_path):
    code = (
        "from prefkd.data.prepare import load_source\n"
        "from prefkd.errors import PrefkdError\n"
        "try:\n"
        "    load_source('prefkd-tests/this-dataset-does-not-exist-0000', hf_split='train')\n"
        "except PrefkdError as e:\n"
        "    print('ERR:' + str(e))\n"
    )
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        PYTHONPATH=str(PROJECT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert msg.startswith("ERR:"), out.stdout + out.stderr
    assert "prefkd-tests/this-dataset-does-not-exist-0000" in msg
    assert "local" in msg and "--source" in msg
    assert msg.count("\n") == 0


# --------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------


def _records(n):
    # distinct prompts: the split keeps rows with one prompt together
    return [{"pair_id": i * 3 + 1, "prompt": msgs(("user", f"q{i}")), "chosen": "a", "rejected": "b"} for i in range(n)]


def test_split_determinism_disjoint_sizes():
    recs = _records(1000)
    a = split_records(recs, 0.05, 0.1, seed=1)
    b = split_records(recs, 0.05, 0.1, seed=1)
    c = split_records(recs, 0.05, 0.1, seed=2)
    assert a == b and a != c
    assert {k: len(v) for k, v in a.items()} == {"train": 850, "valid": 50, "test": 100}
    ids = {k: [r["pair_id"] for r in v] for k, v in a.items()}
    for k in ids:
        assert ids[k] == sorted(ids[k])
    sets = [set(v) for v in ids.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == {r["pair_id"] for r in recs}


@pytest.mark.parametrize(
    "n,valid,test,expected",
    [
        (1, 0.05, 0.1, (1, 0, 0)),
        (2, 0.05, 0.1, (1, 0, 1)),
        (3, 0.05, 0.1, (1, 1, 1)),
        (10, 0.05, 0.1, (8, 1, 1)),
        (15, 0.1, 0.1, (11, 2, 2)),  # 1.5 rounds half up to 2
        (25, 0.1, 0.1, (19, 3, 3)),  # 2.5 rounds half up to 3 (not banker's 2)
        (20, 0.0, 0.25, (15, 0, 5)),
        (20, 0.0, 0.0, (20, 0, 0)),
        (0, 0.1, 0.1, (0, 0, 0)),
    ],
)
def test_split_sizes(n, valid, test, expected):
    sizes = split_sizes(n, valid, test)
    assert (sizes["train"], sizes["valid"], sizes["test"]) == expected
    assert sum(sizes.values()) == n


@pytest.mark.parametrize("valid,test", [(-0.1, 0.1), (0.1, 1.0), (0.5, 0.5), (float("nan"), 0.1)])
def test_split_fraction_errors(valid, test):
    with pytest.raises(PrefkdError):
        split_sizes(10, valid, test)


# --------------------------------------------------------------------------------------
# run_prepare outputs
# --------------------------------------------------------------------------------------


def test_run_prepare_outputs_deterministic(tmp_path):
    src = write_demo_pairs(tmp_path / "demo.jsonl", 200, 5)
    r1 = run_prepare(src, tmp_path / "o1", valid_fraction=0.1, test_fraction=0.2, seed=3)
    r2 = run_prepare(src, tmp_path / "o2", valid_fraction=0.1, test_fraction=0.2, seed=3)
    assert r1 == {**r2, "source": r1["source"]}
    for name in ("train.parquet", "valid.parquet", "test.parquet"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "o1")) == [
        "filter_report.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]
    report = json.loads((tmp_path / "o1" / "filter_report.json").read_text())
    assert report == r1
    # the 200 demo pairs of seed 5 hold 5 exact duplicates (the demo draws from small pools)
    assert report["format"] == "pairs" and report["rows_in"] == 200 and report["kept"] == 195
    assert report["dropped"]["duplicate_pair"] == 5 and sum(report["dropped"].values()) == 5
    assert set(report["dropped"]) == set(DROP_REASONS) and set(report["examples"]) == set(DROP_REASONS)
    assert report["splits"] == {"train": 136, "valid": 20, "test": 39}
    assert report["example_lines"]["duplicate_pair"] == [i + 1 for i in report["examples"]["duplicate_pair"]]

    table = pq.read_table(tmp_path / "o1" / "train.parquet")
    schema = table.schema
    assert schema.field("pair_id").type == pa.int64()
    assert schema.field("prompt").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert schema.field("chosen").type == pa.string() and schema.field("rejected").type == pa.string()
    assert schema.field("chosen_planted").type == pa.list_(pa.list_(pa.int32()))
    assert schema.field("family").type == pa.string()
    # Pass-through planted ranges still index the stored responses exactly.
    source = generate_demo_pairs(200, 5)
    for row in table.to_pylist():
        src_row = source[row["pair_id"]]
        assert row["chosen"] == src_row["chosen"] and row["prompt"] == src_row["prompt"]
        assert row["chosen_planted"] == src_row["chosen_planted"]
        assert row["rejected_planted"] == src_row["rejected_planted"]
        assert row["family"] == src_row["family"]
    all_ids = sorted(
        i
        for n in ("train", "valid", "test")
        for i in pq.read_table(tmp_path / "o1" / f"{n}.parquet")["pair_id"].to_pylist()
    )
    first_copies = {}
    for i, pair in enumerate(source):
        first_copies.setdefault(json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]]), i)
    assert all_ids == sorted(first_copies.values())


def test_run_prepare_without_pass_through_and_empty_split(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PAIRS_ROWS)
    report = run_prepare(src, tmp_path / "out", valid_fraction=0.0, test_fraction=0.2)
    assert report["splits"] == {"train": 2, "valid": 0, "test": 1}
    valid = pq.read_table(tmp_path / "out" / "valid.parquet")
    assert valid.num_rows == 0
    assert valid.schema.names == ["pair_id", "prompt", "chosen", "rejected"]


def test_run_prepare_nothing_survives(tmp_path):
    src = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "q", "chosen": "x", "rejected": "x"}, {"prompt": "q", "chosen": "", "rejected": "x"}],
    )
    with pytest.raises(
        PrefkdError, match=r"identical_responses=1, empty_response=1|empty_response=1, identical_responses=1"
    ):
        run_prepare(src, tmp_path / "out")
    assert not (tmp_path / "out" / "filter_report.json").exists()


def test_cli_with_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|eos|>")
    fast.add_tokens([AddedToken("<|tool|>", special=True), AddedToken("plainword", special=False)])
    tok_dir = tmp_path / "tok"
    fast.save_pretrained(str(tok_dir))
    assert set(prepare.load_special_tokens([tok_dir])) == {"<unk>", "<|eos|>", "<|tool|>"}

    rows = [
        {"prompt": "q", "chosen": "fine", "rejected": "uses <|tool|> here"},
        {"prompt": "q <|eos|>", "chosen": "a", "rejected": "b"},
        {"prompt": "q plainword", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "c", "rejected": "d"},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    parser = argparse.ArgumentParser()
    add_options(parser, prepare.PrepareSettings)
    args = parser.parse_args(
        [
            "--source",
            str(src),
            "--out-dir",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tok_dir),
            "--valid-fraction",
            "0",
            "--test-fraction",
            "0",
            "--seed",
            "4",
        ]
    )
    assert prepare.run(from_args(prepare.PrepareSettings, args)) == 0
    report = json.loads((tmp_path / "out" / "filter_report.json").read_text())
    assert report["dropped"]["special_token_in_text"] == 2
    assert report["examples"]["special_token_in_text"] == [0, 1]
    assert report["splits"] == {"train": 2, "valid": 0, "test": 0}
    defaults = parser.parse_args(["--source", "s", "--out-dir", "o"])
    assert (defaults.format, defaults.valid_fraction, defaults.test_fraction, defaults.seed) == ("auto", 0.05, 0.1, 1)
    # list options default to None in argparse; from_args fills in the field default
    assert from_args(prepare.PrepareSettings, defaults).tokenizer == []
    assert defaults.max_pairs is None and defaults.hf_split == "train"
    # the rule's form: one --tokenizer flag, both tokenizer dirs
    assert parser.parse_args(["--source", "s", "--out-dir", "o", "--tokenizer", "a", "b"]).tokenizer == ["a", "b"]
    with pytest.raises(PrefkdError, match="does not exist"):
        prepare.load_special_tokens([tmp_path / "nope"])


# --------------------------------------------------------------------------------------
# the real Anthropic HH file
# --------------------------------------------------------------------------------------

HH_FIRST_PROMPT = [
    {"role": "user", "content": "what are some pranks with a pen i can do?"},
    {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
    {"role": "user", "content": "yep"},
    {
        "role": "assistant",
        "content": (
            "Ok, I’ll give you a couple examples, and then you can choose if you like any of them. "
            "You can’t actually do all of these, they’re mostly for fun.\n\n"
            "1. Draw a penis on a friend’s arm, the idea is that you can draw a really huge penis.\n\n"
            "2. Make a list of jokes on someone, and then you can make someone else read it to the person "
            "in front of the person, you’ll probably have to hide the list of jokes.\n\n"
            "3. Tell someone you’ll watch them masturbate but hide your eyes, and then while they are "
            "masturbating you will find a new place to watch."
        ),
    },
    {"role": "user", "content": "okay some of these do not have anything to do with pens"},
]
HH_FIRST_CHOSEN = (
    "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."
)
HH_FIRST_REJECTED = (
    "There are lots of funny things you can do with pens, here’s one example: use the pen as a zipper.  "
    "It’s where you write your finger in ink, and then you stick it on someone’s hand and unzip their zipper. "
    "It’s really funny."
)


@pytest.mark.skipif(not HH_FILE.exists(), reason="the shared Anthropic HH file is not available")
def test_real_hh_file(tmp_path):
    rows, fmt = load_source(HH_FILE)
    assert fmt == "hh" and len(rows) == 2312
    records, drops, examples, _ = normalise_rows(rows, fmt)
    assert records[0]["pair_id"] == 0
    assert records[0]["prompt"] == HH_FIRST_PROMPT
    assert records[0]["chosen"] == HH_FIRST_CHOSEN
    assert records[0]["rejected"] == HH_FIRST_REJECTED
    for rec in records:
        assert rec["prompt"] and rec["prompt"][-1]["role"] == "user"
        assert rec["prompt"][0]["role"] == "user"
        for m in rec["prompt"]:
            assert "\n\nHuman:" not in m["content"] and "\n\nAssistant:" not in m["content"]
            assert m["content"] == m["content"].strip()
        for resp in (rec["chosen"], rec["rejected"]):
            assert resp and resp == resp.strip()
            assert "\n\nHuman:" not in resp and "\n\nAssistant:" not in resp
    # Plausible drops: a handful of mismatched prompts and empty final turns, nothing else large.
    total = sum(drops.values())
    assert total + len(records) == 2312
    assert 0 < total < 0.02 * 2312
    assert drops["prompt_mismatch"] == 5 and drops["empty_response"] == 4
    assert drops["missing_field"] == 0 and drops["special_token_in_text"] == 0

    report = run_prepare(HH_FILE, tmp_path / "hh", special_tokens=("<|endoftext|>",))
    assert report["rows_in"] == 2312 and report["format"] == "hh"
    assert report["kept"] == len(records)
    assert report["dropped"] == dict(drops)
    assert report["examples"]["prompt_mismatch"] == examples["prompt_mismatch"]
    assert sum(report["splits"].values()) == report["kept"]
    saved = json.loads((tmp_path / "hh" / "filter_report.json").read_text())
    assert saved == report
    stored = [
        row
        for name in ("train", "valid", "test")
        for row in pq.read_table(tmp_path / "hh" / f"{name}.parquet").to_pylist()
        if row["pair_id"] == 0
    ]
    assert len(stored) == 1
    assert stored[0]["prompt"] == HH_FIRST_PROMPT and stored[0]["chosen"] == HH_FIRST_CHOSEN


def test_text_is_nfc_normalised_and_counted():
    rows = [
        {"prompt": "cafe\u0301?", "chosen": "A\u030a is \u212b", "rejected": "no"},
        {"prompt": "plain", "chosen": "yes", "rejected": "no"},
    ]
    records, drops, _, nfc_changed = normalise_rows(rows, "pairs")
    assert nfc_changed == 1
    assert records[0]["prompt"][0]["content"] == "caf\u00e9?"
    assert records[0]["chosen"] == "\u00c5 is \u00c5"
    assert sum(drops.values()) == 0


# --------------------------------------------------------------------------------------
# duplicates and the split by prompt
# --------------------------------------------------------------------------------------


def _prompt_key(prompt):
    return tuple((m["role"], m["content"]) for m in prompt)


def _split_rows(out: Path) -> dict[str, list[dict]]:
    return {name: pq.read_table(out / f"{name}.parquet").to_pylist() for name in ("train", "valid", "test")}


def _assert_prompts_disjoint(splits: dict[str, list[dict]]) -> None:
    keys = {name: {_prompt_key(r["prompt"]) for r in rows} for name, rows in splits.items()}
    assert not keys["train"] & keys["valid"]
    assert not keys["train"] & keys["test"]
    assert not keys["valid"] & keys["test"]
    ids = [r["pair_id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))


def test_exact_duplicates_dropped_and_never_cross_splits(tmp_path):
    base = [
        {"prompt": f"Question number {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(100)
    ]
    src = write_jsonl(tmp_path / "dup.jsonl", base * 3)  # every pair three times
    report = run_prepare(src, tmp_path / "out", valid_fraction=0.1, test_fraction=0.2)
    assert report["rows_in"] == 300 and report["kept"] == 100
    assert report["dropped"]["duplicate_pair"] == 200
    assert report["examples"]["duplicate_pair"] == [100, 101, 102, 103, 104]
    assert report["splits"] == {"train": 70, "valid": 10, "test": 20}
    splits = _split_rows(tmp_path / "out")
    _assert_prompts_disjoint(splits)
    # the first copy of each pair is the one kept
    assert sorted(r["pair_id"] for rows in splits.values() for r in rows) == list(range(100))
    assert sum(report["prompt_groups"].values()) == 100


def _near_duplicate_hh_rows():
    rows = []
    for i in range(40):
        turns = [("Human", f"How do I do task {i}?")]
        if i % 3 == 0:
            turns += [("Assistant", "Which task?"), ("Human", f"Task {i}, please.")]
        for j in range(1 + i % 5):  # the same prompt with up to five different response pairs
            # surrounding whitespace differs between copies but normalises away
            pad = " " * (j % 2)
            first = [(turns[0][0], turns[0][1] + pad)] + turns[1:]
            rows.append(
                {
                    "chosen": hh(*first, ("Assistant", f"Helpful answer {j} to task {i}.")),
                    "rejected": hh(*first, ("Assistant", f"Unhelpful answer {j}.")),
                }
            )
    return rows


def test_near_duplicate_hh_prompts_stay_in_one_split(tmp_path):
    rows = _near_duplicate_hh_rows()
    n_unique = len(rows)
    rows = rows + rows[:12]  # twelve exact duplicates on top
    src = write_jsonl(tmp_path / "hh.jsonl", rows)
    report = run_prepare(src, tmp_path / "out", valid_fraction=0.1, test_fraction=0.2, seed=1)
    assert report["format"] == "hh"
    assert report["dropped"]["duplicate_pair"] == 12 and report["kept"] == n_unique
    assert report["examples"]["duplicate_pair"] == list(range(n_unique, n_unique + 5))
    assert sum(report["prompt_groups"].values()) == 40
    splits = _split_rows(tmp_path / "out")
    _assert_prompts_disjoint(splits)
    assert {k: len(v) for k, v in splits.items()} == report["splits"]
    assert {k: len({_prompt_key(r["prompt"]) for r in v}) for k, v in splits.items()} == report["prompt_groups"]
    # sizes follow the fractions as closely as groups (at most five pairs) allow
    target = split_sizes(n_unique, 0.1, 0.2)
    for name in ("valid", "test"):
        assert abs(report["splits"][name] - target[name]) <= 2
    # same input, same bytes
    run_prepare(src, tmp_path / "again", valid_fraction=0.1, test_fraction=0.2, seed=1)
    for name in ("train.parquet", "valid.parquet", "test.parquet", "filter_report.json"):
        a, b = (tmp_path / "out" / name).read_bytes(), (tmp_path / "again" / name).read_bytes()
        assert a == b


def _group_records(sizes):
    out, pid = [], 0
    for g, size in enumerate(sizes):
        for j in range(size):
            out.append({"pair_id": pid, "prompt": msgs(("user", f"p{g}")), "chosen": f"a{j}", "rejected": "b"})
            pid += 1
    return out


def test_split_records_groups_by_prompt():
    sizes = [1 + (g * 7) % 6 for g in range(150)]
    recs = _group_records(sizes)
    a = split_records(recs, 0.05, 0.1, seed=1)
    assert a == split_records(recs, 0.05, 0.1, seed=1)
    assert a != split_records(recs, 0.05, 0.1, seed=2)
    _assert_prompts_disjoint(a)
    assert sum(len(v) for v in a.values()) == len(recs)
    target = split_sizes(len(recs), 0.05, 0.1)
    for name in ("valid", "test"):
        assert abs(len(a[name]) - target[name]) <= max(sizes) // 2
    for rows in a.values():
        assert [r["pair_id"] for r in rows] == sorted(r["pair_id"] for r in rows)


def test_split_records_unique_prompts_keep_the_old_permutation():
    import numpy as np

    recs = [{"pair_id": i * 2, "prompt": msgs(("user", f"q{i}")), "chosen": "a", "rejected": "b"} for i in range(97)]
    got = split_records(recs, 0.05, 0.1, seed=7)
    perm = np.random.default_rng(7).permutation(97).tolist()
    sizes = split_sizes(97, 0.05, 0.1)
    t, v = sizes["test"], sizes["valid"]
    want = {"test": perm[:t], "valid": perm[t : t + v], "train": perm[t + v :]}
    assert {k: [r["pair_id"] for r in rows] for k, rows in got.items()} == {
        k: sorted(recs[i]["pair_id"] for i in idx) for k, idx in want.items()
    }


def test_split_records_train_never_empty():
    # two groups that would both fit test and valid: train still gets one
    recs = _group_records([4, 3])
    got = split_records(recs, 0.43, 0.43, seed=1)
    assert got["train"]
    _assert_prompts_disjoint(got)
    one = split_records(_group_records([10]), 0.0, 0.9, seed=1)
    assert len(one["train"]) == 10 and not one["test"]


@pytest.mark.skipif(not HH_FILE.exists(), reason="the shared Anthropic HH file is not available")
def test_real_hh_file_split_by_prompt(tmp_path):
    rows = HH_FILE.read_bytes()
    tripled = tmp_path / "hh3.jsonl.gz"
    tripled.write_bytes(gzip.compress(gzip.decompress(rows) * 3))
    report = run_prepare(tripled, tmp_path / "out", valid_fraction=0.05, test_fraction=0.1)
    assert report["rows_in"] == 3 * 2312
    assert report["kept"] == 2303 and report["dropped"]["duplicate_pair"] == 2 * 2303
    splits = _split_rows(tmp_path / "out")
    _assert_prompts_disjoint(splits)
    where = {r["pair_id"]: name for name, rs in splits.items() for r in rs}
    # the two prompts of the file that carry two different response pairs each
    assert where[250] == where[1483] and where[1262] == where[1452]
    assert sum(report["prompt_groups"].values()) == 2301
    target = split_sizes(2303, 0.05, 0.1)
    for name in ("valid", "test"):
        assert abs(report["splits"][name] - target[name]) <= 1


# --------------------------------------------------------------------------------------
# bad bytes in JSON lines
# --------------------------------------------------------------------------------------

BAD_LINES = [
    b'{"prompt": "q1", "chosen": "good", "rejected": "bad"}',  # line 1, row 0: kept
    b'{"prompt": "caf\xe9 \xff", "chosen": "a", "rejected": "b"}',  # line 2, row 1: invalid_utf8 (latin-1 bytes)
    b'{"prompt": "q3 \xe6\x9d\xb1", "chosen": "fine", "rejected": "worse"}',  # line 3, row 2: kept (valid UTF-8)
    b"",  # line 4: blank, not a row
    b'{"prompt": "q5", "chosen": "x\\ud800y", "rejected": "b"}',  # line 5, row 3: lone_surrogate
    b'{"prompt": "q6", "chosen": "a", "rej',  # line 6, row 4: malformed_json (truncated)
    b'{"prompt": "q7 \\ud83d\\ude00", "chosen": "c", "rejected": "d"}',  # line 7, row 5: kept (a valid pair)
    b'{"prompt": "q8", "chosen": "c", "rejected": "d", "note": "\\udc00"}',  # line 8, row 6: kept (unused column)
    b'{"prompt": "q9", "chosen": "c", "rejected": "\xed\xa0\x80"}',  # line 9, row 7: invalid_utf8 (encoded surrogate)
    b'{"prompt": [{"role": "user", "content": "\\udfff"}], "chosen": "c", "rejected": "d"}',  # line 10, row 8
    b'{"prompt": "q11", "chosen": "e", "rejected": "f"}',  # line 11, row 9: kept
]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_bad_bytes_become_counted_drops_with_line_numbers(tmp_path, gz, newline):
    data = newline.join(BAD_LINES) + newline
    path = tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    report = run_prepare(path, tmp_path / "out", valid_fraction=0.0, test_fraction=0.0)
    assert report["rows_in"] == 10 and report["kept"] == 5
    dropped = {k: v for k, v in report["dropped"].items() if v}
    assert dropped == {"invalid_utf8": 2, "lone_surrogate": 2, "malformed_json": 1}
    assert report["examples"]["invalid_utf8"] == [1, 7]
    assert report["example_lines"]["invalid_utf8"] == [2, 9]
    assert report["examples"]["lone_surrogate"] == [3, 8]
    assert report["example_lines"]["lone_surrogate"] == [5, 10]
    assert report["examples"]["malformed_json"] == [4]
    assert report["example_lines"]["malformed_json"] == [6]
    saved = json.loads((tmp_path / "out" / "filter_report.json").read_text(encoding="utf-8"))
    assert saved == report
    train = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert [r["pair_id"] for r in train] == [0, 2, 5, 6, 9]
    assert train[1]["prompt"][0]["content"] == "q3 東"
    assert train[2]["prompt"][0]["content"] == "q7 😀"


def test_malformed_json_has_its_own_reason(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [PAIRS_ROWS[0], "{not json", "null", PAIRS_ROWS[1]])
    rows, fmt = load_source(path)
    records, drops, examples, _ = normalise_rows(rows, fmt)
    assert [r["pair_id"] for r in records] == [0, 3]
    assert drops["malformed_json"] == 1 and examples["malformed_json"] == [1]
    assert drops["missing_field"] == 1 and examples["missing_field"] == [2]  # valid JSON, not an object


def test_bad_bytes_in_json_files(tmp_path):
    # a .json file that is really JSON lines: dropped line by line
    lines = tmp_path / "lines.json"
    lines.write_bytes(b"\n".join(BAD_LINES[:3]) + b"\n")
    report = run_prepare(lines, tmp_path / "o1", valid_fraction=0.0, test_fraction=0.0)
    assert report["dropped"]["invalid_utf8"] == 1 and report["example_lines"]["invalid_utf8"] == [2]
    # a JSON document: a lone surrogate drops its row (no line numbers for a document)
    doc = tmp_path / "doc.json"
    doc.write_text(
        json.dumps([PAIRS_ROWS[0], {"prompt": "q", "chosen": "\ud800", "rejected": "b"}, PAIRS_ROWS[1]]),
        encoding="utf-8",
    )
    report = run_prepare(doc, tmp_path / "o2", valid_fraction=0.0, test_fraction=0.0)
    assert report["dropped"]["lone_surrogate"] == 1 and report["examples"]["lone_surrogate"] == [1]
    assert report["example_lines"] is None and report["kept"] == 2
    # a JSON document with a byte that is not UTF-8 cannot be read row by row: one clear error with the line
    broken = tmp_path / "broken.json"
    broken.write_bytes(
        b'[\n{"prompt": "q", "chosen": "a", "rejected": "b"},\n{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n]\n'
    )
    with pytest.raises(PrefkdError, match=r"line 3"):
        load_source(broken)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in PAIRS_ROWS * 50))[:-30])
    with pytest.raises(PrefkdError, match="cut.jsonl.gz"):
        load_source(path)


def test_lone_surrogate_escape_is_dropped_not_a_crash(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\n".join([BAD_LINES[0], BAD_LINES[4], BAD_LINES[10]]) + b"\n")
    report = run_prepare(path, tmp_path / "out", valid_fraction=0.0, test_fraction=0.0)
    assert report["kept"] == 2 and report["dropped"]["lone_surrogate"] == 1
    assert report["examples"]["lone_surrogate"] == [1] and report["example_lines"]["lone_surrogate"] == [2]


# --------------------------------------------------------------------------------------
# label noise
# --------------------------------------------------------------------------------------


def test_flip_labels_swaps_round_rate_times_n_deterministically():
    from prefkd.data.prepare import flip_labels

    recs = _records(50)
    for rate, expected in ((0.0, 0), (0.01, 1), (0.1, 5), (0.25, 13), (0.49, 25)):  # floor(rate * 50 + 0.5)
        out, flipped = flip_labels(recs, rate, seed=1)
        swapped = [r["pair_id"] for r in out if r["chosen"] == "b"]
        assert len(flipped) == expected and swapped == flipped  # exactly those, in record order
        assert [r["pair_id"] for r in out] == [r["pair_id"] for r in recs]
        assert all(r["rejected"] == "a" for r in out if r["pair_id"] in flipped)
    assert flip_labels(recs, 0.2, seed=1)[1] == flip_labels(recs, 0.2, seed=1)[1] != flip_labels(recs, 0.2, 2)[1]
    assert all(r["chosen"] == "a" for r in recs)  # the input is left alone
    planted = [dict(recs[0], chosen_planted=[[0, 1]], rejected_planted=[])]
    out, _ = flip_labels(planted, 0.4, seed=1)  # floor(0.4 + 0.5) = 0: nothing
    assert out[0]["chosen_planted"] == [[0, 1]]
    out, _ = flip_labels(planted * 2, 0.25, seed=1)  # floor(0.5 + 0.5) = 1 of 2
    assert sorted(map(str, (r["chosen_planted"] for r in out))) == ["[[0, 1]]", "[]"]
    for bad in (0.5, -0.1, "0.2"):
        with pytest.raises(PrefkdError, match="label_noise must be a share in"):
            flip_labels(recs, bad)


def test_label_noise_flips_only_train_and_is_counted(tmp_path):
    src = write_demo_pairs(tmp_path / "demo.jsonl", 200, 5)
    clean = run_prepare(src, tmp_path / "clean", valid_fraction=0.1, test_fraction=0.2, seed=3)
    noisy = run_prepare(src, tmp_path / "noisy", valid_fraction=0.1, test_fraction=0.2, seed=3, label_noise=0.2)
    n_train = clean["splits"]["train"]
    assert clean["label_noise"] == {"rate": 0.0, "flipped": 0, "examples": []}
    assert noisy["label_noise"]["flipped"] == int(0.2 * n_train + 0.5) and noisy["splits"] == clean["splits"]
    for name in ("valid", "test"):  # byte-identical: untouched
        assert (tmp_path / "clean" / f"{name}.parquet").read_bytes() == (
            tmp_path / "noisy" / f"{name}.parquet"
        ).read_bytes()
    a = pq.read_table(tmp_path / "clean" / "train.parquet").to_pylist()
    b = pq.read_table(tmp_path / "noisy" / "train.parquet").to_pylist()
    swapped = [x["pair_id"] for x, y in zip(a, b) if x["chosen"] == y["rejected"] and x["rejected"] == y["chosen"]]
    same = [x["pair_id"] for x, y in zip(a, b) if x == y]
    assert len(swapped) == noisy["label_noise"]["flipped"] and len(same) == n_train - len(swapped)
    assert swapped[:5] == noisy["label_noise"]["examples"]
    assert all(y["chosen_planted"] == x["rejected_planted"] for x, y in zip(a, b) if x["pair_id"] in swapped)
    with pytest.raises(PrefkdError, match="label_noise"):
        run_prepare(src, tmp_path / "bad", label_noise=0.5)
