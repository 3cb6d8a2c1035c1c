"""Writing outputs atomically (a stage writes only complete outputs) and small CLI parsing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefkd.errors import PrefkdError


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``out_dir``; on success it replaces ``out_dir`` (old one removed)."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as exc:
        raise PrefkdError(f"Cannot create a folder next to {out_dir} ({exc.strerror}).") from exc
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented UTF-8 JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def group_items(items: list[str], key: str) -> dict[str, list[Path]]:
    """``["a=x.arrow", "a=y.arrow", "b=z.arrow"]`` -> ``{"a": [x, y], "b": [z]}``."""
    groups: dict[str, list[Path]] = {}
    for item in items:
        name, _, path = item.partition("=")
        if not path:
            raise PrefkdError(f"shard argument {item!r} must look like {key}=PATH.")
        groups.setdefault(name, []).append(Path(path))
    return groups
