"""One training engine for every stage (SFT, DPO, reversed DPO, CTPD, TIS-DPO, KD).

Built on accelerate, which does what we must not rewrite: device placement,
mixed precision, gradient accumulation, DDP / DeepSpeed ZeRO / FSDP (chosen by
the `accelerate launch --config_file configs/accelerate/<name>.yaml` that runs
this module), and saving/restoring the full training state. What is ours: the
data order, the schedule derived from data size, and an exact resume. What
differs between stages (batches, loss, extra parameters) is a stage object of
prefkd.training.stages.

The preference loss never runs a reference model: reference unit log-probs come
precomputed in signal shards (see prefkd.training.signals), as do the unit weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from prefkd.assets.models import load_model, save_model
from prefkd.assets.tokenizers import load_tokenizer
from prefkd.core.preference import preference_loss
from prefkd.data.batches import PairTable, collate_pairs, epoch_order
from prefkd.errors import PrefkdError
from prefkd.io.files import write_json
from prefkd.training.grid import read_selected_lr
from prefkd.training.runinfo import collect_run_info
from prefkd.training.settings import TrainSettings
from prefkd.training.stages import Stage, pair_units, stage_class

STATE_FILE = "prefkd_state.json"


def schedule_lengths(num_pairs: int, batch_size: int, world: int, grad_accum: int, epochs: float, warmup_ratio: float):
    """(micro-batches per epoch per process, optimizer steps per epoch, total steps, warm-up steps).

    Warm-up: ``ceil(total * warmup_ratio)`` steps, transformers' rule (``TrainingArguments.get_warmup_steps``), so
    a ratio that asks for any warm-up gets at least one step and a run matches a ``Trainer`` / TRL run step by step.
    """
    per_process = math.ceil(num_pairs / (batch_size * world))
    steps_per_epoch = math.ceil(per_process / grad_accum)
    total = max(1, math.ceil(steps_per_epoch * epochs))
    return per_process, steps_per_epoch, total, math.ceil(total * warmup_ratio)


class _Indices(torch.utils.data.Dataset):
    def __init__(self, order):
        self.order = order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.order[i]


RUN_RECORDS = ("metrics.jsonl", "train_summary.json")  # what a training run writes beside a model: not an input


def input_files(s: TrainSettings) -> list[Path]:
    """Every file a run of ``s`` reads: the files of the initial model (and of a KD teacher) and every shard."""
    dirs = [Path(s.init)] + ([Path(s.kd_teacher)] if s.kd and s.kd_teacher else [])
    files = [
        f
        for d in dirs
        if d.is_dir()
        for f in sorted(d.iterdir())
        if f.is_file() and not f.name.startswith(".") and f.name not in RUN_RECORDS
    ]
    shards = [*s.tokens, *s.signals, *s.ref_signals, *s.eval_tokens, *s.eval_signals]
    return files + [Path(p) for p in shards]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's contents, read in chunks ("missing" when there is no such file)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        return "missing"


def _step_of(path: Path) -> int:
    """The step in a checkpoint dir's name ``step-NNNNNNN`` (-1 if none)."""
    digits = path.name.removeprefix("step-")
    return int(digits) if digits.isdigit() else -1


@dataclass
class Checkpoints:
    """The resumable checkpoints ``step-NNNNNNN/`` of one run, each with the data position it was taken at.

    A checkpoint resumes only the same job on the same inputs: its state file records the settings'
    fingerprint and the sha256 of every input file, and the size of every file of the checkpoint (a
    checkpoint whose state file is unreadable, or whose files are missing or truncated, counts as absent).
    """

    root: Path
    fingerprint: str  # TrainSettings.fingerprint(): a checkpoint of other settings is never resumed
    files: list[Path]  # input_files(): a checkpoint taken on other contents of them is never resumed
    keep: int  # newest checkpoints kept while the run goes on (0: all)
    saving: bool  # whether this run takes checkpoints (its inputs are then hashed as it starts)
    last_step: int = -1  # the step of this run's newest checkpoint (-1: none)
    resumed_from: int | None = None  # the step of the checkpoint this run resumed (None: a fresh start)

    @cached_property
    def inputs(self) -> dict[str, str]:
        """{input file: sha256 of its contents}, computed once per run."""
        return {str(f): file_sha256(f) for f in self.files}

    def _verdict(self, path: Path) -> tuple[dict | None, str]:
        """(the state of checkpoint ``path`` if this run may resume it, else None; why not)."""
        try:
            info = json.loads((path / STATE_FILE).read_text())
            step, files = int(info["step"]), dict(info["files"])
            int(info["epoch"]), int(info["batches_done"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"its {STATE_FILE} is missing, unreadable or from another prefkd version"
        if step != _step_of(path):
            return None, f"its {STATE_FILE} names step {step}"
        for name, size in files.items():
            if not (path / name).is_file() or (path / name).stat().st_size != size:
                return None, f"it is incomplete ({name} is missing or truncated)"
        if info.get("fingerprint") != self.fingerprint:
            return None, "it was taken under other training settings"
        theirs = info.get("inputs") or {}
        changed = [f for f, digest in self.inputs.items() if theirs.get(f) != digest]
        if changed or theirs.keys() != self.inputs.keys():
            return None, f"the contents of {changed[0] if changed else 'its input files'} changed since it was taken"
        return info, ""

    def resume(self, accelerator) -> tuple[int, int, int]:
        """(step, epoch, batches done in that epoch) of the latest checkpoint this run may resume, whose state
        is restored; (0, 0, 0) without one. Checkpoints it may not resume are removed, and the newest of them
        is named in the log with the reason."""
        dirs = sorted(self.root.glob("step-*"), key=_step_of) if self.root.exists() else []
        if dirs or self.saving:
            self.inputs  # noqa: B018 - hashed once, as the run starts
        verdicts = [(d, *self._verdict(d)) for d in dirs]
        usable = [(d, info) for d, info, _ in verdicts if info is not None]
        path, info = usable[-1] if usable else (None, None)
        refused = [(d, why) for d, found, why in verdicts if found is None]
        if refused and (path is None or _step_of(refused[-1][0]) > _step_of(path)):  # one line: the newest refused
            then = f"resuming {path.name} instead" if path is not None else "starting fresh"
            accelerator.print(f"not resuming from {refused[-1][0]}: {refused[-1][1]}; {then}")
        accelerator.wait_for_everyone()  # every process has judged them before any is removed
        if accelerator.is_main_process:
            for d, found, _ in verdicts:
                if found is None:
                    shutil.rmtree(d, ignore_errors=True)
        if path is None:
            return 0, 0, 0
        accelerator.load_state(str(path))
        accelerator.print(f"resuming from {path} at step {info['step']}")
        self.last_step = self.resumed_from = info["step"]
        return info["step"], info["epoch"], info["batches_done"]

    def save(self, accelerator, step: int, epoch: int, batches_done: int) -> None:
        """Checkpoint ``step`` (all processes take part); its state file is written last, atomically, and the
        oldest checkpoints beyond ``keep`` are removed."""
        path = self.root / f"step-{step:07d}"
        accelerator.save_state(str(path))
        accelerator.wait_for_everyone()  # every process's part is written before the state file lists it
        if accelerator.is_main_process:
            files = {
                f.relative_to(path).as_posix(): f.stat().st_size
                for f in sorted(path.rglob("*"))
                if f.is_file() and f.name != STATE_FILE
            }
            state = {"step": step, "epoch": epoch, "batches_done": batches_done, "fingerprint": self.fingerprint}
            write_json(path / STATE_FILE, {**state, "inputs": self.inputs, "files": files})  # temp file + rename
            old = sorted(self.root.glob("step-*"), key=_step_of)[: -self.keep] if self.keep > 0 else []
            for d in old:
                shutil.rmtree(d, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_step = step

    def finish(self, accelerator, keep_final: bool) -> None:
        """After the final model is saved: remove the checkpoints (optimizer state), all of them or, with
        ``keep_final``, all but the one of the final step."""
        if accelerator.is_main_process:
            for d in self.root.glob("step-*"):
                if not (keep_final and _step_of(d) == self.last_step):
                    shutil.rmtree(d, ignore_errors=True)


class MetricsLog:
    """``metrics.jsonl``: one row per logged optimizer step, the mean of its micro-batches over all processes."""

    def __init__(self, path: Path, accelerator, step: int):
        """The log of a run at ``step``: a fresh run (step 0) starts a new log, a resumed one drops what was
        logged after its checkpoint."""
        self.path, self.accelerator = path, accelerator
        if accelerator.is_main_process and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step] if step else []
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, window: list[dict], **extra) -> dict:
        """Append the mean of the micro-batch metrics in ``window`` (plus ``extra``); returns the row."""
        row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
        values = torch.tensor(list(row.values()), device=self.accelerator.device)  # [K]
        row = dict(zip(row, (float(x) for x in self.accelerator.reduce(values, "mean")), strict=True))
        row.update(extra)
        if self.accelerator.is_main_process:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        return row


@torch.no_grad()
def evaluate_preference(model, table, s: TrainSettings, pad_id: int, batch_size: int = 8) -> dict:
    """Held-out preference accuracy and mean reward margin (implicit reward, same loss units)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    margin_sum = loss_sum = 0.0
    device = next(model.parameters()).device
    for start in range(0, len(table), batch_size):
        rows = table.rows(range(start, min(start + batch_size, len(table))))
        batch = {k: v.to(device) for k, v in collate_pairs(rows, s.role, s.unit, pad_id, with_signals=True).items()}
        out = preference_loss(pair_units(model, batch), s.beta)
        margin = out.reward_chosen - out.reward_rejected  # [B]
        correct += int((margin > 0).sum())
        total += len(rows)
        margin_sum += float(margin.sum())
        loss_sum += float(out.losses.sum())
    model.train(was_training)
    return {
        "accuracy": correct / max(total, 1),
        "margin": margin_sum / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "pairs": total,
    }


def _cpu_only() -> bool:
    """No accelerator: tell accelerate, so torchrun-launched processes form a gloo group."""
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or xpu or torch.backends.mps.is_available())


def _start(s: TrainSettings):
    """The accelerator of this process, the seed set."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # The schedule is counted in optimizer steps per process, so the scheduler steps once per sync.
    accelerator = Accelerator(
        gradient_accumulation_steps=s.grad_accum, step_scheduler_with_optimizer=False, cpu=_cpu_only()
    )
    set_seed(s.seed)
    return accelerator


def _load_policy(s: TrainSettings, tokenizer):
    """The model to train, from ``s.init``."""
    model = load_model(s.init, tokenizer=tokenizer, dtype=s.dtype, attn_implementation=s.attn_implementation)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _optimizer(s: TrainSettings, model, extra: list, warmup: int, total_steps: int):
    """AdamW (weight decay on matrices only) over the model and a stage's ``extra`` parameters, and its schedule."""
    from transformers import get_scheduler

    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    # fused AdamW: one kernel over all parameters (much less time and temporary memory than the for-loop)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=s.lr, fused=fused)
    return optimizer, get_scheduler(s.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _prepare(accelerator, s: TrainSettings, model, optimizer, scheduler):
    """Model, optimizer and schedule wrapped for the launch's strategy (DDP, DeepSpeed, FSDP or one process)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # DeepSpeed sizes its buffers from these; our loaders are made per epoch
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = s.batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = s.grad_accum
    return accelerator.prepare(model, optimizer, scheduler)


def _epoch_batches(accelerator, table: PairTable, stage: Stage, s: TrainSettings, epoch: int, skip: int):
    """The micro-batches of one epoch: its seeded order, split over the processes, less the first ``skip``."""
    order = epoch_order(len(table), s.seed, epoch)
    collate = lambda indices: stage.collate(table.rows(indices))  # noqa: E731
    loader = torch.utils.data.DataLoader(_Indices(order), batch_size=s.batch_size, shuffle=False, collate_fn=collate)
    loader = accelerator.prepare_data_loader(loader)
    return accelerator.skip_first_batches(loader, skip) if skip else loader


def _watches_grad_norm(accelerator) -> bool:
    """Whether a NaN or infinite gradient norm means a broken run: not under fp16 loss scaling, whose
    overflows only skip a step, nor under DeepSpeed or FSDP, which keep the norm themselves."""
    from accelerate.utils import DistributedType

    kept_elsewhere = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA)
    return accelerator.mixed_precision != "fp16" and accelerator.distributed_type not in kept_elsewhere


def _backward_and_step(accelerator, model, optimizer, scheduler, loss, max_grad_norm: float):
    """Backward; on the micro-batch that ends an accumulation, clip and step (accelerate skips the rest).
    Returns the gradient norm of a step that ends an accumulation where it is known, else None."""
    accelerator.backward(loss)
    norm = None
    if accelerator.sync_gradients and max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    elif accelerator.sync_gradients and _watches_grad_norm(accelerator):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad()
    return norm


def _check_finite(accelerator, s: TrainSettings, step: int, window: list[dict], norm) -> None:
    """Stop the stage, on every process at once, when a loss since the last log row or this step's gradient
    norm is NaN or infinite (before this step is logged or saved)."""
    bad_loss = any(not math.isfinite(m["loss"]) for m in window)
    bad_norm = norm is not None and _watches_grad_norm(accelerator) and not math.isfinite(float(norm))
    flags = accelerator.reduce(torch.tensor([float(bad_loss), float(bad_norm)], device=accelerator.device), "sum")
    if float(flags.sum()) > 0:
        what = "loss" if float(flags[0]) > 0 else "gradient norm"
        raise PrefkdError(
            f"the {s.stage} stage writing {s.out} stopped at optimizer step {step} because its {what} is NaN or "
            "infinite, before anything of that step was saved; check its input shards (weights, reference "
            "log-probs) and its learning rate."
        )


def _write_rank_audit(ckpt_dir: Path, accelerator, model, pairs_seen: list[int]) -> None:
    """Per rank: which pairs it trained on (since the last resume) and a checksum of its parameters."""
    digest = hashlib.sha256()
    for _, p in sorted(accelerator.unwrap_model(model).named_parameters()):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    info = {"rank": accelerator.process_index, "pairs_seen": pairs_seen, "param_sha256": digest.hexdigest()}
    (ckpt_dir / f"rank-{accelerator.process_index}.json").write_text(json.dumps(info))


def _held_out_eval(accelerator, model, s: TrainSettings, pad_id: int) -> dict:
    """``{"eval": ...}``: preference accuracy on the held-out shards (main process, not after SFT), else {}."""
    if s.stage == "sft" or not (s.eval_tokens and s.eval_signals) or not accelerator.is_main_process:
        return {}
    held_out = PairTable(s.eval_tokens, s.eval_signals)
    unit = held_out.signal_unit or s.unit  # the units the held-out reference was computed on
    return {
        "eval": evaluate_preference(
            accelerator.unwrap_model(model), held_out, dataclasses.replace(s, unit=unit), pad_id
        )
    }


def _save(
    accelerator, model, tokenizer, s: TrainSettings, final: dict, metrics_path: Path, resumed: int | None
) -> None:
    """The trained model with its tokenizer, its metrics.jsonl and train_summary.json (with where and how the job
    ran, prefkd.training.runinfo); ends training."""
    state_dict = accelerator.get_state_dict(model)  # every process takes part (sharded strategies)
    if accelerator.is_main_process:
        out = Path(s.out)
        save_model(accelerator.unwrap_model(model), tokenizer, out, state_dict=state_dict)
        shutil.copy(metrics_path, out / "metrics.jsonl")
        summary = {
            "settings": asdict(s),
            "final": final,
            "runtime": collect_run_info(accelerator.num_processes, resumed),
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def train(s: TrainSettings) -> dict:
    """Run one training stage; returns the final metrics. Resumes from the checkpoint of the same settings
    and input contents, if any; a finished stage keeps no checkpoint unless ``keep_final_checkpoint``."""
    from tqdm.auto import tqdm

    # -- setup: processes and seed, the model, its data and schedule, the stage kind, the optimizer
    kind = stage_class(s)  # checks the settings before anything is loaded
    accelerator = _start(s)
    out = Path(s.out)
    ckpt_dir = Path(s.checkpoint_dir) if s.checkpoint_dir else out.with_name(out.name + ".checkpoints")
    tokenizer = load_tokenizer(s.init)
    model = _load_policy(s, tokenizer)
    table = PairTable(s.tokens, s.signals if kind.reads_signals else None, s.ref_signals or None)
    world = accelerator.num_processes
    per_process, _, total_steps, warmup = schedule_lengths(
        len(table), s.batch_size, world, s.grad_accum, s.epochs, s.warmup_ratio
    )
    stage = kind(s, model, tokenizer, accelerator.device)
    optimizer, scheduler = _optimizer(s, model, stage.trainable(), warmup, total_steps)
    model, optimizer, scheduler = _prepare(accelerator, s, model, optimizer, scheduler)

    # -- resume: the latest checkpoint of these settings and input contents, and the log up to it
    saving = bool(s.save_every or s.keep_final_checkpoint)
    checkpoints = Checkpoints(ckpt_dir, s.fingerprint(), input_files(s), s.keep_checkpoints, saving)
    step, epoch, batches_done = checkpoints.resume(accelerator)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(ckpt_dir / "metrics.jsonl", accelerator, step)

    # -- loop: each epoch's micro-batches; an optimizer step every grad_accum of them
    bar = tqdm(
        total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc=f"{s.stage} {out.name}"
    )
    window: list[dict] = []  # metrics of the micro-batches since the last log row
    pairs_seen: list[int] = []  # this rank's pair ids, for the data-parallel audit
    started, stopped = time.time(), False
    model.train()
    while step < total_steps and epoch < math.ceil(s.epochs) and not stopped:
        seen = batches_done  # micro-batches of this epoch done
        for batch in _epoch_batches(accelerator, table, stage, s, epoch, batches_done):
            with accelerator.accumulate(model):
                loss, metrics = stage.loss(model, batch)  # scalar, {name: float}
                lr = scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps after it)
                norm = _backward_and_step(accelerator, model, optimizer, scheduler, loss, s.max_grad_norm)
            seen += 1
            pairs_seen.extend(int(p) for p in batch["pair_id"].tolist())
            window.append(metrics)
            if not accelerator.sync_gradients:
                continue
            step += 1
            _check_finite(accelerator, s, step, window, norm)  # NaN / inf: stop before this step is saved
            bar.update(1)
            if step % s.log_every == 0 or step == total_steps:
                row = log.write(window, step=step, epoch=round(epoch + seen / per_process, 4), lr=lr)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                window = []
            if s.save_every and step % s.save_every == 0:
                checkpoints.save(accelerator, step, epoch, seen)
            stopped = bool(s.stop_after and step >= s.stop_after)
            if stopped or step >= total_steps:
                break
        epoch, batches_done = epoch + 1, 0
    bar.close()
    if stopped:
        accelerator.print(f"stopped after step {step} as asked (--stop-after); rerun to resume")
        return {"step": step, "interrupted": True}
    if s.keep_final_checkpoint and checkpoints.last_step != step:  # the finished stage's state, as asked
        checkpoints.save(accelerator, step, epoch, batches_done)

    # -- save: the rank audit, the held-out evaluation, the model and its summary; then drop the checkpoints
    _write_rank_audit(ckpt_dir, accelerator, model, pairs_seen)
    accelerator.wait_for_everyone()
    final = {"step": step, "epochs": s.epochs, "pairs": len(table), "world": world}
    final["seconds"] = round(time.time() - started, 2)
    final.update(_held_out_eval(accelerator, model, s, stage.pad_id))
    _save(accelerator, model, tokenizer, s, final, log.path, checkpoints.resumed_from)
    checkpoints.finish(accelerator, s.keep_final_checkpoint)
    return final


def run(s: TrainSettings) -> int:
    if s.lr_from:  # the rate a learning-rate search chose (prefkd.training.grid)
        s = dataclasses.replace(s, lr=read_selected_lr(s.lr_from))
    final = train(s)
    print(json.dumps(final, sort_keys=True))
    return 0
