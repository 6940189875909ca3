#!/usr/bin/env bash
# The static checks CI runs before the tests: lint, formatting, types, and the import
# contracts that keep the layers pointing one way (pyproject.toml, [tool.importlinter]).
# Run from anywhere; uses the repository's .venv when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=".venv/bin"
if [ ! -x "$bin/ruff" ]; then bin="$(dirname "$(command -v ruff)")"; fi
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
"$bin/lint-imports"
