"""MSQ training layers: ``MSQLinear`` and ``MSQConv2d`` (activation quantizers: ``msq_hf.nn.act``).

Each layer keeps its float latent weight (a normal ``Parameter``: the optimizer and the
trainable-parameter count are those of the float model) and two persistent integer buffers:

* ``bits`` -- the current magnitude precision ``n`` (1..8);
* ``k``    -- LSBs removed by the next pruning step (0 = the layer is no longer regularized).

so the bit scheme lives in ``state_dict`` and in every Trainer checkpoint. With ``MSQConfig.qat_scale="learned"``
a layer also has ``weight_step``, a 0-d ``Parameter``: 0 while the scale is ``max|W|`` (the search), the grid step
learned by the loss once the bit scheme is final (:mod:`msq_hf.quant.learned`; set by the controller, restored
by ``load_state_dict``).

The LSB regularizer is fused into the quantizer (``msq_hf.nn.quantizer``): one autograd node per
layer returns the layer's output *and* its L1 LSB term. Its backward adds ``dR/dW = c * sign(l)`` to
the straight-through gradient in the same elementwise pass, so the regularizer costs no second graph
over the weights and is scaled by whatever multiplies it in the loss (lambda, gradient accumulation,
AMP loss scaling) exactly like any other loss term. Where the quantized weight would dominate a layer's saved
memory, the node also covers the linear / convolution op and keeps no float ``W_q`` from the forward to the
backward (``MSQWeightOp``, chosen per layer by ``recompute_weight``: same numbers, 4 bytes per weight less memory
per step, one more elementwise pass over the weight; docs/results.md, "Step cost").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msq_hf.nn.base import conv_input, copy_geometry, float_twin
from msq_hf.nn.quantizer import (
    MSQWeightQuantize,
    conv_spec,
    msq_quantize_weight,
    msq_weight_op,
    op_supported,
)
from msq_hf.quant import functional as QF
from msq_hf.quant.grid import lsb_proximal, max_abs_scale
from msq_hf.quant.kernels import KERNELS
from msq_hf.quant.learned import effective_step, learned_fake_quantize, learned_step_codes

REG_ATTR = "_msq_reg"
#: an MSQ layer's training state, which an export replaces by the packed codes, the step and the bit width
TRAINING_TENSORS = ("weight", "weight_step", "bits", "k")


# --------------------------------------------------------------------------------------------
# weight-quantized layers


class MSQLayerMixin:
    """Shared state and behaviour of MSQ layers (mixed in *before* the torch layer class)."""

    weight: nn.Parameter
    bits: torch.Tensor
    k: torch.Tensor
    #: How training keeps the quantized weight for the backward (same outputs and gradients either way):
    #: True: MSQWeightOp, one node that keeps the latent weight, the scale and the int8 LSB sign and rebuilds W_q in
    #: the backward (1 byte per weight saved instead of 5; one more elementwise pass over the weight per step);
    #: False: the quantizer node, then F.linear/F.conv2d, which keep the float W_q and the sign;
    #: "auto" (default): MSQWeightOp where the weight has at least as many elements as the layer's input batch,
    #: i.e. where W_q would dominate the layer's saved memory (late CNN stages at small resolution), else two nodes.
    #: Set it on the class to switch every layer (docs/results.md, "Step cost of both MSQ phases").
    recompute_weight: bool | str = "auto"

    def _init_msq(
        self,
        bits: int,
        *,
        wnorm: str = "signmag",
        lsb_form: str = "continuous",
        lsb_units: str = "scale",
        reg_reduction: str = "sum",
        act_quantizer: nn.Module | None = None,
        learned_step: bool = False,
        full_grid: bool = False,
    ) -> None:
        QF.check_bits(bits)
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int32))
        self.register_buffer("k", torch.tensor(0, dtype=torch.int32))
        self.wnorm = wnorm
        self.lsb_form = lsb_form
        self.lsb_units = lsb_units
        self.reg_reduction = reg_reduction
        self.act_quant = act_quantizer
        # qat_scale="learned": the step is a parameter from the start (so optimizers and DDP see it), unused at 0
        step = nn.Parameter(torch.zeros((), device=self.weight.device)) if learned_step else None
        self.register_parameter("weight_step", step)
        self.learned_step_active = False  # Python-side, so the forward never reads the step on the host
        self.full_grid = full_grid  # qat_grid="full": the learned grid also has the level +2^n
        if learned_step:
            self.register_load_state_dict_post_hook(_sync_learned_step)
        setattr(self, REG_ATTR, None)
        # True when the last forward ran in training mode without gradients: no LSB term could be recorded
        # (reentrant activation checkpointing does this; msq_hf.training.regularizer refuses it)
        self.forward_without_grad = False

    @classmethod
    def from_float(cls, module: nn.Module, bits: int, **msq_kwargs: Any) -> Any:
        """Wrap an existing float layer (its parameters are shared, not copied; its geometry is copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        copy_geometry(new, module)
        new.weight = module.weight
        new.bias = module.bias
        new._init_msq(bits, **msq_kwargs)
        new.bits = new.bits.to(module.weight.device)
        new.k = new.k.to(module.weight.device)
        return new

    def to_float(self) -> nn.Module:
        """A plain ``nn.Linear`` / ``nn.Conv2d`` (timm ``Conv2dSame`` if SAME-padded) with the dequantized weight."""
        return float_twin(self, self.quantized_weight())

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
        QF.check_bits(bits)
        # fix (tests): validate k before touching any buffer, so a rejected call leaves the layer unchanged
        if k is not None and (k < 0 or (k > 0 and bits - k < 1)):
            raise ValueError(f"k={k} is invalid for bits={bits} (need 0 <= k < bits)")
        self.bits.fill_(int(bits))
        if k is not None:
            self.k.fill_(int(k))
        elif self.n_k >= bits:
            self.k.fill_(bits - 1)

    def start_learned_step(self, step: torch.Tensor | float) -> None:
        """Switch to the learned step (``qat_scale="learned"``), starting at ``step`` > 0; the scheme must be final."""
        if self.weight_step is None:
            raise ValueError(f"{type(self).__name__} has no weight_step: build it with qat_scale='learned'")
        if self.n_k != 0:
            raise ValueError(f"{type(self).__name__}: the learned step needs a final bit width (k = 0, not {self.n_k})")
        step = torch.as_tensor(step, dtype=torch.float32)
        if not bool(step > 0):
            raise ValueError(f"{type(self).__name__}: the learned step must start > 0, not {float(step)}")
        with torch.no_grad():
            self.weight_step.copy_(step)
        self.learned_step_active = True

    def sync_learned_step(self) -> None:
        """Set :attr:`learned_step_active` from ``weight_step`` (non-zero: learned) after its value was loaded."""
        step = self.weight_step
        if step is not None and not step.is_meta:
            self.learned_step_active = bool(step.detach() != 0)

    # -- quantization ----------------------------------------------------------------------
    def _learned_weight(self) -> torch.Tensor:
        return learned_fake_quantize(self.weight, self.weight_step, self.bits, self.full_grid)

    def _quantized_weight_and_reg(self, owns_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.learned_step_active:  # QAT on the learned grid: nothing is pruned any more, no LSB term
            return self._learned_weight(), None
        # Training (signmag): the buffers go into the kernels as tensors -- no int(bits)/int(k) host read per
        # layer and step, and torch.compile traces the whole forward+backward as one graph. A layer at k = 0
        # still returns a (zero) regularizer term: whether k is 0 is data, not control flow.
        want_reg = self.training and torch.is_grad_enabled()
        if self.wnorm == "signmag":
            wq, reg = msq_quantize_weight(
                self.weight,
                self.bits,
                self.k if want_reg else None,
                continuous=self.lsb_form == "continuous",
                units=self.lsb_units,
                mean=self.reg_reduction == "mean",
                owns_grad=owns_grad,
            )
            return wq, (reg if want_reg else None)
        # DoReFa-affine normalization: readable autograd path (slower; an ablation option, reads bits on the host).
        wq = QF.quantize_weight(self.weight, self.n_bits, "dorefa")
        reg = None
        if want_reg and self.n_k > 0:
            reg = QF.lsb_l1(
                self.weight, self.n_bits, self.n_k, self.lsb_form, self.lsb_units, self.reg_reduction, wnorm="dorefa"
            )
        return wq, reg

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight at the current precision (no regularizer, no graph)."""
        with torch.no_grad():
            if self.learned_step_active:
                return self._learned_weight()
            if self.wnorm == "signmag":
                return QF.fake_quantize_signmag(self.weight, self.n_bits, QF.max_abs_scale(self.weight))
            return QF.quantize_weight(self.weight, self.n_bits, "dorefa")

    def quantization_reference(self) -> torch.Tensor:
        """The float weight that :meth:`quantized_weight` rounds, in the same domain (no graph).

        ``W`` for sign-magnitude; ``2u - 1`` with DoReFa's ``u = tanh W / (2 max|tanh W|) + 1/2``, whose
        quantized values live in [-1, 1]. The HAWQ error ``||Q - W||^2`` is taken against this.
        """
        with torch.no_grad():
            if self.wnorm == "signmag":
                return self.weight.detach()
            return 2 * QF.dorefa_affine_normalize(self.weight.detach()) - 1

    def quantized_weight_ste(self) -> torch.Tensor:
        """The fake-quantized weight with the straight-through gradient (for Hessian passes)."""
        if self.learned_step_active:
            return self._learned_weight()
        if self.wnorm == "signmag":
            return msq_quantize_weight(self.weight, self.bits, None)[0]
        return QF.quantize_weight(self.weight, self.n_bits, "dorefa")

    def regularizer_gradient(self) -> torch.Tensor:
        """``dR_l/dW`` at the current ``bits``/``k``, without a graph: what the fused backward adds at lambda = 1
        (zero at ``k = 0``). For a regularizer applied outside the loss (after gradient clipping, a gradient hook)."""
        w = self.weight.detach()
        if self.wnorm == "signmag":  # the fused kernel's c * sign(l), as in the training backward
            continuous, mean = self.lsb_form == "continuous", self.reg_reduction == "mean"
            _, sign, _, coef = KERNELS.forward(w, self.bits, self.k, continuous, self.lsb_units, mean)
            return sign.to(w.dtype) * coef
        if self.n_k <= 0:
            return torch.zeros_like(w)
        with torch.enable_grad():
            w = w.clone().requires_grad_(True)
            reg = QF.lsb_l1(w, self.n_bits, self.n_k, self.lsb_form, self.lsb_units, self.reg_reduction, "dorefa")
            return torch.autograd.grad(reg, w)[0]

    def apply_lsb_proximal(self, amount: float) -> None:
        """Move the weights one proximal step of ``amount * R_l`` (``amount = lr * lambda``) toward the coarse grid
        (:func:`msq_hf.quant.grid.lsb_proximal`), in place; nothing at ``k = 0``. Device-side, no host read."""
        if self.wnorm != "signmag":
            raise ValueError(f"{type(self).__name__}: lsb_update='proximal' needs wnorm='signmag', not {self.wnorm!r}")
        mean = self.reg_reduction == "mean"
        with torch.no_grad():
            w = self.weight
            w.copy_(lsb_proximal(w, max_abs_scale(w), self.bits, self.k, self.lsb_units, mean, float(amount)))

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
        Computed in the weight's dtype, like ``quantized_weight`` (a bf16 weight rounds in bf16); with the learned
        step (``qat_scale="learned"``) ``scale`` is that step, the codes float32 (up to ``2^n`` with ``full_grid``).
        """
        with torch.no_grad():
            bits = self.n_bits
            if self.learned_step_active:
                step = effective_step(self.weight_step)
                return learned_step_codes(self.weight, step, bits, self.full_grid).to(torch.int16), step.reshape(1)
            if self.wnorm == "signmag":
                s = QF.max_abs_scale(self.weight)
                return QF.signed_codes(self.weight, bits, s).to(torch.int16), (s / 2**bits).reshape(1).float()
            u = QF.dorefa_affine_normalize(self.weight.detach())
            return QF.roundclamp_codes(u, bits).to(torch.int16), torch.tensor([1.0 / 2**bits])

    def pop_regularization(self) -> torch.Tensor | None:
        """Return and clear the regularizer term recorded by the last training forward (and its no-grad flag)."""
        reg = getattr(self, REG_ATTR, None)
        setattr(self, REG_ATTR, None)
        self.forward_without_grad = False
        return reg

    def _msq_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quant(x) if self.act_quant is not None else x

    def _msq_op(self, x: torch.Tensor, padding: Any = None) -> torch.Tensor | None:
        # Training (signmag) through MSQWeightOp: quantizer + op as one node that saves x and the latent weight,
        # not W_q (msq_hf.nn.quantizer). None when that node does not apply (eval, no_grad, DoReFa, autocast,
        # inputs it cannot reproduce bit for bit); the caller then runs the two-node path.
        mode = self.recompute_weight
        if mode not in (True, False, "auto"):
            raise ValueError(f"{type(self).__name__}.recompute_weight={mode!r} must be True, False or 'auto'")
        if not (
            not self.learned_step_active
            and (mode is True or (mode == "auto" and self.weight.numel() >= x.numel()))
            and self.wnorm == "signmag"
            and self.training
            and torch.is_grad_enabled()
            and op_supported(x, self.weight, padding, linear=padding is None)
        ):
            return None
        quant = (self.lsb_form == "continuous", self.lsb_units, self.reg_reduction == "mean")
        conv = None if padding is None else conv_spec(self, padding)
        out, reg = msq_weight_op(x, self.weight, self.bias, self.bits, self.k, quant, conv)
        setattr(self, REG_ATTR, reg)
        self.forward_without_grad = False
        return out

    def _msq_weight(self) -> torch.Tensor:
        # W_q goes straight into this layer's F.linear/conv, whose weight gradient is a fresh buffer
        wq, reg = self._quantized_weight_and_reg(owns_grad=True)
        setattr(self, REG_ATTR, reg)
        self.forward_without_grad = self.training and not torch.is_grad_enabled()
        return wq

    def msq_extra_repr(self) -> str:
        learned = ", learned_step" if self.learned_step_active else ""
        return f"bits={self.n_bits}, k={self.n_k}, wnorm={self.wnorm}{learned}"


def _sync_learned_step(module: nn.Module, incompatible_keys: Any) -> None:
    # load_state_dict post-hook: a loaded non-zero weight_step means the checkpoint was in its learned-step QAT
    module.sync_learned_step()


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._msq_input(x)
        out = self._msq_op(x)
        return out if out is not None else F.linear(x, self._msq_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.msq_extra_repr()}"


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._msq_input(x)
        x, padding = conv_input(self, x)
        out = self._msq_op(x, padding)
        if out is None:
            out = F.conv2d(x, self._msq_weight(), self.bias, self.stride, padding, self.dilation, self.groups)
        return out

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.msq_extra_repr()}"


__all__ = ["TRAINING_TENSORS", "MSQConv2d", "MSQLayerMixin", "MSQLinear", "MSQWeightQuantize", "msq_quantize_weight"]
