"""`prefkd` command line: one subcommand per stage, each runnable by hand.

Stage modules are imported only when their subcommand runs, so `prefkd --help`
stays fast. Each module exposes ``add_arguments(parser)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from prefkd.errors import PrefkdError

# name -> (module, add_arguments function, run function, one-line help)
COMMANDS = {
    "tokenizer": ("prefkd.tokenizers", "add_arguments", "run", "build or fetch a tokenizer dir (builtin, HF id or path)"),
    "demo-data": ("prefkd.demo_data", "add_arguments", "run", "write the embedded demo's synthetic preference pairs"),
    "prepare": ("prefkd.prepare", "add_arguments", "run", "load, normalise, filter and split a preference dataset"),
    "tokenize": ("prefkd.tokenize_align", "add_arguments", "run", "tokenize one shard with both tokenizers and align spans"),
    "alignment-stats": (
        "prefkd.tokenize_align",
        "add_gather_arguments",
        "run_gather",
        "merge token-shard statistics into stats/alignment.json",
    ),
    "model": ("prefkd.models", "add_arguments", "run", "build a tiny demo model or fetch a model into a HF dir"),
    "train": ("prefkd.train", "add_arguments", "run", "train one stage (SFT or a preference loss) with accelerate"),
    "reverse": ("prefkd.shards", "add_reverse_arguments", "run_reverse", "write the reversed dataset of a shard (chosen <-> rejected)"),
    "signals": ("prefkd.signals", "add_arguments", "run", "per-unit weights and reference log-probs of one token shard"),
    "weights-stats": ("prefkd.signals", "add_gather_arguments", "run_gather", "merge signal-shard statistics into stats/weights.json"),
    "spans": ("prefkd.spans", "add_arguments", "run", "show aligned spans of a text, or check every invariant on a JSONL file"),
    "eval-data": ("prefkd.lmeval", "add_data_arguments", "run_data", "write the demo's local lm-eval tasks from the held-out split"),
    "lm-eval": ("prefkd.lmeval", "add_arguments", "run", "evaluate one model on one benchmark suite with lm-evaluation-harness"),
    "preference-eval": ("prefkd.evaluate", "add_arguments", "run", "held-out preference accuracy and reward margin of one model"),
    "generate": ("prefkd.reward", "add_generate_arguments", "run_generate", "answer held-out prompts and score the answers with a judge"),
    "winrate": ("prefkd.reward", "add_winrate_arguments", "run_winrate", "win rate of a model's scored answers against a baseline's"),
    "report": ("prefkd.report", "add_arguments", "run", "write report.md and its plots from the evaluation JSONs"),
}


def build_parser(load_modules: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefkd", description="Cross-Tokenizer Preference Distillation stages.")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for name, (module, add, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load_modules:
            getattr(importlib.import_module(module), add)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only import the module of the chosen stage.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in COMMANDS:
        parser = build_parser(load_modules=False)
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, add, run, help_text = COMMANDS[chosen]
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"prefkd {chosen}", description=help_text)
    getattr(mod, add)(parser)
    args = parser.parse_args(argv[argv.index(chosen) + 1 :])
    try:
        return int(getattr(mod, run)(args) or 0)
    except PrefkdError as exc:
        print(f"prefkd {chosen}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
