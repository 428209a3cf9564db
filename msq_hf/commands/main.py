"""The ``msq-hf`` command line (also ``python -m msq_hf``): parser skeleton, entry point and error handling.

Commands (one module each in :mod:`msq_hf.commands`):

* ``msq-hf train``: MSQ quantization-aware training, evaluation, a bit-packed export, ``msq_history.json``
  and a report. Without arguments it runs the built-in demo.
* ``msq-hf inspect DIR_OR_REPO``: what an export holds and whether it is intact.
* ``msq-hf export CHECKPOINT_DIR OUTPUT``: turn an ``MSQTrainer`` checkpoint into a bit-packed export.
* ``msq-hf report RUN_OR_EXPORT_DIR``: plots and ``report.md`` of a run, checkpoint or export.

User errors (bad option values, missing files, unreadable exports) end with exit code 1 or 2 and one line
``msq-hf: error: ...`` on stderr, without a traceback; ``--debug`` (or ``MSQ_HF_DEBUG=1``) shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import msq_hf
from msq_hf.commands.common import PROG, CLIError, OneLineParser, details, one_line
from msq_hf.commands.export import add_export_parser
from msq_hf.commands.inspect import add_inspect_parser
from msq_hf.commands.report import add_report_parser
from msq_hf.commands.train import add_train_parser
from msq_hf.errors import MSQError

# Exceptions that are the user's doing (bad values, missing files, unreadable exports): one line, exit 1.
USER_ERRORS = (CLIError, MSQError, ValueError, TypeError, KeyError, OSError, ImportError)
# Commands that load or save models: transformers' own "Loading weights" bars are noise there.
_MODEL_COMMANDS = ("train", "export")


def build_parser() -> argparse.ArgumentParser:
    """The ``msq-hf`` argument parser with its four subcommands."""
    parser = OneLineParser(
        prog=PROG,
        description="MSQ mixed-precision quantization-aware training for Hugging Face "
        "and timm models: train, export, inspect, report.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command. "
        f"'{PROG} train' without options runs the built-in demo (about 10 minutes on 2 CPU cores).",
    )
    parser.add_argument("--version", action="version", version=f"msq_hf {msq_hf.__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors (also: MSQ_HF_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    add_train_parser(sub)
    add_inspect_parser(sub)
    add_export_parser(sub)
    add_report_parser(sub)
    return parser


@contextlib.contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars from transformers (the Trainer's own bar stays)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:  # main() may run in-process (tests, notebooks): restore the global switch
            hf_logging.enable_progress_bar()


def _exit_code(exc: SystemExit) -> int:
    return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``msq-hf`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version and usage errors (already printed)
        return _exit_code(exc)
    if args.command is None:
        parser.print_help(sys.stderr)
        print(f"{PROG}: error: choose a command: train, inspect, export or report", file=sys.stderr)
        return 2
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in msq_history.json
    debug = args.debug or os.environ.get("MSQ_HF_DEBUG", "") not in ("", "0")
    try:
        bars = _quiet_transformers_bars() if args.command in _MODEL_COMMANDS else contextlib.nullcontext()
        with bars:
            return int(args.func(args) or 0)
    except SystemExit as exc:  # a usage error found after parsing (e.g. a config value), already printed
        return _exit_code(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `msq-hf inspect ... | head`: the reader left; stop quietly like other Unix tools
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps the interpreter's final flush quiet
        return 141
    except Exception as exc:
        if debug or not isinstance(exc, USER_ERRORS):
            raise
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        for line in details(exc)[:8]:
            print(f"  {line.strip()}", file=sys.stderr)
        return 1


__all__ = ["USER_ERRORS", "build_parser", "main"]
