"""Aligned spans ("parent tokens") between two tokenizations of the same text.

Everything works in UTF-8 bytes of the response text. Each token id is mapped to
the exact bytes it stands for (``ByteVocab``), so byte-fallback tokens, partial
UTF-8 bytes and SentencePiece's dummy-prefix space need no special casing: a
token's byte interval is the running sum of the byte lengths before it.

A batch of texts is held in CSR form: a flat array of values plus ``splits``
(int64, length rows + 1) such that row r is ``values[splits[r]:splits[r+1]]``.
All functions below are vectorised over the whole batch with numpy.

Span rule: a cut is a byte position where a token starts on one side; the
common cuts (cuts of both sides, plus 0) start the spans, so span k is the
half-open byte interval between two consecutive common cuts (the last one ends
at the text length). This is the finest partition whose boundaries are token
boundaries in both tokenizations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from prefkd.errors import PrefkdError

# ---------------------------------------------------------------------------
# Token ids -> bytes
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _decoder_types(node) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if "type" in node:
            found.add(node["type"])
        for value in node.values():
            found |= _decoder_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _decoder_types(value)
    return found


def _piece_bytes_metaspace(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


def _piece_bytes_bytelevel(piece: str, table: dict[str, int]) -> bytes:
    try:
        return bytes(table[c] for c in piece)
    except KeyError:  # an added token stored verbatim
        return piece.encode("utf-8")


@dataclass(frozen=True)
class ByteVocab:
    """The exact UTF-8 bytes of every token id of one tokenizer.

    ``flat[offsets[i]:offsets[i] + lengths[i]]`` are the bytes of token i.
    ``prefix_space`` is True for tokenizers that add a dummy-prefix space to
    every text (SentencePiece style): their decoded bytes are b" " + text.
    """

    flat: np.ndarray  # uint8
    offsets: np.ndarray  # int64, per id
    lengths: np.ndarray  # int64, per id
    prefix_space: bool

    def token_bytes(self, token_id: int) -> bytes:
        start = int(self.offsets[token_id])
        return self.flat[start : start + int(self.lengths[token_id])].tobytes()

    def decode(self, ids) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ByteVocab":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise PrefkdError(
                f"tokenizer {tokenizer.name_or_path!r} is not a fast (Rust) tokenizer; "
                "prefkd needs a tokenizer.json to map tokens to bytes."
            )
        spec = json.loads(backend.to_str())
        types = _decoder_types(spec.get("decoder"))
        if "ByteLevel" in types:
            table = _byte_level_decoder()
            to_bytes = lambda piece: _piece_bytes_bytelevel(piece, table)  # noqa: E731
        elif "ByteFallback" in types or "Metaspace" in types:
            to_bytes = _piece_bytes_metaspace
        else:
            raise PrefkdError(
                f"tokenizer {tokenizer.name_or_path!r} has a decoder of types {sorted(types)}; "
                "prefkd supports byte-level BPE and SentencePiece-style (Metaspace/ByteFallback) tokenizers."
            )
        vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
        blobs = []
        for i, piece in enumerate(pieces):
            if i in added:
                blobs.append(added[i].encode("utf-8"))
            elif piece is None:
                blobs.append(b"")
            else:
                blobs.append(to_bytes(piece))
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        offsets = np.zeros(len(blobs), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        probe = tokenizer("a", add_special_tokens=False)["input_ids"]
        decoded = b"".join(blobs[i] for i in probe)
        return cls(flat=flat, offsets=offsets, lengths=lengths, prefix_space=decoded == b" a")


# ---------------------------------------------------------------------------
# Ragged (CSR) helpers
# ---------------------------------------------------------------------------


def splits_from_lengths(lengths: np.ndarray) -> np.ndarray:
    splits = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=splits[1:])
    return splits


def row_index(splits: np.ndarray) -> np.ndarray:
    """Row number of every flat element."""
    return np.repeat(np.arange(len(splits) - 1, dtype=np.int64), np.diff(splits))


def local_index(splits: np.ndarray) -> np.ndarray:
    """Position of every flat element inside its row."""
    total = int(splits[-1])
    return np.arange(total, dtype=np.int64) - np.repeat(splits[:-1], np.diff(splits))


def row_cumsum(values: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarted at every row."""
    total = np.cumsum(values)
    base = np.concatenate([[0], total])[splits[:-1]]
    return total - np.repeat(base, np.diff(splits))


def concat_rows(parts: list[tuple[np.ndarray, np.ndarray]], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate several ragged arrays row by row: out row r = part0[r] + part1[r] + ..."""
    lengths = [np.diff(splits) for _, splits in parts]
    out_splits = splits_from_lengths(np.sum(lengths, axis=0))
    out = np.empty(int(out_splits[-1]), dtype=dtype)
    before = np.zeros(len(out_splits) - 1, dtype=np.int64)
    for (values, splits), n in zip(parts, lengths):
        dest_start = out_splits[:-1] + before
        out[np.arange(len(values), dtype=np.int64) + np.repeat(dest_start - splits[:-1], n)] = values
        before += n
    return out, out_splits


# ---------------------------------------------------------------------------
# Byte intervals of tokens
# ---------------------------------------------------------------------------


def token_starts(vocab: ByteVocab, ids: np.ndarray, splits: np.ndarray, text: np.ndarray, text_splits: np.ndarray):
    """Byte start of every token in its row's text, and which rows round-trip exactly.

    ``text``/``text_splits`` hold the UTF-8 bytes of each row's text. Returns
    ``(starts, ok)``: ``starts`` int64 per token (clamped into [0, n]) and ``ok``
    a bool per row, False when the tokens' bytes are not exactly the text (such
    rows must be dropped by the caller, never aligned).
    """
    lengths = vocab.lengths[ids]
    row = row_index(splits)
    starts = row_cumsum(lengths, splits) - lengths
    decoded_len = np.bincount(row, weights=lengths, minlength=len(splits) - 1).astype(np.int64)
    shift = 1 if vocab.prefix_space else 0
    n_bytes = np.diff(text_splits)
    ok = decoded_len == n_bytes + shift

    # Compare the decoded bytes with the text, only for rows of the right length.
    token_ok = ok[row]
    sel_ids = ids[token_ok]
    sel_len = lengths[token_ok]
    sel_row = row[token_ok]
    total = int(sel_len.sum())
    if total:
        tok_first = np.cumsum(sel_len) - sel_len
        src = np.repeat(vocab.offsets[sel_ids] - tok_first, sel_len) + np.arange(total, dtype=np.int64)
        decoded = vocab.flat[src]
        byte_row = np.repeat(sel_row, sel_len)
        pos = np.arange(total, dtype=np.int64) - np.repeat(tok_first - starts[token_ok], sel_len)
        if shift:
            # drop the dummy-prefix byte, which must be a space
            is_prefix = pos == 0
            prefix_ok = np.ones(len(ok), dtype=bool)
            prefix_ok[byte_row[is_prefix]] = decoded[is_prefix] == ord(" ")
            ok &= prefix_ok
            keep = ~is_prefix
            decoded, byte_row, pos = decoded[keep], byte_row[keep], pos[keep] - 1
        expected = text[text_splits[byte_row] + pos]
        bad_rows = np.unique(byte_row[decoded != expected])
        ok[bad_rows] = False
    starts = np.clip(starts - shift, 0, None)
    starts = np.minimum(starts, n_bytes[row])
    return starts, ok


# ---------------------------------------------------------------------------
# Span alignment
# ---------------------------------------------------------------------------


@dataclass
class Alignment:
    """Spans of a batch. ``*_span`` are row-local span ids per token (int32)."""

    teacher_span: np.ndarray
    student_span: np.ndarray
    span_ends: np.ndarray  # int64 flat: end byte of every span
    span_splits: np.ndarray  # int64: spans of row r are span_ends[span_splits[r]:span_splits[r+1]]

    @property
    def num_spans(self) -> np.ndarray:
        return np.diff(self.span_splits)


def align(t_starts, t_splits, s_starts, s_splits, n_bytes) -> Alignment:
    """Common-cut spans for a batch.

    Precondition (what ``token_starts`` returns): every row has at least one token
    per side, and each row's starts are non-decreasing and begin at byte 0.
    Rows are folded into one sorted key space (``row * width + byte``), so the
    whole batch is a single merge of two sorted arrays: one searchsorted finds the
    common cuts and a running count of cuts gives every token its span.
    """
    rows = len(n_bytes)
    width = int(n_bytes.max(initial=0)) + 2
    t_row = row_index(t_splits)
    s_row = row_index(s_splits)
    t_keys = t_row * width + t_starts
    s_keys = s_row * width + s_starts
    for keys, starts, splits in ((t_keys, t_starts, t_splits), (s_keys, s_starts, s_splits)):
        if (np.diff(splits) == 0).any() or (starts[splits[:-1]] != 0).any() or (np.diff(keys) < 0).any():
            raise ValueError("align needs, per row, at least one token and non-decreasing starts from byte 0")
    pos = np.searchsorted(s_keys, t_keys)  # first student token at or after each teacher start
    t_cut = s_keys[np.minimum(pos, len(s_keys) - 1)] == t_keys
    t_cut[1:] &= t_keys[1:] != t_keys[:-1]  # a cut counts once: at its first teacher token
    s_cut = np.zeros(len(s_keys), dtype=bool)
    s_cut[pos[t_cut]] = True  # ... and at its first student token
    common = t_keys[t_cut]  # sorted, distinct, includes every row's byte 0
    span_row = t_row[t_cut]
    span_splits = splits_from_lengths(np.bincount(span_row, minlength=rows))
    span_start = common - span_row * width
    # a span ends where the next one in its row starts, the last at the text end
    span_end = np.empty_like(span_start)
    span_end[:-1] = span_start[1:]
    span_end[span_splits[1:] - 1] = n_bytes
    return Alignment(
        teacher_span=(np.cumsum(t_cut) - 1 - span_splits[t_row]).astype(np.int32),
        student_span=(np.cumsum(s_cut) - 1 - span_splits[s_row]).astype(np.int32),
        span_ends=span_end,
        span_splits=span_splits,
    )


def align_reference(t_starts: list[list[int]], s_starts: list[list[int]], n_bytes: list[int]):
    """A plain per-token Python implementation of the same rule, for tests and benchmarks.

    Returns (teacher_span, student_span, span_ends) as lists of lists.
    """
    t_out, s_out, ends_out = [], [], []
    for ts, ss, n in zip(t_starts, s_starts, n_bytes):
        cuts = sorted({0} | (set(ts) & set(ss)))
        ends = cuts[1:] + [n]

        def span_of(pos, cuts=cuts):
            k = 0
            while k + 1 < len(cuts) and cuts[k + 1] <= pos:
                k += 1
            return k

        t_out.append([span_of(p) for p in ts])
        s_out.append([span_of(p) for p in ss])
        ends_out.append(ends)
    return t_out, s_out, ends_out


def span_token_counts(span: np.ndarray, splits: np.ndarray, span_splits: np.ndarray) -> np.ndarray:
    """Number of tokens of one side in every span (flat over all spans of the batch)."""
    global_span = span.astype(np.int64) + span_splits[row_index(splits)]
    return np.bincount(global_span, minlength=int(span_splits[-1]))


def spans_that_fit(alignment: Alignment, t_splits, s_splits, t_budget, s_budget) -> np.ndarray:
    """Per row, the largest number of leading spans whose tokens fit both budgets."""
    span_splits = alignment.span_splits
    t_count = span_token_counts(alignment.teacher_span, t_splits, span_splits)
    s_count = span_token_counts(alignment.student_span, s_splits, span_splits)
    span_row = row_index(span_splits)
    fits = (row_cumsum(t_count, span_splits) <= t_budget[span_row]) & (
        row_cumsum(s_count, span_splits) <= s_budget[span_row]
    )
    return np.bincount(span_row, weights=fits, minlength=len(span_splits) - 1).astype(np.int64)


def keep_leading_spans(values: np.ndarray, span: np.ndarray, splits: np.ndarray, keep: np.ndarray):
    """Drop, per row, the tokens whose span index is >= keep[row]. Returns (values, span, splits)."""
    mask = span < keep[row_index(splits)]
    kept_len = np.bincount(row_index(splits)[mask], minlength=len(splits) - 1)
    return values[mask], span[mask], splits_from_lengths(kept_len)
