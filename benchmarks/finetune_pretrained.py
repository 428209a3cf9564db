"""The paper's main regime at this machine's scale: MSQ fine-tuning of the local pretrained checkpoints, beside
float and uniform fine-tuning with the same budget.

``benchmarks/pretrain.py`` trains float ResNet-18 and DeiT-tiny on Fashion-MNIST (``runs/pretrained/<model>``).
This script fine-tunes them toward the paper's 10.67x, one run per (method, seed):

* ``--method msq`` (default): through the recipes (``recipes/resnet18_imagenet.py``, ``recipes/deit_tiny.py``)
  with ``--eval_after_pruning``; the record keeps the summary (test accuracy on the 10,000 test images,
  compression, threshold share, k flip rate, largest post-pruning drop), the controller history and the bit scheme;
* ``--method float``: plain fine-tuning of the checkpoint; ``--method dorefa --bits k`` (and ``lsq``): every
  Linear/Conv2d at ``k`` uniform bits. Both through ``benchmarks/finetune_baseline.py``, which parses the same
  recipe flags, so data subset, epochs, batch, optimizer, schedule, seed and test split are the MSQ run's.

Each run goes to ``benchmarks/results/finetune/<model>_<method>[_w<bits>]_seed<k>.json`` (MSQ files of the former
``<model>_seed<k>.json`` name are renamed on start), next to the float checkpoint's own test accuracy (from
``benchmarks/results/pretrain/<model>.json``). The table shows the paper ratio (magnitude bits) and the stored
ratio (sign counted) side by side, and pairs MSQ with the uniform runs that store the same bits per weight (MSQ at
3 magnitude bits stores 4: its partner is DoReFa W4, not W3).

Usage::

    python benchmarks/finetune_pretrained.py resnet18 --seeds 0 1 2 --skip-done
    python benchmarks/finetune_pretrained.py resnet18 --method float --seeds 0 1 2 --skip-done
    python benchmarks/finetune_pretrained.py resnet18 --method dorefa --bits 4 --seeds 0 --skip-done
    python benchmarks/finetune_pretrained.py resnet18 --method msq --tag clip0 --max_grad_norm 0  # a budget variant
    python benchmarks/finetune_pretrained.py --table-only
    python benchmarks/finetune_pretrained.py --table-only --plot   # also the two docs/img/finetune_*.png figures

Extra arguments go to the recipe (e.g. ``--max_train_samples 20000``) and are recorded in the run's command; runs
with extra arguments need a ``--tag`` (their own files and rows). A tagged MSQ run whose extra arguments are all MSQ
hyperparameters (``--target_compression 16``) is compared with the untagged float and uniform runs; one with any
other argument (``--max_grad_norm 0``) changed the budget and is compared within its tag
(``finetune_table.baseline_tag``).
Children run with ``--threads`` torch threads (default 1). Wall times vary across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_table import (  # noqa: E402
    METHODS,
    baseline_tag,
    check_method,
    comparison_points,
    legacy_stem,
    pairing_table,
    result_stem,
    table,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune"
PRETRAIN_RESULTS = ROOT / "benchmarks" / "results" / "pretrain"
BASELINE_SCRIPT = "benchmarks/finetune_baseline.py"
BASELINE_RESULT = "baseline_result.json"  # what BASELINE_SCRIPT writes in its output folder
PAIR_TOLERANCE = 0.5  # stored bits per weight between MSQ and a uniform run called "equal stored bits"
PLOT = ROOT / "docs" / "img" / "finetune_trajectories.png"
COMPARISON_PLOT = ROOT / "docs" / "img" / "finetune_accuracy_vs_ratio.png"
#: the MSQ settings of the comparison plot and their legend labels (tags without their target marker; None: the
#: paper's defaults)
MSQ_SERIES = {
    None: "MSQ",
    "mse": "MSQ + clipped scale",
    "ac-rewind": "MSQ search-then-QAT",
    "ac-rewind-mse": "MSQ search-then-QAT + clipped scale",
    "learned": "MSQ + learned step",
    "learned-full": "MSQ + learned step, full grid",
    "learned-full-lsqinit": "MSQ + learned step, full grid, LSQ start",
    "lsqinit-sens": "MSQ + LSQ start, full grid, Hessian prune order",
    "cut-ac-rewind-step": "MSQ + Hessian order and pull, search-then-QAT",
}

# One short fine-tuning epoch on a 20,000-image subset (the budget every method shares); the paper's other
# settings (SGD lr 0.01 cosine, 5 % warm-up, weight decay 1e-4, float activations for the CNN) come from the recipe.
# MSQ adds pruning every 12 steps (the recipes' paper defaults prune every 1-2 epochs of ImageNet-scale runs) and
# the target. ResNet-18 also sets tau = 0.3 (the short-run value of `msq-hf train`) and lambda_0 = 5 (so that lr x
# lambda matches that demo's 0.1 x 0.5): with the recipe's tau = 0.01 and lambda_0 = 0.5, threshold pruning stalled
# at 5.26x and the forced round did the rest; even so, the Trainer's gradient clipping (max_grad_norm 1) bounds the
# regularizer's pull and the forced round still does part of the pruning (docs/results.md, "Fine-tuning").
RUNS: dict[str, dict[str, Any]] = {
    "resnet18": {
        "recipe": "recipes/resnet18_imagenet.py",
        "args": ["--num_train_epochs", "1", "--max_train_samples", "20000", "--per_device_train_batch_size", "128"],
        "msq_args": ["--prune_interval", "12", "--target_compression", "10.67", "--prune_threshold", "0.3",
                     "--reg_strength", "5"],
    },
    "deit_tiny": {
        "recipe": "recipes/deit_tiny.py",
        "args": ["--num_train_epochs", "1", "--max_train_samples", "6000", "--per_device_train_batch_size", "64"],
        # the evaluations after pruning steps score 2,000 test images (10,000 take ~2 min each on a DeiT here), and
        # a Hessian pass takes 4 probes on 32 images (the recipe's 50 on 64 cost ~3 min per pass, 1 thread)
        "msq_args": ["--prune_interval", "5", "--target_compression", "10.67", "--in_training_eval_samples", "2000",
                     "--hessian_max_probes", "4", "--hessian_batch_size", "32"],
    },
}  # fmt: skip


def float_record_path(model: str, given: Path | None = None) -> Path:
    """The pretraining record of the checkpoint being fine-tuned: ``given``, or ``pretrain/<model>.json``."""
    return given if given is not None else PRETRAIN_RESULTS / f"{model}.json"


def float_accuracy(model: str, record: Path | None = None) -> float | None:
    """The float checkpoint's final test accuracy, if its pretraining record (:func:`float_record_path`) says it
    finished."""
    path = float_record_path(model, record)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    evaluations = [e for e in record.get("evaluations", []) if e.get("test_images") == 10000]
    return evaluations[-1]["test_accuracy"] if record.get("status") == "done" and evaluations else None


def migrate_legacy(results: Path = RESULTS) -> list[Path]:
    """Rename MSQ results of the former ``<model>_seed<k>.json`` name to ``<model>_msq_seed<k>.json``.

    The record gains ``"method": "msq"``, ``"bits": null`` and the bit scheme and layer sizes of the run's
    ``msq_history.json`` when its output folder still exists; an existing file of the new name is kept.
    """
    moved = []
    for model in RUNS:
        for path in sorted(results.glob(f"{model}_seed*.json")):
            record = json.loads(path.read_text())
            target = results / f"{result_stem(model, 'msq', None, record['seed'])}.json"
            if path.name != f"{legacy_stem(model, record['seed'])}.json" or target.exists():
                continue
            command = record.get("command", [])
            if "--output_dir" in command and "bit_scheme" not in record:  # the run's own history has the scheme
                history = Path(command[command.index("--output_dir") + 1]) / "msq_history.json"
                if history.exists():
                    saved = json.loads(history.read_text())
                    record.update(bit_scheme=saved.get("bit_scheme"), numels=saved.get("numels"))
            target.write_text(json.dumps({"method": "msq", "bits": None, **record}, indent=1))
            path.unlink()
            moved.append(target)
    return moved


def child_argv(model: str, method: str, bits: int | None, seed: int, out: Path, extra: list[str]) -> list[str]:
    """The child command line: the recipe for MSQ, ``finetune_baseline.py`` with the same shared flags otherwise."""
    setting = RUNS[model]
    shared = [
        "--model_name_or_path", f"runs/pretrained/{model}", "--dataset_name", "fashion_mnist", "--eval_split", "test",
        "--dataloader_num_workers", "0", "--output_dir", str(out.relative_to(ROOT)), "--seed", str(seed),
        "--disable_tqdm", "true", *setting["args"],
    ]  # fmt: skip
    if method == "msq":
        return [sys.executable, setting["recipe"], *shared, "--eval_after_pruning", *setting["msq_args"], *extra]
    width = ["--bits", str(bits)] if bits is not None else []
    return [sys.executable, BASELINE_SCRIPT, "--method", method, *width, "--recipe", setting["recipe"], *shared, *extra]


def run(
    model: str,
    method: str,
    bits: int | None,
    seed: int,
    extra: list[str],
    threads: int,
    tag: str | None = None,
    float_record: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` with ``method`` for one seed (in a child process) and return its record."""
    stem = result_stem(model, method, bits, seed, tag)
    out = ROOT / "runs" / "finetune" / stem
    argv = child_argv(model, method, bits, seed, out, extra)
    print(f"[{stem}] {' '.join(argv[1:])}", flush=True)
    # torch reads the OpenMP thread count at start; 1 thread: the machine's 2 cores are shared with other jobs
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    subprocess.run(argv, check=True, cwd=ROOT, env=env)
    record: dict[str, Any] = {
        "model": model,
        "method": method,
        "bits": bits,
        "tag": tag,
        "baseline_tag": baseline_tag(method, tag, extra),
        "seed": seed,
        "command": [f"OMP_NUM_THREADS={threads}", "python", *argv[1:]],
        "wall_seconds": round(time.time() - started, 1),
        "float_test_accuracy": float_accuracy(model, float_record),
        "float_record": os.path.relpath(float_record_path(model, float_record), ROOT),
    }
    if method == "msq":
        history = json.loads((out / "msq_history.json").read_text())
        return {
            **record,
            "summary": history["summary"],
            "bit_scheme": history.get("bit_scheme"),
            "numels": history.get("numels"),
            "history": history["history"],
            "log_history": [e for e in history["log_history"] if "eval_accuracy" in e],
        }
    result = json.loads((out / BASELINE_RESULT).read_text())
    return {**record, **{k: result[k] for k in ("summary", "bit_scheme", "numels", "log_history")}}


def load_results(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every recorded run."""
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def plot_paths(results: Path) -> tuple[Path, Path]:
    """The two figures of a results folder: :data:`PLOT` and :data:`COMPARISON_PLOT` for the default one, the same
    names suffixed by the folder's name for any other (a re-run's figures never overwrite the documented ones)."""
    if results.resolve() == RESULTS.resolve():
        return PLOT, COMPARISON_PLOT
    return tuple(p.with_name(f"{p.stem}_{results.name}{p.suffix}") for p in (PLOT, COMPARISON_PLOT))


def plot(records: list[dict[str, Any]], path: Path = PLOT) -> Path | None:
    """Seed 0's average-bits trajectory of every recorded MSQ setting, one panel each (threshold-pruning dots, the
    forced round's red cross, the plan, the run's own target)."""
    from msq_hf.report import plot_pruning_trajectories
    from msq_hf.training.pacing import target_average_bits

    msq = [r for r in records if r.get("method", "msq") == "msq" and r["seed"] == 0 and r.get("history")]
    if not msq:
        return None
    labels = {f"{r['model']} {r.get('tag') or 'default'}, seed 0": r for r in msq}
    runs = {label: r["history"] for label, r in labels.items()}
    targets = {label: target_average_bits(r["summary"]["target_compression"]) for label, r in labels.items()}
    return plot_pruning_trajectories(runs, path, target_bits=targets)


def plot_comparison(
    records: list[dict[str, Any]], model: str = "resnet18", path: Path = COMPARISON_PLOT
) -> Path | None:
    """Mean accuracy of ``model``'s fine-tunes against the stored and the paper ratio: float, LSQ, DoReFa and the
    :data:`MSQ_SERIES` settings, each joined across its targets (``finetune_table.comparison_points``)."""
    from msq_hf.report import plot_accuracy_vs_compression

    points = comparison_points(records, model, MSQ_SERIES)
    return plot_accuracy_vs_compression(points, path) if points else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"default resnet18; one of {list(RUNS)}")
    parser.add_argument("--method", choices=METHODS, default="msq")
    parser.add_argument("--bits", type=int, default=None, help="weight bits of --method dorefa/lsq")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--tag",
        default=None,
        help="a variant of the shared budget (e.g. clip0 with --max_grad_norm 0): own file and rows",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    parser.add_argument("--skip-done", action="store_true", help="skip runs whose result file exists")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where the run records are written and read (another float checkpoint's runs: another folder)",
    )
    parser.add_argument(
        "--float-record",
        type=Path,
        default=None,
        help="the pretraining record of the checkpoint fine-tuned (default: benchmarks/results/pretrain/<model>.json; "
        "a re-trained checkpoint's runs name its own record)",
    )
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--plot",
        action="store_true",
        help=f"draw {PLOT.relative_to(ROOT)} and {COMPARISON_PLOT.relative_to(ROOT)} from the records (with "
        "another --results-dir, the same names suffixed by its folder name)",
    )
    args, extra = parser.parse_known_args(argv)
    check_method(args.method, args.bits)
    unknown = sorted(set(args.models) - set(RUNS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected {list(RUNS)}")
    results = args.results_dir.resolve()
    results.mkdir(parents=True, exist_ok=True)
    for path in migrate_legacy(results):
        print(f"renamed a former MSQ result to {os.path.relpath(path, ROOT)}")
    if not args.table_only:
        for model in args.models or ["resnet18"]:
            for seed in args.seeds:
                path = results / f"{result_stem(model, args.method, args.bits, seed, args.tag)}.json"
                if args.skip_done and path.exists():
                    print(f"[{path.stem}] done before: {os.path.relpath(path, ROOT)}")
                    continue
                record = run(model, args.method, args.bits, seed, extra, args.threads, args.tag, args.float_record)
                path.write_text(json.dumps(record, indent=1))
                print(f"[{path.stem}] -> {os.path.relpath(path, ROOT)}", flush=True)
    records = load_results(results)
    print(table(records))
    # 0.5 bit: an MSQ run overshooting the target stores a little less than the uniform run it is paired with
    print(f"\nMSQ and the uniform runs at equal stored bits (within {PAIR_TOLERANCE} bit per weight):\n")
    print(pairing_table(records, PAIR_TOLERANCE))
    trajectories, comparison = plot_paths(results)
    for written in (plot(records, trajectories), plot_comparison(records, path=comparison)) if args.plot else ():
        if written is not None:
            print(f"\nplot: {written.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
