"""The house (issue 11): data flows down, no import cycle, modules and functions of a size a
reader takes in, the README's module table true to the tree, and a wheel and an sdist that hold
the library only (no demo converter, demo runner or test helpers) with its licence."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pytest_kld"
MODULES = sorted(p for p in PKG.glob("*.py"))
MAX_MODULE_LINES = 460
MAX_FUNCTION_CODE_LINES = 60  # docstring, comments and blank lines not counted


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_kld."):
            out.add(node.module.split(".")[1])
    return out & {p.stem for p in MODULES}


def test_no_import_cycle():
    graph = {p.stem: _imports(p) for p in MODULES}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_and_function_sizes(path):
    src = path.read_text().splitlines()
    assert len(src) <= MAX_MODULE_LINES, f"{path.name}: {len(src)} lines"
    for node in ast.walk(ast.parse("\n".join(src))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = set(range(node.lineno, node.end_lineno + 1))
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
            lines -= set(range(first.lineno, first.end_lineno + 1))
        code = [i for i in lines if src[i - 1].strip() and not src[i - 1].strip().startswith("#")]
        whole = any("# one piece:" in src[i - 1] for i in range(node.lineno, node.end_lineno + 1))
        assert len(code) <= MAX_FUNCTION_CODE_LINES or whole, f"{path.name}: {node.name} has {len(code)} lines of code"


def test_readme_module_table_matches_the_tree():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("| module | owns |"):]
    section = section[: section.index("\n\n")]
    listed = set(re.findall(r"`([a-z_]+\.py)`", section))
    actual = {p.name for p in MODULES} - {"__init__.py", "__main__.py"}
    assert listed == actual, (sorted(listed - actual), sorted(actual - listed))


def test_plugin_import_costs_nothing():
    code = "import sys, pytest_kld.plugin; print(sorted(m for m in ('mlx', 'mlx_lm', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_wheel_and_sdist_hold_the_library_and_its_licence(tmp_path):
    p = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("pytest_kld/", "pytest_kld-")) for n in names), names
    assert not [n for n in names if re.search(r"smollm2|demo|tiny|testing|conftest", n)], names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "pytest_kld/data/prompts.jsonl" in names
    (sdist,) = tmp_path.glob("*.tar.gz")
    members = [m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m]
    assert "LICENSE" in members and "pyproject.toml" in members
    # no tests at all rather than tests without their conftest.py and helpers
    assert not [m for m in members if m.startswith(("tests/", "demo/", "benchmarks/"))], members
