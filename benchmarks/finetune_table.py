"""Result files and tables of ``benchmarks/finetune_pretrained.py``: one name per run, both accountings per method,
mean ± std over seeds, and MSQ beside the uniform methods that store the same bits per weight.

Pure functions over the JSON records (no training): the driver and ``tests/benchmarks/test_finetune_table.py``
use them. A record is ``{"model", "method", "bits", "seed", "summary": {"test_accuracy", ...}, ...}``; records
written before ``--method`` existed have no ``method`` and are MSQ runs.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import MethodRow, pair_equal_stored_bits  # noqa: E402

from msq_hf.arguments import config_flags  # noqa: E402
from msq_hf.report.accounting import (  # noqa: E402
    Accounting,
    ComparisonPoint,
    accounting_from_paper_ratio,
    format_ratio,
    method_accounting,
)

#: fine-tuning methods: MSQ through the recipe, and the same budget without quantization or with a uniform grid
METHODS = ("msq", "float", "dorefa", "lsq")
#: methods that train at one uniform weight width given by ``--bits``
UNIFORM = ("dorefa", "lsq")


def check_method(method: str, bits: int | None) -> None:
    """``ValueError`` unless ``bits`` is given exactly for the uniform methods."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if (method in UNIFORM) != (bits is not None):
        raise ValueError(f"--bits is {'required' if method in UNIFORM else 'not used'} for --method {method}")


def result_stem(model: str, method: str, bits: int | None, seed: int, tag: str | None = None) -> str:
    """``<model>_<method>[_w<bits>][_<tag>]_seed<k>``: the result file's and the output folder's name.

    ``tag`` names a variant (e.g. ``clip0`` for runs with ``--max_grad_norm 0``); tagged runs form their own rows,
    compared with the float and uniform runs of their budget (:func:`baseline_tag`).
    """
    check_method(method, bits)
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9.-]+", tag):
        raise ValueError(f"tag {tag!r} may only hold letters, digits, '.' and '-'")
    width = f"_w{bits}" if bits is not None else ""
    return f"{model}_{method}{width}{f'_{tag}' if tag else ''}_seed{seed}"


def baseline_tag(method: str, tag: str | None, extra: list[str]) -> str | None:
    """The tag whose float and uniform runs share this run's budget.

    An MSQ run whose extra flags are all MSQConfig hyperparameters (``--target_compression 16``,
    ``--rewind_weights true``) changes MSQ, not the budget: it is compared with the untagged float and uniform
    runs (None). Any other flag (``--max_grad_norm 0``, ``--num_train_epochs 2``) changes the budget, so the
    run's own tag names its baselines.
    """
    given = {token.split("=", 1)[0] for token in extra if token.startswith("--")}
    return None if method == "msq" and given <= config_flags() else tag


def legacy_stem(model: str, seed: int) -> str:
    """The name MSQ results had before ``--method`` (``<model>_seed<k>``)."""
    return f"{model}_seed{seed}"


def record_method(record: dict[str, Any]) -> str:
    """The record's method (``msq`` for records that predate ``--method``)."""
    return record.get("method", "msq")


def record_accounting(record: dict[str, Any]) -> Accounting:
    """Paper and stored ratio of a run's weights.

    MSQ: from its bit scheme and layer sizes when recorded, else from its paper ratio (exact for a
    parameter-weighted ratio); uniform methods: their one width; float: 32 bits.
    """
    method = record_method(record)
    if method == "float":
        return method_accounting("float", 32)
    if method in UNIFORM:
        return method_accounting(method, record["bits"])
    if record.get("bit_scheme") and record.get("numels"):
        return method_accounting("msq", record["bit_scheme"], record["numels"])
    return accounting_from_paper_ratio("msq", record["summary"]["compression"])


def method_title(method: str, bits: int | None, tag: str | None = None) -> str:
    """``MSQ``, ``float``, ``DoReFa W4``, ``LSQ W3 [clip0]``."""
    names = {"msq": "MSQ", "float": "float", "dorefa": "DoReFa", "lsq": "LSQ"}
    return names[method] + (f" W{bits}" if bits is not None else "") + (f" [{tag}]" if tag else "")


@dataclass
class Group:
    """The seeds of one (model, method, bits, tag): accuracies in %, mean accounting, MSQ pacing numbers."""

    model: str
    method: str
    bits: int | None
    records: list[dict[str, Any]]
    tag: str | None = None

    @property
    def title(self) -> str:
        return method_title(self.method, self.bits, self.tag)

    @property
    def baseline_tag(self) -> str | None:
        """The tag of the float and uniform runs with this group's budget (:func:`baseline_tag`; records
        written before it was recorded use their own tag)."""
        return self.records[0].get("baseline_tag", self.tag)

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.records]

    @property
    def accuracies(self) -> list[float]:
        return [100 * r["summary"]["test_accuracy"] for r in self.records]

    @property
    def accounting(self) -> Accounting:
        accts = [record_accounting(r) for r in self.records]
        return Accounting(
            family=accts[0].family,
            magnitude_bits=statistics.mean(a.magnitude_bits for a in accts),
            stored_bits=statistics.mean(a.stored_bits for a in accts),
            paper_ratio=statistics.mean(a.paper_ratio for a in accts),
            stored_ratio=statistics.mean(a.stored_ratio for a in accts),
        )

    def summary_values(self, key: str) -> list[Any]:
        """``summary[key]`` of every seed that recorded it."""
        return [r["summary"][key] for r in self.records if r["summary"].get(key) is not None]


def group_records(records: list[dict[str, Any]]) -> list[Group]:
    """Records grouped by (model, method, bits, tag), seeds sorted; groups in model, tag, :data:`METHODS` order."""
    groups: dict[tuple[str, str, int | None, str | None], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], record_method(r), r.get("bits"), r.get("tag")), []).append(r)
    out = [Group(m, meth, b, sorted(rs, key=lambda r: r["seed"]), t) for (m, meth, b, t), rs in groups.items()]
    return sorted(out, key=lambda g: (g.model, g.tag or "", METHODS.index(g.method), g.bits or 0))


def mean_std(values: list[float]) -> str:
    """``92.10`` for one value, ``92.10 ± 0.12 (92.0, 92.2)`` for several (sample std)."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return (
        f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ("
        + ", ".join(f"{v:.2f}" for v in values)
        + ")"
    )


def _mean_cell(values: list[Any], fmt: str, scale: float = 1.0) -> str:
    return "–" if not values else format(scale * statistics.mean(values), fmt)


def vs_float(group: Group, groups: list[Group]) -> float | None:
    """Mean accuracy (pt) minus the mean of the float fine-tune with the same model and budget (all its seeds)."""
    ref = next((g for g in groups if (g.model, g.method, g.tag) == (group.model, "float", group.baseline_tag)), None)
    if ref is None or group is ref:
        return None
    return statistics.mean(group.accuracies) - statistics.mean(ref.accuracies)


def table(records: list[dict[str, Any]]) -> str:
    """Markdown table: one row per (model, method, bits), accuracy over seeds, both ratios, MSQ's pacing numbers."""
    groups = group_records(records)
    rows = [
        "| model | method | seeds | test acc (%) | vs float fine-tune (pt) | float checkpoint (%) | bits / weight "
        "(paper / stored) | paper ratio | stored ratio | threshold share | forced-round layers | max drop after "
        "pruning (pt) | k flip rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        a, delta = g.accounting, vs_float(g, groups)
        start = [r["float_test_accuracy"] for r in g.records if r.get("float_test_accuracy") is not None]
        msq = g.method == "msq"
        rows.append(
            f"| {g.model} | {g.title} | {len(g.seeds)} | {mean_std(g.accuracies)} "
            f"| {'–' if delta is None else f'{delta:+.2f}'} | {_mean_cell(start, '.2f', 100)} "
            f"| {a.magnitude_bits:.2f} / {a.stored_bits:.2f} | {format_ratio(a.paper_ratio)} "
            f"| {format_ratio(a.stored_ratio)} "
            f"| {_mean_cell(g.summary_values('threshold_share'), '.1f', 100) + ' %' if msq else '–'} "
            f"| {_mean_cell(g.summary_values('forced_round_layers'), '.1f') if msq else '–'} "
            f"| {_mean_cell(g.summary_values('max_pruning_eval_drop'), '.2f', 100) if msq else '–'} "
            f"| {_mean_cell(g.summary_values('k_flip_rate'), '.2f') if msq else '–'} |"
        )
    return "\n".join(rows)


def method_rows(records: list[dict[str, Any]]) -> list[MethodRow]:
    """The groups as ``benchmarks/accuracy.py`` rows (one model at a time), for its equal-stored-bits pairing."""
    return [
        MethodRow(
            method=f"{g.model} {g.title}",
            family=g.method,
            title=f"{g.model} {g.title}",
            seeds=g.seeds,
            accuracies=g.accuracies,
            act="as the recipe",
            act_recorded=True,
            accounting=g.accounting,
            wall_min=statistics.mean(r.get("wall_seconds", 0.0) for r in g.records) / 60,
        )
        for g in group_records(records)
    ]


def pairing_table(records: list[dict[str, Any]], tolerance: float = 0.25) -> str:
    """Markdown table: each MSQ group beside the uniform groups of the same model and budget (its
    :attr:`Group.baseline_tag`) within ``tolerance`` stored bits per weight (``accuracy.pair_equal_stored_bits``),
    with the accuracy difference."""
    lines = [
        "| MSQ | stored bits / weight | paper / stored ratio | acc (%) | uniform partner | stored bits / weight "
        "| paper / stored ratio | acc (%) | MSQ − partner (pt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = group_records(records)
    for msq in (g for g in groups if g.method == "msq"):
        uniform = [g for g in groups if g.method in UNIFORM and (g.model, g.tag) == (msq.model, msq.baseline_tag)]
        for anchor, partners in pair_equal_stored_bits(
            method_rows(msq.records + [r for g in uniform for r in g.records]), tolerance
        ):
            a = anchor.accounting
            head = (
                f"| {anchor.title} | {a.stored_bits:.2f} | {format_ratio(a.paper_ratio)} / "
                f"{format_ratio(a.stored_ratio)} | {mean_std(anchor.accuracies)} |"
            )
            if not partners:
                lines.append(head + f" none run (needs a uniform {round(a.stored_bits)}-bit run) | | | | |")
            for p in partners:
                b = p.accounting
                lines.append(
                    head + f" {p.title} | {b.stored_bits:.2f} | {format_ratio(b.paper_ratio)} / "
                    f"{format_ratio(b.stored_ratio)} | {mean_std(p.accuracies)} | {anchor.accuracy - p.accuracy:+.2f} |"
                )
    return "\n".join(lines)


#: a tag's leading target marker (``t16``, ``t16-``): runs that differ only in it are one series of a plot
TARGET_MARK = re.compile(r"^t\d+(\.\d+)?(-|$)")


def series_tag(tag: str | None) -> str | None:
    """``tag`` without its target marker: ``t16-mse`` -> ``mse``, ``t16`` -> None, ``ac-rewind`` unchanged."""
    rest = TARGET_MARK.sub("", tag) if tag else tag
    return rest or None


def comparison_points(
    records: list[dict[str, Any]], model: str, msq_series: Mapping[str | None, str]
) -> list[ComparisonPoint]:
    """Mean accuracy against both ratios of ``model``'s groups on the shared budget (no baseline tag): float, every
    uniform width, and the MSQ groups whose :func:`series_tag` is a key of ``msq_series`` (``{tag: legend label}``;
    None: the untagged MSQ settings; one series per key, its targets joined), for
    :func:`msq_hf.report.plot_accuracy_vs_compression`."""
    points = []
    for g in group_records(records):
        if g.model != model or g.baseline_tag is not None:
            continue
        if g.method == "msq" and series_tag(g.tag) not in msq_series:
            continue
        a = g.accounting
        label = msq_series[series_tag(g.tag)] if g.method == "msq" else method_title(g.method, None)
        points.append(ComparisonPoint(label, a.stored_ratio, a.paper_ratio, statistics.mean(g.accuracies)))
    return points


__all__ = [
    "METHODS",
    "TARGET_MARK",
    "comparison_points",
    "series_tag",
    "UNIFORM",
    "Group",
    "baseline_tag",
    "check_method",
    "group_records",
    "legacy_stem",
    "mean_std",
    "method_rows",
    "method_title",
    "pairing_table",
    "record_accounting",
    "record_method",
    "result_stem",
    "table",
    "vs_float",
]
