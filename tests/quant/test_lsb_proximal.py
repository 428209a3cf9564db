"""The proximal LSB step (``lsb_update="proximal"``): soft-thresholding of each weight's LSB part.

One step of ``amount = lr * lambda`` must move every weight toward its zero-LSB point of the coarse grid by
``amount * c`` (the distance plain SGD on ``lambda * R`` would move it), stop exactly at that point instead of
crossing it, leave layers at ``k = 0`` alone, and pull a layer scaled by a constant by the same number of its
own grid steps. Like the gradient, it pulls the largest weight too, so ``S = max|W|`` shrinks while it lasts.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from msq_hf.quant import functional as QF  # noqa: E402
from msq_hf.quant.grid import grid_values, lsb_proximal, max_abs_scale  # noqa: E402

torch.set_num_threads(1)

UNITS = ("scale", "step", "code", "value")


@st.composite
def layers(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    """``(W, n, k)``: float64 weights of a random scale, ``1 <= k <= min(2, n - 1)``."""
    n = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(2, n - 1)))
    size = draw(st.integers(2, 64))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.floats(1e-3, 1e2))
    w = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return w, n, k


def lsb_parts(w: torch.Tensor, scale: torch.Tensor, n: int, k: int, units: str) -> tuple[torch.Tensor, ...]:
    """``(l, step, c)`` of ``w`` on the grid of scale ``scale`` (``l`` in grid steps of the n-bit grid)."""
    _, step, ell, _, coef = grid_values(w, scale, torch.tensor(n), torch.tensor(k), True, units, False)
    return ell, step, coef


@settings(max_examples=150, deadline=None)
@given(layers(), st.sampled_from(UNITS), st.floats(1e-4, 1e3))
def test_one_step_shrinks_the_lsb_part_and_never_crosses_zero(layer, units, amount) -> None:
    w, n, k = layer
    scale = max_abs_scale(w)
    ell, step, coef = lsb_parts(w, scale, n, k, units)
    moved = lsb_proximal(w, scale, torch.tensor(n), torch.tensor(k), units, False, amount)
    after, _, _ = lsb_parts(moved, scale, n, k, units)  # on the same grid (S is the step's input)
    shrink = float(coef * amount / step)  # the pull in grid steps
    expected = torch.clamp(ell.abs() - shrink, min=0.0)
    torch.testing.assert_close(after.abs(), expected, rtol=1e-9, atol=1e-9 * 2**n)
    crossed = (torch.sign(after) * torch.sign(ell) < 0) & (after.abs() > 1e-9)  # beyond float residue
    assert not bool(crossed.any()), "a weight crossed its zero-LSB point"
    # the coarse grid point each weight heads for does not change
    torch.testing.assert_close(moved - after * step, w - ell * step, rtol=1e-9, atol=1e-12 * float(scale))


@settings(max_examples=60, deadline=None)
@given(layers(), st.sampled_from(("scale", "step")), st.floats(1e-3, 1e2), st.floats(1e-3, 1e3))
def test_a_scaled_layer_is_pulled_by_the_same_grid_steps(layer, units, constant, amount) -> None:
    w, n, k = layer
    bits, ks = torch.tensor(n), torch.tensor(k)
    base = lsb_proximal(w, max_abs_scale(w), bits, ks, units, False, amount)
    scaled = lsb_proximal(w * constant, max_abs_scale(w * constant), bits, ks, units, False, amount)
    # c is formed in float32 (msq_hf.quant.grid.grid_constants): equal to float32 precision
    torch.testing.assert_close(scaled, base * constant, rtol=0, atol=1e-6 * float(max_abs_scale(w)) * constant)


def test_a_layer_at_k_zero_is_left_alone() -> None:
    w = torch.randn(256, dtype=torch.float64)
    out = lsb_proximal(w, max_abs_scale(w), torch.tensor(6), torch.tensor(0), "scale", False, 10.0)
    assert torch.equal(out, w)


@pytest.mark.parametrize("bits", [4, 6])
def test_repeated_steps_empty_the_lsbs(bits: int) -> None:
    # the threshold rule's premise: a steady proximal pull takes the LSB nonzero rate to (almost) zero; the
    # largest weight sits beyond the coarse top level and is pulled at every step, so S shrinks as it goes
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.05
    scale, n, ks = max_abs_scale(w), torch.tensor(bits), torch.tensor(2)
    start = QF.lsb_nonzero_rate(w, bits, 2)
    for _ in range(40):
        w = lsb_proximal(w, max_abs_scale(w), n, ks, "step", False, 0.25)
    assert start > 0.5 and QF.lsb_nonzero_rate(w, bits, 2) < 0.01
    assert float(max_abs_scale(w)) < float(scale)


def test_the_step_compiles_without_a_host_read() -> None:
    # bits/k are device tensors: fullgraph=True fails on any .item()/int() of them (a sync per layer on a GPU)
    compiled = torch.compile(lsb_proximal, fullgraph=True, dynamic=False)
    w = torch.randn(512, generator=torch.Generator().manual_seed(1))
    for bits, k in ((6, 2), (4, 1)):
        n, ks = torch.tensor(bits), torch.tensor(k)
        eager = lsb_proximal(w, max_abs_scale(w), n, ks, "scale", False, 0.3)
        torch.testing.assert_close(compiled(w, max_abs_scale(w), n, ks, "scale", False, 0.3), eager)
