"""The house rules of prefkd/, checked on every module:

- imports point down one chain: core -> io -> assets -> data -> training -> evaluation -> preflight
  (``prefkd.errors`` below all of them, ``prefkd.cli`` above), with no cycle between modules;
- prefkd imports stand at the top of a module, never inside a function or class (which hides the real
  dependencies);
- no function is longer than ``MAX_FUNCTION_LINES`` unless its docstring says why
  (``Longer than 80 lines because ...``).

The checkers are plain functions, tested here on small synthetic trees so that they can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prefkd"
CHAIN = (
    "errors",
    "core",
    "io",
    "assets",
    "data",
    "training",
    "evaluation",
    "launch",
    "preflight",
    "plan",
    "cost",
    "study",
    "cli",
)
MAX_FUNCTION_LINES = 80
LONG_REASON = "Longer than 80 lines because"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path) -> dict[str, ast.Module]:
    return {module_name(p, root): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.py"))}


def level(module: str, package: str) -> int:
    """Position of a module's subpackage in CHAIN (the package's own __init__ is at the bottom)."""
    parts = module.split(".")
    return CHAIN.index(parts[1]) if len(parts) > 1 else 0


def imported_modules(node: ast.AST, known: set[str], package: str) -> list[str]:
    """The package's modules an import statement loads (``from a.b import c`` -> ``a.b.c`` when that is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
    else:
        return []
    return [n for n in names if n == package or n.startswith(package + ".")]


def import_problems(root: Path) -> list[str]:
    """Upward imports, imports inside functions or classes, and cycles, as sentences."""
    package = root.name
    trees = modules(root)
    known = set(trees)
    graph: dict[str, set[str]] = {m: set() for m in trees}
    problems = []
    for mod, tree in trees.items():
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            for target in imported_modules(node, known, package):
                if target == mod or mod.startswith(target + "."):  # a package's own __init__ chain
                    continue
                graph[mod].add(target)
                if id(node) not in top:
                    problems.append(f"{mod} imports {target} inside a function or class (line {node.lineno})")
                if level(target, package) > level(mod, package):
                    problems.append(f"{mod} imports {target}, which is above it in the chain {' -> '.join(CHAIN)}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(root: Path) -> list[str]:
    """Functions over MAX_FUNCTION_LINES lines whose docstring gives no reason."""
    out = []
    for mod, tree in modules(root).items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    out.append(f"{mod}.{node.name} has {length} lines")
    return out


def test_imports_point_down_the_chain_without_cycles():
    assert import_problems(PACKAGE) == []


def test_no_function_is_long_without_a_reason():
    assert long_functions(PACKAGE) == []


def test_every_subpackage_of_the_chain_exists():
    subpackages = [p.name for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").is_file()]
    assert subpackages == sorted(name for name in CHAIN if (PACKAGE / name).is_dir())
    assert all((PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file() for name in CHAIN)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for sub in ("", "core", "io", "assets", "data", "training", "evaluation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "__init__.py").touch()
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"core/a.py": "from pkg.data.b import x\n", "data/b.py": "x = 1\n"}, "above it"),
        ({"core/a.py": "import pkg.core.b\n", "core/b.py": "import pkg.core.a\n"}, "import cycle"),
        ({"data/a.py": "def f():\n    from pkg.core.b import x\n", "core/b.py": "x = 1\n"}, "inside a function"),
        (
            {"evaluation/a.py": "from pkg.training import b\n", "training/b.py": "from pkg.evaluation.a import y\n"},
            "above it",
        ),
    ],
)
def test_the_import_checker_finds_each_kind_of_problem(tmp_path, files, expected):
    problems = import_problems(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_the_import_checker_accepts_downward_imports(tmp_path):
    files = {
        "training/a.py": "from pkg.core.b import x\nfrom pkg.errors import E\n",
        "core/b.py": "x = 1\n",
        "errors.py": "E = 1\n",
    }
    assert import_problems(_tree(tmp_path, files)) == []


def test_the_length_checker_wants_a_reason(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    root = _tree(
        tmp_path,
        {"core/a.py": f"def long():\n{body}", "core/b.py": f'def ok():\n    """{LONG_REASON} it must."""\n{body}'},
    )
    assert long_functions(root) == [f"pkg.core.a.long has {MAX_FUNCTION_LINES + 1} lines"]
