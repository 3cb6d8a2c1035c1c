"""Aligned spans of single texts, the independent invariant checker, and `prefkd spans`.

Texts are taken in Unicode NFC, as `prefkd prepare` writes them. The checker does not reuse the alignment arithmetic: it decodes every token to
its bytes through the vocabulary and compares span by span with the text.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefkd.assets.tokenizers import load_tokenizer
from prefkd.core import align as A
from prefkd.data.tokenize_align import ModelTokens
from prefkd.errors import PrefkdError


@dataclass
class TextSpans:
    text: str
    teacher_ids: np.ndarray
    teacher_span: np.ndarray
    student_ids: np.ndarray
    student_span: np.ndarray
    span_ends: np.ndarray
    ok: bool  # both tokenizations decode exactly to the text


def align_texts(texts: list[str], teacher, student) -> list[TextSpans]:
    """Tokenize each text with both models (``ModelTokens``) and align; no truncation."""
    blobs = [t.encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    text = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    text_splits = A.splits_from_lengths(lengths)
    t_ids, t_splits = teacher.encode(texts)
    s_ids, s_splits = student.encode(texts)
    t_starts, t_ok = A.token_starts(teacher.vocab, t_ids, t_splits, text, text_splits)
    s_starts, s_ok = A.token_starts(student.vocab, s_ids, s_splits, text, text_splits)
    nonempty = (np.diff(t_splits) > 0) & (np.diff(s_splits) > 0)
    out = []
    rows = np.flatnonzero(nonempty)
    if len(rows):
        t_mask, s_mask = nonempty[A.row_index(t_splits)], nonempty[A.row_index(s_splits)]
        t_sub = A.splits_from_lengths(np.diff(t_splits)[nonempty])
        s_sub = A.splits_from_lengths(np.diff(s_splits)[nonempty])
        al = A.align(t_starts[t_mask], t_sub, s_starts[s_mask], s_sub, lengths[nonempty])
        t_span_all, s_span_all = al.teacher_span, al.student_span
    j = 0
    for r, t in enumerate(texts):
        ti = t_ids[t_splits[r] : t_splits[r + 1]]
        si = s_ids[s_splits[r] : s_splits[r + 1]]
        if nonempty[r]:
            t_span = t_span_all[t_sub[j] : t_sub[j + 1]]
            s_span = s_span_all[s_sub[j] : s_sub[j + 1]]
            ends = al.span_ends[al.span_splits[j] : al.span_splits[j + 1]]
            j += 1
        else:
            t_span = s_span = np.zeros(0, dtype=np.int32)
            ends = np.zeros(0, dtype=np.int64)
        out.append(TextSpans(t, ti, t_span, si, s_span, ends, bool(t_ok[r] and s_ok[r])))
    return out


def _decode_side(vocab: A.ByteVocab, ids) -> list[bytes]:
    pieces = [vocab.token_bytes(int(i)) for i in ids]
    if vocab.prefix_space and pieces:
        if not pieces[0].startswith(b" "):
            return []
        pieces[0] = pieces[0][1:]
    return pieces


def check_spans(
    text_bytes: bytes, t_ids, t_span, s_ids, s_span, span_ends, t_vocab, s_vocab, covered: int | None = None
) -> list[str]:
    """Every invariant of one aligned response; returns the violations (empty when all hold).

    ``covered`` is the number of leading text bytes the spans must tile (the whole
    text unless the response was truncated).
    """
    problems = []
    covered = len(text_bytes) if covered is None else covered
    ends = [int(e) for e in span_ends]
    m = len(ends)
    if m == 0:
        return ["no spans"]
    if any(b <= a for a, b in zip([0] + ends[:-1], ends)):
        problems.append("empty or unordered span")
    if ends[-1] != covered:
        problems.append(f"spans end at byte {ends[-1]}, not at {covered}")
    for name, ids, span, vocab in (("teacher", t_ids, t_span, t_vocab), ("student", s_ids, s_span, s_vocab)):
        span = [int(s) for s in span]
        if len(span) != len(ids):
            problems.append(f"{name}: {len(ids)} tokens but {len(span)} span ids")
            continue
        if any(s < 0 or s >= m for s in span):
            problems.append(f"{name}: a response token is outside every span")
            continue
        if span and (span[0] != 0 or any(b - a not in (0, 1) for a, b in zip(span, span[1:])) or span[-1] != m - 1):
            problems.append(f"{name}: span ids are not 0..{m - 1} in order")
            continue
        pieces = _decode_side(vocab, ids)
        if len(pieces) != len(ids):
            problems.append(f"{name}: the dummy-prefix token does not start with a space")
            continue
        got = [b""] * m
        for piece, s in zip(pieces, span):
            got[s] += piece
        start = 0
        for k, end in enumerate(ends):
            if got[k] != text_bytes[start:end]:
                problems.append(f"{name}: span {k} is {got[k]!r}, the text there is {text_bytes[start:end]!r}")
                break
            start = end
    return problems


def check_shard_row(row: dict, texts: dict[str, str], t_vocab, s_vocab, eos: dict[str, int]) -> list[str]:
    """All invariants of one token-shard row, given the original response texts."""
    problems = []
    for side in ("chosen", "rejected"):
        ends = row[f"{side}_span_bytes"]
        covered = ends[-1] if ends else 0
        if not row[f"{side}_truncated"] and covered != len(texts[side].encode()):
            problems.append(f"{side}: not truncated but spans cover {covered} bytes")
        parts = {}
        for role in ("teacher", "student"):
            ids = row[f"{role}_{side}_input_ids"]
            span = row[f"{role}_{side}_span_ids"]
            p = row[f"{role}_prompt_len"]
            if any(s != -1 for s in span[:p]):
                problems.append(f"{side}/{role}: a prompt token has a span id")
            resp = [(i, s) for i, s in zip(ids[p:], span[p:]) if s >= 0]
            tail = list(zip(ids[p:], span[p:]))[len(resp) :]
            expected_tail = [] if row[f"{side}_truncated"] else [(eos[role], -1)]
            if tail != expected_tail:
                problems.append(f"{side}/{role}: after the response comes {tail}, expected {expected_tail}")
            parts[role] = ([i for i, _ in resp], [s for _, s in resp])
        problems += [
            f"{side}: {p}"
            for p in check_spans(
                texts[side].encode(), *parts["teacher"], *parts["student"], ends, t_vocab, s_vocab, covered=covered
            )
        ]
        if len(ends) != row[f"{side}_num_spans"]:
            problems.append(f"{side}: num_spans {row[f'{side}_num_spans']} != {len(ends)} span ends")
    return problems


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _show(spans: TextSpans, teacher, student, out) -> None:
    data = spans.text.encode("utf-8")
    start = 0
    rows = []
    for k, end in enumerate(spans.span_ends):
        t = [
            teacher.tokenizer.convert_ids_to_tokens(int(i))
            for i, s in zip(spans.teacher_ids, spans.teacher_span)
            if s == k
        ]
        s = [
            student.tokenizer.convert_ids_to_tokens(int(i))
            for i, s in zip(spans.student_ids, spans.student_span)
            if s == k
        ]
        rows.append(
            (
                k,
                f"{start}:{int(end)}",
                repr(data[start:end].decode("utf-8", errors="backslashreplace")),
                " ".join(t),
                " ".join(s),
            )
        )
        start = int(end)
    widths = [max(len(str(r[i])) for r in rows + [("span", "bytes", "text", "teacher", "student")]) for i in range(5)]
    for r in [("span", "bytes", "text", "teacher", "student")] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
    one = sum(
        1
        for k in range(len(spans.span_ends))
        if list(spans.teacher_span).count(k) == 1 and list(spans.student_span).count(k) == 1
    )
    print(
        f"{len(spans.span_ends)} spans, {one} one-to-one; teacher {len(spans.teacher_ids)} tokens, student {len(spans.student_ids)} tokens",
        file=out,
    )


def _read_jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise PrefkdError(f"{path} line {lineno} is not valid JSON ({exc.msg}).") from exc
    except FileNotFoundError as exc:
        raise PrefkdError(f"file {path} does not exist.") from exc


def check_jsonl(path: Path, fields: list[str], teacher, student, batch: int = 512) -> dict:
    summary = {"rows": 0, "texts": 0, "spans": 0, "one_to_one": 0.0, "violations": 0, "skipped": 0}
    one = 0
    examples = []
    buffer: list[str] = []

    def flush():
        nonlocal one
        for spans in align_texts(buffer, teacher, student):
            summary["texts"] += 1
            data = spans.text.encode("utf-8")
            if not data:
                summary["skipped"] += 1
                continue
            if not spans.ok:
                problems = ["the tokens do not decode to the text (normalising tokenizer?)"]
            else:
                problems = check_spans(
                    data,
                    spans.teacher_ids,
                    spans.teacher_span,
                    spans.student_ids,
                    spans.student_span,
                    spans.span_ends,
                    teacher.vocab,
                    student.vocab,
                )
            m = len(spans.span_ends)
            summary["spans"] += m
            t = np.bincount(spans.teacher_span, minlength=m)
            s = np.bincount(spans.student_span, minlength=m)
            one += int(((t == 1) & (s == 1)).sum())
            if problems:
                summary["violations"] += 1
                if len(examples) < 5:
                    examples.append({"text": spans.text[:200], "problems": problems[:3]})
        buffer.clear()

    for row in _read_jsonl(path):
        summary["rows"] += 1
        for field in fields:
            value = row.get(field)
            if isinstance(value, str):
                buffer.append(unicodedata.normalize("NFC", value))
            else:
                summary["skipped"] += 1
        if len(buffer) >= batch:
            flush()
    flush()
    summary["one_to_one"] = round(one / summary["spans"], 6) if summary["spans"] else 0.0
    if examples:
        summary["examples"] = examples
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``prefkd spans``, written by hand rather than generated from a settings dataclass: the
    text to show is a positional argument (``prefkd spans --teacher T --student S "Hi there"``), exclusive
    with ``--jsonl``, and ``--field`` may be repeated; neither can be expressed with ``setting``."""
    p.add_argument("--teacher", required=True, type=Path, help="teacher tokenizer dir")
    p.add_argument("--student", required=True, type=Path, help="student tokenizer dir")
    p.add_argument("text", nargs="?", help="a text to show side by side (or use --jsonl)")
    p.add_argument("--jsonl", type=Path, help="check every invariant on every row of this JSONL(.gz) file")
    p.add_argument("--field", action="append", help="text field(s) to check (default: chosen and rejected)")


def run(args) -> int:

    if (args.text is None) == (args.jsonl is None):
        raise PrefkdError("give either a TEXT or --jsonl FILE.")
    teacher = ModelTokens(load_tokenizer(args.teacher))
    student = ModelTokens(load_tokenizer(args.student))
    if args.text is not None:
        (spans,) = align_texts([unicodedata.normalize("NFC", args.text)], teacher, student)
        if not spans.ok:
            raise PrefkdError(
                "the tokens of one tokenizer do not decode back to the text, so it cannot be aligned in bytes."
            )
        _show(spans, teacher, student, sys.stdout)
        return 0
    summary = check_jsonl(args.jsonl, args.field or ["chosen", "rejected"], teacher, student)
    print(json.dumps(summary, ensure_ascii=False))
    return 1 if summary["violations"] else 0
