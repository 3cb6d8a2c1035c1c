# Config validation at DAG build time and path helpers shared by all rules.
import sys
from pathlib import Path

import hashlib
import json
import re

from prefkd.assets.tokenizers import BUILTIN, TEMPLATES_DIR, resolve_chat_template
from prefkd.core.methods import method as lib_method
from prefkd.core.methods import models_for_set, resolve_methods, signal_plan
from prefkd.core.settings import config_values, to_flags
from prefkd.errors import PrefkdError
from prefkd.assets.models import ModelSettings
from prefkd.assets.tokenizers import TokenizerSettings
from prefkd.data.demo import DemoDataSettings
from prefkd.data.prepare import PrepareSettings
from prefkd.data.tokenize_align import TokenizeSettings
from prefkd.evaluation.lmeval import LOCAL_PREFIX, local_tasks_digest, missing_extras
from prefkd.evaluation.settings import (
    IMPLICIT,
    EvalDataSettings,
    GenerateSettings,
    LmEvalSettings,
    PreferenceEvalSettings,
    ReportSettings,
    WinrateSettings,
)
from prefkd.io.config import single_level, validate_config
from prefkd.launch import TRAINING_KINDS, launch_prefix as lib_launch_prefix, snakemake_resources
from prefkd.plan import check_plan
from prefkd.preflight import accelerate_config_path, check_environment
from prefkd.training.grid import rate_tag
from prefkd.training.settings import SignalSettings, TrainSettings

PROJECT_ROOT = Path(workflow.basedir).parent

try:
    config = validate_config(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
    config = single_level(config)  # a list of label-noise levels is `prefkd study`'s
    check_environment(config, PROJECT_ROOT)  # what the config names exists here: found now, not hours later
    # A config sized for GPUs gets `prefkd plan`'s memory check before any job is submitted.
    if any(res["gpus"] for res in config["resources"].values() if isinstance(res, dict)):
        for note in check_plan(config, PROJECT_ROOT):
            sys.stderr.write(f"prefkd plan: {note}\n")
except PrefkdError as exc:
    sys.stderr.write(f"prefkd config error: {exc}\n")
    raise SystemExit(1)

R = f"results/{config['experiment']}"
SPLITS = ["train", "valid", "test"]
ROLES = ["teacher", "student"]
ENV = "../../envs/prefkd.yaml"


def stage_flags(settings, names=None, **values):
    """The CLI flags of one job, built from its stage's settings dataclass: every setting whose config key the
    dataclass names is read from the config (``names`` fills placeholders such as ``{role}``), then ``values``
    (wildcards, and settings the config holds under another key) are laid over them."""
    return to_flags(settings, {**config_values(settings, config, **(names or {})), **values})


def data_source():
    """The prepare rule's input file: the generated demo data, a local file, or nothing (HF id)."""
    source = config["data"]["source"]
    if source == "demo":
        return f"{R}/raw/demo_pairs.jsonl"
    if Path(source).exists():
        return source
    return []


def source_argument(wildcards, input):
    return input.source if input.source else config["data"]["source"]


def tokenizer_source(role):
    spec = config[role]
    return spec["tokenizer"] or spec["model"]


def template_digest(role):
    """sha256 of the prefkd template file a tokenizer is built with ("" if none)."""
    spec = config[role]
    if spec["chat_template"]:
        path = resolve_chat_template(spec["chat_template"])
    elif tokenizer_source(role).removeprefix("builtin:") in BUILTIN:
        path = TEMPLATES_DIR / BUILTIN[tokenizer_source(role).removeprefix("builtin:")].template
    else:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if Path(path).exists() else ""


def scatter_shard(item):
    """'3-of-8' -> {"shard": 2, "shards": 8}: the 0-based shard index and the shard count."""
    k, _, n = item.partition("-of-")
    return {"shard": int(k) - 1, "shards": int(n)}


# ---------------------------------------------------------------------------
# Training stages
# ---------------------------------------------------------------------------

N_SHARDS = config["tokenize"]["shards"]
ITEMS = [f"{k}-of-{N_SHARDS}" for k in range(1, N_SHARDS + 1)]
TRAINING = bool(config["teacher"]["model"]) and bool(config["student"]["model"])


SIGNAL_JOBS = min(config["resources"]["signals"]["jobs"], N_SHARDS)


def part_items(part):
    """The shards (of every split) that scoring job ``part`` (0-based) of SIGNAL_JOBS walks: every SIGNAL_JOBS-th."""
    return ITEMS[part::SIGNAL_JOBS]


def part_rule(name, part):
    """A scoring rule's name: `signals`, or `signals_part2` when a (set, split) is split over several jobs."""
    return name if SIGNAL_JOBS == 1 else f"{name}_part{part + 1}"


def part_suffix(part):
    return "" if SIGNAL_JOBS == 1 else f"-part{part + 1}"


def token_shards(split, reversed_=False):
    folder = "tokens-reversed" if reversed_ else "tokens"
    return [f"{R}/{folder}/{split}/shard-{item}.arrow" for item in ITEMS]


def dpo_ref_shards(role, split, reversed_=False):
    name = f"dpo-ref-{role}" + ("-reversed" if reversed_ else "")
    return [f"{R}/signals/{name}/{split}/shard-{item}.arrow" for item in ITEMS]


def sft_model(role):
    kind = "sft" if config["sft"][role]["enabled"] else "init"
    return f"{R}/models/{role}-{kind}"


def pos_model(role):
    if config["contrastive"]["construction"] == "sft":
        return sft_model(role)
    return f"{R}/models/{role}-dpo-pos"


def neg_model(role):
    if config["contrastive"]["construction"] == "sft":
        return f"{R}/models/{role}-sft-rejected"
    return f"{R}/models/{role}-dpo-neg"


# ---------------------------------------------------------------------------
# Resources: what each kind of stage asks the scheduler for (config `resources`)
# ---------------------------------------------------------------------------

RES = config["resources"]


def role_kind(wildcards):
    """sft and dpo jobs take the resources of their role (teacher or student)."""
    return wildcards.role


def stage_resources(kind):
    """The Snakemake resources of a kind of stage: a name, or a function of the wildcards (then every job of
    the rule declares the same keys, neutral where its kind asks for nothing)."""
    if not callable(kind):
        return snakemake_resources(RES[kind], RES["gpu_model"])
    keys = set().union(*(snakemake_resources(RES[k], RES["gpu_model"]) for k in TRAINING_KINDS))
    return {
        key: (lambda w, key=key: snakemake_resources(RES[kind(w)], RES["gpu_model"], keys)[key]) for key in sorted(keys)
    }


def stage_threads(kind):
    """A job's threads are its CPUs (a function of the wildcards for role-dependent rules)."""
    if not callable(kind):
        return RES[kind]["cpus"]
    return lambda w: RES[kind(w)]["cpus"]


def launch_prefix(kind):
    """`accelerate launch ...` (or, over several nodes, `srun ... python -m prefkd.launch ...`) of a
    training job, with its process and machine counts from the resources of its kind."""

    def prefix(wildcards, threads):
        k = kind(wildcards) if callable(kind) else kind
        path = accelerate_config_path(RES[k]["accelerate"], PROJECT_ROOT)
        return lib_launch_prefix(RES[k], path, threads)

    return prefix


def train_flags(**values):
    """The flags of one training job: the shared `train.*` settings, the role's model settings and the seed
    read from the config (prefkd.training.settings.TrainSettings names its config keys), then the stage's own
    values."""
    return stage_flags(TrainSettings, {"role": values["role"]}, **values)


def sft_flags(role):
    """`sft.<role>` holds the stage's settings, except `enabled`, which only the workflow reads."""
    stage = {k: v for k, v in config["sft"][role].items() if k != "enabled"}
    return train_flags(stage="sft", role=role, **stage)


def dpo_flags(role, direction):
    return train_flags(stage="preference", role=role, unit="token", **config["contrastive"][direction])


STUDENT_METHODS = resolve_methods(config["distill"]["methods"]) if TRAINING else []


def model_path(key):
    """teacher-sft / teacher-pos / teacher-neg / student-... -> the model dir of this config."""
    role, _, kind = key.partition("-")
    return {"sft": sft_model, "pos": pos_model, "neg": neg_model}[kind](role)


SIGNAL_SETS = signal_plan(STUDENT_METHODS, config["signals"]["reference"]) if TRAINING else {}
# dpo-ref-<role> sets have their own rule (dpo_reference), which the contrastive stage needs too
GENERIC_SETS = [n for n in SIGNAL_SETS if not n.startswith("dpo-ref-")]


def signal_shards(sigset, split):
    return [f"{R}/signals/{sigset}/{split}/shard-{item}.arrow" for item in ITEMS]


def signal_models(sigset):
    return sorted({model_path(key) for key in models_for_set(sigset, SIGNAL_SETS)})


def dpo_reference_flags(role):
    """Reference log-probs of a role's SFT on every response token, with uniform weights (what DPO needs)."""
    sig = config["signals"]
    values = dict(role=role, unit="token", transform="uniform", batch_size=sig["batch_size"], dtype=sig["dtype"])
    return to_flags(SignalSettings, values)  # not stage_flags: only these settings, as DPO's reference


def signal_flags(sigset):
    """The flags of a signals job: the set's models and units, the `signals.*` settings and the seed."""
    s = SIGNAL_SETS[sigset]
    values = config_values(SignalSettings, config)
    values.update(unit=s.unit, reference=model_path(s.ref[0]), ref_role=s.ref[1], role=s.ref[1])
    if s.pos:
        values.update(pos=model_path(s.pos[0]), pos_role=s.pos[1], neg=model_path(s.neg[0]), neg_role=s.neg[1])
    values.update({k: v for k, v in (("transform", s.transform), ("aggregation", s.aggregation)) if v})
    values["eos_weight"] = s.eos_weight  # TIS-DPO's EOS weight 0; None: no flag
    values["contrast"] = None if s.contrast == "models" else s.contrast  # CTPD-Lite: sides
    return to_flags(SignalSettings, values)


def method_shards(name, split):
    m = lib_method(name)
    shards = []
    for s in (m.weights, m.reference):
        if s:
            shards += signal_shards(s, split)
    return shards


def kd_teacher():
    return pos_model("teacher") if config["distill"]["kd_teacher"] == "pos" else sft_model("teacher")


def method_extra_inputs(name):
    return [kd_teacher()] if lib_method(name).kd else []


# ---------------------------------------------------------------------------
# Student runs: one per (method, seed); learning rates per method, or searched on the valid split
# ---------------------------------------------------------------------------

SEED = config["seed"]
SEEDS = config["seeds"] or [SEED]
LRS = config["distill"]["lrs"]
GRID = {rate_tag(lr): lr for lr in config["distill"]["lr_grid"]}  # path tag -> rate
SEARCHED = [m for m in STUDENT_METHODS if m != "sft" and m not in LRS] if GRID else []


def student_run(method, seed):
    """A run's name (its folder under students/): the method for the experiment's seed, <method>-seed<N> else."""
    return method if seed == SEED else f"{method}-seed{seed}"


STUDENT_RUNS = {student_run(m, s): (m, s) for m in STUDENT_METHODS if m != "sft" for s in SEEDS}
# runs trained by the distill rule; a searched method's run of the experiment's seed is its search's choice
TRAINED_RUNS = [r for r, (m, s) in STUDENT_RUNS.items() if not (m in SEARCHED and s == SEED)]
SEED_RUNS = [r for r, (m, s) in STUDENT_RUNS.items() if s != SEED]


def method_lr(name):
    """A method's configured rate: distill.lrs, else kd_lr (KD baselines) or lr."""
    if name in LRS:
        return LRS[name]
    return config["distill"]["kd_lr"] if lib_method(name).kind == "kd" else config["distill"]["lr"]


def grid_dir(method, tag):
    return f"{R}/students-grid/{method}/lr-{tag}"


def grid_selected(method):
    return f"{R}/students-grid/{method}/selected.json"


def run_selected(run):
    """The selected.json a run takes its rate from (a searched method's other seeds), else nothing."""
    method, _ = STUDENT_RUNS[run]
    return [grid_selected(method)] if method in SEARCHED else []


def distill_flags(name, seed=None, lr=None):
    """The flags of a student job: a preference loss over the method's signal sets, or a KD stage. ``lr``: the
    rate (default: the method's configured one); ``None`` for a searched method, whose rate comes from its
    selected.json (--lr-from)."""
    m = lib_method(name)
    d = config["distill"]
    values = dict(role="student", seed=SEED if seed is None else seed)
    lr = method_lr(name) if lr is None and name not in SEARCHED else lr
    if lr is None:
        values["lr_from"] = grid_selected(name)
    else:
        values["lr"] = lr
    if m.kd:
        values.update(kd=m.kd, kd_teacher=kd_teacher(), temperature=d["temperature"])
    if m.kind == "kd":
        values.update(stage="kd", epochs=d["epochs"], kd_weight=d["kappa"])
    else:
        values.update(stage="preference", unit=m.unit, beta=d["beta"], epochs=d["epochs"])
        values.update(signals=signal_shards(m.weights, "train"))
        if m.reference:
            values.update(ref_signals=signal_shards(m.reference, "train"))
        if m.kd:
            values.update(kd_weight=d["alpha"])
    return train_flags(**values)


# ---------------------------------------------------------------------------
# Evaluation and the report
# ---------------------------------------------------------------------------

EVAL = config["evaluation"]
SUITES = list(EVAL["suites"])
EVALUATING = TRAINING and EVAL["enabled"]


def signal_model_keys():
    """The model keys (teacher-sft, student-pos, ...) that this run's signal sets load."""
    return {key for name in SIGNAL_SETS for key in models_for_set(name, SIGNAL_SETS)}


def teacher_pair_needed():
    """Whether the run trains the teacher's contrastive pair: a signal set or the KD teacher or the implicit
    judge reads it (a run of CTPD-Lite alone, judged by a reward model or not at all, does not)."""
    keys = signal_model_keys()
    kd = config["distill"]["kd_teacher"] == "pos" and any(lib_method(m).kd for m in STUDENT_METHODS)
    judge = EVAL["enabled"] and EVAL["reward"]["enabled"] and EVAL["reward"]["judge"] == IMPLICIT
    return bool(keys & {"teacher-pos", "teacher-neg"}) or kd or judge


def _eval_models():
    """teacher-sft, teacher-pos (when it is its own model and trained), student-sft, student-<method>..."""
    names = ["teacher-sft"]
    if pos_model("teacher") != sft_model("teacher") and teacher_pair_needed():
        names.append("teacher-pos")
    names += ["student-sft"] + [f"student-{m}" for m in STUDENT_METHODS if m != "sft"]
    return names + [f"student-{r}" for r in SEED_RUNS]


EVAL_MODELS = _eval_models() if EVALUATING else []
STUDENT_EVAL_MODELS = [m for m in EVAL_MODELS if m.startswith("student-")]


def _warn_missing_extras():
    """Say at DAG time (not hours later in the evaluation jobs) when a task's lm-eval extra is missing here."""
    tasks = sorted({t["task"] for suite in EVAL["suites"].values() for t in suite["tasks"]})
    for problem in missing_extras(tasks):
        sys.stderr.write(f"prefkd warning: {problem}; its evaluation jobs will stop with this message.\n")


if EVALUATING:
    _warn_missing_extras()


def eval_model_dir(name):
    role, _, kind = name.partition("-")
    if role == "student" and kind != "sft":
        return f"{R}/students/{kind}"
    return model_path(name)


def eval_role(name):
    return name.partition("-")[0]


def suite_task_data(suite):
    """The local tasks' data folder when the suite uses prefkd_ tasks, else nothing."""
    local = any(t["task"].startswith(LOCAL_PREFIX) for t in EVAL["suites"][suite]["tasks"])
    return f"{R}/eval/tasks" if local else []


def reward_judge_models():
    return list(judge_models().values())


def judge_models():
    """The implicit judge's two models (the teacher pair)."""
    return {"pos": pos_model("teacher"), "neg": neg_model("teacher")} if EVAL["reward"]["judge"] == IMPLICIT else {}


def reward_judge_name():
    judge = EVAL["reward"]["judge"]
    return "implicit:teacher-pos/teacher-neg" if judge == IMPLICIT else judge


def suite_json(suite):
    """A suite's settings as the JSON value of `prefkd lm-eval --suite`."""
    return json.dumps(EVAL["suites"][suite], sort_keys=True)


REWARD = EVALUATING and EVAL["reward"]["enabled"]


def report_inputs():
    files = []
    for m in EVAL_MODELS:
        files += [f"{R}/eval/{m}/preference.json"] + [f"{R}/eval/{m}/{s}.json" for s in SUITES]
        if REWARD and m in STUDENT_EVAL_MODELS:
            files.append(f"{R}/eval/{m}/reward.json")
    return files


def report_runs():
    """Training runs whose metrics.jsonl the report plots (name -> model dir)."""
    runs = {"teacher-sft": sft_model("teacher"), "student-sft": sft_model("student")}
    if config["contrastive"]["construction"] == "dpo" and teacher_pair_needed():
        runs.update({"teacher-pos": pos_model("teacher"), "teacher-neg": neg_model("teacher")})
    runs.update({f"student-{m}": f"{R}/students/{m}" for m in STUDENT_METHODS if m != "sft"})
    return runs


def all_targets():
    targets = [f"{R}/stats/alignment.json"]
    if TRAINING:
        targets += [sft_model("teacher"), sft_model("student"), f"{R}/stats/weights.json"]
        targets += [f"{R}/students/{m}" for m in STUDENT_METHODS] + [f"{R}/students/{r}" for r in SEED_RUNS]
        if config["contrastive"]["student_pair"]:
            targets += [pos_model("student"), neg_model("student")]
    if EVALUATING:
        targets.append(f"{R}/report.md")
    return targets


# ---------------------------------------------------------------------------
# Compute accounting (prefkd.cost): the stage graph, stated once; every job writes benchmarks/<its log>.tsv
# ---------------------------------------------------------------------------

SPLIT_RX = "(?P<split>train|valid|test)(-part[0-9]+)?"
BOTH = ["chosen", "rejected"]


def model_stage(key):
    """The cost stage that produces a model key's model (teacher-sft, student-pos, ...)."""
    role, _, kind = key.partition("-")
    if kind == "sft":
        return f"sft-{role}" if config["sft"][role]["enabled"] else f"init-{role}"
    if config["contrastive"]["construction"] == "sft":
        return model_stage(f"{role}-sft") if kind == "pos" else f"sft-rejected-{role}"
    return f"dpo-{role}-{kind}"


def student_run_stage(run, method, seed):
    """A student run's stage: its own training (a searched method's run of `seed` is its whole search)."""
    m, d = lib_method(method), config["distill"]
    sets = [s for s in (m.weights, m.reference) if s]
    needs = ["data", model_stage("student-sft"), "dpo-ref-student"]
    needs += [s if s.startswith("dpo-ref-") else f"signals-{s}" for s in sets if s != "dpo-ref-student"]
    kd_dir = kd_teacher()
    if m.kd:
        needs.append(model_stage("teacher-" + ("pos" if d["kd_teacher"] == "pos" else "sft")))
    searched = method in SEARCHED
    if searched and seed != SEED:
        needs.append(f"student-{method}")
    runs = len(GRID) if searched and seed == SEED else 1
    out = f"{R}/students/{run}"
    sides = ["chosen"] if m.kind == "kd" else BOTH
    flops = [[6, out, "student", sides, d["epochs"] * runs, ["train"]]]
    if m.kd:
        flops.append([2, kd_dir, "teacher", ["chosen"], d["epochs"] * runs, ["train"]])
    if searched and seed == SEED:
        rx = f"students-grid/{re.escape(method)}-(lr-.*|select)"
    else:
        rx = f"students/{re.escape(run)}"
    return {"match": rx, "runs": [out], "needs": needs, "flops": flops}


def pair_trained(role):
    """Whether the run trains a role's contrastive pair (a signal set, the KD teacher or the judge reads it)."""
    if role == "teacher":
        return teacher_pair_needed()
    return bool(signal_model_keys() & {"student-pos", "student-neg"}) or config["contrastive"]["student_pair"]


def cost_plan():
    """prefkd.cost's plan: what each stage's jobs are, what it needs and its FLOPs terms (only the stages this
    config can run)."""
    data = "(tokenizer-(teacher|student)|demo_data|prepare|tokenize/.*|alignment_stats|reverse/tokens-.*)"
    stages = {"data": {"match": data}}
    for role in ROLES:
        sft_dir, epochs = sft_model(role), config["sft"][role]["epochs"]
        stages[f"init-{role}"] = {"match": f"model-init-{role}", "needs": ["data"]}
        stages[f"sft-{role}"] = {
            "match": f"sft-{role}",
            "runs": [sft_dir],
            "needs": ["data", f"init-{role}"],
            "flops": [[6, sft_dir, role, ["chosen"], epochs, ["train"]]],
        }
        rejected = f"{R}/models/{role}-sft-rejected"
        construction = config["contrastive"]["construction"] if pair_trained(role) else None
        if construction == "sft":
            stages[f"sft-rejected-{role}"] = {
                "match": f"sft-rejected-{role}",
                "runs": [rejected],
                "needs": ["data", f"init-{role}"],
                "flops": [[6, rejected, role, ["rejected"], epochs, ["train"]]],
            }
        stages[f"dpo-ref-{role}"] = {
            "match": f"(signals/dpo-ref-{role}-{SPLIT_RX}|reverse/signals/dpo-ref-{role}-.*)",
            "needs": [model_stage(f"{role}-sft")],
            "flops": [[2, sft_dir, role, BOTH, 1, None]],
        }
        for direction in ("pos", "neg") if construction == "dpo" else ():
            out, c = f"{R}/models/{role}-dpo-{direction}", config["contrastive"][direction]
            stages[f"dpo-{role}-{direction}"] = {
                "match": f"dpo-{role}-{direction}",
                "runs": [out],
                "needs": ["data", model_stage(f"{role}-sft"), f"dpo-ref-{role}"],
                "flops": [[6, out, role, BOTH, c["epochs"], ["train"]]],
            }
    for name in GENERIC_SETS:
        s = SIGNAL_SETS[name]
        models = {x for x in (s.ref, s.pos, s.neg) if x}
        stages[f"signals-{name}"] = {
            "match": f"signals/{re.escape(name)}-{SPLIT_RX}",
            "needs": ["data"] + sorted({model_stage(k) for k, _ in models}),
            "flops": [[2, model_path(k), role, BOTH, 1, None] for k, role in sorted(models)],
        }
    runs = {"sft": model_stage("student-sft")}
    for run, (method, seed) in STUDENT_RUNS.items():
        stages[f"student-{run}"] = student_run_stage(run, method, seed)
        runs[run] = f"student-{run}"
    return {"stages": stages, "methods": runs}


def lr_flags():
    """The report's learning-rate inputs: every method's configured rate, and its search's choice."""
    rates = [f"{m}={method_lr(m)}" for m in STUDENT_METHODS if m != "sft" and m not in SEARCHED]
    return {"lr": rates, "lr_search": [f"{m}={grid_selected(m)}" for m in SEARCHED]}
