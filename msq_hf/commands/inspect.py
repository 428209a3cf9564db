"""``msq-hf inspect DIR_OR_REPO``: what an export holds and whether it is intact."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from msq_hf.commands.common import PROG, one_line, positive_int
from msq_hf.errors import MSQError
from msq_hf.io.inspect import format_report, inspect_export


def add_inspect_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to ``sub`` (the ``add_subparsers()`` object of ``msq-hf``)."""
    parser = sub.add_parser(
        "inspect",
        help="show the bit scheme, sizes and integrity of an export",
        description="Read an msq_hf export (folder or Hub repo id) without building the model. "
        "Exit code 0 = intact, 1 = a check failed, 2 = nothing readable at that path.",
    )
    parser.add_argument("path", metavar="DIR_OR_REPO", help="export folder or Hub repo id (owner/name)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the weight files")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max-layers", type=positive_int, default=None, help="show at most N layers in the table")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.set_defaults(func=cmd_inspect)
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    """``msq-hf inspect``: print :func:`msq_hf.format_report` (or JSON); exit 0 / 1 (check failed) / 2 (unreadable)."""
    try:
        report = inspect_export(args.path, verify=not args.no_verify, revision=args.revision)
    except (MSQError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_report(report, args.max_layers))
    if not report.ok:
        print(f"{PROG}: error: {report.errors[0].splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_inspect_parser", "cmd_inspect"]
