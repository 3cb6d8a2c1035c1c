"""Settings of the training stages, one dataclass per stage (prefkd.core.settings generates their CLI).

They live here, not beside the engine, because the engine imports torch and the workflow reads these
classes (and the config keys they name) when it builds the DAG.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from prefkd.core.layout import ROLES, UNITS
from prefkd.core.settings import setting
from prefkd.core.weights import AGGREGATIONS, CONTRASTS, NORMALIZATIONS, TRANSFORMS, WeightSpec

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")

STAGES = ("sft", "preference", "kd")
KD_NAMES = ("dskd", "uld", "mined", "cdm")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
# settings that do not change what is trained: a checkpoint taken under other values still resumes
NOT_FINGERPRINTED = (
    "out",
    "checkpoint_dir",
    "stop_after",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "keep_final_checkpoint",
)


@dataclass
class TrainSettings:
    """Settings of one training stage; they generate ``prefkd train``'s options (prefkd.core.settings)."""

    stage: str = setting(doc="stage kind: sft, preference (DPO / TIS-DPO / CTPD) or kd", choices=STAGES)
    init: str = setting(doc="model dir to start from (HF dir with tokenizer)")
    out: str = setting(doc="model dir to write")
    tokens: list[str] = setting(doc="token shards (train split)")
    role: str = setting("teacher", "whose token ids to train on", choices=ROLES)
    signals: list[str] = setting([], "signal shards with weights and reference log-probs")
    unit: str = setting("token", "units of the preference loss", choices=UNITS)
    beta: float = setting(0.1, "beta of the preference loss")
    lr: float = setting(1e-5, "peak learning rate")
    lr_from: str | None = setting(None, "take the peak learning rate from a learning-rate search's selected.json")
    epochs: float = setting(1.0, "passes over the data (a fraction stops part-way)")
    batch_size: int = setting(8, "pairs (or SFT sequences) per device and micro-batch", config="train.batch_size")
    grad_accum: int = setting(1, "micro-batches per optimizer step", config="train.grad_accum")
    warmup_ratio: float = setting(0.1, "share of the optimizer steps spent warming up", config="train.warmup_ratio")
    weight_decay: float = setting(0.0, "AdamW weight decay of the weight matrices", config="train.weight_decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: no clipping)", config="train.max_grad_norm")
    scheduler: str = setting("cosine", "learning-rate schedule", choices=SCHEDULERS, config="train.scheduler")
    seed: int = setting(1, "seed of the data order and of new parameters", config="seed")
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward", config="train.gradient_checkpointing"
    )
    dtype: str = setting("float32", "dtype the model is loaded and trained in", choices=DTYPES, config="{role}.dtype")
    attn_implementation: str = setting(
        "auto",
        "attention kernel (auto: flash_attention_2 when installed on a GPU, else sdpa)",
        choices=ATTN_IMPLEMENTATIONS,
        config="{role}.attn_implementation",
    )
    checkpoint_dir: str | None = setting(None, "resumable checkpoints and the log (default: <out>.checkpoints)")
    save_every: int = setting(
        0, "optimizer steps between resumable checkpoints (0: none while the stage runs)", config="train.save_every"
    )
    keep_checkpoints: int = setting(1, "checkpoints kept while the stage runs (0: all)")
    keep_final_checkpoint: bool = setting(
        False, "keep a checkpoint (optimizer state included) of the finished stage; else its checkpoints are removed"
    )
    log_every: int = setting(1, "optimizer steps per metrics.jsonl row")
    stop_after: int = setting(0, "stop (as if interrupted) after this many optimizer steps; for resume tests")
    eval_tokens: list[str] = setting([], "held-out token shards for the final preference accuracy")
    eval_signals: list[str] = setting([], "their signal shards (the reference of the implicit reward)")
    ref_signals: list[str] = setting([], "signal shards whose reference log-probs replace those of --signals")
    kd: str | None = setting(None, "online KD term on the chosen response", choices=KD_NAMES)
    kd_teacher: str | None = setting(None, "teacher model dir for --kd")
    kd_weight: float = setting(
        0.5, "kappa of a kd stage ((1 - kappa) CE + kappa KD), or alpha added to a preference loss"
    )
    temperature: float = setting(2.0, "KD temperature")

    def fingerprint(self) -> str:
        """The settings that must match for a checkpoint to be resumed (the engine adds its inputs' contents)."""
        keep = {k: v for k, v in asdict(self).items() if k not in NOT_FINGERPRINTED}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(kw_only=True)
class SignalSettings:
    """Settings of ``prefkd signals`` (one signal shard); they generate its options (prefkd.core.settings)."""

    tokens: list[str] = setting(doc="token shards (a job walks them with each model loaded once)")
    out: list[str] = setting(doc="signal shards to write, one per --tokens shard")
    role: str = setting("teacher", "whose ids every model scores", choices=ROLES)
    unit: str = setting("span", "units of the weights and log-probs: aligned spans or tokens", choices=UNITS)
    reference: str = setting(doc="reference model dir (its unit log-probs are stored)")
    ref_role: str | None = setting(None, "override --role for the reference model", choices=ROLES)
    pos: str | None = setting(None, "positive contrastive model dir (pi+)")
    pos_role: str | None = setting(None, "override --role for the pos model", choices=ROLES)
    neg: str | None = setting(None, "negative contrastive model dir (pi-)")
    neg_role: str | None = setting(None, "override --role for the neg model", choices=ROLES)
    transform: str = setting(
        "ctpd", "weights from deltas (see prefkd.core.weights)", choices=TRANSFORMS, config="signals.transform"
    )
    aggregation: str = setting(
        "sum", "delta of a unit: sum or mean over its tokens", choices=AGGREGATIONS, config="signals.aggregation"
    )
    k: float = setting(1.0, "scale of every weight", config="signals.k")
    lower: float = setting(-0.5, "L of the clamp", config="signals.lower")
    upper: float = setting(1.5, "U of the clamp", config="signals.upper")
    threshold: float = setting(
        0.1, "|delta| below this counts as no evidence (threshold transforms)", config="signals.threshold"
    )
    top_fraction: float = setting(
        0.3, "binary_top: share of units that get the high weight", config="signals.top_fraction"
    )
    seed: int = setting(1, "seed of the random transform", config="seed")
    eos_weight: float | None = setting(
        None, "weight of the EOS unit (TIS-DPO's code: 0); unset: the transform weighs it like any unit"
    )
    normalize: str = setting(
        "none",
        "mean: scale each response's weights to mean 1 (k = M / sum w)",
        choices=NORMALIZATIONS,
        config="signals.normalize",
    )
    contrast: str = setting(
        "models",
        "models: delta = l_pos - l_neg on each response; sides (CTPD-Lite): delta = l_ref(chosen span i) -"
        " l_ref(rejected span i), no pos/neg models",
        choices=CONTRASTS,
    )
    batch_size: int = setting(8, "pairs per scoring batch", config="signals.batch_size")
    dtype: str = setting("float32", "dtype the scoring models are loaded in", choices=DTYPES, config="signals.dtype")

    def spec(self) -> WeightSpec:
        return WeightSpec(
            self.transform,
            self.aggregation,
            self.k,
            self.lower,
            self.upper,
            self.threshold,
            self.top_fraction,
            self.seed,
            eos_weight=self.eos_weight,
            contrast=self.contrast,
            normalize=self.normalize,
        )

    def roles(self) -> dict[str, str]:
        """The role overrides given ({"ref"|"pos"|"neg": role})."""
        given = {"ref": self.ref_role, "pos": self.pos_role, "neg": self.neg_role}
        return {name: role for name, role in given.items() if role}


@dataclass
class WeightsStatsSettings:
    """Settings of ``prefkd weights-stats``."""

    out: str = setting(doc="weights report (json)")
    shards: list[str] = setting(doc="SET=SHARD.arrow items (SET names the signal set)")
