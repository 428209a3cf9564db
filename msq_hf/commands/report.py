"""``msq-hf report RUN_OR_EXPORT_DIR``: plots and ``report.md`` of a run, checkpoint or export."""

from __future__ import annotations

import argparse
from typing import Any

from msq_hf.report import write_report


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``sub`` (the ``add_subparsers()`` object of ``msq-hf``)."""
    parser = sub.add_parser(
        "report",
        help="plots and report.md of a run, checkpoint or export",
        description="Write bits_per_layer.png, bits_timeline.png, training_curves.png, "
        "accuracy_vs_compression.png (those the folder's data allows) and report.md.",
    )
    parser.add_argument(
        "path", metavar="RUN_OR_EXPORT_DIR", help="msq-hf train output, MSQTrainer checkpoint or export folder"
    )
    parser.add_argument("--output", "-o", default=None, help="report folder (default: RUN_OR_EXPORT_DIR/report)")
    parser.set_defaults(func=cmd_report)
    return parser


def cmd_report(args: argparse.Namespace) -> int:
    """``msq-hf report``: :func:`msq_hf.report.write_report`; prints the written paths."""
    for path in write_report(args.path, args.output):
        print(path)
    return 0


__all__ = ["add_report_parser", "cmd_report"]
