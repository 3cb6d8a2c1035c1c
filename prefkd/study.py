"""A study over label-noise levels: one experiment per level of ``data.label_noise: [0, 0.1, 0.2]``.

The data changes with the level, so everything downstream does too: each level is a full experiment,
``<experiment>-noise<level>`` (its config written to results/<experiment>/study/), run by Snakemake in turn
with the same arguments (``--snakemake-args "--cores all"`` or a cluster profile). Finished levels are
cached like any experiment, so a rerun only does what is missing. Then results/<experiment>/study.md and
study.json put the levels side by side: held-out preference accuracy and reward win rate of every student
(mean +- sd over seeds when the config lists seeds, else the value with its 95% bootstrap interval), the
train pairs flipped and the wall time of each level.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from prefkd.core.settings import setting
from prefkd.errors import PrefkdError
from prefkd.evaluation.report import order_models, row_label, seed_groups
from prefkd.evaluation.stats import bootstrap_ci, mean_sd
from prefkd.io.config import noise_levels, validate_config
from prefkd.io.files import write_json

DASH = "\u2013"
PM = "\u00b1"


def level_tag(level: float) -> str:
    """0.2 -> '0.2', 0 -> '0' (the experiment name's suffix)."""
    return f"{float(level):g}"


def level_configs(config: dict) -> dict[float, dict]:
    """{level: the config of its experiment} of a validated config with a list of label-noise levels."""
    out = {}
    for level in noise_levels(config):
        c = copy.deepcopy(config)
        c["experiment"] = f"{config['experiment']}-noise{level_tag(level)}"
        c["data"]["label_noise"] = level
        out[level] = c
    return out


def _json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PrefkdError(f"{path} is not readable JSON ({exc}).") from exc


def _rate_cell(datas: list[dict | None], value: str, items: str) -> tuple[str, float | None]:
    """mean +- sd over seeds, or one run's value [lo, hi] (x100); a dash when no run has the number."""
    values = [100 * d[value] for d in datas if d and isinstance(d.get(value), (int, float))]
    if not values:
        return DASH, None
    if len(datas) > 1:
        mean, sd = mean_sd(values)
        return f"{mean:.2f} {PM} {sd:.2f}" + ("" if len(values) == len(datas) else "\\*"), mean
    rows = datas[0].get(items) or []
    outcomes = [r["outcome"] for r in rows if isinstance(r, dict) and isinstance(r.get("outcome"), (int, float))]
    if not outcomes:
        return f"{values[0]:.2f}", values[0]
    lo, hi = bootstrap_ci(outcomes)
    return f"{values[0]:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]", values[0]


def level_results(results: Path) -> dict:
    """One level's numbers: {model: {pref, win}} of its students, the flipped pairs and its wall time."""
    eval_dir = results / "eval"
    models = sorted(p.name for p in eval_dir.iterdir() if p.is_dir() and p.name.startswith("student-")) if eval_dir.is_dir() else []  # fmt: skip
    groups = seed_groups(models)
    rows = {}
    for base, members in groups.items():
        prefs = [_json(eval_dir / m / "preference.json") for m in members]
        rewards = [_json(eval_dir / m / "reward.json") for m in members]
        pref_text, pref = _rate_cell(prefs, "accuracy", "per_pair")
        win_text, win = _rate_cell(rewards, "win_rate", "per_prompt")
        rows[base] = {
            "pref acc": pref_text,
            "win rate": win_text,
            "pref_acc": pref,
            "win_rate": win,
            "seeds": len(members),
        }
    filters = _json(results / "data" / "filter_report.json") or {}
    cost = _json(results / "stats" / "cost.json") or {}
    return {
        "models": rows,
        "flipped": (filters.get("label_noise") or {}).get("flipped"),
        "train_pairs": (filters.get("splits") or {}).get("train"),
        "wall_s": (cost.get("total") or {}).get("wall_s"),
        "report": (results / "report.md").exists(),
    }


def study_markdown(experiment: str, levels: dict[float, dict]) -> str:
    """The study's tables: one row per student, one column per label-noise level."""
    names = order_models(sorted({m for lv in levels.values() for m in lv["models"]}))
    students = names[0] + names[1]
    heads = [f"noise {level_tag(lv)}" for lv in levels]
    lines = [
        f"# prefkd study: {experiment}, label noise",
        "",
        f"One experiment per level of data.label_noise (`results/{experiment}-noise<level>/`, each with its own "
        f"report.md): the level's share of TRAIN pairs has chosen and rejected swapped (seeded), valid and test stay "
        f"clean. Cells x100: mean {PM} sd across seeds when the config lists seeds, else the value [95% bootstrap "
        f"interval over the test items]; {DASH}: not evaluated.",
        "",
    ]
    for title, key in (("Held-out preference accuracy", "pref acc"), ("Reward win rate against the student SFT", "win rate")):  # fmt: skip
        lines += [f"## {title}", "", "| model | " + " | ".join(heads) + " |", "|" + "---|" * (len(heads) + 1)]
        for m in students:
            cells = [lv["models"].get(m, {}).get(key, DASH) for lv in levels.values()]
            lines.append(f"| {row_label(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Levels",
        "",
        "| level | train pairs | flipped | wall (s, all jobs) | report |",
        "|---|---|---|---|---|",
    ]
    for level, lv in levels.items():
        wall = DASH if lv["wall_s"] is None else f"{lv['wall_s']:.0f}"
        cells = [str(lv["train_pairs"] if lv["train_pairs"] is not None else DASH), str(lv["flipped"] if lv["flipped"] is not None else DASH)]  # fmt: skip
        lines.append(f"| {level_tag(level)} | {cells[0]} | {cells[1]} | {wall} | {'yes' if lv['report'] else 'no'} |")
    return "\n".join(lines) + "\n"


@dataclass(kw_only=True)
class StudySettings:
    """Settings of ``prefkd study``."""

    configfile: Path = setting(doc="experiment config whose data.label_noise lists the levels")
    snakemake_args: str = setting("--cores all", "arguments of every level's snakemake run (one string)")
    summary_only: bool = setting(False, "only write study.md from the levels' results (run nothing)")


def run(s: StudySettings) -> int:
    try:
        raw = yaml.safe_load(Path(s.configfile).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PrefkdError(f"cannot read the config {s.configfile} ({exc.strerror}).") from exc
    config = validate_config(raw)
    folder = Path("results") / config["experiment"]
    configs = level_configs(config)
    for level, c in configs.items():
        path = folder / "study" / f"{c['experiment']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(c, sort_keys=False), encoding="utf-8")
        if s.summary_only:
            continue
        cmd = [sys.executable, "-m", "snakemake", *shlex.split(s.snakemake_args), "--configfile", str(path)]
        print(f"prefkd study: label noise {level_tag(level)}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise PrefkdError(
                f"the snakemake run of label noise {level_tag(level)} failed ({path}); rerun to resume it."
            )
    levels = {level: level_results(Path("results") / c["experiment"]) for level, c in configs.items()}
    (folder / "study.md").write_text(study_markdown(config["experiment"], levels), encoding="utf-8")
    write_json(folder / "study.json", {level_tag(k): v for k, v in levels.items()})
    print(json.dumps({"study": str(folder / "study.md"), "levels": [level_tag(x) for x in levels]}))
    return 0
