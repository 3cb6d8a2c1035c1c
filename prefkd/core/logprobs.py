"""The few core computations, small and pure.

- ``token_logps``: log-probability of every label token, from logits, chunked
  over the sequence so no second [B, L, V] tensor (a log-softmax copy) exists.
- ``model_token_logps``: the same straight from a causal LM's hidden states,
  projecting through the LM head one chunk at a time (recomputed in backward),
  so not even the full [B, L, V] logits are kept.
- ``span_logps``: scatter-add token log-probs into span (or token) units.
- ``sft_loss``: mean NLL over label tokens.

The preference loss over these units lives in ``prefkd.core.preference``.
"""

from __future__ import annotations

import torch
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


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[label] for rows of h, with a hand-written backward.

    Saves only h, the label and the log-normaliser; backward recomputes the logits
    and turns them into the gradient in place (softmax minus one-hot), so one
    [N, V] buffer is alive at a time and the element-wise passes are few.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), labels, lse)
        ctx.has_bias = bias is not None
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        g = torch.nn.functional.linear(hidden, weight, bias).float()
        g.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -grad * softmax
        g.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1).to(g.dtype))  # + grad * one-hot
        g = g.to(hidden.dtype)
        grad_hidden = g @ weight if ctx.needs_input_grad[0] else None
        grad_weight = g.t() @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def _plain_linear(head) -> bool:
    """A head whose weight is a full local tensor (not sharded by ZeRO-3 / FSDP)."""
    w = getattr(head, "weight", None)
    return (
        isinstance(head, torch.nn.Linear)
        and w is not None
        and w.numel() > 0
        and not hasattr(w, "ds_id")
        and type(w).__name__ not in ("DTensor", "FlatParameter")
    )


def _logits_are_head(head, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the model's logits are ``head(hidden)``, computed in fp32 or under bf16 / fp16 autocast (a
    mixed-precision wrapper such as accelerate's runs the model's own head in low precision: compared with an
    fp32 probe alone, every step would take the full-logits fallback)."""
    ref = logits.float()
    with torch.no_grad():
        if torch.allclose(head(hidden).float(), ref, rtol=1e-3, atol=1e-4):
            return True
        for dtype in (torch.bfloat16, torch.float16):
            try:
                with torch.autocast(hidden.device.type, dtype=dtype):
                    probe = head(hidden).float()
            except RuntimeError:  # a device without this autocast dtype
                continue
            if torch.allclose(probe, ref, rtol=1e-2, atol=1e-2):
                return True
    return False


def model_token_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, needed: torch.Tensor | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Token log-probs of ``input_ids`` under a causal LM, the LM head applied in chunks.

    ``needed`` [B, T] (bool) marks the positions whose log-prob is wanted (response
    tokens); the head then runs only on the hidden states that predict them, so a
    long prompt costs no vocabulary projection. Other positions get 0.

    The forward goes through ``model`` itself (so DDP / DeepSpeed / FSDP wrappers see
    it) asking for the final hidden states and the logits of one position only; the
    head is then applied ``chunk`` positions at a time, each recomputed in backward
    (activation checkpointing), so peak memory holds one chunk of logits. The one
    position of logits the model did compute checks that logits really are
    ``head(hidden)``; models where they are not (scaled or soft-capped logits) fall
    back to full logits.
    """
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrap the HF model in .module
    head = inner.get_output_embeddings()
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True, logits_to_keep=1
    )
    hidden = out.hidden_states[-1]
    plain = head is not None and out.logits.shape[1] == 1 and _logits_are_head(head, hidden[:, -1:], out.logits)
    if not plain:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        lp = token_logps(logits, input_ids)
        return lp if needed is None else lp * needed
    batch, length = input_ids.shape
    want = (
        torch.ones((batch, length - 1), dtype=torch.bool, device=input_ids.device)
        if needed is None
        else needed[:, 1:].bool()
    )
    h = hidden[:, :-1][want]  # [N, H]: the states that predict the wanted tokens
    labels = input_ids[:, 1:][want]
    pieces = []
    fused = _plain_linear(head)
    for start in range(0, h.shape[0], chunk):
        hc, lc = h[start : start + chunk], labels[start : start + chunk]
        if fused:
            pieces.append(_LinearLogProbs.apply(hc, head.weight, head.bias, lc))
        elif torch.is_grad_enabled() and hc.requires_grad:
            pieces.append(checkpoint(_head_chunk_logps, head, hc, lc, use_reentrant=False))
        else:
            pieces.append(_head_chunk_logps(head, hc, lc))
    values = torch.cat(pieces) if pieces else hidden.new_zeros((0,), dtype=torch.float32)
    result = hidden.new_zeros((batch, length), dtype=torch.float32)
    inner_view = torch.zeros((batch, length - 1), dtype=torch.float32, device=hidden.device).masked_scatter(
        want, values
    )
    return torch.cat([result[:, :1], inner_view], dim=1)


def span_logps(token_lp: torch.Tensor, unit_ids: torch.Tensor, num_units: int) -> torch.Tensor:
    """Sum token log-probs into units: ``out[b, k] = sum of token_lp[b, t] where unit_ids[b, t] == k``.

    Tokens with ``unit_ids < 0`` (prompt, padding) are ignored. Returns [B, num_units].
    """
    valid = unit_ids >= 0
    index = torch.where(valid, unit_ids, torch.zeros_like(unit_ids)).long()
    values = torch.where(valid, token_lp, torch.zeros_like(token_lp))
    out = token_lp.new_zeros((token_lp.shape[0], num_units))
    return out.scatter_add(1, index, values)


def sft_loss(token_lp: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the label tokens of the batch."""
    count = label_mask.sum().clamp(min=1)
    return -(token_lp * label_mask).sum() / count
