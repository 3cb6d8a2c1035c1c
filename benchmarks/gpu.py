"""GPU check: prefkd's CTPD student step vs TRL's DPOTrainer step, plus one ZeRO-3 and one FSDP step.

    python benchmarks/gpu.py --quick --json gpu.json      # on a GPU: Qwen2.5-0.5B shape, bf16, < 5 min
    python benchmarks/gpu.py --tiny --device cpu          # anywhere: a tiny Qwen2, float32, well under a minute

Prints a markdown table (tokens/s, MFU, peak memory of both methods side by side, with the ratio
prefkd / TRL; step time and peak memory of the ZeRO-3 and FSDP steps) and, with ``--json PATH``,
writes the figures with the device name and the torch / transformers / trl / deepspeed versions.

What runs, on one device and in this one process:

- model: a Qwen2 student built from a config, nothing downloaded. ``--quick``: the Qwen2.5-0.5B
  shape (hidden 896, 24 layers, 14 / 2 heads, MLP 4864, vocabulary 151936, tied embeddings,
  494 M parameters) with fp32 weights and bf16 autocast (accelerate ``mixed_precision="bf16"`` on
  the prefkd side, ``DPOConfig(bf16=True)`` on TRL's: the same policy on both). ``--tiny``: hidden
  64, 2 layers, 4 / 2 heads, MLP 128, vocabulary 2048, float32. The tokenizer is a word-level one
  over the model's vocabulary (ids ``t0``.. plus ``<|endoftext|>`` as pad and ``<|im_end|>`` as
  EOS): the token ids are random, so it only names the pad and EOS ids;
- data: ``--pairs`` random pairs (seed 1): a prompt of ``--prompt-len`` ids, responses of
  ``--response-len / 2 .. --response-len`` ids plus EOS, cut into random spans of 1-3 tokens (as
  aligned CTPD spans are), written as a real token shard (``prefkd.io.shards``). CTPD weights are
  random in the paper's ranges (chosen 0.61-4.48, rejected 0.22-1.65). The reference is a second
  model (same shape, seed 2): its span log-probs are computed once by ``prefkd.core.logprobs`` and
  written in a signal shard, then the model is freed, as prefkd does (no reference model in memory);
- CTPD step, prefkd's engine path: the batch of ``PreferenceStage.collate`` on the rows of
  ``PairTable(tokens, signals)``; ``make_stage(...).loss`` (``stage="preference"``, ``unit="span"``,
  ``role="student"``), then the engine's ``_backward_and_step`` (accelerator backward, clip 1.0,
  fused ``AdamW`` of ``_optimizer``, scheduler, ``zero_grad``), on the model, optimizer and
  schedule of the engine's ``_prepare``; the batch's move to the device is inside the timed step;
- TRL step: ``DPOTrainer`` (sigmoid loss, beta 0.1) on the same ids (a subclass skips TRL's own
  tokenization, the dataset already holds ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``),
  ``precompute_ref_log_probs=True`` with ``ref_model`` = the same seed-2 reference: TRL computes the
  reference sequence log-probs once before training, then the reference model is dropped, so that
  both sides train the same way (one policy forward + backward per step, no reference in memory)
  and have the same reference. ``gradient_checkpointing=False`` (TRL's default is True; prefkd's
  False; ``--gradient-checkpointing`` turns it on for both). ``trainer.train()`` runs its real loop
  (sequential sampler, one batch = the same pairs every step); a ``TrainerCallback`` times each
  step from ``on_step_begin`` to ``on_step_end``: ``training_step`` (device move, forward, loss,
  backward), clip, the fused AdamW step, the scheduler and ``zero_grad``. The batch fetch before
  ``on_step_begin`` and the logging after ``on_step_end`` are left out;
- ZeRO-3 / FSDP: the CTPD step again, the model, optimizer and schedule prepared by an accelerator
  with ``DeepSpeedPlugin(zero_stage=3)`` / ``FullyShardedDataParallelPlugin(fsdp_version=2)``
  (as ``configs/accelerate/zero3.yaml`` / ``fsdp.yaml``), world size 1, in this process. Skipped on
  a CPU: accelerate 1.15 takes DeepSpeed / FSDP only on an accelerator (on a CPU it silently runs
  plain steps with the plugin ignored), and the script checks that the accelerator really is
  DEEPSPEED / FSDP before it times anything.

Figures: step time = median over the timed steps (after the warm-up steps, which allocate the
optimizer state; CUDA synchronised around each step); tokens/s = non-pad tokens of the batch
(chosen + rejected) / step time; MFU = 6 N tokens/s / peak, N = the model's parameters (the tied
embedding counted once, attention FLOPs left out; the LM head runs on response positions only,
so the FLOPs done are below 6 N per token); peak bf16 dense FLOP/s by device name
(H100 SXM / H200 989e12, H100 PCIe 756e12, H100 NVL 835e12, A100 312e12, L40S 362e12, else
``--peak-tflops``; "n/a" on CPU); peak memory = ``torch.cuda.max_memory_allocated`` since the part's
setup (its model on the device, the reference freed), reset between parts; on CPU the peak RSS of
the process (``VmHWM``, reset between parts through ``/proc/self/clear_refs``; else ``ru_maxrss``),
which includes the imports. "policy forwards per step" counts the policy's forward calls: 1 is
the plan; prefkd's ``model_token_logps`` makes 2 when its probe finds that the model's logits are
not ``head(hidden)`` (under bf16 autocast the model's own logits are bf16 and the probe's fp32:
it then falls back to a second forward with full logits).

Check: before training, the CTPD loss with uniform weights 1 on the same reference is DPO's loss,
so it must equal TRL's step-0 loss (``check`` in the JSON; tolerance 1e-4 in float32, 2e-2 in bf16).

Each part runs in try/except: a failure prints one line and the others still report. The script
stops itself after ``--budget-s`` (default 280): what was measured by then is still printed, and
the JSON is rewritten after every part; a step stuck in native code (a hung collective) is ended
by faulthandler 15 s later, with a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
sys.path.insert(0, str(ROOT))

BETA = 0.1
LR = 1e-6
GB = 1024**3
PARTS = ("ctpd", "trl", "fsdp", "zero3")
CHOSEN_WEIGHTS = (0.61, 4.48)  # the range of the paper's CTPD weights (method.md)
REJECTED_WEIGHTS = (0.22, 1.65)
CPU_SHARDING = (
    "skipped on CPU: accelerate (1.15) takes DeepSpeed or FSDP only on an accelerator; on a CPU it falls back to "
    "plain (MULTI_CPU) steps with the plugin ignored, so there is no sharded step to time"
)
PEAK_BF16 = (  # dense bf16 FLOP/s by a substring of torch.cuda.get_device_name(); first match wins
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
SHAPES = {
    # the Qwen2.5-0.5B shape (vocabulary padded to 151936 rows, tied head)
    "quick": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024),
}  # fmt: skip
DEFAULTS = {  # pairs, prompt ids, max response ids, warm-up steps, timed steps, sharded timed steps
    "quick": dict(pairs=8, prompt_len=256, response_len=768, warmup=3, steps=10, sharded_steps=2),
    "tiny": dict(pairs=2, prompt_len=16, response_len=32, warmup=1, steps=2, sharded_steps=1),
}


class Skipped(Exception):
    """A part that cannot run here; its message is the reason."""


class BudgetExceeded(BaseException):
    """Raised by the alarm at ``--budget-s`` (a BaseException, so no part's ``except Exception`` eats it)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="Qwen2.5-0.5B shape, bf16 (the default)")
    mode.add_argument("--tiny", action="store_true", help="tiny Qwen2, float32: the whole script on a CPU")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda, cuda:N or cpu")
    p.add_argument("--pairs", type=int, help="pairs per batch (quick 8, tiny 2)")
    p.add_argument("--prompt-len", type=int, help="prompt ids per pair (quick 256, tiny 16)")
    p.add_argument("--response-len", type=int, help="longest response in ids, EOS not counted (quick 768, tiny 32)")
    p.add_argument("--warmup", type=int, help="untimed steps per method (quick 3, tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps per method (quick 10, tiny 2)")
    p.add_argument("--sharded-steps", type=int, help="timed ZeRO-3 / FSDP steps after one warm-up (quick 2, tiny 1)")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the device (overrides the table)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast with --quick, float32 with --tiny")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations, both methods")
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out, of {', '.join(PARTS)}")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--budget-s", type=float, default=280.0, help="stop after this many seconds (default 280)")
    args = p.parse_args(argv)
    args.mode = "tiny" if args.tiny else "quick"
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(PARTS)
    if unknown:
        p.error(f"--skip names unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    if min(args.pairs, args.prompt_len, args.response_len, args.steps, args.sharded_steps) < 1 or args.warmup < 0:
        p.error("--pairs, --prompt-len, --response-len, --steps and --sharded-steps must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------- device, memory, budget


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def table_peak(name: str) -> tuple[str, float] | None:
    """(table key, dense bf16 FLOP/s) of a CUDA device name, or None for a device not in the table."""
    return next(((key, flops) for key, flops in PEAK_BF16 if key.lower() in name.lower()), None)


def device_info(device, peak_tflops: float | None) -> dict:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    peak, source = None, "n/a"
    if peak_tflops:
        peak, source = peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda":
        match = table_peak(name)
        if match:
            peak, source = match[1], f"table ({match[0]})"
        else:
            source = "unknown device: pass --peak-tflops"
    return {"type": device.type, "name": name, "peak_bf16_flops": peak, "peak_source": source}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Memory:
    """Peak memory of one part: CUDA allocator peak, else the process's peak RSS."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM, reset per part)"

    def reset(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := current RSS (Linux >= 4.0)
        except OSError:
            self.kind = "ru_maxrss (not resettable: the process's peak so far)"

    def now_gb(self) -> float:
        """What is resident now (allocated tensors; on CPU the RSS)."""
        import torch

        if self.cuda:
            return torch.cuda.memory_allocated() / GB
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB
        except OSError:
            return float("nan")

    def peak_gb(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / GB
        hwm = _hwm_mb() if self.kind.startswith("peak RSS") else None
        if hwm is None:
            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = r / 1024**2 if sys.platform == "darwin" else r / 1024
        return hwm / 1024


def synchronizer(device):
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class Budget:
    """The wall-clock guard: an alarm raises BudgetExceeded at the deadline; faulthandler kills the process
    15 s later if the main thread is stuck where Python signals cannot reach it (a hung collective)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        faulthandler.dump_traceback_later(seconds + 15, exit=True)

    @staticmethod
    def _alarm(signum, frame):
        raise BudgetExceeded()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stop(self) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()


# ----------------------------------------------------------------------------- tokenizer, models, data


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over ``vocab_size`` ids: ``t0``.. then the pad and EOS tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 2)}
    vocab["<|endoftext|>"] = vocab_size - 2
    vocab["<|im_end|>"] = vocab_size - 1
    backend = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def build_model(args, tok, seed: int, device, train: bool = True):
    """A fresh Qwen2 of ``args.mode``'s shape (prefkd's tiny-model config with the shape's sizes), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from prefkd.assets.models import tiny_config

    config = tiny_config("qwen2", tok, **SHAPES[args.mode])
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    if train and args.gradient_checkpointing:  # as the engine's _load_policy does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(train)


def random_rows(args, tok) -> list[dict]:
    """Token-shard rows (teacher columns = student ones): random ids, random 1-3 token spans, EOS last."""
    import numpy as np

    rng = np.random.default_rng(1)
    content = tok.pad_token_id  # ids below the two special tokens
    rows = []
    for pair in range(args.pairs):
        prompt = rng.integers(0, content, args.prompt_len)
        row = {"pair_id": pair, "student_prompt_len": args.prompt_len, "teacher_prompt_len": args.prompt_len}
        for side in ("chosen", "rejected"):
            n = int(rng.integers(max(1, args.response_len // 2), args.response_len + 1))
            lengths = []
            while sum(lengths) < n:
                lengths.append(min(int(rng.choice([1, 1, 1, 2, 2, 3])), n - sum(lengths)))
            spans = np.repeat(np.arange(len(lengths)), lengths)
            ids = np.concatenate([prompt, rng.integers(0, content, n), [tok.eos_token_id]]).tolist()
            span_ids = np.concatenate([np.full(args.prompt_len, -1), spans, [-1]]).tolist()
            for role in ("student", "teacher"):
                row[f"{role}_{side}_input_ids"] = ids
                row[f"{role}_{side}_span_ids"] = span_ids
            row[f"{side}_num_spans"] = len(lengths)
            row[f"{side}_span_bytes"] = (np.cumsum(lengths) * 4).tolist()
            row[f"{side}_truncated"] = False
        rows.append(row)
    return rows


def autocast(device, bf16: bool):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@dataclass
class Data:
    tokens: Path  # token shard
    signals: Path  # signal shard (CTPD weights, reference span log-probs)
    trl_rows: list[dict]  # the same pairs as TRL's pre-tokenized columns
    tokens_per_step: int = 0  # non-pad tokens of the batch, chosen + rejected
    batch_shape: list = field(default_factory=list)
    response_tokens: int = 0
    units: int = 0


def prepare_data(args, tok, device, work: Path) -> Data:
    """The token shard, the reference span log-probs of the seed-2 model and the CTPD weights (signal shard)."""
    import numpy as np
    import pyarrow as pa
    import torch

    from prefkd.core.logprobs import model_token_logps, span_logps
    from prefkd.data.batches import collate_pairs
    from prefkd.io.shards import TOKEN_SCHEMA, write_shard

    rows = random_rows(args, tok)
    data = Data(work / "tokens.arrow", work / "signals.arrow", [])
    write_shard(pa.Table.from_pylist(rows, schema=TOKEN_SCHEMA), data.tokens, kind="tokens")
    batch = collate_pairs(rows, "student", "span", tok.pad_token_id)
    ref = build_model(args, tok, seed=2, device=device, train=False)
    with torch.no_grad(), autocast(device, args.bf16):
        ids, mask, units = (batch[k].to(device) for k in ("input_ids", "attention_mask", "unit_ids"))
        lp = model_token_logps(ref, ids, mask, needed=units >= 0)  # [2B, T]
        ref_units = span_logps(lp, units, int(batch["num_units"].max())).float().cpu()  # [2B, M]
    del ref, lp
    rng = np.random.default_rng(2)
    n, counts = args.pairs, batch["num_units"].tolist()
    sig = {"pair_id": [r["pair_id"] for r in rows]}
    for k, (side, (lo, hi)) in enumerate((("chosen", CHOSEN_WEIGHTS), ("rejected", REJECTED_WEIGHTS))):
        sig[f"{side}_weights"] = [rng.uniform(lo, hi, counts[k * n + i]).astype("float32").tolist() for i in range(n)]
        sig[f"{side}_ref_logps"] = [ref_units[k * n + i, : counts[k * n + i]].tolist() for i in range(n)]
    table = pa.Table.from_pydict(sig).replace_schema_metadata({b"prefkd.unit": b"span", b"prefkd.role": b"teacher"})
    write_shard(table, data.signals, kind="signals")
    data.trl_rows = [
        {"prompt_ids": r["student_chosen_input_ids"][: r["student_prompt_len"]]}
        | {f"{s}_ids": r[f"student_{s}_input_ids"][r["student_prompt_len"] :] for s in ("chosen", "rejected")}
        for r in rows
    ]
    data.tokens_per_step = int(batch["attention_mask"].sum())
    data.batch_shape = list(batch["input_ids"].shape)
    data.response_tokens = int((batch["unit_ids"] >= 0).sum())
    data.units = int(batch["num_units"].sum())
    return data


# ----------------------------------------------------------------------------- prefkd (CTPD) steps


def settings(args, data: Data, work: Path, steps: int):
    from prefkd.training.settings import TrainSettings

    return TrainSettings(stage="preference", init="(built from a config)", out=str(work / "out"),
                         tokens=[str(data.tokens)], signals=[str(data.signals)], role="student", unit="span",
                         beta=BETA, lr=LR, batch_size=args.pairs, epochs=float(steps), warmup_ratio=0.0,
                         scheduler="constant", gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip


class CallCounter:
    """Counts the forward calls of a model (a pre-hook on the HF model itself, so under any wrapper)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        self.calls += 1

    def stop(self) -> int:
        self.handle.remove()
        return self.calls


def optimizer_name(optimizer) -> str:
    """The torch optimizer under accelerate's / DeepSpeed's wrappers, with its implementation."""
    inner = optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:
        inner = inner.optimizer
    d = getattr(inner, "defaults", {})
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"
    return f"{type(optimizer).__name__}/{type(inner).__name__}({impl})"


def reset_accelerate() -> None:
    """Forget the accelerator state of the previous part (accelerate keeps it per process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def ctpd_steps(args, ctx, accelerator, data: Data, work: Path, n_warmup: int, n_steps: int) -> dict:
    """Build the policy, stage, batch, optimizer (prefkd's engine), check step 0, run and time the steps."""
    import torch

    from prefkd.data.batches import PairTable
    from prefkd.training.engine import _backward_and_step, _optimizer, _prepare
    from prefkd.training.stages import make_stage

    s = settings(args, data, work, n_warmup + n_steps)
    model = build_model(args, ctx.tok, seed=1, device=ctx.device)
    stage = make_stage(s, model, ctx.tok, accelerator.device)
    table = PairTable(s.tokens, s.signals)
    batch = stage.collate(table.rows(range(len(table))))
    optimizer, scheduler = _optimizer(s, model, stage.trainable(), 0, n_warmup + n_steps)
    out = {"parameters": sum(p.numel() for p in model.parameters())}  # before ZeRO-3 / FSDP shard them
    forwards = CallCounter(model)
    model, optimizer, scheduler = _prepare(accelerator, s, model, optimizer, scheduler)

    def on_device(b):
        return {k: v.to(accelerator.device, non_blocking=True) for k, v in b.items()}

    with torch.no_grad():  # step 0 with uniform weights 1 on the same reference: DPO's loss
        uniform = dict(batch, weights=torch.ones_like(batch["weights"]))
        out["loss_step0_uniform"] = float(stage.loss(model, on_device(uniform))[0])
    ctx.memory.reset()
    out["resident_gb"] = ctx.memory.now_gb()
    forwards.calls = 0
    times, losses = [], []
    model.train()
    for _ in range(n_warmup + n_steps):
        ctx.sync()
        t0 = time.perf_counter()
        with accelerator.accumulate(model):
            loss, _ = stage.loss(model, on_device(batch))
            _backward_and_step(accelerator, model, optimizer, scheduler, loss, s.max_grad_norm)
        ctx.sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    out.update(peak_memory_gb=ctx.memory.peak_gb(), times=times, losses=losses, n_warmup=n_warmup)
    out["optimizer"] = optimizer_name(optimizer)
    out["forwards_per_step"] = forwards.stop() / len(times)
    out["ids"] = batch["input_ids"]
    del model, optimizer, scheduler, stage
    accelerator.free_memory()
    return out


def ctpd_part(args, ctx, data: Data, work: Path) -> dict:
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else "no", cpu=ctx.device.type == "cpu", step_scheduler_with_optimizer=False
    )
    return ctpd_steps(args, ctx, accelerator, data, work, args.warmup, args.steps)


# ----------------------------------------------------------------------------- TRL steps


def trl_classes():
    """A DPOTrainer for pre-tokenized pairs that records its losses, and a step-timing callback."""
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        bench_losses: list

        def _prepare_dataset(self, dataset, *a, **k):  # already prompt_ids / chosen_ids / rejected_ids
            return dataset

        def _get_train_sampler(self, *a, **k):  # in order: every batch is the same pairs
            from torch.utils.data import SequentialSampler

            return SequentialSampler(a[0] if a and a[0] is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.bench_losses.append((out[0] if return_outputs else out).detach())  # no sync in the step
            return out

    class StepTimes(TrainerCallback):
        def __init__(self, sync):
            self.sync, self.times, self.t0 = sync, [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.sync()
            self.times.append(time.perf_counter() - self.t0)

    return PreTokenizedDPOTrainer, StepTimes


def trl_part(args, ctx, data: Data, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig

    reset_accelerate()
    trainer_cls, timer_cls = trl_classes()
    n = args.warmup + args.steps
    # TRL defaults to gradient checkpointing; transformers >= 5.2x calls it activation_checkpointing
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in DPOConfig.__dataclass_fields__
        else "gradient_checkpointing"
    )
    checkpointing = {name: args.gradient_checkpointing}
    config = DPOConfig(output_dir=str(work / "trl"), beta=BETA, learning_rate=LR, per_device_train_batch_size=args.pairs,
                       max_steps=n, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       max_length=None, precompute_ref_log_probs=True, bf16=args.bf16, fp16=False, use_cpu=ctx.device.type == "cpu", report_to=[], save_strategy="no",
                       logging_strategy="no", dataloader_num_workers=0,
                       seed=1, disable_tqdm=True, **checkpointing)  # fmt: skip
    dataset = Dataset.from_list(data.trl_rows * n)  # n batches of the same pairs, in order
    timer = timer_cls(ctx.sync)
    policy = build_model(args, ctx.tok, seed=1, device=ctx.device)
    ref = build_model(args, ctx.tok, seed=2, device=ctx.device, train=False)
    trainer = trainer_cls(model=policy, ref_model=ref, args=config, train_dataset=dataset, processing_class=ctx.tok,
                          callbacks=[timer])  # fmt: skip
    trainer.bench_losses = []
    # the reference log-probs are in the dataset now: drop the reference model (TRL keeps a passed one)
    trainer.ref_model = None
    trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not ref]
    ref_alive = weakref.ref(ref)
    del ref
    gc.collect()
    forwards = CallCounter(policy)  # after the precompute (which ran the reference only)
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land in the table's stdout
    ids = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])["input_ids"]
    ctx.memory.reset()
    resident = ctx.memory.now_gb()
    trainer.train()
    out = {"peak_memory_gb": ctx.memory.peak_gb(), "resident_gb": resident, "times": timer.times}
    out["n_warmup"] = args.warmup
    out["forwards_per_step"] = forwards.stop() / max(1, len(timer.times))
    out["ref_model_freed"] = ref_alive() is None
    out["losses"] = [float(x) for x in trainer.bench_losses]
    out["loss_step0"] = out["losses"][0]
    out["parameters"] = sum(p.numel() for p in policy.parameters())
    out["ids"] = ids
    out["optimizer"] = optimizer_name(trainer.optimizer)
    trainer.accelerator.free_memory()
    del trainer, policy
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- ZeRO-3 / FSDP steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_part(kind: str, args, ctx, data: Data, work: Path) -> dict:
    """One warm-up and ``--sharded-steps`` timed CTPD steps under ZeRO-3 or FSDP, world size 1, in-process."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    if ctx.device.type == "cpu":
        raise Skipped(CPU_SHARDING)
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    reset_accelerate()
    try:
        if kind == "zero3":  # as configs/accelerate/zero3.yaml, the model built before (no zero.Init)
            plugin = {"deepspeed_plugin": DeepSpeedPlugin(zero_stage=3, gradient_clipping=1.0, zero3_init_flag=False,
                      offload_optimizer_device="none", offload_param_device="none")}  # fmt: skip
        else:  # as configs/accelerate/fsdp.yaml
            plugin = {"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                      auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT")}  # fmt: skip
        accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=ctx.device.type == "cpu",
                                  step_scheduler_with_optimizer=False, **plugin)  # fmt: skip
        wanted = DistributedType.DEEPSPEED if kind == "zero3" else DistributedType.FSDP
        if accelerator.distributed_type != wanted:
            raise RuntimeError(f"accelerate chose {accelerator.distributed_type}, not {wanted}; nothing was sharded")
        out = ctpd_steps(args, ctx, accelerator, data, work, 1, args.sharded_steps)
        out["distributed_type"] = str(accelerator.distributed_type)
        return out
    finally:
        os.environ.clear()
        os.environ.update(saved)
        with contextlib.suppress(Exception):
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


# ----------------------------------------------------------------------------- figures, table, main


def figures(part: dict, ctx, data: Data) -> dict:
    """Step time, tokens/s, MFU and peak memory of a part's raw results."""
    timed = part["times"][part["n_warmup"] :]
    step = statistics.median(timed)
    tps = data.tokens_per_step / step
    peak = ctx.info["peak_bf16_flops"]
    n = part["parameters"]
    return {
        "status": "ok",
        "step_s": round(step, 4),
        "step_s_timed": [round(t, 4) for t in timed],
        "warmup_s": [round(t, 4) for t in part["times"][: part["n_warmup"]]],
        "tokens_per_s": round(tps, 1),
        "mfu": round(6 * n * tps / peak, 4) if peak else None,
        "peak_memory_gb": round(part["peak_memory_gb"], 3),
        "resident_gb_at_start": round(part["resident_gb"], 3),
        "memory_kind": ctx.memory.kind,
        "losses": [round(x, 6) for x in part["losses"]],
        "optimizer": part.get("optimizer"),
        "policy_forwards_per_step": part.get("forwards_per_step"),
        **{k: part[k] for k in ("distributed_type", "ref_model_freed") if k in part},
    }


def ratios(results: dict) -> dict:
    a, b = results.get("ctpd", {}), results.get("trl", {})
    if a.get("status") != "ok" or b.get("status") != "ok":
        return {}
    out = {}
    for key in ("step_s", "tokens_per_s", "mfu", "peak_memory_gb"):
        if a.get(key) is not None and b.get(key):
            out[key] = round(a[key] / b[key], 3)
    return out


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def render(report: dict) -> str:
    """The markdown table of a report (what stdout shows)."""
    res, ratio, dev = report["parts"], report["ratio"], report["device"]
    rows = [("step time (s, median)", "step_s", ".4f"), ("tokens/s", "tokens_per_s", ",.0f"),
            ("MFU", "mfu", ".1%"), ("peak memory (GiB)", "peak_memory_gb", ".2f"),
            ("policy forwards per step", "policy_forwards_per_step", ".2g")]  # fmt: skip
    lines = [
        f"## GPU check ({report['mode']}): {dev['name']}, {report['precision']}",
        "",
        f"model: Qwen2 {report['model']['parameters'] / 1e6:.1f} M parameters; batch {report['batch']['pairs']} pairs, "
        f"{report['batch']['shape']} ids, {report['batch']['tokens']} non-pad tokens per step; "
        f"peak FLOP/s: {_cell(dev['peak_bf16_flops'], '.3g')} ({dev['peak_source']})",
        "",
        "| figure | prefkd CTPD | TRL DPO | prefkd / TRL |",
        "| --- | --- | --- | --- |",
    ]
    for label, key, fmt in rows:
        cells = [
            _cell(res[p].get(key), fmt) if res[p].get("status") == "ok" else res[p]["status"] for p in ("ctpd", "trl")
        ]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {_cell(ratio.get(key), '.3f')} |")
    chk = report["check"]
    lines.append(f"| step-0 loss, uniform weights (= DPO) | {_cell(chk.get('ctpd_uniform'), '.6f')} | "
                 f"{_cell(chk.get('trl'), '.6f')} | agree: {chk.get('agree', 'n/a')} |")  # fmt: skip
    lines += ["", "| sharded (world size 1) | step time (s) | first step (s) | tokens/s | peak memory (GiB) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for part, label in (("zero3", "DeepSpeed ZeRO-3"), ("fsdp", "FSDP2")):
        r = res[part]
        if r.get("status") != "ok":
            lines.append(f"| {label} | {r['status']} | | | |")
            continue
        lines.append(f"| {label} | {r['step_s']:.4f} | {r['warmup_s'][0]:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_memory_gb']:.2f} |")  # fmt: skip
    lines += [
        "",
        "Step = forward, loss, backward, clip 1.0, fused AdamW, scheduler, zero_grad (CTPD: the engine's "
        "stage.loss + _backward_and_step; TRL: DPOTrainer.train()'s loop timed on_step_begin -> on_step_end, "
        "batch fetch and logging left out). Reference log-probs precomputed on both sides, no reference model "
        f"in memory. Memory: {report['memory_kind']}. MFU = 6 N tokens/s / peak (attention FLOPs left out).",
    ]
    extra = [p for p in ("ctpd", "zero3", "fsdp") if (res[p].get("policy_forwards_per_step") or 1) > 1]
    if extra:
        lines.append(
            f"prefkd ran more than one policy forward per step ({', '.join(extra)}): the logits probe of "
            "prefkd.core.logprobs.model_token_logps did not match its head, so it recomputed full logits."
        )
    if report.get("stopped"):
        lines.append(f"Stopped: {report['stopped']}")
    return "\n".join(lines)


@dataclass
class Context:
    device: object
    tok: object
    memory: Memory
    sync: object
    info: dict


def run_parts(args, ctx: Context, data: Data, work: Path, budget: Budget, results: dict, raw: dict, progress) -> None:
    """Every part in turn; a failure is one line and the next part runs."""
    min_left = 20 if args.mode == "quick" else 5
    for part in PARTS:
        if part in args.skip:
            results[part] = {"status": "skipped (--skip)"}
            continue
        if budget.left() < min_left:
            results[part] = {"status": f"skipped: {budget.left():.0f} s of budget left"}
            continue
        t0 = time.perf_counter()
        try:
            if part == "ctpd":
                raw[part] = ctpd_part(args, ctx, data, work)
            elif part == "trl":
                raw[part] = trl_part(args, ctx, data, work)
            else:
                raw[part] = sharded_part(part, args, ctx, data, work)
            results[part] = figures(raw[part], ctx, data)
        except Skipped as exc:
            results[part] = {"status": str(exc)}
        except Exception as exc:  # one line, then the next part
            msg = " ".join(str(exc).split())[:300]
            results[part] = {"status": f"failed: {type(exc).__name__}: {msg}"}
        finally:
            results.setdefault(part, {})["seconds"] = round(time.perf_counter() - t0, 1)
            gc.collect()
        r = results[part]
        line = f"step {r['step_s']:.4f} s, peak {r['peak_memory_gb']:.2f} GiB" if r["status"] == "ok" else r["status"]
        print(f"[{budget.seconds - budget.left():5.0f} s] {part}: {line}", file=sys.stderr, flush=True)
        progress()


def check(raw: dict, bf16: bool) -> dict:
    """Step-0 losses: CTPD with uniform weights 1 vs TRL's DPO on the same reference; same token ids."""
    out = {"tolerance": 2e-2 if bf16 else 1e-4}
    if "ctpd" in raw:
        out["ctpd_uniform"] = raw["ctpd"]["loss_step0_uniform"]
    if "trl" in raw:
        out["trl"] = raw["trl"]["loss_step0"]
    if "ctpd" in raw and "trl" in raw:
        a, b = raw["ctpd"]["ids"], raw["trl"]["ids"]
        out["same_token_ids"] = bool(a.shape == b.shape and (a.cpu() == b.cpu()).all())
        out["abs_diff"] = abs(out["ctpd_uniform"] - out["trl"])
        out["agree"] = out["abs_diff"] <= out["tolerance"] and out["same_token_ids"]
        out["off_ln2"] = abs(out["trl"] - math.log(2))  # how far from ln 2 (reference != policy)
    return out


def finish(report: dict, raw: dict, args, started: float, final: bool) -> None:
    """Fill in the derived figures and write the JSON (after every part too: a hard stop keeps what was done)."""
    report.setdefault("device", {"name": "unknown", "peak_bf16_flops": None, "peak_source": "n/a"})
    report.setdefault("precision", "?")
    report.setdefault("memory_kind", "?")
    report.setdefault("model", {"parameters": 0})
    report.setdefault("batch", {"pairs": args.pairs, "shape": [], "tokens": 0})
    report["model"]["parameters"] = next((r["parameters"] for r in raw.values() if r.get("parameters")), 0)
    report["ratio"] = ratios(report["parts"])
    report["check"] = check(raw, getattr(args, "bf16", False))
    report["budget_s"] = args.budget_s
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["complete"] = final
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.json)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    started = time.perf_counter()
    results: dict = {p: {"status": "not run"} for p in PARTS}
    raw: dict = {}
    report: dict = {"mode": args.mode, "parts": results, "ratio": {}, "check": {}, "stopped": None}
    try:
        import torch

        device = pick_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        args.bf16 = args.precision == "bf16" or (args.precision == "auto" and args.mode == "quick")
        if args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SystemExit(f"{torch.cuda.get_device_name(device)} has no bf16; pass --precision fp32.")
        ctx = Context(device, build_tokenizer(SHAPES[args.mode]["vocab_size"]), Memory(device), synchronizer(device),
                      device_info(device, args.peak_tflops))  # fmt: skip
        report.update(device=ctx.info, versions=versions(), memory_kind=ctx.memory.kind,
                      precision="bf16 autocast, fp32 weights" if args.bf16 else "float32")  # fmt: skip
        report["model"] = {"arch": "qwen2", **SHAPES[args.mode], "tie_word_embeddings": True, "parameters": 0}
        with tempfile.TemporaryDirectory(prefix="prefkd-gpu-") as tmp:
            data = prepare_data(args, ctx.tok, device, Path(tmp))
            report["batch"] = {"pairs": args.pairs, "shape": data.batch_shape, "tokens": data.tokens_per_step,
                               "response_tokens": data.response_tokens, "units": data.units}  # fmt: skip
            report["setup_s"] = round(time.perf_counter() - started, 1)
            progress = lambda: finish(report, raw, args, started, final=False)  # noqa: E731
            run_parts(args, ctx, data, Path(tmp), budget, results, raw, progress)
    except BudgetExceeded:
        report["stopped"] = f"the {args.budget_s:.0f} s budget ran out; later parts did not run"
        for r in results.values():
            if r["status"] == "not run":
                r["status"] = "stopped by --budget-s"
    finally:
        budget.stop()
    finish(report, raw, args, started, final=True)
    print(render(report), flush=True)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
