"""CDM: contextual dynamic mapping (Chen et al. 2025)."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefkd.training.kd.base import NO_ID, KDLoss, KDSide, zero_loss
from prefkd.training.kd.pairing import aligned_unit_predictions
from prefkd.training.kd.strings import TokenizerStrings, vocab_list


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


def _exact_map(
    src: Sequence[bytes], dst: Sequence[bytes], src_special: set[int], dst_special: set[int]
) -> torch.Tensor:
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
        for name, value in (
            ("t2s", t2s),
            ("s2t", s2t),
            ("t_mat", tmat),
            ("t_len", tlen),
            ("s_mat", smat),
            ("s_len", slen),
        ):
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def from_tokenizers(cls, teacher_tokenizer, student_tokenizer, **kwargs) -> "CDM":
        return cls(
            TokenizerStrings.from_tokenizer(teacher_tokenizer),
            TokenizerStrings.from_tokenizer(student_tokenizer),
            **kwargs,
        )

    @classmethod
    def from_vocabs(cls, teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int], **kwargs) -> "CDM":
        t = TokenizerStrings(vocab_list(teacher_vocab), set(), None)
        s = TokenizerStrings(vocab_list(student_vocab), set(), None)
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
                    self._lookup(src_mat, ps_, -1),
                    self._lookup(src_len, ps_, -1),
                    self._lookup(dst_mat, pd_, -1),
                    self._lookup(dst_len, pd_, -1),
                )
            dist[possible] = values[inverse]
        best, j = dist.min(dim=-1)  # first minimum: the most probable of equally close candidates
        hit = best < self.threshold
        out[rows[hit], cols[hit]] = cand[hit, j[hit]]
        return out

    def forward(self, student: KDSide, teacher: KDSide):
        b, ps, pt = aligned_unit_predictions(student, teacher)
        if b.numel() == 0:
            return zero_loss(student.logits), {"kd": 0.0, "kd_positions": 0, "kd_matched": 0.0}
        dev_t = teacher.logits.device
        zt = teacher.logits.detach()[b.to(dev_t), pt.to(dev_t)].to(student.logits.device).float()
        zs = student.logits[b, ps].float()
        k = min(self.topk, zt.shape[-1], zs.shape[-1])
        t_top = zt.topk(k, dim=-1).indices
        s_top = zs.detach().topk(k, dim=-1).indices
        with torch.no_grad():
            fwd = self._map(
                t_top, s_top, self.t2s, self.t_mat, self.t_len, self.s_mat, self.s_len
            )  # teacher cands -> student ids
            rev = self._map(
                s_top, t_top, self.s2t, self.s_mat, self.s_len, self.t_mat, self.t_len
            )  # student cands -> teacher ids
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
            return zero_loss(student.logits), {"kd": 0.0, "kd_positions": 0, "kd_matched": matched}
        neg = torch.finfo(torch.float32).min / 4  # finite: exp() is 0, differences stay finite
        at = (zt.gather(-1, t_ids) / self.temperature).masked_fill(~valid, neg)[keep]
        as_ = (zs.gather(-1, s_ids) / self.temperature).masked_fill(~valid, neg)[keep]
        valid = valid[keep]
        logp = F.log_softmax(at, dim=-1)
        logq = F.log_softmax(as_, dim=-1)
        kl = torch.where(valid, logp.exp() * (logp - logq), torch.zeros_like(logp)).sum(-1).clamp_min(0.0)
        loss = kl.mean() * self.temperature**2
        return loss, {"kd": float(loss.detach()), "kd_positions": int(keep.sum()), "kd_matched": matched}
