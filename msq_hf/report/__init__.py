"""Plots and tables of an MSQ run: bits per layer, the bit timeline, compression/accuracy curves, seed spreads.

* :mod:`~msq_hf.report.history`: ``msq_history.json``, the one record of a run (:class:`RunHistory`,
  :func:`write_history`) and :func:`find_run_data`, which reads it, a checkpoint's ``msq_state.json`` +
  ``trainer_state.json`` or an export's ``msq_manifest.json``;
* :mod:`~msq_hf.report.accounting`: :func:`method_accounting`, the paper ratio (magnitude bits) beside the stored
  ratio (sign counted) of any method, the one place that says what each method stores;
* :mod:`~msq_hf.report.plots`: one PNG per function, from plain data (:mod:`~msq_hf.report.figure`: the headless
  figure they draw on);
* :mod:`~msq_hf.report.markdown`: :func:`bit_table_markdown` and :func:`write_report` (every applicable
  plot plus ``report.md``).
"""

from __future__ import annotations

from msq_hf.report.accounting import (
    Accounting,
    ComparisonPoint,
    accounting_from_paper_ratio,
    family_of_label,
    layer_stored_bits,
    method_accounting,
)
from msq_hf.report.history import HISTORY_NAME, HISTORY_VERSION, RunData, RunHistory, find_run_data, write_history
from msq_hf.report.markdown import bit_table_markdown, write_report
from msq_hf.report.plots import (
    plot_accuracy_vs_compression,
    plot_bits_per_layer,
    plot_bits_timeline,
    plot_pruning_trajectories,
    plot_seed_differences,
    plot_training_curves,
)

__all__ = [
    "Accounting",
    "ComparisonPoint",
    "HISTORY_NAME",
    "HISTORY_VERSION",
    "RunData",
    "RunHistory",
    "accounting_from_paper_ratio",
    "bit_table_markdown",
    "family_of_label",
    "find_run_data",
    "layer_stored_bits",
    "method_accounting",
    "plot_accuracy_vs_compression",
    "plot_bits_per_layer",
    "plot_bits_timeline",
    "plot_pruning_trajectories",
    "plot_seed_differences",
    "plot_training_curves",
    "write_history",
    "write_report",
]
