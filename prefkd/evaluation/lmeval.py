"""Benchmarks through lm-evaluation-harness, on the model already in memory.

One call evaluates one model on one *suite* (a list of lm-eval tasks with their few-shot counts,
the metric the report shows and its column label, chat template on or off, a sample limit).
Tasks whose names start with ``prefkd_`` are the demo's local tasks: their YAMLs ship in
``prefkd/evaluation/lm_eval_tasks/`` and their data is written from the held-out split by
:func:`write_task_data`, so the demo runs the real harness offline.

The output JSON keeps lm-eval's own results next to a small ``scores`` table
({task: {metric, value, stderr, samples, label, num_fewshot}}) that the report reads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path

from prefkd.assets.models import load_model, pick_device
from prefkd.assets.tokenizers import load_tokenizer
from prefkd.errors import PrefkdError
from prefkd.evaluation.settings import EvalDataSettings, LmEvalSettings
from prefkd.io.files import atomic_dir, write_json

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LOCAL_PREFIX = "prefkd_"

# The metric each known task is reported by (Open LLM Leaderboard v1 / v2 conventions).
DEFAULT_METRICS = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "mmlu": "acc",
    "truthfulqa_mc2": "acc",
    "winogrande": "acc",
    "gsm8k": "exact_match,strict-match",
    "leaderboard_ifeval": "prompt_level_strict_acc",
    "leaderboard_bbh": "acc_norm",
    "prefkd_pref_mc": "acc",
    "prefkd_arith": "exact_match",
    "prefkd_reply": "chrf",
}

# Metrics lm-eval reports on a 0-100 scale; scores keep every value as a fraction.
PERCENT_METRICS = {"bleu", "chrf", "chrf++", "ter"}

# lm-eval extras some task families need: (task-name prefixes, extra, modules it installs).
TASK_EXTRAS = (
    (("leaderboard_ifeval", "ifeval"), "ifeval", ("langdetect", "immutabledict", "nltk")),
    (("leaderboard_math", "hendrycks_math", "minerva_math"), "math", ("sympy", "math_verify")),
)


def missing_extras(tasks: list[str]) -> list[str]:
    """One sentence per task whose lm-eval extra is not installed (empty list: all present)."""
    problems = []
    for task in tasks:
        for prefixes, extra, modules in TASK_EXTRAS:
            if any(task.startswith(p) for p in prefixes):
                absent = [m for m in modules if importlib.util.find_spec(m) is None]
                if absent:
                    problems.append(
                        f"lm-eval task {task!r} needs lm-eval's {extra!r} extra (missing: {', '.join(absent)}); "
                        f"install it with: pip install 'lm-eval[{extra}]'"
                    )
    return problems


def check_task_extras(tasks: list[str]) -> None:
    problems = missing_extras(tasks)
    if problems:
        raise PrefkdError("; ".join(problems) + ".")


# ---------------------------------------------------------------------------
# The names lm-eval knows, cached
# ---------------------------------------------------------------------------


def task_index_cache() -> Path:
    """Where the installed harness's task names are cached: ``$PREFKD_CACHE_DIR`` or the user's cache folder."""
    root = os.environ.get("PREFKD_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefkd"
    version = importlib.metadata.version("lm_eval")
    package = Path(importlib.util.find_spec("lm_eval").origin).resolve().parent  # not imported: find_spec only
    where = hashlib.sha256(str(package).encode()).hexdigest()[:12]
    return Path(root) / f"lm-eval-{version}-{where}-tasks.json"


def _index_tasks() -> list[str]:
    from lm_eval.tasks import TaskManager

    return sorted(TaskManager().all_tasks)


def unknown_tasks(names: list[str]) -> list[str]:
    """The names lm-eval knows no task, group or tag by, in order.

    Indexing every task YAML of the harness takes 10-30 s, paid by every Snakemake start (and every SLURM job
    step, which re-reads the workflow), so the index is cached per harness version and install. The cache can
    only make the answer slower, never wrong the other way: a name it lacks is checked again on a fresh index
    (an editable harness may have gained tasks), which then replaces the cache.
    """
    cache = task_index_cache()
    try:
        known = set(json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        known = None
    if known is None or any(n not in known for n in names):
        known = set(_index_tasks())
        try:
            write_json(cache, sorted(known))
        except OSError:  # a read-only home: go on uncached
            pass
    return [n for n in names if n not in known]


# ---------------------------------------------------------------------------
# The demo's local tasks
# ---------------------------------------------------------------------------

_ARITH = re.compile(r"(-?\d+)\s*([+\-*×x])\s*(-?\d+)")


def arithmetic_answer(question: str) -> int | None:
    """The result of the first ``a op b`` in the question (op in + - * × x), else None."""
    m = _ARITH.search(question)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b if op == "-" else a * b


def prompt_text(messages: list[dict]) -> str:
    """A held-out prompt as one user turn: the user's text, or 'role: text' lines for longer talks."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _chosen_index(pair_id: int, seed: int) -> int:
    """Where the chosen response goes among the two choices: a fixed coin per pair."""
    return hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[0] & 1


def task_records(rows: list[dict], seed: int = 1) -> dict[str, list[dict]]:
    """Held-out pairs -> the demo tasks' records, keyed by task name (pure)."""
    mc, reply, arith = [], [], []
    for row in sorted(rows, key=lambda r: r["pair_id"]):
        question = prompt_text(row["prompt"])
        k = _chosen_index(int(row["pair_id"]), seed)
        choices = [row["rejected"], row["chosen"]] if k else [row["chosen"], row["rejected"]]
        mc.append({"pair_id": int(row["pair_id"]), "question": question, "choices": choices, "label": k})
        reply.append({"pair_id": int(row["pair_id"]), "question": question, "answer": row["chosen"]})
        user = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        answer = arithmetic_answer(user)
        if answer is not None:
            arith.append({"pair_id": int(row["pair_id"]), "question": question, "answer": str(answer)})
    return {"prefkd_pref_mc": mc, "prefkd_reply": reply, "prefkd_arith": arith}


def write_task_data(data: Path, out_dir: Path, seed: int = 1) -> dict:
    """Write each demo task's <task>.jsonl from a prepared split (parquet); returns the counts per task."""
    import pyarrow.parquet as pq

    rows = pq.read_table(data, columns=["pair_id", "prompt", "chosen", "rejected"]).to_pylist()
    records = task_records(rows, seed)
    counts = {name: len(recs) for name, recs in records.items()}
    with atomic_dir(out_dir) as tmp:
        for name, recs in records.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for rec in recs:
                    fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        write_json(tmp / "counts.json", counts)
    return counts


TASK_DATA_VERSION = 3  # bump when task_records changes what it writes


def local_tasks_digest() -> str:
    """sha256 (16 hex) of the shipped task YAMLs and the task-data format: the workflow passes it as a
    param, so editing a local task reruns its data and its evaluations."""
    digest = hashlib.sha256(str(TASK_DATA_VERSION).encode())
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _local_task_file(task: str) -> Path:
    path = TASKS_DIR / f"{task}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        raise PrefkdError(f"unknown local lm-eval task {task!r}; prefkd ships: {', '.join(known)}.")
    return path


def _write_local_tasks(tasks: list[str], data_dir: Path | None, include: Path) -> None:
    for task in tasks:
        if not task.startswith(LOCAL_PREFIX):
            continue
        if data_dir is None:
            raise PrefkdError(f"local task {task!r} needs --task-data (the folder `prefkd eval-data` writes).")
        text = _local_task_file(task).read_text(encoding="utf-8")
        (include / f"{task}.yaml").write_text(
            text.replace("@DATA_DIR@", str(Path(data_dir).resolve())), encoding="utf-8"
        )


# ---------------------------------------------------------------------------
# Running a suite
# ---------------------------------------------------------------------------


def normalise_suite(suite: dict) -> dict:
    """Fill a suite's defaults; each task becomes {task, num_fewshot, metric, label}."""
    tasks = []
    for item in suite.get("tasks", []):
        t = {"task": item} if isinstance(item, str) else dict(item)
        t.setdefault("num_fewshot", 0)
        t.setdefault("metric", DEFAULT_METRICS.get(t["task"], "acc"))
        t.setdefault("label", t["task"])
        tasks.append(t)
    if not tasks:
        raise PrefkdError("an evaluation suite needs at least one task.")
    return {
        "tasks": tasks,
        "apply_chat_template": bool(suite.get("apply_chat_template", False)),
        "limit": suite.get("limit"),
        "batch_size": int(suite.get("batch_size", 8)),
        "max_length": suite.get("max_length"),
        "bootstrap_iters": int(suite.get("bootstrap_iters", 1000)),
    }


def pick_metric(entry: dict, metric: str) -> tuple[float | None, float | None, str]:
    """(value, stderr, key) of ``metric`` in one lm-eval results entry ('acc' matches 'acc,none')."""
    if "," in metric:
        key = metric
    else:
        candidates = [k for k in entry if k.split(",")[0] == metric]
        key = f"{metric},none" if f"{metric},none" in entry else (sorted(candidates)[0] if candidates else metric)
    if key not in entry:
        return None, None, key
    name, _, filt = key.partition(",")
    stderr = entry.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
    value = entry[key]
    scale = 100.0 if name in PERCENT_METRICS else 1.0
    return (
        float(value) / scale if isinstance(value, (int, float)) else None,
        float(stderr) / scale if isinstance(stderr, (int, float)) else None,
        key,
    )


def scores_from_results(results: dict, tasks: list[dict]) -> dict:
    """The report's table from lm-eval's results (groups such as mmlu come from 'groups')."""
    out = {}
    for t in tasks:
        name = t["task"]
        entry = (results.get("groups") or {}).get(name) or results.get("results", {}).get(name)
        if entry is None:
            raise PrefkdError(f"lm-eval returned no results for task {name!r}.")
        value, stderr, key = pick_metric(entry, t["metric"])
        if value is None:
            have = sorted(k for k in entry if "," in k and "_stderr" not in k)
            raise PrefkdError(f"task {name!r} has no metric {t['metric']!r}; it reports: {', '.join(have)}.")
        samples = (results.get("n-samples") or {}).get(name, {}).get("effective")
        out[name] = {
            "metric": key,
            "value": value,
            "stderr": stderr,
            "samples": samples,
            "label": t["label"],
            "num_fewshot": t["num_fewshot"],
        }
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def run_suite(model_dir: Path, suite: dict, task_data: Path | None = None, seed: int = 1, device: str = "auto") -> dict:
    """Evaluate one model on one suite with lm-eval; returns {scores, settings, lm_eval}."""
    suite = normalise_suite(suite)
    names = [t["task"] for t in suite["tasks"]]
    check_task_extras(names)
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = [t for t in names if t.startswith(LOCAL_PREFIX)]
    for t in local:
        _local_task_file(t)  # an unknown local task stops here, before any model is loaded
    skipped = {}
    if task_data is not None:
        counts = json.loads((Path(task_data) / "counts.json").read_text())
        for t in local:
            if counts.get(t, 0) == 0:
                skipped[t] = "no held-out prompts of this kind"
    device = pick_device(device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(str(model_dir)).to(device).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=suite["batch_size"], max_length=suite["max_length"])
    merged: dict = {
        "results": {},
        "groups": {},
        "configs": {},
        "versions": {},
        "n-shot": {},
        "n-samples": {},
        "higher_is_better": {},
    }
    with tempfile.TemporaryDirectory(prefix="prefkd-lm-eval-") as include:
        _write_local_tasks([t for t in names if t not in skipped], task_data, Path(include))
        # only the suite's local tasks: the harness's own ~14k task YAMLs are indexed only when the suite names one
        harness = any(not t.startswith(LOCAL_PREFIX) for t in names)
        manager = TaskManager(include_path=include, include_defaults=harness)
        by_shots: dict[int, list[str]] = {}
        for t in suite["tasks"]:
            if t["task"] not in skipped:
                by_shots.setdefault(int(t["num_fewshot"]), []).append(t["task"])
        for shots, group in by_shots.items():
            res = simple_evaluate(
                model=lm,
                tasks=group,
                num_fewshot=shots,
                limit=suite["limit"],
                apply_chat_template=suite["apply_chat_template"],
                fewshot_as_multiturn=suite["apply_chat_template"] and shots > 0,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=suite["bootstrap_iters"],
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            for key in merged:
                merged[key].update(res.get(key) or {})
    scores = scores_from_results(merged, [t for t in suite["tasks"] if t["task"] not in skipped])
    for t in suite["tasks"]:
        if t["task"] in skipped:
            scores[t["task"]] = {"metric": t["metric"], "value": None, "stderr": None, "samples": 0, "label": t["label"],
                                 "num_fewshot": t["num_fewshot"], "skipped": skipped[t["task"]]}  # fmt: skip
    settings = {**suite, "seed": seed, "device": device, "lm_eval_version": lm_eval.__version__}
    return {
        "scores": {t["task"]: scores[t["task"]] for t in suite["tasks"]},
        "settings": settings,
        "lm_eval": _jsonable(merged),
    }


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def run(s: LmEvalSettings) -> int:
    try:
        suite = json.loads(s.suite)
    except json.JSONDecodeError as exc:
        raise PrefkdError(f"--suite is not valid JSON ({exc.msg}).") from None
    result = run_suite(s.model, suite, s.task_data, s.seed, s.device)
    write_json(s.out, {"model": s.name, "suite": s.suite_name, **result})
    print(json.dumps({"model": s.name, "suite": s.suite_name, **{k: v["value"] for k, v in result["scores"].items()}}))
    return 0


def run_data(s: EvalDataSettings) -> int:
    counts = write_task_data(s.data, s.out, s.seed)
    print(json.dumps(counts))
    return 0
