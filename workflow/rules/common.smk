# Config validation at DAG build time and path helpers shared by all rules.
import sys
from pathlib import Path

import re
import shlex

from prefkd.config import validate_config
from prefkd.errors import PrefkdError
from prefkd.lmeval import LOCAL_PREFIX, local_tasks_digest, missing_extras, suite_argument
from prefkd.methods import SIGNAL_SETS as LIB_SIGNAL_SETS
from prefkd.methods import method as lib_method
from prefkd.methods import resolve_methods, signal_sets_for

# `--configfile X` must replace config.yaml, not be merged into it (keys missing from
# an experiment config would silently take the demo's values).
if workflow.overwrite_configfiles:
    config = dict(workflow.config_settings.overwrite_config)

try:
    config = validate_config(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
except PrefkdError as exc:
    sys.stderr.write(f"prefkd config error: {exc}\n")
    raise SystemExit(1)

R = f"results/{config['experiment']}"
SPLITS = ["train", "valid", "test"]
ROLES = ["teacher", "student"]
ENV = "../../envs/prefkd.yaml"


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
    import hashlib

    from prefkd.tokenizers import BUILTIN, TEMPLATES_DIR, resolve_chat_template

    spec = config[role]
    if spec["chat_template"]:
        path = resolve_chat_template(spec["chat_template"])
    elif tokenizer_source(role).removeprefix("builtin:") in BUILTIN:
        path = TEMPLATES_DIR / BUILTIN[tokenizer_source(role).removeprefix("builtin:")].template
    else:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if Path(path).exists() else ""


def scatter_index(item):
    """'3-of-8' -> (2, 8): the 0-based shard index and the shard count."""
    k, _, n = item.partition("-of-")
    return int(k) - 1, int(n)


# ---------------------------------------------------------------------------
# Training stages
# ---------------------------------------------------------------------------

N_SHARDS = config["tokenize"]["shards"]
ITEMS = [f"{k}-of-{N_SHARDS}" for k in range(1, N_SHARDS + 1)]
TRAINING = bool(config["teacher"]["model"]) and bool(config["student"]["model"])


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


def accelerate_config():
    name = config["train"]["accelerate"]
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json"):
        return str(path)
    return str(Path(workflow.basedir).parent / "configs" / "accelerate" / f"{name}.yaml")


def launch_prefix(wildcards, threads):
    return (
        f"accelerate launch --config_file {accelerate_config()}"
        f" --num_cpu_threads_per_process {threads} -m prefkd.cli"
    )


def train_common(wildcards):
    t = config["train"]
    flags = (
        f"--batch-size {t['batch_size']} --grad-accum {t['grad_accum']} --warmup-ratio {t['warmup_ratio']}"
        f" --scheduler {t['scheduler']} --weight-decay {t['weight_decay']} --max-grad-norm {t['max_grad_norm']}"
        f" --save-every {t['save_every']} --seed {config['seed']}"
    )
    if t["gradient_checkpointing"]:
        flags += " --gradient-checkpointing"
    return flags


STUDENT_METHODS = resolve_methods(config["distill"]["methods"]) if TRAINING else []


def model_path(key):
    """teacher-sft / teacher-pos / teacher-neg / student-... -> the model dir of this config."""
    role, _, kind = key.partition("-")
    return {"sft": sft_model, "pos": pos_model, "neg": neg_model}[kind](role)


def _signal_sets():
    """Signal sets to compute: CTPD's (always, for stats/weights.json) and those the methods read."""
    if not TRAINING:
        return {}
    names = ["ctpd"] + [n for n in signal_sets_for(STUDENT_METHODS) if n not in ("ctpd",)]
    sets = {}
    for name in names:
        s = LIB_SIGNAL_SETS[name]
        ref = s.ref
        if name == "ctpd" and config["signals"]["reference"] == "pos":
            ref = ("teacher-pos", "teacher")
        sets[name] = {"unit": s.unit, "ref": ref, "pos": s.pos, "neg": s.neg, "transform": s.transform, "aggregation": s.aggregation}
    return sets


SIGNAL_SETS = _signal_sets()
# dpo-ref-<role> sets have their own rule (dpo_reference), which the contrastive stage needs too
GENERIC_SETS = [n for n in SIGNAL_SETS if not n.startswith("dpo-ref-")]


def signal_shards(sigset, split):
    return [f"{R}/signals/{sigset}/{split}/shard-{item}.arrow" for item in ITEMS]


def signal_models(sigset):
    s = SIGNAL_SETS[sigset]
    return sorted({model_path(x[0]) for x in (s["ref"], s["pos"], s["neg"]) if x})


def signal_args(sigset):
    s = SIGNAL_SETS[sigset]
    sig = config["signals"]
    transform = s["transform"] or sig["transform"]
    aggregation = s["aggregation"] or sig["aggregation"]
    args = f"--unit {s['unit']} --reference {model_path(s['ref'][0])} --ref-role {s['ref'][1]} --role {s['ref'][1]}"
    if s["pos"]:
        args += f" --pos {model_path(s['pos'][0])} --pos-role {s['pos'][1]}"
        args += f" --neg {model_path(s['neg'][0])} --neg-role {s['neg'][1]}"
    return (
        f"{args} --transform {transform} --aggregation {aggregation} --k {sig['k']}"
        f" --lower {sig['lower']} --upper {sig['upper']} --threshold {sig['threshold']}"
        f" --top-fraction {sig['top_fraction']} --seed {config['seed']} --batch-size {sig['batch_size']}"
    )


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


def distill_args(name):
    m = lib_method(name)
    d = config["distill"]
    kd = f" --kd {m.kd} --kd-teacher {kd_teacher()} --temperature {d['temperature']}" if m.kd else ""
    if m.kind == "kd":
        return f"--stage kd --lr {d['kd_lr']} --epochs {d['epochs']} --kd-weight {d['kappa']}{kd}"
    args = (
        f"--stage preference --unit {m.unit} --beta {d['beta']} --lr {d['lr']} --epochs {d['epochs']}"
        f" --signals {' '.join(signal_shards(m.weights, 'train'))}"
    )
    if m.reference:
        args += f" --ref-signals {' '.join(signal_shards(m.reference, 'train'))}"
    if m.kd:
        args += f" --kd-weight {d['alpha']}{kd}"
    return args


# ---------------------------------------------------------------------------
# Evaluation and the report
# ---------------------------------------------------------------------------

EVAL = config["evaluation"]
SUITES = list(EVAL["suites"])
EVALUATING = TRAINING and EVAL["enabled"]


def _eval_models():
    """teacher-sft, teacher-pos (when it is its own model), student-sft, student-<method>..."""
    names = ["teacher-sft"]
    if pos_model("teacher") != sft_model("teacher"):
        names.append("teacher-pos")
    names += ["student-sft"] + [f"student-{m}" for m in STUDENT_METHODS if m != "sft"]
    return names


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
    return [pos_model("teacher"), neg_model("teacher")] if EVAL["reward"]["judge"] == "implicit" else []


def reward_judge_args():
    judge = EVAL["reward"]["judge"]
    if judge == "implicit":
        return f"--judge implicit --pos {pos_model('teacher')} --neg {neg_model('teacher')}"
    return f"--judge {shlex.quote(judge)}"


def reward_judge_name():
    judge = EVAL["reward"]["judge"]
    return "implicit:teacher-pos/teacher-neg" if judge == "implicit" else judge


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
    if config["contrastive"]["construction"] == "dpo":
        runs.update({"teacher-pos": pos_model("teacher"), "teacher-neg": neg_model("teacher")})
    runs.update({f"student-{m}": f"{R}/students/{m}" for m in STUDENT_METHODS if m != "sft"})
    return runs


def all_targets():
    targets = [f"{R}/stats/alignment.json"]
    if TRAINING:
        targets += [sft_model("teacher"), sft_model("student"), f"{R}/stats/weights.json"]
        targets += [f"{R}/students/{m}" for m in STUDENT_METHODS]
        if config["contrastive"]["student_pair"]:
            targets += [pos_model("student"), neg_model("student")]
    if EVALUATING:
        targets.append(f"{R}/report.md")
    return targets
