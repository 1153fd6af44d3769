"""The core is the paper: no module of dediffusion_jax imports a project, and the inference path stays
light. These walk the real import statements (ast), so a new core module is covered without listing it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "dediffusion_jax"


def _imported_modules(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(), filename=str(file))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_core_module_imports_a_project():
    offenders = {}
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 30  # the walk sees the whole core
    for file in files:
        bad = sorted(m for m in _imported_modules(file) if m == "projects" or m.startswith("projects."))
        if bad:
            offenders[str(file.relative_to(CORE.parent))] = bad
    assert not offenders, f"core modules import a project: {offenders}"


def test_the_walk_sees_a_project_import(tmp_path):
    """The check above can fail: a file with a project import is caught."""
    file = tmp_path / "m.py"
    file.write_text("import os\nfrom projects.miniworld import scenes\n")
    assert "projects.miniworld" in _imported_modules(file)


def test_importing_the_whole_core_loads_no_project():
    code = ("import importlib, pkgutil, sys, dediffusion_jax\n"
            "for m in pkgutil.walk_packages(dediffusion_jax.__path__, 'dediffusion_jax.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k == 'projects' or k.startswith('projects.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
