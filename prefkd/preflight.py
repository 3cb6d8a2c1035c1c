"""Checks of a validated config against this machine, run when the workflow builds its DAG.

The schema (``prefkd.io.config``) checks a config's shape; this module checks what it names: builtin
models and tokenizers exist, local files exist, Hugging Face ids are in the local cache when the hub is
offline, the accelerate config exists, lm-eval knows every task, the reward judge can be loaded. So
``snakemake -n`` stops with one sentence instead of a job failing hours later. What can only be known at
run time (a hub download while online, a GPU) is left to the start of its job.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefkd.assets.models import BUILTIN_MODELS
from prefkd.assets.tokenizers import BUILTIN
from prefkd.core.layout import ROLES
from prefkd.data.prepare import LOCAL_SUFFIXES
from prefkd.errors import PrefkdError
from prefkd.evaluation.lmeval import LOCAL_PREFIX, TASKS_DIR, unknown_tasks
from prefkd.evaluation.settings import IMPLICIT
from prefkd.launch import TRAINING_KINDS, accelerate_settings, check_training_resources

BUILTIN_ACCELERATE = ("single", "ddp", "ddp-cpu", "zero2", "zero3", "fsdp")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(LOCAL_SUFFIXES) or spec.count("/") > 1


def _check_hub_id(spec: str, key: str, files: tuple[str, ...]) -> None:
    """A Hugging Face id must be in the local cache (one of ``files``) while the hub is offline."""
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not any(isinstance(try_to_load_from_cache(spec, name), str) for name in files):
        raise PrefkdError(
            f"config key '{key}' names the Hugging Face id {spec!r}, which is not in the local cache while "
            f"HF_HUB_OFFLINE is set; download it first (`huggingface-cli download {spec}`) or unset HF_HUB_OFFLINE."
        )


def _check_source(spec: str | None, key: str, builtin: tuple[str, ...], what: str, files: tuple[str, ...]) -> None:
    if not spec:
        return
    if spec.startswith("builtin:"):
        if spec not in builtin:
            raise PrefkdError(
                f"config key '{key}' names an unknown builtin {what} {spec!r}; the builtin ones are: {', '.join(builtin)}."
            )
        return
    if _looks_local(spec) or Path(spec).expanduser().exists():
        if not Path(spec).expanduser().exists():
            raise PrefkdError(f"config key '{key}' names the {what} {spec!r}, which does not exist.")
        return
    _check_hub_id(spec, key, files)


def check_models(config: dict) -> None:
    for role in ROLES:
        spec = config[role]
        _check_source(spec["model"], f"{role}.model", BUILTIN_MODELS, "model", ("config.json",))
        tokenizers = tuple(f"builtin:{name}" for name in BUILTIN) + ("builtin:smollm2-135m-instruct",)
        key = f"{role}.tokenizer" if spec["tokenizer"] else f"{role}.model"
        source = spec["tokenizer"] or spec["model"]
        _check_source(source, key, tokenizers, "tokenizer", ("tokenizer.json", "tokenizer_config.json"))


def check_data(config: dict) -> None:
    source = config["data"]["source"]
    if source != "demo" and _looks_local(source) and not Path(source).expanduser().exists():
        raise PrefkdError(f"config key 'data.source' names the data file {source!r}, which does not exist.")


def accelerate_config_path(name: str, project_root: Path) -> Path:
    """``resources.<teacher|student>.accelerate``: a name in configs/accelerate/ or a path to a config file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json"):
        return path if path.is_absolute() else project_root / path
    return project_root / "configs" / "accelerate" / f"{name}.yaml"


def check_accelerate(config: dict, project_root: Path) -> None:
    """Each training kind's accelerate config exists and fits its resources (processes per GPU, nodes)."""
    for kind in TRAINING_KINDS:
        res = config["resources"][kind]
        path = accelerate_config_path(res["accelerate"], project_root)
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in (project_root / "configs" / "accelerate").glob("*.yaml")))
            raise PrefkdError(
                f"config key 'resources.{kind}.accelerate' names {res['accelerate']!r}, but {path} does not exist; "
                f"the shipped ones are: {names}."
            )
        check_training_resources(kind, res, accelerate_settings(path))


def check_tasks(config: dict) -> None:
    """Every lm-eval task or group a suite names exists (the prefkd_ ones ship with prefkd)."""
    suites = config["evaluation"]["suites"]
    tasks = {t["task"]: name for name, suite in suites.items() for t in suite["tasks"]}
    local = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    for task, suite in tasks.items():
        if task.startswith(LOCAL_PREFIX) and task not in local:
            raise PrefkdError(
                f"config key 'evaluation.suites.{suite}' names the local task {task!r}; prefkd ships: {', '.join(sorted(local))}."
            )
    harness = sorted(t for t in tasks if not t.startswith(LOCAL_PREFIX))
    if not harness:
        return
    unknown = unknown_tasks(harness)
    if unknown:
        raise PrefkdError(
            f"config key 'evaluation.suites.{tasks[unknown[0]]}' names the lm-eval task {unknown[0]!r}, "
            "which lm-eval does not know."
        )


def check_judge(config: dict) -> None:
    judge = config["evaluation"]["reward"]["judge"]
    if judge != IMPLICIT:
        _check_source(judge, "evaluation.reward.judge", (), "reward model", ("config.json",))


def check_environment(config: dict, project_root: Path) -> None:
    """All checks of a validated config against this machine; the first problem raises PrefkdError."""
    check_data(config)
    check_models(config)
    if config["teacher"]["model"] and config["student"]["model"]:
        check_accelerate(config, project_root)
        evaluation = config["evaluation"]
        if evaluation["enabled"]:
            check_tasks(config)
            if evaluation["reward"]["enabled"]:
                check_judge(config)
