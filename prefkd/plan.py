"""`prefkd plan`: before anything is submitted, the memory one GPU needs per kind of stage, and the jobs,
model loads and GPU-hours of each.

Memory is per GPU, for the largest job of a stage kind (``resources`` block of the config), in decimal GB
(1e9 bytes), against ``resources.gpu_memory_gb``:

* model states of a training job (weights, gradients, AdamW m and v), by the strategy of its accelerate
  config:

  - single / ddp: every GPU holds them all. torch's AdamW keeps m and v in the parameters' dtype and
    autocast (the accelerate config's mixed_precision) adds no copy, so 16 bytes per parameter in float32
    (4 + 4 + 8) and 8 in bfloat16 / float16 (2 + 2 + 4).
  - zero2 / zero3: DeepSpeed's own estimators without offload. ``estimate_zero2_model_states_mem_needs``:
    2 bytes per parameter of 16-bit weights on every GPU + 18 / GPUs (16- and 32-bit gradients, fp32
    master weights, Adam m and v); ``estimate_zero3_model_states_mem_needs``: 18 / GPUs + 4 bytes per
    parameter of the largest module (gathered whole). They are re-implemented below (:func:`zero2_gpu_bytes`,
    :func:`zero3_gpu_bytes`) because importing them loads torch and DeepSpeed (about 5 s on CPU); a test
    checks that both agree with DeepSpeed 0.19.
  - fsdp (full shard, decoder blocks wrapped, 16-bit compute): 16 / GPUs bytes per parameter (fp32
    parameter, gradient, m and v shards: accelerate keeps fp32 master weights) + 4 bytes (16-bit
    parameter and gradient) per parameter gathered at once: the root module's own (embeddings, head, final
    norm) and two decoder blocks (the one computing and the one prefetched).

* activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  eq. 2 without tensor parallelism): ``s*b*h*(34 + 5*a*s/h)`` bytes per layer in 16-bit. sdpa and flash
  attention never store the ``a*s^2`` attention matrix (they recompute it in backward from per-row
  statistics), so its ``5*a*s^2*b`` term counts only for eager attention. Full checkpointing (one
  checkpoint per decoder layer, what transformers' gradient checkpointing does) keeps ``2*s*b*h`` per
  layer plus one layer's activations while that layer is recomputed. With float32 compute (a float32
  model without mixed precision) every activation takes twice the bytes. ``s`` is tokenize.max_length
  (a batch is padded to its longest row, at most that); ``b`` the sequences of a micro-batch:
  train.batch_size for SFT and for the KD views of the chosen responses, twice that for a preference
  batch ([chosen; rejected]).
* logits, in float32: the engine applies the LM head LOGITS_CHUNK positions at a time
  (``prefkd.core.logprobs.model_token_logps``), so SFT, preference and scoring jobs hold
  ``min(b*s, LOGITS_CHUNK) x V``; the KD views of an online-KD stage hold ``b*s x V`` of both models and
  lm-eval ``b*s x V`` of its batch.
* an online-KD stage (``prefkd.core.methods.Method.kd``) also holds the frozen teacher (weights in the
  teacher's dtype, unsharded on every GPU) and its forward.
* inference jobs (signals, dpo_reference, lm-eval, preference-eval, generation and its judge) hold the
  weights of every model they load, in its role's dtype, plus one layer's activations, the logits and,
  when generating, the KV cache.

GPU-hours come two ways: the requested upper bound ``jobs x GPUs per node x nodes x runtime`` (jobs
counted by a Snakemake dry run), and the FLOPs (6 N per trained token, 2 N per scored token) divided by
``resources.gpu_tflops`` at an assumed MFU of 40 %.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prefkd.assets.models import TINY_ARCHS, TINY_BUILTINS
from prefkd.assets.smollm2 import SMOLLM2_SOURCE
from prefkd.core.methods import method, models_for_set, resolve_methods, signal_plan
from prefkd.core.settings import setting
from prefkd.errors import PrefkdError
from prefkd.evaluation.settings import IMPLICIT
from prefkd.io.config import REPO_ROOT, load_config
from prefkd.launch import STAGE_KINDS, accelerate_settings, process_count
from prefkd.preflight import accelerate_config_path

GB = 1e9
MFU = 0.4  # assumed model-FLOPs utilisation of the FLOPs-based GPU-hour estimate
LOGITS_CHUNK = 1024  # positions per LM-head chunk: the default `chunk` of prefkd.core.logprobs.model_token_logps
LM_EVAL_LENGTH = 2048  # tokens of an lm-eval request when its suite sets no max_length
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHARDED = ("zero2", "zero3", "fsdp")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KNOWN_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# configs/accelerate/<name>.yaml as shipped: (strategy, mixed precision)
SHIPPED_ACCELERATE = {
    "single": ("single", "no"),
    "ddp": ("ddp", "bf16"),
    "ddp-cpu": ("ddp", "no"),
    "zero2": ("zero2", "bf16"),
    "zero3": ("zero3", "bf16"),
    "fsdp": ("fsdp", "bf16"),
}

# Workflow rules and their stage kinds (sft and dpo take their role's: teacher or student).
RULE_KINDS = {
    **dict.fromkeys(
        (
            "demo_data",
            "prepare",
            "tokenizer",
            "tokenize_align",
            "alignment_stats",
            "reverse",
            "weights_stats",
            "student_sft_baseline",
            "model_init",
            "eval_task_data",
            "select_lr",
            "cost",
            "report",
        ),
        "data",
    ),
    "distill": "student",
    "distill_search": "student",
    "signals": "signals",
    "dpo_reference": "signals",
    "lm_eval": "lm_eval",
    "preference_eval": "lm_eval",
    "generate_and_score": "generate",
    "reward_winrate": "generate",
}
ROLE_RULES = ("sft", "dpo")

# config.json values of the builtin models (prefkd.assets.models builds or extracts them).
BUILTIN_CONFIGS = {
    **{f"builtin:{name}": {"model_type": arch, **TINY_ARCHS[arch]} for name, arch in TINY_BUILTINS.items()},
    SMOLLM2_SOURCE: {  # HuggingFaceTB/SmolLM2-135M-Instruct
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
}


# ---------------------------------------------------------------------------------------------------------
# Parameter counts from config.json
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only transformer (llama, mistral, qwen2, qwen3 layouts) from its config.json."""

    source: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = False
    qkv_bias: bool = False  # biases on q, k, v (Qwen2 always; llama / qwen3 with attention_bias)
    o_bias: bool = False  # bias on the output projection (llama / qwen3 with attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3's per-head RMSNorm of q and k
    labels: int = 0  # outputs of a sequence-classification head (a reward model) instead of the LM head
    max_positions: int = 0  # max_position_embeddings (0: not given)

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def head(self) -> int:
        if self.labels:
            return self.hidden * self.labels
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        """One decoder block: attention with grouped KV heads, the gated MLP and two RMSNorms."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        attention += (q + 2 * kv) * self.qkv_bias + self.hidden * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * self.hidden * self.intermediate + (2 * self.intermediate + self.hidden) * self.mlp_bias
        return attention + mlp + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.embedding + self.layers * self.layer_params + self.hidden + self.head

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder blocks: embeddings, head and the final norm."""
        return self.embedding + self.head + self.hidden

    @property
    def largest_module(self) -> int:
        """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``)."""
        q = self.heads * self.head_dim
        return max(self.embedding, self.head, self.hidden * self.intermediate, self.hidden * q + q * self.qkv_bias)


def arch_from_config(cfg: dict, source: str = "config.json") -> Arch:
    """The :class:`Arch` of a Hugging Face ``config.json`` (as a dict); a layout plan does not know is an error."""
    if not isinstance(cfg, dict):
        raise PrefkdError(f"{source} is not a JSON object, so it is not a model's config.json.")
    cfg = cfg.get("text_config") or cfg
    model_type = cfg.get("model_type")
    if model_type not in KNOWN_TYPES:
        raise PrefkdError(
            f"{source} has model_type {model_type!r}; prefkd plan counts the parameters of "
            f"{', '.join(KNOWN_TYPES)} models only."
        )
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        arch = dict(
            vocab=int(cfg["vocab_size"]),
            layers=int(cfg["num_hidden_layers"]),
            intermediate=int(cfg["intermediate_size"]),
        )
    except KeyError as exc:
        raise PrefkdError(f"{source} has no {exc.args[0]!r}, so its parameters cannot be counted.") from None
    bias = bool(cfg.get("attention_bias", False))
    classifier = any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or ())
    return Arch(
        source=source,
        hidden=hidden,
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bias,
        o_bias=bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        labels=(len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 2))) if classifier else 0,
        max_positions=int(cfg.get("max_position_embeddings") or 0),
        **arch,
    )


def parameter_count(cfg: dict) -> int:
    """Parameters of the model a ``config.json`` describes (tied embeddings counted once)."""
    return arch_from_config(cfg).params


def read_model_config(spec: str, cache_dir: str | Path | None = None) -> tuple[dict, str]:
    """(config.json as a dict, where it was read) of a model spec: a builtin, a local model dir (or its
    config.json) or a Hugging Face id found in the local cache (``cache_dir``: the hub cache, default
    huggingface_hub's). Never goes online; one sentence otherwise."""
    if spec in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[spec], spec
    if spec.startswith("builtin:"):
        raise PrefkdError(f"{spec!r} is not a builtin model; the builtin ones are: {', '.join(BUILTIN_CONFIGS)}.")
    local = Path(spec).expanduser()
    if local.exists():
        path = local / "config.json" if local.is_dir() else local
        if not path.is_file():
            raise PrefkdError(f"the model directory {local} has no config.json, so its parameters cannot be counted.")
    elif spec.startswith((".", "/", "~")):
        raise PrefkdError(f"the model directory {spec} does not exist.")
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(spec, "config.json", cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - an id the hub library refuses (bad characters, too many slashes)
            found = None
        if not isinstance(found, str):
            raise PrefkdError(
                f"the config.json of {spec} is not in the local Hugging Face cache and prefkd plan reads nothing "
                f"online; fetch it with `huggingface-cli download {spec} config.json` or name a local model dir."
            )
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except (OSError, ValueError) as exc:
        raise PrefkdError(f"{path} could not be read as JSON ({type(exc).__name__}).") from None


def model_arch(spec: str) -> Arch:
    cfg, source = read_model_config(spec)
    return arch_from_config(cfg, source)


# ---------------------------------------------------------------------------------------------------------
# Memory formulas
# ---------------------------------------------------------------------------------------------------------


def zero2_gpu_bytes(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1) -> int:
    """GPU bytes of DeepSpeed's ``estimate_zero2_model_states_mem_needs(..., cpu_offload=False)``:
    16-bit weights (2 bytes/param) on every GPU, and 16-bit gradients, fp32 gradients, fp32 master weights
    and Adam m, v (2 + 4 + 4 + 8 = 18 bytes/param) sharded over all GPUs."""
    return int(2 * total_params + int(18 * total_params / (num_gpus_per_node * num_nodes)))


def zero3_gpu_bytes(
    total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1
) -> int:
    """GPU bytes of DeepSpeed's ``estimate_zero3_model_states_mem_needs(..., cpu_offload=False)``: 18
    bytes/param sharded over all GPUs, plus the largest module gathered (4 bytes per its parameter)."""
    return int(4 * largest_layer_params + int(18 * total_params / (num_gpus_per_node * num_nodes)))


@dataclass(frozen=True)
class Strategy:
    """How a training job holds its model: single, ddp, zero2, zero3 or fsdp, over ``gpus`` processes."""

    name: str = "single"
    gpus: int = 1
    nodes: int = 1
    mixed_precision: str = "no"


def model_state_bytes(arch: Arch, strategy: Strategy, dtype: str = "float32") -> int:
    """Bytes per GPU of the weights, gradients and AdamW states of a trained model (see the module doc)."""
    n, g = arch.params, max(strategy.gpus, 1)
    if strategy.name in ("single", "ddp"):
        return 4 * DTYPE_BYTES[dtype] * n
    if strategy.name == "zero2":
        return zero2_gpu_bytes(n, g // strategy.nodes, strategy.nodes)
    if strategy.name == "zero3":
        return zero3_gpu_bytes(n, arch.largest_module, g // strategy.nodes, strategy.nodes)
    if strategy.name == "fsdp":
        return int(16 * n / g) + 4 * (arch.root_params + 2 * arch.layer_params)
    raise PrefkdError(
        f"unknown training strategy {strategy.name!r}; plan knows {', '.join(('single', 'ddp', *SHARDED))}."
    )


def compute_bytes(dtype: str, mixed_precision: str = "no") -> int:
    """Bytes of one activation: 2 when the model is 16-bit or runs under 16-bit mixed precision, else 4."""
    return 2 if DTYPE_BYTES[dtype] == 2 or mixed_precision in ("bf16", "fp16") else 4


def activation_bytes(
    arch: Arch, seqs: int, length: int, checkpointing: bool = False, eager: bool = False, nbytes: int = 2
) -> int:
    """Activations a training forward keeps for backward (Korthikanti et al. 2022; see the module doc)."""
    s, b, h = length, seqs, arch.hidden
    layer = s * b * h * 34 + (5 * arch.heads * s * s * b if eager else 0)
    kept = arch.layers * 2 * s * b * h + layer if checkpointing else arch.layers * layer
    return kept * nbytes // 2


def logits_bytes(positions: int, vocab: int) -> int:
    """One float32 [positions, vocab] tensor of logits."""
    return 4 * positions * vocab


def kv_cache_bytes(arch: Arch, seqs: int, tokens: int, nbytes: int) -> int:
    """Keys and values of every layer for ``seqs`` sequences of ``tokens`` tokens."""
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * seqs * tokens * nbytes


def forward_bytes(arch: Arch, seqs: int, length: int, eager: bool = False, nbytes: int = 2) -> int:
    """A forward without gradients keeps about one layer's activations at a time."""
    return activation_bytes(replace(arch, layers=1), seqs, length, False, eager, nbytes)


# ---------------------------------------------------------------------------------------------------------
# The jobs of a config: what one job of each kind holds
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingCase:
    """One kind of training job (teacher SFT, a DPO pair, a distillation method, ...) and what its memory
    per GPU depends on."""

    stage: str  # teacher | student
    job: str
    arch: Arch
    dtype: str
    strategy: Strategy
    batch_size: int  # pairs (or SFT sequences) per GPU and micro-batch
    length: int
    checkpointing: bool = False
    eager: bool = False
    pair: bool = False  # a preference batch: [chosen; rejected]
    kd: bool = False  # an online KD term on the chosen responses (the frozen teacher is loaded)
    kd_only: bool = False  # a KD stage: only the KD views, no SFT or preference batch
    kd_arch: Arch | None = None
    kd_dtype: str = "float32"
    epochs: float = 1.0  # over all jobs of this kind (a DPO pair: pi+ epochs + pi- epochs)


def training_memory(c: TrainingCase) -> dict[str, int]:
    """Bytes per GPU: ``states`` (weights, gradients, Adam m and v), ``frozen`` (the KD teacher's weights)
    and ``activations`` (kept activations and logits of both models)."""
    nbytes = compute_bytes(c.dtype, c.strategy.mixed_precision)
    seqs = 0 if c.kd_only else c.batch_size * (2 if c.pair else 1)
    kd_seqs = c.batch_size if c.kd else 0
    act = activation_bytes(c.arch, seqs + kd_seqs, c.length, c.checkpointing, c.eager, nbytes)
    act += logits_bytes(min(seqs * c.length, LOGITS_CHUNK) + kd_seqs * c.length, c.arch.vocab)
    frozen = 0
    if c.kd and c.kd_arch is not None:
        frozen = DTYPE_BYTES[c.kd_dtype] * c.kd_arch.params
        kd_nbytes = compute_bytes(c.kd_dtype, c.strategy.mixed_precision)
        act += forward_bytes(c.kd_arch, kd_seqs, c.length, c.eager, kd_nbytes)
        act += logits_bytes(kd_seqs * c.length, c.kd_arch.vocab)
    return {"states": model_state_bytes(c.arch, c.strategy, c.dtype), "frozen": frozen, "activations": act}


def training_flops(c: TrainingCase, train_pairs: float) -> float:
    """6 N per trained token (2 forward + 4 backward) and 2 N per token of the frozen teacher's forward."""
    per_pair = (0 if c.kd_only else 2 if c.pair else 1) + (1 if c.kd else 0)
    tokens = train_pairs * c.length * c.epochs
    teacher = 2 * c.kd_arch.params * tokens if c.kd and c.kd_arch is not None else 0
    return 6 * c.arch.params * tokens * per_pair + teacher


@dataclass(frozen=True)
class InferenceCase:
    """One kind of scoring or generation job: the models it loads (all at once, or one after another) and its
    batches."""

    stage: str  # signals | lm_eval | generate
    job: str
    models: tuple[tuple[str, Arch, str], ...]  # (role, arch, dtype); a generating model comes first
    batch_size: int
    batch_key: str  # the config key of batch_size
    length: int
    per_item: int = 1  # sequences per batch item (2 for a pair)
    eager: bool = False
    full_logits: bool = False  # lm-eval: the logits of the whole batch (else one LM-head chunk)
    generate: bool = False  # the first model generates: its KV cache over `length` tokens
    dtype_key: str = ""  # the config key of the models' dtype when the stage has its own (else <role>.dtype)
    one_at_a_time: bool = False  # signals: each model scores every shard of the job, then is freed


def inference_memory(c: InferenceCase) -> dict[str, int]:
    """Bytes on the one GPU of the job: ``states`` (weights of every model) and ``activations``."""
    seqs = c.batch_size * c.per_item
    sizes = [DTYPE_BYTES[dtype] * arch.params for _, arch, dtype in c.models]
    weights = max(sizes, default=0) if c.one_at_a_time else sum(sizes)
    peaks = []
    for _, arch, dtype in c.models:
        positions = seqs * c.length if c.full_logits else min(seqs * c.length, LOGITS_CHUNK)
        peaks.append(
            forward_bytes(arch, seqs, c.length, c.eager, DTYPE_BYTES[dtype]) + logits_bytes(positions, arch.vocab)
        )
    act = max(peaks, default=0)
    if c.generate and c.models:
        _, arch, dtype = c.models[0]
        act += kv_cache_bytes(arch, seqs, c.length, DTYPE_BYTES[dtype])
    return {"states": weights, "frozen": 0, "activations": act}


def stage_resources(config: dict, kind: str) -> dict:
    """The ``resources.<kind>`` block of a validated config (the schema fills its defaults)."""
    return config["resources"][kind]


def gpu_settings(config: dict) -> tuple[float, float]:
    """(memory of one GPU in GB, its peak bf16 TFLOP/s) from the config's resources."""
    return float(config["resources"]["gpu_memory_gb"]), float(config["resources"]["gpu_tflops"])


def job_gpus(res: dict) -> int:
    """GPUs of one job over all its nodes (0 for a CPU job)."""
    return int(res["gpus"]) * int(res["nodes"])


def training_strategy(res: dict, project_root: Path) -> Strategy:
    """The strategy of a training kind's accelerate config (``resources.<kind>.accelerate``)."""
    name = res["accelerate"]
    path = accelerate_config_path(name, project_root)
    if path.is_file():
        strategy, mixed = accelerate_strategy(accelerate_settings(path), path)
    elif name in SHIPPED_ACCELERATE:  # a tree without configs/accelerate/ (an installed package)
        strategy, mixed = SHIPPED_ACCELERATE[name]
    else:
        raise PrefkdError(f"the accelerate config {path} does not exist.")
    return Strategy(strategy, process_count(res), int(res["nodes"]), mixed)


def accelerate_strategy(acc: dict, path: Path | str = "the accelerate config") -> tuple[str, str]:
    """(strategy, mixed precision) of an accelerate config's settings."""
    kind = str(acc.get("distributed_type", "NO"))
    if kind == "DEEPSPEED":
        stage = int((acc.get("deepspeed_config") or {}).get("zero_stage", 0))
        if stage not in (2, 3):
            raise PrefkdError(f"{path} uses ZeRO stage {stage}; prefkd plan estimates ZeRO stages 2 and 3.")
        strategy = f"zero{stage}"
    else:
        strategy = {"NO": "single", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "FSDP": "fsdp"}.get(kind, "")
        if not strategy:
            raise PrefkdError(f"{path} has distributed_type {kind}, which prefkd plan does not estimate.")
    return strategy, str(acc.get("mixed_precision", "no"))


def _role_settings(config: dict, role: str) -> tuple[str, bool]:
    """(dtype, eager attention) of a role's models."""
    spec = config[role]
    return spec.get("dtype", "float32"), spec.get("attn_implementation", "auto") == "eager"


def student_runs(config: dict, name: str) -> int:
    """Training runs of a student method: one per seed, and a searched method's seed `seed` once per rate."""
    seeds = len(config.get("seeds") or [config["seed"]])
    d = config["distill"]
    searched = bool(d.get("lr_grid")) and name not in d.get("lrs", {})
    return (len(d["lr_grid"]) if searched else 1) + seeds - 1


def training_cases(config: dict, role: str, archs: dict, project_root: Path) -> list[TrainingCase]:
    """Every kind of training job of ``role``: its SFT, its contrastive pair, and (student) every method."""
    train, contrastive = config["train"], config["contrastive"]
    dtype, eager = _role_settings(config, role)
    base = TrainingCase(
        stage=role,
        job="sft",
        arch=archs[role],
        dtype=dtype,
        strategy=training_strategy(stage_resources(config, role), project_root),
        batch_size=train["batch_size"],
        length=config["tokenize"]["max_length"],
        checkpointing=bool(train.get("gradient_checkpointing", False)),
        eager=eager,
        epochs=config["sft"][role]["epochs"],
    )
    cases = [base] if config["sft"][role]["enabled"] else []
    if role == "teacher" or contrastive["student_pair"]:
        if contrastive["construction"] == "dpo":  # pi+ and pi-
            epochs = contrastive["pos"]["epochs"] + contrastive["neg"]["epochs"]
            cases.append(replace(base, job="dpo", pair=True, epochs=epochs))
        else:  # pi+ is the SFT model, pi- an SFT on the rejected responses
            cases.append(replace(base, job="sft-rejected"))
    if role == "student":
        d = config["distill"]
        teacher_dtype, _ = _role_settings(config, "teacher")
        for name in resolve_methods(d["methods"]):
            m = method(name)
            if m.kind == "sft":
                continue
            kd = dict(kd=bool(m.kd), kd_only=m.kind == "kd", kd_arch=archs.get("teacher"), kd_dtype=teacher_dtype)
            epochs = d["epochs"] * student_runs(config, name)  # every seed and every rate of a search
            cases.append(replace(base, job=f"distill {name}", pair=m.kind == "preference", epochs=epochs, **kd))
    return cases


def inference_cases(config: dict, archs: dict) -> list[InferenceCase]:
    """Every kind of scoring and generation job: signal sets, DPO references, evaluation, generation."""
    cases = signal_cases(config, archs)
    evaluation = config["evaluation"]
    if not evaluation["enabled"]:
        return cases
    length = config["tokenize"]["max_length"]
    for role in ("teacher", "student"):
        dtype, eager = _role_settings(config, role)
        model = ((role, archs.get(role), dtype),)
        for name, suite in evaluation["suites"].items():
            key, batch = f"evaluation.suites.{name}.batch_size", suite.get("batch_size", 8)
            lm_length = suite.get("max_length") or min(
                LM_EVAL_LENGTH, getattr(archs.get(role), "max_positions", 0) or LM_EVAL_LENGTH
            )
            job = f"lm-eval {name} ({role})"
            cases.append(InferenceCase("lm_eval", job, model, batch, key, lm_length, 1, eager, full_logits=True))
        batch, key = evaluation["batch_size"], "evaluation.batch_size"
        cases.append(InferenceCase("lm_eval", f"preference-eval ({role})", model, batch, key, length, 2, eager))
    reward = evaluation["reward"]
    if reward["enabled"]:
        cases.append(generate_case(config, archs))
    return cases


def signal_cases(config: dict, archs: dict) -> list[InferenceCase]:
    plan = signal_plan(resolve_methods(config["distill"]["methods"]), config["signals"]["reference"])
    batch, length = config["signals"]["batch_size"], config["tokenize"]["max_length"]
    dtype = config["signals"].get("dtype")  # the scoring dtype (else each role's)
    sets = {name: models_for_set(name, plan) for name in plan}
    if config["contrastive"]["construction"] == "dpo":
        sets["dpo-ref-teacher"] = ["teacher-sft"]
    sets["dpo-ref-student"] = ["student-sft"]
    cases = []
    for name, keys in sets.items():
        roles = [key.partition("-")[0] for key in keys]
        models = tuple((role, archs.get(role), dtype or _role_settings(config, role)[0]) for role in roles)
        eager = any(_role_settings(config, role)[1] for role in roles)
        case = InferenceCase("signals", f"signals {name}", models, batch, "signals.batch_size", length, 2, eager)
        cases.append(replace(case, dtype_key="signals.dtype" if dtype else "", one_at_a_time=True))
    return cases


def generate_case(config: dict, archs: dict) -> InferenceCase:
    """A student answers held-out prompts (KV cache over prompt + answer), the judge scores the answers."""
    reward = config["evaluation"]["reward"]
    dtype, eager = _role_settings(config, "student")
    teacher_dtype, _ = _role_settings(config, "teacher")
    models = [("student", archs.get("student"), dtype)]
    if reward["judge"] == IMPLICIT:
        models += [("teacher", archs.get("teacher"), teacher_dtype)] * 2
    else:
        models.append(("judge", archs.get("judge"), dtype))
    length = config["tokenize"]["max_prompt_length"] + reward["max_new_tokens"]
    batch = reward["batch_size"]
    return InferenceCase(
        "generate",
        "generate + judge",
        tuple(models),
        batch,
        "evaluation.reward.batch_size",
        length,
        1,
        eager,
        generate=True,
    )


def pair_counts(config: dict, project_root: Path) -> dict[str, float] | None:
    """Pairs per split: data.max_pairs, the demo's demo_pairs, or the rows of prepared data; None if unknown."""
    data = config["data"]
    total = data.get("max_pairs") or (data.get("demo_pairs") if data["source"] == "demo" else None)
    if total is None:
        prepared = project_root / "results" / config["experiment"] / "data"
        if all((prepared / f"{s}.parquet").is_file() for s in ("train", "valid", "test")):
            import pyarrow.parquet as pq

            return {
                s: float(pq.ParquetFile(prepared / f"{s}.parquet").metadata.num_rows)
                for s in ("train", "valid", "test")
            }
        return None
    valid, test = data.get("valid_fraction", 0.05), data.get("test_fraction", 0.1)
    return {"train": total * (1 - valid - test), "valid": total * valid, "test": total * test}


def inference_flops(config: dict, archs: dict, pairs: dict[str, float]) -> dict[str, float]:
    """FLOPs of the scoring stages (2 N per token): signal sets and DPO references over every split,
    preference-eval over the test split of every evaluated model, generation and judging of the answers.
    lm-eval's benchmarks are not counted (their token counts are the harness's)."""
    all_pairs, length = sum(pairs.values()), config["tokenize"]["max_length"]
    flops: Counter = Counter()
    for case in signal_cases(config, archs):
        flops["signals"] += sum(2 * arch.params * all_pairs * 2 * length for _, arch, _ in case.models)
    evaluation = config["evaluation"]
    if not evaluation["enabled"]:
        return dict(flops)
    seeds = len(config.get("seeds") or [config["seed"]])
    methods = [m for m in resolve_methods(config["distill"]["methods"]) if m != "sft"] * seeds  # each seed's run
    teachers = 2 if config["contrastive"]["construction"] == "dpo" else 1
    for role, count in (("teacher", teachers), ("student", 1 + len(methods))):
        flops["lm_eval"] += count * 2 * archs[role].params * pairs["test"] * 2 * length
    reward = evaluation["reward"]
    if reward["enabled"]:
        case = generate_case(config, archs)
        prompts = min(reward["max_prompts"] or pairs["test"], pairs["test"])
        answer = 2 * archs["student"].params * reward["max_new_tokens"]
        judge = sum(2 * arch.params * case.length for _, arch, _ in case.models[1:])
        flops["generate"] += (1 + len(methods)) * prompts * (answer + judge)
    return dict(flops)


# ---------------------------------------------------------------------------------------------------------
# Does it fit, and what would
# ---------------------------------------------------------------------------------------------------------


def memory_of(case: TrainingCase | InferenceCase) -> dict[str, int]:
    return training_memory(case) if isinstance(case, TrainingCase) else inference_memory(case)


def total_bytes(case: TrainingCase | InferenceCase) -> int:
    return sum(memory_of(case).values())


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _strategies_at(current: Strategy, gpus: int) -> list[Strategy]:
    """The strategies worth trying on ``gpus`` GPUs: the current one (a sharded one on any count), then the
    other sharded ones as shipped in configs/accelerate/ (bf16 mixed precision)."""
    out = []
    if gpus == max(current.gpus, 1):
        out.append(current)
    elif current.name in SHARDED:
        out.append(replace(current, gpus=gpus, nodes=1))
    if gpus > 1:
        out += [Strategy(n, gpus, 1, SHIPPED_ACCELERATE[n][1]) for n in SHARDED if n != current.name]
    return out


def training_fix(case: TrainingCase, budget: float) -> TrainingCase | None:
    """The first setting that fits ``budget`` bytes: the fewest GPUs, then the current strategy before the
    others, then the largest batch, without gradient checkpointing before with it."""
    counts = sorted({*GPU_COUNTS, max(case.strategy.gpus, 1)})
    for gpus in counts:
        for strategy in _strategies_at(case.strategy, gpus):
            for batch in _halvings(case.batch_size):
                for checkpointing in dict.fromkeys((case.checkpointing, True)):
                    candidate = replace(case, strategy=strategy, checkpointing=checkpointing, batch_size=batch)
                    if total_bytes(candidate) <= budget:
                        return candidate
    return None


def inference_fix(case: InferenceCase, budget: float) -> tuple[InferenceCase | None, list[str]]:
    """A smaller batch, then 16-bit weights for float32 roles; (the fitting case, the roles set to bfloat16)."""
    wide = sorted(
        {role for role, _, dtype in case.models if DTYPE_BYTES[dtype] == 4 and role in ("teacher", "student")}
    )
    narrow = tuple((role, arch, "bfloat16" if role in wide else dtype) for role, arch, dtype in case.models)
    for models, changed in ((case.models, []), (narrow, wide)):
        for batch in _halvings(case.batch_size):
            candidate = replace(case, models=models, batch_size=batch)
            if total_bytes(candidate) <= budget:
                return candidate, changed
    return None, wide


def _gb(n: float) -> str:
    return f"{n / GB:.0f}" if n >= 10 * GB else f"{n / GB:.1f}"


def _listing(parts: list[str]) -> str:
    """a, b and c."""
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)


def _gpus_phrase(n: int, memory_gb: float) -> str:
    return f"1 GPU of {memory_gb:g} GB" if n <= 1 else f"{n} GPUs of {memory_gb:g} GB each"


def training_problem(case: TrainingCase, memory_gb: float) -> str:
    """One sentence: what the job needs, on how many GPUs of what size, and the setting that would fit."""
    m = training_memory(case)
    frozen = f", {_gb(m['frozen'])} GB for the frozen KD teacher" if m["frozen"] else ""
    how = f"{case.strategy.name}, {case.dtype}"
    need = (
        f"{case.stage} training ({case.job}): {case.arch.params / 1e9:.1f}B parameters need about "
        f"{_gb(m['states'])} GB for weights, gradients and Adam states ({how}){frozen} and "
        f"{_gb(m['activations'])} GB for activations per GPU"
    )
    fit = training_fix(case, memory_gb * GB)
    if fit is None:
        fix = f"no setting up to {GPU_COUNTS[-1]} GPUs fits; shorten tokenize.max_length or use larger GPUs"
    else:
        parts = []
        if fit.strategy != case.strategy:
            s = fit.strategy
            plural = "s" if s.gpus > 1 else ""
            parts.append(
                f"{s.name} with at least {s.gpus} GPU{plural} (resources.{case.stage}.accelerate: {s.name}, "
                f"gpus x nodes = {s.gpus})"
            )
        if fit.checkpointing and not case.checkpointing:
            parts.append("train.gradient_checkpointing: true")
        if fit.batch_size != case.batch_size:
            parts.append(f"train.batch_size: {fit.batch_size} (raise train.grad_accum to keep the effective batch)")
        fix = "use " + _listing(parts)
    gpus = _gpus_phrase(case.strategy.gpus, memory_gb)
    return f"{need}; {gpus} cannot hold them: {fix}."


def inference_problem(case: InferenceCase, memory_gb: float) -> str:
    """One sentence: the models a scoring or generation job holds on its one GPU, and what would fit."""
    m = inference_memory(case)
    models = f"{len(case.models)} model{'s' if len(case.models) > 1 else ''} ({_params_text(case)} parameters)"
    held = "the largest of which needs" if case.one_at_a_time and len(case.models) > 1 else "need"
    need = (
        f"{case.stage} ({case.job}): {models}, {held} about {_gb(m['states'])} GB for weights and "
        f"{_gb(m['activations'])} GB for activations on one GPU"
    )
    fit, wide = inference_fix(case, memory_gb * GB)
    if fit is None:
        smallest = replace(case, batch_size=1, models=tuple((r, a, "bfloat16") for r, a, _ in case.models))
        what = "one model at a time" if case.one_at_a_time else "every model"
        fix = f"these jobs hold {what} on one GPU, so they need GPUs of at least {_gb(total_bytes(smallest))} GB"
    else:
        keys = [case.dtype_key] if case.dtype_key else [f"{role}.dtype" for role in wide]
        parts = [f"{key}: bfloat16" for key in keys] if fit.models != case.models else []
        if fit.batch_size != case.batch_size:
            parts.append(f"{case.batch_key}: {fit.batch_size}")
        fix = "set " + _listing(parts)
    return f"{need}; 1 GPU of {memory_gb:g} GB cannot hold them: {fix}."


def problem_of(case: TrainingCase | InferenceCase, memory_gb: float) -> str:
    """The sentence of a job that does not fit one GPU of ``memory_gb``."""
    if isinstance(case, TrainingCase):
        return training_problem(case, memory_gb)
    return inference_problem(case, memory_gb)


# ---------------------------------------------------------------------------------------------------------
# The plan: memory per stage, FLOPs, and jobs from a dry run
# ---------------------------------------------------------------------------------------------------------


def load_archs(config: dict) -> tuple[dict[str, Arch], list[str]]:
    """The shapes of the teacher, the student and a reward-model judge, and one sentence per model whose
    config.json cannot be read here (its stages get no memory line)."""
    specs = {f"{role}.model": (role, config[role].get("model")) for role in ("teacher", "student")}
    evaluation = config.get("evaluation") or {}
    judge = (evaluation.get("reward") or {}).get("judge", IMPLICIT)
    if evaluation.get("enabled", True) and (evaluation.get("reward") or {}).get("enabled", True) and judge != IMPLICIT:
        specs["evaluation.reward.judge"] = ("judge", judge)
    archs, notes = {}, []
    for key, (name, spec) in specs.items():
        if not spec:
            continue
        try:
            archs[name] = model_arch(spec)
        except PrefkdError as exc:
            notes.append(f"{key}: {exc}")
    return archs, notes


def plan_cases(config: dict, archs: dict, project_root: Path) -> list[TrainingCase | InferenceCase]:
    """Every kind of model-loading job of the config whose models' shapes are known, stage by stage."""
    if not (config["teacher"].get("model") and config["student"].get("model")):
        return []
    cases: list = []
    for role in ("teacher", "student"):
        if role in archs:
            cases += training_cases(config, role, archs, project_root)
    cases += [c for c in inference_cases(config, archs) if all(arch is not None for _, arch, _ in c.models)]
    return cases


def check_plan(config: dict, project_root: Path) -> list[str]:
    """Stop with one sentence when a job of a GPU stage cannot fit its GPUs (``resources.gpu_memory_gb``),
    naming the stage and a setting that would fit; else return the notes (models whose config.json cannot
    be read here, so their stages were not checked). No dry run."""
    memory_gb, _ = gpu_settings(config)
    archs, notes = load_archs(config)
    cases = plan_cases(config, archs, project_root)
    for kind in STAGE_KINDS:
        peak = peak_case(cases, kind)
        if peak and job_gpus(stage_resources(config, kind)) and total_bytes(peak) > memory_gb * GB:
            raise PrefkdError(problem_of(peak, memory_gb))
    return notes


def peak_case(cases: list, kind: str) -> TrainingCase | InferenceCase | None:
    """The job of a stage kind that needs the most memory (a setting that fits it fits the others)."""
    return max((c for c in cases if c.stage == kind), key=total_bytes, default=None)


@dataclass
class StageRow:
    """One line of the plan: a kind of stage, its largest job's memory per GPU, its jobs and GPU-hours."""

    stage: str
    gpus: int  # GPUs of one job (0: a CPU stage)
    job: str = "-"
    params: str = "-"
    strategy: str = "-"
    states_gb: float | None = None  # weights, gradients and optimizer states (+ a frozen teacher's weights)
    activations_gb: float | None = None
    total_gb: float | None = None
    fits: bool | None = None  # None: a CPU stage, or nothing estimated
    jobs: int | None = None  # cluster jobs of a dry run (None: not counted)
    local_jobs: int | None = None  # jobs Snakemake runs itself (localrules)
    model_loads: int | None = None
    gpu_hours_requested: float | None = None
    pflops: float | None = None
    gpu_hours_estimated: float | None = None


@dataclass
class Plan:
    experiment: str
    gpu_memory_gb: float
    gpu_tflops: float
    rows: list[StageRow]
    cases: list[dict] = field(default_factory=list)  # every kind of job with its memory
    notes: list[str] = field(default_factory=list)
    problem: str | None = None  # the sentence of the first job that does not fit


def _size(n: int) -> str:
    """14.77B, 4.9M, 80K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def _params_text(case: TrainingCase | InferenceCase) -> str:
    if isinstance(case, TrainingCase):
        return _size(case.arch.params) + (f"+{_size(case.kd_arch.params)}" if case.kd and case.kd_arch else "")
    sizes = Counter(_size(arch.params) for _, arch, _ in case.models)
    return "+".join(f"{n}x{size}" if n > 1 else size for size, n in sizes.items())


def _strategy_text(case: TrainingCase | InferenceCase) -> str:
    if isinstance(case, InferenceCase):
        return "inference"
    return case.strategy.name + (" +ckpt" if case.checkpointing else "")


def case_summary(case: TrainingCase | InferenceCase, memory_gb: float, gpu_stage: bool) -> dict:
    m = memory_of(case)
    total = sum(m.values())
    return {
        "stage": case.stage,
        "job": case.job,
        "params": _params_text(case),
        "strategy": _strategy_text(case),
        "states_gb": (m["states"] + m["frozen"]) / GB,
        "activations_gb": m["activations"] / GB,
        "total_gb": total / GB,
        "fits": total <= memory_gb * GB if gpu_stage else None,
    }


def stage_flops(config: dict, archs: dict, cases: list, project_root: Path) -> tuple[dict[str, float], list[str]]:
    """FLOPs per stage kind, and a note when the pair counts (or a model) are unknown."""
    pairs = pair_counts(config, project_root)
    if pairs is None:
        return {}, ["GPU-hours from FLOPs need the number of pairs: set data.max_pairs (or prepare the data first)."]
    if not {"teacher", "student"} <= set(archs):
        return {}, []
    flops: Counter = Counter()
    for case in cases:
        if isinstance(case, TrainingCase):
            flops[case.stage] += training_flops(case, pairs["train"])
    needs_judge = config["evaluation"]["enabled"] and config["evaluation"]["reward"]["enabled"]
    if not needs_judge or config["evaluation"]["reward"]["judge"] == IMPLICIT or "judge" in archs:
        flops.update(inference_flops(config, archs, pairs))
    return dict(flops), []


def make_plan(config: dict, project_root: Path, configfile: Path | None = None, workdir: Path | None = None) -> Plan:
    """The plan of a validated config; with ``configfile``, jobs are counted by a Snakemake dry run of it
    (skipped when a job does not fit: the workflow would refuse the DAG)."""
    memory_gb, tflops = gpu_settings(config)
    archs, notes = load_archs(config)
    cases = plan_cases(config, archs, project_root)
    flops, more = stage_flops(config, archs, cases, project_root)
    rows, summaries, problem = [], [], None
    for kind in STAGE_KINDS:
        res = stage_resources(config, kind)
        row = StageRow(kind, job_gpus(res))
        summaries += [case_summary(c, memory_gb, bool(row.gpus)) for c in cases if c.stage == kind]
        peak = peak_case(cases, kind)
        if peak:
            s = case_summary(peak, memory_gb, bool(row.gpus))
            for key in ("job", "params", "strategy", "states_gb", "activations_gb", "total_gb", "fits"):
                setattr(row, key, s[key])
            if row.fits is False and problem is None:
                problem = problem_of(peak, memory_gb)
        if kind in flops:
            row.pflops = flops[kind] / 1e15
            row.gpu_hours_estimated = flops[kind] / (tflops * 1e12 * MFU) / 3600 if row.gpus else None
        rows.append(row)
    notes += more
    if configfile is not None and problem is None:
        try:
            counts = count_jobs(dry_run(configfile, project_root, workdir), config, local_rules(project_root))
            add_job_counts(rows, counts, config)
            other = counts["jobs"]["other"] + counts["local"]["other"]
            if other:
                notes.append(f"{other} jobs of rules that prefkd plan does not map to a stage kind are not counted.")
        except PrefkdError as exc:
            notes.append(str(exc))
    return Plan(config["experiment"], memory_gb, tflops, rows, summaries, notes, problem)


def add_job_counts(rows: list[StageRow], counts: dict[str, Counter], config: dict) -> None:
    for row in rows:
        res = stage_resources(config, row.stage)
        row.jobs, row.local_jobs = counts["jobs"][row.stage], counts["local"][row.stage]
        row.model_loads = counts["loads"][row.stage]
        row.gpu_hours_requested = row.jobs * row.gpus * int(res["runtime"]) / 60


JOB_HEADER = re.compile(r"^(local)?(?:rule|checkpoint) (\w+):\s*$")


def parse_dry_run(text: str) -> list[tuple[str, bool, dict[str, str]]]:
    """(rule, runs locally, wildcards) of every job a ``snakemake -n`` output lists."""
    jobs: list[tuple[str, bool, dict[str, str]]] = []
    for line in text.splitlines():
        header = JOB_HEADER.match(line)
        if header:
            jobs.append((header.group(2), bool(header.group(1)), {}))
        elif jobs and line.strip().startswith("wildcards:"):
            items = (item.strip().partition("=") for item in line.split(":", 1)[1].split(","))
            jobs[-1][2].update((key, value) for key, sep, value in items if sep)
    return jobs


def job_kind(rule: str, wildcards: dict[str, str]) -> str | None:
    """The stage kind of a job (None for the target rule `all`, "other" for a rule this module does not know)."""
    if rule == "all":
        return None
    if rule in ROLE_RULES:
        role = wildcards.get("role", "")
        return role if role in ("teacher", "student") else "other"
    return RULE_KINDS.get(rule, "other")


def model_loads(rule: str, wildcards: dict[str, str], config: dict) -> int:
    """Models one job of ``rule`` loads."""
    if rule in ("sft", "dpo", "dpo_reference", "lm_eval", "preference_eval", "model_init"):
        return 1
    if rule in ("distill", "distill_search"):  # a run's name is its method, or <method>-seed<N>
        name = wildcards.get("method") or re.sub(r"-seed\d+$", "", wildcards.get("run", "sft"))
        return 1 + bool(method(name).kd)
    if rule == "signals":
        plan = signal_plan(resolve_methods(config["distill"]["methods"]), config["signals"]["reference"])
        return len(models_for_set(wildcards["sigset"], plan)) if wildcards.get("sigset") in plan else 0
    if rule == "generate_and_score":
        return 1 + (2 if config["evaluation"]["reward"]["judge"] == IMPLICIT else 1)
    return 0


def local_rules(project_root: Path) -> set[str]:
    """Rules Snakemake runs itself, not as cluster jobs: the ``localrules:`` lists of the workflow files and
    rules with ``localrule: True`` (a dry run prints them like any other rule)."""
    workflow = project_root / "workflow"
    names: set[str] = set()
    for path in [workflow / "Snakefile", *sorted((workflow / "rules").glob("*.smk"))]:
        listing, rule = False, None
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            if line.startswith("localrules:"):
                listing, line = True, line.split(":", 1)[1]
            elif listing and (not line.strip() or not line[:1].isspace()):
                listing = False
            if listing:
                names.update(n.strip() for n in line.split(",") if n.strip())
            header = re.match(r"(?:rule|checkpoint) (\w+):", line)
            rule = header.group(1) if header else rule
            if rule and re.match(r"\s+localrule:\s*True", line):
                names.add(rule)
    return names


def count_jobs(text: str, config: dict, local: set[str] = frozenset()) -> dict[str, Counter]:
    """Cluster jobs, local jobs (rules in ``local``) and model loads per stage kind of a dry run's output."""
    counts = {"jobs": Counter(), "local": Counter(), "loads": Counter()}
    for rule, is_local, wildcards in parse_dry_run(text):
        rule = re.sub(r"_part\d+$", "", rule)  # signals_part3: one of the jobs a (set, split) is split into
        kind = job_kind(rule, wildcards)
        if kind is None:
            continue
        counts["local" if is_local or rule in local else "jobs"][kind] += 1
        loads = model_loads(rule, wildcards, config)
        if loads:
            counts["loads"][kind] += loads
    return counts


def dry_run(configfile: Path, project_root: Path, workdir: Path | None = None, timeout: int = 900) -> str:
    """The output of ``snakemake -n --configfile X`` in the project (or ``workdir``); one sentence if it fails."""
    snakefile = project_root / "workflow" / "Snakefile"
    if not snakefile.is_file():
        raise PrefkdError(f"there is no Snakefile at {snakefile}, so jobs were not counted; the memory part stands.")
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(snakefile)]
    cmd += ["--configfile", str(Path(configfile).resolve())]
    if workdir is not None:
        cmd += ["--directory", str(Path(workdir).resolve())]
    try:
        proc = subprocess.run(cmd, cwd=project_root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PrefkdError(f"the dry run `snakemake -n` ran past {timeout} s, so jobs were not counted.") from None
    if proc.returncode:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("prefkd config error:")), lines[-1] if lines else "").rstrip(
            "."
        )
        raise PrefkdError(f"the dry run `snakemake -n` failed, so jobs were not counted ({reason}).")
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Output and CLI
# ---------------------------------------------------------------------------------------------------------

COLUMNS = (
    ("stage", "stage"),
    ("largest job", "job"),
    ("params", "params"),
    ("strategy", "strategy"),
    ("GPUs", "gpus"),
    ("w+g+opt GB", "states_gb"),
    ("act GB", "activations_gb"),
    ("total GB", "total_gb"),
    ("fits", "fits"),
    ("jobs", "jobs"),
    ("loads", "model_loads"),
    ("GPU-h req", "gpu_hours_requested"),
    ("GPU-h est", "gpu_hours_estimated"),
)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.1f}" if value < 1000 else f"{value:.0f}"
    return str(value)


def format_plan(plan: Plan) -> str:
    """The plan as a table, one row per stage kind, with its assumptions and notes below."""
    table = [[title for title, _ in COLUMNS]]
    for row in plan.rows:
        cells = [_cell(getattr(row, key)) for _, key in COLUMNS]
        cells[4] = str(row.gpus) if row.gpus else "cpu"
        if row.local_jobs:
            cells[9] += f" (+{row.local_jobs} local)"
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = [
        f"prefkd plan: {plan.experiment}, memory per GPU of each stage's largest job against "
        f"{plan.gpu_memory_gb:g} GB GPUs (GB = 1e9 bytes)"
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append(
        f"GPU-h req = jobs x GPUs x runtime (resources); GPU-h est = FLOPs (6 N per trained token, 2 N per scored "
        f"token; lm-eval benchmarks not counted) / ({plan.gpu_tflops:g} TFLOP/s x {MFU:.0%} assumed MFU)."
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    return {**asdict(plan), "mfu": MFU}


@dataclass(kw_only=True)
class PlanSettings:
    """Settings of ``prefkd plan``."""

    configfile: Path = setting(doc="experiment config (what `snakemake --configfile` gets)")
    json_out: Path | None = setting(None, "also write the plan as JSON to this file", flag="--json")
    dag: bool = setting(True, "count jobs and model loads with a Snakemake dry run (--no-dag: memory and FLOPs only)")
    workdir: Path | None = setting(
        None, "working directory of the dry run (default: the project root, whose results/ decide what is left to run)"
    )


def run(s: PlanSettings) -> int:
    if not Path(s.configfile).is_file():
        raise PrefkdError(f"there is no config file {s.configfile}.")
    config = load_config(s.configfile)
    plan = make_plan(config, REPO_ROOT, configfile=Path(s.configfile) if s.dag else None, workdir=s.workdir)
    print(format_plan(plan))
    if s.json_out:
        Path(s.json_out).write_text(json.dumps(plan_json(plan), indent=2) + "\n", encoding="utf-8")
    if plan.problem:
        raise PrefkdError(plan.problem)
    return 0
