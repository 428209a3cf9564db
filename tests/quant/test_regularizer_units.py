"""The regularizer's "step" units are scale- and precision-invariant in grid steps; "code" units are not.

With ``units="step"`` the fused regularizer's per-weight gradient is ``S/2^n * sign(l)``, so one SGD step on
``lambda * R`` moves every weight by ``lr * lambda`` grid steps of its own layer, whatever the layer's scale
``S`` and precision ``n``. With ``units="code"`` the gradient is ``2^n/S * sign(l)``: the pull in grid steps is
``lr * lambda * 4^n / S^2``, so scaling the weights by ``c`` scales it by ``1/c^2``.

Hypothesis draws weights as ``x * S/2^n`` with fine-grid coordinates ``x = j + f`` that keep at least 0.1 grid
steps away from every place where ``sign(l)`` or a rounding can flip (integers of the fine grid hold the
coarse grid's levels and rounding midpoints, half-integers the fine grid's midpoints). One element sits at
``|x| = 2^n`` exactly, so ``S = max|W|`` is known. Float rounding of ``c * W`` then never changes a sign.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from msq_hf.nn.layers import msq_quantize_weight  # noqa: E402
from msq_hf.quant import functional as QF  # noqa: E402

torch.set_num_threads(1)

constants = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def grid_weights(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, float]:
    """``(W, n, k, S)``: float64 weights at known fine-grid coordinates, ``S = max|W|``, 1 <= k <= min(2, n-1)."""
    n = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(2, n - 1)))
    scale = draw(st.floats(1e-2, 1e2, allow_nan=False))
    size = draw(st.integers(1, 40))
    top = 2**n - 1  # j + f stays below 2^n in magnitude
    js = draw(st.lists(st.integers(-(top - 1), top - 1), min_size=size, max_size=size))
    fs = draw(st.lists(st.floats(0.1, 0.4), min_size=size, max_size=size))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=size, max_size=size))
    x = [j + s * f for j, f, s in zip(js, fs, signs)]
    x.append(draw(st.sampled_from([-1.0, 1.0])) * 2**n)  # the max element: S is exactly `scale`
    return torch.tensor(x, dtype=torch.float64) * (scale / 2**n), n, k, scale


def reg_grad(w: torch.Tensor, n: int, k: int, units: str, continuous: bool = True) -> tuple[torch.Tensor, float]:
    """``(dR/dW, R)`` of the fused quantizer alone (the backward of R, no task loss)."""
    leaf = w.detach().clone().requires_grad_(True)
    _wq, reg = msq_quantize_weight(leaf, n, k, units=units, continuous=continuous)
    reg.backward()
    return leaf.grad.detach(), float(reg.detach())


def grid_step(w: torch.Tensor, n: int) -> float:
    return float(w.detach().abs().max()) / 2**n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(sample=grid_weights(), c=constants)
def test_step_units_gradient_in_grid_steps_is_scale_invariant(
    dtype: torch.dtype, sample: tuple[torch.Tensor, int, int, float], c: float
) -> None:
    w64, n, k, _ = sample
    w, cw = w64.to(dtype), (w64 * c).to(dtype)
    g, _ = reg_grad(w, n, k, "step")
    gc, _ = reg_grad(cw, n, k, "step")
    in_steps, in_steps_c = g.double() / grid_step(w, n), gc.double() / grid_step(cw, n)
    torch.testing.assert_close(in_steps, in_steps_c, rtol=1e-5, atol=1e-6)
    # and it is sign(l) itself: exactly one grid step per unit of dR, never zero on these weights
    torch.testing.assert_close(in_steps.abs(), torch.ones_like(in_steps), rtol=1e-5, atol=0)


@given(sample=grid_weights(), c=constants)
def test_code_units_pull_scales_as_inverse_square(sample: tuple[torch.Tensor, int, int, float], c: float) -> None:
    w, n, k, scale = sample
    cw = w * c
    g, _ = reg_grad(w, n, k, "code")
    gc, _ = reg_grad(cw, n, k, "code")
    pull, pull_c = g / grid_step(w, n), gc / grid_step(cw, n)  # grid steps per unit of lr * lambda
    torch.testing.assert_close(pull_c / pull, torch.full_like(pull, 1 / c**2), rtol=1e-5, atol=0)
    # the documented magnitude 4^n / S^2
    torch.testing.assert_close(pull.abs(), torch.full_like(pull, 4**n / scale**2), rtol=1e-5, atol=0)


@given(
    sample=grid_weights(),
    c=constants,
    lr=st.floats(1e-3, 1.0),
    lam=st.floats(1e-3, 1.0),
)
def test_one_sgd_step_moves_every_weight_lr_lambda_grid_steps(
    sample: tuple[torch.Tensor, int, int, float], c: float, lr: float, lam: float
) -> None:
    w, n, k, _ = sample
    for weights in (w, w * c):
        param = torch.nn.Parameter(weights.clone())
        step = grid_step(param, n)
        opt = torch.optim.SGD([param], lr=lr)
        _wq, reg = msq_quantize_weight(param, n, k, units="step")
        (lam * reg).backward()  # no task loss
        opt.step()
        moved = (weights - param.detach()) / step  # in grid steps of the layer before the step
        torch.testing.assert_close(moved.abs(), torch.full_like(moved, lr * lam), rtol=1e-6, atol=0)


def test_weights_with_zero_lsb_term_get_no_pull() -> None:
    # x on the coarse (n-k)-bit grid: l = 0 there, so neither gradient nor SGD update
    n, k = 4, 2
    x = torch.tensor([16.0, -8.0, 4.0, 0.0, 5.3, -6.7], dtype=torch.float64)
    w = x * (0.37 / 2**n)
    g, _ = reg_grad(w, n, k, "step")
    step = grid_step(w, n)
    assert g[1:4].abs().max() == 0
    assert g[0] == pytest.approx(step)  # the max element is clamped to the top coarse level: l = 2^k > 0
    assert g[4] == pytest.approx(step) and g[5] == pytest.approx(
        step
    )  # |x| = 6.7 rounds up to 8: l < 0 in magnitude, W < 0


@pytest.mark.parametrize("continuous", [True, False])
@given(sample=grid_weights())
def test_reference_lsb_l1_matches_fused_kernel_in_step_units(
    continuous: bool, sample: tuple[torch.Tensor, int, int, float]
) -> None:
    w64, n, k, scale = sample
    w = w64.float()
    g, reg = reg_grad(w, n, k, "step", continuous=continuous)
    leaf = w.clone().requires_grad_(True)
    form = "continuous" if continuous else "discrete"
    ref = QF.lsb_l1(leaf, n, k, form=form, units="step")
    ref.backward()
    assert reg == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-12)
    torch.testing.assert_close(g, leaf.grad, rtol=1e-5, atol=1e-12)
    # the reference value in step units is sum|l| times the squared grid step (l in grid steps)
    x = w64 / (scale / 2**n)
    coarse = (x / 2**k).round().clamp(-(2 ** (n - k) - 1), 2 ** (n - k) - 1) * 2**k
    fine = x if continuous else x.round().clamp(-(2**n - 1), 2**n - 1)
    expected = float((fine - coarse).abs().sum()) * (scale / 2**n) ** 2
    assert float(ref.detach()) == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(reg)
