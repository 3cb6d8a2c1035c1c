"""The `prefkd` console script: help for every stage, and the `spans` diagnostic."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from prefkd.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def prefkd(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "prefkd.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_stage():
    out = prefkd("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_stage_has_help(name):
    out = prefkd(name, "--help")
    assert out.returncode == 0, out.stderr
    assert f"prefkd {name}" in out.stdout


def test_user_errors_are_one_sentence(tmp_path):
    out = prefkd("prepare", "--source", tmp_path / "nope.jsonl", "--out-dir", tmp_path / "out")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "nope.jsonl" in out.stderr


def test_spans_shows_a_text(teacher_tokenizer_dir, student_tokenizer_dir):
    out = prefkd("spans", "--teacher", teacher_tokenizer_dir, "--student", student_tokenizer_dir, "Hi 😀 there")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["span", "bytes", "text", "teacher", "student"]
    assert "3 spans" in lines[-1]


def test_spans_jsonl_summary_and_exit_code(tmp_path, teacher_tokenizer_dir, student_tokenizer_dir):
    rows = [{"chosen": "Good answer 👍", "rejected": "Bad answer"}, {"chosen": "東京", "rejected": "  spaced  "}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = prefkd("spans", "--teacher", teacher_tokenizer_dir, "--student", student_tokenizer_dir, "--jsonl", path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["rows"] == 2 and summary["violations"] == 0
    assert summary["spans"] > 0 and 0 < summary["one_to_one"] <= 1
    out = prefkd(
        "spans",
        "--teacher",
        teacher_tokenizer_dir,
        "--student",
        student_tokenizer_dir,
        "--jsonl",
        path,
        "--field",
        "chosen",
    )
    assert json.loads(out.stdout)["texts"] == 2


def test_spans_on_the_real_hh_file(tmp_path, teacher_tokenizer_dir, student_tokenizer_dir):
    if not HH.exists():
        pytest.skip("shared HH data not present")
    sample = tmp_path / "hh.jsonl"
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        sample.write_text("".join(line for _, line in zip(range(300), fh)), encoding="utf-8")
    out = prefkd("spans", "--teacher", teacher_tokenizer_dir, "--student", student_tokenizer_dir, "--jsonl", sample)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["rows"] == 300 and summary["violations"] == 0
    assert 0.8 < summary["one_to_one"] < 0.99


def test_llama3_template_renders_the_header_format():
    env = jinja2.Environment()
    template = env.from_string((ROOT / "prefkd" / "assets" / "templates" / "llama3.jinja").read_text())
    text = template.render(
        bos_token="<|begin_of_text|>",
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": " hi "}],
        add_generation_prompt=True,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_a_stage_stops_when_the_workflow_process_is_killed():
    """kill -9 of Snakemake must not leave its job running: the job's prefkd process watches the PID the
    workflow exports (PREFKD_WATCH_PID, set by the Snakefile's shell prefix) and exits when it is gone."""
    import signal
    import time

    parent = subprocess.Popen(["sleep", "120"])
    child_code = "from prefkd.cli import watch_workflow; import time; watch_workflow(); time.sleep(120)"
    env = dict(os.environ, PREFKD_WATCH_PID=str(parent.pid))
    child = subprocess.Popen([sys.executable, "-c", child_code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert child.poll() is None, "the stage stopped although the workflow still runs"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        code = child.wait(timeout=30)
        assert code == 143
        assert f"workflow process {parent.pid} that started this job is gone" in child.stderr.read()
    finally:
        for proc in (parent, child):
            if proc.poll() is None:
                proc.kill()


def test_the_workflow_exports_its_pid_to_every_job():
    snakefile = (ROOT / "workflow" / "Snakefile").read_text()
    assert "export PREFKD_WATCH_PID=$PPID PREFKD_EXPERIMENT={config['experiment']}; " in snakefile
