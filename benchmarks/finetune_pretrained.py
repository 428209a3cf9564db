"""The paper's main regime at this machine's scale: MSQ fine-tuning of the local pretrained checkpoints.

``benchmarks/pretrain.py`` trains float ResNet-18 and DeiT-tiny on Fashion-MNIST (``runs/pretrained/<model>``).
This script fine-tunes them with MSQ through the recipes (``recipes/resnet18_imagenet.py``,
``recipes/deit_tiny.py``) toward the paper's 10.67x, with ``--eval_after_pruning``, one run per seed, and records
each run's summary (test accuracy on the 10,000 test images, compression, threshold share, k flip rate, largest
post-pruning drop) and controller history in ``benchmarks/results/finetune/<model>_seed<k>.json``, next to the
float checkpoint's own test accuracy (from ``benchmarks/results/pretrain/<model>.json``).

Usage::

    python benchmarks/finetune_pretrained.py resnet18 --seeds 0 1 2 --skip-done
    python benchmarks/finetune_pretrained.py --table-only

Extra arguments go to the recipe (e.g. ``--max_train_samples 20000``). Wall times vary across machines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune"
PRETRAIN_RESULTS = ROOT / "benchmarks" / "results" / "pretrain"

# One short fine-tuning epoch on a 20,000-image subset, pruning every 12 steps (the recipes' paper defaults prune
# every 1-2 epochs of ImageNet-scale runs); the paper's other settings come from the recipes.
RUNS: dict[str, dict[str, Any]] = {
    "resnet18": {
        "recipe": "recipes/resnet18_imagenet.py",
        "args": ["--num_train_epochs", "1", "--max_train_samples", "20000", "--prune_interval", "12",
                 "--per_device_train_batch_size", "128", "--target_compression", "10.67"],
    },
    "deit_tiny": {
        "recipe": "recipes/deit_tiny.py",
        "args": ["--num_train_epochs", "1", "--max_train_samples", "6000", "--prune_interval", "5",
                 "--per_device_train_batch_size", "64", "--target_compression", "10.67"],
    },
}  # fmt: skip


def float_accuracy(model: str) -> float | None:
    """The float checkpoint's final test accuracy, if its pretraining record says it finished."""
    path = PRETRAIN_RESULTS / f"{model}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    evaluations = [e for e in record.get("evaluations", []) if e.get("test_images") == 10000]
    return evaluations[-1]["test_accuracy"] if record.get("status") == "done" and evaluations else None


def run(model: str, seed: int, extra: list[str]) -> dict[str, Any]:
    """Fine-tune ``model`` with MSQ for one seed and return its record."""
    out = ROOT / "runs" / "finetune" / f"{model}_seed{seed}"
    argv = [
        sys.executable, RUNS[model]["recipe"], "--model_name_or_path", f"runs/pretrained/{model}",
        "--dataset_name", "fashion_mnist", "--eval_split", "test", "--dataloader_num_workers", "0",
        "--output_dir", str(out), "--seed", str(seed), "--eval_after_pruning",
        "--disable_tqdm", "true", *RUNS[model]["args"], *extra,
    ]  # fmt: skip
    print(f"[{model} seed {seed}] {' '.join(argv[1:])}", flush=True)
    started = time.time()
    subprocess.run(argv, check=True, cwd=ROOT)
    record = json.loads((out / "msq_history.json").read_text())
    return {
        "model": model,
        "seed": seed,
        "command": ["python", *argv[1:]],
        "wall_seconds": round(time.time() - started, 1),
        "float_test_accuracy": float_accuracy(model),
        "summary": record["summary"],
        "history": record["history"],
        "log_history": [e for e in record["log_history"] if "eval_accuracy" in e],
    }


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the recorded fine-tuning runs."""
    rows = [
        "| model | seed | float acc | MSQ acc | paper ratio | stored ratio | threshold share | max drop after "
        "pruning | k flip rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["model"], r["seed"])):
        s, ref = r["summary"], r.get("float_test_accuracy")
        drop, flip = s.get("max_pruning_eval_drop"), s.get("k_flip_rate")
        rows.append(
            f"| {r['model']} | {r['seed']} | {'n/a' if ref is None else f'{100 * ref:.2f} %'} "
            f"| {100 * s['test_accuracy']:.2f} % | {s['compression']:.2f}x | {s.get('storage_compression') or 0:.2f}x "
            f"| {100 * s['threshold_share']:.1f} % | {'n/a' if drop is None else f'{100 * drop:.2f} pt'} "
            f"| {'n/a' if flip is None else f'{flip:.2f}'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["resnet18"], choices=[*RUNS, []])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--skip-done", action="store_true", help="skip runs whose result file exists")
    parser.add_argument("--table-only", action="store_true")
    args, extra = parser.parse_known_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for model in args.models:
            for seed in args.seeds:
                path = RESULTS / f"{model}_seed{seed}.json"
                if args.skip_done and path.exists():
                    print(f"[{model} seed {seed}] done before: {path.relative_to(ROOT)}")
                    continue
                path.write_text(json.dumps(run(model, seed, extra), indent=1))
                print(f"[{model} seed {seed}] -> {path.relative_to(ROOT)}", flush=True)
    print(table([json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
