"""The stores sit below search and operations: a store never reaches up for their code."""

from __future__ import annotations

import ast
from pathlib import Path

import elaoms.memory

FORBIDDEN = ("elaoms.search", "elaoms.operations")


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_the_memory_package_imports_nothing_from_search_or_operations() -> None:
    package = Path(elaoms.memory.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert files
    reaching_up = {
        f"{path.name}: {module}"
        for path in files
        for module in imported_modules(path)
        if module.startswith(FORBIDDEN)
    }
    assert reaching_up == set()
