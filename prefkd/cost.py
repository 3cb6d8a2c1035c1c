"""Compute accounting of a run: wall time, CPU time, processes and estimated FLOPs per stage, and what each
student method costs end to end (its own training plus every stage it needs, teacher stages included).

The workflow states the stage graph once (rule ``cost``'s ``--plan``, built in workflow/rules/common.smk):

    {"stages": {KEY: {"match": REGEX,        # the stage's jobs: their benchmark files' paths under --benchmarks,
                                             # without .tsv, full match; a named group "split" gives the split
                      "runs": [DIR, ...],    # training dirs (their train_summary.json: processes)
                      "needs": [KEY, ...],   # the stages whose outputs it reads
                      "flops": [[MULT, MODEL_DIR, ROLE, [SIDE, ...], EPOCHS, [SPLIT, ...] or null], ...]}},
     "methods": {RUN: KEY}}                  # the stage that trains a student run

Every job writes its benchmark file (Snakemake's ``benchmark:``), so a stage's jobs are the files that match:
a job that did not run in this experiment costs nothing and is not listed. A file no stage matches (the
evaluation and report jobs) is summed under "other"; one that two stages match is an error of the plan.

FLOPs are estimated, not measured: MULT * N * T * EPOCHS per term, with MULT = 6 for a trained model (forward
2 + backward 4) and 2 for a forward-only one (scoring, a frozen KD teacher), N the parameters a token's
forward multiplies with (the decoder blocks and the LM head; the input embedding is a lookup) counted from
the model's config.json, and T the tokens of the given role, splits and sides (prompt + response + EOS) in
the token shards. Attention's quadratic term, padding and the held-out evaluation inside a training job are
left out. Wall and CPU seconds are Snakemake's benchmark records of each job (``s``, ``cpu_time``).
"""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from prefkd.core.layout import ROLES
from prefkd.core.settings import setting
from prefkd.errors import PrefkdError
from prefkd.io.files import write_json
from prefkd.io.shards import read_shard
from prefkd.plan import Arch, arch_from_config

SIDES = ("chosen", "rejected")


def flop_params(arch: Arch) -> int:
    """Parameters a token's forward multiplies with: every decoder block, the final norm and the LM head (the
    input embedding is a table lookup; a tied head counts once, as the head)."""
    return arch.layers * arch.layer_params + arch.hidden + (arch.head if not arch.tied else arch.embedding)


def term_flops(mult: float, params: int, tokens: int, epochs: float = 1.0) -> float:
    """One term of a stage's estimate: MULT * N * T * epochs.

    >>> term_flops(6, 1_000_000, 2_000, 1)
    12000000000.0
    """
    return float(mult) * params * tokens * epochs


def read_benchmark(path: Path) -> dict:
    """A Snakemake benchmark TSV -> {wall_s, cpu_s, max_rss_mb} (the last row: the job's final attempt)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise PrefkdError(f"cannot read the benchmark record {path} ({exc.strerror}).") from exc
    if not rows:
        raise PrefkdError(f"the benchmark record {path} has no row.")
    row = rows[-1]

    def number(key: str) -> float:
        try:
            return float(row.get(key) or 0)
        except ValueError:  # "NA" when psutil could not measure
            return 0.0

    return {"wall_s": number("s"), "cpu_s": number("cpu_time"), "max_rss_mb": number("max_rss")}


def token_counts(shards: list[Path]) -> dict:
    """{split: {role: {side: tokens}}} of token shards (the split is the shard's folder name)."""
    counts: dict = {}
    for path in shards:
        table = read_shard(Path(path))
        split = Path(path).parent.name
        for role in ROLES:
            for side in SIDES:
                column = table.column(f"{role}_{side}_input_ids")
                n = int(pc.sum(pc.list_value_length(column)).as_py() or 0)
                per = counts.setdefault(split, {}).setdefault(role, {})
                per[side] = per.get(side, 0) + n
    return counts


def closure(key: str, stages: dict) -> list[str]:
    """``key`` and every stage it needs, directly or not, in a stable order (each once)."""
    seen: list[str] = []
    todo = [key]
    while todo:
        k = todo.pop(0)
        if k in seen:
            continue
        if k not in stages:
            raise PrefkdError(f"the cost plan names a stage {k!r} that it does not describe.")
        seen.append(k)
        todo.extend(stages[k].get("needs", []))
    return seen


def match_jobs(bench_dir: Path, stages: dict) -> tuple[dict[str, list[tuple[Path, str | None]]], list[Path]]:
    """{stage: [(benchmark file, its split or None)]} and the files no stage matches."""
    patterns = {k: re.compile(spec["match"]) for k, spec in stages.items()}
    found: dict[str, list[tuple[Path, str | None]]] = {k: [] for k in stages}
    other = []
    for path in sorted(Path(bench_dir).rglob("*.tsv")):
        name = path.relative_to(bench_dir).with_suffix("").as_posix()
        hits = [(k, m) for k, rx in patterns.items() if (m := rx.fullmatch(name))]
        if len(hits) > 1:
            raise PrefkdError(f"the benchmark record {name} matches the stages {', '.join(k for k, _ in hits)}.")
        if not hits:
            other.append(path)
            continue
        key, m = hits[0]
        found[key].append((path, m.groupdict().get("split")))
    return found, other


def stage_cost(spec: dict, jobs: list[tuple[Path, str | None]], tokens: dict, params) -> dict:
    """One stage's record from its jobs' benchmark files, training summaries and FLOPs terms (a term without
    splits is counted on the splits of the stage's jobs, once per job)."""
    records = [read_benchmark(path) for path, _ in jobs]
    processes = 1
    for run in spec.get("runs", []):
        summary = Path(run) / "train_summary.json"
        if summary.exists():
            runtime = json.loads(summary.read_text()).get("runtime") or {}
            processes = max(processes, int(runtime.get("num_processes") or 1))
    flops = 0.0
    if jobs:
        for mult, model, role, sides, epochs, splits in spec.get("flops", []):
            for split in splits if splits is not None else [s for _, s in jobs if s]:
                t = sum(tokens.get(split, {}).get(role, {}).get(side, 0) for side in sides)
                flops += term_flops(mult, params(model), t, epochs)
    return {
        "jobs": len(records),
        "wall_s": round(sum(r["wall_s"] for r in records), 2),
        "cpu_s": round(sum(r["cpu_s"] for r in records), 2),
        "max_rss_mb": round(max((r["max_rss_mb"] for r in records), default=0.0), 1),
        "processes": processes,
        "flops": flops,
    }


def model_params(model: str) -> int:
    """N of a model dir (from its config.json); called only for stages whose jobs ran."""
    path = Path(model) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrefkdError(f"cannot read {path} to count the parameters of {model} ({exc}).") from exc
    return flop_params(arch_from_config(cfg, str(path)))


def account(plan: dict, bench_dir: Path, tokens: dict, params=model_params) -> dict:
    """Every stage's cost and every run's own and end-to-end totals (stages it needs counted once). ``params``:
    a model's N (a function of its dir, or a dict), read only for stages whose jobs ran."""
    stages = plan.get("stages", {})
    count = functools.cache(params.__getitem__ if isinstance(params, dict) else params)  # each model read once
    found, other = match_jobs(bench_dir, stages)
    costs = {k: stage_cost(spec, found[k], tokens, count) for k, spec in stages.items()}
    costs["other"] = stage_cost({}, [(path, None) for path in other], tokens, count)  # no FLOPs terms
    methods = {}
    for run, key in plan.get("methods", {}).items():
        keys = closure(key, stages)
        methods[run] = {
            "stage": key,
            "stages": keys,
            "own_wall_s": costs[key]["wall_s"],
            "own_flops": costs[key]["flops"],
            "wall_s": round(sum(costs[k]["wall_s"] for k in keys), 2),
            "cpu_s": round(sum(costs[k]["cpu_s"] for k in keys), 2),
            "flops": sum(costs[k]["flops"] for k in keys),
        }
    total = {
        "wall_s": round(sum(c["wall_s"] for c in costs.values()), 2),
        "flops": sum(c["flops"] for c in costs.values()),
    }
    return {"stages": costs, "methods": methods, "total": total}


@dataclass(kw_only=True)
class CostSettings:
    """Settings of ``prefkd cost``."""

    plan: str = setting(doc="the stage graph as JSON (see prefkd.cost)")
    benchmarks: Path = setting(doc="the experiment's benchmarks/ folder (Snakemake's benchmark files)")
    tokens: list[str] = setting([], "token shards of every split (tokens/<split>/shard-*.arrow)")
    out: Path = setting(doc="cost.json to write")


def run(s: CostSettings) -> int:
    try:
        plan = json.loads(s.plan)
    except ValueError as exc:
        raise PrefkdError(f"--plan is not JSON ({exc}).") from exc
    result = account(plan, s.benchmarks, token_counts([Path(p) for p in s.tokens]))
    write_json(s.out, result)
    print(json.dumps({"cost": str(s.out), "stages": len(result["stages"]), "total_flops": result["total"]["flops"]}))
    return 0
