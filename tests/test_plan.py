"""`prefkd plan`: parameter counts from config.json, memory per GPU by hand, the one-sentence refusal, the
CLI and the job count of a real dry run.

The four config.json files under tests/fixtures/model_configs/ are the public ones of Qwen2.5-14B,
Llama-3.1-8B, Mistral-7B-v0.3 and Qwen2.5-1.5B (typed, not downloaded).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefkd.errors import PrefkdError
from prefkd.io.config import REPO_ROOT, load_config
from prefkd.plan import (
    BUILTIN_CONFIGS,
    GB,
    LOGITS_CHUNK,
    MFU,
    Strategy,
    TrainingCase,
    activation_bytes,
    arch_from_config,
    check_plan,
    count_jobs,
    make_plan,
    model_arch,
    model_state_bytes,
    parameter_count,
    read_model_config,
    training_memory,
    zero2_gpu_bytes,
    zero3_gpu_bytes,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "model_configs"
QWEN14B, LLAMA8B = FIXTURES / "Qwen2.5-14B", FIXTURES / "Llama-3.1-8B"
PUBLISHED = {"Qwen2.5-14B": 14.77e9, "Llama-3.1-8B": 8.03e9, "Mistral-7B-v0.3": 7.25e9, "Qwen2.5-1.5B": 1.54e9}

# Qwen2.5-14B by hand: vocab 152064, hidden 5120, 48 layers, 40 heads / 8 KV heads of 128, MLP 13824, untied.
QWEN_EMBED = 152064 * 5120
QWEN_LAYER = (5120 * 5120 + 5120) + 2 * (5120 * 1024 + 1024) + 5120 * 5120 + 3 * 5120 * 13824 + 2 * 5120
QWEN_N = 2 * QWEN_EMBED + 48 * QWEN_LAYER + 5120  # = 14,770,033,664
# Llama-3.1-8B by hand: vocab 128256, hidden 4096, 32 layers, 32 heads / 8 KV heads of 128, MLP 14336, untied.
LLAMA_EMBED = 128256 * 4096
LLAMA_LAYER = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
LLAMA_N = 2 * LLAMA_EMBED + 32 * LLAMA_LAYER + 4096  # = 8,030,261,248


def fixture_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def write_config(tmp_path: Path, resources: dict, **changes) -> Path:
    """An experiment config whose models are the fixture dirs (only their config.json is read)."""
    config = {
        "experiment": "plantest",
        "data": {"source": "demo", "max_pairs": 60000},
        "teacher": {"model": str(QWEN14B), "tokenizer": "builtin:qwen2.5"},
        "student": {"model": str(LLAMA8B), "tokenizer": "builtin:mistral-v0.3"},
        "tokenize": {"max_length": 512, "max_prompt_length": 128},
        "distill": {"methods": ["sft", "dpo", "ctpd", "ctpd+dskd"]},
        "resources": resources,
        **changes,
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_totals(name):
    assert parameter_count(fixture_config(name)) == pytest.approx(PUBLISHED[name], rel=0.005)


def test_parameter_counts_by_hand():
    assert parameter_count(fixture_config("Qwen2.5-14B")) == QWEN_N == 14_770_033_664
    assert parameter_count(fixture_config("Llama-3.1-8B")) == LLAMA_N == 8_030_261_248
    assert arch_from_config(fixture_config("Qwen2.5-14B")).largest_module == QWEN_EMBED  # DeepSpeed's largest layer


def test_parameter_counts_equal_the_transformers_models_and_the_chunk_is_the_engines():
    """The formula against the real Hugging Face classes (built on the meta device: no memory, no weights)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefkd.core.logprobs import model_token_logps

    configs = {name: fixture_config(name) for name in PUBLISHED}
    configs.update(BUILTIN_CONFIGS)
    for name, cfg in configs.items():
        hf_config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        assert parameter_count(cfg) == sum(p.numel() for p in model.parameters()), name
    assert inspect.signature(model_token_logps).parameters["chunk"].default == LOGITS_CHUNK


def test_the_deepspeed_estimators_agree():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for n, largest in ((QWEN_N, QWEN_EMBED), (LLAMA_N, LLAMA_EMBED), (1_543_714_304, 233_373_696)):
        for per_node, nodes in ((1, 1), (8, 1), (4, 2), (8, 4), (3, 1)):
            _, gpu = estimate_zero2_model_states_mem_needs(n, per_node, nodes, cpu_offload=False)
            assert zero2_gpu_bytes(n, per_node, nodes) == gpu
            _, gpu, _ = estimate_zero3_model_states_mem_needs(n, largest, per_node, nodes, cpu_offload=False)
            assert zero3_gpu_bytes(n, largest, per_node, nodes) == gpu


def test_qwen14b_memory_by_hand():
    arch = model_arch(str(QWEN14B))
    # single GPU, float32 AdamW: 4 (weights) + 4 (gradients) + 8 (m, v) bytes per parameter
    assert model_state_bytes(arch, Strategy("single")) == 16 * 14_770_033_664 == 236_320_538_624
    assert model_state_bytes(arch, Strategy("single"), "bfloat16") == 8 * 14_770_033_664
    # ZeRO-3 on 8 GPUs: 18 bytes per parameter sharded + the embedding (largest module) gathered in fp32
    zero3 = Strategy("zero3", 8, 1, "bf16")
    assert model_state_bytes(arch, zero3) == 4 * 778_567_680 + 18 * 14_770_033_664 // 8 == 36_346_846_464
    # activations of a DPO micro-batch of 4 pairs = 8 sequences of 512 tokens, 16-bit, sdpa:
    sbh = 512 * 8 * 5120  # 20,971,520
    assert activation_bytes(arch, 8, 512) == 48 * 34 * sbh == 34_225_520_640
    assert activation_bytes(arch, 8, 512, checkpointing=True) == 48 * 2 * sbh + 34 * sbh == 2_726_297_600
    assert activation_bytes(arch, 8, 512, eager=True) == 48 * (34 * sbh + 5 * 40 * 512 * 512 * 8)
    assert activation_bytes(arch, 8, 512, nbytes=4) == 2 * 34_225_520_640  # float32 compute
    case = TrainingCase("teacher", "dpo", arch, "float32", zero3, 4, 512, checkpointing=True, pair=True)
    memory = training_memory(case)
    assert memory == {
        "states": 36_346_846_464,
        "frozen": 0,
        "activations": 2_726_297_600 + 1024 * 152064 * 4,  # + one LM-head chunk of fp32 logits
    }
    assert sum(memory.values()) / GB == pytest.approx(39.696, abs=1e-3)


def test_llama8b_memory_by_hand():
    arch = model_arch(str(LLAMA8B))
    assert model_state_bytes(arch, Strategy("zero2", 8, 1, "bf16")) == 2 * LLAMA_N + 18 * LLAMA_N // 8
    assert model_state_bytes(arch, Strategy("zero2", 8, 1, "bf16")) == 34_128_610_304
    # FSDP on 8 GPUs: 16 bytes per parameter sharded + 16-bit weights and gradients of the root (embeddings,
    # head, final norm) and two decoder blocks
    fsdp = model_state_bytes(arch, Strategy("fsdp", 8, 1, "bf16"))
    assert fsdp == 16 * LLAMA_N // 8 + 4 * (2 * LLAMA_EMBED + 4096 + 2 * LLAMA_LAYER) == 22_008_127_488
    # CTPD + DSKD on ZeRO-3 x 8 with gradient checkpointing, 4 pairs per GPU, the Qwen teacher frozen in bf16
    teacher = model_arch(str(QWEN14B))
    zero3 = Strategy("zero3", 8, 1, "bf16")
    case = TrainingCase("student", "distill ctpd+dskd", arch, "bfloat16", zero3, 4, 512, True, pair=True, kd=True)
    memory = training_memory(TrainingCase(**{**case.__dict__, "kd_arch": teacher, "kd_dtype": "bfloat16"}))
    sbh = 512 * (8 + 4) * 4096  # the preference batch and the KD view of the chosen responses
    assert memory["states"] == 4 * LLAMA_EMBED + 18 * LLAMA_N // 8 == 20_169_434_112
    assert memory["frozen"] == 2 * QWEN_N == 29_540_067_328
    assert memory["activations"] == (
        32 * 2 * sbh
        + 34 * sbh  # student, checkpointed
        + (1024 + 4 * 512) * 128256 * 4  # student logits: one head chunk + the KD view
        + 512 * 4 * 5120 * 34  # the teacher's forward: one layer at a time
        + 4 * 512 * 152064 * 4  # the teacher's KD-view logits
    )
    assert sum(memory.values()) / GB == pytest.approx(55.354, abs=1e-3)


def test_an_impossible_plan_is_refused_with_one_sentence_that_names_a_fix(tmp_path):
    gpu = {"teacher": {"gpus": 1, "accelerate": "single"}}
    config = load_config(write_config(tmp_path, gpu))
    with pytest.raises(PrefkdError) as info:
        check_plan(config, REPO_ROOT)
    message = str(info.value)
    # the stage's largest job: DPO, 8 pairs = 16 sequences per micro-batch
    assert message.startswith("teacher training (dpo): 14.8B parameters need about 236 GB for weights, gradients")
    assert "1 GPU of 80 GB cannot hold them: use zero3 with at least 4 GPUs" in message
    assert message.endswith("and train.gradient_checkpointing: true.")
    assert len(re.findall(r"[.;:]\s+[A-Z]", message)) == 0 and message.count("\n") == 0  # one sentence
    # the named setting fits
    fixed = {"teacher": {"gpus": 4, "accelerate": "zero3"}}
    assert (
        check_plan(load_config(write_config(tmp_path, fixed, train={"gradient_checkpointing": True})), REPO_ROOT) == []
    )


def test_a_scoring_job_is_sized_by_its_largest_model(tmp_path):
    """CTPD's signals score with the teacher SFT, pi+ and pi- one after another (each loaded once per job):
    the job needs one 14.8B model in bf16 (29.5 GB) and its activations, not all three (89 GB)."""
    config = load_config(write_config(tmp_path, {"signals": {"gpus": 1}}, signals={"dtype": "bfloat16"}))
    assert check_plan(config, REPO_ROOT) == []  # fits 80 GB
    small = load_config(
        write_config(tmp_path, {"signals": {"gpus": 1}, "gpu_memory_gb": 24}, signals={"dtype": "bfloat16"})
    )
    with pytest.raises(PrefkdError) as info:
        check_plan(small, REPO_ROOT)
    assert str(info.value) == (
        "signals (signals ctpd): 3 models (3x14.77B parameters), the largest of which needs about 30 GB for weights "
        "and 2.0 GB for activations on one GPU; 1 GPU of 24 GB cannot hold them: these jobs hold one model at a "
        "time on one GPU, so they need GPUs of at least 30 GB."
    )
    float32 = load_config(write_config(tmp_path, {"signals": {"gpus": 1}, "gpu_memory_gb": 48}))
    with pytest.raises(PrefkdError, match=r"1 GPU of 48 GB cannot hold them: set signals.dtype: bfloat16\.$"):
        check_plan(float32, REPO_ROOT)


def test_a_config_json_that_cannot_be_read_offline_is_one_sentence(tmp_path):
    with pytest.raises(PrefkdError) as info:
        read_model_config("prefkd-test/no-such-model", cache_dir=tmp_path)
    assert str(info.value) == (
        "the config.json of prefkd-test/no-such-model is not in the local Hugging Face cache and prefkd plan reads "
        "nothing online; fetch it with `huggingface-cli download prefkd-test/no-such-model config.json` or name a "
        "local model dir."
    )
    # the same id once its config.json is in the cache
    snapshot = tmp_path / "models--prefkd-test--no-such-model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((LLAMA8B / "config.json").read_text())
    (tmp_path / "models--prefkd-test--no-such-model" / "refs").mkdir()
    (tmp_path / "models--prefkd-test--no-such-model" / "refs" / "main").write_text("0" * 40)
    cfg, source = read_model_config("prefkd-test/no-such-model", cache_dir=tmp_path)
    assert parameter_count(cfg) == LLAMA_N and source.endswith("config.json")
    with pytest.raises(PrefkdError, match="has model_type None; prefkd plan counts"):
        arch_from_config({}, "x/config.json")


def prefkd_plan(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "prefkd.cli", "plan", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_the_cli_prints_the_plan_and_writes_json(tmp_path):
    gpus = {"gpus": 8, "accelerate": "zero3"}
    resources = {"gpu_memory_gb": 141, "teacher": gpus, "student": gpus, "signals": {"gpus": 1}, "lm_eval": {"gpus": 1}}
    teacher = {"model": str(QWEN14B), "tokenizer": "builtin:qwen2.5", "dtype": "bfloat16"}
    student = {"model": str(LLAMA8B), "tokenizer": "builtin:mistral-v0.3", "dtype": "bfloat16"}
    train = {"batch_size": 4, "gradient_checkpointing": True}
    signals = {"dtype": "bfloat16"}
    path = write_config(tmp_path, resources, train=train, teacher=teacher, student=student, signals=signals)
    out = prefkd_plan("--configfile", path, "--no-dag", "--json", tmp_path / "plan.json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:3] == ["stage", "largest", "job"]
    assert [line.split()[0] for line in lines[2:8]] == ["data", "teacher", "student", "signals", "lm_eval", "generate"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    teacher = next(r for r in plan["rows"] if r["stage"] == "teacher")
    assert teacher["job"] == "dpo" and teacher["fits"] is True and teacher["jobs"] is None
    assert teacher["total_gb"] == pytest.approx(39.696, abs=1e-3)  # test_qwen14b_memory_by_hand
    # FLOPs: SFT on 51,000 train pairs (85 % of 60,000) of 512 tokens, then DPO pi+ and pi- on both responses
    flops = 6 * QWEN_N * 51_000 * 512 * (1 + 2 * 2)
    assert teacher["gpu_hours_estimated"] == pytest.approx(flops / (989e12 * MFU) / 3600)
    assert "ctpd+dskd" in next(r for r in plan["rows"] if r["stage"] == "student")["job"]


def test_the_cli_refuses_a_plan_that_cannot_fit_and_names_an_unreadable_model(tmp_path):
    teacher = {"model": "prefkd-test/no-such-model", "tokenizer": "builtin:qwen2.5"}
    path = write_config(tmp_path, {"student": {"gpus": 1}}, teacher=teacher)
    out = prefkd_plan("--configfile", path, "--no-dag", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.returncode == 2
    assert "note: teacher.model: the config.json of prefkd-test/no-such-model is not in the local" in out.stdout
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(
        "prefkd plan: error: student training (distill ctpd+dskd): 8.0B"
    )


def test_the_dry_run_counts_jobs_per_stage(tmp_path):
    config = load_config(REPO_ROOT / ".test" / "config-data.yaml")
    plan = make_plan(config, REPO_ROOT, configfile=REPO_ROOT / ".test" / "config-data.yaml", workdir=tmp_path)
    jobs = {row.stage: row.jobs for row in plan.rows}
    # demo_data 1, tokenizer 2, prepare 1, tokenize_align 3 splits x 2 shards, alignment_stats 1
    assert jobs == {"data": 11, "teacher": 0, "student": 0, "signals": 0, "lm_eval": 0, "generate": 0}
    assert all(row.model_loads == 0 and row.gpu_hours_requested == 0 for row in plan.rows)


def test_job_kinds_and_model_loads_of_a_dry_run():
    text = """
rule sft:
    wildcards: role=teacher, kind=sft
rule dpo:
    wildcards: role=student, direction=pos
rule distill:
    wildcards: method=ctpd+dskd
rule signals:
    wildcards: sigset=ctpd, split=train, scatteritem=1-of-2
rule generate_and_score:
    wildcards: model=student-ctpd
localrule report:
rule all:
"""
    config = {
        "distill": {"methods": ["ctpd+dskd"]},
        "signals": {"reference": "sft"},
        "evaluation": {"reward": {"judge": "implicit"}},
    }
    counts = count_jobs(text, config)
    assert dict(counts["jobs"]) == {"teacher": 1, "student": 2, "signals": 1, "generate": 1}
    assert dict(counts["local"]) == {"data": 1}
    # distill with an online KD term loads the frozen teacher too; ctpd signals: teacher SFT, pi+, pi-;
    # generation: the student and the implicit judge's pi+ and pi-
    assert dict(counts["loads"]) == {"teacher": 1, "student": 1 + 2, "signals": 3, "generate": 3}


def test_seeds_and_a_search_multiply_the_student_runs_and_their_model_loads():
    from prefkd.plan import model_loads, student_runs

    config = {"seed": 1, "seeds": [1, 2, 3], "distill": {"lr_grid": [1e-4, 1e-3], "lrs": {"dpo": 1e-4}}}
    assert student_runs(config, "ctpd") == 2 + 2  # two rates with seed 1, then seeds 2 and 3
    assert student_runs(config, "dpo") == 1 + 2  # its rate is given: one run per seed
    assert student_runs({"seed": 1, "seeds": None, "distill": {"lr_grid": []}}, "ctpd") == 1
    for rule, wildcards in (("distill", {"run": "uld-seed2"}), ("distill_search", {"method": "uld", "rate": "0.001"})):
        assert model_loads(rule, wildcards, {}) == 2  # the student and its online KD teacher
    assert model_loads("distill", {"run": "ctpd-seed3"}, {}) == 1
