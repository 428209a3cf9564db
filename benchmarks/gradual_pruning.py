"""Does MSQ's own gradual mechanism do the pruning? Threshold share, k stability and post-pruning accuracy drops.

Runs ``msq-hf train`` (the README's default demo: timm ResNet-20 from scratch on Fashion-MNIST, 8 bits -> 16x,
628 steps) in named variants, each with ``--eval_after_pruning``, and records from every run's summary and
history:

* ``threshold_share``: fraction of the (parameter-weighted) bit reduction done by threshold pruning; the rest
  was done by the forced final round (goal: >= 0.9, the forced round touching at most a few layers by one step);
* ``max_pruning_eval_drop``: the largest accuracy loss of an evaluation right after a pruning step against the
  evaluation before it (goal: <= 3 points);
* ``k_flip_rate``, the final lambda, the test accuracy and the compression.

Raw results go to ``benchmarks/results/gradual/<variant>_seed<k>.json`` (summary, controller history, pruning
drops, command); the trajectories are plotted to ``docs/img/pruning_trajectories.png``. Runs already recorded
are skipped with ``--skip-done``, so an interrupted sweep resumes where it stopped.

Usage::

    python benchmarks/gradual_pruning.py                          # the default variant, seed 0
    python benchmarks/gradual_pruning.py --variants default fixed_lambda --seeds 0 1 2 --skip-done
    python benchmarks/gradual_pruning.py --plot-only              # redraw from the recorded results

Timings vary across machines and torch builds; the accuracy and compression numbers are what this records.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PREVIOUS_REGULARIZER  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gradual"
PLOT = ROOT / "docs" / "img" / "pruning_trajectories.png"

VARIANTS: dict[str, list[str]] = {
    # the README's default run, unchanged: step-unit regularizer with the lambda feedback
    "default": [],
    # the Hessian at every sensitivity pass (the default reuses the last traces at every second pass)
    "hessian_every_pass": ["--hessian_interval", "1"],
    # the default without re-estimating BatchNorm statistics after a pruning step
    "no_bn_recalibration": ["--bn_recalibration", "false"],
    # the regularizer's gradient added after the Trainer's clipping (unclipped, bounded by the learning rate)
    "after_clipping": ["--regularizer_after_clipping", "true"],
    # the LSB pull as a proximal step after each optimizer step (no clipping, no momentum, no overshoot)
    "proximal": ["--lsb_update", "proximal"],
    # the paper's constant lambda with this package's other defaults (what the feedback replaces)
    "fixed_lambda": ["--reg_control", "fixed"],
    # before issue 14 (benchmarks/harness.PREVIOUS_REGULARIZER)
    "previous": [arg for key, value in PREVIOUS_REGULARIZER.items() for arg in (f"--{key}", str(value).lower())],
}  # fmt: skip


def run_variant(name: str, seed: int, out_root: Path, extra: list[str]) -> dict[str, Any]:
    """Train one variant with ``msq-hf train`` in a child process and return its record."""
    out = out_root / f"{name}_seed{seed}"
    argv = [
        sys.executable, "-m", "msq_hf", "train", "--output", str(out), "--overwrite", "--seed", str(seed),
        "--no-progress", "--eval_after_pruning", *VARIANTS[name], *extra,
    ]  # fmt: skip
    print(f"[{name} seed {seed}] {' '.join(argv[2:])}", flush=True)
    started = time.time()
    subprocess.run(argv, check=True, cwd=ROOT)
    return record_of(out, name, seed, ["msq-hf", *argv[3:]], round(time.time() - started, 1))


def record_of(out: Path, name: str, seed: int, command: list[str] | None, wall: float | None) -> dict[str, Any]:
    """The result record of a finished ``msq-hf train`` output folder (its ``msq_history.json``)."""
    record = json.loads((out / "msq_history.json").read_text())
    return {
        "variant": name,
        "seed": seed,
        "command": command if command is not None else ["msq-hf", *(record.get("argv") or [])],
        "wall_seconds": wall if wall is not None else record["summary"].get("wall_seconds"),
        "summary": record["summary"],
        "history": record["history"],
        "log_history": [e for e in record["log_history"] if "eval_accuracy" in e],
        "numels": record.get("numels"),
        "target_compression": record.get("target_compression"),
    }


def plot(results: list[dict[str, Any]]) -> Path | None:
    """Draw every recorded run's average-bits trajectory (threshold dots vs the forced round's cross, its target)."""
    from msq_hf.report import plot_pruning_trajectories
    from msq_hf.training.pacing import target_average_bits

    if not results:
        return None
    labels = {f"{r['variant']} seed {r['seed']}": r for r in results}
    runs = {label: r["history"] for label, r in labels.items()}
    targets = {
        label: target_average_bits(r["target_compression"])
        for label, r in labels.items()
        if r.get("target_compression")
    }
    return plot_pruning_trajectories(runs, PLOT, target_bits=targets)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the recorded runs."""
    head = (
        "| variant | seed | test acc | compression | threshold share | forced layers | max drop after pruning "
        "| k flip rate | final lambda |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        s = r["summary"]
        drop = s.get("max_pruning_eval_drop")
        flip = s.get("k_flip_rate")
        rows.append(
            f"| {r['variant']} | {r['seed']} | {100 * s['test_accuracy']:.2f} % | {s['compression']:.2f}x "
            f"| {100 * s['threshold_share']:.1f} % | {s['forced_round_layers']} "
            f"| {'n/a' if drop is None else f'{100 * drop:.2f} pt'} | {'n/a' if flip is None else f'{flip:.2f}'} "
            f"| {s['final_reg_strength']:.3g} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gradual", help="training outputs (not in git)")
    parser.add_argument("--skip-done", action="store_true", help="skip runs whose result file exists")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plot and print the table")
    parser.add_argument(
        "--from-output",
        type=Path,
        help="record this finished msq-hf train output as the (single) variant and seed given, without training",
    )
    args, extra = parser.parse_known_args(argv)  # anything else goes to msq-hf train
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.from_output is not None:
        name, seed = args.variants[0], args.seeds[0]
        record = record_of(args.from_output, name, seed, None, None)
        (RESULTS / f"{name}_seed{seed}.json").write_text(json.dumps(record, indent=1))
    elif not args.plot_only:
        for name in args.variants:
            for seed in args.seeds:
                path = RESULTS / f"{name}_seed{seed}.json"
                if args.skip_done and path.exists():
                    print(f"[{name} seed {seed}] done before: {path.relative_to(ROOT)}")
                    continue
                record = run_variant(name, seed, args.out, extra)
                path.write_text(json.dumps(record, indent=1))
                print(f"[{name} seed {seed}] -> {path.relative_to(ROOT)}", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    print(table(results))
    written = plot(results)
    if written is not None:
        print(f"plot: {written.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
