"""benchmarks/gpu.py, the GPU check, run here in its CPU form (``--tiny --device cpu``, float32).

The smoke test runs the whole script once in a subprocess (real Qwen2 models, real token and signal shards,
prefkd's engine step and TRL's DPOTrainer loop) and checks the figures of both methods, that the ZeRO-3 / FSDP
parts say why they do not run on a CPU, and that CTPD with uniform weights 1 gives DPO's step-0 loss on the
same ids and reference as TRL does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _module():
    """The script as a module (stdlib imports only at its top), this process's environment left as it was."""
    saved_env, saved_path = dict(os.environ), list(sys.path)
    spec = importlib.util.spec_from_file_location("prefkd_bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_table_by_device_name(name, flops):
    found = _module().table_peak(name)
    assert (found[1] if found else None) == flops


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "gpu.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--threads", "1", "--warmup", "0",
           "--steps", "2", "--budget-s", "150", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout, json.loads(out.read_text())


def test_tiny_cpu_run_reports_both_methods(tiny_run):
    stdout, report = tiny_run
    assert "| figure | prefkd CTPD | TRL DPO | prefkd / TRL |" in stdout
    assert report["complete"] and report["stopped"] is None
    for method in ("ctpd", "trl"):
        part = report["parts"][method]
        assert part["status"] == "ok", part
        assert part["step_s"] > 0 and part["tokens_per_s"] > 0 and part["peak_memory_gb"] > 0
        assert part["mfu"] is None  # no peak FLOP/s on a CPU
        assert part["policy_forwards_per_step"] == 1  # float32: prefkd's fused head path, no fallback
        assert len(part["step_s_timed"]) == 2
    assert report["parts"]["trl"]["ref_model_freed"]
    assert set(report["ratio"]) == {"step_s", "tokens_per_s", "peak_memory_gb"}
    for part in ("zero3", "fsdp"):
        assert report["parts"][part]["status"].startswith("skipped on CPU:")
    tokens = report["batch"]["tokens"]  # non-pad ids of the batch, chosen + rejected
    assert tokens > 2 * report["batch"]["pairs"] * 16  # at least the prompts
    for method in ("ctpd", "trl"):
        part = report["parts"][method]
        assert part["tokens_per_s"] * part["step_s"] == pytest.approx(tokens, rel=0.02)
    assert {"torch", "transformers", "trl", "deepspeed"} <= set(report["versions"])
    assert report["precision"] == "float32" and report["device"]["type"] == "cpu"


def test_uniform_ctpd_equals_trl_dpo_at_step_zero(tiny_run):
    check = tiny_run[1]["check"]
    assert check["same_token_ids"]
    assert check["agree"] and check["abs_diff"] <= 1e-4
    assert abs(check["trl"] - math.log(2)) > 1e-3  # the reference is not the policy: not a trivial ln 2
