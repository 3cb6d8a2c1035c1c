"""The training engine: schedules, exact resume, DPO's ln 2 at step 0, the reversed
dataset, DeepSpeed ZeRO-2 plumbing (one process) and 2-process data parallelism (gloo)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefkd.data.demo import generate_demo_pairs
from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs
from prefkd.io.shards import read_shard, reverse_shard, write_shard
from prefkd.training.engine import TrainSettings, schedule_lengths, train
from prefkd.training.signals import WeightSpec, run_shard

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory, teacher_tokenizer, tiny_models):
    """Both roles use the teacher tokenizer here (the engine is what is under test); the shared tiny teacher
    (conftest.py) is the initial model."""
    root = tmp_path_factory.mktemp("train")
    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(PAIRS, seed=1))]
    model = ModelTokens(teacher_tokenizer)
    # both roles use the teacher tokenizer here: the engine is what is under test
    table, stats = tokenize_pairs(records, model, model, max_length=96, max_prompt_length=48)
    tokens = root / "tokens.arrow"
    write_shard(table, tokens, kind="tokens", stats=stats)
    init = tiny_models["teacher"]
    signals = root / "ref.arrow"
    run_shard(tokens, signals, "teacher", "token", str(init), None, None, WeightSpec(transform="uniform"))
    return {"root": root, "tokens": tokens, "init": init, "signals": signals}


def settings(setup, name, **kw):
    base = dict(
        stage="sft",
        init=str(setup["init"]),
        out=str(setup["root"] / name),
        tokens=[str(setup["tokens"])],
        role="teacher",
        lr=3e-3,
        batch_size=4,
        epochs=1,
        checkpoint_dir=str(setup["root"] / f"{name}.ckpt"),
    )
    base.update(kw)
    return TrainSettings(**base)


def weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def test_schedule_is_derived_from_data_size():
    per_process, per_epoch, total, warmup = schedule_lengths(100, 4, 2, 3, 2, 0.1)
    assert per_process == math.ceil(100 / 8) == 13
    assert per_epoch == math.ceil(13 / 3) == 5
    assert total == 10 and warmup == 1


def test_sft_trains_and_writes_metrics(setup):
    s = settings(setup, "sft", epochs=2)
    final = train(s)
    assert final["step"] == 2 * PAIRS // 4
    rows = metrics(s.out)
    assert len(rows) == final["step"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (Path(s.out) / "model.safetensors").exists() and (Path(s.out) / "tokenizer.json").exists()
    summary = json.loads((Path(s.out) / "train_summary.json").read_text())
    assert summary["settings"]["seed"] == 1


def test_exact_resume(setup):
    whole = settings(setup, "whole")
    train(whole)
    cut = settings(setup, "cut", save_every=2, stop_after=3)
    first = train(cut)
    assert first["interrupted"] and not Path(cut.out).exists()
    resumed = settings(setup, "cut", save_every=2)
    train(resumed)
    a, b = weights(whole.out), weights(resumed.out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the summary says from which checkpoint the run resumed
    runtime = [json.loads((Path(p) / "train_summary.json").read_text())["runtime"] for p in (whole.out, resumed.out)]
    assert runtime[0]["resumed_from_step"] is None and runtime[1]["resumed_from_step"] == 2
    # the resumed run's log continues the interrupted one
    assert [r["step"] for r in metrics(resumed.out)] == list(range(1, PAIRS // 4 + 1))


def test_dpo_loss_is_ln2_at_step_zero_and_learns(setup):
    s = settings(
        setup, "dpo", stage="preference", unit="token", signals=[str(setup["signals"])], lr=1e-3, beta=0.3, epochs=2
    )
    train(s)
    rows = metrics(s.out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/accuracy"] > 0.5


def test_preference_stage_needs_signals(setup):
    from prefkd.errors import PrefkdError

    with pytest.raises(PrefkdError, match="signal shards"):
        train(settings(setup, "nosig", stage="preference"))


def test_reversed_dataset_is_swapped(setup):
    src = setup["tokens"]
    dst = setup["root"] / "reversed.arrow"
    reverse_shard(src, dst)
    a, b = read_shard(src), read_shard(dst)
    assert a.column_names == b.column_names
    assert b.column("pair_id").equals(a.column("pair_id"))
    for role in ("teacher", "student"):
        assert b.column(f"{role}_chosen_input_ids").equals(a.column(f"{role}_rejected_input_ids"))
        assert b.column(f"{role}_rejected_span_ids").equals(a.column(f"{role}_chosen_span_ids"))
        assert b.column(f"{role}_prompt_len").equals(a.column(f"{role}_prompt_len"))
    assert b.column("chosen_planted").equals(a.column("rejected_planted"))
    assert not b.column("teacher_chosen_input_ids").equals(a.column("teacher_chosen_input_ids"))
    # signals swap the same way; reversing twice gives the original table back
    sig = setup["root"] / "ref-reversed.arrow"
    reverse_shard(setup["signals"], sig)
    s0, s1 = read_shard(setup["signals"], "signals"), read_shard(sig, "signals")
    assert s1.column("chosen_ref_logps").equals(s0.column("rejected_ref_logps"))
    back = setup["root"] / "back.arrow"
    reverse_shard(dst, back)
    assert read_shard(back).equals(a)


def test_negative_teacher_trains_on_the_reversed_artifacts(tmp_path):
    """The DAG wires pi- to the reversed token and reference shards (the research code once did not)."""
    import shutil

    for name in ("workflow", "envs", "configs", "config.yaml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-p",
            "results/demo/models/teacher-dpo-neg",
            "results/demo/models/teacher-dpo-pos",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    cmds = [line for line in out.stdout.splitlines() if " train " in line and "--stage preference" in line]
    neg = next(c for c in cmds if "teacher-dpo-neg" in c)
    pos = next(c for c in cmds if "teacher-dpo-pos" in c)
    assert "tokens-reversed/train" in neg and "dpo-ref-teacher-reversed/train" in neg
    assert "tokens-reversed" not in pos and "reversed" not in pos.split("--signals")[1].split("--eval")[0]


def _launch(config, setup, name, extra=(), timeout=600):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
        *extra, "-m", "prefkd.cli", "train", "--stage", "sft", "--init", str(setup["init"]),
        "--out", str(setup["root"] / name), "--tokens", str(setup["tokens"]), "--batch-size", "2", "--lr", "3e-3",
        "--checkpoint-dir", str(setup["root"] / f"{name}.ckpt"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_the_zero2_config_launches_and_trains_on_a_machine_without_gpus(setup):
    """accelerate (1.15) runs a DeepSpeed config on a machine without an accelerator as one plain process (its
    DeepSpeed plugin is not used), so this checks that the config launches and trains on a laptop, not DeepSpeed
    itself, which needs a GPU: benchmarks/gpu.py runs a ZeRO-3 and an FSDP step there."""
    _launch("zero2.yaml", setup, "zero2", extra=("--num_processes", "1", "--mixed_precision", "no"))
    rows = metrics(setup["root"] / "zero2")
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_two_process_data_parallel_on_cpu(setup):
    _launch("ddp-cpu.yaml", setup, "ddp", extra=("--num_processes", "2"))
    ckpt = setup["root"] / "ddp.ckpt"
    ranks = [json.loads((ckpt / f"rank-{i}.json").read_text()) for i in (0, 1)]
    seen0, seen1 = set(ranks[0]["pairs_seen"]), set(ranks[1]["pairs_seen"])
    assert seen0 and seen1 and not (seen0 & seen1), "each rank must see different pairs"
    assert seen0 | seen1 == set(range(PAIRS))
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"], "parameters must stay identical across ranks"
