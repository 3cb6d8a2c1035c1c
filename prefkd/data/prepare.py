"""The prepare stage: load a preference data set, normalise it, filter it, split it.

Sources
    A local ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.json.gz`` / ``.parquet`` /
    ``.arrow`` (Arrow IPC file or stream format) / ``.feather`` file, or a Hugging Face
    data set id loaded with ``datasets.load_dataset(id, name=hf_config, split=hf_split)``
    (the token, if any, comes from the environment, e.g. ``HF_TOKEN``).  A local
    directory is also handed to ``datasets.load_dataset``.

Input shapes (``fmt``)
    ``pairs``     ``prompt`` / ``chosen`` / ``rejected``.  ``prompt`` is a string (one
                  user turn) or a message list; ``chosen`` / ``rejected`` are strings
                  or a one-message assistant list (TRL conversational style).
    ``messages``  ``chosen`` / ``rejected`` are full chat message lists; the prompt is
                  every message before the last, the response the last message (which
                  must be an assistant turn).  A ``prompt`` column is ignored.
    ``hh``        Anthropic-HH transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.
    ``auto``      detected from the columns and value types of the first rows.

Normalised record
    ``pair_id`` (the row's index in the source, before filtering), ``prompt`` (list
    of ``{"role", "content"}``), ``chosen``, ``rejected``; ``chosen_planted``,
    ``rejected_planted`` and ``family`` are passed through when the source has them.
    ``pairs`` and ``messages`` responses are kept byte for byte (so planted byte
    ranges stay valid); ``hh`` turn contents are stripped of surrounding whitespace.

Drop reasons (each row gets the FIRST that applies, in this order)
    ``invalid_utf8``           a JSON line holds a byte sequence that is not UTF-8;
    ``malformed_json``         a JSON line does not parse (e.g. it is truncated);
    ``missing_field``          a prompt or response is absent, None, of the wrong
                               type, or the row is not an object;
    ``unparseable_transcript`` an HH transcript that does not parse, a message list
                               with malformed messages, or a conversation whose last
                               turn is not an assistant turn after a user turn;
    ``prompt_mismatch``        chosen and rejected carry different prompts;
    ``lone_surrogate``         a prompt message, a response or ``family`` holds a
                               lone UTF-16 surrogate (e.g. the JSON escape
                               ``"\\ud800"``), which no UTF-8 file can store;
    ``empty_prompt``           the prompt has no non-whitespace content;
    ``empty_response``         a response is empty or whitespace only;
    ``identical_responses``    the responses are equal (ignoring surrounding
                               whitespace);
    ``special_token_in_text``  a literal special-token string occurs in a prompt
                               message or a response;
    ``duplicate_pair``         an earlier kept row has the same normalised prompt,
                               chosen and rejected (the first copy is kept).

    ``filter_report.json`` counts every reason under ``dropped`` and lists up to five
    source row indices (the ``pair_id`` numbering) per reason under ``examples``;
    for a JSON lines source ``example_lines`` gives their 1-based line numbers in
    the (decompressed) file (``null`` for other sources).

Split (by prompt)
    Records with the same normalised prompt (all prompt messages, roles and
    contents) form a group, and a group never straddles two splits.  Target sizes:
    ``n_test = floor(n * test_fraction + 0.5)`` (round half up), the same for valid;
    a split whose fraction is > 0 gets at least one row, train keeps at least one
    row, and when rows are short valid gives way first, then test.  The groups (in
    order of first appearance) are permuted with ``numpy.random.default_rng(seed)``
    and dealt in that order: a group goes to test if that brings test no farther
    from its target, else to valid on the same rule, else to train; should train
    end up empty, the last group dealt to valid (else test) moves to train.  With
    all prompts distinct this is exactly the first ``n_test`` permuted rows to test,
    the next ``n_valid`` to valid, the rest to train.  Each split is sorted by
    ``pair_id``; ``filter_report.json`` counts the groups per split under
    ``prompt_groups``.

Label noise (robustness studies)
    With ``label_noise`` r in [0, 0.5), ``floor(r * n_train + 0.5)`` pairs of the train
    split (after the split: valid and test stay clean) get chosen and rejected swapped,
    drawn with the seed (``flip_labels``); ``filter_report.json`` records
    ``label_noise: {rate, flipped, examples}`` (examples: the first flipped ``pair_id``s).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import sys
import tempfile
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from prefkd.core.settings import setting
from prefkd.errors import PrefkdError
from prefkd.io.files import write_json

FORMATS = ("auto", "pairs", "messages", "hh")
DROP_REASONS = (
    "invalid_utf8",
    "malformed_json",
    "missing_field",
    "unparseable_transcript",
    "prompt_mismatch",
    "lone_surrogate",
    "empty_prompt",
    "empty_response",
    "identical_responses",
    "special_token_in_text",
    "duplicate_pair",
)
PASS_THROUGH = ("chosen_planted", "rejected_planted", "family")
MAX_EXAMPLES = 5
SPLITS = ("train", "valid", "test")
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".arrow", ".feather")
# How many leading rows auto-detection looks at.
DETECT_ROWS = 200
NOISE_STREAM = 0x6E6F6973  # second seed word of the label-noise draw (independent of the split's permutation)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


class SourceRows(list):
    """The raw rows of a source; ``lines`` holds each row's 1-based line number when
    the source is a JSON lines file, else ``None``."""

    def __init__(self, rows: Iterable = (), lines: list[int] | None = None):
        super().__init__(rows)
        self.lines = lines


class _Unreadable:
    """Stands in for a JSON line that could not be read; dropped with ``reason``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _read_error(path: Path, exc: BaseException) -> PrefkdError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return PrefkdError(f"Could not read {path} ({reason}); check that the file is complete and not corrupt.")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise _read_error(path, exc) from exc


def _physical_lines(path: Path):
    """Yield ``(line number, bytes)``; lines end at \\n, \\r\\n or \\r, as in text mode."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as fh:
            for raw in fh:
                body = raw
                if body.endswith(b"\n"):
                    body = body[:-2] if body.endswith(b"\r\n") else body[:-1]
                for piece in body.split(b"\r"):
                    number += 1
                    yield number, piece
    except (OSError, EOFError, zlib.error) as exc:
        raise _read_error(path, exc) from exc


_BLANK = object()


def _parse_line(raw: bytes):
    """The JSON value of one line, ``_BLANK`` for a blank line, or an :class:`_Unreadable`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _Unreadable("invalid_utf8")
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _Unreadable("malformed_json")


def _read_jsonl(path: Path, max_pairs: int | None) -> SourceRows:
    """One row per non-blank line; a line that is not UTF-8 or not JSON becomes an
    :class:`_Unreadable` row (a counted drop, never silently skipped)."""
    rows: list = []
    lines: list[int] = []
    for number, raw in _physical_lines(path):
        if max_pairs is not None and len(rows) >= max_pairs:
            break
        row = _parse_line(raw)
        if row is _BLANK:
            continue
        rows.append(row)
        lines.append(number)
    return SourceRows(rows, lines)


def _read_json(path: Path, max_pairs: int | None) -> list:
    blob = _read_bytes(path)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        text, bad_line = None, blob.count(b"\n", 0, exc.start) + 1
    try:
        data = json.loads(text if text is not None else blob.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        # Many ".json" files are really JSON lines.
        return _read_jsonl(path, max_pairs)
    if text is None:
        raise PrefkdError(
            f"The JSON file {path} has a byte that is not UTF-8 on line {bad_line}; "
            "fix it, or write the data as JSON lines (.jsonl), where such a row is dropped and counted."
        )
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and len(data) <= 2 and all(isinstance(x, dict) for x in lists[0][:10]):
            data = lists[0]  # {"data": [...]} style
        elif data and all(isinstance(v, list) for v in data.values()) and len({len(v) for v in data.values()}) == 1:
            keys = list(data)
            data = [dict(zip(keys, vals)) for vals in zip(*data.values())]  # columnar
        else:
            data = [data]
    if not isinstance(data, list):
        raise PrefkdError(
            f"The JSON file {path} must hold a list of objects (or be JSON lines), not a {type(data).__name__}."
        )
    return data[:max_pairs] if max_pairs is not None else data


def _read_arrow(path: Path):
    import pyarrow as pa
    import pyarrow.feather  # noqa: F401  (registers pa.feather)

    errors = []
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            with pa.memory_map(str(path), "r") as source:
                return opener(source).read_all()
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            errors.append(str(exc))
    raise PrefkdError(
        f"The file {path} is neither an Arrow IPC file nor an Arrow IPC stream ({errors[-1]}); "
        "write it with pyarrow.ipc or use .parquet or .jsonl instead."
    )


def _table_rows(table, max_pairs: int | None) -> list[dict]:
    if max_pairs is not None:
        table = table.slice(0, max_pairs)
    return table.to_pylist()


def _load_hf(source: str, hf_split: str, hf_config: str | None, max_pairs: int | None) -> list:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise PrefkdError(
            "The 'datasets' package is needed to load Hugging Face data sets; install it or pass a local file."
        ) from exc
    try:
        ds = datasets.load_dataset(source, name=hf_config, split=hf_split)
    except Exception as exc:  # noqa: BLE001 - any failure here is the user's to fix
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        config = f", config '{hf_config}'" if hf_config else ""
        raise PrefkdError(
            f"Could not load the Hugging Face dataset '{source}' (split '{hf_split}'{config}: {reason}); "
            "check the id, split, network access and HF_TOKEN, or pass a local .jsonl/.parquet/.arrow file as --source."
        ) from exc
    if max_pairs is not None:
        ds = ds.select(range(min(max_pairs, len(ds))))
    return ds.to_list()


def _load_rows(source, hf_split: str, hf_config: str | None, max_pairs: int | None) -> list:
    text = str(source)
    path = Path(text).expanduser()
    lower = path.name.lower()
    looks_local = lower.endswith(LOCAL_SUFFIXES) or text.startswith((".", "/", "~"))
    if path.is_file():
        if lower.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path, max_pairs)
        if lower.endswith((".json", ".json.gz")):
            return _read_json(path, max_pairs)
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as exc:  # noqa: BLE001
                raise PrefkdError(
                    f"Could not read the Parquet file {path} ({exc}); check that it is a valid Parquet file."
                ) from exc
            return _table_rows(table, max_pairs)
        if lower.endswith((".arrow", ".feather")):
            return _table_rows(_read_arrow(path), max_pairs)
        raise PrefkdError(
            f"The source file {path} has an unsupported extension; use one of {', '.join(LOCAL_SUFFIXES)}."
        )
    if path.is_dir():
        return _load_hf(str(path), hf_split, hf_config, max_pairs)
    if looks_local:
        raise PrefkdError(f"The source file {path} does not exist; check the --source path.")
    return _load_hf(text, hf_split, hf_config, max_pairs)


# --------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------

_HH_MARKER = re.compile(r"(?:^|\n)\s*(?:Human|Assistant):")


def _columns(rows: Sequence) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows[:DETECT_ROWS]:
        if isinstance(row, dict):
            for key in row:
                cols.setdefault(str(key), None)
    return list(cols)


def _first_value(rows: Sequence, key: str):
    for row in rows[:DETECT_ROWS]:
        if isinstance(row, dict) and row.get(key) is not None:
            return row[key]
    return None


def _is_message_list(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def detect_format(rows: Sequence) -> str:
    """Guess ``pairs`` / ``messages`` / ``hh`` from columns and value types."""
    cols = _columns(rows)
    found = ", ".join(cols) if cols else "none"
    if "chosen" in cols and "rejected" in cols:
        chosen = _first_value(rows, "chosen")
        has_prompt = "prompt" in cols and _first_value(rows, "prompt") is not None
        if _is_message_list(chosen):
            if has_prompt and all(m.get("role") == "assistant" for m in chosen):
                return "pairs"  # TRL conversational: prompt list + assistant-only responses
            return "messages"
        if isinstance(chosen, str):
            if has_prompt:
                return "pairs"
            if _HH_MARKER.search(chosen):
                return "hh"
    raise PrefkdError(
        f"Could not detect the data format from the columns found ({found}); "
        "pass --format pairs (prompt/chosen/rejected), messages (chosen/rejected chat lists) or hh (Human/Assistant transcripts)."
    )


_REQUIRED = {
    "pairs": ("prompt", "chosen", "rejected"),
    "messages": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}


def load_source(
    source, fmt: str = "auto", hf_split: str = "train", hf_config: str | None = None, max_pairs: int | None = None
) -> tuple[list, str]:
    """Load the raw rows of ``source`` and return ``(rows, detected_format)``."""
    if fmt not in FORMATS:
        raise PrefkdError(f"Unknown format '{fmt}'; use one of {', '.join(FORMATS)}.")
    if max_pairs is not None and max_pairs < 1:
        raise PrefkdError(f"--max-pairs must be at least 1, not {max_pairs}.")
    rows = _load_rows(source, hf_split, hf_config, max_pairs)
    if not rows:
        raise PrefkdError(f"The source {source} has no rows; check the file or the split name.")
    if fmt == "auto":
        fmt = detect_format(rows)
    else:
        cols = _columns(rows)
        missing = [c for c in _REQUIRED[fmt] if c not in cols]
        if missing:
            raise PrefkdError(
                f"Format '{fmt}' needs the column(s) {', '.join(missing)} but the source has "
                f"({', '.join(cols) or 'none'}); pick another --format or fix the source."
            )
    return rows, fmt


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------


class _Drop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _messages(value, *, missing: str = "unparseable_transcript") -> list[dict]:
    """Validate a message list, keeping only role/content."""
    if not isinstance(value, list):
        raise _Drop("missing_field")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Drop(missing)
        content = m.get("content")
        if content is None:
            raise _Drop("missing_field")
        if not isinstance(content, str):
            raise _Drop(missing)
        out.append({"role": m["role"], "content": content})
    return out


def _pairs_prompt(value) -> list[dict]:
    if value is None:
        raise _Drop("missing_field")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value)


def _pairs_response(value) -> str:
    if value is None:
        raise _Drop("missing_field")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = _messages(value)
        if len(msgs) == 1 and msgs[0]["role"] == "assistant":
            return msgs[0]["content"]
        raise _Drop("unparseable_transcript")
    raise _Drop("missing_field")


def _split_conversation(value) -> tuple[list[dict], str]:
    if value is None:
        raise _Drop("missing_field")
    msgs = _messages(value)
    if not msgs:
        raise _Drop("missing_field")
    if msgs[-1]["role"] != "assistant":
        raise _Drop("unparseable_transcript")
    return msgs[:-1], msgs[-1]["content"]


_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh(text) -> tuple[list[dict], str]:
    """Split an HH transcript into (prompt messages, final assistant response)."""
    if text is None:
        raise _Drop("missing_field")
    if not isinstance(text, str):
        raise _Drop("unparseable_transcript")
    body = text
    if body.startswith(("Human:", "Assistant:")):
        body = "\n\n" + body  # tolerate a transcript without the leading blank line
    parts = _HH_SPLIT.split(body)
    if parts[0].strip() or len(parts) < 3:
        raise _Drop("unparseable_transcript")
    turns = [{"role": _HH_ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] != "assistant":
        raise _Drop("unparseable_transcript")
    return turns[:-1], turns[-1]["content"]


def _compile_special(special_tokens: Iterable[str]):
    tokens = sorted({t for t in special_tokens if isinstance(t, str) and t}, key=lambda t: (-len(t), t))
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in tokens))


def _planted(value):
    if value is None:
        return None
    try:
        return [[int(a), int(b)] for a, b in value]
    except (TypeError, ValueError):
        return None


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _has_lone_surrogate(prompt: list[dict], *texts) -> bool:
    """Whether any text holds a lone surrogate (json.loads makes one from ``"\\ud800"``)."""
    strings = [m["role"] for m in prompt] + [m["content"] for m in prompt] + [t for t in texts if isinstance(t, str)]
    return any(_SURROGATE.search(text) for text in strings)


def prompt_key(prompt: Sequence[dict]) -> tuple:
    """A hashable key of a normalised prompt: its messages' (role, content) pairs."""
    return tuple((m["role"], m["content"]) for m in prompt)


def _texts(row: dict, fmt: str) -> tuple[list[dict], str, str]:
    """The prompt messages and the two responses of a row in shape ``fmt``."""
    if fmt == "pairs":
        prompt = _pairs_prompt(row.get("prompt"))
        chosen = _pairs_response(row.get("chosen"))
        rejected = _pairs_response(row.get("rejected"))
    elif fmt == "messages":
        prompt, chosen = _split_conversation(row.get("chosen"))
        prompt_r, rejected = _split_conversation(row.get("rejected"))
        if prompt != prompt_r:
            raise _Drop("prompt_mismatch")
    elif fmt == "hh":
        prompt, chosen = parse_hh(row.get("chosen"))
        prompt_r, rejected = parse_hh(row.get("rejected"))
        if prompt != prompt_r:
            raise _Drop("prompt_mismatch")
    else:
        raise PrefkdError(f"Unknown format '{fmt}'; use one of pairs, messages, hh.")
    return prompt, chosen, rejected


def _normalise_one(row, fmt: str, special) -> dict:
    if isinstance(row, _Unreadable):
        raise _Drop(row.reason)
    if not isinstance(row, dict):
        raise _Drop("missing_field")
    prompt, chosen, rejected = _texts(row, fmt)
    if _has_lone_surrogate(prompt, chosen, rejected, row.get("family")):
        raise _Drop("lone_surrogate")
    prompt, chosen, rejected, changed = _nfc(prompt, chosen, rejected)
    if fmt != "pairs" and prompt and prompt[-1]["role"] != "user":
        # A conversation whose final assistant turn does not answer a user turn.
        raise _Drop("unparseable_transcript")
    if not any(m["content"].strip() for m in prompt):
        raise _Drop("empty_prompt")
    if not chosen.strip() or not rejected.strip():
        raise _Drop("empty_response")
    if chosen.strip() == rejected.strip():
        raise _Drop("identical_responses")
    if special is not None and (
        special.search(chosen) or special.search(rejected) or any(special.search(m["content"]) for m in prompt)
    ):
        raise _Drop("special_token_in_text")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "_nfc_changed": changed}


def _nfc(prompt, chosen, rejected):
    """Unicode NFC of every text (tokenizers such as Qwen's normalise to NFC; aligning
    in bytes needs the text both tokenizers actually see). Returns the texts and
    whether anything changed."""

    def norm(text):
        return unicodedata.normalize("NFC", text) if isinstance(text, str) else text

    new_prompt = [{**m, "content": norm(m["content"])} for m in prompt]
    new_chosen, new_rejected = norm(chosen), norm(rejected)
    changed = new_chosen != chosen or new_rejected != rejected or new_prompt != prompt
    return new_prompt, new_chosen, new_rejected, changed


def normalise_rows(
    rows: Sequence, fmt: str, special_tokens: Iterable[str] = ()
) -> tuple[list[dict], Counter, dict, int]:
    """Normalise and filter ``rows``; return ``(records, drop_counts, examples, nfc_changed)``.

    Exact duplicates (same normalised prompt, chosen and rejected) after the first
    kept copy are dropped as ``duplicate_pair``.
    ``nfc_changed`` counts kept rows whose text changed under Unicode NFC (not a drop).
    ``drop_counts`` has every reason in :data:`DROP_REASONS` (zeros included);
    ``examples`` maps every reason to up to five source row indices.
    """
    if fmt not in _REQUIRED:
        raise PrefkdError(f"Unknown format '{fmt}'; use one of pairs, messages, hh.")
    special = _compile_special(special_tokens)
    present = [k for k in PASS_THROUGH if k in _columns(rows)]
    drops: Counter = Counter({reason: 0 for reason in DROP_REASONS})
    examples: dict[str, list[int]] = {reason: [] for reason in DROP_REASONS}
    records: list[dict] = []
    seen: set[tuple] = set()
    nfc_changed = 0
    for index, row in enumerate(rows):
        try:
            rec = _normalise_one(row, fmt, special)
            key = (prompt_key(rec["prompt"]), rec["chosen"], rec["rejected"])
            if key in seen:
                raise _Drop("duplicate_pair")
        except _Drop as drop:
            drops[drop.reason] += 1
            if len(examples[drop.reason]) < MAX_EXAMPLES:
                examples[drop.reason].append(index)
            continue
        seen.add(key)
        if rec.pop("_nfc_changed"):
            nfc_changed += 1
        out = {"pair_id": index, **rec}
        for key in present:
            value = row.get(key)
            if key == "family":
                out[key] = value if isinstance(value, str) else None
            else:
                out[key] = _planted(value)
        records.append(out)
    return records, drops, examples, nfc_changed


# --------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------


def split_sizes(n: int, valid_fraction: float, test_fraction: float) -> dict[str, int]:
    """Sizes of train/valid/test for ``n`` rows (see the module docstring for rounding)."""
    for name, frac in (("valid", valid_fraction), ("test", test_fraction)):
        if not (0.0 <= frac < 1.0) or math.isnan(frac):
            raise PrefkdError(f"The {name} fraction must be in [0, 1), not {frac}.")
    if valid_fraction + test_fraction >= 1.0:
        raise PrefkdError(
            f"The valid and test fractions add up to {valid_fraction + test_fraction}, which leaves no training rows; lower them."
        )
    n_test = math.floor(n * test_fraction + 0.5)
    n_valid = math.floor(n * valid_fraction + 0.5)
    if test_fraction > 0:
        n_test = max(n_test, 1)
    if valid_fraction > 0:
        n_valid = max(n_valid, 1)
    # Keep at least one training row: valid gives way first, then test.
    while n_test + n_valid > max(n - 1, 0):
        if n_valid > 0:
            n_valid -= 1
        else:
            n_test -= 1
    return {"train": n - n_valid - n_test, "valid": n_valid, "test": n_test}


def _deal_groups(group_sizes: Sequence[int], targets: dict[str, int]) -> list[str]:
    """The split of each group, dealt in order (see the module docstring)."""
    counts = dict.fromkeys(SPLITS, 0)
    names = []
    for size in group_sizes:
        name = "train"
        for candidate in ("test", "valid"):
            gap = targets[candidate] - counts[candidate]
            if gap > 0 and abs(gap - size) <= gap:
                name = candidate
                break
        names.append(name)
        counts[name] += size
    if names and not counts["train"]:
        # Train keeps at least one group: valid gives way first, then test.
        donor = "valid" if counts["valid"] else "test"
        names[len(names) - 1 - names[::-1].index(donor)] = "train"
    return names


def split_records(
    records: Sequence[dict], valid_fraction: float, test_fraction: float, seed: int = 1
) -> dict[str, list]:
    """Deterministic train/valid/test split by prompt; each split sorted by ``pair_id``.

    Records with the same prompt land in the same split (see the module docstring).
    """
    import numpy as np

    targets = split_sizes(len(records), valid_fraction, test_fraction)
    groups: dict[tuple, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(prompt_key(rec["prompt"]), []).append(i)
    members = list(groups.values())  # in order of first appearance
    order = np.random.default_rng(seed).permutation(len(members)).tolist()
    names = _deal_groups([len(members[g]) for g in order], targets)
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for g, name in zip(order, names):
        parts[name].extend(members[g])
    return {name: sorted((records[i] for i in parts[name]), key=lambda r: r["pair_id"]) for name in SPLITS}


def flip_labels(records: Sequence[dict], rate: float, seed: int = 1) -> tuple[list[dict], list[int]]:
    """Label noise: ``floor(rate * n + 0.5)`` of the ``n`` records (round half up), drawn with
    ``numpy.random.default_rng([seed, NOISE_STREAM])``, get chosen and rejected (and their planted ranges)
    swapped. -> (the records in their order, the sorted ``pair_id``s of the flipped ones)."""
    import numpy as np

    if not (isinstance(rate, (int, float)) and 0.0 <= rate < 0.5):
        raise PrefkdError(f"data.label_noise must be a share in [0, 0.5), got {rate!r}.")
    n_flip = math.floor(rate * len(records) + 0.5)
    chosen = set(np.random.default_rng([seed, NOISE_STREAM]).permutation(len(records))[:n_flip].tolist())
    out = []
    for i, rec in enumerate(records):
        if i in chosen:
            rec = dict(rec, chosen=rec["rejected"], rejected=rec["chosen"])
            if "chosen_planted" in rec or "rejected_planted" in rec:
                rec["chosen_planted"], rec["rejected_planted"] = rec.get("rejected_planted"), rec.get("chosen_planted")
        out.append(rec)
    return out, sorted(records[i]["pair_id"] for i in chosen)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def arrow_schema(pass_through: Iterable[str] = ()):
    """The explicit Arrow schema of the split files."""
    import pyarrow as pa

    fields = [
        pa.field("pair_id", pa.int64(), nullable=False),
        pa.field("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
    ]
    extra = set(pass_through)
    if "chosen_planted" in extra:
        fields.append(pa.field("chosen_planted", pa.list_(pa.list_(pa.int32()))))
    if "rejected_planted" in extra:
        fields.append(pa.field("rejected_planted", pa.list_(pa.list_(pa.int32()))))
    if "family" in extra:
        fields.append(pa.field("family", pa.string()))
    return pa.schema(fields)


def _atomic_write_bytes(path: Path, writer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_split(records: Sequence[dict], path, pass_through: Iterable[str] = ()) -> None:
    """Write one split as Parquet with the explicit schema, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(pass_through)
    columns = {name: [r.get(name) for r in records] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    _atomic_write_bytes(Path(path), lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def run_prepare(
    source,
    out_dir,
    fmt: str = "auto",
    special_tokens: Iterable[str] = (),
    valid_fraction: float = 0.05,
    test_fraction: float = 0.1,
    seed: int = 1,
    hf_split: str = "train",
    hf_config: str | None = None,
    max_pairs: int | None = None,
    label_noise: float = 0.0,
) -> dict:
    """Run the whole stage; write the three splits and ``filter_report.json``; return the report."""
    split_sizes(1, valid_fraction, test_fraction)  # validate fractions before any work
    flip_labels([], label_noise)  # and the label-noise share
    rows, detected = load_source(source, fmt, hf_split=hf_split, hf_config=hf_config, max_pairs=max_pairs)
    records, drops, examples, nfc_changed = normalise_rows(rows, detected, special_tokens)
    if not records:
        counts = ", ".join(f"{k}={v}" for k, v in drops.items() if v)
        raise PrefkdError(
            f"No pairs survived filtering of {len(rows)} rows from {source} as format '{detected}' "
            f"(dropped: {counts}); check --format, the special tokens and the source data."
        )
    splits = split_records(records, valid_fraction, test_fraction, seed)
    splits["train"], flipped = flip_labels(splits["train"], label_noise, seed)  # valid / test stay clean
    present = [k for k in PASS_THROUGH if k in _columns(rows)]
    lines = getattr(rows, "lines", None)
    out = Path(out_dir)
    for name in SPLITS:
        write_split(splits[name], out / f"{name}.parquet", present)
    report = {
        "source": str(source),
        "format": detected,
        "rows_in": len(rows),
        "kept": len(records),
        "dropped": {reason: int(drops[reason]) for reason in DROP_REASONS},
        "unicode_nfc_normalised": nfc_changed,
        "examples": {reason: list(examples[reason]) for reason in DROP_REASONS},
        "example_lines": None
        if lines is None
        else {reason: [lines[i] for i in examples[reason]] for reason in DROP_REASONS},
        "splits": {name: len(splits[name]) for name in SPLITS},
        "prompt_groups": {name: len({prompt_key(r["prompt"]) for r in splits[name]}) for name in SPLITS},
        "label_noise": {"rate": label_noise, "flipped": len(flipped), "examples": flipped[:MAX_EXAMPLES]},
    }
    write_json(out / "filter_report.json", report, sort_keys=False)
    return report


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def load_special_tokens(tokenizer_dirs: Iterable) -> list[str]:
    """Special-token strings of the given tokenizer directories (special + added special)."""
    tokens: set[str] = set()
    dirs = list(tokenizer_dirs or ())
    if not dirs:
        return []
    from transformers import AutoTokenizer

    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            raise PrefkdError(
                f"The tokenizer directory {d} does not exist; pass a local Hugging Face tokenizer directory to --tokenizer."
            )
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001
            reason = " ".join(str(exc).split())[:200]
            raise PrefkdError(
                f"Could not load a tokenizer from {d} ({reason}); check that it holds tokenizer files."
            ) from exc
        tokens.update(t for t in tok.all_special_tokens if isinstance(t, str))
        for added in getattr(tok, "added_tokens_decoder", {}).values():
            if getattr(added, "special", False):
                tokens.add(str(added.content))
    return sorted(t for t in tokens if t)


@dataclass(kw_only=True)
class PrepareSettings:
    """Settings of ``prefkd prepare``."""

    source: str = setting(doc="local .jsonl/.jsonl.gz/.json/.parquet/.arrow file or a Hugging Face dataset id")
    out_dir: str = setting(doc="directory for train/valid/test.parquet and filter_report.json")
    format: str = setting("auto", "input shape (default: auto)", choices=FORMATS, config="data.format")
    tokenizer: list[str] = setting([], "tokenizer directories whose special tokens must not occur in the text")
    valid_fraction: float = setting(0.05, "share of rows for validation (default: 0.05)", config="data.valid_fraction")
    test_fraction: float = setting(0.1, "share of rows for test (default: 0.1)", config="data.test_fraction")
    seed: int = setting(1, "split seed (default: 1)", config="seed")
    hf_split: str = setting("train", "split of a Hugging Face dataset (default: train)", config="data.hf_split")
    hf_config: str | None = setting(None, "config name of a Hugging Face dataset", config="data.hf_config")
    max_pairs: int | None = setting(None, "keep only the first N source rows", config="data.max_pairs")
    label_noise: float = setting(
        0.0,
        "share of the TRAIN pairs whose chosen and rejected are swapped (seeded; 0: none)",
        config="data.label_noise",
    )


def run(s: PrepareSettings) -> int:
    """Entry point of ``prefkd prepare``; raises PrefkdError for user errors."""
    special = load_special_tokens(s.tokenizer)
    report = run_prepare(
        s.source,
        s.out_dir,
        fmt=s.format,
        special_tokens=special,
        valid_fraction=s.valid_fraction,
        test_fraction=s.test_fraction,
        seed=s.seed,
        hf_split=s.hf_split,
        hf_config=s.hf_config,
        max_pairs=s.max_pairs,
        label_noise=s.label_noise,
    )
    dropped = ", ".join(f"{k}={v}" for k, v in report["dropped"].items() if v) or "none"
    splits = report["splits"]
    print(
        f"prepare: {report['rows_in']} rows ({report['format']}) -> kept {report['kept']} "
        f"(dropped: {dropped}); train={splits['train']} valid={splits['valid']} test={splits['test']}",
        file=sys.stderr,
    )
    return 0
