"""``msq-hf inspect DIR_OR_REPO``: what an export holds and whether it is intact (options: ``commands.main``)."""

from __future__ import annotations

import argparse
import json
import sys

from msq_hf.commands.common import PROG, one_line
from msq_hf.errors import MSQError
from msq_hf.io.inspect import format_report, inspect_export


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


__all__ = ["cmd_inspect"]
