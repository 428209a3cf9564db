"""CSQ baseline: continuous sparsification of bits (Xiao et al., DAC 2023), after ``lawsonX/CSQ``.

Every ``nn.Linear``/``nn.Conv2d`` weight of initial precision ``N`` becomes per-weight bit logits
``p, n`` of shape ``[*weight_shape, N]``, a per-layer bit-selection mask logit ``m`` of shape
``[N]`` (initialised to ``mask_init``, 0 in the official code) and a trainable scale (``max|W|``)::

    W = scale * sum_b g_b * (sigmoid(beta p_b) - sigmoid(beta n_b)) * 2^(N-1-b)/(2^N-1)
    g_b = sigmoid(beta m_b)          (soft phase)      or   1[m_b > 0]   (ticket phase)

fully differentiable (no STE); one global temperature ``beta`` drives bits and masks.

Schedule (CIFAR script ``main_cifar.py``)::

    convert(model, init_bits=8, target_bits=2)
    for epoch in range(E):
        set_temperature(model, temperature_schedule(epoch, ticket_epoch))
        if epoch >= ticket_epoch: finalize_masks(model)
        loss = ce + lam * regularization(model)

Decision (documented in ``docs/baselines.md``): the official ``ini2bit`` stores the 0/1 digits
themselves as logits, so a zero digit reads ``sigmoid(0) = 0.5`` at every temperature and the
high-temperature weight is *half* the quantized weight. The default ``bit_init="signed"`` stores
``+-init_logit`` instead (digit 1 -> +1, digit 0 -> -1), so at large ``beta`` with the masks on the
layer reproduces the ``N``-bit quantized weight exactly; ``bit_init="code"`` restores the
official behaviour. Biases stay float and uncounted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from msq_hf.baselines.common import (
    QuantLayerBase,
    exponent_vector,
    layers_compression,
    layers_of,
    replace_layers,
    split_bits,
    trainable_parameters,
)
from msq_hf.convert import register_layer
from msq_hf.nn.base import CONV_TYPES, LINEAR_TYPES
from msq_hf.quant.functional import check_bits, signed_codes

BitInit = Literal["signed", "code"]

#: ``--final-temp`` of the official scripts
DEFAULT_FINAL_TEMP = 200.0


class CSQLayer(QuantLayerBase):
    """A Linear/Conv2d whose weight is gated soft bits ``sigmoid(beta p) - sigmoid(beta n)``."""

    method = "csq"

    def __init__(
        self,
        module: nn.Module,
        bits: int,
        target_bits: float,
        mask_init: float = 0.0,
        bit_init: BitInit = "signed",
        init_logit: float = 1.0,
        act_quantizer: nn.Module | None = None,
    ):
        super().__init__()
        self._init_geometry(module, act_quantizer)
        bits = check_bits(bits, "csq init_bits")
        if bit_init not in ("signed", "code"):
            raise ValueError(f"csq bit_init={bit_init!r} is not one of 'signed', 'code'")
        if init_logit <= 0:
            raise ValueError(f"csq init_logit={init_logit} must be > 0")
        w = module.weight.detach()
        shape = (*w.shape, bits)
        self.pweight = nn.Parameter(w.new_zeros(shape))
        self.nweight = nn.Parameter(w.new_zeros(shape))
        self.mask_weight = nn.Parameter(w.new_full((bits,), float(mask_init)))
        self.scale = nn.Parameter(w.new_ones(()))
        self.register_buffer("exps", exponent_vector(bits, w), persistent=False)
        self._bits = bits
        self.bit_init = bit_init
        self.init_logit = float(init_logit)
        self.mask_init = float(mask_init)
        self.target_bits = float(target_bits)
        #: global temperature beta (set every epoch with :func:`set_temperature`)
        self.temperature = 1.0
        #: ticket phase: hard masks ``1[m > 0]``
        self.ticket = False
        self.ini2bit(w)

    @property
    def n_bits(self) -> int:
        """Bits currently selected: the number of masks that are on (``g >= 0.5``)."""
        return int((self.gates().detach() >= 0.5).sum())

    @property
    def init_bits(self) -> int:
        """The initial precision ``N`` (number of bit positions, each with a mask)."""
        return self._bits

    @torch.no_grad()
    def ini2bit(self, weight: torch.Tensor) -> None:
        """Digits of ``R = round(|W|(2^N-1)/max|W|)`` into ``p`` (W > 0) / ``n`` (W <= 0); ``scale = max|W|``.

        ``bit_init="code"`` stores the digits as logits (official code); ``"signed"`` stores
        ``init_logit * (2 digit - 1)`` so that ``sigmoid(beta logit)`` tends to the digit as ``beta`` grows.
        """
        n_bits = self._bits
        s = weight.abs().max()
        if s == 0:
            codes = torch.zeros_like(weight)
            s = torch.ones_like(s)  # a zero scale would freeze the layer
        else:
            codes = signed_codes(weight, n_bits, s, nested=False)
        dp = split_bits(codes.clamp_min(0), n_bits).to(weight.dtype)
        dn = split_bits((-codes).clamp_min(0), n_bits).to(weight.dtype)
        if self.bit_init == "signed":
            dp, dn = (2 * dp - 1) * self.init_logit, (2 * dn - 1) * self.init_logit
        self.pweight.copy_(dp)
        self.nweight.copy_(dn)
        self.scale.fill_(float(s))

    def gates(self) -> torch.Tensor:
        """Bit-selection gates ``sigmoid(beta m)`` (soft) or ``1[m > 0]`` (ticket phase), shape ``[N]``."""
        if self.ticket:
            return (self.mask_weight > 0).to(self.mask_weight.dtype)
        return torch.sigmoid(self.temperature * self.mask_weight)

    def quantized_weight(self) -> torch.Tensor:
        """``scale * (sigmoid(beta p) - sigmoid(beta n)) @ (gates * exps)`` (fully differentiable)."""
        beta = self.temperature
        soft_bits = torch.sigmoid(beta * self.pweight) - torch.sigmoid(beta * self.nweight)
        return torch.matmul(soft_bits, self.gates() * self.exps) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The current (soft) weight, so code that reads ``layer.weight`` keeps working."""
        return self.quantized_weight()

    @torch.no_grad()
    def prune_masks(self) -> None:
        """Continuous-sparsification round reset ``m <- min(beta m, mask_init)`` (ImageNet schedule)."""
        self.mask_weight.copy_(torch.clamp(self.temperature * self.mask_weight, max=self.mask_init))

    def extra_repr(self) -> str:
        return (
            f"{self.geometry_repr()}, init_bits={self._bits}, temperature={self.temperature:.3g}, ticket={self.ticket}"
        )


# ------------------------------------------------------------------------------------------------
# module-level API


def convert(
    model: nn.Module,
    init_bits: int = 8,
    *,
    target_bits: float = 2.0,
    mask_init: float = 0.0,
    bit_init: BitInit = "signed",
    init_logit: float = 1.0,
    modules_to_not_convert: Sequence[str] | None = None,
    act_bits: int | None = None,
    act_skip_first: bool = True,
) -> nn.Module:
    """Replace every Linear/Conv2d of ``model`` in place by a :class:`CSQLayer` at ``init_bits``.

    ``target_bits`` is CSQ's ``--target`` T (average bits the budget regularizer steers to);
    ``mask_init`` its ``--mask-initial-value``. See the module docstring for ``bit_init``.
    Raises ``ValueError`` if nothing was converted.
    """
    check_bits(init_bits, "csq init_bits")
    if not 0 < target_bits <= init_bits:
        raise ValueError(f"csq target_bits={target_bits} must be in (0, init_bits={init_bits}]")
    replace_layers(
        model,
        "csq",
        modules_to_not_convert,
        act_bits,
        act_skip_first,
        bits=init_bits,
        target_bits=target_bits,
        mask_init=mask_init,
        bit_init=bit_init,
        init_logit=init_logit,
    )
    return model


register_layer("csq", *LINEAR_TYPES, *CONV_TYPES)(CSQLayer)


def csq_layers(model: nn.Module) -> dict[str, CSQLayer]:
    """``{name: layer}`` of every CSQ layer (``ValueError`` if none)."""
    return layers_of(model, CSQLayer, "csq")


def set_temperature(model: nn.Module, beta: float) -> None:
    """Set the global temperature ``beta`` of every CSQ layer."""
    if not beta > 0:
        raise ValueError(f"csq temperature beta={beta} must be > 0")
    for layer in csq_layers(model).values():
        layer.temperature = float(beta)


def temperature_schedule(epoch: int, ticket_epoch: int, final_temp: float = DEFAULT_FINAL_TEMP) -> float:
    """CIFAR schedule ``beta_e = final_temp ** (epoch / ticket_epoch)`` (``main_cifar.py``).

    Reaches ``final_temp`` at the ticket epoch and, as in the official script, keeps growing
    geometrically after it (only the few post-ticket epochs see ``beta > final_temp``).
    """
    if ticket_epoch <= 0:
        raise ValueError(f"csq ticket_epoch={ticket_epoch} must be >= 1")
    if final_temp <= 0:
        raise ValueError(f"csq final_temp={final_temp} must be > 0")
    return float(final_temp) ** (epoch / ticket_epoch)


def finalize_masks(model: nn.Module) -> dict[str, int]:
    """Enter the ticket phase: every mask becomes hard ``1[m > 0]``; returns the bit scheme."""
    for layer in csq_layers(model).values():
        layer.ticket = True
    return bit_scheme(model)


def prune_masks(model: nn.Module) -> None:
    """Between ImageNet rounds: ``m <- min(beta m, mask_init)`` on every layer (then reset ``beta`` to 1)."""
    for layer in csq_layers(model).values():
        layer.prune_masks()


def mask_ratio(model: nn.Module) -> float:
    """``r``: fraction of all (layer, bit) masks that are on (``gate >= 0.5``), unweighted, as in the code."""
    layers = csq_layers(model).values()
    gates = [m.gates().detach() for m in layers]
    return float(sum(int((g >= 0.5).sum()) for g in gates)) / sum(g.numel() for g in gates)


def regularization(model: nn.Module, target_bits: float | None = None) -> torch.Tensor:
    """Budget-aware, lambda-free term ``(r - T/N) * sum_l sum_b gate_lb`` (CSQ "Eq. 4").

    ``r`` (:func:`mask_ratio`, no gradient) is the fraction of masks on; ``T`` the target bits
    (``target_bits`` or the value given to :func:`convert`), ``N`` the initial bits. Over budget
    (``r > T/N``) the term pushes the masks down, under budget it grows them. Multiply by lambda.
    In the ticket phase the gates are hard and the term carries no gradient.
    """
    layers = list(csq_layers(model).values())
    target = layers[0].target_bits if target_bits is None else float(target_bits)
    gates = [m.gates() for m in layers]
    total_masks = sum(g.numel() for g in gates)
    ratio = float(sum(int((g.detach() >= 0.5).sum()) for g in gates)) / total_masks
    # T/N with N = masks per layer; equals target / init_bits for the uniform init of convert()
    budget = target * len(layers) / total_masks
    return (ratio - budget) * torch.stack([g.sum() for g in gates]).sum()


def bit_scheme(model: nn.Module) -> dict[str, int]:
    """``{layer: bits}`` with bits = ``N * (fraction of the layer's masks on)`` = number of masks on."""
    return {name: layer.n_bits for name, layer in csq_layers(model).items()}


def average_bits(model: nn.Module) -> float:
    """The code's reported metric ``N * r`` (unweighted over layers)."""
    layers = list(csq_layers(model).values())
    return layers[0].init_bits * mask_ratio(model)


def compression_ratio(model: nn.Module) -> float:
    """Parameter-weighted ``32 * sum_l numel_l / sum_l bits_l numel_l`` over the converted weights."""
    layers = csq_layers(model)
    return layers_compression(layers)


__all__ = [
    "CSQLayer",
    "average_bits",
    "bit_scheme",
    "compression_ratio",
    "convert",
    "csq_layers",
    "finalize_masks",
    "mask_ratio",
    "prune_masks",
    "regularization",
    "set_temperature",
    "temperature_schedule",
    "trainable_parameters",
]
