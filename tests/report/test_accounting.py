"""msq_hf.report.accounting: the paper ratio (magnitude bits) beside the stored ratio (sign counted).

The expected values are written out with the textbook formulas (``32 N / sum((b + 1) N)``, ``32 / b``), not through
quant.functional, so a wrong convention in the one accounting function shows up here.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msq_hf.report.accounting import (
    ComparisonPoint,
    accounting_from_paper_ratio,
    family_of_label,
    layer_stored_bits,
    method_accounting,
    storage_reference_table,
)

schemes = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=6),
    st.tuples(st.integers(1, 8), st.integers(1, 10**6)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(schemes)
def test_sign_magnitude_stored_ratio_is_32N_over_sum_b_plus_1_N(layers: dict[str, tuple[int, int]]) -> None:
    bits = {name: b for name, (b, _) in layers.items()}
    numels = {name: n for name, (_, n) in layers.items()}
    total = sum(numels.values())
    for family in ("msq", "bsq", "csq"):  # all three store sign + magnitude planes
        acc = method_accounting(family, bits, numels)
        assert acc.stored_ratio == pytest.approx(32 * total / sum((bits[k] + 1) * numels[k] for k in bits))
        assert acc.paper_ratio == pytest.approx(32 * total / sum(bits[k] * numels[k] for k in bits))
        assert acc.stored_bits == pytest.approx(acc.magnitude_bits + 1)
        assert acc.stored_ratio < acc.paper_ratio
    # an MSQ run quantized with wnorm="dorefa" stores its n bits as they are
    assert method_accounting("msq", bits, numels, wnorm="dorefa").stored_ratio == pytest.approx(acc.paper_ratio)


@pytest.mark.parametrize("b", range(1, 9))
def test_dorefa_at_b_bits_is_32_over_b_in_both_accountings(b: int) -> None:
    acc = method_accounting("dorefa", b)
    assert (acc.paper_ratio, acc.stored_ratio, acc.stored_bits) == (pytest.approx(32 / b), pytest.approx(32 / b), b)
    # MSQ at b - 1 magnitude bits stores exactly what DoReFa at b bits stores, at a higher paper ratio
    if b > 1:
        msq = method_accounting("msq", b - 1)
        assert msq.stored_ratio == pytest.approx(acc.stored_ratio) and msq.paper_ratio > acc.paper_ratio


def test_float_and_zero_bit_layers() -> None:
    flt = method_accounting("float", 32)
    assert (flt.paper_ratio, flt.stored_ratio, flt.stored_bits) == (1.0, 1.0, 32.0)
    # a CSQ layer with every mask off is all zeros: it stores nothing (and an all-off model is infinite)
    assert layer_stored_bits("csq", 0) == 0
    acc = method_accounting("csq", {"a": 0, "b": 2}, {"a": 100, "b": 100})
    assert acc.stored_ratio == pytest.approx(32 * 200 / 300) and acc.paper_ratio == pytest.approx(32 * 200 / 200)
    assert math.isinf(method_accounting("csq", {"a": 0}, {"a": 5}).stored_ratio)


@settings(max_examples=40, deadline=None)
@given(schemes)
def test_from_paper_ratio_is_exact(layers: dict[str, tuple[int, int]]) -> None:
    """A point known only by its paper ratio gets the same stored ratio as its full scheme would give."""
    bits = {name: b for name, (b, _) in layers.items()}
    numels = {name: n for name, (_, n) in layers.items()}
    full = method_accounting("msq", bits, numels)
    assert accounting_from_paper_ratio("msq", full.paper_ratio).stored_ratio == pytest.approx(full.stored_ratio)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="numels lacks layer"):
        method_accounting("msq", {"a": 2, "b": 3}, {"a": 10})
    with pytest.raises(ValueError, match="needs the weight count"):
        method_accounting("bsq", {"a": 2, "b": 3})
    assert method_accounting("bsq", {"a": 3, "b": 3}).stored_bits == 4  # uniform: sizes do not matter
    with pytest.raises(ValueError, match="unknown method family 'pact'"):
        method_accounting("pact", 4)
    with pytest.raises(ValueError, match="paper ratio"):
        accounting_from_paper_ratio("msq", 0.0)


@pytest.mark.parametrize(
    "label, family",
    [
        ("MSQ (a) paper", "msq"),
        ("BSQ", "bsq"),
        ("CSQ T2", "csq"),
        ("FP", "float"),
        ("LQ-Nets W3", "uniform"),
        ("LSQ W3A3", "uniform"),
    ],
)
def test_family_of_label(label: str, family: str) -> None:
    assert family_of_label(label) == family


def test_reference_table_rows() -> None:
    table = storage_reference_table((2, 3))
    assert "| MSQ / BSQ / CSQ (sign + magnitude) | 2 | 7 | 3 | 16.00x | 10.67x |" in table
    assert "| DoReFa / LSQ (uniform grid) | 3 | 8 | 3 | 10.67x | 10.67x |" in table
    # the full grid has LSQ W3's eight levels at MSQ's three stored bits
    assert '| MSQ, learned step, qat_grid="full" | 2 | 8 | 3 | 16.00x | 10.67x |' in table
    assert ComparisonPoint("m", 1.0, 2.0, 3.0).paper_ratio == 2.0
