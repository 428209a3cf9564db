"""The ``msq-hf`` command line (also ``python -m msq_hf``): parser skeleton, dispatcher and error handling.

Commands (one module each in :mod:`msq_hf.commands`, listed in :data:`COMMANDS`):

* ``msq-hf train``: MSQ quantization-aware training, evaluation, a bit-packed export, ``msq_history.json``
  and a report. Without arguments it runs the built-in demo.
* ``msq-hf inspect DIR_OR_REPO``: what an export holds and whether it is intact.
* ``msq-hf export CHECKPOINT_DIR OUTPUT``: turn an ``MSQTrainer`` checkpoint into a bit-packed export.
* ``msq-hf report RUN_OR_EXPORT_DIR``: plots and ``report.md`` of a run, checkpoint or export.

Startup: this module imports only the standard library and :mod:`msq_hf.commands.common`. The options of
``inspect``, ``export`` and ``report`` are declared here with argparse alone; a command's module (torch,
transformers, ...) is imported by name from :data:`COMMANDS` only once that command runs. ``train`` declares its
own parser, generated from ``MSQConfig``'s declarations and the pipeline's dataclasses, in a light module of its
own (:mod:`msq_hf.commands.train_args`: ``transformers.hf_argparser``, no torch), imported only for
``msq-hf train ...``. ``msq-hf --help``, ``msq-hf inspect|export|report --help`` and ``msq-hf train --help``
therefore answer without torch (docs/cli.md, "Startup time").

User errors (bad option values, missing files, unreadable exports) end with exit code 1 or 2 and one line
``msq-hf: error: ...`` on stderr, without a traceback; ``--debug`` (or ``MSQ_HF_DEBUG=1``) shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import msq_hf
from msq_hf.commands.common import PROG, CLIError, OneLineParser, details, one_line, positive_int, subcommand_parser
from msq_hf.errors import MSQError

# Exceptions that are the user's doing (bad values, missing files, unreadable exports): one line, exit 1.
USER_ERRORS = (CLIError, MSQError, ValueError, TypeError, KeyError, OSError, ImportError)
# Commands that load or save models: transformers' own "Loading weights" bars are noise there.
_MODEL_COMMANDS = ("train", "export")


def _inspect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="DIR_OR_REPO", help="export folder or Hub repo id (owner/name)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the weight files")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max-layers", type=positive_int, default=None, help="show at most N layers in the table")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")


def _export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="checkpoint folder (config.json + weights)")
    parser.add_argument("output", metavar="OUTPUT", help="export folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it holds an earlier msq_hf export")
    parser.add_argument(
        "--force-overwrite",
        action="store_true",
        help="replace OUTPUT whatever it holds (also the current directory or a folder that is not an export)",
    )
    parser.add_argument(
        "--push-to-hub", action="store_true", help="also upload the export to the Hub (needs --repo-id)"
    )
    parser.add_argument("--repo-id", default=None, help="Hub repo id owner/name for --push-to-hub")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--max-shard-size", default=None, help="split the weights above this size (e.g. 2GB)")


def _report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", metavar="RUN_OR_EXPORT_DIR", help="msq-hf train output, MSQTrainer checkpoint or export folder"
    )
    parser.add_argument("--output", "-o", default=None, help="report folder (default: RUN_OR_EXPORT_DIR/report)")


@dataclass(frozen=True)
class Command:
    """One ``msq-hf`` command: its line in ``msq-hf --help`` and where its code is.

    ``module.run`` runs it (``run(args) -> exit code``); the module is imported only when the command runs.
    ``options`` declares its arguments with argparse alone. Otherwise ``parser_module.add_parser(sub)`` adds the
    subparser itself (``train``: its flags are generated from dataclasses); that module is imported when the
    command is named, also for its ``--help``, so it must stay light (no torch).
    """

    help: str
    module: str
    run: str
    options: Callable[[argparse.ArgumentParser], None] | None = None
    description: str = ""
    parser_module: str = ""
    add_parser: str = ""


COMMANDS: dict[str, Command] = {
    "train": Command(
        help="train with MSQ, evaluate, export and write a report",
        module="msq_hf.commands.train",
        run="cmd_train",
        parser_module="msq_hf.commands.train_args",
        add_parser="add_train_parser",
    ),
    "inspect": Command(
        help="show the bit scheme, sizes and integrity of an export",
        module="msq_hf.commands.inspect",
        run="cmd_inspect",
        options=_inspect_options,
        description="Read an msq_hf export (folder or Hub repo id) without building the model. "
        "Exit code 0 = intact, 1 = a check failed, 2 = nothing readable at that path.",
    ),
    "export": Command(
        help="write a bit-packed export from an MSQTrainer checkpoint",
        module="msq_hf.commands.export",
        run="cmd_export",
        options=_export_options,
        description="Load an MSQTrainer checkpoint or save_model folder (timm or transformers; also an msq-hf "
        "train output folder, which uses its model/ subfolder) and write a bit-packed export with msq_hf.export.",
    ),
    "report": Command(
        help="plots and report.md of a run, checkpoint or export",
        module="msq_hf.commands.report",
        run="cmd_report",
        options=_report_options,
        description="Write bits_per_layer.png, bits_timeline.png, training_curves.png, "
        "accuracy_vs_compression.png (those the folder's data allows) and report.md.",
    ),
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), or None (help, version, none)."""
    for word in argv:
        if word in ("-h", "--help", "--version"):
            return None  # top-level help: the skeleton suffices
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``msq-hf`` parser. Every command is listed; a command that declares its parser in a module (``train``)
    gets its real parser only when it is ``command`` (that imports its ``parser_module``), else a stand-in."""
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=subcommand_parser)
    for name, spec in COMMANDS.items():
        if spec.options is not None:
            spec.options(sub.add_parser(name, help=spec.help, description=spec.description))
        elif name == command:
            getattr(importlib.import_module(spec.parser_module), spec.add_parser)(sub)
        else:
            sub.add_parser(name, help=spec.help, add_help=False)  # stand-in: listed, never parsed
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Import the chosen command's module and run it on the parsed ``args``."""
    spec = COMMANDS[args.command]
    run = getattr(importlib.import_module(spec.module), spec.run)
    return int(run(args) or 0)


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
    argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        parser = build_parser(chosen_command(argv))
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors (already printed)
        return _exit_code(exc)
    if args.command is None:
        parser.print_help(sys.stderr)
        *others, last = COMMANDS
        print(f"{PROG}: error: choose a command: {', '.join(others)} or {last}", file=sys.stderr)
        return 2
    args.argv = argv  # recorded in msq_history.json
    debug = args.debug or os.environ.get("MSQ_HF_DEBUG", "") not in ("", "0")
    try:
        bars = _quiet_transformers_bars() if args.command in _MODEL_COMMANDS else contextlib.nullcontext()
        with bars:
            return run_command(args)
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


__all__ = ["COMMANDS", "USER_ERRORS", "Command", "build_parser", "chosen_command", "main", "run_command"]
