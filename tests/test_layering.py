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


JOB_MODULES = sorted((ROOT / "jobs").glob("*.py"))


@pytest.mark.parametrize("path", JOB_MODULES, ids=lambda p: p.name)
def test_job_module_reaches_storage_only_through_the_core(path: Path) -> None:
    """jobs/ reads and writes through patchcore_core.storage: one URL-to-filesystem boundary, so
    credentials, retries and atomic writes are handled in one place."""
    roots = _imported_roots(path)
    assert not roots & IO_LIBS, f"jobs/{path.name} imports {sorted(roots & IO_LIBS)}"


@pytest.mark.parametrize("path", JOB_MODULES, ids=lambda p: p.name)
def test_job_module_imports_no_private_module(path: Path) -> None:
    """Modules that other files import have public names (no `jobs._x` grab-bags)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    private = [
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jobs")
        for name in [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        if any(part.startswith("_") and part != "__main__" for part in name.split(".")[1:])
    ]
    assert not private, f"jobs/{path.name} imports private modules {private}"
