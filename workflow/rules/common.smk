# Config validation at DAG build time and path helpers shared by all rules.
import sys
from pathlib import Path

from prefkd.config import validate_config
from prefkd.errors import PrefkdError

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


def all_targets():
    return [f"{R}/stats/alignment.json"]
