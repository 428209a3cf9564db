"""Plots and tables of an MSQ run: bits per layer, the bit timeline, compression/accuracy curves.

Every plotting function takes plain data (a ``{layer: bits}`` dict, the controller ``history`` list,
the Trainer ``log_history`` list, ``(method, compression, accuracy)`` tuples) and writes one PNG with
matplotlib's object API on the Agg canvas (no pyplot, no global backend change, works headless).
They return the path they wrote.

:func:`write_report` finds what a run or export folder holds and writes every applicable plot plus a
``report.md``:

* ``msq_history.json`` written by ``msq-hf train`` (controller history, Trainer log history, layer sizes,
  final results, baselines);
* ``msq_state.json`` written by ``MSQTrainer`` into ``save_model`` output and every ``checkpoint-*``
  folder (the controller state, whose ``history`` is the pruning timeline), with ``trainer_state.json``
  next to it (the Trainer log history: eval accuracy);
* ``msq_manifest.json`` of an export (final bits and layer sizes only: no timeline).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HISTORY_NAME",
    "RunData",
    "bit_table_markdown",
    "find_run_data",
    "plot_accuracy_vs_compression",
    "plot_bits_per_layer",
    "plot_bits_timeline",
    "plot_training_curves",
    "write_report",
]

HISTORY_NAME = "msq_history.json"
"""File written by ``msq-hf train`` into its output directory (see :func:`find_run_data`)."""

_STATE_NAME = "msq_state.json"
_TRAINER_STATE_NAME = "trainer_state.json"
_MANIFEST_NAME = "msq_manifest.json"
_MAX_BITS = 8


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


def _layer_order(history: Sequence[Mapping[str, Any]], scheme: Mapping[str, int] | None = None) -> list[str]:
    names: list[str] = list(scheme) if scheme else []
    for entry in history:
        for name in entry.get("bits") or {}:
            if name not in names:
                names.append(name)
    return names


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
    ax.barh(range(len(names)), bits, color=[cmap((b - 1) / (_MAX_BITS - 1)) for b in bits])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(labels, fontsize=7 if len(names) <= 60 else 5)
    ax.invert_yaxis()  # first layer on top, like the model
    ax.set_xlim(0, _MAX_BITS + 0.5)
    ax.set_xticks(range(0, _MAX_BITS + 1))
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
    names = _layer_order(entries)
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
        edges, np.arange(len(names) + 1), grid, cmap=_bits_cmap(), vmin=0.5, vmax=_MAX_BITS + 0.5, shading="flat"
    )
    ax.set_ylim(len(names), 0)  # first layer on top
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(_short_names(names), fontsize=7 if len(names) <= 60 else 5)
    ax.set_xlabel("training step")
    ticks = fig.colorbar(mesh, ax=ax, pad=0.01, ticks=range(1, _MAX_BITS + 1))
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


# ------------------------------------------------------------------------------------------------
# tables


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


# ------------------------------------------------------------------------------------------------
# finding the data of a run


@dataclass
class RunData:
    """What :func:`find_run_data` collected from a folder (any field may be empty)."""

    source: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    scheme: dict[str, int] = field(default_factory=dict)
    numels: dict[str, int] = field(default_factory=dict)
    target: float | None = None
    count_sign_bit: bool = False
    total_steps: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    baselines: list[tuple[str, float, float]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # which files were read


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc


def _latest_checkpoint(directory: Path) -> Path | None:
    found = [
        (int(m.group(1)), p)
        for p in directory.glob("checkpoint-*")
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    return max(found)[1] if found else None


def _numels_from_state(state: Mapping[str, Any]) -> dict[str, int]:
    schedule = state.get("schedule")
    if isinstance(schedule, Mapping):
        for key in ("numels", "numel"):
            if isinstance(schedule.get(key), Mapping):
                return {k: int(v) for k, v in schedule[key].items()}
    return {}


def _numels_from_weights(folder: Path, names: Iterable[str]) -> dict[str, int]:
    """Weight counts of ``names`` from the safetensors headers of a checkpoint (no tensor is read).

    ``msq_state.json`` holds no layer sizes, but every ``<layer>.weight`` shape is in the header.
    Layers whose key is not found (e.g. renamed on disk) are left out.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return {}
    from msq_hf.errors import MSQError
    from msq_hf.io.load import read_safetensors_header

    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            header = read_safetensors_header(file)
        except (MSQError, OSError):
            continue  # a broken weight file only costs the per-layer sizes of the report
        shapes.update({k: v["shape"] for k, v in header.items() if isinstance(v, dict) and "shape" in v})
    out: dict[str, int] = {}
    for name in names:
        shape = shapes.get(f"{name}.weight")
        if shape is not None:
            out[name] = int(math.prod(shape))
    return out


def find_run_data(path: str | os.PathLike[str]) -> RunData:
    """Collect the history, logs and final bits from a run folder, checkpoint folder or export folder.

    Looks (in this order, merging what it finds) for ``msq_history.json``, ``msq_state.json`` +
    ``trainer_state.json`` in the folder or its newest ``checkpoint-*`` subfolder, ``msq_manifest.json``
    in the folder or an ``export`` subfolder. Raises ``FileNotFoundError`` naming the folder when none
    of them exists.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory (expected an msq-hf train output, a checkpoint or an export folder)"
        )
    data = RunData(source=root)
    hist_path = root / HISTORY_NAME
    if hist_path.is_file():
        raw = _read_json(hist_path)
        data.files.append(str(hist_path))
        data.history = list(raw.get("history") or [])
        data.log_history = list(raw.get("log_history") or [])
        data.numels = {k: int(v) for k, v in (raw.get("numels") or {}).items()}
        data.scheme = {k: int(v) for k, v in (raw.get("bit_scheme") or {}).items()}
        data.target = raw.get("target_compression")
        data.count_sign_bit = bool(raw.get("count_sign_bit", False))
        data.total_steps = raw.get("total_steps")
        data.summary = dict(raw.get("summary") or {})
        data.baselines = [tuple(p) for p in raw.get("baselines") or []]  # type: ignore[misc]
    for folder in (root, _latest_checkpoint(root)):
        if folder is None:
            continue
        state_path = folder / _STATE_NAME
        if state_path.is_file() and not data.history:
            state = _read_json(state_path)
            data.files.append(str(state_path))
            data.history = list(state.get("history") or [])
            data.scheme = data.scheme or {k: int(v) for k, v in (state.get("bits") or {}).items()}
            data.numels = data.numels or _numels_from_state(state) or _numels_from_weights(folder, data.scheme)
            data.total_steps = data.total_steps or state.get("total_steps")
        trainer_state = folder / _TRAINER_STATE_NAME
        if trainer_state.is_file() and not data.log_history:
            data.files.append(str(trainer_state))
            data.log_history = list(_read_json(trainer_state).get("log_history") or [])
        config_path = folder / "config.json"
        if config_path.is_file() and data.target is None:
            qc = (_read_json(config_path) or {}).get("quantization_config") or {}
            data.target = qc.get("target_compression")
            data.count_sign_bit = bool(qc.get("count_sign_bit", data.count_sign_bit))
    for folder in (root, root / "export"):
        manifest_path = folder / _MANIFEST_NAME
        if manifest_path.is_file():
            manifest = _read_json(manifest_path)
            data.files.append(str(manifest_path))
            layers = manifest.get("layers") or {}
            # the export's scheme is the ground truth of what was stored; the manifest lists layers in
            # state-dict key order (alphabetical), so keep the model order of the history when known
            order = [n for n in (list(data.scheme) or _layer_order(data.history)) if n in layers]
            order += [n for n in layers if n not in order]
            data.scheme = {n: int(layers[n]["bits"]) for n in order}
            data.numels = data.numels or {n: int(i["numel"]) for n, i in layers.items()}
            break
    if not data.scheme and data.history:
        data.scheme = {k: int(v) for k, v in (data.history[-1].get("bits") or {}).items()}
    if not data.files:
        raise FileNotFoundError(
            f"{root}: no {HISTORY_NAME}, {_STATE_NAME} (also in checkpoint-*/) or "
            f"{_MANIFEST_NAME} found; pass an msq-hf train output dir, a checkpoint or an export"
        )
    return data


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
        md += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
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
    points = list(data.baselines)
    acc = summary.get("test_accuracy")
    comp = summary.get("compression")
    if isinstance(acc, (int, float)) and isinstance(comp, (int, float)):
        points.append(("MSQ (this run)", float(comp), float(acc)))
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
