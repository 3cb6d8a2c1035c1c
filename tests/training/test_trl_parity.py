"""prefkd's student DPO trained side by side with TRL's ``DPOTrainer`` on the same token ids.

Both start from one tiny Qwen2 model (built here from a config, no download), see the same pairs in the same
order (prefkd's epoch order; TRL samples sequentially), use the same reference log-probs (prefkd's signal shard,
given to TRL as its precomputed reference), the same AdamW, cosine schedule, warm-up, clipping and beta. The loss,
the rewards and the learning rate of every step must agree. Also: the warm-up length follows transformers'
rule, ``ceil(warmup_ratio * steps)``, for every step count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from prefkd.assets.models import load_model, save_model
from prefkd.data.batches import epoch_order
from prefkd.data.demo import generate_demo_pairs
from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs
from prefkd.io.shards import read_shard, write_shard
from prefkd.training.engine import TrainSettings, schedule_lengths, train
from prefkd.training.signals import WeightSpec, run_shard

PAIRS, BATCH = 8, 2  # 4 optimizer steps
LR, BETA, WARMUP = 1e-2, 0.1, 0.3  # warm-up ceil(0.3 * 4) = 2 steps (the old round() gave 1)


def test_warmup_steps_follow_transformers():
    """``schedule_lengths`` warms up for ``ceil(ratio * steps)`` steps, as ``TrainingArguments.get_warmup_steps``
    does (``round`` disagreed for 90 of the step counts 1-200 at ratio 0.1, and gave no warm-up below half a step)."""
    get_warmup_steps = transformers.TrainingArguments.get_warmup_steps  # reads only ``self.warmup_steps``
    differ = 0
    for ratio in (0.1, 0.03, 0.25):
        args = SimpleNamespace(warmup_steps=ratio)  # below 1: a ratio of the steps
        for steps in range(1, 201):
            _, _, total, warmup = schedule_lengths(steps * 4, 4, 1, 1, 1.0, ratio)
            assert total == steps
            assert warmup == get_warmup_steps(args, steps), (ratio, steps)
            differ += ratio == 0.1 and warmup != round(0.1 * steps)
    assert differ == 90
    assert schedule_lengths(64 * 4, 4, 1, 1, 1.0, 0.1)[3] == 7  # the demo's 64-step student DPO (round: 6)
    assert schedule_lengths(4 * 4, 4, 1, 1, 1.0, 0.1)[3] == 1  # 0.4 of a step still warms up (round: 0)
    assert schedule_lengths(100, 4, 2, 3, 2, 0.0)[3] == 0


@pytest.fixture(scope="module")
def same_start(tmp_path_factory, teacher_tokenizer):
    """A token shard (the teacher tokenizer for both roles), a tiny Qwen2 model and its reference signal shard."""
    root = tmp_path_factory.mktemp("trl-parity")
    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(PAIRS, seed=1))]
    m = ModelTokens(teacher_tokenizer)
    table, stats = tokenize_pairs(records, m, m, max_length=96, max_prompt_length=48)
    tokens = root / "tokens.arrow"
    write_shard(table, tokens, kind="tokens", stats=stats)
    torch.manual_seed(1)
    config = transformers.Qwen2Config(
        vocab_size=len(teacher_tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=teacher_tokenizer.bos_token_id,
        eos_token_id=teacher_tokenizer.eos_token_id,
        pad_token_id=teacher_tokenizer.pad_token_id,
    )
    init = root / "init"
    save_model(transformers.Qwen2ForCausalLM(config), teacher_tokenizer, init)
    ref = root / "ref.arrow"
    run_shard(tokens, ref, "student", "token", str(init), None, None, WeightSpec(transform="uniform"))
    return {"root": root, "tokens": tokens, "init": init, "ref": ref}


def _prefkd_run(start) -> list[dict]:
    s = TrainSettings(
        stage="preference",
        init=str(start["init"]),
        out=str(start["root"] / "prefkd"),
        tokens=[str(start["tokens"])],
        signals=[str(start["ref"])],
        role="student",
        unit="token",
        beta=BETA,
        lr=LR,
        epochs=1,
        batch_size=BATCH,
        warmup_ratio=WARMUP,
        weight_decay=0.0,
        max_grad_norm=1.0,
        scheduler="cosine",
        seed=1,
        checkpoint_dir=str(start["root"] / "prefkd.ckpt"),
    )
    train(s)
    return [json.loads(line) for line in (Path(s.out) / "metrics.jsonl").read_text().splitlines()]


def _trl_dataset(start, seed: int = 1):
    """The shard's student ids in prefkd's epoch-0 order, with the shard's summed reference log-probs."""
    from datasets import Dataset

    rows = read_shard(start["tokens"]).to_pylist()
    refs = {r["pair_id"]: r for r in read_shard(start["ref"], "signals").to_pylist()}
    out = []
    for i in epoch_order(len(rows), seed, 0):
        row = rows[i]
        p, chosen, rejected = (
            row["student_prompt_len"],
            row["student_chosen_input_ids"],
            row["student_rejected_input_ids"],
        )
        assert chosen[:p] == rejected[:p]
        ref = refs[row["pair_id"]]
        out.append(
            {
                "prompt_ids": chosen[:p],
                "chosen_ids": chosen[p:],
                "rejected_ids": rejected[p:],
                "ref_chosen_logps": math.fsum(ref["chosen_ref_logps"]),
                "ref_rejected_logps": math.fsum(ref["rejected_ref_logps"]),
            }
        )
    return Dataset.from_list(out)


def _trl_run(start, tokenizer) -> list[dict]:
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's trainer on a dataset that already holds TRL's token columns and its precomputed reference."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _precompute_ref_logps(self, dataset, *args, **kwargs):
            return dataset

    args = DPOConfig(
        output_dir=str(start["root"] / "trl"),
        beta=BETA,
        learning_rate=LR,
        num_train_epochs=1,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,  # below 1: a ratio of the steps
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # prefkd's AdamW (torch, fused on CPU)
        precompute_ref_log_probs=True,
        train_sampling_strategy="sequential",
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = PretokenizedDPOTrainer(
        model=load_model(str(start["init"])),
        args=args,
        train_dataset=_trl_dataset(start),
        processing_class=tokenizer,
    )
    assert trainer.loss_types == ["sigmoid"] and trainer.precompute_ref_logps and trainer.ref_model is None
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def test_student_dpo_matches_trl_step_by_step(same_start, teacher_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = _prefkd_run(same_start)
    theirs = _trl_run(same_start, teacher_tokenizer)
    assert len(ours) == len(theirs) == PAIRS // BATCH
    for a, b in zip(ours, theirs, strict=True):
        print(f"step {a['step']}: loss {a['loss']:.8f} / {b['loss']:.8f}, lr {a['lr']:.3e} / {b['learning_rate']:.3e}")
    loss_ours, loss_trl = [r["loss"] for r in ours], [r["loss"] for r in theirs]
    assert max(abs(x - y) for x, y in zip(loss_ours, loss_trl)) < 1e-5
    assert abs(loss_ours[-1] - math.log(2)) > 1e-3  # the policy really moved
    # the rate each step used: 0 and LR / 2 while warming up (2 steps), then the cosine decay
    assert [r["lr"] for r in ours] == pytest.approx([r["learning_rate"] for r in theirs], rel=1e-9, abs=1e-15)
    assert ours[0]["lr"] == 0.0 and ours[1]["lr"] == pytest.approx(LR / 2)
    for ours_key, trl_key in (
        ("rewards/chosen",) * 2,
        ("rewards/rejected",) * 2,
        ("rewards/margin", "rewards/margins"),
    ):
        assert [r[ours_key] for r in ours] == pytest.approx([r[trl_key] for r in theirs], abs=1e-5), ours_key
