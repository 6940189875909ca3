#!/usr/bin/env bash
# The static checks CI runs before the tests: lint, formatting, types, and the import
# contracts that keep the layers pointing one way (pyproject.toml, [tool.importlinter]).
# Run from anywhere; the repository's .venv comes first on PATH when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
mypy
lint-imports
