"""Token strings of a vocabulary, as comparable bytes (MinED and CDM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from prefkd.core.align import ByteVocab


def normalize_piece(piece: str) -> bytes:
    """A vocabulary piece as the bytes it stands for, for plain ``{piece: id}`` vocabularies.

    SentencePiece ``'▁'`` and byte-level ``'Ġ'`` space markers become a space; SentencePiece byte
    tokens ``<0xNN>`` become that byte; everything else is UTF-8 encoded as is. (Real tokenizers go
    through ``prefkd.core.align.ByteVocab`` instead, which decodes every piece exactly.)
    """
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").replace("\u0120", " ").encode("utf-8")


def vocab_list(vocab: Mapping[str, int]) -> list[bytes]:
    size = max(vocab.values()) + 1 if vocab else 0
    out = [b""] * size
    for piece, i in vocab.items():
        out[i] = normalize_piece(piece)
    return out


@dataclass
class TokenizerStrings:
    """The bytes of every id of a tokenizer, its special/added ids and its EOS id."""

    pieces: list[bytes]
    special: set[int]
    eos_id: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenizerStrings":
        """Decoded once per tokenizer object (cached: the byte decoding of a 150k vocabulary takes ~1 s)."""
        hit = _STRINGS_CACHE.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]

        vocab = ByteVocab.from_tokenizer(tokenizer)
        flat = vocab.flat.tobytes()
        pieces = [flat[o : o + n] for o, n in zip(vocab.offsets.tolist(), vocab.lengths.tolist())]
        special = set(int(i) for i in tokenizer.all_special_ids)
        special |= set(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
        eos = tokenizer.eos_token_id
        out = cls(pieces=pieces, special=special, eos_id=None if eos is None else int(eos))
        _STRINGS_CACHE[id(tokenizer)] = (tokenizer, out)  # the strong reference keeps id() unique
        return out


_STRINGS_CACHE: dict[int, tuple[object, TokenizerStrings]] = {}
