"""Tests of the embedded synthetic preference data set (prefkd.data.demo)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from prefkd.core.settings import add_options, from_args
from prefkd.data import demo as demo_data
from prefkd.data.demo import FAMILIES, generate_demo_pairs, write_demo_pairs

N = 1200


@pytest.fixture(scope="module")
def pairs():
    return generate_demo_pairs(N, seed=1)


def _non_ascii(text: str) -> bool:
    return not text.isascii()


def test_deterministic(pairs):
    assert generate_demo_pairs(N, seed=1) == pairs
    assert generate_demo_pairs(N, seed=2) != pairs
    # A prefix of the same seed with another n is still a valid, deterministic data set.
    assert generate_demo_pairs(10, seed=1) == generate_demo_pairs(10, seed=1)


def test_file_bytes_identical(tmp_path):
    a = write_demo_pairs(tmp_path / "a.jsonl", 300, 7)
    b = write_demo_pairs(tmp_path / "sub" / "b.jsonl", 300, 7)
    assert a.read_bytes() == b.read_bytes()
    assert write_demo_pairs(tmp_path / "c.jsonl", 300, 8).read_bytes() != a.read_bytes()
    lines = a.read_bytes().decode("utf-8").splitlines()
    assert len(lines) == 300
    first = json.loads(lines[0])
    assert list(first) == sorted(first)
    assert json.loads(lines[5]) == generate_demo_pairs(300, 7)[5]
    # ensure_ascii=False: non-ASCII is written as UTF-8, not \u escapes.
    assert "\\u" not in a.read_text(encoding="utf-8")
    assert any(not line.isascii() for line in lines)
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "c.jsonl", "sub"]


def test_schema(pairs):
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "chosen_planted", "rejected_planted", "family"}
        assert isinstance(p["chosen"], str) and isinstance(p["rejected"], str)
        assert p["prompt"] and all(set(m) == {"role", "content"} for m in p["prompt"])
        assert p["prompt"][-1]["role"] == "user"
        roles = [m["role"] for m in p["prompt"]]
        assert set(roles) <= {"system", "user", "assistant"}
        assert "system" not in roles[1:]
        assert p["family"] in FAMILIES


def test_planted_ranges_exact(pairs):
    for p in pairs:
        c, r = p["chosen"].encode("utf-8"), p["rejected"].encode("utf-8")
        assert p["chosen"] != p["rejected"]
        assert len(p["chosen_planted"]) == len(p["rejected_planted"]) == 1
        (cs, ce), (rs, re_) = p["chosen_planted"][0], p["rejected_planted"][0]
        assert 0 <= cs < ce <= len(c) and 0 <= rs < re_ <= len(r)
        assert cs == rs  # same shared prefix A
        x, y = c[cs:ce], r[rs:re_]
        assert x != y
        # chosen = A + X + B and rejected = A + Y + B, byte for byte.
        a, b = c[:cs], c[ce:]
        assert c == a + x + b
        assert r == a + y + b
        # The range boundaries fall on character boundaries and the slot is a clause.
        x.decode("utf-8"), y.decode("utf-8"), a.decode("utf-8"), b.decode("utf-8")
        assert x.strip() == x and y.strip() == y


def test_families_even(pairs):
    counts = Counter(p["family"] for p in pairs)
    assert len(FAMILIES) >= 5
    assert set(counts) == set(FAMILIES)
    assert max(counts.values()) - min(counts.values()) <= 1
    # Shuffled: the first rows are not all one family.
    assert len({p["family"] for p in pairs[:12]}) >= 3


def test_non_ascii_share(pairs):
    fancy = [p for p in pairs if _non_ascii(json.dumps(p, ensure_ascii=False))]
    share = len(fancy) / len(pairs)
    assert 0.14 <= share <= 0.26, share
    # Rows with non-ASCII carry it in both the prompt and the responses.
    for p in fancy:
        assert _non_ascii("".join(m["content"] for m in p["prompt"]))
        assert _non_ascii(p["chosen"]) and _non_ascii(p["rejected"])
    text = "".join(p["chosen"] + p["rejected"] + json.dumps(p["prompt"], ensure_ascii=False) for p in pairs)
    assert "\u200d" in text  # a ZWJ emoji sequence
    assert any(ord(ch) > 0x4E00 and ord(ch) < 0x9FFF for ch in text)  # CJK
    assert "é" in text or "ë" in text or "ü" in text
    # Sometimes inside the planted range.
    inside = 0
    for p in pairs:
        ((s, e),) = p["chosen_planted"]
        ((rs, re_),) = p["rejected_planted"]
        if _non_ascii(p["chosen"].encode()[s:e].decode()) or _non_ascii(p["rejected"].encode()[rs:re_].decode()):
            inside += 1
    assert inside >= 0.02 * len(pairs)


def test_prompt_shapes(pairs):
    shapes = Counter()
    for p in pairs:
        if p["prompt"][0]["role"] == "system":
            shapes["system"] += 1
        elif len(p["prompt"]) > 1:
            shapes["multi"] += 1
            assert [m["role"] for m in p["prompt"]][:2] == ["user", "assistant"]
        else:
            shapes["single"] += 1
    assert 0.55 <= shapes["single"] / N <= 0.75
    assert 0.17 <= shapes["multi"] / N <= 0.33
    assert 0.05 <= shapes["system"] / N <= 0.15


def test_response_length(pairs):
    for p in pairs:
        for key in ("chosen", "rejected"):
            assert 15 <= len(p[key].split()) <= 60, p[key]


def test_learnable_cues(pairs):
    # Politeness uses fixed polite / rude sets; the rejected slot is always from the rude set.
    rude_starts = {s.split()[0] for s in demo_data.RUDE + demo_data.RUDE_FANCY}
    for p in pairs:
        if p["family"] == "politeness":
            ((s, e),) = p["rejected_planted"]
            assert p["rejected"].encode()[s:e].decode().split()[0] in rude_starts
        if p["family"] == "arithmetic":
            ((s, e),) = p["chosen_planted"]
            clause = p["chosen"].encode()[s:e].decode()
            lhs, rhs = clause.split(" = ")
            a, op, b = lhs.split()
            expected = int(a) + int(b) if op == "+" else int(a) * int(b)
            assert rhs.startswith(f"{expected},")


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_options(parser, demo_data.DemoDataSettings)
    out = tmp_path / "demo.jsonl"
    args = parser.parse_args(["--out", str(out), "--pairs", "25", "--seed", "3"])
    assert demo_data.run(from_args(demo_data.DemoDataSettings, args)) == 0
    assert out.read_bytes() == write_demo_pairs(tmp_path / "ref.jsonl", 25, 3).read_bytes()
    assert parser.parse_args(["--out", "x"]).pairs == 3000


def test_zero_pairs_and_negative(tmp_path):
    assert generate_demo_pairs(0) == []
    assert write_demo_pairs(tmp_path / "e.jsonl", 0, 1).read_bytes() == b""
    from prefkd.errors import PrefkdError

    with pytest.raises(PrefkdError):
        generate_demo_pairs(-1)


def test_demo_text_is_nfc_so_planted_ranges_survive_prepare():
    import unicodedata

    for pair in generate_demo_pairs(600, seed=1):
        texts = [pair["chosen"], pair["rejected"]] + [m["content"] for m in pair["prompt"]]
        assert all(unicodedata.normalize("NFC", t) == t for t in texts)
