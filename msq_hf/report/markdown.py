"""``report.md`` and :func:`write_report`: every plot a run, checkpoint or export folder allows, plus tables."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msq_hf.report.accounting import (
    ComparisonPoint,
    accounting_from_paper_ratio,
    family_of_label,
    format_ratio,
    layer_stored_bits,
    method_accounting,
)
from msq_hf.report.history import RunData, find_run_data
from msq_hf.report.plots import (
    plot_accuracy_vs_compression,
    plot_bits_per_layer,
    plot_bits_timeline,
    plot_training_curves,
)


def bit_table_markdown(
    scheme: Mapping[str, int], numels: Mapping[str, int] | None = None, wnorm: str = "signmag"
) -> str:
    """Markdown table of the bit scheme: layer, weights, bits, stored bits, share of the packed size; plus a total.

    ``bits`` are the magnitude bits the MSQ paper counts, ``stored bits`` what the packed export holds per weight
    (sign + magnitude for ``wnorm="signmag"``). The total row holds both parameter-weighted averages and both ratios:
    the paper ratio (magnitude bits) and the stored ratio (sign counted). Without ``numels`` only layer, bits and
    stored bits are listed.
    """
    if not scheme:
        raise ValueError("bit_table_markdown: the bit scheme is empty")
    names = list(scheme)
    stored = {n: layer_stored_bits("msq", int(scheme[n]), wnorm) for n in names}
    if not numels:
        rows = ["| layer | bits | stored bits |", "|---|---:|---:|"]
        return "\n".join(rows + [f"| `{n}` | {int(scheme[n])} | {stored[n]:g} |" for n in names]) + "\n"
    missing = [n for n in names if n not in numels]
    if missing:
        raise ValueError(f"bit_table_markdown: numels lacks layer(s) {missing[:5]}")
    cost = {n: int(numels[n]) * stored[n] for n in names}
    total_cost = sum(cost.values()) or 1.0
    rows = ["| layer | weights | bits | stored bits | share of stored bits |", "|---|---:|---:|---:|---:|"]
    rows += [
        f"| `{n}` | {int(numels[n]):,} | {int(scheme[n])} | {stored[n]:g} | {100 * cost[n] / total_cost:.1f}% |"
        for n in names
    ]
    acc = method_accounting("msq", scheme, numels, wnorm)
    rows.append(
        f"| **total** ({len(names)} layers) | {sum(int(numels[n]) for n in names):,} | {acc.magnitude_bits:.2f} avg "
        f"| {acc.stored_bits:.2f} avg | paper ratio (magnitude bits) {format_ratio(acc.paper_ratio)}, "
        f"stored ratio (sign counted) {format_ratio(acc.stored_ratio)} |"
    )
    return "\n".join(rows) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _history_table(
    history: Sequence[Mapping[str, Any]], numels: Mapping[str, int] | None, count_sign_bit: bool, wnorm: str
) -> list[str]:
    """One row per pruning step. Both ratios come from the entry's bits when ``numels`` covers its layers; otherwise
    the entry's own ``compression`` fills the column of the run's accounting (``count_sign_bit``)."""
    rows = [
        "| step | phase | paper ratio (magnitude bits) | stored ratio (sign counted) | avg bits | layers pruned |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for e in history:
        pruned = e.get("pruned") or []
        shown = ", ".join(f"`{p}`" for p in pruned[:4]) + (f" +{len(pruned) - 4}" if len(pruned) > 4 else "")
        bits = e.get("bits")
        paper = stored = ""
        if isinstance(bits, Mapping) and bits and numels and all(numels.get(n, 0) > 0 for n in bits):
            acc = method_accounting("msq", bits, numels, wnorm)
            paper, stored = format_ratio(acc.paper_ratio), format_ratio(acc.stored_ratio)
        elif e.get("compression") is not None:
            own = f"{e['compression']:.2f}x"
            paper, stored = ("", own) if count_sign_bit else (own, "")
        avg = e.get("avg_bits")
        rows.append(
            f"| {e.get('step', '?')} | {e.get('phase', '')} | {paper} | {stored} | "
            f"{'' if avg is None else f'{avg:.2f}'} | {shown} |"
        )
    return rows + [""]


def _reference_point(entry: Sequence[Any]) -> ComparisonPoint:
    """A history ``baselines`` entry ``(label, paper ratio, accuracy[, family])`` with both ratios."""
    label, paper, accuracy = str(entry[0]), float(entry[1]), _percent(float(entry[2]))
    family = str(entry[3]) if len(entry) > 3 else family_of_label(label)
    acc = accounting_from_paper_ratio(family, paper)
    return ComparisonPoint(label, acc.stored_ratio, acc.paper_ratio, accuracy)


def _accounting_lines(data: RunData) -> list[str]:
    """The run's quantized weights in both accountings (needs the final scheme and its layer sizes)."""
    if not data.scheme or not data.numels or any(n not in data.numels for n in data.scheme):
        return []
    acc = method_accounting("msq", data.scheme, data.numels, data.wnorm)
    target = "stored ratio (sign counted)" if data.count_sign_bit else "paper ratio (magnitude bits)"
    return [
        "## Compression",
        "",
        "| accounting | bits per weight | ratio |",
        "|---|---:|---:|",
        f"| paper ratio (magnitude bits) | {acc.magnitude_bits:.2f} | {format_ratio(acc.paper_ratio)} |",
        f"| stored ratio (sign counted, `wnorm={data.wnorm}`) | {acc.stored_bits:.2f} | "
        f"{format_ratio(acc.stored_ratio)} |",
        "",
        f"The run's target ({'–' if data.target is None else f'{data.target:g}x'}) is a {target}.",
        "",
    ]


def _percent(accuracy: float) -> float:
    """Accuracy in %: the history stores this run's as a fraction, paper tables quote percentages."""
    return 100.0 * accuracy if accuracy <= 1.0 else accuracy


def write_report(
    run_dir_or_export_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write every plot the folder's data allows, plus ``report.md``; return the written paths.

    ``out_dir`` defaults to ``<folder>/report``. Every ratio is shown twice: the paper ratio (magnitude bits) and
    the stored ratio (sign counted; :mod:`msq_hf.report.accounting`). Plots: ``bits_per_layer.png`` (final scheme),
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
    md += _accounting_lines(data)
    if data.scheme:
        written.append(
            plot_bits_per_layer(data.scheme, out / "bits_per_layer.png", data.numels or None, wnorm=data.wnorm)
        )
        md += ["## Bits per layer", "", "![bits per layer](bits_per_layer.png)", ""]
    if data.history:
        written.append(
            plot_bits_timeline(
                data.history, out / "bits_timeline.png", data.numels or None, data.total_steps, wnorm=data.wnorm
            )
        )
        md += ["## Bits over training", "", "![bits over training](bits_timeline.png)", ""]
        md += _history_table(data.history, data.numels or None, data.count_sign_bit, data.wnorm)
    if data.history or any("msq/compression" in e or "eval_accuracy" in e for e in data.log_history):
        try:
            written.append(
                plot_training_curves(
                    data.history,
                    out / "training_curves.png",
                    data.log_history,
                    data.target,
                    count_sign_bit=data.count_sign_bit,
                    numels=data.numels or None,
                    wnorm=data.wnorm,
                )
            )
            md += ["## Compression and accuracy over training", "", "![curves](training_curves.png)", ""]
        except ValueError:
            pass  # nothing plottable: the history had no compression values
    points = [_reference_point(entry) for entry in data.baselines]
    acc = summary.get("test_accuracy")
    if isinstance(acc, (int, float)) and data.scheme and data.numels and all(n in data.numels for n in data.scheme):
        own = method_accounting("msq", data.scheme, data.numels, data.wnorm)
        points.append(ComparisonPoint("MSQ (this run)", own.stored_ratio, own.paper_ratio, _percent(float(acc))))
    elif isinstance(acc, (int, float)) and isinstance(summary.get("compression"), (int, float)):
        # no layer sizes: the summary's ratio counts magnitude bits (pipeline.run.summarize), which determines both
        own = accounting_from_paper_ratio("msq", float(summary["compression"]), data.wnorm)
        points.append(ComparisonPoint("MSQ (this run)", own.stored_ratio, own.paper_ratio, _percent(float(acc))))
    if points:
        written.append(plot_accuracy_vs_compression(points, out / "accuracy_vs_compression.png"))
        md += ["## Accuracy vs compression", "", "![accuracy vs compression](accuracy_vs_compression.png)", ""]
        if data.baselines:
            md += [
                "Reference points are quoted at their paper ratio; their stored ratio assumes sign + magnitude for "
                "MSQ/BSQ/CSQ labels, 32 bits for FP and the quoted bits for every other (uniform) method, unless "
                "the history names the family.",
                "",
            ]
    if data.scheme:
        md += ["## Bit table", "", bit_table_markdown(data.scheme, data.numels or None, data.wnorm)]
    md += ["", "Sources: " + ", ".join(f"`{f}`" for f in data.files), ""]
    report_md = out / "report.md"
    report_md.write_text("\n".join(md), encoding="utf-8")
    written.append(report_md)
    return written


__all__ = ["bit_table_markdown", "write_report"]
