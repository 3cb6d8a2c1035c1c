# Config validation at DAG build time and path helpers shared by all rules.
import sys
from pathlib import Path

from prefkd.config import validate_config
from prefkd.errors import PrefkdError

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


def _signal_set(role, unit, pos, neg, ref, spec):
    return {"role": role, "unit": unit, "pos": pos, "neg": neg, "ref": ref, "spec": spec}


def _signal_sets():
    sig = config["signals"]
    spec = {k: sig[k] for k in ("transform", "aggregation", "k", "lower", "upper", "threshold", "top_fraction")}
    ref = sft_model("teacher") if sig["reference"] == "sft" else pos_model("teacher")
    sets = {"ctpd": _signal_set("teacher", "span", pos_model("teacher"), neg_model("teacher"), ref, spec)}
    if config["contrastive"]["student_pair"]:
        sets["tisdpo"] = _signal_set(
            "student", "token", pos_model("student"), neg_model("student"), sft_model("student"), spec
        )
    return sets if TRAINING else {}


SIGNAL_SETS = _signal_sets()


def signal_shards(sigset, split):
    return [f"{R}/signals/{sigset}/{split}/shard-{item}.arrow" for item in ITEMS]


def signal_models(sigset):
    s = SIGNAL_SETS[sigset]
    return sorted({s["ref"], s["pos"], s["neg"]})


def signal_args(sigset, input):
    s = SIGNAL_SETS[sigset]
    spec = s["spec"]
    return (
        f"--role {s['role']} --unit {s['unit']} --reference {s['ref']} --pos {s['pos']} --neg {s['neg']}"
        f" --transform {spec['transform']} --aggregation {spec['aggregation']} --k {spec['k']}"
        f" --lower {spec['lower']} --upper {spec['upper']} --threshold {spec['threshold']}"
        f" --top-fraction {spec['top_fraction']} --seed {config['seed']}"
        f" --batch-size {config['signals']['batch_size']}"
    )


def all_targets():
    targets = [f"{R}/stats/alignment.json"]
    if TRAINING:
        targets += [sft_model("teacher"), sft_model("student"), f"{R}/stats/weights.json"]
    return targets
