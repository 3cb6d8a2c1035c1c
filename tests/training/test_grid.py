"""The learning-rate search: the choice rule, selected.json, the chosen run linked in place, --lr-from."""

import json
import os
from pathlib import Path

import pytest

from prefkd.cli import main
from prefkd.errors import PrefkdError
from prefkd.training.grid import rate_tag, read_selected_lr, select_lr


def test_highest_valid_accuracy_wins():
    choice = select_lr({1e-4: {"accuracy": 0.55, "loss": 0.6}, 3e-4: {"accuracy": 0.62, "loss": 0.9}})
    assert choice["lr"] == 3e-4 and choice["split"] == "valid"
    assert [c["lr"] for c in choice["candidates"]] == [1e-4, 3e-4]


def test_ties_go_to_the_lower_loss_then_the_lower_rate():
    evals = {1e-3: {"accuracy": 0.6, "loss": 0.5}, 1e-4: {"accuracy": 0.6, "loss": 0.7}}
    assert select_lr(evals)["lr"] == 1e-3
    same = {1e-3: {"accuracy": 0.6, "loss": 0.5}, 1e-4: {"accuracy": 0.6, "loss": 0.5}}
    assert select_lr(same)["lr"] == 1e-4


@pytest.mark.parametrize("evals", [{}, {1e-4: {"loss": 0.5}}, {1e-4: None}])
def test_a_search_without_valid_accuracies_is_one_sentence(evals):
    with pytest.raises(PrefkdError):
        select_lr(evals)


def test_rate_tags_are_short_and_exact():
    assert [rate_tag(x) for x in (1e-4, 3e-4, 1e-3, 1e-6, 0.002)] == ["0.0001", "0.0003", "0.001", "1e-06", "0.002"]
    assert all(float(rate_tag(x)) == x for x in (1e-4, 3e-4, 1.2e-3, 5e-7))


def _run_dir(root: Path, lr: float, accuracy: float, loss: float) -> Path:
    d = root / f"lr-{rate_tag(lr)}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(64))
    (d / "train_summary.json").write_text(
        json.dumps({"final": {"eval": {"accuracy": accuracy, "loss": loss, "pairs": 9}}})
    )
    return d


def test_cli_writes_the_choice_and_links_the_chosen_run(tmp_path, capsys):
    a, b = _run_dir(tmp_path, 1e-4, 0.5, 0.7), _run_dir(tmp_path, 1e-3, 0.75, 0.6)
    out, model = tmp_path / "selected.json", tmp_path / "students" / "ctpd"
    assert main(["select-lr", "--run", f"0.0001={a}", f"0.001={b}", "--out", str(out), "--model-out", str(model)]) == 0
    data = json.loads(out.read_text())
    assert data["lr"] == 1e-3 and data["run"] == str(b) and read_selected_lr(out) == 1e-3
    assert (model / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert os.stat(model / "model.safetensors").st_ino == os.stat(b / "model.safetensors").st_ino  # a hard link
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lr"] == 1e-3


def test_a_run_without_its_summary_is_named(tmp_path, capsys):
    empty = tmp_path / "lr-0.1"
    empty.mkdir()
    assert main(["select-lr", "--run", f"0.1={empty}", "--out", str(tmp_path / "s.json")]) != 0
    assert "train_summary.json" in capsys.readouterr().err


def test_lr_from_a_file_that_is_no_choice_is_one_sentence(tmp_path):
    bad = tmp_path / "selected.json"
    bad.write_text("[]")
    with pytest.raises(PrefkdError, match="is not a learning-rate choice"):
        read_selected_lr(bad)
