"""The autograd nodes of the MSQ weight quantizer (the fused quantizer + LSB regularizer of ``quant.kernels``).

* :class:`MSQWeightQuantize` / :func:`msq_quantize_weight` -- ``W -> (W_q, R)``, a node of its own; ``W_q`` then
  goes into whatever op the caller runs (the Hessian passes, the reference for everything below).
* :class:`MSQWeightOp` / :func:`msq_weight_op` -- ``(x, W, b) -> (op(x, W_q, b), R)`` for ``op`` = linear or
  2-D convolution as *one* node that keeps no float quantized weight from the forward to the backward. The MSQ
  layers train through it where ``recompute_weight`` selects it (``msq_hf.nn.layers.MSQLayerMixin``).

Why the second node: with the quantizer as a node of its own, ``F.linear``/``F.conv2d`` save their weight
argument for the input gradient. For a float layer that is the ``Parameter``, alive anyway; for an MSQ layer
it is ``W_q``, a new weight-sized float tensor, and the quantizer node adds the int8 LSB sign (a quarter of
that): ~1.25x the model's weight bytes held from every forward to its backward (ResNet-18: 56 MB next to
27 MB of float activations at 32 px, batch 64; docs/results.md, "Step cost"). :class:`MSQWeightOp` saves what
float training saves (the input and the latent ``Parameter``) plus the int8 sign and four 0-d tensors (bits, k,
the scale ``S`` and the coefficient ``c``). Its backward rebuilds ``W_q`` from ``(W, S)`` in one elementwise pass
(``KERNELS.requantize``: the forward's operations, no reduction), calls the gradient kernels autograd would call
for the op, and adds the regularizer gradient into the op's fresh weight gradient (skipped when ``R`` did not
reach the loss). The kernels are deterministic and see the same inputs, so outputs and gradients are
bit-identical to the two-node path (``tests/nn/test_quantizer_op.py``). The price is that rebuilding pass, which
is why the layers choose per layer (``recompute_weight = "auto"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from msq_hf.quant import functional as QF
from msq_hf.quant.kernels import KERNELS

#: ``(continuous, units, mean)`` of the fused quantizer
QuantSpec = tuple[bool, str, bool]
#: ``(stride, padding, dilation, groups)`` of a 2-D convolution with numeric padding; ``None`` means linear
ConvSpec = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int] | None


class MSQWeightQuantize(torch.autograd.Function):
    """``(W) -> (W_q, R)``: sign-magnitude RoundClamp fake quantization fused with the L1 LSB term.

    Forward::

        S   = max|W|
        W_q = S/2^n * clamp(round(2^n W / S), -(2^n-1), 2^n-1)
        W_lo= S/2^(n-k) * clamp(round(2^(n-k) W / S), ...)            (nearest (n-k)-bit level)
        D   = W - W_lo  (continuous)  or  W_q - W_lo  (discrete)
        R   = sum|D| in grid steps, times S^2/(2^8 2^n) ("scale"), S^2/4^n ("step"), 1 ("code") or 1/2^n
              ("value"); /N for "mean"

    Backward: ``dL/dW = dL/dW_q + (dL/dR) * c * sign(D)`` with ``c = S/2^8`` (scale), ``S/2^n`` (step),
    ``2^n/S`` (code) or ``1/S`` (value). "scale" and "step" pull a layer scaled by any constant by the same
    number of grid steps (docs/pruning.md, "Pacing"). The first term is the
    STE for the task loss, the second MSQ Eq. 7. ``bits`` and ``k`` are 0-d integer tensors (never read on the
    host); at ``k == 0`` the kernels give ``R = 0`` and ``c = 0``. ``k=None``: straight-through quantization
    only (``R`` is a constant 0, nothing is saved for the backward).
    """

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        bits: torch.Tensor,
        k: torch.Tensor | None,
        continuous: bool,
        units: str,
        mean: bool,
        owns_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.detach()
        ctx.reg = k is not None
        ctx.owns_grad = owns_grad
        # R not in the loss (the QAT phase pops the terms but leaves them out): grad_reg is None, no kernel pass
        ctx.set_materialize_grads(False)
        if k is None:
            return KERNELS.fake_quantize(w, bits), w.new_zeros(())
        wq, sign, reg, coef = KERNELS.forward(w, bits, k, continuous, units, mean)
        ctx.save_for_backward(sign, coef)
        return wq, reg

    @staticmethod
    def backward(ctx: Any, grad_wq: torch.Tensor, grad_reg: torch.Tensor):  # type: ignore[override]
        grad = grad_wq
        if ctx.reg and grad_reg is not None:
            sign, coef = ctx.saved_tensors
            if grad is None:  # only R reached the loss
                grad, owned = torch.zeros_like(sign, dtype=coef.dtype), True
            else:
                owned = ctx.owns_grad
            grad = KERNELS.backward(grad, sign, grad_reg, coef, may_overwrite=owned)
        return grad, None, None, None, None, None, None


def msq_quantize_weight(
    weight: torch.Tensor,
    bits: int | torch.Tensor,
    k: int | torch.Tensor | None = 0,
    *,
    continuous: bool = True,
    units: str = "scale",
    mean: bool = False,
    owns_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional entry point of :class:`MSQWeightQuantize` (returns ``(W_q, R)``).

    ``units``: ``"scale"``, ``"step"``, ``"code"`` or ``"value"`` (see :class:`MSQWeightQuantize`).
    ``bits``/``k``: Python ints or 0-d integer tensors (a layer passes its buffers, so no value is read on
    the host). ``k=0`` or ``None`` (as ints): straight-through quantization only, ``R = 0``; a tensor ``k``
    always runs the fused regularizer (``R = 0`` and no regularizer gradient where it holds 0).

    ``owns_grad=True`` promises that ``W_q`` feeds exactly one linear/convolution op, whose backward
    hands the quantizer a freshly allocated weight gradient; the backward may then add the
    regularizer gradient into that buffer in place. Leave it ``False`` whenever ``W_q`` is used
    anywhere else (the incoming gradient could be shared, expanded or the caller's own tensor).
    """
    if not isinstance(bits, torch.Tensor):
        bits = torch.tensor(QF.check_bits(bits), dtype=torch.int32, device=weight.device)
    if k is not None and not isinstance(k, torch.Tensor):
        k = torch.tensor(int(k), dtype=torch.int32, device=weight.device) if int(k) > 0 else None
    return MSQWeightQuantize.apply(weight, bits, k, continuous, units, mean, owns_grad)


def _op(x: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor | None, conv: ConvSpec) -> torch.Tensor:
    if conv is None:
        return F.linear(x, wq, bias)
    stride, padding, dilation, groups = conv
    return F.conv2d(x, wq, bias, stride, padding, dilation, groups)


def _linear_backward(
    grad: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, ...]:
    # F.linear runs addmm/mm on x viewed as 2-D (x is 2-D or contiguous here). These are the mm calls of
    # autograd's mm_mat1_backward / mm_mat2_backward for mat2 = W_q.t(); the bias gradient is its sum_to.
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    gx = gw = gb = None
    if needs[0]:
        if x2.stride(0) == 1 and x2.stride(1) == x2.shape[0]:  # column-major input: autograd's other branch
            gx = wq.t().mm(g2.t()).t()
        else:
            gx = g2.mm(wq)
        gx = gx.reshape(x.shape)
    if needs[1]:
        gw = g2.t().mm(x2)
    if needs[2]:
        gb = g2.sum(0)
    return gx, gw, gb


class MSQWeightOp(torch.autograd.Function):
    """``(x, W, b) -> (op(x, W_q, b), R)`` keeping only ``x`` and ``W`` for the backward (see the module docstring).

    ``bits``/``k`` are 0-d integer tensors (the layer's buffers); ``conv=None`` means linear.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: torch.Tensor,
        k: torch.Tensor,
        quant: QuantSpec,
        conv: ConvSpec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        wq, sign, reg, coef, scale = KERNELS.op_forward(weight.detach(), bits, k, *quant)
        out = _op(x, wq, bias, conv)
        ctx.quant, ctx.conv, ctx.has_bias, ctx.out_shape = quant, conv, bias is not None, out.shape
        # R unused in the loss (the QAT phase, or a caller that ignores it): no gradient, no regularizer pass
        ctx.set_materialize_grads(False)
        # bits/k are snapshot (two 0-d copies): the backward quantizes at the precision of the forward, as the
        # two-node path does, even if the buffers change in between; S lets it rebuild W_q without a reduction,
        # and the int8 sign of the LSB part (1 byte per weight, not W_q's 4) gives the regularizer gradient
        ctx.save_for_backward(x, weight, bias, bits.clone(), k.clone(), scale, sign, coef)
        return out, reg

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, grad_reg: torch.Tensor):  # type: ignore[override]
        x, weight, bias, bits, k, scale, sign, coef = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if grad_out is None:  # only R reached the loss
            grad_out = torch.zeros(ctx.out_shape, dtype=x.dtype, device=x.device)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            grads = _retraced_backward(ctx, x, weight, bias, bits, k, grad_out, grad_reg, needs)
            return (*grads, None, None, None, None)
        wq = KERNELS.requantize(weight.detach(), scale, bits)
        if ctx.conv is None:
            gx, gw, gb = _linear_backward(grad_out, x, wq, needs)
        else:
            stride, padding, dilation, groups = ctx.conv
            bias_sizes = [wq.shape[0]] if ctx.has_bias else None
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_out, x, wq, bias_sizes, stride, padding, dilation, False, [0, 0], groups, list(needs)
            )
        if gw is not None and grad_reg is not None:  # the op's fresh weight gradient takes the regularizer term
            gw = KERNELS.backward(gw, sign, grad_reg, coef, may_overwrite=True)
        return gx, gw, gb, None, None, None, None


def _retraced_backward(ctx, x, weight, bias, bits, k, grad_out, grad_reg, needs) -> tuple[torch.Tensor | None, ...]:
    # double backward: rebuild the two-node path on the saved inputs (they carry their graph) and
    # differentiate it, so second-order terms are those of the two-node path (one more op forward, only here)
    continuous, units, mean = ctx.quant
    with torch.enable_grad():
        wq, reg = msq_quantize_weight(weight, bits, k, continuous=continuous, units=units, mean=mean)
        out = _op(x, wq, bias, ctx.conv)
    inputs = [t for t, need in zip((x, weight, bias), needs) if need]
    # grad_reg None: R did not reach the loss (a None grad_output would mean 1 for the 0-d R)
    outputs, grads_in = ((out, reg), (grad_out, grad_reg)) if grad_reg is not None else ((out,), (grad_out,))
    grads = iter(torch.autograd.grad(outputs, inputs, grads_in, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def conv_spec(layer: Any, padding: Any) -> ConvSpec:
    """``(stride, padding, dilation, groups)`` of ``layer`` for the given (numeric) ``padding``."""
    return tuple(layer.stride), tuple(padding), tuple(layer.dilation), int(layer.groups)


def op_supported(x: torch.Tensor, weight: torch.Tensor, padding: Any = None, *, linear: bool) -> bool:
    """True when :class:`MSQWeightOp` reproduces the two-node path bit for bit and saves less.

    Linear: 2-D or contiguous input (what ``F.linear`` runs as one GEMM). Convolution: batched 4-D input and
    numeric padding (``"same"``/``"valid"`` take another aten path). Not under autocast: there the op saves
    its low-precision casts, not ``x``, and this node would keep the full-precision input alive instead.
    """
    if torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype:
        return False
    if linear:
        return x.dim() == 2 or (x.dim() > 2 and x.is_contiguous())
    return x.dim() == 4 and not isinstance(padding, str)


def msq_weight_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bits: torch.Tensor,
    k: torch.Tensor,
    quant: QuantSpec,
    conv: ConvSpec = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(op(x, W_q, bias), R)`` through :class:`MSQWeightOp`; ``conv=None`` is linear."""
    return MSQWeightOp.apply(x, weight, bias, bits, k, quant, conv)


__all__ = [
    "ConvSpec",
    "MSQWeightOp",
    "MSQWeightQuantize",
    "QuantSpec",
    "conv_spec",
    "msq_quantize_weight",
    "msq_weight_op",
    "op_supported",
]
