"""Install metadata stays consistent: conda env spec vs pyproject, Makefile pins, CI entry point."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_conda_env_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {_name(d): d for d in project["dependencies"]}
    env = yaml.safe_load((ROOT / "envs" / "prefkd.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pip_specs = {_name(d): d for d in pip if not d.startswith("-")}
    assert set(pip_specs) == set(deps), "envs/prefkd.yaml and pyproject.toml list different packages"
    makefile = (ROOT / "Makefile").read_text()
    torch_version = re.search(r"TORCH_VERSION\s*\?=\s*(\S+)", makefile).group(1)
    for name, spec in deps.items():
        if name == "torch":
            assert pip_specs[name] == f"torch=={torch_version}", "the conda env pins the Makefile's torch"
        else:
            assert pip_specs[name] == spec, f"{name}: {pip_specs[name]!r} != {spec!r}"
    assert "-e .." in pip, "the env installs prefkd itself"


def test_every_rule_names_the_conda_env_and_a_log():
    rules = "".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    n_rules = len(re.findall(r"^rule \w+:", rules, flags=re.M))
    assert n_rules >= 5
    assert len(re.findall(r"^    conda:", rules, flags=re.M)) == n_rules
    assert len(re.findall(r"^    log:", rules, flags=re.M)) == n_rules


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in ci
    assert ci.index("make lint") < ci.index("make test"), "CI lints before it tests"
