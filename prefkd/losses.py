"""The few core computations, small and pure.

- ``token_logps``: log-probability of every label token, from logits, chunked
  over the sequence so no second [B, L, V] tensor (a log-softmax copy) exists.
- ``model_token_logps``: the same straight from a causal LM's hidden states,
  projecting through the LM head one chunk at a time (recomputed in backward),
  so not even the full [B, L, V] logits are kept.
- ``span_logps``: scatter-add token log-probs into span (or token) units.
- ``preference_loss``: ONE loss over units of which DPO, TIS-DPO and CTPD are
  configurations: ``margin = sum_i w_i * (l_policy_i - l_ref_i)``,
  ``loss = -logsigmoid(beta * (margin_w - margin_l))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 128


def _chunk_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` for t >= 1; ``out[:, 0] = 0``.

    ``logits[b, t]`` is the model's prediction for position t + 1 (the usual causal
    LM output). Float32 result; chunks of ``chunk`` positions are upcast at a time.
    """
    batch, length = input_ids.shape
    out = logits.new_zeros((batch, length), dtype=torch.float32)
    for start in range(0, length - 1, chunk):
        end = min(start + chunk, length - 1)
        out[:, start + 1 : end + 1] = _chunk_logps(logits[:, start:end], input_ids[:, start + 1 : end + 1])
    return out


def _head_chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _chunk_logps(head(hidden), labels)


# Config keys of models whose logits are not the plain head projection (scaled or capped).
_LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def _decoder_and_head(model):
    """(decoder, head) when logits are exactly ``head(decoder(...).last_hidden_state)``, else (None, None)."""
    head = model.get_output_embeddings()
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    cfg = model.config.get_text_config()
    if head is None or base is None or any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORM_KEYS):
        return None, None
    return base, head


def model_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Token log-probs of ``input_ids`` under a causal LM, LM head applied chunk by chunk.

    With gradients on, each chunk's logits are recomputed in backward
    (activation checkpointing), so peak memory holds one chunk of logits.
    Models whose head is not a plain projection fall back to full logits.
    """
    base, head = _decoder_and_head(model)
    if base is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return token_logps(logits, input_ids, chunk)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    batch, length = input_ids.shape
    pieces = [hidden.new_zeros((batch, 1), dtype=torch.float32)]
    for start in range(0, length - 1, chunk):
        end = min(start + chunk, length - 1)
        h, labels = hidden[:, start:end], input_ids[:, start + 1 : end + 1]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_head_chunk_logps, head, h, labels, use_reentrant=False))
        else:
            pieces.append(_head_chunk_logps(head, h, labels))
    return torch.cat(pieces, dim=1)


def span_logps(token_lp: torch.Tensor, unit_ids: torch.Tensor, num_units: int) -> torch.Tensor:
    """Sum token log-probs into units: ``out[b, k] = sum of token_lp[b, t] where unit_ids[b, t] == k``.

    Tokens with ``unit_ids < 0`` (prompt, padding) are ignored. Returns [B, num_units].
    """
    valid = unit_ids >= 0
    index = torch.where(valid, unit_ids, torch.zeros_like(unit_ids)).long()
    values = torch.where(valid, token_lp, torch.zeros_like(token_lp))
    out = token_lp.new_zeros((token_lp.shape[0], num_units))
    return out.scatter_add(1, index, values)


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar mean over pairs
    losses: torch.Tensor  # [B]
    reward_chosen: torch.Tensor  # [B] beta * margin_w
    reward_rejected: torch.Tensor  # [B] beta * margin_l

    def metrics(self) -> dict[str, float]:
        margin = self.reward_chosen - self.reward_rejected
        return {
            "loss": float(self.loss.detach()),
            "rewards/chosen": float(self.reward_chosen.mean()),
            "rewards/rejected": float(self.reward_rejected.mean()),
            "rewards/margin": float(margin.mean()),
            "rewards/accuracy": float((margin > 0).float().mean()),
        }


def weighted_margin(policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * (policy_i - reference_i)`` over valid units (mask), per row."""
    return ((policy - reference) * weights * mask).sum(dim=-1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    weights_chosen: torch.Tensor,
    weights_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    beta: float,
) -> PreferenceOutput:
    """The one preference loss over units (tokens or aligned spans), all tensors [B, M].

    Reference values and weights are constants (detached here), so gradient flows
    only through the policy's log-probs.
    """
    m_w = weighted_margin(policy_chosen, ref_chosen.detach(), weights_chosen.detach(), mask_chosen)
    m_l = weighted_margin(policy_rejected, ref_rejected.detach(), weights_rejected.detach(), mask_rejected)
    losses = -F.logsigmoid(beta * (m_w - m_l))
    return PreferenceOutput(
        loss=losses.mean(),
        losses=losses,
        reward_chosen=(beta * m_w).detach(),
        reward_rejected=(beta * m_l).detach(),
    )


def sft_loss(token_lp: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the label tokens of the batch."""
    count = label_mask.sum().clamp(min=1)
    return -(token_lp * label_mask).sum() / count
