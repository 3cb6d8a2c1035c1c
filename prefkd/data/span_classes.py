"""Tokenizer-mismatch measures: span classes and vocabulary overlap of two tokenizers.

An aligned span (see ``prefkd.core.align``) covers ``t`` teacher tokens and ``s`` student tokens, both >= 1.
Its class is ``1:1`` (t = s = 1), ``1:n`` (t = 1 < s), ``n:1`` (s = 1 < t) or ``n:m`` (both > 1), always
written teacher : student.  The vocabulary overlap is the Jaccard index |A & B| / |A | B| of the two sets of
token byte strings (regular tokens only; special tokens are control strings, not text): each vocabulary
entry is decoded to the exact bytes it stands for by ``ByteVocab`` -- GPT-2's byte <-> character table for
byte-level BPE (Qwen2.5, Llama-3, SmolLM2), ``<0xNN>`` = one byte and U+2581 = a space for SentencePiece
byte-fallback vocabularies (Mistral) -- so "Ġthe" and "▁the" are the same string b" the".
"""

from __future__ import annotations

import numpy as np

from prefkd.core.align import ByteVocab
from prefkd.errors import PrefkdError

SPAN_CLASSES = ("1:1", "1:n", "n:1", "n:m")


def span_class_ids(teacher_counts, student_counts) -> np.ndarray:
    """Index into ``SPAN_CLASSES`` of every span, from its teacher and student token counts."""
    t = np.asarray(teacher_counts, dtype=np.int64)
    s = np.asarray(student_counts, dtype=np.int64)
    if t.shape != s.shape or t.ndim != 1:
        raise PrefkdError(
            f"Span token counts need one teacher and one student count per span, got {t.shape} and {s.shape}."
        )
    if len(t) and min(int(t.min()), int(s.min())) < 1:
        raise PrefkdError("Every aligned span covers at least one token on each side; got a count below 1.")
    return (t > 1).astype(np.int64) * 2 + (s > 1).astype(np.int64)


def span_class_counts(teacher_counts, student_counts) -> dict[str, int]:
    """How many spans fall in each class (every class present, zeros included)."""
    ids = span_class_ids(teacher_counts, student_counts)
    counts = np.bincount(ids, minlength=len(SPAN_CLASSES))
    return {name: int(c) for name, c in zip(SPAN_CLASSES, counts)}


def class_shares(counts: dict[str, int]) -> dict[str, float]:
    """Each class's share of all spans (0.0 everywhere when there are none)."""
    total = sum(counts.get(c, 0) for c in SPAN_CLASSES)
    return {c: (counts.get(c, 0) / total if total else 0.0) for c in SPAN_CLASSES}


def vocab_byte_strings(tokenizer, vocab: ByteVocab | None = None) -> set[bytes]:
    """The byte strings of a tokenizer's regular tokens (special tokens and empty strings left out);
    ``vocab`` is the tokenizer's ``ByteVocab`` when already built."""
    vocab = vocab if vocab is not None else ByteVocab.from_tokenizer(tokenizer)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out = set()
    for i in range(len(vocab.lengths)):
        if i not in special and vocab.lengths[i]:
            out.add(vocab.token_bytes(i))
    return out


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0
