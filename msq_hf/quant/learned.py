"""A learned quantization step for MSQ's QAT phase (``MSQConfig.qat_scale="learned"``): LSQ on MSQ's grid.

While bits are pruned, a layer's grid is ``s * {-(2^n-1), ..., 2^n-1}`` with ``s = max|W| / 2^n``: the scale must
follow the weights so that the grids of ``n`` and ``n - k`` bits stay nested. Once the bit scheme is final that
constraint is gone, and the step ``s`` can be trained by the loss, as LSQ (Esser et al., ICLR 2020) trains its
step::

    x = W / s,    q = clamp(round(x), -Qn, Qp),    W_q = q s,    Qn = Qp = 2^n - 1
    dW_q/dW = 1[-Qn <= x <= Qp]                straight-through inside the range, nothing beyond it
    dW_q/ds = q - x 1[-Qn <= x <= Qp]          LSQ's step gradient
    times g = 1 / sqrt(N_W Qp)                 LSQ's gradient scale (N_W: the layer's weight count)

The grid keeps MSQ's sign-magnitude shape (``2^(n+1) - 1`` levels, ``n + 1`` stored bits), so the export's codes
and its per-layer step are unchanged in form. With ``full`` (``MSQConfig.qat_grid="full"``) it also uses the one code
``n + 1`` stored bits leave free (sign-magnitude's "-0"): the level ``+2^n``, so ``q`` runs over
``{-(2^n-1), ..., 2^n}``, all ``2^(n+1)`` codes, as a uniform ``(n+1)``-bit grid does (LSQ's ``Qp`` is then
``2^n``). The export's offset codes ``q + 2^n - 1`` then reach ``2^(n+1) - 1``, the largest ``n + 1`` bits hold, and
decode with the same formula. Everything is computed in float32 and the result cast to the weight's
dtype, so the training forward, the eval forward and the export's ``codes * step``
(:func:`msq_hf.nn.codec.decode_weight`) agree bit for bit in any dtype. ``bits`` enters as the layer's 0-d integer
buffer: no host read, one ``torch.compile`` graph whatever the bit width.
"""

from __future__ import annotations

from typing import Any

import torch

from msq_hf.quant.grid import grid_levels

#: the smallest step the grid can have: a step trained to zero (or a sign flip through it) cannot divide by zero
MIN_STEP = torch.finfo(torch.float32).tiny


def effective_step(param: torch.Tensor) -> torch.Tensor:
    """The grid step of a learned-step parameter: ``|s|`` in float32, floored at :data:`MIN_STEP` (differentiable)."""
    return param.float().abs().clamp_min(MIN_STEP)


def lsq_initial_step(x: torch.Tensor, qp: torch.Tensor | float) -> torch.Tensor:
    """LSQ's first step for ``x`` on a grid whose largest index is ``qp``: ``2 mean|x| / sqrt(Qp)`` (float32). The
    LSQ activation quantizer starts there; a learned weight step at ``n`` magnitude bits starts there with
    ``Qp = 2^n - 1`` (``learned_step_init="lsq"``), as a uniform LSQ quantizer with the same ``n + 1`` stored bits."""
    return 2 * x.detach().abs().mean().float() / torch.as_tensor(qp, dtype=torch.float32).sqrt()


def _code_range(bits: torch.Tensor | int, full: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Qn, Qp)`` as float32 tensors: ``2^n - 1`` both, or ``Qp = 2^n`` with ``full`` (from the 0-d ``bits`` buffer
    without a host read, or from an int)."""
    top = grid_levels(torch.as_tensor(bits, device=device)) - 1
    return top, top + 1 if full else top


def learned_step_codes(
    weight: torch.Tensor, step: torch.Tensor, bits: torch.Tensor | int, full: bool = False
) -> torch.Tensor:
    """The float32 codes ``clamp(round(W/s), -Qn, Qp)`` of ``weight`` on the grid of step ``step`` (no grad)."""
    low, high = _code_range(bits, full, weight.device)
    return torch.clamp(torch.round(weight.detach().float() / step.detach().float()), -low, high)


class LearnedStepQuantize(torch.autograd.Function):
    """``W_q = q s`` with LSQ's gradients for ``W`` and ``s`` (module docstring); saves ``W`` and ``s``, not ``W_q``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, step: torch.Tensor, bits: torch.Tensor, full: bool) -> torch.Tensor:
        ctx.save_for_backward(weight, step, bits)
        ctx.full = full
        return (learned_step_codes(weight, step, bits, full) * step.float()).to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        weight, step, bits = ctx.saved_tensors
        low, high = _code_range(bits, ctx.full, weight.device)
        s = step.float()
        x = weight.float() / s
        q = torch.clamp(torch.round(x), -low, high)
        inside = ((x >= -low) & (x <= high)).to(torch.float32)
        g = grad.float()
        grad_weight = (g * inside).to(weight.dtype)
        grad_step = (g * (q - x * inside)).sum() * torch.rsqrt(high * weight.numel())
        return grad_weight, grad_step.to(step.dtype).reshape(step.shape), None, None


def learned_fake_quantize(
    weight: torch.Tensor, param: torch.Tensor, bits: torch.Tensor, full: bool = False
) -> torch.Tensor:
    """``W_q`` on the grid of the learned step ``param`` at ``bits`` magnitude bits (with LSQ's gradients); ``full``
    adds the level ``+2^n`` (module docstring)."""
    return LearnedStepQuantize.apply(weight, effective_step(param), bits, full)


__all__ = [
    "MIN_STEP",
    "LearnedStepQuantize",
    "effective_step",
    "learned_fake_quantize",
    "learned_step_codes",
    "lsq_initial_step",
]
