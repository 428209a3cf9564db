"""Activation (layer-input) quantizers: PACT for CNNs, LSQ for ViTs -- one implementation of each.

The MSQ layers (``MSQConfig.act_bits``), the packed layers of an export and the baselines
(``convert(..., act_bits=...)``) all use these classes, so a method comparison quantizes activations
identically. State-dict keys: ``alpha``/``signed`` (PACT) and ``step``/``signed`` (LSQ).

Both fix their sign mode at the first batch they see (``signed`` buffer: -1 unset, 0 non-negative
inputs such as post-ReLU activations, 1 signed inputs such as LayerNorm outputs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from msq_hf.quant.functional import check_bits

#: activation bit widths the quantizers accept
MIN_ACT_BITS, MAX_ACT_BITS = 2, 8


class _RoundSTE(torch.autograd.Function):
    """``round(x)`` with the identity gradient (exact grid values, unlike ``x + (round(x) - x).detach()``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


class _PACTClip(torch.autograd.Function):
    """``y = clip(x, lo, alpha)`` with the PACT gradients.

    Unsigned (``lo = 0``): ``dy/dx = 1[0 <= x <= alpha]``, ``dL/dalpha = sum g * 1[x >= alpha]``.
    Signed (``lo = -alpha``): ``dy/dx = 1[|x| <= alpha]``,
    ``dL/dalpha = sum g * 1[x >= alpha] - sum g * 1[x <= -alpha]``.
    (``torch.minimum``/``maximum`` would split the gradient in half at ties such as the exact zeros
    of post-ReLU inputs.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, signed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        a = alpha.to(x.dtype)
        lo = -a if signed else torch.zeros_like(a)
        return torch.minimum(torch.maximum(x, lo), a)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        a = alpha.to(x.dtype)
        lo = -a if ctx.signed else torch.zeros_like(a)
        grad_x = g * ((x >= lo) & (x <= a)).to(g.dtype)
        grad_alpha = (g * (x >= a).to(g.dtype)).sum()
        if ctx.signed:
            grad_alpha = grad_alpha - (g * (x <= -a).to(g.dtype)).sum()
        return grad_x, grad_alpha.to(alpha.dtype).reshape(alpha.shape), None


class PACTActQuantizer(nn.Module):
    """PACT input quantizer (Choi et al. 2018): learnable clip ``alpha`` (init 10.0) + uniform ``bits``-bit grid.

    ``y = clip(x, 0, alpha)`` (or ``clip(x, -alpha, alpha)`` for signed inputs), then
    ``y_q = round(y / s) * s`` with ``s = alpha / (2^b - 1)`` (unsigned) or ``alpha / (2^(b-1) - 1)``
    (signed).

    Gradient: the rounding is straight-through and the step ``s`` is a constant of the backward pass,
    so ``alpha`` receives exactly PACT's clip gradient ``dL/dalpha = sum dL/dy_q * 1[x >= alpha]``
    (minus ``sum dL/dy_q * 1[x <= -alpha]`` when signed) -- Eq. 3 of the paper, which derives
    ``dy_q/dalpha`` through the clip alone. Differentiating ``s`` as well (as an earlier MSQ-side copy
    did) adds an LSQ-like quantization-error term that PACT does not have; the paper's gradient is the
    one every method here is compared with.
    """

    def __init__(self, bits: int = 4, init_alpha: float = 10.0):
        super().__init__()
        self.bits = check_bits(bits, "PACT act_bits", MIN_ACT_BITS, MAX_ACT_BITS)
        if not init_alpha > 0:
            raise ValueError(f"PACT init_alpha={init_alpha} must be > 0")
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.register_buffer("signed", torch.tensor(-1, dtype=torch.int8))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(self.signed) < 0:  # the first batch decides: post-ReLU inputs stay unsigned
            self.signed.fill_(int(bool((x.detach() < 0).any())))
        signed = bool(int(self.signed))
        y = _PACTClip.apply(x, self.alpha, signed)
        levels = 2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1
        step = (self.alpha.detach().abs() / levels).clamp_min(1e-12).to(x.dtype)
        return _RoundSTE.apply(y / step) * step


class LSQActQuantizer(nn.Module):
    """LSQ activation quantizer (Esser et al. 2020; 8-bit default, for ViTs), per tensor.

    ``y_q = clamp(round(x / s), Qn, Qp) * s`` with a learnable step ``s`` initialised at the first
    training batch to ``2 mean|x| / sqrt(Qp)`` and a gradient scale ``1/sqrt(Qp * numel)``.
    Signed range ``[-2^(b-1), 2^(b-1)-1]`` unless the first batch is non-negative.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = check_bits(bits, "LSQ act_bits", MIN_ACT_BITS, MAX_ACT_BITS)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(-1, dtype=torch.int8))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def _range(self) -> tuple[int, int]:
        if int(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(self.signed) < 0:
            with torch.no_grad():
                self.signed.fill_(int(bool((x < 0).any())))
                _, qp = self._range()
                self.step.fill_(float(2 * x.abs().mean() / math.sqrt(qp)) + 1e-8)
        qn, qp = self._range()
        grad_scale = 1.0 / math.sqrt(qp * max(x.numel() // max(x.shape[0], 1), 1))
        step = self.step.abs() + 1e-8
        step = (step - step * grad_scale).detach() + step * grad_scale
        return _RoundSTE.apply(torch.clamp(x / step, qn, qp)) * step


def make_act_quantizer(kind: str, bits: int, *, linear: bool = False, init_alpha: float = 10.0) -> nn.Module:
    """The activation quantizer named by ``MSQConfig.act_quantizer``: ``"pact"``, ``"lsq"`` or ``"auto"``
    (LSQ in front of a linear layer, PACT in front of a convolution)."""
    if kind == "auto":
        kind = "lsq" if linear else "pact"
    if kind == "pact":
        return PACTActQuantizer(bits, init_alpha)
    if kind == "lsq":
        return LSQActQuantizer(bits)
    raise ValueError(f"act_quantizer={kind!r} is not one of 'auto', 'pact', 'lsq'")


__all__ = ["LSQActQuantizer", "MAX_ACT_BITS", "MIN_ACT_BITS", "PACTActQuantizer", "make_act_quantizer"]
