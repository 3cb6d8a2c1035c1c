"""model_token_logps under mixed precision: the chunked LM head (one forward per call) must be taken when the
model's logits are its head's output computed in bf16, and the fallback (a second, full-logits forward) only
for models whose logits are not ``head(hidden)``."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import Qwen2Config, Qwen2ForCausalLM

from prefkd.core.logprobs import model_token_logps, token_logps


def _tiny(seed=1):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: start from none and leave none (other tests build theirs)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_takes_the_chunked_head_with_one_forward(fresh_accelerate_state):
    model = _tiny()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    wrapped = accelerator.prepare(model)
    calls = _count_forwards(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    lp = model_token_logps(wrapped, ids, mask)
    assert len(calls) == 1, "the full-logits fallback ran: bf16 logits were taken for a non-plain head"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = token_logps(model(input_ids=ids, attention_mask=mask).logits.float(), ids)
    assert torch.allclose(lp, full, atol=5e-2)  # the chunked head runs in fp32: close to the bf16 full logits


def test_scaled_logits_still_take_the_fallback():
    model = _tiny()
    calls = _count_forwards(model)
    original = model.forward

    def scaled(*args, **kwargs):  # logits that are not head(hidden), as with a logit scale or a soft cap
        out = original(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    lp = model_token_logps(model, ids, torch.ones_like(ids))
    assert len(calls) == 2
    assert torch.allclose(lp, token_logps(model(input_ids=ids).logits, ids), atol=1e-6)
