#!/usr/bin/env bash
# Lint, type-check and test. Run from the project root inside the environment that has
# `pip install -e '.[test]'`. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
