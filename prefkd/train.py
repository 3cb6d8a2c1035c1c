"""One training engine for every stage (SFT, DPO, reversed DPO, CTPD, TIS-DPO, KD).

Built on accelerate, which does what we must not rewrite: device placement,
mixed precision, gradient accumulation, DDP / DeepSpeed ZeRO / FSDP (chosen by
the `accelerate launch --config_file configs/accelerate/<name>.yaml` that runs
this module), and saving/restoring the full training state. What is ours: the
data order, the loss, the schedule derived from data size, and an exact resume.

The preference loss never runs a reference model: reference unit log-probs come
precomputed in signal shards (see prefkd.signals), as do the unit weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prefkd.errors import PrefkdError

STAGES = ("sft", "preference")
STATE_FILE = "prefkd_state.json"


@dataclass
class TrainSettings:
    stage: str
    init: str
    out: str
    tokens: list[str]
    role: str = "teacher"
    signals: list[str] = field(default_factory=list)
    unit: str = "token"
    beta: float = 0.1
    lr: float = 1e-5
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "cosine"
    seed: int = 1
    gradient_checkpointing: bool = False
    checkpoint_dir: str | None = None
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end of an epoch)
    keep_checkpoints: int = 1
    log_every: int = 1
    stop_after: int = 0  # stop (as if interrupted) after this many optimizer steps; for resume tests
    eval_tokens: list[str] = field(default_factory=list)
    eval_signals: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("out", "checkpoint_dir", "stop_after", "log_every", "save_every", "keep_checkpoints")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def schedule_lengths(num_pairs: int, batch_size: int, world: int, grad_accum: int, epochs: float, warmup_ratio: float):
    """(micro-batches per epoch per process, optimizer steps per epoch, total steps, warm-up steps)."""
    per_process = math.ceil(num_pairs / (batch_size * world))
    steps_per_epoch = math.ceil(per_process / grad_accum)
    total = max(1, math.ceil(steps_per_epoch * epochs))
    return per_process, steps_per_epoch, total, int(round(warmup_ratio * total))


class _Indices(torch.utils.data.Dataset):
    def __init__(self, order):
        self.order = order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.order[i]


def _latest_checkpoint(ckpt_dir: Path, fingerprint: str) -> Path | None:
    if not ckpt_dir.exists():
        return None
    found = []
    for d in ckpt_dir.glob("step-*"):
        state = d / STATE_FILE
        if state.exists():
            info = json.loads(state.read_text())
            if info.get("fingerprint") == fingerprint:
                found.append((info["step"], d))
    return max(found)[1] if found else None


def _compute(model, batch, s: TrainSettings, extra_loss=None):
    from prefkd.losses import model_token_logps, preference_loss, sft_loss, span_logps

    lp = model_token_logps(model, batch["input_ids"], batch["attention_mask"])
    if s.stage == "sft":
        loss = sft_loss(lp, batch["label_mask"])
        metrics = {"loss": float(loss.detach()), "nll": float(loss.detach())}
    else:
        m = batch["unit_mask"].shape[1]
        units = span_logps(lp, batch["unit_ids"], m)
        pc, pr = units.chunk(2)
        rc, rr = batch["ref_logps"].chunk(2)
        wc, wr = batch["weights"].chunk(2)
        mc, mr = batch["unit_mask"].chunk(2)
        out = preference_loss(pc, pr, rc, rr, wc, wr, mc, mr, s.beta)
        loss = out.loss
        metrics = out.metrics()
    if extra_loss is not None:
        term, extra_metrics = extra_loss(model, batch)
        loss = loss + term
        metrics.update(extra_metrics)
        metrics["loss"] = float(loss.detach())
    return loss, metrics


def _collate_fn(table, s: TrainSettings, pad_id: int):
    from prefkd.batches import collate_pairs, collate_sft

    def collate(indices):
        rows = table.rows(indices)
        if s.stage == "sft":
            return collate_sft(rows, s.role, pad_id)
        return collate_pairs(rows, s.role, s.unit, pad_id, with_signals=True)

    return collate


@torch.no_grad()
def evaluate_preference(model, table, s: TrainSettings, pad_id: int, batch_size: int = 8) -> dict:
    """Held-out preference accuracy and mean reward margin (implicit reward, same loss units)."""
    from prefkd.batches import collate_pairs
    from prefkd.losses import model_token_logps, preference_loss, span_logps

    was_training = model.training
    model.eval()
    correct = total = 0
    margin_sum = loss_sum = 0.0
    device = next(model.parameters()).device
    for start in range(0, len(table), batch_size):
        rows = table.rows(range(start, min(start + batch_size, len(table))))
        b = collate_pairs(rows, s.role, s.unit, pad_id, with_signals=True)
        b = {k: v.to(device) for k, v in b.items()}
        lp = model_token_logps(model, b["input_ids"], b["attention_mask"])
        units = span_logps(lp, b["unit_ids"], b["unit_mask"].shape[1])
        pc, pr = units.chunk(2)
        rc, rr = b["ref_logps"].chunk(2)
        wc, wr = b["weights"].chunk(2)
        mc, mr = b["unit_mask"].chunk(2)
        out = preference_loss(pc, pr, rc, rr, wc, wr, mc, mr, s.beta)
        margin = out.reward_chosen - out.reward_rejected
        correct += int((margin > 0).sum())
        total += len(rows)
        margin_sum += float(margin.sum())
        loss_sum += float(out.losses.sum())
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "margin": margin_sum / max(total, 1), "loss": loss_sum / max(total, 1), "pairs": total}


def train(s: TrainSettings, extra_loss_factory=None) -> dict:
    """Run one training stage; returns the final metrics. Resumes from a matching checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from prefkd.batches import PairTable, epoch_order
    from prefkd.models import load_model, save_model
    from prefkd.tokenizers import load_tokenizer

    if s.stage not in STAGES:
        raise PrefkdError(f"stage must be one of {', '.join(STAGES)}, got {s.stage!r}.")
    if s.stage == "preference" and not s.signals:
        raise PrefkdError("a preference stage needs signal shards (reference log-probs and weights); pass --signals.")
    # The schedule is counted in optimizer steps per process, so the scheduler steps once per sync.
    accelerator = Accelerator(gradient_accumulation_steps=s.grad_accum, step_scheduler_with_optimizer=False)
    set_seed(s.seed)
    out = Path(s.out)
    ckpt_dir = Path(s.checkpoint_dir) if s.checkpoint_dir else out.with_name(out.name + ".checkpoints")
    fingerprint = s.fingerprint()

    tokenizer = load_tokenizer(s.init)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(s.init, tokenizer=tokenizer)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    table = PairTable(s.tokens, s.signals if s.stage == "preference" else None)
    n = len(table)
    world = accelerator.num_processes
    per_process, steps_per_epoch, total_steps, warmup = schedule_lengths(
        n, s.batch_size, world, s.grad_accum, s.epochs, s.warmup_ratio
    )
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=s.lr
    )
    scheduler = get_scheduler(s.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, batches_done = 0, 0, 0
    resume = _latest_checkpoint(ckpt_dir, fingerprint)
    if resume is not None:
        accelerator.load_state(str(resume))
        info = json.loads((resume / STATE_FILE).read_text())
        step, epoch, batches_done = info["step"], info["epoch"], info["batches_done"]
        accelerator.print(f"resuming from {resume} at step {step}")

    metrics_path = ckpt_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if resume is None and metrics_path.exists():
            metrics_path.unlink()
    collate = _collate_fn(table, s, pad_id)
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc=f"{s.stage} {out.name}")
    window: list[dict] = []
    started = time.time()
    interrupted = False

    def save_checkpoint(batches_in_epoch: int, ep: int):
        path = ckpt_dir / f"step-{step:07d}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            (path / STATE_FILE).write_text(
                json.dumps({"step": step, "epoch": ep, "batches_done": batches_in_epoch, "fingerprint": fingerprint})
            )
            old = sorted(ckpt_dir.glob("step-*"))[: -s.keep_checkpoints] if s.keep_checkpoints > 0 else []
            for d in old:
                shutil.rmtree(d, ignore_errors=True)
        accelerator.wait_for_everyone()

    model.train()
    num_epochs = math.ceil(s.epochs)
    while step < total_steps and epoch < num_epochs:
        order = epoch_order(n, s.seed, epoch)
        loader = torch.utils.data.DataLoader(_Indices(order), batch_size=s.batch_size, shuffle=False, collate_fn=collate)
        loader = accelerator.prepare_data_loader(loader)
        if batches_done:
            loader = accelerator.skip_first_batches(loader, batches_done)
        seen = batches_done
        for batch in loader:
            with accelerator.accumulate(model):
                loss, metrics = _compute(model, batch, s, extra_loss_factory)
                accelerator.backward(loss)
                if accelerator.sync_gradients and s.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            seen += 1
            window.append(metrics)
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                if step % s.log_every == 0 or step == total_steps:
                    row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                    reduced = accelerator.reduce(torch.tensor(list(row.values()), device=accelerator.device), "mean")
                    row = dict(zip(row, (float(x) for x in reduced)))
                    row.update(step=step, epoch=round(epoch + seen / per_process, 4), lr=scheduler.get_last_lr()[0])
                    if accelerator.is_main_process:
                        with metrics_path.open("a") as fh:
                            fh.write(json.dumps(row, sort_keys=True) + "\n")
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    window = []
                if s.save_every and step % s.save_every == 0:
                    save_checkpoint(seen, epoch)
                if s.stop_after and step >= s.stop_after:
                    interrupted = True
                    break
                if step >= total_steps:
                    break
        if interrupted:
            break
        epoch += 1
        batches_done = 0
    bar.close()
    if interrupted:
        accelerator.print(f"stopped after step {step} as asked (--stop-after); rerun to resume")
        return {"step": step, "interrupted": True}

    accelerator.wait_for_everyone()
    final = {"step": step, "epochs": s.epochs, "pairs": n, "world": world, "seconds": round(time.time() - started, 2)}
    unwrapped = accelerator.unwrap_model(model)
    if s.stage == "preference" and s.eval_tokens and accelerator.is_main_process:
        from prefkd.batches import PairTable as _PT

        held_out = _PT(s.eval_tokens, s.eval_signals)
        final["eval"] = evaluate_preference(unwrapped, held_out, s, pad_id)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_model(unwrapped, tokenizer, out)  # TODO state_dict for ZeRO-3
        shutil.copy(metrics_path, out / "metrics.jsonl")
        (out / "train_summary.json").write_text(json.dumps({"settings": asdict(s), "final": final}, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--init", required=True, help="model dir to start from (HF dir with tokenizer)")
    p.add_argument("--out", required=True, help="model dir to write")
    p.add_argument("--tokens", nargs="+", required=True, help="token shards (train split)")
    p.add_argument("--signals", nargs="*", default=[], help="signal shards with weights and reference log-probs")
    p.add_argument("--role", choices=("teacher", "student"), default="teacher", help="whose token ids to train on")
    p.add_argument("--unit", choices=("token", "span"), default="token")
    p.add_argument("--eval-tokens", nargs="*", default=[])
    p.add_argument("--eval-signals", nargs="*", default=[])
    defaults = TrainSettings(stage="sft", init="", out="", tokens=[])
    for name in ("beta", "lr", "epochs", "warmup_ratio", "weight_decay", "max_grad_norm"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    for name in ("batch_size", "grad_accum", "seed", "save_every", "keep_checkpoints", "log_every", "stop_after"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--scheduler", default=defaults.scheduler)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")


def settings_from_args(args) -> TrainSettings:
    fields = TrainSettings.__dataclass_fields__
    return TrainSettings(**{k: v for k, v in vars(args).items() if k in fields})


def run(args) -> int:
    final = train(settings_from_args(args))
    print(json.dumps(final, sort_keys=True))
    return 0
