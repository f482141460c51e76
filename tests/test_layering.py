"""Architecture rules (STYLE.md rule 3): only jobs/ imports ray, only storage.py does I/O libraries,
and importing the core package does no work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CORE = ROOT / "patchcore_core"
IO_LIBS = {"fsspec", "s3fs", "pyarrow", "boto3", "botocore"}
CORE_MODULES = sorted(CORE.glob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (anywhere, including inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    roots |= {
        n.module.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
    }
    return roots


def test_core_package_has_the_modules_the_rules_name() -> None:
    names = {p.name for p in CORE_MODULES}
    assert {"__init__.py", "storage.py", "model.py", "spec.py"} <= names


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_core_module_respects_layering(path: Path) -> None:
    roots = _imported_roots(path)
    banned = {"ray"} | (set() if path.name == "storage.py" else IO_LIBS)
    assert not roots & banned, f"patchcore_core/{path.name} imports {sorted(roots & banned)}"


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_core_module_does_no_work_at_import(path: Path) -> None:
    """Module level holds only imports, definitions, constants and docstrings: no calls that read
    the environment, create folders, set threads or configure logging."""
    tree = ast.parse(path.read_text(), filename=str(path))
    forbidden = {
        "getenv",
        "environ",
        "makedirs",
        "mkdir",
        "set_num_threads",
        "basicConfig",
        "manual_seed",
    }
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        assert not names & forbidden, (
            f"patchcore_core/{path.name}:{node.lineno} {sorted(names & forbidden)}"
        )


def test_importing_core_package_does_not_import_ray() -> None:
    code = (
        "import sys, patchcore_core, patchcore_core.model, patchcore_core.storage; "
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
