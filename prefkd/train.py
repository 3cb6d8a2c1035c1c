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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prefkd.errors import PrefkdError

STAGES = ("sft", "preference", "kd")
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
    ref_signals: list[str] = field(default_factory=list)  # reference log-probs from another signal set
    kd: str | None = None  # online KD term (dskd, uld, mined, cdm) on the chosen response
    kd_teacher: str | None = None  # teacher model dir for the KD term
    kd_weight: float = 0.5  # kappa of a KD stage ((1 - kappa) CE + kappa KD), alpha added to a preference loss
    temperature: float = 2.0

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


def _compute(model, batch, s: TrainSettings, kd=None):
    from prefkd.losses import model_token_logps, preference_loss, sft_loss, span_logps

    metrics: dict[str, float] = {}
    if s.stage == "kd":
        loss, metrics = _kd_term(model, batch, s, kd, with_ce=True)
        return loss, metrics
    needed = batch["label_mask"] > 0 if s.stage == "sft" else batch["unit_ids"] >= 0
    lp = model_token_logps(model, batch["input_ids"], batch["attention_mask"], needed=needed)
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
        if kd is not None:
            term, kd_metrics = _kd_term(model, batch, s, kd, with_ce=False)
            loss = loss + s.kd_weight * term
            metrics.update(kd_metrics)
            metrics["preference_loss"] = metrics["loss"]
            metrics["loss"] = float(loss.detach())
    return loss, metrics


def _kd_term(model, batch, s: TrainSettings, kd, with_ce: bool):
    """The KD term on the chosen responses (student and teacher views of the same pairs)."""
    from prefkd.kd import kd_mix
    from prefkd.losses import sft_loss, token_logps

    st, te = batch["kd_student"], batch["kd_teacher"]
    student = _response_view(model, st)
    with torch.no_grad():
        teacher = _response_view(kd.teacher_model, te)
    term, metrics = kd.loss(student, teacher)
    metrics = {f"kd/{k}": float(v) for k, v in metrics.items()}
    metrics["kd/loss"] = float(term.detach())
    if not with_ce:
        return term, metrics
    ce = sft_loss(token_logps(student.logits, student.input_ids), student.target_mask)
    loss = kd_mix(ce, term, s.kd_weight)
    metrics.update(loss=float(loss.detach()), nll=float(ce.detach()))
    return loss, metrics


def _response_view(model, view: dict):
    """A KD view of the responses only: the LM head runs on the last prompt position
    and the response positions (the prompt's vocabulary projection is never needed).

    Rows are re-packed from one position before their first response token, so
    ``logits[t]`` still predicts ``input_ids[t + 1]``; padding has unit -1, mask 0.
    """
    from prefkd.kd import KDSide

    ids, units = view["input_ids"], view["unit_ids"]
    out = model(input_ids=ids, attention_mask=view["attention_mask"], use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    is_resp = units >= 0
    start = (is_resp.float().argmax(dim=1) - 1).clamp(min=0)  # last prompt position
    end = is_resp.shape[1] - is_resp.flip(1).float().argmax(dim=1)  # one past the last response token
    width = int((end - start).max())
    pos = start[:, None] + torch.arange(width, device=ids.device)[None, :]
    valid = pos < end[:, None]
    pos = pos.clamp(max=ids.shape[1] - 1)
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
    head = getattr(model, "module", model).get_output_embeddings()
    with torch.no_grad():  # logits must really be head(hidden); else (scaled logits) take the model's own
        plain = torch.allclose(head(hidden[:, -1:]).float(), out.logits.float(), rtol=1e-3, atol=1e-4)
    if plain:
        logits = head(h)
    else:
        full = model(input_ids=ids, attention_mask=view["attention_mask"], use_cache=False).logits
        logits = full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1]))
    units_v = torch.where(valid, units.gather(1, pos), torch.full_like(pos, -1))
    return KDSide(
        logits=logits,
        hidden=h,
        input_ids=torch.where(valid, ids.gather(1, pos), torch.zeros_like(pos)),
        unit_ids=units_v,
        target_mask=(units_v >= 0).float(),
    )


class _KD:
    """The frozen teacher and the KD loss module of a stage with a KD term."""

    def __init__(self, s: TrainSettings, student_model, student_tokenizer, device):
        from prefkd.kd import build_kd
        from prefkd.models import load_model
        from prefkd.tokenizers import load_tokenizer, pad_id

        if not s.kd_teacher:
            raise PrefkdError("a KD term needs the teacher model; pass --kd-teacher DIR.")
        self.tokenizer = load_tokenizer(s.kd_teacher)
        self.pad_id = pad_id(self.tokenizer)
        self.teacher_model = load_model(s.kd_teacher).to(device).eval()
        for p in self.teacher_model.parameters():
            p.requires_grad_(False)
        self.loss = build_kd(
            s.kd,
            s.temperature,
            teacher_tokenizer=self.tokenizer,
            student_tokenizer=student_tokenizer,
            student_head=student_model.get_output_embeddings(),
            teacher_head=self.teacher_model.get_output_embeddings(),
            student_dim=student_model.config.get_text_config().hidden_size,
            teacher_dim=self.teacher_model.config.get_text_config().hidden_size,
        ).to(device)

    def trainable(self) -> list:
        """Parameters of the KD module that learn (DSKD's projectors), not the heads it borrows."""
        borrowed = {id(p) for p in self.teacher_model.parameters()}
        return [p for p in self.loss.parameters() if p.requires_grad and id(p) not in borrowed]


def _collate_fn(table, s: TrainSettings, pad_id: int, teacher_pad_id: int | None = None):
    from prefkd.batches import collate_chosen_views, collate_pairs, collate_sft

    def collate(indices):
        rows = table.rows(indices)
        if s.stage == "sft":
            return collate_sft(rows, s.role, pad_id)
        batch = {} if s.stage == "kd" else collate_pairs(rows, s.role, s.unit, pad_id, with_signals=True)
        if s.kd:
            student, teacher = collate_chosen_views(rows, pad_id, teacher_pad_id)
            batch.update(kd_student=student, kd_teacher=teacher, pair_id=student["pair_id"])
        return batch

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
        lp = model_token_logps(model, b["input_ids"], b["attention_mask"], needed=b["unit_ids"] >= 0)
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


def _cpu_only() -> bool:
    """No accelerator: tell accelerate, so torchrun-launched processes form a gloo group."""
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or xpu or torch.backends.mps.is_available())


def _write_rank_audit(ckpt_dir: Path, accelerator, model, pairs_seen: list[int]) -> None:
    """Per rank: which pairs it trained on (since the last resume) and a checksum of its parameters."""
    digest = hashlib.sha256()
    for _, p in sorted(accelerator.unwrap_model(model).named_parameters()):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    info = {"rank": accelerator.process_index, "pairs_seen": pairs_seen, "param_sha256": digest.hexdigest()}
    (ckpt_dir / f"rank-{accelerator.process_index}.json").write_text(json.dumps(info))


def train(s: TrainSettings) -> dict:
    """Run one training stage; returns the final metrics. Resumes from a matching checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from prefkd.batches import PairTable, epoch_order
    from prefkd.models import load_model, save_model
    from prefkd.tokenizers import load_tokenizer
    from prefkd.tokenizers import pad_id as pad_id_of

    if s.stage not in STAGES:
        raise PrefkdError(f"stage must be one of {', '.join(STAGES)}, got {s.stage!r}.")
    if s.stage == "preference" and not s.signals:
        raise PrefkdError("a preference stage needs signal shards (reference log-probs and weights); pass --signals.")
    # The schedule is counted in optimizer steps per process, so the scheduler steps once per sync.
    accelerator = Accelerator(
        gradient_accumulation_steps=s.grad_accum, step_scheduler_with_optimizer=False, cpu=_cpu_only()
    )
    set_seed(s.seed)
    out = Path(s.out)
    ckpt_dir = Path(s.checkpoint_dir) if s.checkpoint_dir else out.with_name(out.name + ".checkpoints")
    fingerprint = s.fingerprint()

    tokenizer = load_tokenizer(s.init)
    pad_id = pad_id_of(tokenizer)
    model = load_model(s.init, tokenizer=tokenizer)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    table = PairTable(s.tokens, s.signals if s.stage == "preference" else None, s.ref_signals or None)
    n = len(table)
    world = accelerator.num_processes
    per_process, steps_per_epoch, total_steps, warmup = schedule_lengths(
        n, s.batch_size, world, s.grad_accum, s.epochs, s.warmup_ratio
    )
    if s.stage == "kd" and not s.kd:
        raise PrefkdError("a kd stage needs a KD term; pass --kd dskd|uld|mined|cdm.")
    kd = _KD(s, model, tokenizer, accelerator.device) if s.kd else None
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kd is not None and kd.trainable():
        groups.append({"params": kd.trainable(), "weight_decay": 0.0})
    # fused AdamW: one kernel over all parameters (much less time and temporary memory than the for-loop)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=s.lr, fused=fused)
    scheduler = get_scheduler(s.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # DeepSpeed sizes its buffers from these; our loaders are made per epoch
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = s.batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = s.grad_accum
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, batches_done = 0, 0, 0
    resume = _latest_checkpoint(ckpt_dir, fingerprint)
    if resume is not None:
        accelerator.load_state(str(resume))
        info = json.loads((resume / STATE_FILE).read_text())
        step, epoch, batches_done = info["step"], info["epoch"], info["batches_done"]
        accelerator.print(f"resuming from {resume} at step {step}")

    metrics_path = ckpt_dir / "metrics.jsonl"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and metrics_path.exists():
        # a fresh run starts a new log; a resumed one drops what was logged after its checkpoint
        kept = [] if resume is None else [
            line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step
        ]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    collate = _collate_fn(table, s, pad_id, kd.pad_id if kd is not None else None)
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc=f"{s.stage} {out.name}")
    window: list[dict] = []
    pairs_seen: list[int] = []  # this rank's pair ids, for the data-parallel audit
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
                loss, metrics = _compute(model, batch, s, kd)
                accelerator.backward(loss)
                if accelerator.sync_gradients and s.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            seen += 1
            pairs_seen.extend(int(p) for p in batch["pair_id"].tolist())
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

    _write_rank_audit(ckpt_dir, accelerator, model, pairs_seen)
    accelerator.wait_for_everyone()
    final = {"step": step, "epochs": s.epochs, "pairs": n, "world": world, "seconds": round(time.time() - started, 2)}
    unwrapped = accelerator.unwrap_model(model)
    if s.stage != "sft" and s.eval_tokens and s.eval_signals and accelerator.is_main_process:
        from prefkd.batches import PairTable as _PT

        held_out = _PT(s.eval_tokens, s.eval_signals)
        unit = held_out.signal_unit or s.unit
        final["eval"] = evaluate_preference(unwrapped, held_out, TrainSettings(**{**asdict(s), "unit": unit}), pad_id)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_model(unwrapped, tokenizer, out, state_dict=state_dict)
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
    p.add_argument("--eval-tokens", nargs="*", default=[], help="held-out token shards for the final preference accuracy")
    p.add_argument("--eval-signals", nargs="*", default=[], help="their signal shards (the reference of the implicit reward)")
    p.add_argument("--ref-signals", nargs="*", default=[], help="signal shards whose reference log-probs replace those of --signals")
    p.add_argument("--kd", default=None, choices=("dskd", "uld", "mined", "cdm"), help="online KD term on the chosen response")
    p.add_argument("--kd-teacher", default=None, help="teacher model dir for --kd")
    p.add_argument("--kd-weight", type=float, default=0.5, help="kappa of a kd stage, or alpha added to a preference loss")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature")
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
