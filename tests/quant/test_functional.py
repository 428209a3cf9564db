"""Properties of the MSQ tensor math (the MSQ quantizer, its LSB terms and the compression ratio).

Hypothesis draws the precision ``n`` (1..8), a valid ``k`` (1 <= k < n) and batches of magnitudes
``u`` that mix arbitrary floats with exact rounding ties of every grid (``j / 2^(n+1)``).
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from msq_hf.quant import functional as QF  # noqa: E402
from msq_hf.training.schedule import compression  # noqa: E402

# -- strategies ---------------------------------------------------------------------------------

#: exact ties / grid points of every precision up to 8 bits (j / 512 is exact in float32)
_tie = st.integers(0, 512).map(lambda j: j / 512)
_unit = st.floats(0.0, 1.0, allow_nan=False, width=32)
magnitudes = st.lists(st.one_of(_unit, _tie), min_size=1, max_size=64).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32)
)


@st.composite
def bits_and_k(draw: st.DrawFn) -> tuple[int, int]:
    """``(n, k)`` with 2 <= n <= 8 and 1 <= k < n (n = 1 has no valid k: n - k >= 1)."""
    n = draw(st.integers(2, 8))
    return n, draw(st.integers(1, n - 1))


@st.composite
def weights(draw: st.DrawFn) -> torch.Tensor:
    """Signed weight tensors with random values, exact ties of an 8-bit grid and a unique max element."""
    scale = draw(st.sampled_from([1.0, 0.5, 3.0, 1e-3]))
    floats = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=48))
    ties = draw(st.lists(st.integers(-511, 511), max_size=16))
    values = floats + [j / 512 for j in ties] + [draw(st.sampled_from([1.0, -1.0]))]  # |max| = scale
    return torch.tensor(values, dtype=torch.float32) * scale


def textbook_signmag(w: torch.Tensor, n: int) -> torch.Tensor:
    """``S * sign(W) * RC_n(|W|/S) / 2^n`` written literally."""
    s = w.abs().max()
    s = s if s > 0 else torch.ones_like(s)
    u = w.abs() / s
    return s * torch.sign(w) * torch.clamp(torch.round(2**n * u), 0, 2**n - 1) / 2**n


# -- RoundClamp grids (§3.2, §3.3, §3.11) -----------------------------------------------------------


@given(n=st.integers(1, 8), u=magnitudes)
def test_roundclamp_codes_in_range_and_integral(n: int, u: torch.Tensor) -> None:
    codes = QF.roundclamp_codes(u, n)
    assert torch.equal(codes, codes.round())
    assert codes.min() >= 0 and codes.max() <= 2**n - 1
    assert torch.equal(QF.roundclamp_value(u, n), codes / 2**n)
    # RC_n is round-to-nearest except in the clamped top bin: |2^n u - code| <= 1/2 below it
    inside = u * 2**n <= 2**n - 0.5
    assert ((u * 2**n - codes).abs()[inside] <= 0.5).all()


@given(nk=bits_and_k(), u=magnitudes)
def test_nested_grids(nk: tuple[int, int], u: torch.Tensor) -> None:
    """Codes whose k LSBs are zero have exactly the same value at n - k bits."""
    n, k = nk
    code = QF.roundclamp_codes(u, n)
    zero_lsb = QF.lsb_field(code, k) == 0
    low = QF.roundclamp_codes(u, n - k)
    assert torch.equal((code / 2**n)[zero_lsb], (low / 2 ** (n - k))[zero_lsb])


@given(nk=bits_and_k(), u=magnitudes)
def test_bit_slice_zero_iff_lsbs_zero(nk: tuple[int, int], u: torch.Tensor) -> None:
    """d = RC_n - 2^k RC_{n-k} is 0 exactly when code mod 2^k == 0 (Eq. 3)."""
    n, k = nk
    code = QF.roundclamp_codes(u, n)
    d = code - 2**k * QF.roundclamp_codes(u, n - k)
    assert torch.equal(d == 0, torch.remainder(code, 2**k) == 0)
    # inside the range d lies in [-2^(k-1), 2^(k-1)]; in the clamped top bin up to 2^k - 1
    assert d.abs().max() <= 2**k - 1


@given(nk=bits_and_k(), u=magnitudes)
def test_continuous_lsb_sign_matches_bit_slice(nk: tuple[int, int], u: torch.Tensor) -> None:
    """sign(l) == sign(d) wherever d != 0 (Eq. 5 vs Eq. 3)."""
    n, k = nk
    ell = QF.lsb_continuous(u, n, k)
    d = QF.roundclamp_codes(u, n) - 2**k * QF.roundclamp_codes(u, n - k)
    nz = d != 0
    assert torch.equal(torch.sign(ell)[nz], torch.sign(d)[nz])
    # the discrete form is d itself
    assert torch.equal(QF.lsb_discrete(u, n, k), d)


def test_lsb_continuous_gradient_is_two_to_the_n() -> None:
    u = torch.rand(257, dtype=torch.float64, requires_grad=True)
    QF.lsb_continuous(u, 5, 2).sum().backward()
    assert torch.equal(u.grad, torch.full_like(u, 32.0))
    u.grad = None
    QF.lsb_discrete(u, 5, 2).sum().backward()  # STE through RC_n only: the terms must not cancel
    assert torch.equal(u.grad, torch.full_like(u, 32.0))


# -- sign-magnitude quantizer (§3.1, §3.11 step 2) ----------------------------------------------------


@given(n=st.integers(1, 8), w=weights())
def test_fake_quantize_signmag_is_textbook_bit_exact(n: int, w: torch.Tensor) -> None:
    got = QF.fake_quantize_signmag(w, n, QF.max_abs_scale(w))
    assert torch.equal(got, textbook_signmag(w, n))
    codes = QF.signed_codes(w, n)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2**n - 1
    # the max element sits in the clamped top code 2^n - 1
    assert codes.abs().max() == 2**n - 1
    # codes times the power-of-two step reproduce the fake-quantized weight bit for bit
    assert torch.equal(codes * (QF.max_abs_scale(w) / 2**n), got)


def test_fake_quantize_signmag_ties_round_half_to_even() -> None:
    # S = 1, 2-bit grid step 1/4: 0.125 -> 0 (tie, even), 0.375 -> 0.5 (tie, even code 2), 1 -> 0.75 (clamp)
    w = torch.tensor([0.125, 0.375, -0.375, 0.625, 1.0])
    q = QF.fake_quantize_signmag(w, 2, QF.max_abs_scale(w))
    assert torch.equal(q, torch.tensor([0.0, 0.5, -0.5, 0.5, 0.75]))
    assert torch.equal(q, textbook_signmag(w, 2))


def test_one_bit_is_ternary() -> None:
    w = torch.randn(1000)
    q = QF.fake_quantize_signmag(w, 1, QF.max_abs_scale(w))
    s = w.abs().max()
    assert set(torch.unique(q).tolist()) == {-s.item() / 2, 0.0, s.item() / 2}


def test_all_zero_weight_is_finite() -> None:
    w = torch.zeros(5)
    assert torch.equal(QF.max_abs_scale(w), torch.tensor(1.0))
    assert torch.equal(QF.fake_quantize_signmag(w, 4, QF.max_abs_scale(w)), w)
    assert QF.lsb_nonzero_rate(w, 4, 1) == 0.0


@pytest.mark.parametrize("wnorm", ["signmag", "dorefa"])
def test_ste_gradient_is_identity(wnorm: str) -> None:
    w = torch.randn(6, 7, requires_grad=True)
    g = torch.randn(6, 7)
    (QF.quantize_weight(w, 3, wnorm) * g).sum().backward()
    if wnorm == "signmag":
        assert torch.equal(w.grad, g)  # dW_q/dW = 1, S constant
    else:  # STE through the rounding only; tanh / affine map are differentiated normally
        u = QF.dorefa_affine_normalize(w)
        (ref,) = torch.autograd.grad((2 * u * g).sum(), w)
        torch.testing.assert_close(w.grad, ref)


def test_quantize_weight_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="wnorm"):
        QF.quantize_weight(torch.randn(3), 4, "affine")  # type: ignore[arg-type]
    for bad in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            QF.roundclamp_codes(torch.rand(3), bad)


# -- LSB nonzero rate (§3.6) and pruning ---------------------------------------------------------------


@given(nk=bits_and_k(), w=weights())
def test_lsb_nonzero_rate_semantics(nk: tuple[int, int], w: torch.Tensor) -> None:
    n, k = nk
    codes = QF.signed_codes(w, n).abs()
    expected = (torch.remainder(codes, 2**k) != 0).float().mean().item()
    assert QF.lsb_nonzero_rate(w, n, k) == pytest.approx(expected, abs=1e-7)


def test_lsb_nonzero_rate_known_codes() -> None:
    # S = 1 (last element); 3-bit codes 0, 1, 2, 3, 4, 6 and the clamped max (7)
    w = torch.tensor([0.0, 1 / 8, -2 / 8, 3 / 8, 4 / 8, -6 / 8, 1.0])
    assert QF.lsb_nonzero_rate(w, 3, 1) == pytest.approx(3 / 7)  # codes 1, 3, 7
    assert QF.lsb_nonzero_rate(w, 3, 2) == pytest.approx(5 / 7)  # codes 1, 2, 3, 6, 7


@given(nk=bits_and_k(), data=st.data())
def test_dropping_zero_lsb_bits_keeps_weights_bit_identical(nk: tuple[int, int], data: st.DataObject) -> None:
    """Pruning a layer (bits <- bits - k) leaves every weight with zero k-LSB field unchanged (torch.equal).

    Note: under max-abs scaling the max element is always in the clamped top code 2^n - 1, whose
    LSBs are non-zero, so a real layer has rho >= 1/N; all *other* weights here have zero LSBs.
    """
    from msq_hf.nn.layers import MSQLinear

    n, k = nk
    steps = data.draw(st.lists(st.integers(0, 2 ** (n - k) - 1), min_size=11, max_size=11))
    jitter = data.draw(st.lists(st.floats(-0.375, 0.375, width=32), min_size=11, max_size=11))
    # latent weights = (multiple of 2^k n-bit steps) + < half a step of noise, in units of S = 1
    vals = [(2**k * s + j) / 2**n * (-1) ** i for i, (s, j) in enumerate(zip(steps, jitter))]
    layer = MSQLinear(4, 3, bias=False, bits=n)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(vals + [1.0], dtype=torch.float32).reshape(3, 4))
    keep = QF.lsb_field(QF.signed_codes(layer.weight, n).abs(), k) == 0
    assert keep.sum() >= 11  # all but the max element
    assert layer.lsb_nonzero_rate(k) == pytest.approx(1 - keep.float().mean().item())
    before = layer.quantized_weight()
    layer.set_bits(n - k)
    after = layer.quantized_weight()
    assert torch.equal(before[keep], after[keep])


def test_all_zero_layer_has_rate_zero_and_prunes_bit_identically() -> None:
    from msq_hf.nn.layers import MSQLinear

    layer = MSQLinear(3, 2, bias=False, bits=4)
    with torch.no_grad():
        layer.weight.zero_()
    assert layer.lsb_nonzero_rate(2) == 0.0
    before = layer.quantized_weight()
    layer.set_bits(2)
    assert torch.equal(before, layer.quantized_weight())


# -- DoReFa contrast (§3.3, §3.4) ---------------------------------------------------------------------

_U = (torch.arange(1_000_000, dtype=torch.float64) + 0.5) / 1_000_000  # uniform grid on (0, 1)


def dorefa_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's integer codes ``round((2^n - 1) u)`` (the grid of ``QF.dorefa_quantize``; not nested)."""
    return torch.round(u * (2**bits - 1))


def dorefa_lsb_continuous(u: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The continuous-LSB construction applied to DoReFa's grid: ``(2^n-1) u - 2^k round((2^{n-k}-1) u)``."""
    return (2**bits - 1) * u - 2**k * torch.round((2 ** (bits - k) - 1) * u)


def test_dorefa_code_6_maps_to_two_codes() -> None:
    """Under DoReFa the 3-bit code 6 ('110') maps to 2-bit codes 2 and 3: grids are misaligned."""
    six = dorefa_codes(_U, 3) == 6
    assert six.any()
    assert set(dorefa_codes(_U[six], 2).unique().tolist()) == {2.0, 3.0}
    # RoundClamp: every 3-bit code with zero LSB maps to exactly one 2-bit code (half of it)
    for code in (0, 2, 4, 6):
        sel = QF.roundclamp_codes(_U, 3) == code
        assert QF.roundclamp_codes(_U[sel], 2).unique().tolist() == [code / 2]


def test_lsb_sign_bias_dorefa_vs_roundclamp() -> None:
    dorefa = (dorefa_lsb_continuous(_U, 3, 1) > 0).double().mean().item()
    rc3 = (QF.lsb_continuous(_U, 3, 1) > 0).double().mean().item()
    rc8 = (QF.lsb_continuous(_U, 8, 1) > 0).double().mean().item()
    assert dorefa == pytest.approx(0.786, abs=0.005)  # ~79 %: L1 mostly pushes DoReFa weights down
    assert rc3 == pytest.approx(0.625, abs=0.002)  # only the clamped top bin is one-sided
    assert rc8 == pytest.approx(0.504, abs=0.002)


# -- compression ratio (§4) -----------------------------------------------------------------------------


def test_compression_ratio_formula() -> None:
    assert QF.compression_ratio([100, 300], [8, 8]) == pytest.approx(4.0)
    assert QF.compression_ratio([100, 300], [8, 2]) == pytest.approx(32 * 400 / (800 + 600))
    assert QF.compression_ratio([100, 300], [8, 2], count_sign_bit=True) == pytest.approx(32 * 400 / (900 + 900))
    assert QF.compression_ratio([10], [2]) == pytest.approx(16.0)
    assert compression({"a": 8, "b": 2}, {"a": 100, "b": 300}) == pytest.approx(32 * 400 / 1400)
    weighted, unweighted = QF.average_bits([100, 300], [8, 2])
    assert weighted == pytest.approx(3.5) and unweighted == pytest.approx(5.0)
    # 16x needs 2 magnitude bits on average, or 1 when the sign bit is counted
    assert QF.compression_ratio([10, 30], [2, 2]) == pytest.approx(16.0)
    assert QF.compression_ratio([10, 30], [1, 1], count_sign_bit=True) == pytest.approx(16.0)
    with pytest.raises(ValueError, match="one bit width per layer"):
        QF.compression_ratio([1, 2], [3])
    with pytest.raises(ValueError, match="at least one layer"):
        QF.compression_ratio([], [])


@given(numels=st.lists(st.integers(1, 10_000), min_size=1, max_size=8), data=st.data())
def test_compression_ratio_is_32_over_weighted_mean_bits(numels: list[int], data: st.DataObject) -> None:
    bits = data.draw(st.lists(st.integers(1, 8), min_size=len(numels), max_size=len(numels)))
    weighted, _ = QF.average_bits(numels, bits)
    assert QF.compression_ratio(numels, bits) == pytest.approx(32 / weighted)
    assert QF.compression_ratio(numels, bits, True) == pytest.approx(32 / (weighted + 1))
