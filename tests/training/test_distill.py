"""Student distillation: the method registry, CTPD / KD stages of the engine on real
tokenizations, misaligned batches, and that the teacher never learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefkd.core.methods import METHODS, SIGNAL_SETS, resolve_methods, signal_sets_for
from prefkd.data.batches import PairTable, collate_chosen_views
from prefkd.errors import PrefkdError
from prefkd.io.config import load_schema
from prefkd.io.shards import read_shard
from prefkd.training.engine import TrainSettings, train
from prefkd.training.signals import WeightSpec, run_shard

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 16  # the shared session pairs (conftest.py)


def test_schema_lists_exactly_the_registered_methods():
    schema = load_schema()  # the method names are filled in from the registry
    allowed = schema["properties"]["distill"]["properties"]["methods"]["items"]["enum"]
    assert set(allowed) == set(METHODS) | {"all"}
    assert resolve_methods(["all"]) == list(METHODS)
    for name in signal_sets_for(list(METHODS)):
        assert name in SIGNAL_SETS
    with pytest.raises(PrefkdError, match="unknown student method"):
        resolve_methods(["ctpd", "nope"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_tokens, tiny_models, student_dpo_ref):
    """The shared session fixtures (conftest.py) plus this module's CTPD and student-reference signal shards."""
    root = tmp_path_factory.mktemp("distill")
    tokens, dpo_ref = shared_tokens, student_dpo_ref
    teacher, teacher_neg, student = tiny_models["teacher"], tiny_models["teacher-neg"], tiny_models["student"]
    ctpd = root / "ctpd.arrow"
    run_shard(tokens, ctpd, "teacher", "span", str(teacher), str(teacher), str(teacher_neg), WeightSpec())
    student_ref = root / "student-ref.arrow"
    run_shard(tokens, student_ref, "student", "span", str(student), None, None, WeightSpec(transform="uniform"))
    return dict(
        root=root, tokens=tokens, teacher=teacher, student=student, ctpd=ctpd, student_ref=student_ref, dpo_ref=dpo_ref
    )


def settings(setup, name, **kw):
    base = dict(
        init=str(setup["student"]),
        out=str(setup["root"] / name),
        tokens=[str(setup["tokens"])],
        role="student",
        batch_size=4,
        epochs=1,
        lr=1e-3,
        checkpoint_dir=str(setup["root"] / f"{name}.ckpt"),
        eval_tokens=[str(setup["tokens"])],
        eval_signals=[str(setup["dpo_ref"])],
    )
    base.update(kw)
    return TrainSettings(**base)


def metrics(path):
    return [json.loads(x) for x in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def test_ctpd_trains_on_teacher_spans_without_loading_the_teacher(setup):
    s = settings(setup, "ctpd", stage="preference", unit="span", signals=[str(setup["ctpd"])], beta=0.1, epochs=2)
    final = train(s)
    rows = metrics(s.out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected"} <= set(rows[0])
    assert set(final["eval"]) == {"accuracy", "margin", "loss", "pairs"} and final["eval"]["pairs"] == PAIRS


def test_student_reference_replaces_the_teacher_reference(setup):
    plain = PairTable([setup["tokens"]], [setup["ctpd"]])
    swapped = PairTable([setup["tokens"]], [setup["ctpd"]], [setup["student_ref"]])
    a, b = plain.rows([0])[0]["signals"], swapped.rows([0])[0]["signals"]
    assert a["chosen_weights"] == b["chosen_weights"]
    assert a["chosen_ref_logps"] != b["chosen_ref_logps"]
    assert b["chosen_ref_logps"] == read_shard(setup["student_ref"], "signals").to_pylist()[0]["chosen_ref_logps"]


@pytest.mark.parametrize("kd", ["uld", "mined", "cdm", "dskd"])
def test_kd_stage_learns_and_leaves_the_teacher_untouched(setup, kd):
    before = load_file(str(setup["teacher"] / "model.safetensors"))
    s = settings(setup, f"kd-{kd}", stage="kd", kd=kd, kd_teacher=str(setup["teacher"]), kd_weight=0.5, epochs=2)
    train(s)
    rows = metrics(s.out)
    assert all(r["loss"] == r["loss"] for r in rows)  # finite
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "kd/loss" in rows[0] and "nll" in rows[0]
    after = load_file(str(setup["teacher"] / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ctpd_plus_dskd_adds_the_kd_term(setup):
    s = settings(
        setup, "ctpd-dskd", stage="preference", unit="span", signals=[str(setup["ctpd"])], kd="dskd",
        kd_teacher=str(setup["teacher"]), kd_weight=0.5,
    )  # fmt: skip
    train(s)
    row = metrics(s.out)[0]
    assert row["loss"] == pytest.approx(row["preference_loss"] + 0.5 * row["kd/loss"], rel=1e-4)


def test_a_shuffled_teacher_view_is_caught(setup, teacher_tokenizer, student_tokenizer):
    table = PairTable([setup["tokens"]])
    rows = table.rows(range(4))
    collate_chosen_views(rows, 0, 0)  # aligned: fine
    lengths = [r["chosen_num_spans"] for r in rows]
    j = next(j for j in range(1, 4) if lengths[j] != lengths[0])
    # the teacher columns of row 0 replaced by another pair's (the bug of feeding the wrong ids)
    for key in [k for k in rows[0] if k.startswith("teacher_")]:
        rows[0][key] = rows[j][key]
    rows[0]["chosen_truncated"] = rows[0]["chosen_truncated"]
    with pytest.raises(PrefkdError, match="misaligned"):
        collate_chosen_views(rows, 0, 0)
