"""MinED: the minimum-edit-distance vocabulary map and its KD term."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefkd.errors import PrefkdError
from prefkd.training.kd.base import NO_ID, KDLoss, KDSide, check_pair, prediction_mask, zero_loss
from prefkd.training.kd.dtw import dtw_align, edit_distances, token_edit_costs
from prefkd.training.kd.strings import TokenizerStrings, vocab_list

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
    dist = edit_distances(query, index.mat[surv, : int(lens.max())], lens)
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
    return mined_map_from_token_bytes(vocab_list(teacher_vocab), vocab_list(student_vocab), fixed, student_excluded)


def _special_maps(teacher: TokenizerStrings, student: TokenizerStrings) -> dict[int, int]:
    """Teacher special ids -> student ids: EOS -> EOS; a special with the same string -> that student
    special; any other special (BOS, PAD, control tokens, which carry ~no probability inside a
    response) -> the student EOS (they all end or interrupt the response text)."""
    if student.eos_id is None:
        raise PrefkdError(
            "the student tokenizer has no EOS token; MinED needs one to map the teacher's special tokens."
        )
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

    Token strings are the exact bytes each id stands for (``prefkd.core.align.ByteVocab``: SentencePiece
    ``'▁'`` and byte-level ``'Ġ'`` become spaces, byte-fallback ``<0xNN>`` and byte-level pieces become
    their bytes), so Mistral's ``'▁the'`` and Qwen's ``'Ġthe'`` are the same string ``b' the'``.
    Special/added teacher tokens are pinned (``_special_maps``); student special/added tokens are never
    targets except the EOS. See ``mined_map_from_token_bytes`` for the rest.
    """
    t = TokenizerStrings.from_tokenizer(teacher_tokenizer)
    s = TokenizerStrings.from_tokenizer(student_tokenizer)
    return mined_map_from_token_bytes(t.pieces, s.pieces, _special_maps(t, s), s.special, cache_dir)


class MinED(KDLoss):
    """KD through DTW-aligned token sequences and a minimum-edit-distance vocabulary map: the MinED baseline as the
    DSKD authors implement it (``criterions/min_edit_dis_kld.py``, after FuseLLM, Wan et al. 2024).

    Per row, the input tokens of the student's predictions and those of the teacher's predictions (the last prompt
    token and the response tokens before the last) are aligned by DTW with the edit distance of their strings as the
    cost (``prefkd.training.kd.dtw``). A student prediction whose input token is aligned to exactly one teacher
    token, which the vocabulary map sends to the student's own input token, learns the teacher's distribution at
    that teacher position: ``softmax(z_t / T)`` moved onto the student vocabulary by adding each teacher token's
    probability onto its mapped student id (teacher logit columns beyond the map, padding rows of an embedding
    matrix, are dropped). Every other student prediction (aligned to several teacher tokens, or to a token that maps
    elsewhere) learns a one-hot distribution on its own target token, as DSKD's code does. The loss is the forward
    ``KL(p || softmax(z_s / T))`` at temperature T -- no T^2 factor, as in DSKD -- averaged over the student's
    predictions.
    """

    name = "mined"

    def __init__(
        self,
        teacher_to_student: torch.Tensor,
        teacher_pieces: Sequence[bytes],
        student_pieces: Sequence[bytes],
        temperature: float = 2.0,
    ):
        super().__init__(temperature)
        mapping = torch.as_tensor(teacher_to_student, dtype=torch.long)
        if mapping.dim() != 1 or mapping.numel() == 0 or int(mapping.min()) < 0:
            raise PrefkdError("the MinED map must be a non-empty 1-D tensor of student ids (>= 0).")
        self.register_buffer("teacher_to_student", mapping, persistent=False)
        self.max_student_id = int(mapping.max())
        self.map_list = mapping.tolist()
        self.teacher_pieces, self.student_pieces = list(teacher_pieces), list(student_pieces)

    @classmethod
    def from_tokenizers(cls, teacher_tokenizer, student_tokenizer, temperature: float = 2.0, cache_dir=None) -> "MinED":
        t = TokenizerStrings.from_tokenizer(teacher_tokenizer)
        s = TokenizerStrings.from_tokenizer(student_tokenizer)
        mapping = build_mined_map(teacher_tokenizer, student_tokenizer, cache_dir)
        return cls(mapping, t.pieces, s.pieces, temperature)

    @classmethod
    def from_vocabs(cls, teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int], temperature: float = 2.0):
        mapping = mined_map_from_vocabs(teacher_vocab, student_vocab)
        return cls(mapping, vocab_list(teacher_vocab), vocab_list(student_vocab), temperature)

    def project(self, teacher_logits: torch.Tensor, student_vocab: int) -> torch.Tensor:
        """Teacher probabilities (rows of ``teacher_logits``) moved onto the student vocabulary: [N, V_s]."""
        if self.max_student_id >= student_vocab:
            raise PrefkdError(
                f"the MinED map points at student id {self.max_student_id} but the student has {student_vocab} logits."
            )
        mapping = self.teacher_to_student.to(teacher_logits.device)
        v = min(teacher_logits.shape[-1], mapping.numel())
        mapping = mapping[:v]
        p = torch.softmax(teacher_logits[:, :v].float() / self.temperature, dim=-1)
        return torch.zeros(p.shape[0], student_vocab, dtype=p.dtype, device=p.device).index_add_(1, mapping, p)

    def _piece(self, pieces: list[bytes], i: int) -> bytes:
        return pieces[i] if 0 <= i < len(pieces) else b""

    def align_row(self, s_tokens: list[int], t_tokens: list[int]) -> list[int]:
        """Per student prediction: the index of its teacher prediction, or -1 (one-hot target)."""
        if not t_tokens:
            return [-1] * len(s_tokens)
        cost = token_edit_costs(
            [self._piece(self.teacher_pieces, i) for i in t_tokens],
            [self._piece(self.student_pieces, j) for j in s_tokens],
        )
        path, _ = dtw_align(cost)
        out = []
        for j, rows in enumerate(path):
            t_id = t_tokens[rows[0]] if len(rows) == 1 else -1
            consistent = 0 <= t_id < len(self.map_list) and self.map_list[t_id] == s_tokens[j]
            out.append(rows[0] if consistent else -1)
        return out

    def _pairs(self, student: KDSide, teacher: KDSide):
        """(row, student position, teacher position or -1) of every student prediction (LongTensors)."""
        ms, mt = prediction_mask(student).cpu(), prediction_mask(teacher).cpu()
        s_ids, t_ids = student.input_ids.cpu(), teacher.input_ids.cpu()
        rows, s_pos, t_pos = [], [], []
        for b in range(ms.shape[0]):
            ps, pt = ms[b].nonzero().flatten(), mt[b].nonzero().flatten()
            match = self.align_row(s_ids[b, ps].tolist(), t_ids[b, pt].tolist())
            rows += [b] * len(match)
            s_pos += ps.tolist()
            t_pos += [int(pt[i]) if i >= 0 else -1 for i in match]
        return (torch.tensor(x, dtype=torch.long) for x in (rows, s_pos, t_pos))

    def forward(self, student: KDSide, teacher: KDSide):
        check_pair(student, teacher)
        b, ps, pt = self._pairs(student, teacher)
        if b.numel() == 0:
            return zero_loss(student.logits), {"kd": 0.0, "kd_positions": 0, "kd_aligned": 0.0}
        dev = student.logits.device
        b, ps, pt = b.to(dev), ps.to(dev), pt.to(dev)
        logq = F.log_softmax(student.logits[b, ps].float() / self.temperature, dim=-1)  # [N, V_s]
        aligned = pt >= 0
        kl = logq.new_zeros(())
        if bool(aligned.any()):
            dev_t = teacher.logits.device
            zt = teacher.logits.detach()[b[aligned].to(dev_t), pt[aligned].to(dev_t)].to(dev)
            p = self.project(zt, logq.shape[-1])
            kl = (torch.xlogy(p, p) - p * logq[aligned]).sum(-1).clamp_min(0.0).sum()
        # one-hot on the student's own target token: KL(onehot || q) = -log q(target)
        target = student.input_ids.to(dev)[b[~aligned], ps[~aligned] + 1]
        ce = -logq[~aligned].gather(1, target[:, None]).sum()
        loss = (kl + ce) / b.numel()
        metrics = {
            "kd": float(loss.detach()),
            "kd_positions": int(b.numel()),
            "kd_aligned": float(aligned.float().mean()),
        }
        return loss, metrics
