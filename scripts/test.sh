#!/usr/bin/env bash
# Set everything up (idempotent) and run the full test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
# two workers: the suite is CPU-bound and single-threaded per test (tests/conftest.py pins 1 thread)
# --durations: the slowest tests are printed, to see what to trim when the CI run nears its time budget
exec python -m pytest -q -p no:cacheprovider --durations=15 -n "${MSQ_TEST_WORKERS:-2}" "$@"
