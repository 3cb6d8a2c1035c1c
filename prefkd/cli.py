"""`prefkd` command line: one subcommand per stage, each runnable by hand.

Stage modules are imported only when their subcommand runs, so `prefkd --help`
stays fast. A stage names its settings dataclass (whose fields generate the
options, see ``prefkd.core.settings``) and a ``run(settings)`` function.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import threading
import time
from pathlib import Path

from prefkd.core.settings import add_options, from_args
from prefkd.errors import PrefkdError

# name -> (module, settings dataclass, run function, one-line help)
COMMANDS = {
    "tokenizer": (
        "prefkd.assets.tokenizers",
        "TokenizerSettings",
        "run",
        "build or fetch a tokenizer dir (builtin, HF id or path)",
    ),
    "demo-data": (
        "prefkd.data.demo",
        "DemoDataSettings",
        "run",
        "write the embedded demo's synthetic preference pairs",
    ),
    "prepare": (
        "prefkd.data.prepare",
        "PrepareSettings",
        "run",
        "load, normalise, filter and split a preference dataset",
    ),
    "tokenize": (
        "prefkd.data.tokenize_align",
        "TokenizeSettings",
        "run",
        "tokenize one shard with both tokenizers and align spans",
    ),
    "alignment-stats": (
        "prefkd.data.tokenize_align",
        "AlignmentStatsSettings",
        "run_gather",
        "merge token-shard statistics into stats/alignment.json",
    ),
    "mismatch": (
        "prefkd.data.mismatch",
        "MismatchSettings",
        "run",
        "span classes (1:1, 1:n, n:1, n:m) and vocabulary overlap of a teacher / student tokenizer pair",
    ),
    "model": ("prefkd.assets.models", "ModelSettings", "run", "build a tiny demo model or fetch a model into a HF dir"),
    "train": (
        "prefkd.training.engine",
        "TrainSettings",
        "run",
        "train one stage (SFT or a preference loss) with accelerate",
    ),
    "reverse": (
        "prefkd.io.shards",
        "ReverseSettings",
        "run_reverse",
        "write the reversed dataset of a shard (chosen <-> rejected)",
    ),
    "signals": (
        "prefkd.training.signals",
        "SignalSettings",
        "run",
        "per-unit weights and reference log-probs of one token shard",
    ),
    "select-lr": (
        "prefkd.training.grid",
        "GridSettings",
        "run",
        "pick a method's learning rate from its search runs' valid-split accuracy",
    ),
    "weights-stats": (
        "prefkd.training.signals",
        "WeightsStatsSettings",
        "run_gather",
        "merge signal-shard statistics into stats/weights.json",
    ),
    "spans": (
        "prefkd.data.spans",
        "add_arguments",
        "run",
        "show aligned spans of a text, or check every invariant on a JSONL file",
    ),
    "eval-data": (
        "prefkd.evaluation.lmeval",
        "EvalDataSettings",
        "run_data",
        "write the demo's local lm-eval tasks from the held-out split",
    ),
    "lm-eval": (
        "prefkd.evaluation.lmeval",
        "LmEvalSettings",
        "run",
        "evaluate one model on one benchmark suite with lm-evaluation-harness",
    ),
    "preference-eval": (
        "prefkd.evaluation.preference",
        "PreferenceEvalSettings",
        "run",
        "held-out preference accuracy and reward margin of one model",
    ),
    "generate": (
        "prefkd.evaluation.reward",
        "GenerateSettings",
        "run_generate",
        "answer held-out prompts and score the answers with a judge",
    ),
    "winrate": (
        "prefkd.evaluation.reward",
        "WinrateSettings",
        "run_winrate",
        "win rate of a model's scored answers against a baseline's",
    ),
    "report": (
        "prefkd.evaluation.report",
        "ReportSettings",
        "run",
        "write report.md and its plots from the evaluation JSONs",
    ),
    "cost": (
        "prefkd.cost",
        "CostSettings",
        "run",
        "wall time, processes and estimated FLOPs per stage, and each student run's cost end to end",
    ),
    "study": (
        "prefkd.study",
        "StudySettings",
        "run",
        "one experiment per label-noise level of a config, then results/<experiment>/study.md",
    ),
    "plan": (
        "prefkd.plan",
        "PlanSettings",
        "run",
        "memory per GPU, jobs and GPU-hours of every stage of a config, before anything is submitted",
    ),
}


def _add(parser: argparse.ArgumentParser, module, settings: str) -> None:
    """The stage's options: generated from its settings dataclass (or, for a stage not yet converted, its
    ``add_arguments``-style function)."""
    target = getattr(module, settings)
    if dataclasses.is_dataclass(target):
        add_options(parser, target)
    else:
        target(parser)


def _run(module, settings: str, run: str, args: argparse.Namespace) -> int:
    target = getattr(module, settings)
    value = from_args(target, args) if dataclasses.is_dataclass(target) else args
    return int(getattr(module, run)(value) or 0)


def build_parser(load_modules: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefkd", description="Cross-Tokenizer Preference Distillation stages.")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for name, (module, settings, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load_modules:
            _add(p, importlib.import_module(module), settings)
    return parser


WATCH_ENV = "PREFKD_WATCH_PID"  # the workflow sets it to the Snakemake process that runs the job
WATCH_SECONDS = 2.0


def _alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` still runs (and is the same process: its start time has not changed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _start_time(pid) == started


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def watch_workflow() -> None:
    """Stop this stage when the Snakemake process that started it is gone (killed, even with -9), so no
    training job runs on as an orphan; it checks every WATCH_SECONDS seconds in a daemon thread."""
    raw = os.environ.get(WATCH_ENV, "")
    if not raw.isdigit() or int(raw) <= 1:
        return
    pid = int(raw)
    started = _start_time(pid)

    def watch() -> None:
        while _alive(pid, started):
            time.sleep(WATCH_SECONDS)
        print(
            f"prefkd: the workflow process {pid} that started this job is gone; stopping.", file=sys.stderr, flush=True
        )
        os._exit(143)

    threading.Thread(target=watch, name="prefkd-watch-workflow", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only import the module of the chosen stage.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in COMMANDS:
        parser = build_parser(load_modules=False)
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, settings, run, help_text = COMMANDS[chosen]
    watch_workflow()
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"prefkd {chosen}", description=help_text)
    _add(parser, mod, settings)
    args = parser.parse_args(argv[argv.index(chosen) + 1 :])
    try:
        return _run(mod, settings, run, args)
    except PrefkdError as exc:
        print(f"prefkd {chosen}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
