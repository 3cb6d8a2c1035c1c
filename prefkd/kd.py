"""Cross-tokenizer knowledge-distillation (KD) terms: DSKD-CMA, ULD, MinED and CDM.

Every term is a ``KDLoss`` module with one signature::

    loss, metrics = kd(student: KDSide, teacher: KDSide)

where each ``KDSide`` is one model's view of the same batch of chosen responses (same rows, same
order; each model with its own tokens, chat template and padding). The caller mixes the term with the
student's cross-entropy: ``kd_mix(ce, kd, kappa) = (1 - kappa) * ce + kappa * kd`` (kappa 0.5,
temperature 2 in the method spec).

Conventions shared by all terms
-------------------------------
* ``logits[b, t]`` predicts token ``t + 1``; ``target_mask[b, t] = 1`` marks the tokens to be predicted
  (response tokens, EOS included, t >= 1). So the *prediction positions* of a row are the t with
  ``target_mask[b, t + 1] = 1``. Logits and hidden states at other positions (prompt, padding,
  and for MinED / CDM also the inside of multi-token spans) never influence a loss.
* Teacher tensors are detached inside every term: the teacher gets no gradient, ever.
* A loss is the mean over its contributing positions; with none it is an exact 0 that still has a
  graph to the student (so a step with an empty batch is harmless). ``metrics`` are plain floats.
* Temperature ``T`` divides both models' logits. KL terms (MinED, CDM, DSKD) are multiplied by T^2
  (Hinton's gradient-scale correction); the ULD distance is not (it is a bounded L1 distance, in [0, 2]).

Position alignment (MinED and CDM)
----------------------------------
The shards give every response token an aligned *unit*: span k is the same bytes on both sides, and
a final EOS unit is the same "end of response" on both sides (``prefkd.batches.unit_ids``). A
prediction is comparable across the two models only when both have seen exactly the same text and
are about to produce the same text boundary. That holds at the *first token of every unit*: the
student's prediction made just before the first student token of unit k and the teacher's
prediction made just before the first teacher token of unit k both condition on the prompt plus
units 0..k-1 (the same bytes) and both predict "the next token starting at the byte where unit k
starts" (for the EOS unit: the end of the response). So one aligned pair per unit present on both
sides; for the usual 1:1 spans that is every prediction, inside a multi-token span the predictions
after its first token are skipped (their contexts differ between the models). This replaces the
DTW alignment of token strings used by FuseLLM / MinED and CDM with an exact byte alignment.

ULD pairs positions by order within the response instead (the i-th response prediction of the
student with the i-th of the teacher, for i < the shorter length), as Boizard et al. do. DSKD needs
no pairing: its cross-model attention aligns positions softly.

What each term needs from a ``KDSide``
--------------------------------------
========  ======  ======  =========  ========  ===========
term      logits  hidden  input_ids  unit_ids  target_mask
========  ======  ======  =========  ========  ===========
ULD       yes     --      --         --        yes
MinED     yes     --      --         yes       yes
CDM       yes     --      --         yes       yes
DSKD      yes     yes     yes        --        yes
========  ======  ======  =========  ========  ===========
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefkd.errors import PrefkdError

KD_NAMES = ("dskd", "uld", "mined", "cdm")
NO_ID = -1


# ---------------------------------------------------------------------------------------------------------
# Inputs and the common base
# ---------------------------------------------------------------------------------------------------------


@dataclass
class KDSide:
    """One model's view of a batch of chosen responses."""

    logits: torch.Tensor  # [B, T, V]; logits[b, t] predicts token t + 1
    hidden: torch.Tensor | None  # [B, T, H] final hidden states (DSKD only)
    input_ids: torch.Tensor  # [B, T]
    unit_ids: torch.Tensor  # [B, T] aligned unit (span / EOS) of every token, -1 elsewhere
    target_mask: torch.Tensor  # [B, T] 1.0 where token t is a response token to predict (t >= 1)


class KDLoss(torch.nn.Module):
    """Base of all KD terms: ``forward(student, teacher) -> (loss scalar, metrics dict of floats)``."""

    name = "kd"

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        if not temperature > 0:
            raise PrefkdError(f"the KD temperature must be positive, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, student: KDSide, teacher: KDSide):  # pragma: no cover - abstract
        raise NotImplementedError


def kd_mix(ce: torch.Tensor, kd: torch.Tensor, kappa: float = 0.5) -> torch.Tensor:
    """``(1 - kappa) * ce + kappa * kd``."""
    return (1.0 - kappa) * ce + kappa * kd


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 connected to the graph of every given tensor (the loss of an empty batch)."""
    out = None
    for t in tensors:
        term = t.sum() * 0.0
        out = term if out is None else out + term
    return out.float()


def _check_pair(student: KDSide, teacher: KDSide) -> None:
    if student.logits.shape[0] != teacher.logits.shape[0]:
        raise PrefkdError(
            f"the student batch has {student.logits.shape[0]} rows and the teacher batch "
            f"{teacher.logits.shape[0]}; KD needs both views of the same responses in the same order."
        )


def _prediction_mask(side: KDSide) -> torch.Tensor:
    """[B, T] bool: position t predicts a target token (target_mask[t + 1] is set)."""
    tm = side.target_mask > 0
    out = torch.zeros_like(tm)
    out[:, :-1] = tm[:, 1:]
    return out


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row KL(softmax(p / T) || softmax(q / T)), float32, clamped at 0 (rounding)."""
    logp = F.log_softmax(p_logits.float() / temperature, dim=-1)
    logq = F.log_softmax(q_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


# ---------------------------------------------------------------------------------------------------------
# Position pairing
# ---------------------------------------------------------------------------------------------------------


def _unit_starts(side: KDSide):
    """(row, unit, prediction position) for the first token of every unit on this side."""
    u = side.unit_ids.long()
    tm = side.target_mask > 0
    prev = torch.full_like(u, -2)
    prev[:, 1:] = u[:, :-1]
    start = (u >= 0) & tm & (u != prev)
    start[:, 0] = False  # nothing predicts position 0
    rows, cols = start.nonzero(as_tuple=True)
    return rows, u[rows, cols], cols - 1


def aligned_unit_predictions(student: KDSide, teacher: KDSide):
    """Pairs of comparable predictions: ``(row, student position, teacher position)`` (LongTensors).

    One pair per unit (span or EOS) present on both sides: each side's prediction made just before
    the first token of that unit (see the module docstring for why these, and only these, match).
    """
    _check_pair(student, teacher)
    device = student.logits.device
    rs, us, ps = _unit_starts(student)
    rt, ut, pt = _unit_starts(teacher)
    rt, ut, pt = rt.to(device), ut.to(device), pt.to(device)
    rs, us, ps = rs.to(device), us.to(device), ps.to(device)
    if us.numel() == 0 or ut.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    rows = student.unit_ids.shape[0]
    width = int(torch.maximum(us.max(), ut.max())) + 1
    big = torch.iinfo(torch.long).max

    def table(r, u, p):
        flat = torch.full((rows * width,), big, dtype=torch.long, device=device)
        flat.scatter_reduce_(0, r * width + u, p, reduce="amin")
        return flat.view(rows, width)

    ts, tt = table(rs, us, ps), table(rt, ut, pt)
    b, k = ((ts != big) & (tt != big)).nonzero(as_tuple=True)
    return b, ts[b, k], tt[b, k]


def _response_order(side: KDSide):
    """[B, R] prediction positions of each row in response order (-1 padded) and their count [B]."""
    m = _prediction_mask(side)
    count = m.sum(1)
    width = int(count.max()) if m.numel() else 0
    table = torch.full((m.shape[0], max(width, 1)), -1, dtype=torch.long, device=m.device)
    rows, cols = m.nonzero(as_tuple=True)
    rank = m.long().cumsum(1) - 1
    table[rows, rank[rows, cols]] = cols
    return table, count


def ordered_response_predictions(student: KDSide, teacher: KDSide):
    """ULD pairing: the i-th response prediction of each side, i < min of the two lengths."""
    _check_pair(student, teacher)
    device = student.logits.device
    ts, cs = _response_order(student)
    tt, ct = _response_order(teacher)
    tt, ct = tt.to(device), ct.to(device)
    n = torch.minimum(cs, ct)
    width = min(ts.shape[1], tt.shape[1])
    keep = torch.arange(width, device=device)[None, :] < n[:, None]
    b, i = keep.nonzero(as_tuple=True)
    return b, ts[b, i], tt[b, i]


# ---------------------------------------------------------------------------------------------------------
# ULD
# ---------------------------------------------------------------------------------------------------------


class ULD(KDLoss):
    """Universal Logit Distillation (Boizard et al. 2024).

    Per paired position: the closed-form Wasserstein-1 distance the paper uses, i.e. the L1 distance
    between the two probability vectors sorted in decreasing order, the smaller vocabulary padded
    with zeros: ``sum_k |sort(p_s)_k - sort(p_t)_k|``. Positions are paired by order within the
    response (i-th with i-th, up to the shorter response). ``p = softmax(logits / T)`` on both sides;
    no T^2 factor. Mean over paired positions.
    """

    name = "uld"

    def forward(self, student: KDSide, teacher: KDSide):
        b, ps, pt = ordered_response_predictions(student, teacher)
        if b.numel() == 0:
            return _zero(student.logits), {"kd": 0.0, "kd_positions": 0}
        dev_t = teacher.logits.device
        zt = teacher.logits.detach()[b.to(dev_t), pt.to(dev_t)].to(student.logits.device)
        s = torch.softmax(student.logits[b, ps].float() / self.temperature, dim=-1)
        t = torch.softmax(zt.float() / self.temperature, dim=-1)
        common = min(s.shape[-1], t.shape[-1])
        # Only the largest `common` probabilities of the larger vocabulary meet a non-padding entry;
        # its remaining tail meets the zero padding and enters as one sum. (topk is ~3x faster than a
        # full sort of a 150k vocabulary and gives the same value and gradient.)
        s_top = s.topk(common, dim=-1, sorted=True).values
        t_top = t.topk(common, dim=-1, sorted=True).values
        dist = (s_top - t_top).abs().sum(-1)
        dist = dist + (s.sum(-1) - s_top.sum(-1)) + (t.sum(-1) - t_top.sum(-1))
        loss = dist.mean()
        return loss, {"kd": float(loss.detach()), "kd_positions": int(b.numel())}


# ---------------------------------------------------------------------------------------------------------
# Token strings of a vocabulary
# ---------------------------------------------------------------------------------------------------------


def normalize_piece(piece: str) -> bytes:
    """A vocabulary piece as the bytes it stands for, for plain ``{piece: id}`` vocabularies.

    SentencePiece ``'▁'`` and byte-level ``'Ġ'`` space markers become a space; SentencePiece byte
    tokens ``<0xNN>`` become that byte; everything else is UTF-8 encoded as is. (Real tokenizers go
    through ``prefkd.align.ByteVocab`` instead, which decodes every piece exactly.)
    """
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").replace("\u0120", " ").encode("utf-8")


def _vocab_list(vocab: Mapping[str, int]) -> list[bytes]:
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
        from prefkd.align import ByteVocab

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


# ---------------------------------------------------------------------------------------------------------
# MinED: the minimum-edit-distance vocabulary map
# ---------------------------------------------------------------------------------------------------------

MINED_ALGORITHM_VERSION = "mined-v1"
_MINED_CACHE: dict[str, torch.Tensor] = {}


class _StudentIndex:
    """The candidate student tokens, sorted by byte length (then id), for the edit-distance search."""

    def __init__(self, student: Sequence[bytes], excluded: Iterable[int]):
        excluded = set(excluded)
        ids = np.array([i for i, b in enumerate(student) if b and i not in excluded], dtype=np.int64)
        if ids.size == 0:
            raise PrefkdError("the student vocabulary has no candidate tokens to map teacher tokens onto.")
        lens = np.array([len(student[i]) for i in ids], dtype=np.int64)
        order = np.lexsort((ids, lens))
        self.ids, self.lens = ids[order], lens[order]
        n = len(self.ids)
        self.max_len = int(self.lens.max())
        flat = np.frombuffer(b"".join(student[i] for i in self.ids.tolist()), dtype=np.uint8)
        row = np.repeat(np.arange(n, dtype=np.int64), self.lens)
        starts = np.cumsum(self.lens) - self.lens
        col = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, self.lens)
        self.mat = np.full((n, self.max_len), -1, dtype=np.int16)  # -1 pads never equal a byte
        self.mat[row, col] = flat
        # byte histograms, byte-major so that one byte's row over a length band is contiguous
        key, cnt = np.unique(flat.astype(np.int64) * n + row, return_counts=True)
        self.counts = np.zeros(256 * n, dtype=np.uint8)
        self.counts[key] = np.minimum(cnt, 255)
        self.counts = self.counts.reshape(256, n)
        # first column of every length 0..max_len + 1
        self.len_start = np.searchsorted(self.lens, np.arange(self.max_len + 2), side="left")
        self.exact: dict[bytes, int] = {}
        for i in self.ids.tolist():  # sorted by (len, id): equal strings meet smallest id first
            self.exact.setdefault(student[i], i)

    def band(self, lo_len: int, hi_len: int) -> tuple[int, int]:
        lo_len = min(max(lo_len, 0), self.max_len + 1)
        hi_len = min(max(hi_len, -1), self.max_len)
        if hi_len < lo_len:
            return 0, 0
        return int(self.len_start[lo_len]), int(self.len_start[hi_len + 1])


def _edit_distances(query: bytes, mat: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Levenshtein distance between ``query`` and every row of ``mat`` (padded with -1), row lengths ``lens``.

    One dynamic-programming row per query byte, vectorised over candidates; the insertion chain
    inside a row is a running minimum (``min_k D[k] + (j - k)`` = cummin(D - j) + j).
    """
    m, width = mat.shape
    ar = np.arange(width + 1, dtype=np.int32)
    d = np.broadcast_to(ar, (m, width + 1)).copy()
    new = np.empty_like(d)
    for i, byte in enumerate(query):
        cost = (mat != byte).astype(np.int32)
        new[:, 0] = i + 1
        np.minimum(d[:, 1:] + 1, d[:, :-1] + cost, out=new[:, 1:])
        d = np.minimum.accumulate(new - ar, axis=1) + ar
    return d[np.arange(m), lens]


def _nearest_student(query: bytes, index: _StudentIndex) -> int:
    """The student id closest to ``query`` by byte edit distance (ties: a prefix, then a substring, then the lowest id).

    1. Every substring of the query that is a student token gives an upper bound (its distance is the
       number of deleted bytes); the best is kept with the tie-break above.
    2. Only candidates that could be strictly closer are examined: their length must be within
       ``d - 1`` of the query's (distance >= length difference) and their byte-histogram bound
       ``max(n, len) - |common bytes|`` must be below ``d``. The survivors get an exact DP.
    The result is the exact minimum edit distance; the restriction only skips hopeless candidates.
    """
    n = len(query)
    best = (math.inf, 2, -1)
    for a in range(n):
        for b in range(n, a, -1):  # longest first: for a fixed start it is the closest
            sid = index.exact.get(query[a:b])
            if sid is not None:
                best = min(best, (n - (b - a), int(a > 0), sid))
                break
    d1 = best[0]
    if d1 <= 1:  # nothing but an exact match (handled by the caller) could be closer
        return best[2]
    lo, hi = index.band(n - d1 + 1 if d1 != math.inf else 0, n + d1 - 1 if d1 != math.inf else index.max_len)
    if hi <= lo:
        return best[2]
    common = np.zeros(hi - lo, dtype=np.int16)
    for byte, cnt in Counter(query).items():
        common += np.minimum(index.counts[byte, lo:hi], cnt)
    bound = np.maximum(index.lens[lo:hi], n) - common
    surv = np.nonzero(bound < d1)[0] + lo
    if surv.size == 0:
        return best[2]
    lens = index.lens[surv]
    dist = _edit_distances(query, index.mat[surv, : int(lens.max())], lens)
    key = dist.astype(np.int64) * (int(index.ids.max()) + 1) + index.ids[surv]
    j = int(np.argmin(key))
    if dist[j] < d1:
        return int(index.ids[surv][j])
    return best[2]


def _fingerprint(*parts) -> str:
    h = hashlib.sha256(MINED_ALGORITHM_VERSION.encode())
    for part in parts:
        if isinstance(part, (list, tuple)) and part and isinstance(part[0], bytes):
            for b in part:
                h.update(len(b).to_bytes(4, "little") + b)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00|")
    return h.hexdigest()[:20]


def mined_map_from_token_bytes(
    teacher: Sequence[bytes],
    student: Sequence[bytes],
    fixed: Mapping[int, int] | None = None,
    student_excluded: Iterable[int] = (),
    cache_dir: str | Path | None = None,
) -> torch.LongTensor:
    """``map[teacher_id] = student_id`` from the byte strings of both vocabularies.

    ``fixed`` pins some teacher ids (special tokens); ``student_excluded`` ids are never targets
    (the student's special tokens). Every other teacher token maps to the identical student string
    when there is one (lowest id among duplicates), otherwise to the student token at the minimum
    byte edit distance (see ``_nearest_student``: exact minimum, searched with length and
    byte-histogram pruning; ties prefer a student token that is a prefix of the teacher token --
    what the student would emit first for that text --, then a substring, then the lowest id).
    Results are cached in memory by a fingerprint of the inputs, and on disk under ``cache_dir``
    (``mined-<fingerprint>.npy``) when given.
    """
    fixed = dict(fixed or {})
    excluded = sorted(set(student_excluded))
    key = _fingerprint(list(teacher), list(student), sorted(fixed.items()), excluded)
    if key in _MINED_CACHE:
        return _MINED_CACHE[key].clone()
    path = Path(cache_dir) / f"mined-{key}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        out = torch.from_numpy(np.load(path)).long()
        _MINED_CACHE[key] = out
        return out.clone()
    index = _StudentIndex(student, excluded)
    out = np.full(len(teacher), NO_ID, dtype=np.int64)
    for tid, piece in enumerate(teacher):
        if tid in fixed:
            out[tid] = fixed[tid]
            continue
        sid = index.exact.get(piece)
        out[tid] = sid if sid is not None else _nearest_student(piece, index)
    if (out < 0).any() or (out >= len(student)).any():
        raise PrefkdError("the MinED map has ids outside the student vocabulary; check the fixed special-token map.")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
    result = torch.from_numpy(out)
    _MINED_CACHE[key] = result
    return result.clone()


def mined_map_from_vocabs(
    teacher_vocab: Mapping[str, int],
    student_vocab: Mapping[str, int],
    fixed: Mapping[int, int] | None = None,
    student_excluded: Iterable[int] = (),
) -> torch.LongTensor:
    """``mined_map_from_token_bytes`` for plain ``{piece: id}`` vocabularies (pieces normalised by ``normalize_piece``)."""
    return mined_map_from_token_bytes(_vocab_list(teacher_vocab), _vocab_list(student_vocab), fixed, student_excluded)


def _special_maps(teacher: TokenizerStrings, student: TokenizerStrings) -> dict[int, int]:
    """Teacher special ids -> student ids: EOS -> EOS; a special with the same string -> that student
    special; any other special (BOS, PAD, control tokens, which carry ~no probability inside a
    response) -> the student EOS (they all end or interrupt the response text)."""
    if student.eos_id is None:
        raise PrefkdError("the student tokenizer has no EOS token; MinED needs one to map the teacher's special tokens.")
    by_string = {student.pieces[i]: i for i in sorted(student.special) if i < len(student.pieces)}
    fixed = {}
    for tid in sorted(teacher.special):
        if tid >= len(teacher.pieces):
            continue
        if tid == teacher.eos_id:
            fixed[tid] = student.eos_id
        else:
            fixed[tid] = by_string.get(teacher.pieces[tid], student.eos_id)
    return fixed


def build_mined_map(teacher_tokenizer, student_tokenizer, cache_dir: str | Path | None = None) -> torch.LongTensor:
    """The MinED teacher -> student id map of two Hugging Face (fast) tokenizers: LongTensor [V_teacher].

    Token strings are the exact bytes each id stands for (``prefkd.align.ByteVocab``: SentencePiece
    ``'▁'`` and byte-level ``'Ġ'`` become spaces, byte-fallback ``<0xNN>`` and byte-level pieces become
    their bytes), so Mistral's ``'▁the'`` and Qwen's ``'Ġthe'`` are the same string ``b' the'``.
    Special/added teacher tokens are pinned (``_special_maps``); student special/added tokens are never
    targets except the EOS. See ``mined_map_from_token_bytes`` for the rest.
    """
    t = TokenizerStrings.from_tokenizer(teacher_tokenizer)
    s = TokenizerStrings.from_tokenizer(student_tokenizer)
    return mined_map_from_token_bytes(t.pieces, s.pieces, _special_maps(t, s), s.special, cache_dir)


class MinED(KDLoss):
    """KD through a static minimum-edit-distance vocabulary map (FuseLLM / DSKD's MinED baseline).

    At every aligned unit-start pair (``aligned_unit_predictions``) the teacher distribution
    ``softmax(z_t / T)`` is projected onto the student vocabulary by adding each teacher token's
    probability onto its mapped student id (so it stays a distribution), and the loss is
    ``T^2 * KL(p_t mapped || softmax(z_s / T))``, averaged over aligned pairs. Teacher logit
    columns beyond the map (padding rows of an embedding matrix) are dropped.
    """

    name = "mined"

    def __init__(self, teacher_to_student: torch.Tensor, temperature: float = 2.0):
        super().__init__(temperature)
        mapping = torch.as_tensor(teacher_to_student, dtype=torch.long)
        if mapping.dim() != 1 or mapping.numel() == 0 or int(mapping.min()) < 0:
            raise PrefkdError("the MinED map must be a non-empty 1-D tensor of student ids (>= 0).")
        self.register_buffer("teacher_to_student", mapping, persistent=False)
        self.max_student_id = int(mapping.max())

    def project(self, teacher_logits: torch.Tensor, student_vocab: int) -> torch.Tensor:
        """Teacher probabilities (rows of ``teacher_logits``) moved onto the student vocabulary: [N, V_s]."""
        if self.max_student_id >= student_vocab:
            raise PrefkdError(f"the MinED map points at student id {self.max_student_id} but the student has {student_vocab} logits.")
        mapping = self.teacher_to_student.to(teacher_logits.device)
        v = min(teacher_logits.shape[-1], mapping.numel())
        mapping = mapping[:v]
        p = torch.softmax(teacher_logits[:, :v].float() / self.temperature, dim=-1)
        return torch.zeros(p.shape[0], student_vocab, dtype=p.dtype, device=p.device).index_add_(1, mapping, p)

    def forward(self, student: KDSide, teacher: KDSide):
        b, ps, pt = aligned_unit_predictions(student, teacher)
        if b.numel() == 0:
            return _zero(student.logits), {"kd": 0.0, "kd_positions": 0}
        dev_t = teacher.logits.device
        zt = teacher.logits.detach()[b.to(dev_t), pt.to(dev_t)].to(student.logits.device)
        zs = student.logits[b, ps].float()
        p = self.project(zt, zs.shape[-1])
        logq = F.log_softmax(zs / self.temperature, dim=-1)
        kl = (torch.xlogy(p, p) - p * logq).sum(-1).clamp_min(0.0)
        loss = kl.mean() * self.temperature**2
        return loss, {"kd": float(loss.detach()), "kd_positions": int(b.numel())}


# ---------------------------------------------------------------------------------------------------------
# CDM: contextual dynamic mapping
# ---------------------------------------------------------------------------------------------------------


def _padded_strings(pieces: Sequence[bytes], drop: Iterable[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, width] int16 bytes with ASCII spaces removed (pad -1) and lengths [V] (-1: no string)."""
    drop = set(drop)
    mat = np.full((len(pieces), width), -1, dtype=np.int16)
    lens = np.full(len(pieces), -1, dtype=np.int64)
    for i, piece in enumerate(pieces):
        if i in drop:
            continue
        raw = piece.replace(b" ", b"")[:width]
        lens[i] = len(raw)
        mat[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return torch.from_numpy(mat), torch.from_numpy(lens)


def _exact_map(src: Sequence[bytes], dst: Sequence[bytes], src_special: set[int], dst_special: set[int]) -> torch.Tensor:
    index: dict[bytes, int] = {}
    for i, piece in enumerate(dst):
        if piece and i not in dst_special:
            index.setdefault(piece, i)
    out = [NO_ID if (i in src_special or not piece) else index.get(piece, NO_ID) for i, piece in enumerate(src)]
    return torch.tensor(out, dtype=torch.long)


def normalized_edit_distance(a: torch.Tensor, la: torch.Tensor, b: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """``lev(a_p, b_p) / (|a_p| + |b_p|)`` for pairs of byte strings a: [P, La], b: [P, Lb] (pad -1), lengths la, lb: [P].

    0 when both strings are empty; +inf where either has no string (length -1). One DP row per
    byte of ``a``, vectorised over pairs; the insertion chain is a running minimum.
    """
    pairs, width = b.shape
    ar = torch.arange(width + 1, device=b.device, dtype=torch.int32)
    d = ar.expand(pairs, width + 1).clone()
    b = torch.where(b < 0, torch.full_like(b, -2), b)  # pads of a and b never match each other
    first = torch.empty(pairs, 1, dtype=torch.int32, device=b.device)
    for i in range(a.shape[1]):
        active = (i < la).unsqueeze(-1)
        if not bool(active.any()):
            break
        cost = (b != a[:, i : i + 1]).to(torch.int32)
        tmp = torch.minimum(d[:, 1:] + 1, d[:, :-1] + cost)
        new = torch.cat([first.fill_(i + 1), tmp], dim=-1)
        new = torch.cummin(new - ar, dim=-1).values + ar
        d = torch.where(active, new, d)
    dist = d.gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1).float()
    total = (la + lb).float()
    out = torch.where(total > 0, dist / total.clamp_min(1.0), torch.zeros_like(dist))
    return out.masked_fill((la < 0) | (lb < 0), math.inf)


class CDM(KDLoss):
    """Contextual Dynamic Mapping (Chen et al. 2025), a documented simplification.

    What is kept from the paper: (1) the vocabulary mapping is done per aligned position on the
    top-k candidates of both distributions; a candidate with an exact string counterpart in the
    other vocabulary uses it, and a candidate without one is mapped *dynamically*, in context, to
    the most similar token among the other model's top-k at that same position (normalised edit
    distance ``lev(a, b) / (|a| + |b|)`` on the strings with spaces removed, below ``threshold``;
    ties: the more probable candidate); unmatched candidates are dropped. (2) Both directions:
    teacher top-k mapped to student ids and student top-k mapped to teacher ids; the union of the
    matched (teacher id, student id) pairs (each pair once) is the support of the loss,
    ``T^2 * KL(softmax(z_t[pairs] / T) || softmax(z_s[pairs] / T))``, i.e. both distributions
    renormalised over the matched pairs, averaged over positions with at least one pair.

    What is simplified: the sequence alignment. The paper aligns the two token sequences with
    entropy-weighted dynamic time warping; here the exact byte spans of the shards give the
    pairs directly (``aligned_unit_predictions``: one pair per aligned unit start), which is exact
    where DTW is approximate but skips predictions inside multi-token spans. Strings longer than
    ``max_token_bytes`` (16) are compared on their first 16 bytes. Special tokens are only matched
    EOS <-> EOS. ``topk`` = 100 and ``threshold`` = 0.1 are our defaults (configurable).
    """

    name = "cdm"

    def __init__(
        self,
        teacher_strings: TokenizerStrings,
        student_strings: TokenizerStrings,
        temperature: float = 2.0,
        topk: int = 100,
        threshold: float = 0.1,
        max_token_bytes: int = 16,
        chunk: int = 65536,
    ):
        super().__init__(temperature)
        self.topk, self.threshold, self.chunk = int(topk), float(threshold), int(chunk)
        t, s = teacher_strings, student_strings
        t2s = _exact_map(t.pieces, s.pieces, t.special, s.special)
        s2t = _exact_map(s.pieces, t.pieces, s.special, t.special)
        if t.eos_id is not None and s.eos_id is not None:
            t2s[t.eos_id] = s.eos_id
            s2t[s.eos_id] = t.eos_id
        tmat, tlen = _padded_strings(t.pieces, t.special, max_token_bytes)
        smat, slen = _padded_strings(s.pieces, s.special, max_token_bytes)
        for name, value in (("t2s", t2s), ("s2t", s2t), ("t_mat", tmat), ("t_len", tlen), ("s_mat", smat), ("s_len", slen)):
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def from_tokenizers(cls, teacher_tokenizer, student_tokenizer, **kwargs) -> "CDM":
        return cls(TokenizerStrings.from_tokenizer(teacher_tokenizer), TokenizerStrings.from_tokenizer(student_tokenizer), **kwargs)

    @classmethod
    def from_vocabs(cls, teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int], **kwargs) -> "CDM":
        t = TokenizerStrings(_vocab_list(teacher_vocab), set(), None)
        s = TokenizerStrings(_vocab_list(student_vocab), set(), None)
        return cls(t, s, **kwargs)

    @staticmethod
    def _lookup(table: torch.Tensor, ids: torch.Tensor, fill) -> torch.Tensor:
        """``table[ids]`` with ids beyond the table (padding rows of a model's vocab) giving ``fill``."""
        inside = ids < table.shape[0]
        out = table[ids.clamp_max(table.shape[0] - 1)]
        if out.dim() > ids.dim():
            return torch.where(inside.unsqueeze(-1), out, torch.full_like(out, fill))
        return torch.where(inside, out, torch.full_like(out, fill))

    def _map(self, src_top, dst_top, exact, src_mat, src_len, dst_mat, dst_len):
        """Map every src top-k id to a dst id: exact, else the closest dst top-k id in context, else -1.

        Edit distances are only computed for (candidate, context token) pairs that can pass the
        threshold at all: ``lev >= ||a| - |b||``, so pairs with ``||a| - |b|| >= threshold * (|a| + |b|)``
        are skipped, and each distinct pair of ids is computed once.
        """
        out = self._lookup(exact, src_top, NO_ID)
        rows, cols = (out < 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return out
        src = src_top[rows, cols].unsqueeze(-1).expand(-1, dst_top.shape[-1])  # [U, K]
        cand = dst_top[rows]  # [U, K]
        la, lb = self._lookup(src_len, src, -1), self._lookup(dst_len, cand, -1)
        total = (la + lb).float()
        possible = (la >= 0) & (lb >= 0) & (((la - lb).abs().float() < self.threshold * total) | (total == 0))
        dist = torch.full(cand.shape, math.inf, device=cand.device)
        if bool(possible.any()):
            width = max(int(cand.max()), int(src.max())) + 1
            keys, inverse = torch.unique(src[possible] * width + cand[possible], return_inverse=True)
            pair_src, pair_dst = keys // width, keys % width
            values = torch.empty(keys.numel(), device=cand.device)
            for start in range(0, keys.numel(), self.chunk):
                ps_, pd_ = pair_src[start : start + self.chunk], pair_dst[start : start + self.chunk]
                values[start : start + self.chunk] = normalized_edit_distance(
                    self._lookup(src_mat, ps_, -1), self._lookup(src_len, ps_, -1),
                    self._lookup(dst_mat, pd_, -1), self._lookup(dst_len, pd_, -1),
                )
            dist[possible] = values[inverse]
        best, j = dist.min(dim=-1)  # first minimum: the most probable of equally close candidates
        hit = best < self.threshold
        out[rows[hit], cols[hit]] = cand[hit, j[hit]]
        return out

    def forward(self, student: KDSide, teacher: KDSide):
        b, ps, pt = aligned_unit_predictions(student, teacher)
        if b.numel() == 0:
            return _zero(student.logits), {"kd": 0.0, "kd_positions": 0, "kd_matched": 0.0}
        dev_t = teacher.logits.device
        zt = teacher.logits.detach()[b.to(dev_t), pt.to(dev_t)].to(student.logits.device).float()
        zs = student.logits[b, ps].float()
        k = min(self.topk, zt.shape[-1], zs.shape[-1])
        t_top = zt.topk(k, dim=-1).indices
        s_top = zs.detach().topk(k, dim=-1).indices
        with torch.no_grad():
            fwd = self._map(t_top, s_top, self.t2s, self.t_mat, self.t_len, self.s_mat, self.s_len)  # teacher cands -> student ids
            rev = self._map(s_top, t_top, self.s2t, self.s_mat, self.s_len, self.t_mat, self.t_len)  # student cands -> teacher ids
            vocab_s = zs.shape[-1]
            key_f = torch.where(fwd >= 0, t_top * vocab_s + fwd, torch.full_like(fwd, -1))
            key_r = torch.where(rev >= 0, rev * vocab_s + s_top, torch.full_like(rev, -2))
            dup = (key_r.unsqueeze(-1) == key_f.unsqueeze(-2)).any(-1)
            t_ids = torch.cat([t_top, rev.clamp_min(0)], dim=-1)
            s_ids = torch.cat([fwd.clamp_min(0), s_top], dim=-1)
            valid = torch.cat([fwd >= 0, (rev >= 0) & ~dup], dim=-1)
            # ids of tokenizer entries the model has no logit for (a head smaller than the tokenizer)
            valid &= (t_ids < zt.shape[-1]) & (s_ids < vocab_s)
            t_ids, s_ids = t_ids.clamp_max(zt.shape[-1] - 1), s_ids.clamp_max(vocab_s - 1)
        keep = valid.any(-1)
        matched = float(torch.cat([fwd >= 0, rev >= 0], -1).float().mean())
        if not bool(keep.any()):
            return _zero(student.logits), {"kd": 0.0, "kd_positions": 0, "kd_matched": matched}
        neg = torch.finfo(torch.float32).min / 4  # finite: exp() is 0, differences stay finite
        at = (zt.gather(-1, t_ids) / self.temperature).masked_fill(~valid, neg)[keep]
        as_ = (zs.gather(-1, s_ids) / self.temperature).masked_fill(~valid, neg)[keep]
        valid = valid[keep]
        logp = F.log_softmax(at, dim=-1)
        logq = F.log_softmax(as_, dim=-1)
        kl = torch.where(valid, logp.exp() * (logp - logq), torch.zeros_like(logp)).sum(-1).clamp_min(0.0)
        loss = kl.mean() * self.temperature**2
        return loss, {"kd": float(loss.detach()), "kd_positions": int(keep.sum()), "kd_matched": matched}


# ---------------------------------------------------------------------------------------------------------
# DSKD with cross-model attention
# ---------------------------------------------------------------------------------------------------------


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` with the head's parameters detached (no gradient into the head), float32 out."""
    weight = head.weight.detach()
    bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
    return F.linear(hidden.to(weight.device, weight.dtype), weight, bias).float().to(hidden.device)


def _embedder(embed, head) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids -> embeddings (on the ids' device): the given embedding module, else the head's weight rows."""
    if embed is not None:
        weight = getattr(embed, "weight", None)

        def lookup(ids):
            moved = ids.to(weight.device) if weight is not None else ids
            return embed(moved).to(ids.device)

        return lookup
    return lambda ids: head.weight[ids.to(head.weight.device)].to(ids.device)


class DSKD(KDLoss):
    """Dual-Space KD with Cross-Model Attention (Zhang et al. 2024), for different vocabularies.

    Trainable here (``self.parameters()``): ``query`` (2 d_s -> 2 d_t), ``t2s`` (d_t -> d_s) and
    ``s2t`` (d_s -> d_t), plain linear projectors as in the paper's default configuration. The
    heads are used but never trained by this term (their weights are detached; they are not
    registered as submodules, so ``.parameters()`` holds the projectors only).

    Cross-model attention over the prediction positions of each row (student i, teacher j; a
    position's *index embedding* is [embedding of its input token; embedding of its target token],
    i.e. of tokens t and t + 1):

    * query ``q_i = W_q [e_s(x_i); e_s(y_i)]``, key ``k_j = [e_t(x_j); e_t(y_j)] / std`` (the paper
      normalises the teacher side instead of projecting it), score ``q_i k_j / sqrt(2 d_t)``,
      masked to the response predictions of the same row;
    * student space: ``h_t->s_i = sum_j softmax_j(score) W_t2s(h_t_j / std + e_t(y_j) / std)``,
      logits through the STUDENT head; ``CE(t->s logits, student targets)`` trains the projectors and
      ``T^2 KL(softmax(t->s / T) (detached) || softmax(z_s / T))`` distils into the student, on the
      positions where the projected teacher already predicts the target (``accuracy_gate``, as in the
      authors' release; off: all positions);
    * teacher space: ``h_s->t_j = sum_i softmax_i(score) W_s2t(h_s_i)``, logits through the (frozen)
      TEACHER head, ``T^2 KL(softmax(z_t / T) || softmax(s->t / T))`` -- the gradient reaches the
      student hidden states and the projectors, not the teacher head.

    KD = CE_t->s + KL_student-space + KL_teacher-space, each a mean over its response predictions
    (the gated KL is averaged over all student predictions, ungated ones contributing 0).

    Embeddings: pass ``student_embed`` / ``teacher_embed`` (the models' input embedding modules, as
    the paper uses) when available; otherwise each model's head weight rows serve as token
    embeddings (identical for tied-embedding models such as small Qwen2.5). They get no gradient.
    """

    name = "dskd"

    def __init__(
        self,
        student_head: torch.nn.Module,
        teacher_head: torch.nn.Module,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        temperature: float = 2.0,
        student_embed=None,
        teacher_embed=None,
        accuracy_gate: bool = True,
    ):
        super().__init__(temperature)
        if student_head is None or teacher_head is None:
            raise PrefkdError("DSKD needs the student and teacher LM heads (student_head=, teacher_head=).")
        ds = int(student_dim or student_head.weight.shape[1])
        dt = int(teacher_dim or teacher_head.weight.shape[1])
        if student_head.weight.shape[1] != ds or teacher_head.weight.shape[1] != dt:
            raise PrefkdError(
                f"DSKD dims ({ds}, {dt}) do not match the heads' input sizes "
                f"({student_head.weight.shape[1]}, {teacher_head.weight.shape[1]})."
            )
        self.student_dim, self.teacher_dim = ds, dt
        self.accuracy_gate = bool(accuracy_gate)
        self.query = torch.nn.Linear(2 * ds, 2 * dt)
        self.t2s = torch.nn.Linear(dt, ds)
        self.s2t = torch.nn.Linear(ds, dt)
        # a plain tuple: not registered, so neither moved, saved nor returned by .parameters()
        self._frozen = (student_head, teacher_head, _embedder(student_embed, student_head), _embedder(teacher_embed, teacher_head))

    @staticmethod
    def _std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sel = x[mask]
        return sel.float().std().clamp_min(1e-6) if sel.numel() > 1 else torch.ones((), device=x.device)

    def forward(self, student: KDSide, teacher: KDSide):
        _check_pair(student, teacher)
        if student.hidden is None or teacher.hidden is None:
            raise PrefkdError("DSKD needs the final hidden states of both models (KDSide.hidden).")
        s_head, t_head, s_embed, t_embed = self._frozen
        dev = self.query.weight.device
        dtype = self.query.weight.dtype
        ms = _prediction_mask(student).to(dev)
        mt = _prediction_mask(teacher).to(dev)
        ns, nt = int(ms.sum()), int(mt.sum())
        if ns == 0 or nt == 0:
            zero = _zero(student.logits, student.hidden, *self.parameters())
            return zero, {"kd": 0.0, "kd_t2s_ce": 0.0, "kd_t2s_kl": 0.0, "kd_s2t_kl": 0.0, "kd_t2s_acc": 0.0}

        def index_embeds(side: KDSide, mask, embed):
            ids = side.input_ids.to(dev)
            x = torch.where(mask, ids, torch.zeros_like(ids))
            y = torch.zeros_like(ids)
            y[:, :-1] = torch.where(mask[:, :-1], ids[:, 1:], torch.zeros_like(ids[:, 1:]))
            with torch.no_grad():
                ex, ey = embed(x).detach().to(dev, dtype), embed(y).detach().to(dev, dtype)
            return torch.cat([ex, ey], dim=-1), ey, y

        s_index, _, s_target = index_embeds(student, ms, s_embed)
        t_index, t_target_emb, _ = index_embeds(teacher, mt, t_embed)
        hs = student.hidden.to(dev, dtype)
        ht = teacher.hidden.detach().to(dev, dtype)

        q = self.query(s_index)  # [B, Ts, 2 dt]
        k = t_index / self._std(t_index, mt)  # [B, Tt, 2 dt]
        v_t2s = self.t2s(ht / self._std(ht, mt) + t_target_emb / self._std(t_target_emb, mt))  # [B, Tt, ds]
        v_s2t = self.s2t(hs)  # [B, Ts, dt]
        score = q.float() @ k.float().transpose(1, 2) / math.sqrt(2 * self.teacher_dim)  # [B, Ts, Tt]
        allowed = ms.unsqueeze(2) & mt.unsqueeze(1)
        score = score.masked_fill(~allowed, torch.finfo(torch.float32).min)

        # student space: teacher -> student
        t2s_h = torch.softmax(score, dim=-1) @ v_t2s.float()  # [B, Ts, ds]
        t2s_logits = _head_logits(s_head, t2s_h[ms])  # [Ns, Vs]
        targets = s_target[ms]
        t2s_ce = F.cross_entropy(t2s_logits, targets)
        correct = (t2s_logits.argmax(-1) == targets).float()
        zs = student.logits.to(dev)[ms]
        if zs.shape[-1] != t2s_logits.shape[-1]:
            raise PrefkdError(f"the student head gives {t2s_logits.shape[-1]} logits but the student logits have {zs.shape[-1]}.")
        gate = correct if self.accuracy_gate else torch.ones_like(correct)
        t2s_kl = (_kl_rows(t2s_logits.detach(), zs, self.temperature) * gate).mean() * self.temperature**2

        # teacher space: student -> teacher
        s2t_h = torch.softmax(score.transpose(1, 2), dim=-1) @ v_s2t.float()  # [B, Tt, dt]
        s2t_logits = _head_logits(t_head, s2t_h[mt])  # [Nt, Vt]
        zt = teacher.logits.detach().to(dev)[mt]
        if zt.shape[-1] != s2t_logits.shape[-1]:
            raise PrefkdError(f"the teacher head gives {s2t_logits.shape[-1]} logits but the teacher logits have {zt.shape[-1]}.")
        s2t_kl = _kl_rows(zt, s2t_logits, self.temperature).mean() * self.temperature**2

        loss = t2s_ce + t2s_kl + s2t_kl
        metrics = {
            "kd": float(loss.detach()),
            "kd_t2s_ce": float(t2s_ce.detach()),
            "kd_t2s_kl": float(t2s_kl.detach()),
            "kd_s2t_kl": float(s2t_kl.detach()),
            "kd_t2s_acc": float(correct.mean()),
        }
        return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------


def build_kd(
    name: str,
    temperature: float = 2.0,
    teacher_tokenizer=None,
    student_tokenizer=None,
    student_head=None,
    teacher_head=None,
    student_dim=None,
    teacher_dim=None,
    **options,
) -> KDLoss:
    """A KD term by name: ``dskd`` (needs the heads), ``uld``, ``mined`` and ``cdm`` (need both tokenizers).

    Extra ``options`` (anything else is an error): mined -> ``cache_dir``; cdm -> ``topk``,
    ``threshold``, ``max_token_bytes``, ``chunk``; dskd -> ``student_embed``, ``teacher_embed``,
    ``accuracy_gate``.
    """
    key = str(name).lower()
    allowed = {
        "uld": set(),
        "mined": {"cache_dir"},
        "cdm": {"topk", "threshold", "max_token_bytes", "chunk"},
        "dskd": {"student_embed", "teacher_embed", "accuracy_gate"},
    }
    if key not in allowed:
        raise PrefkdError(f"the KD term must be one of {', '.join(KD_NAMES)}, got {name!r}.")
    unknown = sorted(set(options) - allowed[key])
    if unknown:
        raise PrefkdError(f"the {key} KD term has no option {unknown[0]!r}; its options are: {', '.join(sorted(allowed[key])) or 'none'}.")
    if key == "uld":
        return ULD(temperature)
    if key in ("mined", "cdm") and (teacher_tokenizer is None or student_tokenizer is None):
        raise PrefkdError(f"the {key} KD term needs both tokenizers (teacher_tokenizer=, student_tokenizer=).")
    if key == "mined":
        return MinED(build_mined_map(teacher_tokenizer, student_tokenizer, options.get("cache_dir")), temperature)
    if key == "cdm":
        return CDM.from_tokenizers(teacher_tokenizer, student_tokenizer, temperature=temperature, **options)
    return DSKD(student_head, teacher_head, student_dim, teacher_dim, temperature, **options)
