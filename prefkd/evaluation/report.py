"""The experiment report: results/<exp>/report.md and its figures results/<exp>/report/*.png.

Every input path is passed in explicitly (the Snakemake rule lists them); nothing here
searches the results tree. Benchmark scores come from the lm-eval JSONs of each model's
eval dir (``<suite>.json``), preference numbers from ``preference.json`` and, when it
exists, ``reward.json``; the alignment and span-weight statistics from stats/*.json; the
training curves from each run's ``metrics.jsonl``.

Required inputs (a model's suite JSONs and preference.json, the alignment report) raise a
PrefkdError naming the file when absent; optional ones (reward.json, weights.json,
metrics.jsonl) only drop their column, section or plot, with a sentence saying so.

Uncertainty: a rate with per-item outcomes (preference.json's ``per_pair``, reward.json's ``per_prompt``) is
shown as ``value [lo, hi]``, its 95% percentile bootstrap interval; a benchmark score as ``value ± se`` with
lm-eval's standard error; the section "CTPD vs baselines" tests CTPD against each other student on the same
items (``prefkd.evaluation.stats``). ``table_numbers`` reads a cell's value and ``table_intervals`` its interval.

Figures are drawn with matplotlib's Agg canvas on standalone Figure objects (no pyplot
state) and saved without the Software metadata, so running twice gives identical bytes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from prefkd.core.methods import METHODS, teacher_reference_methods
from prefkd.errors import PrefkdError
from prefkd.evaluation.plots import (
    is_number,
    plot_benchmarks,
    plot_objective,
    plot_reward_accuracy,
    plot_span_sizes,
    plot_training,
    plot_weight_histograms,
)
from prefkd.evaluation.settings import ReportSettings
from prefkd.evaluation.stats import (
    LEVEL,
    RESAMPLES,
    bootstrap_ci,
    compare,
    mean_sd,
    paired_outcomes,
    seed_mean_outcomes,
)
from prefkd.io.files import atomic_dir

DASH = "\u2013"  # shown for a missing value
STAR = "\\*"  # markdown-escaped footnote mark: an average over only the values that exist

TEACHER_ROWS = {"teacher-sft": "teacher (SFT)", "teacher-pos": "teacher pi+", "teacher-neg": "teacher pi-"}
# Table 1 rows after the teachers, and the ablation rows: labels and order from the method registry.
TABLE1_STUDENTS = {f"student-{name}": m.label for name, m in METHODS.items() if not m.ablation}
ABLATION_ROWS = {f"student-{name}": m.label for name, m in METHODS.items() if m.ablation}
# The paper's ablation averages (Qwen-2.5-14B teacher -> Llama-3.1-8B student, docs/method.md).
PAPER_ABLATION_AVG = {
    f"student-{name}": m.paper_ablation_avg for name, m in METHODS.items() if m.paper_ablation_avg is not None
}
PAPER_AVG_COLUMN = "paper avg (14B->8B)"
TEACHER_REFERENCE_METHODS = teacher_reference_methods()
SPLIT_ORDER = ("all", "train", "valid", "test")
PLOTS = ("benchmarks", "training_curves", "reward_accuracy", "objective", "weight_histograms", "span_sizes")
TAIL_STEPS = 10  # the "final" reward accuracy / margin is the mean of the last TAIL_STEPS steps
CTPD = "student-ctpd"  # the method the "CTPD vs baselines" section compares with every other student
PM = "\u00b1"  # value ± standard error
SEED_RUN = re.compile(r"^(student-.+)-seed(\d+)$")  # a student run of another seed: student-<method>-seed<N>


# ---------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    """A required JSON object; a missing or malformed file is a PrefkdError naming it."""
    path = Path(path)
    if not path.is_file():
        raise PrefkdError(f"{what} {path} is missing.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrefkdError(f"{what} {path} is not readable JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise PrefkdError(f"{what} {path} must hold a JSON object.")
    return data


def _optional_json(path: Path | None, what: str) -> dict | None:
    """An optional JSON object: None when the path is not given or the file does not exist."""
    if path is None or not Path(path).is_file():
        return None
    return _read_json(path, what)


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl that carry a step and a loss, one per step (the last logged wins), by step."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PrefkdError(f"training log {path} has a line that is not JSON ({exc}).") from exc
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and is_number(row.get("loss")):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def read_suite(eval_dir: Path, suite: str) -> dict[str, dict]:
    """The scores of one suite JSON as task -> {"label", "value", "stderr"} (fractions or None), in file order."""
    path = Path(eval_dir) / f"{suite}.json"
    data = _read_json(path, "benchmark result")
    scores = data.get("scores")
    if not isinstance(scores, dict):
        raise PrefkdError(f"benchmark result {path} has no 'scores' object.")
    out = {}
    for task, entry in scores.items():
        entry = entry if isinstance(entry, dict) else {}
        value = entry.get("value")
        stderr = entry.get("stderr")
        out[task] = {
            "label": str(entry.get("label") or task),
            "value": float(value) if is_number(value) else None,
            "stderr": float(stderr) if is_number(stderr) and is_number(value) else None,
        }
    # The suite's own task order (settings.tasks: names or {"task": name, ...}) beats the file's key order.
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    order = [
        t.get("task") if isinstance(t, dict) else t for t in settings.get("tasks") or [] if isinstance(t, (str, dict))
    ]
    order = [t for t in order if t in out]
    return {t: out[t] for t in order} | {t: v for t, v in out.items() if t not in order}


# ---------------------------------------------------------------------------
# Numbers and rows
# ---------------------------------------------------------------------------


def pct(x: float | None) -> float | None:
    """A fraction as the percentage the report shows (x100, 2 decimals)."""
    return None if x is None else float(f"{x * 100:.2f}")


def fixed(x: float | None, digits: int) -> float | None:
    return None if x is None else float(f"{x:.{digits}f}")


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return DASH
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def row_label(model: str) -> str:
    """The row header of a model: the paper's name for known models, else the method name."""
    for table in (TEACHER_ROWS, TABLE1_STUDENTS, ABLATION_ROWS):
        if model in table:
            return table[model]
    return model.removeprefix("student-")


def order_models(models: list[str]) -> tuple[list[str], list[str]]:
    """Split models into (Table-1 rows in the paper's order, ablation rows in the ablation order)."""
    known = list(TEACHER_ROWS) + list(TABLE1_STUDENTS)
    main = [m for m in known if m in models] + [m for m in models if m not in known and m not in ABLATION_ROWS]
    ablations = [m for m in ABLATION_ROWS if m in models]
    return main, ablations


def benchmark_columns(scores: dict[str, dict[str, dict[str, dict]]], suites: list[str]) -> list[dict]:
    """Columns of the benchmark tables: every task of every suite (suites in the given order, tasks in
    the order of the first model's JSON, then any task only a later model has). Headers are the
    tasks' labels, made unique with the suite name where two tasks share one."""
    cols: list[dict] = []
    for suite in suites:
        seen: list[str] = []
        for per_suite in scores.values():
            for task, entry in per_suite.get(suite, {}).items():
                if task not in seen:
                    seen.append(task)
                    cols.append({"suite": suite, "task": task, "label": entry["label"]})
    counts: dict[str, int] = {}
    for c in cols:
        counts[c["label"]] = counts.get(c["label"], 0) + 1
    for c in cols:
        if counts[c["label"]] > 1:
            c["label"] = (
                f"{c['label']} ({c['suite']}/{c['task']})"
                if c["label"] == c["task"]
                else f"{c['label']} ({c['suite']})"
            )
    return cols


def benchmark_row(per_suite: dict[str, dict], columns: list[dict]) -> dict:
    """One model's shown values (x100, rounded) per column label, its average and whether it is partial, and
    the standard errors (x100) by label: lm-eval's per task; the average's sqrt(sum se^2) / k (tasks taken as
    independent samples) when every task it averages has one."""
    entries = [per_suite.get(c["suite"], {}).get(c["task"], {}) for c in columns]
    raw = [e.get("value") for e in entries]
    present = [v for v in raw if v is not None]
    row = {c["label"]: pct(v) for c, v in zip(columns, raw)}
    avg = pct(sum(present) / len(present)) if present else None
    errs = [e.get("stderr") for e in entries if e.get("value") is not None]
    errors = {c["label"]: pct(e.get("stderr")) for c, e in zip(columns, entries) if e.get("value") is not None}
    if present and all(e is not None for e in errs):
        errors["avg"] = pct(sum(e * e for e in errs) ** 0.5 / len(errs))
    return {"values": row, "avg": avg, "partial": len(present) < len(raw), "present": len(present), "tasks": len(raw),
            "errors": {k: v for k, v in errors.items() if v is not None}}  # fmt: skip


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _plot_row(model: str, bench: dict) -> dict:
    """A model's row for the tables and the bar plot: its label and shown values by column (and "avg")."""
    values = {**bench[model]["values"], "avg": bench[model]["avg"]}
    return {"model": model, "label": row_label(model), "values": values, "errors": bench[model].get("errors", {})}


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _bold_best(rows: list[dict], labels: list[str], candidates: set[str]) -> dict[str, float]:
    """Per column label, the best shown value among the candidate rows; no entry when no candidate has a
    value or all candidates tie (nothing stands out)."""
    best = {}
    for label in labels:
        values = [r["values"][label] for r in rows if r["model"] in candidates and r["values"].get(label) is not None]
        if values and len(set(values)) > 1:
            best[label] = max(values)
    return best


def _fmt(value, best: float | None = None, partial: bool = False, digits: int = 2) -> str:
    text = _cell(value, digits)
    if value is not None and best is not None and value == best:
        text = f"**{text}**"
    if value is not None and partial:
        text += STAR
    return text


def _pm(text: str, se: float | None) -> str:
    """A shown value with its standard error: ``70.00 ± 5.00``."""
    return text if se is None or text == DASH else f"{text} {PM} {se:.2f}"


def _score(value, se: float | None, best: float | None = None, partial: bool = False) -> str:
    """A benchmark cell: the value (bold when best), its standard error, then the partial-average mark."""
    text = _pm(_fmt(value, best), se)
    return text + STAR if value is not None and partial else text


def _interval(text: str, ci: tuple[float, float] | None, digits: int = 2) -> str:
    """A shown value with its interval: ``63.75 [52.50, 75.00]`` (ci already in the shown scale)."""
    return text if ci is None or text == DASH else f"{text} [{_cell(ci[0], digits)}, {_cell(ci[1], digits)}]"


def outcomes_of(data: dict | None, key: str, outcome: str = "outcome") -> dict[int, float] | None:
    """{item id: outcome} from a JSON's per-item list (``per_pair`` / ``per_prompt``); None when it has none."""
    rows = (data or {}).get(key)
    if not isinstance(rows, list) or not rows:
        return None
    if not all(isinstance(r, dict) and is_number(r.get("pair_id")) and is_number(r.get(outcome)) for r in rows):
        return None
    return {int(r["pair_id"]): float(r[outcome]) for r in rows}


def _rate_ci(data: dict | None, key: str, outcome: str = "outcome") -> tuple[float, float] | None:
    """The bootstrap interval (x100) of a rate from its per-item outcomes, None without them."""
    items = outcomes_of(data, key, outcome)
    return None if items is None else tuple(pct(v) for v in bootstrap_ci(list(items.values())))


def _p_cell(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _link(plots: dict[str, str | None], name: str, caption: str, reason: str) -> list[str]:
    if plots.get(name):
        return [f"![{caption}]({plots[name]})", ""]
    return [f"No {caption.lower()} plot: {reason}.", ""]


# ---------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically (temp file next to it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _benchmark_section(main, bench, columns, suites, plots) -> tuple[list[str], dict]:
    labels = [c["label"] for c in columns]
    lines = ["## Benchmarks (paper Table 1 layout)", ""]
    table: dict = {}
    if not columns:
        lines += ["No benchmark scores: no suite was evaluated (set the evaluation suites in the config).", ""]
        return lines, table
    rows = [_plot_row(m, bench) for m in main]
    students = {m for m in main if m not in TEACHER_ROWS}
    best = _bold_best(rows, labels + ["avg"], students)
    body = []
    for r in rows:
        partial = bench[r["model"]]["partial"]
        vals = r["values"]
        is_student = r["model"] in students
        errs = r["errors"]
        cells = [_score(vals[label], errs.get(label), best.get(label) if is_student else None) for label in labels]
        cells.append(_score(vals["avg"], errs.get("avg"), best.get("avg") if is_student else None, partial))
        body.append([r["label"]] + cells)
        table.update({(r["label"], k): v for k, v in vals.items() if v is not None})
    lines += [
        f"Suites: {', '.join(suites)}. Scores are accuracy-type metrics x100; bold = best student value per column; "
        f"{PM} is lm-eval's standard error (x100; a 95% interval is about 1.96 of it each side), the avg's is "
        f"sqrt(sum se^2) / tasks (tasks taken as independent).",
        "",
    ]
    lines += _md_table(["model"] + labels + ["avg"], body) + [""]
    no_se = [c["label"] for c in columns if any(
        bench[m]["values"].get(c["label"]) is not None and c["label"] not in bench[m]["errors"] for m in main)]  # fmt: skip
    if no_se:
        lines += [
            f"No {PM} on {', '.join(no_se)}: lm-eval reports no standard error there and the evaluation keeps no "
            f"per-sample results (log_samples off) to bootstrap one from.",
            "",
        ]
    partial = [r["label"] for r in rows if bench[r["model"]]["partial"]]
    if partial:
        lines += [
            f"{STAR} average over the tasks that have a score only ({', '.join(partial)}); "
            f"{DASH} marks a task with no score for that model.",
            "",
        ]
    lines += _link(plots, "benchmarks", "Benchmarks", "no benchmark scores")
    return lines, table


def _preference_section(order, prefs, rewards) -> tuple[list[str], dict]:
    lines = ["## Preference and reward", ""]
    have_reward = any(rewards.get(m) for m in order)
    header = ["model", "pref acc", "margin", "logp acc", "pairs"]
    if have_reward:
        header += ["win rate", "wins", "ties", "losses", "judge"]
    table: dict = {}
    body = []
    for m in order:
        p = prefs[m]
        vals = {
            "pref acc": pct(p.get("accuracy") if is_number(p.get("accuracy")) else None),
            "margin": fixed(p.get("margin") if is_number(p.get("margin")) else None, 3),
            "logp acc": pct(p.get("logp_accuracy") if is_number(p.get("logp_accuracy")) else None),
            "pairs": int(p["pairs"]) if is_number(p.get("pairs")) else None,
        }
        digits = {"margin": 3}
        if have_reward:
            r = rewards.get(m) or {}
            vals["win rate"] = pct(r.get("win_rate") if is_number(r.get("win_rate")) else None)
            for k in ("wins", "ties", "losses"):
                vals[k] = int(r[k]) if is_number(r.get(k)) else None
        label = row_label(m)
        cis = {"pref acc": _rate_ci(p, "per_pair"), "logp acc": _rate_ci(p, "per_pair", "logp_outcome")}
        cis["win rate"] = _rate_ci(rewards.get(m), "per_prompt")
        cells = [_interval(_cell(vals[h], digits.get(h, 2)), cis.get(h)) for h in header[1:] if h != "judge"]
        if have_reward:
            cells.append(str((rewards.get(m) or {}).get("judge") or DASH))
        body.append([label] + cells)
        table.update({(label, k): float(v) for k, v in vals.items() if v is not None})
    ref = sorted({str(prefs[m].get("reference")) for m in order if prefs[m].get("reference")})
    lines += [
        "Held-out test pairs. pref acc: share (x100) of pairs whose implicit reward "
        "beta * log(pi/pi_ref) ranks chosen above rejected (ties count half)"
        + (f", reference {', '.join(ref)}" if ref else "")
        + "; margin: mean reward margin; logp acc: share (x100) where the summed response log-prob "
        "of chosen beats rejected (reference-free). [lo, hi]: 95% percentile bootstrap interval over the "
        f"test pairs ({RESAMPLES} resamples of the per-pair outcomes); without one, the preference.json keeps no "
        "per-pair outcomes (an older run: rerun preference_eval).",
        "",
    ]
    if have_reward:
        baselines = sorted({str(r.get("baseline")) for r in rewards.values() if r and r.get("baseline")})
        lines += [
            f"win rate: share (x100) of held-out prompts where the judge scores the model's answer above "
            f"the answer of {', '.join(baselines) or 'student-sft'} (ties count half; [lo, hi] over the prompts, "
            f"as above); {DASH}: no reward.json.",
            "",
        ]
    lines += _md_table(header, body) + [""]
    if not have_reward:
        lines += ["No reward.json for any model: the reward-model win rates were not computed.", ""]
    return lines, table


def _comparison_row(label: str, a: dict[int, float] | None, b: dict[int, float] | None) -> list[str] | None:
    """One row of the CTPD-vs-baselines table (None when either side keeps no per-item outcomes)."""
    if a is None or b is None:
        return None
    _, xs, ys = paired_outcomes(a, b)
    if not xs:
        return [label, DASH, DASH, DASH, "0"]
    c = compare(xs, ys)
    diff = _interval(_cell(pct(c["difference"])), (pct(c["lo"]), pct(c["hi"])))
    return [label, diff, _p_cell(c["p_value"]), _p_cell(c["sign_p_value"]), str(c["n"])]


def _comparison_section(order, prefs, rewards, seeds: bool = False) -> tuple[list[str], dict]:
    """CTPD minus every other student on held-out preference accuracy (and reward win rate), paired on the
    same items: the difference with its bootstrap interval, two p-values and the number of items."""
    lines = ["## CTPD vs baselines (paired)", ""]
    others = [m for m in order if m != CTPD and m not in TEACHER_ROWS]
    if CTPD not in order or not others:
        lines += ["No paired comparison: the report needs CTPD and at least one other student.", ""]
        return lines, {}
    body, missing = [], []
    for what, key, source in (("pref acc", "per_pair", prefs), ("win rate", "per_prompt", rewards)):
        mine = outcomes_of(source.get(CTPD), key)
        for m in others:
            row = _comparison_row(f"{row_label(m)}: {what}", mine, outcomes_of(source.get(m), key))
            if row is not None:
                body.append(row)
            elif what == "pref acc" or (source.get(m) and source.get(CTPD)):
                missing.append(f"{row_label(m)} ({what})")
    if not body:
        lines += ["No paired comparison: no two evaluation files keep per-item outcomes (rerun the evaluation).", ""]
        return lines, {}
    header = ["CTPD vs", "diff [95% CI]", "p (bootstrap)", "p (sign test)", "n"]
    lines += [
        f"CTPD minus the baseline on the same held-out items (matched by pair_id), in points x100; pref acc over "
        f"the test pairs, win rate over the judged prompts (both against the student SFT, ties count half). "
        f"[lo, hi]: {LEVEL:.0%} paired bootstrap interval ({RESAMPLES} joint resamples of the items); "
        f"p (bootstrap): two-sided, the resampled differences centred on the observed one; p (sign test): exact "
        f"two-sided sign test over the items where the two differ (McNemar's exact test for 0/1 outcomes; exact, "
        f"so it also holds at small n). No correction for the number of comparisons."
        + (" With several seeds, each item's outcome is its mean over the method's seeds." if seeds else ""),
        "",
    ]
    lines += _md_table(header, body) + [""]
    if missing:
        lines += [f"Not compared (no per-item outcomes in its JSON or CTPD's): {', '.join(missing)}.", ""]
    table = {(r[0], h): v for r in body for h, c in zip(header[1:], r[1:]) if (v := _number(c)) is not None}
    return lines, table


def seed_groups(models: list[str]) -> dict[str, list[str]]:
    """{base model: [base, its runs of other seeds...]}; a -seed<N> run whose base is not there stays its own."""
    groups: dict[str, list[str]] = {
        m: [m] for m in models if not (SEED_RUN.match(m) and SEED_RUN.match(m)[1] in models)
    }
    for m in models:
        hit = SEED_RUN.match(m)
        if hit and hit[1] in models:
            groups[hit[1]].append(m)
    return groups


def _seed_averaged(groups: dict[str, list[str]], source: dict, key: str) -> dict:
    """Each group's per-item outcomes averaged over its seeds (items every seed has), as a JSON-like dict."""
    out = {}
    for base, members in groups.items():
        per_seed = [outcomes_of(source.get(m), key) for m in members]
        if any(s is None for s in per_seed):
            out[base] = source.get(base) if len(members) == 1 else None
            continue
        mean = seed_mean_outcomes(per_seed)
        out[base] = {key: [{"pair_id": i, "outcome": v} for i, v in mean.items()]}
    return out


def _mean_sd_cell(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return DASH
    mean, sd = mean_sd(present)
    text = f"{mean:.2f} {PM} {sd:.2f}"
    return text if len(present) == len(values) else text + STAR


def _seeds_section(groups, prefs, rewards, bench, columns) -> tuple[list[str], dict]:
    lines = ["## Seeds", ""]
    multi = {b: ms for b, ms in groups.items() if len(ms) > 1}
    if not multi:
        lines += ["One seed per method (set `seeds: [1, 2, 3]` to train every student method once per seed).", ""]
        return lines, {}
    labels = [c["label"] for c in columns]
    header = ["model", "seeds", "pref acc", "win rate"] + labels + ["avg", "pref acc per seed"]
    body, table = [], {}
    for base, members in multi.items():
        acc = [pct(prefs[m].get("accuracy")) if is_number(prefs[m].get("accuracy")) else None for m in members]
        win = [pct((rewards.get(m) or {}).get("win_rate")) if is_number((rewards.get(m) or {}).get("win_rate")) else None for m in members]  # fmt: skip
        cells = [str(len(members)), _mean_sd_cell(acc), _mean_sd_cell(win)]
        cells += [_mean_sd_cell([bench[m]["values"].get(label) for m in members]) for label in labels]
        cells.append(_mean_sd_cell([bench[m]["avg"] for m in members]))
        cells.append(", ".join(_cell(a) for a in acc))
        label = row_label(base)
        body.append([label] + cells)
        table.update({(label, h): v for h, c in zip(header[1:-1], cells[:-1]) if (v := _number(c)) is not None})
    lines += [
        f"Every student method trained once per seed (the seed of its data order; teachers, signals and the student "
        f"SFT are shared, trained once). Cells: mean {PM} sample sd across the seeds (x100); {STAR}: over the seeds "
        f"that have the number. The tables above show the run of the experiment's seed; the paired comparison "
        f"averages each item's outcome over the seeds.",
        "",
    ]
    lines += _md_table(header, body) + [""]
    return lines, table


def _lr_section(rates: dict[str, str], searches: dict[str, Path]) -> tuple[list[str], dict]:
    lines = ["## Learning rates", ""]
    if not rates and not searches:
        lines += ["No student method trained.", ""]
        return lines, {}
    body, table = [], {}
    for method, rate in rates.items():
        body.append([row_label(f"student-{method}"), rate, "configured", DASH])
    for method, path in searches.items():
        data = _optional_json(path, "learning-rate search") or {}
        grid = []
        for c in data.get("candidates", []):
            acc = pct(c["accuracy"]) if is_number(c.get("accuracy")) else None
            grid.append(f"{c['lr']:g}: {_cell(acc)}")
        label = row_label(f"student-{method}")
        lr = data.get("lr")
        body.append([label, f"{lr:g}" if is_number(lr) else DASH, "searched (valid split)", "; ".join(grid) or DASH])
        if is_number(lr):
            table[(label, "lr")] = float(lr)
    lines += [
        "The peak learning rate of each student method: configured (distill.lr, distill.kd_lr or distill.lrs) or "
        "searched: the method trained at every rate of distill.lr_grid with the experiment's seed and was held out "
        "on the VALID split (accuracy x100 of its implicit reward against the student SFT); the rate with the "
        "highest valid accuracy won (ties: lower valid loss, then lower rate), and its run is the method's run.",
        "",
    ]
    lines += _md_table(["model", "lr", "how", "valid acc per rate"], body) + [""]
    return lines, table


FLOP_UNITS = ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1.0, "FLOP"))


def flop_unit(values: list[float]) -> tuple[float, str]:
    """The largest unit in which the largest value is at least 1 (one unit for a whole table)."""
    top = max((v for v in values if is_number(v)), default=0.0)
    return next(((s, name) for s, name in FLOP_UNITS if top >= s), FLOP_UNITS[-1])


def _cost_section(cost: dict | None, order: list[str]) -> tuple[list[str], dict]:
    lines = ["## Cost", ""]
    if not cost:
        lines += ["No cost.json: the run's compute was not accounted (rerun with the cost rule).", ""]
        return lines, {}
    methods = cost.get("methods", {})
    stages = {k: s for k, s in cost.get("stages", {}).items() if s["jobs"]}
    scale, unit = flop_unit([c["flops"] for c in methods.values()] + [s["flops"] for s in stages.values()])
    body, table = [], {}
    for m in order:
        run = "sft" if m == "student-sft" else m.removeprefix("student-")
        c = methods.get(run)
        if not m.startswith("student-") or not c:
            continue
        label = row_label(m)
        vals = [round(c["own_wall_s"], 1), round(c["own_flops"] / scale, 3), round(c["wall_s"], 1), round(c["flops"] / scale, 3)]  # fmt: skip
        body.append([label, f"{vals[0]:.1f}", f"{vals[1]:.3f}", f"{vals[2]:.1f}", f"{vals[3]:.3f}", ", ".join(c["stages"][1:]) or DASH])  # fmt: skip
        heads = ("own wall (s)", f"own {unit}", "end-to-end wall (s)", f"end-to-end {unit}")
        table.update({(label, h): float(v) for h, v in zip(heads, vals)})
    stage_rows = [
        [k, str(s["jobs"]), f"{s['wall_s']:.1f}", f"{s['cpu_s']:.1f}", str(s["processes"]), f"{s['flops'] / scale:.3f}"]
        for k, s in stages.items()
    ]
    lines += [
        "What each student costs: own = its training job (a searched method's: every run of its search); end to "
        "end = its own plus every stage it needs (data, teacher SFT, contrastive teachers, signal sets, student "
        "SFT, references), each counted once. Wall: seconds of the jobs (Snakemake's benchmark records; jobs that "
        f"ran side by side each count in full); {unit}: an estimate, 6 N T for training and 2 N T for scoring and "
        "frozen KD teachers (N: the parameters a token multiplies with, T: the tokens of the split), attention's "
        "quadratic term and held-out evaluation left out (prefkd.cost). Evaluation jobs are not a method's cost.",
        "",
    ]
    lines += _md_table(["model", "own wall (s)", f"own {unit}", "end-to-end wall (s)", f"end-to-end {unit}", "stages it needs"], body)  # fmt: skip
    lines += ["", "Per stage (every job of the run; `other`: evaluation and report jobs):", ""]
    lines += _md_table(["stage", "jobs", "wall (s)", "CPU (s)", "processes", unit], stage_rows) + [""]
    return lines, table


def _ablation_section(ablations, bench, prefs, columns) -> tuple[list[str], dict]:
    lines = ["## Ablations", ""]
    if not ablations:
        lines += ["No ablation ran; set `distill.methods: [all]` in the config to run every ablation of the paper.", ""]
        return lines, {}
    rows = (["student-ctpd"] if "student-ctpd" in bench else []) + ablations
    labels = [c["label"] for c in columns]
    header = ["model"] + labels + ["avg", "pref acc", PAPER_AVG_COLUMN]
    table: dict = {}
    body = []
    for m in rows:
        label = row_label(m)
        acc = prefs[m].get("accuracy")
        vals = {**bench[m]["values"], "avg": bench[m]["avg"], "pref acc": pct(acc if is_number(acc) else None)}
        vals[PAPER_AVG_COLUMN] = PAPER_ABLATION_AVG.get(m)
        errs, partial = bench[m]["errors"], bench[m]["partial"]
        cells = [_score(vals[h], errs.get(h), partial=h == "avg" and partial) for h in header[1:]]
        at = header.index("pref acc") - 1
        cells[at] = _interval(cells[at], _rate_ci(prefs[m], "per_pair"))
        body.append([label] + cells)
        table.update({(label, k): v for k, v in vals.items() if v is not None})
    lines += [
        f"Same benchmark columns as above, plus held-out preference accuracy. The column "
        f'"{PAPER_AVG_COLUMN}" is the PAPER\'s Table-1 average for that variant (Qwen-2.5-14B teacher -> '
        f"Llama-3.1-8B student), not a number of this run; the paper reports none for mean aggregation.",
        "",
    ]
    lines += _md_table(header, body) + [""]
    if any(bench[m]["partial"] for m in rows):
        lines += [f"{STAR} average over the tasks that have a score only.", ""]
    return lines, table


def _data_section(filters: dict | None) -> tuple[list[str], dict]:
    """The prepare stage: rows read, kept, dropped by reason (with the first line numbers), and the splits."""
    if filters is None:
        return [], {}
    lines = ["## Data", ""]
    dropped = {k: v for k, v in (filters.get("dropped") or {}).items() if v}
    rows = [["rows read", str(filters.get("rows_in", DASH))], ["kept", str(filters.get("kept", DASH))]]
    lines_of = filters.get("example_lines") or {}
    for reason, count in sorted(dropped.items()):
        where = ", ".join(str(n) for n in (lines_of.get(reason) or [])[:5])
        rows.append([f"dropped: {reason}" + (f" (lines {where})" if where else ""), str(count)])
    rows += [[f"{split} pairs", str(n)] for split, n in (filters.get("splits") or {}).items()]
    noise = filters.get("label_noise") or {}
    if noise:  # data.label_noise: train pairs swapped on purpose (0 for a clean run, said so)
        rows.append([f"train pairs flipped (label noise {noise.get('rate', 0):g})", str(noise.get("flipped", DASH))])
    lines += [f"`prepare` read {filters.get('source', 'the source')}; rows it dropped are counted by reason.", ""]
    lines += _md_table(["", "count"], rows) + [""]
    table = {(r[0], "count"): float(r[1]) for r in rows if r[1].isdigit()}
    return lines, table


def _alignment_section(alignment: dict, plots) -> tuple[list[str], dict]:
    lines = ["## Alignment", ""]
    splits = [s for s in SPLIT_ORDER if isinstance(alignment.get(s), dict)]
    splits += [s for s in alignment if s not in splits and isinstance(alignment[s], dict)]
    metrics: list[tuple[str, callable, int]] = [
        ("pairs in", lambda a: a.get("pairs_in"), 0),
        ("pairs out", lambda a: a.get("pairs_out"), 0),
        ("spans", lambda a: a.get("spans"), 0),
        ("1:1 spans", lambda a: a.get("one_to_one_spans"), 0),
        (
            "1:1 span share (%)",
            lambda a: pct(a["one_to_one_share"]) if is_number(a.get("one_to_one_share")) else None,
            2,
        ),
    ]
    for role in ("teacher", "student"):
        metrics.append(
            (f"{role} tokens per span", lambda a, r=role: fixed((a.get("tokens_per_span") or {}).get(r), 3), 3)
        )
    for role in ("teacher", "student"):
        metrics.append((f"prompts truncated ({role})", lambda a, r=role: (a.get("prompts_truncated") or {}).get(r), 0))
    for side in ("chosen", "rejected"):
        metrics.append(
            (f"responses truncated ({side})", lambda a, s=side: (a.get("responses_truncated") or {}).get(s), 0)
        )
    reasons: list[str] = []
    for s in splits:
        reasons += [k for k in (alignment[s].get("drops") or {}) if k not in reasons]
    for reason in reasons:
        metrics.append((f"dropped: {reason}", lambda a, k=reason: (a.get("drops") or {}).get(k, 0), 0))
    table: dict = {}
    body = []
    for name, get, digits in metrics:
        values = [get(alignment[s]) for s in splits]
        if all(v is None for v in values):
            continue
        body.append([name] + [_cell(v if not isinstance(v, float) or digits else int(v), digits) for v in values])
        table.update({(name, s): float(v) for s, v in zip(splits, values) if v is not None})
    lines += [
        "Teacher and student tokenizations of every response are cut into aligned spans (the finest "
        "common coarsening); a 1:1 span is one token on both sides. Pairs dropped are counted by reason.",
        "",
    ]
    lines += _md_table(["statistic"] + splits, body) + [""]
    lines += _mismatch_lines(alignment, splits)
    lines += _link(plots, "span_sizes", "Span sizes", "the alignment report has no span-size histogram")
    return lines, table


def _mismatch_lines(alignment: dict, splits: list[str]) -> list[str]:
    """Tokenizer mismatch: the share of spans per class (teacher : student tokens), from stats/alignment.json."""
    classes = ("1:1", "1:n", "n:1", "n:m")
    shown = [s for s in splits if isinstance(alignment[s].get("span_class_share"), dict)]
    if not shown:
        return []
    body = [
        [f"{c} spans (%)"] + [_cell(pct(alignment[s]["span_class_share"].get(c)), 2) for s in shown] for c in classes
    ]
    lines = [
        "Span classes (teacher tokens : student tokens per aligned span; `prefkd mismatch` adds vocabulary overlap):"
    ]
    return lines + [""] + _md_table(["span class"] + shown, body) + [""]


def _weights_section(weights: dict | None, weights_path: Path | None, plots) -> tuple[list[str], dict]:
    lines = ["## Span weights", ""]
    if weights is None:
        where = f" ({weights_path} does not exist)" if weights_path else ""
        lines += [f"No span-weight statistics{where}: the weights table and the weight-histogram plot are skipped.", ""]
        return lines, {}
    sets = {k: v for k, v in weights.items() if isinstance(v, dict)}
    header = ["signal set", "unit", "transform", "pairs", "mean w chosen", "mean w rejected"]
    header += ["inside chosen", "outside chosen", "inside rejected", "outside rejected", "finds planted"]
    table: dict = {}
    body = []
    for name, w in sets.items():
        mean = w.get("mean_weight") or {}
        check = w.get("planted_check") or {}
        vals = {
            "pairs": int(w["pairs"]) if is_number(w.get("pairs")) else None,
            "mean w chosen": fixed(mean.get("chosen"), 3),
            "mean w rejected": fixed(mean.get("rejected"), 3),
        }
        for side in ("chosen", "rejected"):
            for where in ("inside", "outside"):
                vals[f"{where} {side}"] = fixed((check.get(side) or {}).get(where), 3)
        found = check.get("finds_planted_differences")
        found_text = DASH if found is None else ("yes" if found else "no")
        spec = w.get("spec") or {}
        cells = [_cell(vals[h], 3) for h in header[3:-1]]
        body.append([name, str(w.get("unit") or DASH), str(spec.get("transform") or DASH)] + cells + [found_text])
        table.update({(name, k): float(v) for k, v in vals.items() if v is not None})
    lines += [
        "Mean unit weight per side over the training pairs. Planted-difference check (demo data only): "
        "mean weight of the units inside the planted differences vs outside them; CTPD weights should be "
        "higher inside on both sides (finds planted = yes).",
        "",
    ]
    lines += _md_table(header, body) + [""]
    lines += _link(plots, "weight_histograms", "Weight histograms", "no signal set has a weight histogram")
    return lines, table


def _training_section(runs: dict[str, Path], metrics: dict[str, list[dict]], plots) -> tuple[list[str], dict]:
    lines = ["## Training", ""]
    if not runs:
        lines += ["No training runs were given.", ""]
        return lines, {}
    header = ["run", "steps", "final loss", "reward acc", "reward margin", "kd loss"]
    table: dict = {}
    body = []
    missing = []
    for name, path in runs.items():
        rows = metrics[name]
        if not rows:
            missing.append(f"{name} ({Path(path) / 'metrics.jsonl'})")
            body.append([name] + [DASH] * (len(header) - 1))
            continue
        tail = rows[-TAIL_STEPS:]

        def tail_mean(key, tail=tail):
            xs = [r[key] for r in tail if is_number(r.get(key))]
            return sum(xs) / len(xs) if xs else None

        vals = {
            "steps": int(rows[-1]["step"]),
            "final loss": fixed(rows[-1]["loss"], 4),
            "reward acc": pct(tail_mean("rewards/accuracy")),
            "reward margin": fixed(tail_mean("rewards/margin"), 3),
            "kd loss": fixed(tail_mean("kd/loss"), 4),
        }
        digits = {"final loss": 4, "reward margin": 3, "kd loss": 4}
        body.append([name] + [_cell(vals[h], digits.get(h, 2)) for h in header[1:]])
        table.update({(name, k): float(v) for k, v in vals.items() if v is not None})
    lines += [
        f"final loss: the last logged step's loss; reward acc (x100), reward margin and kd loss: means over "
        f"the last {TAIL_STEPS} logged steps (preference runs log rewards, KD runs a KD loss).",
        "",
    ]
    lines += _md_table(header, body) + [""]
    span_runs = [
        n for n in runs if n.startswith("student-") and n.removeprefix("student-") in TEACHER_REFERENCE_METHODS
    ]
    if span_runs:
        lines += [
            f"The training rewards of {', '.join(span_runs)} are measured against the teacher's reference span "
            "log-probs, i.e. the student relative to another model, so their level (often a negative margin) is "
            "not progress; the held-out preference accuracy above uses the student SFT as the reference of every student.",
            "",
        ]
    if missing:
        lines += [f"No metrics.jsonl for {', '.join(missing)}: those runs have no numbers or curves.", ""]
    lines += _link(plots, "training_curves", "Training curves", "no run has a metrics.jsonl")
    lines += _link(plots, "reward_accuracy", "Reward accuracy", "no run logged rewards/accuracy")
    lines += _link(plots, "objective", "Preference objective (beta * margin, saturated pairs)", "no run logged them")
    return lines, table


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _images(rows: list[dict], labels: list[str], metrics: dict, weight_stats: dict | None, align: dict) -> dict:
    """The report's figures as PNG bytes (None where there is nothing to draw)."""
    return {
        "benchmarks": plot_benchmarks(rows, labels),
        "training_curves": plot_training(metrics),
        "reward_accuracy": plot_reward_accuracy(metrics),
        "objective": plot_objective(metrics),
        "weight_histograms": plot_weight_histograms(weight_stats) if weight_stats else None,
        "span_sizes": plot_span_sizes(align),
    }


def _preamble(experiment: str) -> list[str]:
    return [
        f"# prefkd report: {experiment}",
        "",
        f"How to read: benchmark and accuracy numbers are percentages (fractions x100, 2 decimals); "
        f"{DASH} marks a missing value and {STAR} an average over the values that exist; bold marks the "
        f"best student per column; [lo, hi] is a 95% bootstrap interval and {PM} a standard error (in the Seeds "
        f"section: the sd across seeds). Every number comes from the JSON files under results/{experiment}/ "
        f"(eval/<model>/, stats/, models/, students/).",
        "",
    ]


def build_report(
    experiment: str,
    models: dict[str, Path],
    suites: list[str],
    alignment: Path,
    weights: Path | None,
    runs: dict[str, Path],
    out_md: Path,
    plots_dir: Path,
    filters: Path | None = None,
    rates: dict[str, str] | None = None,
    searches: dict[str, Path] | None = None,
    cost: Path | None = None,
) -> dict:
    """Write ``out_md`` and the PNGs under ``plots_dir``; return the numbers put in the tables.

    models: model name -> its eval dir (holding <suite>.json for every suite, preference.json and
    optionally reward.json). runs: run name -> training dir (optionally holding metrics.jsonl).
    The result's "tables" maps each section ("Benchmarks", "Preference", "Ablations", "Alignment",
    "Span weights", "Training") to {(row label, column): number}, what ``table_numbers`` parses back.
    """
    out_md, plots_dir = Path(out_md), Path(plots_dir)
    models = {m: Path(p) for m, p in models.items()}
    # Required inputs first, so a missing one fails before anything is written.
    scores = {m: {s: read_suite(d, s) for s in suites} for m, d in models.items()}
    prefs = {m: _read_json(d / "preference.json", "preference result") for m, d in models.items()}
    align = _read_json(Path(alignment), "alignment report")
    rewards = {m: _optional_json(d / "reward.json", "reward result") for m, d in models.items()}
    weight_stats = _optional_json(weights, "span-weight report")
    filter_report = _optional_json(filters, "prepare filter report")
    metrics = {name: read_metrics(Path(d) / "metrics.jsonl") for name, d in runs.items()}

    cost_report = _optional_json(cost, "cost report")
    columns = benchmark_columns(scores, suites)
    labels = [c["label"] for c in columns]
    bench = {m: benchmark_row(scores[m], columns) for m in models}
    groups = seed_groups(list(models))  # the tables show each method's run of the experiment's seed
    main, ablations = order_models(list(groups))
    seeded = any(len(g) > 1 for g in groups.values())  # paired tests on each item's mean over the seeds
    mean_prefs, mean_rewards = _seed_averaged(groups, prefs, "per_pair"), _seed_averaged(groups, rewards, "per_prompt")

    images = _images([_plot_row(m, bench) for m in main + ablations], labels, metrics, weight_stats, align)
    rel = Path(os.path.relpath(plots_dir, out_md.parent))
    plots = {name: (rel / f"{name}.png").as_posix() if data else None for name, data in images.items()}

    lines = _preamble(experiment)
    tables = {}
    for key, (section, table) in {
        "Benchmarks": _benchmark_section(main, bench, columns, suites, plots),
        "Preference": _preference_section(main + ablations, prefs, rewards),
        "Comparisons": _comparison_section(main + ablations, mean_prefs, mean_rewards, seeded),
        "Seeds": _seeds_section(groups, prefs, rewards, bench, columns),
        "Learning rates": _lr_section(rates or {}, searches or {}),
        "Cost": _cost_section(cost_report, main + ablations),
        "Ablations": _ablation_section(ablations, bench, prefs, columns),
        "Data": _data_section(filter_report),
        "Alignment": _alignment_section(align, plots),
        "Span weights": _weights_section(weight_stats, weights, plots),
        "Training": _training_section(runs, metrics, plots),
    }.items():
        lines += section
        tables[key] = table
    text = "\n".join(lines).rstrip("\n") + "\n"

    with atomic_dir(plots_dir) as tmp:
        for name, data in images.items():
            if data:
                _write_bytes(tmp / f"{name}.png", data)
    _write_bytes(out_md, text.encode("utf-8"))
    return {
        "columns": columns,
        "rows": {m: row_label(m) for m in main},
        "ablation_rows": {m: row_label(m) for m in ablations},
        "benchmarks": bench,
        "plots": plots,
        "tables": tables,
    }


# ---------------------------------------------------------------------------
# Parsing the report back (tests, workflow checks)
# ---------------------------------------------------------------------------

_NUM = r"-?\d+(?:\.\d+)?"
# a shown value, optionally with its interval "[lo, hi]" or its standard error "± se"
_NUMBER = re.compile(rf"^({_NUM})(?:\s*\[({_NUM}), ({_NUM})\]|\s*\u00b1\s*({_NUM}))?$")


def _cell_match(cell: str):
    return _NUMBER.match(cell.replace("\\*", "").replace("*", "").strip().rstrip("%"))


def _number(cell: str) -> float | None:
    """The value of a cell (its interval or standard error left out); None when the cell is no number."""
    m = _cell_match(cell)
    return float(m.group(1)) if m else None


def cell_interval(cell: str) -> tuple[float, float] | None:
    """``(lo, hi)`` of a ``value [lo, hi]`` cell, ``(value - se, value + se)`` of a ``value ± se`` one, else None."""
    m = _cell_match(cell)
    if not m or (m.group(2) is None and m.group(4) is None):
        return None
    if m.group(2) is not None:
        return float(m.group(2)), float(m.group(3))
    value, se = float(m.group(1)), float(m.group(4))
    return value - se, value + se


def table_rows(md_text: str, section: str) -> tuple[list[str], list[list[str]]]:
    """The header and raw rows of the first table under the "## <section>..." heading ([] when none)."""
    lines = md_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## ") and line[3:].startswith(section)), None)
    if start is None:
        return [], []
    block: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            break
    if len(block) < 2:
        return [], []
    return block[0], block[2:]


def table_numbers(md_text: str, section: str = "Benchmarks") -> dict[tuple[str, str], float]:
    """{(row label, column): number} of the table under the heading that starts with ``section``.

    Bold and footnote marks are stripped; cells that are not numbers (the dash, text) are left out.
    """
    header, rows = table_rows(md_text, section)
    out = {}
    for row in rows:
        label = row[0].replace("**", "")
        for column, cell in zip(header[1:], row[1:]):
            value = _number(cell)
            if value is not None:
                out[(label, column)] = value
    return out


def table_intervals(md_text: str, section: str = "Benchmarks") -> dict[tuple[str, str], tuple[float, float]]:
    """{(row label, column): (lo, hi)} of the cells of a table that carry an interval or a standard error."""
    header, rows = table_rows(md_text, section)
    out = {}
    for row in rows:
        for column, cell in zip(header[1:], row[1:]):
            ci = cell_interval(cell)
            if ci is not None:
                out[(row[0].replace("**", ""), column)] = ci
    return out


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _pairs(items: list[str] | None, flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items or []:
        name, _, path = item.partition("=")
        if not name or not path:
            raise PrefkdError(f"{flag} {item!r} must look like NAME=PATH.")
        if name in out:
            raise PrefkdError(f"{flag} {name} is given twice.")
        out[name] = Path(path)
    return out


def run(s: ReportSettings) -> int:
    result = build_report(
        s.experiment,
        _pairs(s.model, "--model"),
        list(s.suite),
        s.alignment,
        s.weights,
        _pairs(s.run, "--run"),
        s.out,
        s.plots,
        s.filters,
        {k: str(v) for k, v in _pairs(s.lr, "--lr").items()},
        _pairs(s.lr_search, "--lr-search"),
        s.cost,
    )
    print(json.dumps({"report": str(s.out), "plots": sorted(k for k, v in result["plots"].items() if v)}))
    return 0


__all__ = [
    "build_report",
    "table_numbers",
    "table_intervals",
    "table_rows",
    "read_metrics",
    "row_label",
    "ReportSettings",
    "run",
]
