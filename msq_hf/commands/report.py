"""``msq-hf report RUN_OR_EXPORT_DIR``: plots and ``report.md`` of a run, checkpoint or export (options:
``commands.main``)."""

from __future__ import annotations

import argparse

from msq_hf.report import write_report


def cmd_report(args: argparse.Namespace) -> int:
    """``msq-hf report``: :func:`msq_hf.report.write_report`; prints the written paths."""
    for path in write_report(args.path, args.output):
        print(path)
    return 0


__all__ = ["cmd_report"]
