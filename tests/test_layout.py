"""The product does not depend on its benchmarks or its tests: ``pip install .`` ships
``proxy``, ``policy`` and ``audit`` only, and every command (the demo too) must run from them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("proxy", "policy", "audit")
NOT_SHIPPED = ("loadtests", "tests")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def test_no_product_module_imports_the_benchmarks_or_the_tests() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in _imports(path)
        if name.split(".")[0] in NOT_SHIPPED
    ]
    assert offending == []
