"""The per-layer grid of the fused MSQ quantizer: its scalars and the quantities every kernel derives from them.

Every MSQ kernel (:mod:`msq_hf.quant.kernels`) starts from the same few numbers: the layer scale ``S = max|W|``,
the grid constants of ``bits``/``k`` (computed on the device, :func:`grid_constants`) and, per weight, the code
``x = W / (S/2^n)``, its round-clamped value and the LSB part ``l``. They are declared here once, in the
out-of-place form that ``torch.compile`` traces, so that a kernel which rebuilds ``W_q`` or ``sign(l)`` in the
backward computes them with exactly the operations of the forward (bit-identical results).
"""

from __future__ import annotations

import torch

REFERENCE_LEVELS = 256.0  # 2^8: "scale" units measure the pull in grid steps of an 8-bit grid of the layer


def grid_levels(bits: torch.Tensor) -> torch.Tensor:
    """``2^n`` as float32 from the 0-d integer ``bits`` tensor, on its device (no host read): the codes of an ``n``-bit
    magnitude are ``0 .. 2^n - 1``."""
    return torch.bitwise_left_shift(torch.ones_like(bits), bits).to(torch.float32)


def grid_constants(
    bits: torch.Tensor, k: torch.Tensor, dtype: torch.dtype, units: str, numel: int | None
) -> tuple[torch.Tensor, ...]:
    """The kernels' scalars from the 0-d integer tensors ``bits``/``k`` -- on the device, no host read.

    Returns ``(levels, qmax, 2^-k, low_max, 2^k)`` in ``dtype`` (exact: powers of two and ``2^m - 1``
    for m <= 8) and ``(coef_mult, reg_mult)`` in float32, both 0 when ``k == 0`` (a layer that is not
    regularized gets ``R = 0`` and no regularizer gradient). Reading ``bits``/``k`` as Python ints would
    cost one host synchronisation per layer and step, and would make ``torch.compile`` specialize
    (recompile) on every bit-width change; computed here they are ordinary graph inputs.

    ``units`` (see :data:`msq_hf.quant.functional.LSBUnits`) fixes how the layer scale ``S`` enters: the
    kernels form ``c = coef_mult * S^p`` and ``R = reg_mult * S^(p+1) * sum|l|`` with ``p = +1`` for
    ``"scale"``/``"step"`` and ``-1`` otherwise (:func:`scale_powers`).
    """
    one = torch.ones_like(bits)
    levels = grid_levels(bits)
    two_k = torch.bitwise_left_shift(one, k).to(torch.float32)
    low_max = (torch.bitwise_left_shift(one, bits - k) - 1).to(dtype)
    active = (k > 0).to(torch.float32) * (1.0 / numel if numel else 1.0)
    if units == "code":  # dR/dW = 2^n/S sign(l): one grid step of l per grid step of W
        coef_mult, reg_mult = levels * active, active
    elif units == "value":  # dR/dW = sign(l)/S: l measured as a fraction of S
        coef_mult, reg_mult = active, active / levels
    elif units == "scale":  # dR/dW = S/2^8 sign(l): lr*lambda*2^(n-8) grid steps, in proportion to S
        coef_mult, reg_mult = active / REFERENCE_LEVELS, active / (REFERENCE_LEVELS * levels)
    else:  # "step": dR/dW = S/2^n sign(l): SGD moves W by lr*lambda grid steps, whatever S and n are
        coef_mult, reg_mult = active / levels, active / (levels * levels)
    return (
        levels.to(dtype),
        (levels - 1).to(dtype),
        (1.0 / two_k).to(dtype),
        low_max,
        two_k.to(dtype),
        coef_mult,
        reg_mult,
    )


def scale_powers(units: str) -> tuple[int, int]:
    """``(p, p + 1)``: the powers of the layer scale ``S`` in ``c`` and in ``R`` (see :func:`grid_constants`)."""
    if units not in ("scale", "step", "code", "value"):
        raise ValueError(f"units={units!r} is not one of 'scale', 'step', 'code', 'value'")
    return (1, 2) if units in ("scale", "step") else (-1, 0)


def scale_factors(scale: torch.Tensor, units: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S^p, S^(p+1))`` in float32 for the coefficient ``c`` and the regularizer value ``R``."""
    s = scale.float()
    return (s, s * s) if scale_powers(units)[0] == 1 else (1.0 / s, torch.ones_like(s))


def max_abs_scale(w: torch.Tensor) -> torch.Tensor:
    """``S = max|W|`` as a 0-d tensor (1 for an all-zero tensor), without a host read."""
    lo, hi = torch.aminmax(w)
    scale = torch.maximum(-lo, hi)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def grid_values(
    w: torch.Tensor,
    scale: torch.Tensor,
    bits: torch.Tensor,
    k: torch.Tensor,
    continuous: bool,
    units: str,
    mean: bool,
) -> tuple[torch.Tensor, ...]:
    """``(q, step, l, R, c)`` of weights ``w`` on the grid of scale ``S`` (out of place: the traced form).

    ``q = clamp(round(W/step), +-(2^n-1))`` (codes; ``W_q = q * step``), ``step = S/2^n``,
    ``l = (W/step or q) - 2^k clamp(round(W/step 2^-k), +-(2^(n-k)-1))`` (LSB part in code units),
    ``R = reg_mult S^(p+1) sum|l|`` and ``c = coef_mult S^p``, the coefficient of ``dR/dW = c sign(l)`` (both 0
    at k = 0; :func:`grid_constants`).
    A kernel that needs only some of them lets the compiler drop the rest.
    """
    levels, qmax, low_scale, low_max, two_k, coef_mult, reg_mult = grid_constants(
        bits, k, w.dtype, units, w.numel() if mean else None
    )
    step = scale / levels
    x = w / step
    q = torch.clamp(torch.round(x), -qmax, qmax)
    low = torch.clamp(torch.round(x * low_scale), -low_max, low_max) * two_k
    ell = (x if continuous else q) - low
    s_coef, s_reg = scale_factors(scale, units)
    reg = (torch.linalg.vector_norm(ell, 1).float() * reg_mult * s_reg).to(w.dtype)
    return q, step, ell, reg, (coef_mult * s_coef).to(w.dtype)


def lsb_proximal(
    w: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor, k: torch.Tensor, units: str, mean: bool, amount: float
) -> torch.Tensor:
    """``W`` after one proximal step of ``amount * R`` (``amount = lr * lambda``): every weight moves toward the
    nearest point of the coarse grid (its ``k`` LSBs zero) by ``amount * c`` -- the distance one SGD step on
    ``R`` alone would move it -- but never past that point (soft-thresholding of the LSB part ``l``).

    ``c`` is the coefficient of ``dR/dW = c sign(l)`` (:func:`grid_values`; 0 at ``k = 0``, so an unregularized
    layer is returned unchanged). Unlike ``lambda * R`` in the loss, the step is neither clipped with the task
    gradient nor carried over by momentum, and it cannot overshoot the zero-LSB point. As with the gradient, the
    largest weight (at ``|x| = 2^n``, beyond the coarse top level) is pulled too, so ``S = max|W|`` shrinks while
    the pull lasts (docs/pruning.md, "The largest weight is always pulled").
    """
    _, step, ell, _, coef = grid_values(w, scale, bits, k, True, units, mean)
    return w - torch.sign(ell) * torch.minimum(ell.abs() * step, coef * amount)


__all__ = [
    "REFERENCE_LEVELS",
    "grid_constants",
    "grid_levels",
    "grid_values",
    "lsb_proximal",
    "max_abs_scale",
    "scale_factors",
    "scale_powers",
]
