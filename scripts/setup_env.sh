#!/usr/bin/env bash
# Create (or reuse) .venv and install msq-hf with its test extras, torch pinned to the CPU-capable
# 2.14.1 / torchvision 0.29.1 pair, plus the Fashion-MNIST Debian package when apt is available.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtualenv .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=.venv/.msq_hf_installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1 and msq-hf[dev] (first run takes a few minutes)"
  python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned: an unpinned resolver pass would pull CUDA builds of several GB
  python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install --quiet -e ".[dev]"
  touch "$STAMP"
fi
bash scripts/setup_data.sh || true
python -c "import msq_hf, torch; print(f'[setup] msq_hf {msq_hf.__version__}, torch {torch.__version__}: ready')"
