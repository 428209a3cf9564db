"""The report's plots: bits per layer, the bit timeline, compression/accuracy curves, accuracy vs compression.

Every function takes plain data (a ``{layer: bits}`` dict, the controller ``history`` list, the Trainer
``log_history`` list, ``(method, compression, accuracy)`` tuples) and writes one PNG with matplotlib's object
API on the Agg canvas (no pyplot, no global backend change, works headless). They return the path they wrote.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from msq_hf.report.history import layer_order

MAX_BITS = 8

# ------------------------------------------------------------------------------------------------
# matplotlib helpers


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


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
) -> Path:
    """Horizontal bar chart of the final bits per layer (model order, top to bottom).

    Horizontal bars keep long layer names readable. With ``numels`` each label also shows the layer's
    weight count and the title the parameter-weighted average and compression ratio.
    """
    if not scheme:
        raise ValueError("plot_bits_per_layer: the bit scheme is empty (no quantized layers)")
    names = list(scheme)
    bits = [int(scheme[n]) for n in names]
    labels = _short_names(names, 40)
    if numels:
        labels = [f"{label}  ({_count(numels.get(n, 0))})" for label, n in zip(labels, names)]
    fig = _figure(8.0, min(max(2.5, 0.22 * len(names) + 1.2), 40.0))
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
        if numels:
            total = sum(numels.get(n, 0) for n in names)
            if total:
                avg = sum(numels.get(n, 0) * scheme[n] for n in names) / total
                title += f", avg {avg:.2f} bits, {32 / avg:.2f}x"
        title += ")"
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


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
) -> Path:
    """Heat map of bits per layer (rows, model order) over training steps (columns).

    ``history`` is :attr:`MSQController.history`: one entry per pruning step with ``step`` and
    ``bits``. Each entry's bits hold from its step until the next entry (or ``total_steps``); the
    compression after each step is written above the map.
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
    fig = _figure(9.0, min(max(3.0, 0.2 * len(names) + 1.8), 40.0))
    ax = fig.add_subplot(1, 1, 1)
    mesh = ax.pcolormesh(
        edges, np.arange(len(names) + 1), grid, cmap=_bits_cmap(), vmin=0.5, vmax=MAX_BITS + 0.5, shading="flat"
    )
    ax.set_ylim(len(names), 0)  # first layer on top
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(_short_names(names), fontsize=7 if len(names) <= 60 else 5)
    ax.set_xlabel("training step")
    ticks = fig.colorbar(mesh, ax=ax, pad=0.01, ticks=range(1, MAX_BITS + 1))
    ticks.set_label("bits")
    comps = [e.get("compression") for e in entries]
    final = next((s for s, e in zip(steps, entries) if e.get("phase") == "final"), None)
    if final is not None:
        ax.axvline(final, color="white", lw=1.2, ls="--")
    title = "MSQ bits per layer over training"
    if comps[0] is not None and comps[-1] is not None:
        title += f" (compression {comps[0]:.2f}x → {comps[-1]:.2f}x"
        title += f", final round at step {final})" if final is not None else ")"
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


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
) -> Path:
    """Compression ratio over training (left axis) and eval accuracy when logged (right axis).

    Compression comes from the Trainer ``log_history`` (``msq/compression``, every logging step) when
    present, else from the controller ``history`` (pruning steps), drawn as a step function.
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
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    if xs:
        handles += ax.step(xs, comp, where="post", color="tab:blue", label="compression (x)")
        if target:
            handles.append(ax.axhline(target, color="tab:blue", ls=":", lw=1, label=f"target {target:g}x"))
        ax.set_ylabel("compression ratio (x)", color="tab:blue")
        ax.set_ylim(0, max(comp + [target or 0]) * 1.1)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    if acc_x:
        ax2 = ax.twinx()
        handles += ax2.plot(acc_x, [100 * a for a in acc], "o-", color="tab:red", label="eval accuracy (%)")
        ax2.set_ylabel("eval accuracy (%)", color="tab:red")
        ax2.set_ylim(0, 100)
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title("MSQ training: compression" + (" and accuracy" if acc_x else ""), fontsize=9)
    return _save(fig, path)


def plot_accuracy_vs_compression(
    points: Sequence[tuple[str, float, float]], path: str | os.PathLike[str], highlight: str = "MSQ"
) -> Path:
    """Scatter of accuracy (%) vs compression (x) for several methods, e.g. MSQ against baselines.

    ``points``: ``(method, compression, accuracy)``; accuracy as a fraction (≤ 1) or a percentage.
    Points of the same method are joined; methods starting with ``highlight`` are drawn larger.
    """
    if not points:
        raise ValueError("plot_accuracy_vs_compression: no (method, compression, accuracy) points")
    by_method: dict[str, list[tuple[float, float]]] = {}
    for method, comp, acc in points:
        if not (math.isfinite(comp) and math.isfinite(acc)):
            raise ValueError(f"plot_accuracy_vs_compression: non-finite point for {method!r}: ({comp}, {acc})")
        by_method.setdefault(str(method), []).append((float(comp), float(acc)))
    percent = max(acc for _, _, acc in points) > 1.0
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for method, pts in by_method.items():
        pts.sort()
        big = method.startswith(highlight)
        ax.plot(
            [p[0] for p in pts],
            [p[1] if percent else 100 * p[1] for p in pts],
            marker="*" if big else "o",
            markersize=12 if big else 6,
            lw=1,
            label=method,
            zorder=3 if big else 2,
        )
    ax.set_xlabel("compression ratio (x)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs compression", fontsize=9)
    return _save(fig, path)


__all__ = [
    "plot_accuracy_vs_compression",
    "plot_bits_per_layer",
    "plot_bits_timeline",
    "plot_training_curves",
]
