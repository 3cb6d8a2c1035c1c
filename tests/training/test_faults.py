"""Faults the training engine and the signals stage must catch: checkpoints of changed inputs, torn or
incomplete checkpoints, the optimizer state a finished stage leaves behind, and NaN / infinity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from prefkd.assets.models import load_model, save_model
from prefkd.core.weights import WeightSpec, transform_weights
from prefkd.data import batches
from prefkd.errors import PrefkdError
from prefkd.io.shards import read_shard, write_shard
from prefkd.training.engine import TrainSettings, train
from prefkd.training.signals import run_shard

STEPS = 4  # 16 shared pairs, 4 per batch, one epoch


def dpo(tiny_models, shared_tokens, root: Path, name: str, signals: Path, **kw) -> TrainSettings:
    """A DPO stage of the tiny student on the shared pairs."""
    base = dict(
        stage="preference",
        init=str(tiny_models["student"]),
        out=str(root / name),
        tokens=[str(shared_tokens)],
        role="student",
        unit="token",
        signals=[str(signals)],
        lr=1e-3,
        batch_size=4,
        epochs=1,
        checkpoint_dir=str(root / f"{name}.ckpt"),
    )
    base.update(kw)
    return TrainSettings(**base)


def assert_same_weights(a_dir, b_dir) -> None:
    a, b = load_file(str(Path(a_dir) / "model.safetensors")), load_file(str(Path(b_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def step_dirs(ckpt) -> list[str]:
    return sorted(d.name for d in Path(ckpt).glob("step-*"))


def resumed(log: str) -> list[str]:
    """The log's "resuming from ... at step N" lines."""
    return [line for line in log.splitlines() if line.startswith("resuming from")]


def scaled_signals(src: Path, dst: Path, factor: float) -> None:
    """``src`` with every weight times ``factor``, written to ``dst`` (a hand-made signal shard)."""
    table = read_shard(src, "signals")
    for side in ("chosen", "rejected"):
        name = f"{side}_weights"
        col = [[w * factor for w in ws] for ws in table.column(name).to_pylist()]
        table = table.set_column(table.column_names.index(name), name, pa.array(col, type=pa.list_(pa.float32())))
    write_shard(table, dst, kind="signals")


@pytest.fixture
def signals(tmp_path, student_dpo_ref) -> Path:
    """A private copy of the student's DPO reference shard (tests change it in place)."""
    path = tmp_path / "signals.arrow"
    shutil.copy(student_dpo_ref, path)
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_models, shared_tokens, student_dpo_ref) -> Path:
    """A clean, uninterrupted run on the shared reference shard: the model dir."""
    s = dpo(tiny_models, shared_tokens, tmp_path_factory.mktemp("clean"), "clean", student_dpo_ref)
    train(s)
    return Path(s.out)


# -- 1. checkpoints are keyed on input contents; a finished stage keeps no optimizer state


def test_changed_signal_contents_are_not_resumed(tmp_path, tiny_models, shared_tokens, signals, capsys):
    cut = dpo(tiny_models, shared_tokens, tmp_path, "cut", signals, save_every=1, stop_after=2)
    assert train(cut)["interrupted"]
    scaled_signals(signals, signals, 2.0)  # same path, new contents
    capsys.readouterr()
    rerun = dpo(tiny_models, shared_tokens, tmp_path, "cut", signals, save_every=1)
    train(rerun)
    log = capsys.readouterr().out
    assert not resumed(log)
    why = [line for line in log.splitlines() if line.startswith("not resuming")]
    assert len(why) == 1 and str(signals) in why[0] and "changed" in why[0], log
    fresh = dpo(tiny_models, shared_tokens, tmp_path, "fresh", signals)
    train(fresh)
    assert_same_weights(rerun.out, fresh.out)


def test_finished_stage_drops_its_checkpoints(tmp_path, tiny_models, shared_tokens, signals, clean):
    s = dpo(tiny_models, shared_tokens, tmp_path, "run", signals, save_every=1)
    train(s)
    ckpt = Path(s.checkpoint_dir)
    assert step_dirs(ckpt) == []
    assert (ckpt / "metrics.jsonl").exists() and (ckpt / "rank-0.json").exists()
    assert (Path(s.out) / "metrics.jsonl").exists()
    assert_same_weights(s.out, clean)


def test_save_every_zero_checkpoints_only_a_finished_stage_when_asked(
    tmp_path, tiny_models, shared_tokens, signals, clean, capsys
):
    cut = dpo(tiny_models, shared_tokens, tmp_path, "zero", signals, stop_after=2)
    train(cut)
    assert step_dirs(cut.checkpoint_dir) == []  # save_every 0: none during the stage
    kept = dpo(tiny_models, shared_tokens, tmp_path, "zero", signals, keep_final_checkpoint=True)
    train(kept)
    assert step_dirs(kept.checkpoint_dir) == [f"step-{STEPS:07d}"]
    assert_same_weights(kept.out, clean)
    # the kept state resumes: a rerun without the model dir resumes at the last step and saves the same model
    shutil.rmtree(kept.out)
    capsys.readouterr()
    train(kept)
    assert resumed(capsys.readouterr().out)[0].endswith(f"at step {STEPS}")
    assert_same_weights(kept.out, clean)


# -- 3. a torn or incomplete checkpoint counts as absent


@pytest.mark.parametrize(
    "fault, keep, resumed_step",
    [("torn state", 0, 1), ("torn state", 1, None), ("truncated optimizer", 1, None)],
)
def test_broken_checkpoint_is_ignored(
    tmp_path, tiny_models, shared_tokens, signals, clean, capsys, fault, keep, resumed_step
):
    cut = dpo(tiny_models, shared_tokens, tmp_path, "cut", signals, save_every=1, stop_after=2, keep_checkpoints=keep)
    train(cut)
    newest = Path(cut.checkpoint_dir) / "step-0000002"
    if fault == "torn state":
        (newest / "prefkd_state.json").write_text('{"step": 2, "epo')
    else:
        victim = max(
            (f for f in newest.rglob("*") if f.is_file() and f.name != "prefkd_state.json"),
            key=lambda f: f.stat().st_size,
        )
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    capsys.readouterr()
    rerun = dpo(tiny_models, shared_tokens, tmp_path, "cut", signals, save_every=1, keep_checkpoints=keep)
    train(rerun)
    log = capsys.readouterr().out
    why = [line for line in log.splitlines() if line.startswith("not resuming")]
    assert len(why) == 1 and "step-0000002" in why[0], log
    if resumed_step is None:
        assert not resumed(log)
    else:
        assert len(resumed(log)) == 1 and resumed(log)[0].endswith(f"at step {resumed_step}")
    assert_same_weights(rerun.out, clean)


def test_checkpoint_state_is_written_atomically(tmp_path, tiny_models, shared_tokens, signals, monkeypatch):
    """The state file goes through a temp file and a rename: no reader ever sees half of it."""
    cut = dpo(tiny_models, shared_tokens, tmp_path, "cut", signals, save_every=1, stop_after=1)
    written = []
    real_write_text = Path.write_text

    def spy(self, *a, **kw):
        written.append(self.name)
        return real_write_text(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", spy)
    train(cut)
    assert "prefkd_state.json" not in written
    assert (Path(cut.checkpoint_dir) / "step-0000001" / "prefkd_state.json").exists()


# -- 2. NaN and infinity


def _raw_read_shard(path, kind="tokens"):
    """read_shard without its checks (the shard reader rejects NaN; these tests are about the training-time guard)."""
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def test_nan_signal_weights_stop_training_at_the_step(
    tmp_path, tiny_models, shared_tokens, student_dpo_ref, monkeypatch
):
    sig = tmp_path / "nan.arrow"
    scaled_signals(student_dpo_ref, sig, float("nan"))
    monkeypatch.setattr(batches, "read_shard", _raw_read_shard)
    s = dpo(tiny_models, shared_tokens, tmp_path, "nan", sig, save_every=1)
    with pytest.raises(PrefkdError, match=r"step 1 because its loss is NaN or infinite") as err:
        train(s)
    message = str(err.value)
    assert s.out in message and "preference" in message and message.count(". ") == 0
    assert not Path(s.out).exists() and step_dirs(s.checkpoint_dir) == []


def test_nan_model_stops_signals_naming_file_column_and_row(
    tmp_path, tiny_models, shared_tokens, student_tokenizer_dir
):
    model = load_model(str(tiny_models["student"]))
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    broken = tmp_path / "broken"
    save_model(model, student_tokenizer_dir, broken)
    out = tmp_path / "sig.arrow"
    first = int(read_shard(shared_tokens).column("pair_id")[0].as_py())
    with pytest.raises(PrefkdError, match=r"chosen_ref_logps") as err:
        run_shard(shared_tokens, out, "student", "token", str(broken), None, None, WeightSpec(transform="uniform"))
    assert str(out) in str(err.value) and f"pair_id {first}" in str(err.value)
    assert not out.exists()


def test_identity_transform_cannot_overflow():
    d = np.array([1e4, -1e4, 0.0, 1.0])
    for mu in (1.0, -1.0):
        w = transform_weights(d, mu, WeightSpec(transform="identity"))
        assert np.all(np.isfinite(w)) and np.all(w > 0)
        assert w[2] == 1.0 and w[3] == pytest.approx(np.exp(mu), rel=1e-6)
