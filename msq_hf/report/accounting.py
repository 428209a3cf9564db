"""Honest accounting of quantized weights: the paper's ratio (magnitude bits) beside what is really stored.

An MSQ layer of ``n`` bits stores a sign and ``n`` magnitude bits (``2^(n+1) - 1`` levels; ``2^(n+1)`` on the learned
step's ``qat_grid="full"``, which also uses the code for -0), and so do the bit-plane
baselines BSQ and CSQ (``p - n`` planes: sign + ``N`` magnitude planes). Their papers count ``n`` bits per weight.
A uniform DoReFa (or LSQ/PACT-style) ``n``-bit weight has ``2^n`` levels and stores ``n`` bits. Comparing the
papers' ratios therefore hands the sign-magnitude methods one free bit per weight.

:func:`method_accounting` is the one place that turns a method's bits into both ratios. Per layer it takes the stored
width from :func:`msq_hf.quant.functional.storage_bits` (through :func:`layer_stored_bits`) and both ratios from
:func:`msq_hf.quant.functional.compression_ratio`; nothing here repeats either formula.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from msq_hf.quant import functional as QF

FLOAT_BITS = 32

#: how each method family stores an ``n``-bit weight, named by the ``wnorm`` argument of
#: :func:`~msq_hf.quant.functional.storage_bits`: ``"signmag"`` is sign + ``n`` magnitude bits, ``"dorefa"`` is the
#: ``n``-bit code as it is (``2^n`` levels: DoReFa, a uniform LSQ/PACT weight grid, and float32 with ``n = 32``).
#: An MSQ run with ``wnorm="dorefa"`` follows its own ``wnorm`` (see :func:`storage_convention`).
STORAGE: dict[str, str] = {
    "msq": "signmag",
    "bsq": "signmag",
    "csq": "signmag",
    "dorefa": "dorefa",
    "lsq": "dorefa",
    "uniform": "dorefa",
    "float": "dorefa",
}


@dataclass(frozen=True)
class Accounting:
    """Both accountings of one method's quantized weights (parameter-weighted over the quantized layers).

    Attributes:
        family: the method family (a key of :data:`STORAGE`).
        magnitude_bits: average bits the method's paper counts per weight (``n``; 32 for float).
        stored_bits: average bits per weight a file really holds (``n + 1`` for sign-magnitude methods).
        paper_ratio: ``32 / magnitude_bits`` -- the "paper ratio (magnitude bits)".
        stored_ratio: ``32 / stored_bits`` -- the "stored ratio (sign counted)".
    """

    family: str
    magnitude_bits: float
    stored_bits: float
    paper_ratio: float
    stored_ratio: float


class ComparisonPoint(NamedTuple):
    """One method in an accuracy-vs-compression comparison (accuracy as a fraction or in %)."""

    method: str
    stored_ratio: float
    paper_ratio: float
    accuracy: float


def storage_convention(family: str, wnorm: str | None = None) -> str:
    """The ``storage_bits`` convention of ``family``; an MSQ run's own ``wnorm`` wins when given."""
    if family not in STORAGE:
        raise ValueError(f"unknown method family {family!r}; expected one of {sorted(STORAGE)}")
    if family == "msq" and wnorm is not None:
        if wnorm not in ("signmag", "dorefa"):
            raise ValueError(f"MSQ wnorm={wnorm!r} is not one of 'signmag', 'dorefa'")
        return wnorm
    return STORAGE[family]


def layer_stored_bits(family: str, bits: float, wnorm: str | None = None) -> float:
    """Bits per weight a layer of ``family`` at ``bits`` really stores (the one per-layer rule).

    :func:`~msq_hf.quant.functional.storage_bits` under :func:`storage_convention`. A layer at 0 bits (a CSQ layer
    whose bit masks are all off) is all zeros and stores nothing.
    """
    if family == "float":
        return float(FLOAT_BITS)
    if bits < 0 or not math.isfinite(bits):
        raise ValueError(f"{family} layer bits={bits!r} must be a finite number >= 0")
    if bits == 0:
        return 0.0
    return float(QF.storage_bits(bits, storage_convention(family, wnorm)))  # type: ignore[arg-type]


def _ratio(numels: list[int], bits: list[float]) -> float:
    if not any(n * b for n, b in zip(numels, bits)):
        return math.inf  # nothing stored at all
    return QF.compression_ratio(numels, bits)


def method_accounting(
    family: str,
    bits: Mapping[str, float] | float,
    numels: Mapping[str, int] | None = None,
    wnorm: str | None = None,
) -> Accounting:
    """Paper and stored ratio of a method's weights: ``{layer: bits}`` + ``{layer: weights}``, or one uniform width.

    * ``bits`` as a number: every weight at that width (DoReFa at 2 bits: ``method_accounting("dorefa", 2)``; an
      average width such as ``32 / paper_ratio`` is exact too, because the parameter-weighted ratio only depends
      on the average and the stored width adds a constant per weight).
    * ``bits`` as a scheme needs ``numels`` for every layer unless all layers have the same width.
    * ``family="float"``: 32 bits, both ratios 1.
    """
    if family == "float":
        scheme: dict[str, float] = {"weights": float(FLOAT_BITS)}
    elif isinstance(bits, Mapping):
        if not bits:
            raise ValueError(f"{family}: the bit scheme is empty")
        scheme = {name: float(b) for name, b in bits.items()}
    else:
        scheme = {"weights": float(bits)}
    if numels is None or family == "float" or not isinstance(bits, Mapping):
        if len(set(scheme.values())) > 1:
            raise ValueError(f"{family}: a mixed bit scheme needs the weight count of every layer (numels)")
        sizes = dict.fromkeys(scheme, 1)
    else:
        missing = [name for name in scheme if name not in numels]
        if missing:
            raise ValueError(f"{family}: numels lacks layer(s) {missing[:5]}")
        sizes = {name: int(numels[name]) for name in scheme}
    names = list(scheme)
    n = [sizes[name] for name in names]
    magnitude = [scheme[name] for name in names]
    stored = [layer_stored_bits(family, b, wnorm) for b in magnitude]
    return Accounting(
        family=family,
        magnitude_bits=QF.average_bits(n, magnitude)[0],
        stored_bits=QF.average_bits(n, stored)[0],
        paper_ratio=_ratio(n, magnitude),
        stored_ratio=_ratio(n, stored),
    )


def accounting_from_paper_ratio(family: str, paper_ratio: float, wnorm: str | None = None) -> Accounting:
    """Both ratios of a method known only by its paper ratio (e.g. a number quoted from a paper's table).

    Exact for parameter-weighted ratios: the average magnitude width is ``32 / paper_ratio`` and the stored width
    adds the same per-weight constant to every layer (no layer may be at 0 bits).
    """
    if not (math.isfinite(paper_ratio) and paper_ratio > 0):
        raise ValueError(f"{family}: paper ratio {paper_ratio!r} must be a finite number > 0")
    if family == "float":
        return method_accounting("float", FLOAT_BITS)
    return method_accounting(family, FLOAT_BITS / paper_ratio, wnorm=wnorm)


def family_of_label(label: str) -> str:
    """Method family of a reference point's label: ``MSQ``/``BSQ``/``CSQ`` (sign + magnitude), ``FP``/``float``, and
    every other label (LQ-Nets, PACT, LSQ, HAWQ, OFQ, ...) a uniform grid that stores its quoted bits.

    A history's ``baselines`` entry may name the family explicitly as a fourth element instead.
    """
    head = label.strip().lower()
    for family in ("msq", "bsq", "csq"):
        if head.startswith(family):
            return family
    if head in ("fp", "fp32", "float", "float32") or head.startswith(("fp ", "float ")):
        return "float"
    return "uniform"


def format_ratio(ratio: float) -> str:
    """``16.23x`` (``inf`` when nothing is stored)."""
    return "inf" if math.isinf(ratio) else f"{ratio:.2f}x"


def storage_reference_table(widths: tuple[int, ...] = (1, 2, 3, 4, 8)) -> str:
    """Markdown table: for each family and magnitude width, the levels, stored bits and both ratios."""
    rows = [
        "| method | bits counted by the paper | levels | stored bits / weight | paper ratio (magnitude bits) "
        "| stored ratio (sign counted) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    families = (
        ("msq", "MSQ / BSQ / CSQ (sign + magnitude)", -1),
        # qat_grid="full" also uses the code sign-magnitude spends on -0: the same bits, one level more
        ("msq", 'MSQ, learned step, qat_grid="full"', 0),
        ("dorefa", "DoReFa / LSQ (uniform grid)", 0),
    )
    for family, title, spare in families:
        for b in widths:
            acc = method_accounting(family, b)
            levels = 2 ** int(acc.stored_bits) + spare
            rows.append(
                f"| {title} | {b} | {levels} | {acc.stored_bits:g} | {format_ratio(acc.paper_ratio)} "
                f"| {format_ratio(acc.stored_ratio)} |"
            )
    return "\n".join(rows) + "\n"


__all__ = [
    "FLOAT_BITS",
    "STORAGE",
    "Accounting",
    "ComparisonPoint",
    "accounting_from_paper_ratio",
    "family_of_label",
    "format_ratio",
    "layer_stored_bits",
    "method_accounting",
    "storage_convention",
    "storage_reference_table",
]
