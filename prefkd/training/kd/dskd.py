"""DSKD with cross-model attention (Zhang et al. 2024)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from prefkd.errors import PrefkdError
from prefkd.training.kd.base import KDLoss, KDSide, check_pair, kl_rows, prediction_mask, zero_loss


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` with the head's parameters detached (no gradient into the head), float32 out."""
    weight = head.weight.detach()
    bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
    return F.linear(hidden.to(weight.device, weight.dtype), weight, bias).float().to(hidden.device)


def _embedder(embed) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids -> embeddings (on the ids' device) through a model's input embedding module."""
    weight = getattr(embed, "weight", None)

    def lookup(ids):
        moved = ids.to(weight.device) if weight is not None else ids
        return embed(moved).to(ids.device)

    return lookup


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
      ``KL(softmax(t->s / T) (detached) || softmax(z_s / T))`` distils into the student, on the
      positions where the projected teacher already predicts the target (``accuracy_gate``, as in the
      authors' release; off: all positions);
    * teacher space: ``h_s->t_j = sum_i softmax_i(score) W_s2t(h_s_i)``, logits through the (frozen)
      TEACHER head, ``KL(softmax(z_t / T) || softmax(s->t / T))`` -- the gradient reaches the
      student hidden states and the projectors, not the teacher head.

    KD = CE_t->s + KL_student-space + KL_teacher-space, each a mean over its response predictions
    (the gated KL is averaged over all student predictions, ungated ones contributing 0). The KL terms
    are NOT multiplied by T^2: the authors' code (``compute_forward_kl_divergence``) divides both
    models' logits by T and adds the KL to the CE as is.

    Embeddings: ``student_embed`` / ``teacher_embed`` are the models' input embedding modules
    (``model.get_input_embeddings()``, what DSKD's code takes as ``model.model.embed_tokens``); for an
    untied model they differ from the LM head's rows. They get no gradient.
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
        if student_embed is None or teacher_embed is None:
            raise PrefkdError(
                "DSKD needs both models' input embedding modules (student_embed=, teacher_embed=: "
                "model.get_input_embeddings())."
            )
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
        self._frozen = (
            student_head,
            teacher_head,
            _embedder(student_embed),
            _embedder(teacher_embed),
        )

    @staticmethod
    def _std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sel = x[mask]
        return sel.float().std().clamp_min(1e-6) if sel.numel() > 1 else torch.ones((), device=x.device)

    def forward(self, student: KDSide, teacher: KDSide):
        check_pair(student, teacher)
        if student.hidden is None or teacher.hidden is None:
            raise PrefkdError("DSKD needs the final hidden states of both models (KDSide.hidden).")
        s_head, t_head, s_embed, t_embed = self._frozen
        dev = self.query.weight.device
        dtype = self.query.weight.dtype
        ms = prediction_mask(student).to(dev)
        mt = prediction_mask(teacher).to(dev)
        ns, nt = int(ms.sum()), int(mt.sum())
        if ns == 0 or nt == 0:
            zero = zero_loss(student.logits, student.hidden, *self.parameters())
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
            raise PrefkdError(
                f"the student head gives {t2s_logits.shape[-1]} logits but the student logits have {zs.shape[-1]}."
            )
        gate = correct if self.accuracy_gate else torch.ones_like(correct)
        t2s_kl = (kl_rows(t2s_logits.detach(), zs, self.temperature) * gate).mean()

        # teacher space: student -> teacher
        s2t_h = torch.softmax(score.transpose(1, 2), dim=-1) @ v_s2t.float()  # [B, Tt, dt]
        s2t_logits = _head_logits(t_head, s2t_h[mt])  # [Nt, Vt]
        zt = teacher.logits.detach().to(dev)[mt]
        if zt.shape[-1] != s2t_logits.shape[-1]:
            raise PrefkdError(
                f"the teacher head gives {s2t_logits.shape[-1]} logits but the teacher logits have {zt.shape[-1]}."
            )
        s2t_kl = kl_rows(zt, s2t_logits, self.temperature).mean()

        loss = t2s_ce + t2s_kl + s2t_kl
        metrics = {
            "kd": float(loss.detach()),
            "kd_t2s_ce": float(t2s_ce.detach()),
            "kd_t2s_kl": float(t2s_kl.detach()),
            "kd_s2t_kl": float(s2t_kl.detach()),
            "kd_t2s_acc": float(correct.mean()),
        }
        return loss, metrics
