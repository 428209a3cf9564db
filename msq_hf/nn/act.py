"""Activation (layer-input) quantizers: PACT for CNNs, LSQ for ViTs -- one implementation of each.

The MSQ layers (``MSQConfig.act_bits``), the packed layers of an export and the baselines
(``convert(..., act_bits=...)``) all use these classes, so a method comparison quantizes activations
identically. State-dict keys: ``alpha``/``signed`` (PACT) and ``step``/``signed`` (LSQ).

Both fix their sign mode at the first batch they see (``signed`` buffer: -1 unset, 0 non-negative
inputs such as post-ReLU activations, 1 signed inputs such as LayerNorm outputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msq_hf.quant.functional import check_bits
from msq_hf.quant.learned import lsq_initial_step

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
    """``y = clip(x, lo, alpha)`` with the PACT gradients; ``signed`` is a 0/1 tensor (no host read).

    Unsigned (``lo = 0``): ``dy/dx = 1[0 <= x <= alpha]``, ``dL/dalpha = sum g * 1[x >= alpha]``.
    Signed (``lo = -alpha``): ``dy/dx = 1[|x| <= alpha]``,
    ``dL/dalpha = sum g * 1[x >= alpha] - sum g * 1[x <= -alpha]``.
    (``torch.minimum``/``maximum`` would split the gradient in half at ties such as the exact zeros
    of post-ReLU inputs.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, alpha, signed)
        a = alpha.to(x.dtype)
        lo = -a * signed.to(x.dtype)
        return torch.minimum(torch.maximum(x, lo), a)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        x, alpha, signed = ctx.saved_tensors
        a = alpha.to(x.dtype)
        flag = signed.to(g.dtype)
        lo = -a * flag
        grad_x = g * ((x >= lo) & (x <= a)).to(g.dtype)
        grad_alpha = (g * (x >= a).to(g.dtype)).sum() - flag * (g * (x <= -a).to(g.dtype)).sum()
        return grad_x, grad_alpha.to(alpha.dtype).reshape(alpha.shape), None


class _SignMode(nn.Module):
    """The ``signed`` buffer (-1 unset, 0 non-negative inputs, 1 signed inputs), decided by the first batch.

    The forward never reads a tensor on the host (no ``int(tensor)``), so a whole model compiles with
    ``fullgraph=True`` and a GPU step does not wait for the device: the first batch is detected with a Python
    flag, and the sign mode is applied as tensor arithmetic (``torch.where``), never as a Python branch.
    """

    def __init__(self, bits: int, what: str):
        super().__init__()
        self.bits = check_bits(bits, what, MIN_ACT_BITS, MAX_ACT_BITS)
        self.register_buffer("signed", torch.tensor(-1, dtype=torch.int8))
        # Python-side: has this module seen a batch since it was built? A loaded ``signed`` >= 0 is kept by
        # ``_decide_sign`` (it only fills an unset value), so this flag needs no update on load.
        self._seen_batch = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def _decide_sign(self, x: torch.Tensor) -> torch.Tensor:
        """Fill an unset ``signed`` from ``x`` (only on the first batch); return the 0/1 mode as a tensor."""
        if not self._seen_batch:
            with torch.no_grad():
                negative = (x.detach() < 0).any().to(self.signed.dtype)
                self.signed.copy_(torch.where(self.signed < 0, negative, self.signed))
            self._seen_batch = True
        return self.signed.clamp(min=0)

    def _levels(self, signed: torch.Tensor) -> torch.Tensor:
        """Largest grid index: ``2^(b-1) - 1`` for signed inputs, ``2^b - 1`` otherwise (a float tensor)."""
        unsigned_max = float(2**self.bits - 1)
        signed_max = float(2 ** (self.bits - 1) - 1)
        return torch.where(signed.bool(), signed_max, unsigned_max).float()


class PACTActQuantizer(_SignMode):
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
        super().__init__(bits, "PACT act_bits")
        if not init_alpha > 0:
            raise ValueError(f"PACT init_alpha={init_alpha} must be > 0")
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signed = self._decide_sign(x)  # the first batch decides: post-ReLU inputs stay unsigned
        y = _PACTClip.apply(x, self.alpha, signed)
        step = (self.alpha.detach().abs() / self._levels(signed)).clamp_min(1e-12).to(x.dtype)
        return _RoundSTE.apply(y / step) * step


class LSQActQuantizer(_SignMode):
    """LSQ activation quantizer (Esser et al. 2020; 8-bit default, for ViTs), per tensor.

    ``y_q = clamp(round(x / s), Qn, Qp) * s`` with a learnable step ``s`` initialised at the first
    training batch to ``2 mean|x| / sqrt(Qp)`` and a gradient scale ``1/sqrt(Qp * numel)``.
    Signed range ``[-2^(b-1), 2^(b-1)-1]`` unless the first batch is non-negative.
    """

    def __init__(self, bits: int = 8):
        super().__init__(bits, "LSQ act_bits")
        self.step = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._seen_batch:
            with torch.no_grad():  # the step starts from the first batch, unless a checkpoint already set it
                unset = self.signed < 0
                signed = torch.where(unset, (x < 0).any().to(self.signed.dtype), self.signed)
                first = lsq_initial_step(x, self._levels(signed)) + 1e-8
                self.step.copy_(torch.where(unset, first, self.step))
        signed = self._decide_sign(x)
        qp = self._levels(signed)
        qn = -(qp + 1) * signed  # -2^(b-1) for signed inputs, 0 otherwise
        per_sample = max(x.numel() // max(x.shape[0], 1), 1)
        grad_scale = torch.rsqrt(qp * per_sample)
        step = self.step.abs() + 1e-8
        step = (step - step * grad_scale).detach() + step * grad_scale
        return _RoundSTE.apply(torch.clamp(x / step, qn.to(x.dtype), qp.to(x.dtype))) * step


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
