"""Plots of the accuracy benchmark (``benchmarks/accuracy.py``) from its stored JSON results.

* ``docs/img/accuracy_vs_compression.png``: accuracy of every finished method (mean over seeds) against the
  stored ratio (sign counted; left panel, stored bits per weight on top) and the paper ratio (magnitude bits;
  right panel), points of one method family joined;
* ``docs/img/bits_timeline.png``: bits per layer over training of the MSQ 16x run (controller history).

Usage (from the repository root)::

    python benchmarks/plot_results.py [--results-dir benchmarks/results/accuracy] [--img-dir docs/img]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import DEFAULT_RESULTS, METHODS, load_results, method_rows  # noqa: E402

from msq_hf.report import ComparisonPoint, plot_accuracy_vs_compression, plot_bits_timeline  # noqa: E402

#: legend label of each method family (points with the same label are joined by a line)
LABELS = {"float": "float", "dorefa": "DoReFa (uniform)", "lsq": "LSQ (uniform)", "bsq": "BSQ", "csq": "CSQ"}


def label(method: str) -> str:
    """Legend label of ``method``: MSQ runs split by Hessian guidance, the rest by family."""
    spec = METHODS.get(method)
    if spec is None:
        return method
    if spec.family == "msq" and spec.target is None:
        return "MSQ grid, no search"
    if spec.family == "msq":
        kind = "MSQ (Hessian k)" if spec.hessian else "MSQ (k = 1)"
        return kind + (", stored-ratio target" if spec.count_sign_bit else "")
    return LABELS[spec.family]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--timeline-method", default="msq16", help="MSQ run whose bit timeline is drawn")
    parser.add_argument("--seed", type=int, default=0, help="seed of the timeline run")
    args = parser.parse_args(argv)

    records = load_results(args.results_dir)
    if not records:
        raise SystemExit(f"no finished runs (*.json) in {args.results_dir}; run benchmarks/accuracy.py first")
    args.img_dir.mkdir(parents=True, exist_ok=True)
    points = [
        ComparisonPoint(label(row.method), row.accounting.stored_ratio, row.accounting.paper_ratio, row.accuracy)
        for row in method_rows(records)
    ]
    out = plot_accuracy_vs_compression(points, args.img_dir / "accuracy_vs_compression.png")
    print(f"wrote {out}")
    timeline = next((r for r in records if r["method"] == args.timeline_method and r["seed"] == args.seed), None)
    if timeline is None or not timeline.get("msq_history"):
        print(
            f"no finished {args.timeline_method} seed {args.seed} run with a controller history; "
            "skipping bits_timeline.png"
        )
    else:
        out = plot_bits_timeline(
            timeline["msq_history"],
            args.img_dir / "bits_timeline.png",
            numels=timeline.get("numels"),
            total_steps=timeline["steps"],
            wnorm=(timeline.get("msq_config") or {}).get("wnorm", "signmag"),
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
