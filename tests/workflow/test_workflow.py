"""The Snakemake workflow itself: dry-runs and lint of every config, a real run of the data stages on a
small demo config, the stage invariants on its outputs, and honest caching (no-op reruns, reruns of exactly
the affected jobs, byte-identical outputs).

Everything runs in a temporary copy of the project, offline, each snakemake call under a hard timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SPLITS = ("train", "valid", "test")
TEST_CONFIGS = REPO / ".test"
SMALL_CONFIG = yaml.safe_load((TEST_CONFIGS / "config-data.yaml").read_text(encoding="utf-8"))
EXPERIMENT = SMALL_CONFIG["experiment"]
SHARDS = SMALL_CONFIG["tokenize"]["shards"]
CONFIG_FILE = "small.yaml"
DRY_TIMEOUT = 120
RUN_TIMEOUT = 2400  # a whole small pipeline: ~50 jobs on 2 cores shared with the other pytest worker


class Project:
    """A temporary copy of the project and a way to run snakemake in it."""

    def __init__(self, root: Path):
        self.root = root
        self.results = root / "results" / EXPERIMENT
        self.env = dict(os.environ)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.update(
            PREFKD_WHEEL_DIR=str(REPO / ".cache" / "wheels"),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )

    def snakemake(self, *args: str, timeout: int = DRY_TIMEOUT, check: bool = True) -> str:
        """Run snakemake; return stdout + stderr."""
        cmd = [sys.executable, "-m", "snakemake", *args]
        try:
            proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`snakemake {' '.join(args)}` ran past {timeout} s:\n{exc.stdout}\n{exc.stderr}")
        out = proc.stdout + proc.stderr
        if check:
            assert proc.returncode == 0, f"`snakemake {' '.join(args)}` failed ({proc.returncode}):\n{out[-6000:]}"
        return out

    def run(self, *args: str) -> str:
        # targets and options first: --configfile takes every word after it
        return self.snakemake(*args, "--cores", "2", "--configfile", CONFIG_FILE, timeout=RUN_TIMEOUT)

    def dry_run(self, *args: str) -> str:
        return self.snakemake(*args, "-n", "--configfile", CONFIG_FILE)

    def write_config(self, config: dict) -> None:
        (self.root / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def shards(self, split: str | None = None) -> list[Path]:
        splits = [split] if split else SPLITS
        return [
            self.results / "tokens" / s / f"shard-{k}-of-{SHARDS}.arrow" for s in splits for k in range(1, SHARDS + 1)
        ]


def copy_project(tmp_path_factory, name: str) -> Project:
    """A fresh copy of the workflow, its configs and profiles (and the shared data next to it) for dry runs."""
    root = tmp_path_factory.mktemp(name) / "prefkd"
    root.mkdir()
    for folder in ("workflow", "envs", "configs", "profiles"):
        shutil.copytree(REPO / folder, root / folder)
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    if SHARED.is_dir():  # configs name ../shared/... relative to the project root
        (root.parent / "shared").symlink_to(SHARED, target_is_directory=True)
    return Project(root)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake run or dry-run as {rule: count} (empty when nothing to do)."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3 :]:  # skip the "job count" header and the dashes
                m = re.fullmatch(r"\s*(\S+)\s+(\d+)\s*", row)
                if not m or m.group(1) == "total":
                    break
                counts[m.group(1)] = int(m.group(2))
            break
    return counts


def ran_rules(output: str) -> dict[str, int]:
    """Which rules a real run executed, from its 'localrule <name>:' / 'rule <name>:' lines."""
    counts: dict[str, int] = {}
    for m in re.finditer(r"^(?:local)?rule (\w+):$", output, flags=re.M):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def nothing_to_do(output: str) -> bool:
    return "Nothing to be done" in output


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("workflow") / "prefkd"
    root.mkdir()
    for name in ("workflow", "envs", "configs", "profiles", ".test"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, root / name)
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    if SHARED.is_dir():  # configs name ../shared/... relative to the project root
        (root.parent / "shared").symlink_to(SHARED, target_is_directory=True)
    p = Project(root)
    p.write_config(SMALL_CONFIG)
    return p


@pytest.fixture(scope="module")
def built(project: Project) -> Project:
    """The small demo, run once end to end."""
    out = project.run()
    assert "Traceback" not in out
    return project


# ---------------------------------------------------------------------------------------------------------
# Dry-run and lint of every config (no network: HF ids must not be touched while building the DAG)
# ---------------------------------------------------------------------------------------------------------

CONFIG_CHOICES = [
    "config.yaml",
    *sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")),
    *sorted(f".test/{p.name}" for p in TEST_CONFIGS.glob("*.yaml")),
]


def hub_ids(config: dict) -> list[str]:
    """The Hugging Face ids a config names (models, tokenizers, the reward judge)."""
    names = [config[role].get(key) for role in ("teacher", "student") for key in ("model", "tokenizer")]
    names.append(config.get("evaluation", {}).get("reward", {}).get("judge"))
    return [n for n in names if n and not n.startswith("builtin:") and n != "implicit" and n.count("/") == 1]


def fake_hub_cache(hf_home: Path, repo_ids: list[str]) -> None:
    """Hugging Face cache entries (config.json + tokenizer.json) for offline DAG checks of real configs."""
    for repo_id in repo_ids:
        repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / "0000000000000000000000000000000000000000"
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json"):
            (snapshot / name).write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(snapshot.name)


@pytest.mark.parametrize("configfile", CONFIG_CHOICES)
def test_dry_run_and_lint(project: Project, configfile: str, tmp_path: Path):
    args = [] if configfile == "config.yaml" else ["--configfile", configfile]
    source = yaml.safe_load((project.root / configfile).read_text())["data"]["source"]
    if source.startswith("../shared/") and not (project.root / source).exists():
        pytest.skip(f"{configfile} reads {source}, which this machine does not have")
    # the real configs name hub models, which must be cached while offline: give them a cache
    fake_hub_cache(tmp_path / "hf", hub_ids(yaml.safe_load((project.root / configfile).read_text())))
    saved = project.env.get("HF_HOME")
    project.env["HF_HOME"] = str(tmp_path / "hf")
    try:
        out = project.snakemake("-n", *args)
        counts = job_counts(out)
        assert counts.get("alignment_stats") == 1, out[-3000:]
        shards = yaml.safe_load((project.root / configfile).read_text())["tokenize"]["shards"]
        assert counts.get("tokenize_align") == 3 * shards
        assert counts.get("tokenizer") == 2
        if (
            "leaderboard_ifeval" in (project.root / configfile).read_text()
            and importlib.util.find_spec("langdetect") is None
        ):
            # a missing lm-eval extra is said when the DAG is built, not hours later in the evaluation jobs
            assert "pip install 'lm-eval[ifeval]'" in out
        lint = project.snakemake("--lint", *args)
        assert "in a good condition" in lint, lint[-3000:]
    finally:
        project.env.pop("HF_HOME")
        if saved is not None:
            project.env["HF_HOME"] = saved


# ---------------------------------------------------------------------------------------------------------
# A real run of the data stages
# ---------------------------------------------------------------------------------------------------------


def test_data_stages_produce_their_artifacts(built: Project):
    from prefkd.io.shards import read_shard

    r = built.results
    for split in SPLITS:
        assert (r / "data" / f"{split}.parquet").is_file()
    report = json.loads((r / "data" / "filter_report.json").read_text())
    assert report["rows_in"] == SMALL_CONFIG["data"]["demo_pairs"]
    stats = json.loads((r / "stats" / "alignment.json").read_text())
    for key in ("pairs_out", "spans", "one_to_one_share"):
        assert key in stats["all"], stats["all"].keys()
    assert 0.5 < stats["all"]["one_to_one_share"] <= 1.0
    assert stats["all"]["spans"] > 0

    total = 0
    for split in SPLITS:
        want = pq.read_table(r / "data" / f"{split}.parquet", columns=["pair_id"]).column("pair_id").to_pylist()
        got = []
        for path in built.shards(split):
            table = read_shard(path)
            got += table.column("pair_id").to_pylist()
        # the shards of a split partition its pairs
        assert sorted(got) == sorted(want)
        assert stats[split]["pairs_out"] == len(got)
        total += len(got)
    assert stats["all"]["pairs_out"] == total
    assert sorted(p.name for p in (r / "logs").iterdir())  # every rule logs


def test_every_shard_row_satisfies_the_span_invariants(built: Project):
    from prefkd.assets.tokenizers import load_tokenizer
    from prefkd.core.align import ByteVocab
    from prefkd.data.spans import check_shard_row
    from prefkd.io.shards import read_shard

    teacher = load_tokenizer(built.results / "tokenizers" / "teacher")
    student = load_tokenizer(built.results / "tokenizers" / "student")
    t_vocab, s_vocab = ByteVocab.from_tokenizer(teacher), ByteVocab.from_tokenizer(student)
    eos = {"teacher": teacher.eos_token_id, "student": student.eos_token_id}
    assert None not in eos.values()

    checked, problems = 0, []
    for split in SPLITS:
        data = pq.read_table(built.results / "data" / f"{split}.parquet", columns=["pair_id", "chosen", "rejected"])
        texts = {row["pair_id"]: row for row in data.to_pylist()}
        for path in built.shards(split):
            for row in read_shard(path).to_pylist():
                found = check_shard_row(row, texts[row["pair_id"]], t_vocab, s_vocab, eos)
                checked += 1
                if found:
                    problems.append((path.name, row["pair_id"], found[:3]))
    report = json.loads((built.results / "data" / "filter_report.json").read_text())
    assert checked == report["kept"]
    assert not problems, problems[:5]


# ---------------------------------------------------------------------------------------------------------
# Caching: reruns do exactly what changed
# ---------------------------------------------------------------------------------------------------------


def test_second_run_has_nothing_to_do(built: Project):
    out = built.dry_run()
    assert nothing_to_do(out), out[-3000:]
    assert job_counts(out) == {}


def test_changed_max_length_reruns_only_tokenize_and_stats(built: Project):
    changed = json.loads(json.dumps(SMALL_CONFIG))
    changed["tokenize"]["max_length"] = 160
    try:
        built.write_config(changed)
        counts = job_counts(built.dry_run())
        assert counts.pop("all", 1) == 1
        assert counts == {"tokenize_align": 3 * SHARDS, "alignment_stats": 1}
    finally:
        built.write_config(SMALL_CONFIG)
    out = built.dry_run()
    assert nothing_to_do(out), out[-3000:]


def test_deleted_shard_is_the_only_shard_recomputed(built: Project):
    """A run that lost one shard (a crashed or killed job: no shard, so no statistics either) redoes only it.

    Snakemake does not rebuild an intermediate file whose consumers are up to date, so deleting a shard
    alone is not enough: the statistics file goes too, as after a crash.
    """
    victim = built.shards("valid")[1]
    stats = built.results / "stats" / "alignment.json"
    before = victim.read_bytes()
    victim.unlink()
    # asked for by name, the shard is its only job
    counts = job_counts(built.dry_run(str(victim.relative_to(built.root))))
    assert counts == {"tokenize_align": 1}
    stats.unlink()
    counts = job_counts(built.dry_run())
    counts.pop("all", None)
    assert counts == {"tokenize_align": 1, "alignment_stats": 1}

    out = built.run()
    ran = ran_rules(out)
    ran.pop("all", None)
    assert ran == {"tokenize_align": 1, "alignment_stats": 1}, ran
    assert victim.read_bytes() == before  # same inputs, same bytes
    assert nothing_to_do(built.dry_run())


def test_same_config_gives_byte_identical_shards(built: Project):
    before = {path: path.read_bytes() for path in built.shards()}
    stats_before = (built.results / "stats" / "alignment.json").read_bytes()
    out = built.run("--forcerun", "tokenize_align")
    ran = ran_rules(out)
    assert ran.get("tokenize_align") == 3 * SHARDS, ran
    assert not {"tokenizer", "demo_data", "prepare"} & set(ran)
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path.name} changed on a rerun with the same config"
    assert (built.results / "stats" / "alignment.json").read_bytes() == stats_before
    assert nothing_to_do(built.dry_run())


def test_a_changed_shard_stops_its_reader_with_one_sentence(built: Project):
    """Overwritten token ids (file size and mtime kept, so Snakemake sees nothing) stop the job that reads
    the shard with one sentence naming it, instead of flowing into later stages (issue 10, item 3)."""
    import numpy as np

    from prefkd.io.shards import read_shard

    path = built.shards("train")[0]
    original, st = path.read_bytes(), path.stat()
    ids = read_shard(path).column("student_chosen_input_ids")[0].as_py()
    at = original.find(np.asarray(ids[2:6], dtype="<i4").tobytes())  # token ids of the first pair
    assert at > 0
    data = bytearray(original)
    data[at : at + 16] = np.full(4, 7, dtype="<i4").tobytes()
    try:
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert nothing_to_do(built.dry_run())  # invisible to Snakemake's own checks
        out = built.snakemake("--forcerun", "alignment_stats", "--cores", "1", "--configfile", CONFIG_FILE, check=False)
        log = (built.results / "logs" / "alignment_stats.log").read_text()
        assert str(path.relative_to(built.root)) in log and "\n" not in log.strip().splitlines()[-1]
        assert "Traceback" not in log, log
        assert "alignment_stats" in out and "Error" in out
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert nothing_to_do(built.dry_run()) or built.run()


GPU_RULES = {
    "sft",
    "dpo",
    "distill",
    "distill_search",
    "signals",
    "dpo_reference",
    "lm_eval",
    "preference_eval",
    "generate_and_score",
}


def _dry_run_jobs(output: str) -> list[dict]:
    """Every job of a `snakemake -n -p` output: rule (a scoring job's part suffix dropped), resources, shell."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        m = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"resources: (.*)", block)
        if m and res and m.group(1) != "all":
            resources = dict(kv.split("=", 1) for kv in res.group(1).split(", "))
            shell = re.search(r"Shell command: (.*)", block)
            rule = re.sub(r"_part\d+$", "", m.group(1))
            jobs.append({"rule": rule, "resources": resources, "shell": shell.group(1) if shell else ""})
    return jobs


def test_a_gpu_config_asks_for_gpus_on_model_jobs_only_and_launches_one_process_per_gpu(project: Project):
    """Issue 11: every training, scoring and evaluation job carries its stage's GPU request, no data job does;
    `accelerate launch` gets the process count from the resources; scoring jobs walk their share of shards."""
    config = yaml.safe_load((TEST_CONFIGS / "config-pipeline.yaml").read_text(encoding="utf-8"))
    config["tokenize"]["shards"] = 2
    config["resources"] = {
        "teacher": {"gpus": 4, "cpus": 16, "accelerate": "zero3"},
        "student": {"gpus": 2, "cpus": 8, "accelerate": "ddp"},
        "signals": {"gpus": 1, "jobs": 2},
        "lm_eval": {"gpus": 1},
        "generate": {"gpus": 1},
    }
    project.write_config(config)
    try:
        jobs = _dry_run_jobs(project.dry_run("-p"))
    finally:
        project.write_config(SMALL_CONFIG)
    assert GPU_RULES <= {j["rule"] for j in jobs}
    for job in jobs:
        gpu = int(job["resources"].get("gpu", 0))
        assert (gpu > 0) == (job["rule"] in GPU_RULES), job
        if job["rule"] in ("sft", "dpo", "distill", "distill_search"):
            n = 4 if "--role teacher" in job["shell"] else 2
            assert gpu == n and f"--num_processes {n} --num_machines 1" in job["shell"], job
            assert int(job["resources"]["cpus_per_task"]) == (16 if n == 4 else 8)
    scoring = [j for j in jobs if j["rule"] == "signals"]
    walked = sorted(re.search(r"--tokens (.*?) --out", j["shell"]).group(1) for j in scoring)
    assert all(len(t.split()) == 1 for t in walked)  # 2 shards over 2 jobs: one each
    assert len(scoring) == 2 * 3 * 2  # the ctpd and ctpd-lite sets (dpo reads dpo_reference shards): 3 splits, 2 jobs
