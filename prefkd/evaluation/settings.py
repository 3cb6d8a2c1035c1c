"""Settings of the evaluation stages, one dataclass per stage (prefkd.core.settings generates their CLI).

They live here, not beside their ``run`` functions, because those modules import torch and the workflow
reads these classes when it builds the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefkd.core.layout import ROLES
from prefkd.core.settings import setting

IMPLICIT = "implicit"  # the judge that needs no reward model: the teacher pair's log pi+ - log pi-


@dataclass(kw_only=True)
class LmEvalSettings:
    """Settings of ``prefkd lm-eval``: one model on one benchmark suite."""

    model: Path = setting(doc="HF model dir to evaluate")
    name: str = setting(doc="model name for the report, e.g. student-ctpd")
    suite_name: str = setting(doc="suite name, e.g. openllm")
    suite: str = setting(
        doc="the suite as JSON: {tasks: [{task, num_fewshot, metric, label}], apply_chat_template, limit, ...}"
    )
    task_data: Path | None = setting(None, "folder written by `prefkd eval-data` (local prefkd_ tasks)")
    seed: int = setting(1, "seed of lm-eval's sampling and few-shot examples", config="seed")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", config="evaluation.device")
    out: Path = setting(doc="<suite>.json to write")


@dataclass(kw_only=True)
class EvalDataSettings:
    """Settings of ``prefkd eval-data``: the demo's local lm-eval tasks from the held-out split."""

    data: Path = setting(doc="held-out split (data/test.parquet)")
    out: Path = setting(doc="folder for the local tasks' JSONL files")
    seed: int = setting(1, "seed of the chosen answer's position in the multiple-choice task", config="seed")


@dataclass(kw_only=True)
class PreferenceEvalSettings:
    """Settings of ``prefkd preference-eval``: held-out preference accuracy and margin of one model."""

    model: Path = setting(doc="HF model dir to evaluate")
    name: str = setting(doc="model name for the report, e.g. student-ctpd")
    role: str = setting(doc="whose token ids the model reads", choices=ROLES)
    tokens: list[Path] = setting(doc="held-out token shards")
    ref_signals: list[Path] = setting(doc="dpo-ref-<role> signal shards of the same split")
    reference_name: str = setting("", "name of the reference model, recorded in the output")
    beta: float = setting(0.1, "beta of the implicit reward beta * (log pi - log pi_ref)", config="evaluation.beta")
    batch_size: int = setting(8, "pairs per forward pass", config="evaluation.batch_size")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", config="evaluation.device")
    out: Path = setting(doc="preference.json to write")


@dataclass(kw_only=True)
class ReportSettings:
    """Settings of ``prefkd report``. A list option takes all its values after one flag
    (``--suite a b``, ``--run x=DIR y=DIR``)."""

    experiment: str = setting(doc="experiment name (the report's title)", config="experiment")
    model: list[str] = setting([], "models and their eval dirs, as NAME=EVAL_DIR items")
    suite: list[str] = setting([], "benchmark suites, in config order")
    alignment: Path = setting(doc="stats/alignment.json")
    weights: Path | None = setting(None, "stats/weights.json (optional)")
    filters: Path | None = setting(None, "data/filter_report.json of the prepare stage (optional)")
    run: list[str] = setting([], "training run dirs holding metrics.jsonl, as NAME=DIR items")
    lr: list[str] = setting([], "each student method's configured learning rate, as METHOD=RATE items")
    lr_search: list[str] = setting([], "learning-rate searches, as METHOD=selected.json items")
    cost: Path | None = setting(None, "compute accounting of the run (prefkd cost's cost.json; optional)")
    out: Path = setting(doc="report.md to write")
    plots: Path = setting(doc="folder for the report's PNGs (replaced as a whole)")


@dataclass(kw_only=True)
class GenerateSettings:
    """Settings of ``prefkd generate``: one model answers held-out prompts, a judge scores the answers."""

    model: Path = setting(doc="HF model dir that answers the prompts")
    data: Path = setting(doc="prepared held-out split (test.parquet)")
    out: Path = setting(doc="generations.jsonl to write (pair_id, prompt, answer, score)")
    judge: str = setting(
        IMPLICIT,
        "'implicit' (teacher pair, needs --pos/--neg) or a reward model path / HF id",
        config="evaluation.reward.judge",
    )
    pos: Path | None = setting(None, "positive teacher model dir (pi+) of the implicit judge")
    neg: Path | None = setting(None, "negative teacher model dir (pi-) of the implicit judge")
    max_prompts: int = setting(0, "first N prompts by pair_id (0 = all)")
    max_new_tokens: int = setting(
        64, "greedy tokens generated per answer at most", config="evaluation.reward.max_new_tokens"
    )
    batch_size: int = setting(
        8, "prompts per generation batch and answers per judge batch", config="evaluation.reward.batch_size"
    )
    seed: int = setting(1, "random seed of generation", config="seed")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", config="evaluation.device")
    dtype: str = setting("float32", "weights dtype of every model", choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = setting(False, "allow custom code of the reward model (off by default)")
    allow_pickle: bool = setting(False, "allow pickled (.bin) reward-model weights (off by default)")


@dataclass(kw_only=True)
class WinrateSettings:
    """Settings of ``prefkd winrate``: a model's scored answers against a baseline's, same judge and prompts."""

    scores: Path = setting(doc="generations.jsonl of the model")
    baseline: Path = setting(doc="generations.jsonl of the baseline, same judge")
    model: str = setting(doc="model name, e.g. student-ctpd")
    baseline_name: str = setting(doc="baseline name, e.g. student-sft")
    judge_name: str = setting(doc="judge recorded in the output, e.g. implicit:teacher-pos/teacher-neg")
    out: Path = setting(doc="reward.json to write")
