"""Plots and tables of an MSQ run: bits per layer, the bit timeline, compression/accuracy curves.

* :mod:`~msq_hf.report.history`: ``msq_history.json``, the one record of a run (:class:`RunHistory`,
  :func:`write_history`) and :func:`find_run_data`, which reads it, a checkpoint's ``msq_state.json`` +
  ``trainer_state.json`` or an export's ``msq_manifest.json``;
* :mod:`~msq_hf.report.plots`: one PNG per function, from plain data;
* :mod:`~msq_hf.report.markdown`: :func:`bit_table_markdown` and :func:`write_report` (every applicable
  plot plus ``report.md``).
"""

from __future__ import annotations

from msq_hf.report.history import HISTORY_NAME, HISTORY_VERSION, RunData, RunHistory, find_run_data, write_history
from msq_hf.report.markdown import bit_table_markdown, write_report
from msq_hf.report.plots import (
    plot_accuracy_vs_compression,
    plot_bits_per_layer,
    plot_bits_timeline,
    plot_training_curves,
)

__all__ = [
    "HISTORY_NAME",
    "HISTORY_VERSION",
    "RunData",
    "RunHistory",
    "bit_table_markdown",
    "find_run_data",
    "plot_accuracy_vs_compression",
    "plot_bits_per_layer",
    "plot_bits_timeline",
    "plot_training_curves",
    "write_history",
    "write_report",
]
