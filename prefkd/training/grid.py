"""The learning-rate search of a student method: pick the rate whose run did best on the VALID split.

A searched method trains once per rate of ``distill.lr_grid`` (students-grid/<method>/lr-<rate>/), each run
evaluated at its end on the valid pairs (its train_summary.json's ``final.eval``: implicit-reward accuracy
against the student SFT, in token units, with the mean DPO loss). ``prefkd select-lr`` writes the choice to
``selected.json`` and hard-links the chosen run to students/<method>/ (the seed run of the experiment's seed:
the same settings, so retraining it would give the same weights); the other seeds train at the chosen rate
(``prefkd train --lr-from selected.json``).

Rule, stated once: the highest valid accuracy; ties go to the lower valid loss, then to the lower rate.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefkd.core.settings import setting
from prefkd.errors import PrefkdError
from prefkd.io.files import atomic_dir, write_json

RULE = "highest valid accuracy; ties: lower valid loss, then lower rate"


def rate_tag(lr: float) -> str:
    """A rate as it appears in a path: 0.0005 -> '0.0005', 1e-06 -> '1e-06' (Python's shortest form)."""
    return f"{float(lr):g}"


def select_lr(candidates: dict[float, dict]) -> dict:
    """Pure: {rate: its run's valid eval (accuracy, loss, margin, pairs)} -> the choice and the table.

    >>> select_lr({1e-4: {"accuracy": 0.6, "loss": 0.6}, 5e-4: {"accuracy": 0.6, "loss": 0.5}})["lr"]
    0.0005
    """
    if not candidates:
        raise PrefkdError("a learning-rate search needs at least one run; distill.lr_grid is empty.")
    for lr, ev in candidates.items():
        if not isinstance(ev, dict) or not isinstance(ev.get("accuracy"), (int, float)):
            raise PrefkdError(f"the run at learning rate {lr:g} has no valid-split accuracy in its train_summary.json.")

    def key(lr: float):
        ev = candidates[lr]
        loss = ev.get("loss")
        return (-ev["accuracy"], loss if isinstance(loss, (int, float)) else float("inf"), lr)

    best = min(candidates, key=key)
    table = [
        {"lr": lr, **{k: candidates[lr].get(k) for k in ("accuracy", "loss", "margin", "pairs")}}
        for lr in sorted(candidates)
    ]
    return {"lr": best, "rule": RULE, "split": "valid", "candidates": table}


def read_selected_lr(path: str | Path) -> float:
    """The chosen rate of a selected.json (one sentence when the file is not one)."""
    try:
        data = json.loads(Path(path).read_text())
        return float(data["lr"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrefkdError(f"{path} is not a learning-rate choice of `prefkd select-lr` ({exc}).") from exc


def _valid_eval(run_dir: Path) -> dict:
    path = run_dir / "train_summary.json"
    try:
        return json.loads(path.read_text())["final"]["eval"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrefkdError(
            f"{path} has no held-out evaluation (final.eval) to choose a learning rate by ({exc})."
        ) from exc


def _link_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` with hard links where the file system allows them (a model is not copied twice)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


@dataclass(kw_only=True)
class GridSettings:
    """Settings of ``prefkd select-lr``."""

    run: list[str] = setting(doc="RATE=DIR: a finished run of the search (its train_summary.json's valid eval)")
    out: str = setting(doc="selected.json to write")
    model_out: str | None = setting(None, "where to put the chosen run (hard links), e.g. students/<method>")


def run(s: GridSettings) -> int:
    runs: dict[float, Path] = {}
    for item in s.run:
        rate, _, folder = item.partition("=")
        try:
            lr = float(rate)
        except ValueError:
            raise PrefkdError(f"--run {item!r} must look like RATE=DIR with a number as the rate.") from None
        runs[lr] = Path(folder)
    choice = select_lr({lr: _valid_eval(d) for lr, d in runs.items()})
    choice["run"] = str(runs[choice["lr"]])
    if s.model_out:
        with atomic_dir(Path(s.model_out)) as tmp:
            _link_tree(runs[choice["lr"]], tmp)
    write_json(Path(s.out), choice)
    print(json.dumps({"lr": choice["lr"], "run": choice["run"]}))
    return 0
