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


def sql_imports(folder: Path) -> list[str]:
    """Return ``FILE: MODULE`` for each SQL library a module under ``folder`` imports."""
    return [
        f"{path.relative_to(folder)}: {module}"
        for path in sorted(folder.rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in SQL_LIBRARIES
    ]


def test_the_cli_imports_no_sql_library() -> None:
    offenders = sql_imports(CLI)
    assert offenders == []


def test_the_check_finds_a_sql_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from sqlalchemy import select\n    return select\n")
    assert "sqlalchemy" in imported_modules(module)
    # The check the CLI is held to, on a folder with one import of each kind hidden in it.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sqlite3\n"
    )
    (tmp_path / "aliased.py").write_text("import alembic.command as run\n")
    (tmp_path / "fine.py").write_text("from dicomnode.db import queries\nimport sqlparse\n")
    assert sql_imports(tmp_path) == [
        "aliased.py: alembic.command",
        "bad.py: sqlalchemy",
        "sub/typed.py: sqlite3",
    ]


def test_every_cli_module_is_small() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for path in CLI.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n >= CLI_MODULE_LINES} == {}
