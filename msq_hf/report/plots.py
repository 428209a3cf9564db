"""The report's plots: bits per layer, the bit timeline, compression/accuracy curves, accuracy vs compression.

Every function takes plain data (a ``{layer: bits}`` dict, the controller ``history`` list, the Trainer
``log_history`` list, :class:`~msq_hf.report.accounting.ComparisonPoint` tuples) and writes one PNG with matplotlib's
object API on the Agg canvas (no pyplot, no global backend change, works headless). They return the path they wrote.
Wherever a compression ratio is shown, the paper's ratio (magnitude bits) and the stored ratio (sign counted) are
shown together (:mod:`msq_hf.report.accounting`).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from msq_hf.report.accounting import FLOAT_BITS, ComparisonPoint, format_ratio, method_accounting
from msq_hf.report.figure import new_figure, save_figure
from msq_hf.report.history import layer_order

MAX_BITS = 8

# ------------------------------------------------------------------------------------------------
# helpers


def _short_names(names: Sequence[str], width: int = 28) -> list[str]:
    """Layer names short enough for tick labels: keep the tail (``...layer3.0.conv2``)."""
    return [n if len(n) <= width else "…" + n[-(width - 1) :] for n in names]


# ------------------------------------------------------------------------------------------------
# plots


def plot_bits_per_layer(
    scheme: Mapping[str, int],
    path: str | os.PathLike[str],
    numels: Mapping[str, int] | None = None,
    title: str | None = None,
    wnorm: str = "signmag",
) -> Path:
    """Horizontal bar chart of the final bits per layer (model order, top to bottom).

    Horizontal bars keep long layer names readable. With ``numels`` each label also shows the layer's
    weight count and the title the parameter-weighted average bits and both ratios (paper and stored,
    the stored width following ``wnorm``).
    """
    if not scheme:
        raise ValueError("plot_bits_per_layer: the bit scheme is empty (no quantized layers)")
    names = list(scheme)
    bits = [int(scheme[n]) for n in names]
    labels = _short_names(names, 40)
    if numels:
        labels = [f"{label}  ({_count(numels.get(n, 0))})" for label, n in zip(labels, names)]
    fig = new_figure(8.0, min(max(2.5, 0.22 * len(names) + 1.2), 40.0))
    ax = fig.add_subplot(1, 1, 1)
    cmap = _bits_cmap()
    ax.barh(range(len(names)), bits, color=[cmap((b - 1) / (MAX_BITS - 1)) for b in bits])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(labels, fontsize=7 if len(names) <= 60 else 5)
    ax.invert_yaxis()  # first layer on top, like the model
    ax.set_xlim(0, MAX_BITS + 0.5)
    ax.set_xticks(range(0, MAX_BITS + 1))
    ax.set_xlabel("magnitude bits")
    ax.grid(axis="x", alpha=0.3)
    for i, b in enumerate(bits):
        ax.text(b + 0.08, i, str(b), va="center", fontsize=6)
    if title is None:
        title = f"MSQ bits per layer ({len(names)} layers"
        if numels and all(numels.get(n, 0) > 0 for n in names):
            acc = method_accounting("msq", scheme, numels, wnorm)
            title += (
                f", avg {acc.magnitude_bits:.2f} magnitude / {acc.stored_bits:.2f} stored bits; "
                f"paper {format_ratio(acc.paper_ratio)}, stored {format_ratio(acc.stored_ratio)}"
            )
        title += ")"
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _bits_cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"]


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def plot_bits_timeline(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    numels: Mapping[str, int] | None = None,
    total_steps: int | None = None,
    wnorm: str = "signmag",
) -> Path:
    """Heat map of bits per layer (rows, model order) over training steps (columns).

    ``history`` is :attr:`MSQController.history`: one entry per pruning step with ``step`` and
    ``bits``. Each entry's bits hold from its step until the next entry (or ``total_steps``). The title
    gives the first and last compression: both ratios when ``numels`` covers the layers, else the
    history's own ``compression`` values (the run's accounting).
    """
    entries = sorted((e for e in history if e.get("bits")), key=lambda e: int(e.get("step", 0)))
    if not entries:
        raise ValueError("plot_bits_timeline: the history has no entry with 'bits'")
    names = layer_order(entries)
    steps = [int(e.get("step", 0)) for e in entries]
    end = max(int(total_steps or 0), steps[-1] + max(1, (steps[-1] - steps[0]) // max(len(steps), 1)))
    edges = steps + [end]
    import numpy as np

    grid = np.full((len(names), len(entries)), np.nan)
    for j, entry in enumerate(entries):
        for i, name in enumerate(names):
            if name in entry["bits"]:
                grid[i, j] = int(entry["bits"][name])
    fig = new_figure(9.0, min(max(3.0, 0.2 * len(names) + 1.8), 40.0))
    ax = fig.add_subplot(1, 1, 1)
    mesh = ax.pcolormesh(
        edges, np.arange(len(names) + 1), grid, cmap=_bits_cmap(), vmin=0.5, vmax=MAX_BITS + 0.5, shading="flat"
    )
    ax.set_ylim(len(names), 0)  # first layer on top
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(_short_names(names), fontsize=7 if len(names) <= 60 else 5)
    ax.set_xlabel("training step")
    ticks = fig.colorbar(mesh, ax=ax, pad=0.01, ticks=range(1, MAX_BITS + 1))
    ticks.set_label("magnitude bits")
    comps = [e.get("compression") for e in entries]
    final = next((s for s, e in zip(steps, entries) if e.get("phase") == "final"), None)
    if final is not None:
        ax.axvline(final, color="white", lw=1.2, ls="--")
    title = "MSQ bits per layer over training" + (f" (final round at step {final})" if final is not None else "")
    if _covers(numels, entries[0]["bits"], entries[-1]["bits"]):
        first, last = (method_accounting("msq", e["bits"], numels, wnorm) for e in (entries[0], entries[-1]))
        title += (
            f"\npaper ratio (magnitude bits) {format_ratio(first.paper_ratio)} → {format_ratio(last.paper_ratio)}, "
            f"stored ratio (sign counted) {format_ratio(first.stored_ratio)} → {format_ratio(last.stored_ratio)}"
        )
    elif comps[0] is not None and comps[-1] is not None:
        title += f"\ncompression {comps[0]:.2f}x → {comps[-1]:.2f}x (the run's accounting)"
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _covers(numels: Mapping[str, int] | None, *schemes: Mapping[str, Any]) -> bool:
    """True when ``numels`` gives a positive weight count for every layer of every scheme."""
    return bool(numels) and all(numels.get(n, 0) > 0 for scheme in schemes for n in scheme)  # type: ignore[union-attr]


def _series(log_history: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and "step" in entry:
            xs.append(int(entry["step"]))
            ys.append(float(value))
    return xs, ys


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    log_history: Sequence[Mapping[str, Any]] | None = None,
    target: float | None = None,
    count_sign_bit: bool = False,
    numels: Mapping[str, int] | None = None,
    wnorm: str = "signmag",
) -> Path:
    """Compression ratio over training (left axis) and eval accuracy when logged (right axis).

    Compression comes from the Trainer ``log_history`` (``msq/compression``, every logging step) when
    present, else from the controller ``history`` (pruning steps), drawn as a step function. It is in the
    run's accounting (``count_sign_bit``: stored ratio, else the paper ratio), and so is ``target``. With
    ``numels`` the other ratio is drawn too (dashed, from the bits of each history entry).
    Accuracy is ``eval_accuracy`` from ``log_history``.
    """
    log_history = list(log_history or [])
    xs, comp = _series(log_history, "msq/compression")
    hist = sorted((e for e in history if e.get("compression") is not None), key=lambda e: int(e.get("step", 0)))
    if hist:  # pruning steps are exact change points: merge them into the logged series
        merged = dict(zip(xs, comp))
        merged.update({int(e["step"]): float(e["compression"]) for e in hist})
        xs, comp = [list(t) for t in zip(*sorted(merged.items()))] if merged else ([], [])
    acc_x, acc = _series(log_history, "eval_accuracy")
    if not xs and not acc_x:
        raise ValueError(
            "plot_training_curves: neither compression (history / msq/compression) nor eval_accuracy found"
        )
    fig = new_figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    own, other = ("stored ratio (sign counted)", "paper ratio (magnitude bits)")
    if not count_sign_bit:
        own, other = other, own
    if xs:
        handles += ax.step(xs, comp, where="post", color="tab:blue", label=own)
        top = max(comp + [target or 0])
        bits = [e for e in hist if isinstance(e.get("bits"), Mapping) and _covers(numels, e["bits"])]
        if bits:
            accts = [method_accounting("msq", e["bits"], numels, wnorm) for e in bits]
            ys = [a.paper_ratio if count_sign_bit else a.stored_ratio for a in accts]
            handles += ax.step(
                [int(e["step"]) for e in bits] + [xs[-1]],
                ys + ys[-1:],
                where="post",
                color="tab:blue",
                ls="--",
                label=other,
            )
            top = max(top, *ys)
        if target:
            handles.append(ax.axhline(target, color="tab:blue", ls=":", lw=1, label=f"target {target:g}x ({own})"))
        ax.set_ylabel("compression ratio (x)", color="tab:blue")
        ax.set_ylim(0, top * 1.1)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    if acc_x:
        ax2 = ax.twinx()
        handles += ax2.plot(acc_x, [100 * a for a in acc], "o-", color="tab:red", label="eval accuracy (%)")
        ax2.set_ylabel("eval accuracy (%)", color="tab:red")
        ax2.set_ylim(0, 100)
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title("MSQ training: compression" + (" and accuracy" if acc_x else ""), fontsize=9)
    return save_figure(fig, path)


def plot_pruning_trajectories(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike[str],
    target_bits: float | Mapping[str, float] | None = None,
) -> Path:
    """Average magnitude bits over training for each run (``{label: controller history}``), one panel per run.

    Threshold-pruning steps are drawn as dots, the forced final round as a red cross, and the planned trajectory
    (``planned_bits`` of the history, when recorded) as a dotted line: the plot shows at a glance which mechanism
    did the pruning. ``target_bits`` is one target line for every panel or ``{label: bits}`` per run.
    """
    if not runs:
        raise ValueError("plot_pruning_trajectories: no runs")
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig = new_figure(4.2 * cols, 3.0 * rows)
    for index, (label, history) in enumerate(runs.items(), start=1):
        ax = fig.add_subplot(rows, cols, index)
        hist = sorted(history, key=lambda e: int(e["step"]))
        steps = [int(e["step"]) for e in hist]
        bits = [float(e["avg_bits"]) for e in hist]
        ax.step(steps, bits, where="post", color="tab:blue", lw=1.2, label="average bits")
        plan = [(int(e["step"]), float(e["planned_bits"])) for e in hist if e.get("planned_bits") is not None]
        if plan:
            ax.plot(*zip(*plan), ":", color="gray", lw=1, label="plan")
        threshold = [(s, b) for s, b, e in zip(steps, bits, hist) if e.get("pruned") and not e.get("forced")]
        forced = [(s, b) for s, b, e in zip(steps, bits, hist) if e.get("forced")]
        if threshold:
            ax.plot(*zip(*threshold), "o", ms=3, color="tab:blue", label="threshold pruning")
        if forced:
            ax.plot(*zip(*forced), "x", ms=8, mew=2, color="tab:red", label="forced round")
        target = target_bits.get(label) if isinstance(target_bits, Mapping) else target_bits
        if target is not None:
            ax.axhline(target, color="tab:green", ls="--", lw=1, label=f"target {target:.2f} bits")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("average bits", fontsize=8)
        ax.set_ylim(0, MAX_BITS + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def _comparison_points(points: Sequence[Any]) -> list[ComparisonPoint]:
    checked = []
    for point in points:
        if len(point) != 4:
            raise ValueError(
                f"plot_accuracy_vs_compression: {tuple(point)!r} is not (method, stored ratio, paper ratio, accuracy); "
                "build the ratios with msq_hf.report.accounting.method_accounting"
            )
        method, stored, paper, acc = point
        if not all(math.isfinite(float(v)) for v in (stored, paper, acc)):
            raise ValueError(
                f"plot_accuracy_vs_compression: non-finite point for {method!r}: "
                f"(stored {stored}, paper {paper}, accuracy {acc})"
            )
        checked.append(ComparisonPoint(str(method), float(stored), float(paper), float(acc)))
    return checked


def plot_accuracy_vs_compression(
    points: Sequence[ComparisonPoint | tuple[str, float, float, float]],
    path: str | os.PathLike[str],
    highlight: str = "MSQ",
) -> Path:
    """Accuracy (%) vs compression of several methods: stored ratio (sign counted) left, paper ratio right.

    ``points``: :class:`~msq_hf.report.accounting.ComparisonPoint` or ``(method, stored ratio, paper ratio,
    accuracy)``; accuracy as a fraction (≤ 1) or a percentage. The left panel is the honest comparison (bits a
    file holds, with the stored bits per weight on its top axis); the right one repeats the points at the papers'
    magnitude-only ratio, so a sign-magnitude method's shift between the two is visible. Points of one method are
    joined; methods starting with ``highlight`` are drawn larger.
    """
    if not points:
        raise ValueError("plot_accuracy_vs_compression: no (method, stored ratio, paper ratio, accuracy) points")
    checked = _comparison_points(points)
    by_method: dict[str, list[ComparisonPoint]] = {}
    for point in checked:
        by_method.setdefault(point.method, []).append(point)
    percent = max(p.accuracy for p in checked) > 1.0
    fig = new_figure(11.0, 4.4)
    stored_ax = fig.add_subplot(1, 2, 1)
    paper_ax = fig.add_subplot(1, 2, 2, sharey=stored_ax)
    right = max(max(p.stored_ratio, p.paper_ratio) for p in checked) * 1.08 + 0.5
    for ax, key, xlabel in (
        (stored_ax, "stored_ratio", "stored ratio (sign counted), x"),
        (paper_ax, "paper_ratio", "paper ratio (magnitude bits), x"),
    ):
        for method, pts in by_method.items():
            pts = sorted(pts, key=lambda p: getattr(p, key))
            big = method.startswith(highlight)
            ax.plot(
                [getattr(p, key) for p in pts],
                [p.accuracy if percent else 100 * p.accuracy for p in pts],
                marker="*" if big else "o",
                markersize=12 if big else 6,
                lw=1,
                label=method,
                zorder=3 if big else 2,
            )
        ax.set_xlim(0.5, right)  # > 0: the top axis is 32 / x
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    stored_ax.set_ylabel("accuracy (%)")
    stored_ax.legend(fontsize=7)
    stored_ax.set_title("what a file stores (sign counted)", fontsize=9)
    paper_ax.set_title("the papers' accounting (magnitude bits only)", fontsize=9)
    import numpy as np

    def to_bits(x: Any) -> Any:  # 32 / ratio, its own inverse; non-positive values (never on the axis) map far away
        x = np.asarray(x, dtype=float)
        return np.divide(FLOAT_BITS, x, out=np.full_like(x, 1e9), where=x > 0)

    top = stored_ax.secondary_xaxis("top", functions=(to_bits, to_bits))
    top.set_xticks([b for b in (32, 8, 6, 5, 4, 3, 2) if FLOAT_BITS / b <= right])
    top.set_xlabel("stored bits per weight", fontsize=8)
    return save_figure(fig, path)


def plot_seed_differences(
    series: Mapping[str, Mapping[int, float]], path: str | os.PathLike[str], goal: float | None = None
) -> Path:
    """Per-seed accuracy differences to a baseline (``{label: {seed: points}}``), one row per series.

    Each seed is a numbered dot; the bar is the mean with one standard error either side, so the plot shows
    whether a mean is carried by every seed or by one. ``goal`` draws the tolerated loss (``-goal``) as a line.
    """
    if not series or not all(series.values()):
        raise ValueError("plot_seed_differences: every series needs at least one seed")
    fig = new_figure(8.0, 1.0 + 0.55 * len(series))
    ax = fig.add_subplot(1, 1, 1)
    for row, by_seed in enumerate(reversed(list(series.values()))):
        values = [float(v) for v in by_seed.values()]
        error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        ax.errorbar(statistics.mean(values), row, xerr=error, fmt="|", ms=14, color="black", capsize=4)
        ax.plot(values, [row] * len(values), "o", ms=5, color="tab:blue", alpha=0.6)
        for seed, value in by_seed.items():
            ax.annotate(str(seed), (float(value), row), xytext=(0, 5), textcoords="offset points", fontsize=6)
    ax.axvline(0.0, color="gray", lw=1)
    if goal is not None:
        ax.axvline(-goal, color="tab:red", ls="--", lw=1, label=f"goal: at most {goal:g} point below")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_yticks(range(len(series)), list(reversed(list(series))), fontsize=8)
    ax.set_xlabel("accuracy difference (points); bar: mean ± 1 standard error; numbers: seeds", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


__all__ = [
    "plot_accuracy_vs_compression",
    "plot_bits_per_layer",
    "plot_bits_timeline",
    "plot_pruning_trajectories",
    "plot_seed_differences",
    "plot_training_curves",
]
