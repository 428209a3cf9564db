#!/usr/bin/env bash
# The README's first command: set up the environment (idempotent: .venv, pinned torch, msq_hf, Fashion-MNIST)
# and run the built-in MSQ demo, `msq-hf train` (timm resnet20_cifar on Fashion-MNIST, 8 bits -> 16x).
#
#   bash scripts/quickstart.sh                       # the demo; writes ./msq-run/
#   bash scripts/quickstart.sh --output runs/a --target 12 --epochs 2   # any `msq-hf train` option
#
# The Hub is not contacted (HF_HUB_OFFLINE=1) unless you set HF_HUB_OFFLINE=0 yourself, e.g. to train a
# Hub model or dataset: HF_HUB_OFFLINE=0 bash scripts/quickstart.sh --model facebook/deit-tiny-patch16-224
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# outputs land relative to the directory you started from, not the repository
exec "$ROOT/.venv/bin/python" -m msq_hf train "$@"
