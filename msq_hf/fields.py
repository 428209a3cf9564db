"""Declaring validated dataclass fields: each field once, with its default, help text and valid values.

The machinery behind :class:`msq_hf.MSQConfig`. A field is declared as ``name: type = param(default, help,
rule)``; :func:`collect_params` turns a class's declarations into :class:`Param` records, from which the
config derives its constructor, docstring and validation, and :mod:`msq_hf.arguments` its command-line
flags. A :class:`Rule` decides whether one value is valid and says what is expected; a :class:`CrossRule`
relates several fields. Both report through :class:`ConfigFieldError`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SPEC_KEY = "msq_param"  # dataclass field metadata key holding a field's declaration


@dataclass(frozen=True)
class Rule:
    """Valid values of one field: ``ok(value)`` decides, ``expected`` says it (``"an integer in 1..8"``)."""

    expected: str
    ok: Callable[[Any], bool]
    entries: Rule | None = None  # for dicts: the rule of every value (the error names the key)
    message: str | None = None  # replaces "is invalid: expected <expected>" (e.g. an unsupported version)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(lo: int = 1, hi: int | None = None, optional: bool = False) -> Rule:
    """An int (not a bool) in ``lo..hi`` (``hi=None``: no upper bound); ``optional`` also accepts None."""
    if hi is not None:
        text = f"an integer in {lo}..{hi}"
    else:
        text = "a positive integer" if lo == 1 else f"an integer >= {lo}"
    return Rule(
        f"None or {text}" if optional else text,
        lambda v: (optional and v is None) or (_is_int(v) and lo <= v and (hi is None or v <= hi)),
    )


def number(expected: str, ok: Callable[[float], bool]) -> Rule:
    """A finite int or float (not a bool) where ``ok`` holds, described by ``expected``."""
    return Rule(expected, lambda v: _is_real(v) and ok(v))


def exactly(value: int, message: str) -> Rule:
    """Only ``value`` (an int); anything else gets ``message`` instead of "is invalid: expected ..."."""
    return Rule(str(value), lambda v: _is_int(v) and v == value, message=message)


def choice(options: tuple[Any, ...]) -> Rule:
    """One of ``options`` (of the same type: ``True`` is not ``1``)."""
    text = "one of " + ", ".join(repr(o) for o in options)
    return Rule(text, lambda v: any(v == o and type(v) is type(o) for o in options))


FLAG = Rule("True or False", lambda v: isinstance(v, bool))


@dataclass(frozen=True)
class Param:
    """The declaration of one field, as collected by :func:`collect_params`."""

    name: str
    type: Any  # the resolved annotation (``int``, ``Literal[...]``, ``int | None``, ...)
    default: Any
    help: str
    rule: Rule
    aliases: tuple[str, ...] = ()  # extra command-line flags, e.g. ("--target",)
    negations: tuple[str, ...] = ()  # flags turning a True-by-default bool off, e.g. ("--no-hessian",)
    user: bool = True  # False: written by msq_hf when saving, not a hyperparameter a user sets
    convert: Callable[[Any], Any] | None = None  # normalization applied by the constructor


def param(
    default: Any,
    help: str,
    rule: Rule | None = None,
    *,
    aliases: tuple[str, ...] = (),
    negations: tuple[str, ...] = (),
    user: bool = True,
    convert: Callable[[Any], Any] | None = None,
) -> Any:
    """Declare a field (a ``dataclasses.field``); ``rule=None`` derives the rule from a ``Literal`` or ``bool``
    annotation. The keywords are those of :class:`Param`."""
    meta = dict(help=help, rule=rule, aliases=aliases, negations=negations, user=user, convert=convert)
    return dataclasses.field(default=default, metadata={SPEC_KEY: meta})


def collect_params(cls: type) -> dict[str, Param]:
    """``{name: Param}`` of the fields of dataclass ``cls`` declared with :func:`param`, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if SPEC_KEY not in f.metadata:
            continue
        meta = dict(f.metadata[SPEC_KEY])
        kind = hints[f.name]
        if meta["rule"] is None:
            meta["rule"] = FLAG if kind is bool else choice(typing.get_args(kind))
        found[f.name] = Param(name=f.name, type=kind, default=f.default, **meta)
    return found


def format_value(value: Any) -> str:
    """A value as a person would type it (``16.0 -> '16'``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


class ConfigFieldError(ValueError):
    """A field holds an invalid value: ``<Owner>.<field>=<value> is invalid: expected <allowed values>``.

    ``field``/``value``: the field at fault; ``related``: ``{name: value}`` of the other fields of a
    cross-field rule (empty for a per-field error). :meth:`expected` words the allowed values, naming
    fields with ``show(name)`` (default ``name=value``; a command line shows ``--flag value``).
    """

    def __init__(
        self,
        owner: str,
        field: str,
        value: Any,
        describe: Callable[[Callable[[str], str]], str],
        related: Mapping[str, Any] | None = None,
        shown: str | None = None,
        message: str | None = None,
    ) -> None:
        self.field, self.value, self.related = field, value, dict(related or {})
        self._describe = describe
        verdict = message or f"is invalid: expected {self.expected()}"
        super().__init__(f"{owner}.{shown or field}={value!r} {verdict}")

    def expected(self, show: Callable[[str], str] | None = None) -> str:
        """The allowed values, naming fields with ``show`` (default ``name=value``)."""
        values = {**self.related, self.field: self.value}
        return self._describe(show or (lambda name: f"{name}={format_value(values[name])}"))


def check_field(owner: str, spec: Param, value: Any) -> None:
    """Raise :class:`ConfigFieldError` unless ``value`` satisfies ``spec.rule`` (and its ``entries`` rule)."""
    rule = spec.rule
    if not rule.ok(value):
        raise ConfigFieldError(owner, spec.name, value, lambda show: rule.expected, message=rule.message)
    if rule.entries is not None and value is not None:
        inner = rule.entries
        for key, item in value.items():
            if not inner.ok(item):
                shown = f"{spec.name}[{key!r}]"
                raise ConfigFieldError(owner, spec.name, item, lambda show: inner.expected, shown=shown)


@dataclass(frozen=True)
class CrossRule:
    """A rule across fields, reported on ``field``; ``describe(values, show)`` words what is allowed.

    ``strict`` rules describe a mistake for a run rather than an invalid config: front ends (the
    command line, the recipes) apply them, the config itself does not.
    """

    field: str
    related: tuple[str, ...]
    ok: Callable[[Mapping[str, Any]], bool]
    describe: Callable[[Mapping[str, Any], Callable[[str], str]], str]
    strict: bool = False

    def check(self, owner: str, values: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigFieldError` unless the rule holds for ``values``."""
        if not self.ok(values):
            related = {n: values[n] for n in self.related}
            describe = lambda show: self.describe(values, show)  # noqa: E731
            raise ConfigFieldError(owner, self.field, values[self.field], describe, related)


__all__ = [
    "FLAG",
    "ConfigFieldError",
    "CrossRule",
    "Param",
    "Rule",
    "check_field",
    "choice",
    "collect_params",
    "exactly",
    "format_value",
    "integer",
    "number",
    "param",
]
