#!/usr/bin/env bash
# Quality gates: ruff lint and ruff format check over the whole repository (settings in pyproject.toml).
# The import-shape rules (no cycle, no private cross-module import, module size) are tests: tests/test_architecture.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .
