"""``report.md`` and :func:`write_report`: every plot a run, checkpoint or export folder allows, plus tables."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msq_hf.report.history import find_run_data
from msq_hf.report.plots import (
    plot_accuracy_vs_compression,
    plot_bits_per_layer,
    plot_bits_timeline,
    plot_training_curves,
)


def bit_table_markdown(
    scheme: Mapping[str, int], numels: Mapping[str, int] | None = None, count_sign_bit: bool = False
) -> str:
    """Markdown table of the bit scheme: layer, weights, bits, share of the packed size; plus a total row.

    The total row holds the parameter-weighted average bits and ``32 · ΣN / Σ b·N`` (the sign bit is
    counted when ``count_sign_bit``). Without ``numels`` only layer and bits are listed.
    """
    if not scheme:
        raise ValueError("bit_table_markdown: the bit scheme is empty")
    names = list(scheme)
    if not numels:
        rows = ["| layer | bits |", "|---|---:|"] + [f"| `{n}` | {int(scheme[n])} |" for n in names]
        return "\n".join(rows) + "\n"
    missing = [n for n in names if n not in numels]
    if missing:
        raise ValueError(f"bit_table_markdown: numels lacks layer(s) {missing[:5]}")
    extra = 1 if count_sign_bit else 0
    cost = {n: int(numels[n]) * (int(scheme[n]) + extra) for n in names}
    total_cost = sum(cost.values())
    total = sum(int(numels[n]) for n in names)
    rows = ["| layer | weights | bits | share of packed bits |", "|---|---:|---:|---:|"]
    rows += [f"| `{n}` | {int(numels[n]):,} | {int(scheme[n])} | {100 * cost[n] / total_cost:.1f}% |" for n in names]
    avg = sum(int(numels[n]) * int(scheme[n]) for n in names) / total
    rows.append(
        f"| **total** ({len(names)} layers) | {total:,} | {avg:.2f} avg | {32 * total / total_cost:.2f}x compression |"
    )
    return "\n".join(rows) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _history_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = ["| step | phase | compression | avg bits | layers pruned |", "|---:|---|---:|---:|---|"]
    for e in history:
        pruned = e.get("pruned") or []
        shown = ", ".join(f"`{p}`" for p in pruned[:4]) + (f" +{len(pruned) - 4}" if len(pruned) > 4 else "")
        comp = e.get("compression")
        avg = e.get("avg_bits")
        rows.append(
            f"| {e.get('step', '?')} | {e.get('phase', '')} | "
            f"{'' if comp is None else f'{comp:.2f}x'} | {'' if avg is None else f'{avg:.2f}'} | {shown} |"
        )
    return rows + [""]


def _percent(accuracy: float) -> float:
    """Accuracy in %: the history stores this run's as a fraction, paper tables quote percentages."""
    return 100.0 * accuracy if accuracy <= 1.0 else accuracy


def write_report(
    run_dir_or_export_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write every plot the folder's data allows, plus ``report.md``; return the written paths.

    ``out_dir`` defaults to ``<folder>/report``. Plots: ``bits_per_layer.png`` (final scheme),
    ``bits_timeline.png`` (needs a history with ≥1 entry), ``training_curves.png`` (compression and,
    when logged, eval accuracy), ``accuracy_vs_compression.png`` (when baselines or a final accuracy
    are known).
    """
    data = find_run_data(run_dir_or_export_dir)
    out = Path(out_dir) if out_dir is not None else data.source / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    md = [f"# MSQ report: `{data.source}`", ""]
    summary = data.summary
    if summary:
        md += ["| | |", "|---|---|"]
        md += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if v is not None]  # None: step switched off
        md.append("")
    if data.scheme:
        written.append(plot_bits_per_layer(data.scheme, out / "bits_per_layer.png", data.numels or None))
        md += ["## Bits per layer", "", "![bits per layer](bits_per_layer.png)", ""]
    if data.history:
        written.append(
            plot_bits_timeline(data.history, out / "bits_timeline.png", data.numels or None, data.total_steps)
        )
        md += ["## Bits over training", "", "![bits over training](bits_timeline.png)", ""]
        md += _history_table(data.history)
    if data.history or any("msq/compression" in e or "eval_accuracy" in e for e in data.log_history):
        try:
            written.append(
                plot_training_curves(data.history, out / "training_curves.png", data.log_history, data.target)
            )
            md += ["## Compression and accuracy over training", "", "![curves](training_curves.png)", ""]
        except ValueError:
            pass  # nothing plottable: the history had no compression values
    points = [(str(label), float(comp), _percent(float(acc))) for label, comp, acc in data.baselines]
    acc = summary.get("test_accuracy")
    comp = summary.get("compression")
    if isinstance(acc, (int, float)) and isinstance(comp, (int, float)):
        points.append(("MSQ (this run)", float(comp), _percent(float(acc))))
    if points:
        written.append(plot_accuracy_vs_compression(points, out / "accuracy_vs_compression.png"))
        md += ["## Accuracy vs compression", "", "![accuracy vs compression](accuracy_vs_compression.png)", ""]
    if data.scheme:
        md += ["## Bit table", "", bit_table_markdown(data.scheme, data.numels or None, data.count_sign_bit)]
    md += ["", "Sources: " + ", ".join(f"`{f}`" for f in data.files), ""]
    report_md = out / "report.md"
    report_md.write_text("\n".join(md), encoding="utf-8")
    written.append(report_md)
    return written


__all__ = ["bit_table_markdown", "write_report"]
