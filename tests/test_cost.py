"""Compute accounting (prefkd.cost): FLOPs terms against hand counts and the real model classes, Snakemake's
benchmark records, the stage graph's matching and closure, and the CLI on real token shards."""

import json
from pathlib import Path

import pytest

from prefkd.cli import main
from prefkd.cost import account, closure, flop_params, match_jobs, read_benchmark, term_flops, token_counts
from prefkd.errors import PrefkdError
from prefkd.plan import BUILTIN_CONFIGS, arch_from_config

# Snakemake's benchmark header (snakemake.benchmark.BenchmarkRecord), as it writes it
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(path: Path, seconds: float, cpu: float = 1.0, rss: float = 100.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:01\t{rss}\t200\t90\t95\t0.1\t0.2\t50.0\t{cpu}\n")
    return path


def test_flop_params_are_every_multiplying_weight_of_the_real_models():
    """N = all parameters but the input embedding, the LM head counted even when tied (it multiplies)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, cfg in BUILTIN_CONFIGS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        n = sum(p.numel() for p in model.parameters()) - embed.numel() + (head.numel() if head is embed else 0)
        assert flop_params(arch_from_config(cfg)) == n, name


def test_term_flops_by_hand():
    assert term_flops(6, 1_000, 50, 2) == 6 * 1_000 * 50 * 2
    assert term_flops(2, 7, 3) == 42.0


def test_a_benchmark_record_reads_its_last_row(tmp_path):
    path = bench(tmp_path / "b.tsv", 12.5, cpu=20.25, rss=321.0)
    with open(path, "a") as fh:  # a retried job appends its final attempt
        fh.write("3.5\t0:00:03\t50\t1\t1\t1\t0\t0\t10\tNA\n")
    assert read_benchmark(path) == {"wall_s": 3.5, "cpu_s": 0.0, "max_rss_mb": 50.0}
    (tmp_path / "empty.tsv").write_text(HEADER)
    with pytest.raises(PrefkdError, match="has no row"):
        read_benchmark(tmp_path / "empty.tsv")


def test_jobs_match_exactly_one_stage_and_the_rest_is_other(tmp_path):
    for name in ("signals/ctpd-train", "signals/ctpd-test-part2", "signals/ctpd-lite-train", "eval/x-preference"):
        bench(tmp_path / f"{name}.tsv", 1.0)
    stages = {
        "signals-ctpd": {"match": r"signals/ctpd-(?P<split>train|valid|test)(-part[0-9]+)?"},
        "signals-ctpd-lite": {"match": r"signals/ctpd\-lite-(?P<split>train|valid|test)(-part[0-9]+)?"},
    }
    found, other = match_jobs(tmp_path, stages)
    assert sorted(s for _, s in found["signals-ctpd"]) == ["test", "train"]
    assert [s for _, s in found["signals-ctpd-lite"]] == ["train"]
    assert [p.name for p in other] == ["x-preference.tsv"]
    with pytest.raises(PrefkdError, match="matches the stages"):
        match_jobs(tmp_path, {"a": {"match": "signals/.*"}, "b": {"match": "signals/ctpd-.*"}})


def test_closure_counts_each_needed_stage_once():
    stages = {"a": {"needs": ["b", "c"]}, "b": {"needs": ["c"]}, "c": {}}
    assert closure("a", stages) == ["a", "b", "c"]
    with pytest.raises(PrefkdError, match="does not describe"):
        closure("a", {"a": {"needs": ["zzz"]}})


def test_account_by_hand(tmp_path):
    """Two stages: a teacher scoring every split it ran on, a student trained on train; FLOPs and wall by hand."""
    bench(tmp_path / "signals/ctpd-train.tsv", 10.0, cpu=15.0)
    bench(tmp_path / "signals/ctpd-test.tsv", 2.0, cpu=3.0)
    bench(tmp_path / "students/ctpd.tsv", 30.0, cpu=55.0)
    bench(tmp_path / "report.tsv", 1.0)
    tokens = {
        "train": {"teacher": {"chosen": 100, "rejected": 80}, "student": {"chosen": 120, "rejected": 90}},
        "test": {"teacher": {"chosen": 10, "rejected": 8}, "student": {"chosen": 12, "rejected": 9}},
    }
    params = {"T": 1000, "S": 500}
    plan = {
        "stages": {
            "signals-ctpd": {
                "match": r"signals/ctpd-(?P<split>train|valid|test)",
                "flops": [[2, "T", "teacher", ["chosen", "rejected"], 1, None]],
            },
            "student-ctpd": {
                "match": "students/ctpd",
                "needs": ["signals-ctpd"],
                "flops": [[6, "S", "student", ["chosen", "rejected"], 2, ["train"]]],
            },
        },
        "methods": {"ctpd": "student-ctpd"},
    }
    out = account(plan, tmp_path, tokens, params)
    assert out["stages"]["signals-ctpd"]["flops"] == 2 * 1000 * (180 + 18)
    assert out["stages"]["signals-ctpd"]["jobs"] == 2 and out["stages"]["signals-ctpd"]["cpu_s"] == 18.0
    assert out["stages"]["student-ctpd"]["flops"] == 6 * 500 * 210 * 2
    m = out["methods"]["ctpd"]
    assert (m["own_wall_s"], m["wall_s"]) == (30.0, 42.0)
    assert m["flops"] == 2 * 1000 * 198 + 6 * 500 * 210 * 2 and m["stages"] == ["student-ctpd", "signals-ctpd"]
    assert out["stages"]["other"]["jobs"] == 1 and out["total"]["wall_s"] == 43.0


def test_token_counts_of_real_shards_and_the_cli(tmp_path, shared_tokens):
    """Real token shards (tokenized by the real tokenizers): the counts are the lists' lengths."""
    from prefkd.io.shards import read_shard

    train = tmp_path / "tokens" / "train" / "shard-1-of-1.arrow"
    train.parent.mkdir(parents=True)
    train.write_bytes(Path(shared_tokens).read_bytes())
    table = read_shard(train)
    counts = token_counts([train])
    for role in ("teacher", "student"):
        for side in ("chosen", "rejected"):
            want = sum(len(x) for x in table.column(f"{role}_{side}_input_ids").to_pylist())
            assert counts["train"][role][side] == want > 0
    bench(tmp_path / "benchmarks" / "students" / "dpo.tsv", 4.0)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(BUILTIN_CONFIGS["builtin:tiny-qwen2"]))
    plan = {
        "stages": {
            "student-dpo": {"match": "students/dpo", "flops": [[6, str(model), "student", ["chosen"], 1, ["train"]]]}
        },
        "methods": {"dpo": "student-dpo"},
    }
    out = tmp_path / "cost.json"
    args = ["cost", "--plan", json.dumps(plan), "--benchmarks", str(tmp_path / "benchmarks"), "--tokens", str(train)]
    assert main(args + ["--out", str(out)]) == 0
    n = flop_params(arch_from_config(BUILTIN_CONFIGS["builtin:tiny-qwen2"]))
    assert json.loads(out.read_text())["methods"]["dpo"]["flops"] == 6 * n * counts["train"]["student"]["chosen"]


def test_a_stage_that_never_ran_reads_no_model(tmp_path):
    """The plan describes every stage the config could run; one whose jobs did not run has no model to count."""
    bench(tmp_path / "students/dpo.tsv", 3.0)
    plan = {
        "stages": {
            "dpo-student-neg": {
                "match": "dpo-student-neg",
                "flops": [[6, str(tmp_path / "absent"), "student", ["chosen"], 1, ["train"]]],
            },  # fmt: skip
            "student-dpo": {"match": "students/dpo"},
        },
        "methods": {"dpo": "student-dpo"},
    }
    out = account(plan, tmp_path, {})
    assert out["stages"]["dpo-student-neg"] == {**out["stages"]["dpo-student-neg"], "jobs": 0, "flops": 0.0}
    assert out["methods"]["dpo"]["wall_s"] == 3.0
