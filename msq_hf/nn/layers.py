"""MSQ layers: ``MSQLinear`` and ``MSQConv2d`` plus the activation quantizers.

Each layer keeps its float latent weight (a normal ``Parameter``: the optimizer and the
trainable-parameter count are those of the float model) and two persistent integer buffers:

* ``bits`` -- the current magnitude precision ``n`` (1..8);
* ``k``    -- LSBs removed by the next pruning step (0 = the layer is no longer regularized).

so the bit scheme lives in ``state_dict`` and in every Trainer checkpoint.

The LSB regularizer is fused into the quantizer (``MSQWeightQuantize``): one autograd node per
layer returns the fake-quantized weight *and* the layer's L1 LSB term. Its backward adds
``dR/dW = c * sign(l)`` to the straight-through gradient in the same elementwise pass, so the
regularizer costs no second graph over the weights and is scaled by whatever multiplies it in the
loss (lambda, gradient accumulation, AMP loss scaling) exactly like any other loss term.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msq_hf.quant import functional as QF
from msq_hf.quant.kernels import KERNELS

REG_ATTR = "_msq_reg"


class MSQWeightQuantize(torch.autograd.Function):
    """``(W) -> (W_q, R)``: sign-magnitude RoundClamp fake quantization fused with the L1 LSB term.

    Forward::

        S   = max|W|
        W_q = S/2^n * clamp(round(2^n W / S), -(2^n-1), 2^n-1)
        W_lo= S/2^(n-k) * clamp(round(2^(n-k) W / S), ...)            (nearest (n-k)-bit level)
        D   = W - W_lo  (continuous)  or  W_q - W_lo  (discrete)
        R   = c * sum|D|,  c = 2^n/S (code units) or 1/S (value units), /N for a mean reduction

    Backward: ``dL/dW = dL/dW_q + (dL/dR) * c * sign(D)`` -- the STE for the task loss plus
    MSQ Eq. 7 for the regularizer. With ``k == 0`` no regularizer is computed and ``R`` is 0.
    """

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        bits: int,
        k: int,
        continuous: bool,
        code_units: bool,
        mean: bool,
        owns_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.detach()
        if k <= 0:
            ctx.reg = False
            return QF.fake_quantize_signmag(w, bits, QF.max_abs_scale(w)), w.new_zeros(())
        wq, sign, reg, coef = KERNELS.forward(w, bits, k, continuous, code_units, mean)
        ctx.reg = True
        ctx.owns_grad = owns_grad
        ctx.save_for_backward(sign, coef)
        return wq, reg

    @staticmethod
    def backward(ctx: Any, grad_wq: torch.Tensor, grad_reg: torch.Tensor):  # type: ignore[override]
        grad = grad_wq
        if ctx.reg and grad_reg is not None:
            sign, coef = ctx.saved_tensors
            grad = KERNELS.backward(grad_wq, sign, grad_reg, coef, may_overwrite=ctx.owns_grad)
        return grad, None, None, None, None, None, None


def msq_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    k: int = 0,
    *,
    continuous: bool = True,
    code_units: bool = True,
    mean: bool = False,
    owns_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional entry point of :class:`MSQWeightQuantize` (returns ``(W_q, R)``).

    ``owns_grad=True`` promises that ``W_q`` feeds exactly one linear/convolution op, whose backward
    hands the quantizer a freshly allocated weight gradient; the backward may then add the
    regularizer gradient into that buffer in place. Leave it ``False`` whenever ``W_q`` is used
    anywhere else (the incoming gradient could be shared, expanded or the caller's own tensor).
    """
    return MSQWeightQuantize.apply(weight, int(bits), int(k), continuous, code_units, mean, owns_grad)


# --------------------------------------------------------------------------------------------
# activation quantizers


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


class PACTActQuantizer(nn.Module):
    """PACT-style uniform activation quantizer for CNNs (2..8 bits).

    ``y = clip(x, lo, alpha)`` with a learnable clipping level ``alpha`` (``lo = 0`` for
    non-negative inputs such as post-ReLU activations, ``-alpha`` otherwise), then
    ``y_q = round(y / s) * s`` with ``s = alpha / (2^b - 1)`` (unsigned) or ``alpha / (2^(b-1) - 1)``
    (signed). Gradients: STE inside the clip range; ``dL/dalpha = sum dL/dy * 1[x >= alpha]``
    (PACT) plus the step-size term, via autograd.
    The sign mode is fixed at the first training batch (``signed`` buffer: -1 unset, 0, 1).
    """

    def __init__(self, bits: int = 4, init_alpha: float = 10.0):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"PACT act_bits={bits} is outside 2..8")
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.register_buffer("signed", torch.tensor(-1, dtype=torch.int8))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(self.signed) < 0:
            self.signed.fill_(int(bool((x.detach() < 0).any())))
        alpha = self.alpha.abs() + 1e-8
        if int(self.signed):
            levels = 2 ** (self.bits - 1) - 1
            y = torch.maximum(torch.minimum(x, alpha), -alpha)
        else:
            levels = 2**self.bits - 1
            y = torch.minimum(F.relu(x), alpha)
        step = alpha / levels
        return _round_ste(y / step) * step


class LSQActQuantizer(nn.Module):
    """LSQ activation quantizer (8-bit default, for ViTs), per tensor.

    ``y_q = clamp(round(x / s), Qn, Qp) * s`` with a learnable step ``s`` initialised at the first
    training batch to ``2 mean|x| / sqrt(Qp)`` and a gradient scale ``1/sqrt(Qp * numel)`` (Esser
    et al.). Signed range ``[-2^(b-1), 2^(b-1)-1]`` unless the first batch is non-negative.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"LSQ act_bits={bits} is outside 2..8")
        self.bits = bits
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
        return _round_ste(torch.clamp(x / step, qn, qp)) * step


def make_act_quantizer(kind: str, bits: int) -> nn.Module:
    """Build the activation quantizer named by the config (``"pact"`` or ``"lsq"``)."""
    if kind == "pact":
        return PACTActQuantizer(bits)
    if kind == "lsq":
        return LSQActQuantizer(bits)
    raise ValueError(f"act_quantizer={kind!r} is not one of 'pact', 'lsq'")


# --------------------------------------------------------------------------------------------
# weight-quantized layers


class MSQLayerMixin:
    """Shared state and behaviour of MSQ layers (mixed in *before* the torch layer class)."""

    weight: nn.Parameter
    bits: torch.Tensor
    k: torch.Tensor

    def _init_msq(
        self,
        bits: int,
        *,
        wnorm: str = "signmag",
        lsb_form: str = "continuous",
        lsb_units: str = "code",
        reg_reduction: str = "sum",
        act_quantizer: nn.Module | None = None,
    ) -> None:
        QF._check_bits(bits)
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int32))
        self.register_buffer("k", torch.tensor(0, dtype=torch.int32))
        self.wnorm = wnorm
        self.lsb_form = lsb_form
        self.lsb_units = lsb_units
        self.reg_reduction = reg_reduction
        self.act_quant = act_quantizer
        setattr(self, REG_ATTR, None)

    # -- state -----------------------------------------------------------------------------
    @property
    def n_bits(self) -> int:
        """Current precision as a Python int."""
        return int(self.bits)

    @property
    def n_k(self) -> int:
        """LSBs targeted by the next pruning step (0: not regularized)."""
        return int(self.k)

    def set_bits(self, bits: int, k: int | None = None) -> None:
        """Set the precision (and optionally k); ``k`` is capped so that ``bits - k >= 1``."""
        QF._check_bits(bits)
        # fix (tests): validate k before touching any buffer, so a rejected call leaves the layer unchanged
        if k is not None and (k < 0 or (k > 0 and bits - k < 1)):
            raise ValueError(f"k={k} is invalid for bits={bits} (need 0 <= k < bits)")
        self.bits.fill_(int(bits))
        if k is not None:
            self.k.fill_(int(k))
        elif self.n_k >= bits:
            self.k.fill_(bits - 1)

    # -- quantization ----------------------------------------------------------------------
    def _quantized_weight_and_reg(self, owns_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        bits = self.n_bits
        want_reg = self.training and torch.is_grad_enabled() and self.n_k > 0
        if self.wnorm == "signmag":
            wq, reg = msq_quantize_weight(
                self.weight,
                bits,
                self.n_k if want_reg else 0,
                continuous=self.lsb_form == "continuous",
                code_units=self.lsb_units == "code",
                mean=self.reg_reduction == "mean",
                owns_grad=owns_grad,
            )
            return wq, (reg if want_reg else None)
        # DoReFa-affine normalization: readable autograd path (slower; an ablation option).
        wq = QF.quantize_weight(self.weight, bits, "dorefa")
        reg = None
        if want_reg:
            reg = QF.lsb_l1(
                self.weight, bits, self.n_k, self.lsb_form, self.lsb_units, self.reg_reduction, wnorm="dorefa"
            )
        return wq, reg

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight at the current precision (no regularizer, no graph)."""
        with torch.no_grad():
            if self.wnorm == "signmag":
                return QF.fake_quantize_signmag(self.weight, self.n_bits, QF.max_abs_scale(self.weight))
            return QF.quantize_weight(self.weight, self.n_bits, "dorefa")

    def quantized_weight_ste(self) -> torch.Tensor:
        """The fake-quantized weight with the straight-through gradient (for Hessian passes)."""
        if self.wnorm == "signmag":
            return msq_quantize_weight(self.weight, self.n_bits, 0)[0]
        return QF.quantize_weight(self.weight, self.n_bits, "dorefa")

    def lsb_nonzero_rate(self, k: int | None = None) -> float:
        """Fraction of weights whose current code has a non-zero ``k``-LSB field."""
        k = self.n_k if k is None else k
        if k <= 0:
            return 0.0
        return QF.lsb_nonzero_rate(self.weight, self.n_bits, k, self.wnorm)

    def integer_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scale)``: signed integer codes (int16) and the fp32 scale reproducing ``quantized_weight``.

        signmag: ``W_q = codes * scale`` with ``scale = S/2^n`` and codes in ``[-(2^n-1), 2^n-1]``.
        dorefa : ``W_q = 2*codes*scale - 1`` with ``scale = 1/2^n`` and codes in ``[0, 2^n-1]``.
        """
        with torch.no_grad():
            bits = self.n_bits
            if self.wnorm == "signmag":
                s = QF.max_abs_scale(self.weight)
                codes = QF.signed_codes(self.weight.float(), bits, s)
                return codes.to(torch.int16), (s / 2**bits).reshape(1).float()
            u = QF.dorefa_affine_normalize(self.weight.float())
            return QF.roundclamp_codes(u, bits).to(torch.int16), torch.tensor([1.0 / 2**bits])

    def pop_regularization(self) -> torch.Tensor | None:
        """Return and clear the regularizer term recorded by the last training forward."""
        reg = getattr(self, REG_ATTR, None)
        setattr(self, REG_ATTR, None)
        return reg

    def _msq_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quant(x) if self.act_quant is not None else x

    def _msq_weight(self) -> torch.Tensor:
        # W_q goes straight into this layer's F.linear/conv, whose weight gradient is a fresh buffer
        wq, reg = self._quantized_weight_and_reg(owns_grad=True)
        setattr(self, REG_ATTR, reg)
        return wq

    def msq_extra_repr(self) -> str:
        return f"bits={self.n_bits}, k={self.n_k}, wnorm={self.wnorm}"


class MSQLinear(MSQLayerMixin, nn.Linear):
    """``nn.Linear`` with an MSQ fake-quantized weight (and optional input quantizer)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        device: Any = None,
        dtype: Any = None,
        **msq_kwargs: Any,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_msq(bits, **msq_kwargs)

    @classmethod
    def from_float(cls, module: nn.Linear, bits: int, **msq_kwargs: Any) -> MSQLinear:
        """Wrap an existing ``nn.Linear`` (its parameters are shared, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight = module.weight
        new.bias = module.bias
        new._init_msq(bits, **msq_kwargs)
        new.bits = new.bits.to(module.weight.device)
        new.k = new.k.to(module.weight.device)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._msq_input(x), self._msq_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.msq_extra_repr()}"

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.quantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


class MSQConv2d(MSQLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` (any groups / dilation / padding mode) with an MSQ fake-quantized weight.

    ``same_pad`` reproduces timm's ``Conv2dSame`` (TF "SAME" padding computed per input size).
    """

    same_pad: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        bits: int = 8,
        device: Any = None,
        dtype: Any = None,
        **msq_kwargs: Any,
    ):
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_msq(bits, **msq_kwargs)

    @classmethod
    def from_float(cls, module: nn.Conv2d, bits: int, **msq_kwargs: Any) -> MSQConv2d:
        """Wrap an existing ``nn.Conv2d`` (parameters shared; every conv attribute copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(new, name, getattr(module, name))
        new.weight = module.weight
        new.bias = module.bias
        new._init_msq(bits, **msq_kwargs)
        new.bits = new.bits.to(module.weight.device)
        new.k = new.k.to(module.weight.device)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._msq_input(x)
        if self.same_pad:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self._msq_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.msq_extra_repr()}"

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the dequantized weight."""
        if self.same_pad:
            from timm.layers.conv2d_same import Conv2dSame

            conv: nn.Conv2d = Conv2dSame(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                0,
                self.dilation,
                self.groups,
                self.bias is not None,
            )
            conv.to(device=self.weight.device, dtype=self.weight.dtype)
        else:
            conv = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.bias is not None,
                self.padding_mode,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
        with torch.no_grad():
            conv.weight.copy_(self.quantized_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


MSQ_LAYER_TYPES = (MSQLinear, MSQConv2d)


def is_msq_layer(module: nn.Module) -> bool:
    """True for MSQ weight-quantized layers."""
    return isinstance(module, MSQLayerMixin)


__all__ = [
    "LSQActQuantizer",
    "MSQConv2d",
    "MSQLayerMixin",
    "MSQLinear",
    "MSQWeightQuantize",
    "PACTActQuantizer",
    "is_msq_layer",
    "make_act_quantizer",
    "msq_quantize_weight",
]
