"""Config validation: every shipped config passes; each kind of mistake stops with one sentence.

The sentence must name the key and what is allowed, so a user can fix the file without reading code.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefkd.errors import PrefkdError
from prefkd.io.config import DEFAULT_SCHEMA, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
ALL_CONFIGS = [REPO / "config.yaml", *CONFIGS]
TEMPLATES = REPO / "prefkd" / "assets" / "templates"


def base_config() -> dict:
    with open(REPO / "config.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.strip().endswith("."), f"not a sentence: {message!r}"
    # A second sentence would start after a full stop: ". Capital" (but "0.5" or "a.b" is fine).
    assert not re.search(r"[.!?]\s+[A-Z]", message.strip()[:-1]), f"more than one sentence: {message!r}"
    assert "Traceback" not in message


def error_of(config: dict) -> str:
    with pytest.raises(PrefkdError) as info:
        validate_config(config)
    message = str(info.value)
    assert_one_sentence(message)
    return message


# ---------------------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------------------


def test_there_are_experiment_configs():
    names = {p.name for p in CONFIGS}
    assert {"seed-mistral7b-qwen1.5b.yaml", "paper-qwen14b-llama8b.yaml", "hh-harmless-demo.yaml"} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path: Path):
    config = load_config(path)
    # defaults are filled in
    assert config["seed"] == 1
    assert config["tokenize"]["max_prompt_length"] < config["tokenize"]["max_length"]
    for role in ("teacher", "student"):
        assert config[role]["trust_remote_code"] is False
        assert "chat_template" in config[role]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_builtin_chat_templates_exist(path: Path):
    config = load_config(path)
    for role in ("teacher", "student"):
        template = config[role]["chat_template"]
        if template and template.startswith("builtin:"):
            name = template.removeprefix("builtin:")
            assert (TEMPLATES / f"{name}.jinja").is_file(), f"{path.name}: {role} names a missing template {template}"


def test_experiment_names_are_unique():
    names = [load_config(p)["experiment"] for p in ALL_CONFIGS]
    assert len(names) == len(set(names))


def test_real_pairs_match_the_paper_and_the_seed():
    seed = load_config(REPO / "configs" / "seed-mistral7b-qwen1.5b.yaml")
    assert seed["teacher"]["model"] == "mistralai/Mistral-7B-v0.3"
    assert seed["student"]["model"] == "Qwen/Qwen2.5-1.5B"
    assert seed["data"]["source"] == "tonyshelby/ultra-feedback_v7"
    paper = load_config(REPO / "configs" / "paper-qwen14b-llama8b.yaml")
    assert paper["teacher"]["model"] == "Qwen/Qwen2.5-14B"
    assert paper["student"]["model"] == "meta-llama/Llama-3.1-8B"
    assert (paper["data"]["source"], paper["data"]["hf_split"]) == (
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
    )
    for config in (seed, paper):
        assert (config["tokenize"]["max_length"], config["tokenize"]["max_prompt_length"]) == (512, 128)
        assert config["tokenize"]["shards"] == 64
        assert config["data"]["format"] == "messages"
        for role in ("teacher", "student"):  # base models: the tokenizer comes with the model
            assert config[role]["tokenizer"] == config[role]["model"]


def test_real_configs_evaluate_the_papers_benchmarks():
    expected = [
        ("hellaswag", 10),
        ("arc_challenge", 25),
        ("mmlu", 5),
        ("truthfulqa_mc2", 0),
        ("winogrande", 5),
        ("gsm8k", 5),
    ]
    for name in ("seed-mistral7b-qwen1.5b.yaml", "paper-qwen14b-llama8b.yaml"):
        suites = load_config(REPO / "configs" / name)["evaluation"]["suites"]
        assert [(t["task"], t["num_fewshot"]) for t in suites["openllm"]["tasks"]] == expected
        assert [t["label"] for t in suites["openllm"]["tasks"]] == [
            "HellaSwag",
            "ARC",
            "MMLU",
            "TruthfulQA",
            "Winogrande",
            "GSM8K",
        ]
        assert {t["task"] for t in suites["leaderboard"]["tasks"]} == {"leaderboard_ifeval", "leaderboard_bbh"}
    assert load_config(REPO / "configs" / "paper-qwen14b-llama8b.yaml")["distill"]["methods"] == ["all"]


@pytest.mark.parametrize(
    "suites, words",
    [
        ({"preference": {"tasks": [{"task": "x"}]}}, ["evaluation.suites", "'preference'", "reserved"]),
        ({"ok": {"tasks": []}}, ["evaluation.suites.ok.tasks", "must not be empty"]),
        ({"ok": {"tasks": [{"task": "x", "shots": 3}]}}, ["evaluation.suites.ok.tasks.0.shots", "num_fewshot"]),
    ],
)
def test_bad_evaluation_suites(suites, words):
    config = base_config()
    config["evaluation"] = {"suites": suites}
    message = error_of(config)
    for word in words:
        assert word in message


def test_hh_demo_points_at_the_shared_file():
    config = load_config(REPO / "configs" / "hh-harmless-demo.yaml")
    assert config["data"]["format"] == "hh"
    source = REPO / config["data"]["source"]
    if not (REPO.parent / "shared").is_dir():
        pytest.skip("no shared/ folder next to the project")
    assert source.is_file(), f"{source} does not exist"


# ---------------------------------------------------------------------------------------------------------
# One sentence per mistake
# ---------------------------------------------------------------------------------------------------------


def test_misspelt_key():
    config = base_config()
    config["tokenize"]["max_lenght"] = config["tokenize"].pop("max_length")
    message = error_of(config)
    assert "tokenize.max_lenght" in message
    for allowed in ("max_length", "max_prompt_length", "shards"):
        assert allowed in message


def test_unknown_top_level_key():
    config = base_config()
    config["tokenise"] = {"max_length": 10}
    message = error_of(config)
    assert "tokenise" in message
    for allowed in ("experiment", "data", "teacher", "student", "tokenize"):
        assert allowed in message


def test_wrong_type():
    config = base_config()
    config["tokenize"]["max_length"] = "abc"
    message = error_of(config)
    assert "tokenize.max_length" in message
    assert "integer" in message
    assert "abc" in message


def test_wrong_type_of_boolean():
    config = base_config()
    config["student"]["trust_remote_code"] = "yes"
    message = error_of(config)
    assert "student.trust_remote_code" in message
    assert "true or false" in message


def test_wrong_enum_value():
    config = base_config()
    config["data"]["format"] = "csv"
    message = error_of(config)
    assert "data.format" in message
    assert "csv" in message
    for allowed in ("auto", "pairs", "messages", "hh"):
        assert allowed in message


def test_value_below_minimum():
    config = base_config()
    config["tokenize"]["shards"] = 0
    message = error_of(config)
    assert "tokenize.shards" in message
    assert ">= 1" in message


def test_bad_experiment_name():
    config = base_config()
    config["experiment"] = "../escape"
    message = error_of(config)
    assert "experiment" in message
    assert "pattern" in message


@pytest.mark.parametrize(
    "path",
    [("tokenize", "max_prompt_length"), ("teacher", "tokenizer"), ("data", "source"), ("student",), ("experiment",)],
    ids=lambda p: ".".join(p),
)
def test_missing_required_key(path):
    config = base_config()
    parent = config
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    message = error_of(config)
    assert ".".join(path) in message
    assert "required" in message


@pytest.mark.parametrize("prompt", [256, 300])
def test_prompt_not_shorter_than_sequence(prompt):
    config = base_config()
    config["tokenize"]["max_length"] = 256
    config["tokenize"]["max_prompt_length"] = prompt
    message = error_of(config)
    assert "tokenize.max_prompt_length" in message
    assert "tokenize.max_length" in message
    assert "256" in message  # the limit it must stay under


def test_fractions_leave_training_rows():
    config = base_config()
    config["data"]["valid_fraction"] = 0.5
    config["data"]["test_fraction"] = 0.5
    message = error_of(config)
    assert "data.valid_fraction" in message and "data.test_fraction" in message


def test_empty_config():
    with pytest.raises(PrefkdError) as info:
        validate_config({})
    assert_one_sentence(str(info.value))
    assert "--configfile" in str(info.value)


def test_validation_does_not_modify_its_input():
    config = base_config()
    before = copy.deepcopy(config)
    validate_config(config, DEFAULT_SCHEMA)
    assert config == before


# ---------------------------------------------------------------------------------------------------------
# The same sentence from a real `snakemake -n`, without a traceback
# ---------------------------------------------------------------------------------------------------------


def test_snakemake_stops_with_the_sentence(tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "workflow", project / "workflow")
    shutil.copy(REPO / "config.yaml", project / "config.yaml")
    bad = base_config()
    bad["tokenize"]["max_lenght"] = bad["tokenize"].pop("max_length")
    (project / "bad.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", "bad.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "prefkd config error: config key 'tokenize.max_lenght' is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (project / "results").exists()


# ---------------------------------------------------------------------------------------------------------
# Errors found when the DAG is built, not hours later in a job (issue 10, item 6)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", [("distill", "lr"), ("sft", "teacher", "epochs"), ("signals", "k")], ids=".".join)
def test_non_finite_numbers_are_refused(path, value):
    config = base_config()
    parent = config
    for part in path[:-1]:
        parent = parent.setdefault(part, {})
    parent[path[-1]] = value
    message = error_of(config)
    assert ".".join(path) in message and "finite" in message


def test_clamp_bounds_must_be_ordered():
    config = base_config()
    config.setdefault("signals", {}).update(lower=2.0, upper=1.0)
    message = error_of(config)
    assert "signals.lower" in message and "signals.upper" in message


@pytest.mark.parametrize("name", ["abc\n", "abc\n\n", "a\nb"])
def test_experiment_name_must_match_whole(name):
    config = base_config()
    config["experiment"] = name
    assert "experiment" in error_of(config)


def _dry_run(tmp_path: Path, config: dict, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`snakemake -n` of ``config`` in a copy of the project: the DAG is built, nothing runs."""
    project = tmp_path / "project"
    for name in ("workflow", "configs"):
        shutil.copytree(REPO / name, project / name)
    shutil.copy(REPO / "config.yaml", project / "config.yaml")
    (project / "x.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HOME=str(tmp_path / "hf")
    )
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", "x.yaml"]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=180)


def _set(config: dict, dotted: str, value) -> dict:
    parent = config
    *head, last = dotted.split(".")
    for part in head:
        parent = parent.setdefault(part, {})
    parent[last] = value
    return config


LATE_ERRORS = {
    "unknown builtin model": ("teacher.model", "builtin:tiny-gpt9", "builtin:tiny-gpt9"),
    "unknown builtin tokenizer": ("student.tokenizer", "builtin:qwen9", "builtin:qwen9"),
    "uncached hub model offline": ("teacher.model", "nobody/no-such-model-7b", "nobody/no-such-model-7b"),
    "uncached hub tokenizer offline": ("student.tokenizer", "nobody/no-such-tokenizer", "nobody/no-such-tokenizer"),
    "missing data file": ("data.source", "data/missing.jsonl", "data/missing.jsonl"),
    "missing accelerate config": ("resources.teacher.accelerate", "configs/accelerate/nope.yaml", "nope.yaml"),
    "unknown accelerate name": ("resources.student.accelerate", "zero9", "zero9"),
    "accelerate moved out of train": ("train.accelerate", "single", "resources.teacher.accelerate"),
    "GPUs for a one-process config": ("resources.teacher", {"gpus": 2}, "resources.teacher"),
    "fewer processes than GPUs": ("resources.student", {"gpus": 4, "accelerate": "ddp", "processes": 2}, "4 GPU"),
    "processes for a one-process config": ("resources.student", {"processes": 2}, "distributed_type NO"),
    "unknown lm-eval task": (
        "evaluation.suites",
        {"s": {"tasks": [{"task": "no_such_task_xyz"}]}},
        "no_such_task_xyz",
    ),
    "uncached reward judge offline": (
        "evaluation.reward.judge",
        "nobody/no-such-reward-model",
        "nobody/no-such-reward-model",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LATE_ERRORS))
def test_dry_run_stops_with_one_sentence(tmp_path: Path, case: str):
    key, value, named = LATE_ERRORS[case]
    proc = _dry_run(tmp_path, _set(base_config(), key, value))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("prefkd config error:")]
    assert len(lines) == 1, out[-2000:]
    assert named in lines[0]
    assert_one_sentence(lines[0].removeprefix("prefkd config error:").strip())


@pytest.mark.slow
def test_dry_run_accepts_a_cached_hub_model_offline(tmp_path: Path):
    """An HF id found in the local Hugging Face cache passes the offline check."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "tokenizer.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    config = _set(base_config(), "teacher.model", "someone/tiny")
    proc = _dry_run(tmp_path, config)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_seeds_must_hold_the_experiment_seed():
    config = base_config()
    config["seeds"] = [2, 3]
    message = error_of(config)
    assert_one_sentence(message)
    assert "'seeds' must hold the experiment's seed (1)" in message
    config["seed"] = 2
    assert validate_config(config)["seeds"] == [2, 3]
    assert validate_config(base_config())["seeds"] is None  # one seed: the experiment's


def test_per_method_learning_rates_name_trained_methods():
    config = base_config()
    config["distill"] = {"methods": ["sft", "dpo"], "lrs": {"ctpd": 1e-4}}
    message = error_of(config)
    assert_one_sentence(message)
    assert "'distill.lrs' names ctpd, which distill.methods does not train" in message
    config["distill"]["lrs"] = {"dpo": 0}
    assert error_of(config) == "config key 'distill.lrs.dpo' must be > 0, got 0."
    config["distill"] = {"methods": ["all"], "lrs": {"ctpd": 1e-4}, "lr_grid": [1e-4, 3e-4]}
    assert validate_config(config)["distill"]["lr_grid"] == [1e-4, 3e-4]
