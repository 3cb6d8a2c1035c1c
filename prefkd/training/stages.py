"""The stage kinds of the training engine: SFT, preference (DPO, TIS-DPO, CTPD) and KD.

A stage kind owns what differs between stages: how rows become a batch (``collate``), the loss and
metrics of a batch (``loss``), and the parameters it adds to the optimizer (``trainable``: a KD
term's projectors). The engine (prefkd.training.engine) owns everything they share: the data order,
the optimizer and schedule, checkpoints and the log.

A stage with a KD term (``settings.kd``) holds an :class:`OnlineKD`: the frozen teacher model and the
KD loss module, applied to both models' views of the chosen responses.

``settings`` is a ``prefkd.training.engine.TrainSettings``.
"""

from __future__ import annotations

import torch

from prefkd.assets.models import load_model
from prefkd.assets.tokenizers import load_tokenizer, pad_id
from prefkd.core.logprobs import model_token_logps, sft_loss, span_logps, token_logps
from prefkd.core.preference import PairUnits, preference_loss
from prefkd.data.batches import collate_chosen_views, collate_pairs, collate_sft
from prefkd.errors import PrefkdError
from prefkd.training.kd import KDSide, build_kd, kd_mix
from prefkd.training.settings import STAGES


def response_view(model, view: dict) -> KDSide:
    """A KD view of the responses only: the LM head runs on the last prompt position
    and the response positions (the prompt's vocabulary projection is never needed).

    Rows are re-packed from one position before their first response token, so
    ``logits[t]`` still predicts ``input_ids[t + 1]``; padding has unit -1, mask 0.
    """
    ids, units = view["input_ids"], view["unit_ids"]  # [B, T], [B, T]
    out = model(
        input_ids=ids,
        attention_mask=view["attention_mask"],
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    hidden = out.hidden_states[-1]  # [B, T, H]
    is_resp = units >= 0  # [B, T]
    start = (is_resp.float().argmax(dim=1) - 1).clamp(min=0)  # [B] last prompt position
    end = is_resp.shape[1] - is_resp.flip(1).float().argmax(dim=1)  # [B] one past the last response token
    width = int((end - start).max())
    pos = start[:, None] + torch.arange(width, device=ids.device)[None, :]  # [B, W]
    valid = pos < end[:, None]  # [B, W]
    pos = pos.clamp(max=ids.shape[1] - 1)
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, W, H]
    head = getattr(model, "module", model).get_output_embeddings()
    with torch.no_grad():  # logits must really be head(hidden); else (scaled logits) take the model's own
        plain = torch.allclose(head(hidden[:, -1:]).float(), out.logits.float(), rtol=1e-3, atol=1e-4)
    if plain:
        logits = head(h)  # [B, W, V]
    else:
        full = model(input_ids=ids, attention_mask=view["attention_mask"], use_cache=False).logits  # [B, T, V]
        logits = full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1]))  # [B, W, V]
    units_v = torch.where(valid, units.gather(1, pos), torch.full_like(pos, -1))  # [B, W]
    return KDSide(
        logits=logits,
        hidden=h,
        input_ids=torch.where(valid, ids.gather(1, pos), torch.zeros_like(pos)),
        unit_ids=units_v,
        target_mask=(units_v >= 0).float(),
    )


class OnlineKD:
    """The frozen teacher and the KD loss module of a stage with a KD term (``settings.kd``)."""

    def __init__(self, settings, student_model, student_tokenizer, device):
        if not settings.kd_teacher:
            raise PrefkdError("a KD term needs the teacher model; pass --kd-teacher DIR.")
        self.tokenizer = load_tokenizer(settings.kd_teacher)
        self.pad_id = pad_id(self.tokenizer)
        self.teacher_model = load_model(settings.kd_teacher).to(device).eval()
        for p in self.teacher_model.parameters():
            p.requires_grad_(False)
        self.loss = build_kd(
            settings.kd,
            settings.temperature,
            teacher_tokenizer=self.tokenizer,
            student_tokenizer=student_tokenizer,
            student_head=student_model.get_output_embeddings(),
            teacher_head=self.teacher_model.get_output_embeddings(),
            student_embed=student_model.get_input_embeddings(),  # DSKD's index embeddings (untied models differ)
            teacher_embed=self.teacher_model.get_input_embeddings(),
            student_dim=student_model.config.get_text_config().hidden_size,
            teacher_dim=self.teacher_model.config.get_text_config().hidden_size,
        ).to(device)

    def trainable(self) -> list:
        """Parameters of the KD module that learn (DSKD's projectors), not the heads it borrows."""
        borrowed = {id(p) for p in self.teacher_model.parameters()}
        return [p for p in self.loss.parameters() if p.requires_grad and id(p) not in borrowed]

    def views(self, rows: list[dict], student_pad_id: int) -> dict:
        """Both models' views of the chosen responses of ``rows`` (same rows, same order)."""
        student, teacher = collate_chosen_views(rows, student_pad_id, self.pad_id)
        return {"kd_student": student, "kd_teacher": teacher, "pair_id": student["pair_id"]}

    def term(self, model, batch: dict) -> tuple[torch.Tensor, dict, KDSide]:
        """(KD loss, its ``kd/...`` metrics, the student's view) on the batch's chosen responses."""
        student = response_view(model, batch["kd_student"])
        with torch.no_grad():
            teacher = response_view(self.teacher_model, batch["kd_teacher"])
        term, metrics = self.loss(student, teacher)  # scalar
        metrics = {f"kd/{k}": float(v) for k, v in metrics.items()}
        metrics["kd/loss"] = float(term.detach())
        return term, metrics, student


class Stage:
    """One stage kind: its batches, its loss and metrics, and the parameters it adds to the optimizer.

    ``reads_signals``: whether its table is joined with ``settings.signals`` (weights, reference log-probs).
    """

    reads_signals = False

    def __init__(self, settings, model, tokenizer, device):
        self.settings = settings
        self.pad_id = pad_id(tokenizer)
        # any stage given --kd holds the teacher (an SFT stage only ignores its term)
        self.kd = OnlineKD(settings, model, tokenizer, device) if settings.kd else None

    def trainable(self) -> list:
        """Parameters of the stage itself that the optimizer updates besides the model's."""
        return self.kd.trainable() if self.kd is not None else []

    def collate(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss to back-propagate, metrics of the batch as plain floats)."""
        raise NotImplementedError


class SFTStage(Stage):
    """Cross-entropy on the chosen responses of one role."""

    def collate(self, rows):
        return collate_sft(rows, self.settings.role, self.pad_id)

    def loss(self, model, batch):
        needed = batch["label_mask"] > 0  # [B, T]
        lp = model_token_logps(model, batch["input_ids"], batch["attention_mask"], needed=needed)  # [B, T]
        loss = sft_loss(lp, batch["label_mask"])  # scalar
        return loss, {"loss": float(loss.detach()), "nll": float(loss.detach())}


def pair_units(model, batch: dict) -> PairUnits:
    """The policy's unit log-probs of a collated pair batch, with the batch's reference, weights and mask."""
    lp = model_token_logps(model, batch["input_ids"], batch["attention_mask"], needed=batch["unit_ids"] >= 0)  # [2B, T]
    policy = span_logps(lp, batch["unit_ids"], batch["unit_mask"].shape[1])  # [2B, M]
    return PairUnits(policy, batch["ref_logps"], batch["weights"], batch["unit_mask"])


class PreferenceStage(Stage):
    """The one preference loss over units (DPO, TIS-DPO, CTPD), plus ``kd_weight`` times a KD term if any."""

    reads_signals = True

    def collate(self, rows):
        s = self.settings
        batch = collate_pairs(rows, s.role, s.unit, self.pad_id, with_signals=True)  # [chosen; rejected] rows
        if self.kd is not None:
            batch.update(self.kd.views(rows, self.pad_id))
        return batch

    def loss(self, model, batch):
        out = preference_loss(pair_units(model, batch), self.settings.beta)
        loss, metrics = out.loss, out.metrics()
        if self.kd is not None:
            term, kd_metrics, _ = self.kd.term(model, batch)
            loss = loss + self.settings.kd_weight * term
            metrics.update(kd_metrics)
            metrics["preference_loss"] = metrics["loss"]
            metrics["loss"] = float(loss.detach())
        return loss, metrics


class KDStage(Stage):
    """``(1 - kappa) * CE + kappa * KD`` on the chosen responses (kappa = ``kd_weight``)."""

    def collate(self, rows):  # self.kd is set: stage_class requires settings.kd of a kd stage
        return self.kd.views(rows, self.pad_id)

    def loss(self, model, batch):
        term, metrics, student = self.kd.term(model, batch)
        ce = sft_loss(token_logps(student.logits, student.input_ids), student.target_mask)  # scalar
        loss = kd_mix(ce, term, self.settings.kd_weight)
        metrics.update(loss=float(loss.detach()), nll=float(ce.detach()))
        return loss, metrics


KINDS: dict[str, type[Stage]] = {"sft": SFTStage, "preference": PreferenceStage, "kd": KDStage}


def stage_class(settings) -> type[Stage]:
    """The stage kind of ``settings``, checked before anything is loaded."""
    if settings.stage not in KINDS:
        raise PrefkdError(f"stage must be one of {', '.join(STAGES)}, got {settings.stage!r}.")
    if settings.stage == "preference" and not settings.signals:
        raise PrefkdError("a preference stage needs signal shards (reference log-probs and weights); pass --signals.")
    if settings.stage == "kd" and not settings.kd:
        raise PrefkdError("a kd stage needs a KD term; pass --kd dskd|uld|mined|cdm.")
    return KINDS[settings.stage]


def make_stage(settings, model, tokenizer, device) -> Stage:
    """The stage object of ``settings`` for ``model`` (not yet wrapped by accelerate) and its tokenizer;
    a KD term's teacher is loaded onto ``device``."""
    return stage_class(settings)(settings, model, tokenizer, device)
