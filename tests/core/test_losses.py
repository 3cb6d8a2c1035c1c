"""The core computations of prefkd.core.logprobs against naive references, TRL's DPO loss and hand computations.

- token_logps / model_token_logps equal a naive full-logits log_softmax + gather (values and gradients),
  and the chunked LM head keeps no [B, L, V] tensor for backward;
- span_logps on a hand example;
- DPO invariant: policy == reference gives loss ln 2 and zero rewards;
- our DPO configuration equals TRL's DPOTrainer loss on the same model and batch;
- with identical tokenizers the span-unit loss equals the token-unit loss;
- gradient flows only through the policy; the CTPD margin matches a hand computation;
- sft_loss is the mean NLL over label tokens.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from prefkd.core.logprobs import model_token_logps, sft_loss, span_logps, token_logps
from prefkd.core.preference import PairUnits, preference_loss
from prefkd.data.batches import collate_pairs, collate_sft

BETA = 0.1
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


# ----------------------------------------------------------------------------- helpers


def tiny_mistral(vocab_size: int = 1000):
    torch.manual_seed(1)
    return transformers.MistralForCausalLM(transformers.MistralConfig(vocab_size=vocab_size, **TINY)).eval()


def tiny_qwen2(vocab_size: int = 1000):
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, **TINY)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def perturbed(model, seed: int = 2, scale: float = 0.2):
    """A copy of ``model`` with seeded noise on every weight: a policy that differs from its reference."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def naive_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Full log_softmax over the vocabulary, then gather; position 0 gets 0."""
    lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)


def naive_model_token_logps(model, input_ids, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return naive_token_logps(logits, input_ids)


def right_padded(lengths, vocab: int, seed: int = 0, pad_id: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def preference_from_batch(policy, ref, batch: dict, beta: float = BETA):
    """Our DPO-style loss on a collated batch ([chosen; rejected]): weights 1, reference log-probs from ``ref``."""
    m = batch["unit_mask"].shape[1]
    units = span_logps(model_token_logps(policy, batch["input_ids"], batch["attention_mask"]), batch["unit_ids"], m)
    with torch.no_grad():
        ref_units = span_logps(
            model_token_logps(ref, batch["input_ids"], batch["attention_mask"]), batch["unit_ids"], m
        )
    mask = batch["unit_mask"]
    return preference_loss(PairUnits(units, ref_units, torch.ones_like(mask), mask), beta)


def hand_rows(vocab: int, seed: int = 3, pad_id: int = 0):
    """Token-shard-like rows for the student role (enough for unit="token")."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid, (p, c, r) in enumerate([(5, 7, 3), (3, 2, 9), (8, 4, 4)]):
        prompt = rng.integers(1, vocab, p).tolist()
        rows.append(
            {
                "pair_id": pid,
                "student_prompt_len": p,
                "student_chosen_input_ids": prompt + rng.integers(1, vocab, c).tolist(),
                "student_rejected_input_ids": prompt + rng.integers(1, vocab, r).tolist(),
            }
        )
    return rows


@pytest.fixture(scope="module")
def small_models():
    return {"mistral": tiny_mistral(), "qwen2": tiny_qwen2()}


@pytest.fixture(scope="module")
def mistral_32k(teacher_tokenizer):
    """A tiny Mistral over the real Mistral v0.3 vocabulary (reference) and a perturbed copy (policy)."""
    ref = tiny_mistral(len(teacher_tokenizer))
    return ref, perturbed(ref)


# ----------------------------------------------------------------------------- 1. token log-probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 128, 1000])
def test_token_logps_equals_naive(chunk, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 17, 50, generator=g)).to(dtype)
    ids = torch.randint(0, 50, (3, 17), generator=g)
    out = token_logps(logits, ids, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == ids.shape
    assert torch.all(out[:, 0] == 0)
    torch.testing.assert_close(out, naive_token_logps(logits, ids), atol=1e-5, rtol=0)


def test_token_logps_gradient_equals_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 40, generator=g)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    w = torch.randn(2, 9, generator=g)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    (token_logps(a, ids, chunk=4) * w).sum().backward()
    (naive_token_logps(b, ids) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_token_logps_length_one():
    assert torch.equal(token_logps(torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long)), torch.zeros(2, 1))


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("chunk", [4, 128])
def test_model_token_logps_equals_naive(small_models, arch, chunk):
    model = small_models[arch]
    ids, mask = right_padded([12, 7, 10], 1000)
    with torch.no_grad():
        expected = naive_model_token_logps(model, ids, mask)
        got = model_token_logps(model, ids, mask, chunk=chunk)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # with gradients: same values (checkpointed head), same parameter gradients
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(5)) * mask
    w[:, 0] = 0
    grads = []
    for fn in (
        lambda: model_token_logps(model, ids, mask, chunk=chunk),
        lambda: naive_model_token_logps(model, ids, mask),
    ):
        model.zero_grad(set_to_none=True)
        lp = fn()
        assert lp.requires_grad
        (lp * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if len(grads) == 1:
            torch.testing.assert_close(lp.detach(), expected, atol=1e-5, rtol=0)
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)
    head = "model.embed_tokens.weight" if arch == "qwen2" else "lm_head.weight"
    assert grads[0][head].abs().sum() > 0


def saved_tensor_bytes(fn, model=None):
    """Run ``fn`` and return (its result, bytes of distinct storages autograd saves for backward, largest storage).

    Parameters of ``model`` are not counted: they exist anyway, saving them costs nothing."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values()), max(storages.values())


def test_chunked_head_keeps_no_full_logits_for_backward():
    batch, length, vocab = 2, 256, 20000
    model = tiny_mistral(vocab)
    ids, mask = right_padded([length, length - 40], vocab)
    naive, naive_bytes, _ = saved_tensor_bytes(lambda: naive_model_token_logps(model, ids, mask), model)
    chunked, chunked_bytes, chunked_max = saved_tensor_bytes(lambda: model_token_logps(model, ids, mask), model)
    full_logits = batch * length * vocab * 4
    ratio = naive_bytes / chunked_bytes
    print(f"saved for backward: naive {naive_bytes} B, chunked {chunked_bytes} B, ratio {ratio:.1f}")
    assert naive_bytes > full_logits  # the naive path keeps [B, L, V] logits
    assert chunked_max < full_logits / 16  # not even one chunk of logits is kept
    assert ratio > 5
    # both still give the same values and a usable backward
    torch.testing.assert_close(chunked.detach(), naive.detach(), atol=1e-5, rtol=0)
    chunked.sum().backward()
    assert model.lm_head.weight.grad is not None


# ----------------------------------------------------------------------------- 2. span log-probs


def test_span_logps_hand_example():
    token_lp = torch.tensor(
        [[0.0, -1.0, -2.0, -3.0, -4.0, -5.0], [0.0, -0.5, -0.25, -8.0, -9.0, -7.0]], requires_grad=True
    )
    unit_ids = torch.tensor([[-1, 0, 0, 1, -1, 3], [-1, -1, 1, 0, 1, -1]])
    out = span_logps(token_lp, unit_ids, 4)
    expected = torch.tensor([[-3.0, -3.0, 0.0, -5.0], [-8.0, -9.25, 0.0, 0.0]])
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(token_lp.grad, (unit_ids >= 0).float())  # ignored tokens get no gradient


# ----------------------------------------------------------------------------- 3. DPO invariant


def test_dpo_policy_equals_reference_gives_ln2(small_models):
    model = small_models["mistral"]
    batch = collate_pairs(hand_rows(1000), "student", "token", pad_id=0)
    # unit="token": every response token (EOS included) is a unit; prompt and padding are -1
    assert batch["num_units"].tolist() == [7, 2, 4, 3, 9, 4]
    model.zero_grad(set_to_none=True)
    out = preference_from_batch(model, model, batch)
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    assert torch.allclose(out.losses, torch.full((3,), math.log(2)), atol=1e-6, rtol=0)
    assert out.reward_chosen.abs().max() < 1e-6 and out.reward_rejected.abs().max() < 1e-6
    out.loss.backward()  # the step-0 gradient exists and is finite
    grad = model.lm_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- 4. equals TRL's DPO


def test_dpo_equals_trl(tmp_path, monkeypatch, teacher_tokenizer, mistral_32k):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ref, policy = copy.deepcopy(mistral_32k[0]), copy.deepcopy(mistral_32k[1])  # TRL patches forward in place
    policy.zero_grad(set_to_none=True)
    data = [
        {
            "prompt": "What is the capital of France?",
            "chosen": " Paris is the capital.",
            "rejected": " London, I think, or maybe Berlin.",
        },
        {"prompt": "Say hi", "chosen": " Hi there!", "rejected": " No."},
    ]
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=BETA,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        max_length=None,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=teacher_tokenizer,
    )
    assert trainer.loss_types == ["sigmoid"] and not trainer.precompute_ref_logps
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    # Ours on the very same tensors: units = the completion tokens of TRL's completion_mask.
    cm = batch["completion_mask"]
    assert cm.shape[0] == 4 and (cm.sum(1) > 0).all() and (cm * (1 - batch["attention_mask"])).sum() == 0
    assert (cm[:, 0] == 0).all()  # the first token is never a completion token (it has no prediction)
    unit_ids = torch.where(cm.bool(), cm.cumsum(1) - 1, torch.full_like(cm, -1))
    counts = cm.sum(1)
    ours_batch = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "unit_ids": unit_ids,
        "unit_mask": (torch.arange(int(counts.max()))[None, :] < counts[:, None]).float(),
    }
    ours = preference_from_batch(policy, ref, ours_batch)
    ours.loss.backward()

    err = abs(ours.loss.item() - trl_loss.item())
    print(f"ours {ours.loss.item():.8f} TRL {trl_loss.item():.8f} |diff| {err:.2e}")
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    assert err < 1e-5
    metrics = trainer._metrics["eval"]
    assert abs(float(ours.reward_chosen.mean()) - metrics["rewards/chosen"][-1]) < 1e-5
    assert abs(float(ours.reward_rejected.mean()) - metrics["rewards/rejected"][-1]) < 1e-5
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], atol=1e-7, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- 5. span units == token units


@pytest.fixture(scope="module")
def teacher_tokens(teacher_tokenizer):
    from prefkd.data.tokenize_align import ModelTokens

    return ModelTokens(teacher_tokenizer)


@pytest.mark.parametrize("max_length", [512, 72])
def test_span_loss_equals_token_loss_with_identical_tokenizers(
    teacher_tokenizer, teacher_tokens, mistral_32k, max_length
):
    from prefkd.data.demo import generate_demo_pairs
    from prefkd.data.tokenize_align import tokenize_pairs

    ref, policy = mistral_32k
    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(3, seed=1))]
    m = teacher_tokens  # the same tokenizer for both roles
    table, stats = tokenize_pairs(records, m, m, max_length=max_length, max_prompt_length=48)
    rows = table.to_pylist()
    assert len(rows) == 3
    truncated = stats["responses_truncated"]["chosen"] + stats["responses_truncated"]["rejected"]
    assert (truncated == 0) if max_length == 512 else (truncated > 0)
    for row in rows:  # identical tokenizers: every aligned span is a single token
        for side in ("chosen", "rejected"):
            n_resp = (
                len(row[f"student_{side}_input_ids"])
                - row["student_prompt_len"]
                - (0 if row[f"{side}_truncated"] else 1)
            )
            assert row[f"{side}_num_spans"] == n_resp
    pad = teacher_tokenizer.eos_token_id
    span_batch = collate_pairs(rows, "student", "span", pad)
    token_batch = collate_pairs(rows, "student", "token", pad)
    assert torch.equal(span_batch["num_units"], token_batch["num_units"])

    span_out = preference_from_batch(policy, ref, span_batch)
    token_out = preference_from_batch(policy, ref, token_batch)
    assert abs(span_out.loss.item() - math.log(2)) > 1e-4
    assert abs(span_out.loss.item() - token_out.loss.item()) < 1e-5
    torch.testing.assert_close(span_out.losses, token_out.losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(span_out.reward_chosen, token_out.reward_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(span_out.reward_rejected, token_out.reward_rejected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 6. gradients and the CTPD margin


def test_gradient_flows_only_through_policy_and_margin_matches_hand_computation():
    beta = 0.5
    pc = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]], requires_grad=True)
    pr = torch.tensor([[-2.0, -1.5, -4.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    rc = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -2.0, 9.0]], requires_grad=True)
    rr = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -0.25, 9.0]], requires_grad=True)
    wc = torch.tensor([[0.5, 2.0, 1.0], [1.0, 0.25, 7.0]], requires_grad=True)
    wr = torch.tensor([[1.5, 0.0, 0.75], [2.0, 1.0, 7.0]], requires_grad=True)
    mc = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 has two units: its third is padding
    mr = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = preference_loss(PairUnits(*(torch.cat(x) for x in ((pc, pr), (rc, rr), (wc, wr), (mc, mr)))), beta)

    # r(y) = sum_i w_i (l_theta - l_T), by hand
    r_w = [0.5 * 0.5 + 2.0 * -1.0 + 1.0 * 0.5, 1.0 * -1.0 + 0.25 * 1.0]
    r_l = [1.5 * -1.0 + 0.0 * -0.5 + 0.75 * -3.0, 2.0 * 0.5 + 1.0 * -0.25]
    losses = [-math.log(1 / (1 + math.exp(-beta * (a - b)))) for a, b in zip(r_w, r_l)]
    assert torch.allclose(out.reward_chosen, torch.tensor(r_w) * beta, atol=1e-6)
    assert torch.allclose(out.reward_rejected, torch.tensor(r_l) * beta, atol=1e-6)
    assert torch.allclose(out.losses, torch.tensor(losses), atol=1e-6)
    assert abs(out.loss.item() - sum(losses) / 2) < 1e-6
    assert out.reward_chosen.grad_fn is None and out.reward_rejected.grad_fn is None
    metrics = out.metrics()
    assert metrics["rewards/accuracy"] == pytest.approx(float(np.mean([a > b for a, b in zip(r_w, r_l)])))

    out.loss.backward()
    for t in (rc, rr, wc, wr):
        assert t.grad is None  # reference values and weights are constants
    # dL/dl_theta(chosen unit i) = -beta * sigmoid(-beta (r_w - r_l)) * w_i * mask_i / B, and + for rejected
    s = torch.sigmoid(-beta * (torch.tensor(r_w) - torch.tensor(r_l)))[:, None]
    torch.testing.assert_close(pc.grad, -beta * s * wc.detach() * mc / 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pr.grad, beta * s * wr.detach() * mr / 2, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- 7. SFT


def test_sft_loss_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 30, generator=g)
    ids = torch.randint(0, 30, (3, 10), generator=g)
    label_mask = torch.zeros(3, 10)
    label_mask[0, 4:10] = 1
    label_mask[1, 2:6] = 1  # padding after position 5
    label_mask[2, 7:9] = 1
    labels = ids.masked_fill(label_mask == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(token_logps(logits, ids, chunk=3), label_mask), expected, atol=1e-6, rtol=1e-6)


def test_sft_loss_on_collated_batch_equals_hf_loss(small_models):
    model = small_models["qwen2"]
    batch = collate_sft(hand_rows(1000), "student", pad_id=0)
    labels = batch["input_ids"].masked_fill(batch["label_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        got = sft_loss(model_token_logps(model, batch["input_ids"], batch["attention_mask"]), batch["label_mask"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_models_with_scaled_logits_fall_back_to_full_logits(arch):
    import transformers

    tiny = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    if arch == "granite":
        cfg, cls = transformers.GraniteConfig(logits_scaling=8.0, **tiny), transformers.GraniteForCausalLM
    else:
        cfg, cls = transformers.CohereConfig(**tiny), transformers.CohereForCausalLM
    torch.manual_seed(1)
    m = cls(cfg).eval()
    ids = torch.randint(1, 1000, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits
        naive = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        ours = model_token_logps(m, ids, mask)[:, 1:]
    assert torch.allclose(ours, naive, atol=1e-5)


def test_needed_positions_match_the_full_computation_and_its_gradient():
    model = tiny_mistral(300)
    ids, mask = right_padded([12, 9], 300)
    needed = torch.zeros_like(ids, dtype=torch.bool)
    needed[0, 5:12] = True
    needed[1, 3:9] = True
    full = naive_model_token_logps(model, ids, mask)
    part = model_token_logps(model, ids, mask, needed=needed, chunk=4)
    torch.testing.assert_close(part, full * needed, atol=1e-5, rtol=0)
    g_full = torch.autograd.grad((full * needed).sum(), list(model.parameters()), allow_unused=True)
    g_part = torch.autograd.grad(part.sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g_full, g_part):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- 8. reward accuracy counts ties as TRL


def test_reward_accuracy_counts_float_noise_ties_as_trl_does():
    """TRL's ``rewards/accuracies`` is ``chosen_rewards > rejected_rewards``: a tie is not a win. At step 0 the
    policy equals the reference, but prefkd's reference log-probs were stored by another job, so the live
    log-ratio margin is float noise (~1e-6 here) instead of an exact 0; a margin within ``TIE_NATS`` of 0 is a tie
    and counts 0, like TRL's exact tie."""
    from prefkd.core.preference import TIE_NATS

    assert 1e-6 <= TIE_NATS <= 1e-3
    ref = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-1.0, -1.0], [-2.0, -2.0]])  # rows: chosen 0, 1; rejected 0, 1
    noise = torch.tensor([[1e-6, 0.0], [-1e-6, 0.0], [0.0, -1e-6], [0.0, 1e-6]])
    ones = torch.ones_like(ref)
    out = preference_loss(PairUnits(ref + noise, ref, ones, ones), beta=0.1)
    m = out.metrics()
    assert m["rewards/accuracy"] == 0.0  # was 0.5: pair 0's +2e-6 margin counted as a win
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # real margins still count: pair 0 wins by 0.01 nats, pair 1 loses by 0.01
    real = torch.tensor([[0.01, 0.0], [0.0, 0.0], [0.0, 0.0], [0.01, 0.0]])
    assert preference_loss(PairUnits(ref + real, ref, ones, ones), beta=0.1).metrics()["rewards/accuracy"] == 0.5


def test_preference_metrics_report_the_objectives_saturation_and_weight_scale():
    """Issue 12: per step, the mean beta * margin, the share of pairs whose gradient factor sigmoid(-beta margin)
    is above 0.99, and the mean weight of each side (real units only)."""
    from prefkd.core.preference import PairUnits, preference_loss

    # two pairs, two units each: margins by hand (reference 0): chosen - rejected
    policy = torch.tensor(
        [[-1.0, -1.0], [-2.0, 0.0], [-1.0, -1.0], [-50.0, 0.0]]
    )  # [2B, M]: chosen rows, then rejected
    weights = torch.tensor([[2.0, 1.0], [1.0, 9.0], [0.5, 0.5], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # pair 1's chosen has one real unit
    out = preference_loss(PairUnits(policy, torch.zeros_like(policy), weights, mask), beta=0.5)
    m = out.metrics()
    # margins: chosen (-3, -2), rejected (-1, -50); beta * (chosen - rejected) = (-1.0, 24.0)
    assert m["objective/beta_margin"] == pytest.approx((-1.0 + 24.0) / 2)
    assert m["objective/saturated"] == 0.0  # sigmoid(1.0) = 0.73, sigmoid(-24) ~ 0
    big = preference_loss(PairUnits(policy * 10, torch.zeros_like(policy), weights, mask), beta=0.5).metrics()
    assert big["objective/saturated"] == 0.5  # beta * margin = -10: factor sigmoid(10) > 0.99
    assert m["weights/chosen"] == pytest.approx((2 + 1 + 1) / 3)  # the padded unit's 9 is not counted
    assert m["weights/rejected"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
