"""``prefkd mismatch``: how differently two tokenizers cut the same responses.

For a teacher and a student tokenizer directory and a sample of preference pairs (a JSONL / JSONL.GZ file in
any format ``prefkd prepare`` reads, HH transcripts included, or by default the embedded demo's generated
pairs), both responses of every pair are tokenized and aligned exactly as the ``tokenize`` stage does, and the
aligned spans are counted per class (1:1, 1:n, n:1, n:m, teacher : student, see ``span_classes``), next to
the mean tokens per span on each side and the vocabulary overlap (Jaccard over token byte strings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefkd.assets.tokenizers import load_tokenizer
from prefkd.core.settings import setting
from prefkd.data.demo import generate_demo_pairs
from prefkd.data.prepare import detect_format, load_source, normalise_rows
from prefkd.data.span_classes import SPAN_CLASSES, class_shares, jaccard, vocab_byte_strings
from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs
from prefkd.errors import PrefkdError
from prefkd.io.files import write_json

# Long enough that HH transcripts are rarely cut: the measure is about the tokenizers, not a training budget.
MAX_LENGTH = 4096
MAX_PROMPT_LENGTH = 2048


def sample_records(jsonl: Path | None, limit: int, seed: int = 1) -> list[dict]:
    """Up to ``limit`` normalised pairs of ``jsonl`` (any prepare format), else ``limit`` demo pairs."""
    if limit < 1:
        raise PrefkdError(f"--limit must be at least 1, not {limit}.")
    if jsonl is None:
        rows = generate_demo_pairs(limit, seed)
        fmt = detect_format(rows)
    else:
        if not Path(jsonl).is_file():
            raise PrefkdError(f"There is no file {jsonl}; pass a JSONL (or .jsonl.gz) file of preference pairs.")
        rows, fmt = load_source(Path(jsonl), max_pairs=limit)
    records, _, _, _ = normalise_rows(rows, fmt)
    if not records:
        raise PrefkdError(f"No usable preference pair in {jsonl or 'the demo sample'}; check the file's format.")
    return records[:limit]


def mismatch_table(teacher, student, records: list[dict]) -> dict:
    """Span classes, tokens per span and vocabulary overlap of two loaded tokenizers on ``records``."""
    t_model, s_model = ModelTokens(teacher), ModelTokens(student)
    _, stats = tokenize_pairs(records, t_model, s_model, MAX_LENGTH, MAX_PROMPT_LENGTH)
    spans = stats["spans"]
    tokens = {role: sum(stats["response_tokens"][role].values()) for role in ("teacher", "student")}
    t_vocab, s_vocab = vocab_byte_strings(teacher, t_model.vocab), vocab_byte_strings(student, s_model.vocab)
    return {
        "pairs": stats["pairs_out"],
        "spans": spans,
        "span_classes": stats["span_classes"],
        "span_class_share": class_shares(stats["span_classes"]),
        "tokens_per_span": {role: (n / spans if spans else 0.0) for role, n in tokens.items()},
        "vocab": {"teacher": len(t_vocab), "student": len(s_vocab), "shared": len(t_vocab & s_vocab)},
        "vocab_jaccard": jaccard(t_vocab, s_vocab),
    }


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one row per (teacher, student) result."""
    header = ["teacher", "student", "spans", *SPAN_CLASSES, "tok/span T", "tok/span S", "vocab Jaccard"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        share = r["span_class_share"]
        cells = [r["teacher_name"], r["student_name"], f"{r['spans']:,}"]
        cells += [f"{100 * share[c]:.1f} %" for c in SPAN_CLASSES]
        cells += [f"{r['tokens_per_span']['teacher']:.3f}", f"{r['tokens_per_span']['student']:.3f}"]
        cells.append(f"{r['vocab_jaccard']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tokenizer_name(path: Path, tokenizer) -> str:
    """The builtin name or source recorded in a tokenizer dir, else the folder name."""
    info = Path(path) / "prefkd_source.json"
    if info.is_file():
        return str(json.loads(info.read_text(encoding="utf-8")).get("source", Path(path).name))
    return Path(path).name


@dataclass(kw_only=True)
class MismatchSettings:
    """Settings of ``prefkd mismatch``: span classes and vocabulary overlap of a teacher / student pair."""

    teacher: Path = setting(doc="teacher tokenizer dir")
    student: Path = setting(doc="student tokenizer dir")
    jsonl: Path | None = setting(None, "preference pairs (JSONL or .jsonl.gz, any prepare format; default: demo pairs)")
    limit: int = setting(400, "number of pairs read from the file (or generated)")
    out: Path | None = setting(None, "also write the result as JSON here")


def run(s: MismatchSettings) -> int:
    records = sample_records(s.jsonl, s.limit)
    teacher, student = load_tokenizer(s.teacher), load_tokenizer(s.student)
    result = mismatch_table(teacher, student, records)
    result.update(teacher_name=tokenizer_name(s.teacher, teacher), student_name=tokenizer_name(s.student, student))
    print(format_table([result]))
    if s.out is not None:
        write_json(s.out, result)
    return 0
