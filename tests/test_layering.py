"""The packages' import direction: ``services`` (control plane, run loop) may use ``rollout``,
``reward``, ``learner`` and ``runtime``; none of those may import ``services``, and ``runtime``
(process helpers every actor uses) imports nothing of the project. Every import statement counts,
including those inside functions (the actors import lazily), so the check walks the syntax tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"services", "rollout", "reward", "learner", "runtime"}
FORBIDDEN = {"rollout": {"services"}, "reward": {"services"}, "learner": {"services"},
             "runtime": PROJECT - {"runtime"}}


def _imported_packages(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upwards(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = {str(f.relative_to(ROOT)): sorted(_imported_packages(f) & FORBIDDEN[package]) for f in files}
    assert not {f: p for f, p in bad.items() if p}


def test_the_check_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from services.spec import RunSpec\n    import services.controller\n")
    assert _imported_packages(f) == {"services"}
