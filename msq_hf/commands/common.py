"""Pieces shared by the ``msq-hf`` subcommands: the one-line error parsers, user errors, small formatters.

Imported by ``msq-hf --help``: standard library only (transformers is imported by :func:`subcommand_parser` for
``msq-hf train`` alone), see docs/cli.md, "Startup time".
"""

from __future__ import annotations

import argparse
import functools
import math
from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

PROG = "msq-hf"


class CLIError(Exception):
    """A user error: printed as ``msq-hf: error: <message>``, exit code 1."""


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``msq-hf train: error: ...``) instead of usage + error."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.HelpFormatter)  # HfArgumentParser's shows every default
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@functools.cache
def _one_line_hf_parser() -> type[argparse.ArgumentParser]:
    from transformers import HfArgumentParser  # heavy (~1 s): only msq-hf train declares dataclass options

    class OneLineHfArgumentParser(OneLineParser, HfArgumentParser):
        """``HfArgumentParser`` (options declared as dataclasses) with :class:`OneLineParser`'s errors."""

    return OneLineHfArgumentParser


def subcommand_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """The ``parser_class`` of the ``msq-hf`` subcommands: a :class:`OneLineParser`; given ``dataclass_types``
    (``sub.add_parser("train", dataclass_types=[...])``), a one-line ``transformers.HfArgumentParser``."""
    if "dataclass_types" in kwargs:
        return _one_line_hf_parser()(**kwargs)
    return OneLineParser(**kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only for real defaults (not for flags or options whose default is 'unset')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def checked(
    parse: Callable[[str], float], ok: Callable[[float], bool], expected: str, noun: str = ""
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``parse`` and accepts values where ``ok`` holds.

    Errors read ``'x' is not a number (expected ...)`` or ``9 bits is not allowed (allowed: 1..8)``.
    """
    kind = "an integer" if parse is int else "a number"

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind} ({expected})") from None
        if not (math.isfinite(value) and ok(value)):
            shown = f"{text} {noun}" if noun else text
            raise argparse.ArgumentTypeError(f"{shown} is not allowed ({expected})")
        return value

    return convert


positive_int = checked(int, lambda v: v >= 1, "expected a positive integer")


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (``KeyError`` quotes stripped)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError reprs its message
    return text.splitlines()[0]


def details(exc: BaseException) -> list[str]:
    """Lines after the first: how-to hints (e.g. where to get Fashion-MNIST)."""
    return [line for line in str(exc).strip().splitlines()[1:] if line.strip()]


def scheme_summary(scheme: dict[str, int], numels: dict[str, int] | None = None) -> str:
    """``'22 layers: 2 bits x9, 3 bits x8, 4 bits x5 (weighted avg 2.61)'``: the mix of a bit scheme."""
    if not scheme:
        return "no quantized layers"
    counts = Counter(scheme.values())
    parts = ", ".join(f"{b} bit{'s' if b != 1 else ''} x{counts[b]}" for b in sorted(counts))
    text = f"{len(scheme)} layers: {parts}"
    if numels and all(n in numels for n in scheme):
        total = sum(numels[n] for n in scheme)
        if total:
            text += f" (weighted avg {sum(numels[n] * b for n, b in scheme.items()) / total:.2f})"
    if len(counts) == 1:
        text += " [uniform]"
    return text


__all__ = [
    "PROG",
    "CLIError",
    "HelpFormatter",
    "OneLineParser",
    "checked",
    "details",
    "one_line",
    "positive_int",
    "scheme_summary",
    "subcommand_parser",
]
