"""The package's shape: import contracts, a CLI without SQL, CLI modules kept small."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "dicomnode"
CLI = PACKAGE / "cli"
# What the CLI may not import: the database layer's own libraries. Reads come from
# dicomnode.db's query functions as plain dataclasses (docs/architecture.md).
SQL_LIBRARIES = ("sqlalchemy", "alembic", "psycopg", "sqlite3")
CLI_MODULE_LINES = 400


def imported_modules(path: Path) -> list[str]:
    """Return every module ``path`` imports, absolute names, wherever the import is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


@pytest.mark.system
def test_the_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    command = str(lint_imports) if lint_imports.exists() else shutil.which("lint-imports")
    assert command, "lint-imports is not installed (it comes with the test extra)"
    result = subprocess.run(
        [command], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_cli_imports_no_sql_library() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {module}"
        for path in sorted(CLI.rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in SQL_LIBRARIES
    ]
    assert offenders == []


def test_the_check_finds_a_sql_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from sqlalchemy import select\n    return select\n")
    assert "sqlalchemy" in imported_modules(module)


def test_every_cli_module_is_small() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for path in CLI.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n >= CLI_MODULE_LINES} == {}
