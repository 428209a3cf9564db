"""Uniform-precision QAT baseline: LSQ weights (Esser et al., ICLR 2020) + optional PACT activations.

Every ``nn.Linear``/``nn.Conv2d`` keeps its float weight as the trainable latent and quantizes it per tensor with
a learnable step ``s``::

    W_q = clamp(round(W / s), -2^(k-1), 2^(k-1) - 1) * s        (2^k levels: stores k bits)

The quantizer is :class:`msq_hf.nn.act.LSQActQuantizer` (one LSQ implementation with the activations'): the step
starts at the paper's ``2 mean|W| / sqrt(2^(k-1) - 1)`` on the first forward, the rounding is straight-through,
and the step's gradient is scaled by ``1 / sqrt(Qp * N_W)`` -- the weight tensor is passed as one row of ``N_W``
values, so the quantizer's per-sample count is the layer's weight count, the paper's weight gradient scale.
The bit width is the same for every layer; there is no regularizer (:func:`regularization` is a zero tensor).
The interface is the DoReFa baseline's: ``convert``, ``regularization``, ``bit_scheme``, ``compression_ratio``,
``trainable_parameters``.
"""

from __future__ import annotations

import torch
from torch import nn

from msq_hf.baselines.common import QuantLayerBase, UniformMethod, trainable_parameters
from msq_hf.convert import register_layer
from msq_hf.nn.act import MAX_ACT_BITS, MIN_ACT_BITS, LSQActQuantizer
from msq_hf.nn.base import CONV_TYPES, LINEAR_TYPES

#: weight bit widths LSQ accepts here (those of the LSQ quantizer)
ALLOWED_BITS = tuple(range(MIN_ACT_BITS, MAX_ACT_BITS + 1))


class LSQLayer(QuantLayerBase):
    """A Linear/Conv2d whose (shared) float weight is quantized by a learnable-step LSQ quantizer."""

    method = "lsq"

    def __init__(self, module: nn.Module, bits: int, act_quantizer: nn.Module | None = None):
        super().__init__()
        self._init_geometry(module, act_quantizer)
        self.weight = module.weight  # shared Parameter: the latent float weight
        self.weight_quant = LSQActQuantizer(_METHOD.check_bits(bits))

    @property
    def n_bits(self) -> int:
        """Weight bit width ``k``."""
        return int(self.weight_quant.bits)

    @property
    def step(self) -> torch.Tensor:
        """The learnable quantization step ``s`` (set from the weights on the first forward)."""
        return self.weight_quant.step

    def quantized_weight(self) -> torch.Tensor:
        """``clamp(round(W/s), Qn, Qp) * s`` with the straight-through round (one row of ``N_W`` values)."""
        return self.weight_quant(self.weight.reshape(1, -1)).reshape(self.weight.shape)

    def extra_repr(self) -> str:
        return f"{self.geometry_repr()}, bits={self.n_bits}"


register_layer("lsq", *LINEAR_TYPES, *CONV_TYPES)(LSQLayer)

#: the uniform-baseline interface (msq_hf.baselines.common.UniformMethod) bound to this method
_METHOD = UniformMethod("lsq", LSQLayer, ALLOWED_BITS)
convert = _METHOD.convert
lsq_layers = _METHOD.layers
regularization = _METHOD.regularization
bit_scheme = _METHOD.bit_scheme
compression_ratio = _METHOD.compression_ratio


__all__ = [
    "ALLOWED_BITS",
    "LSQLayer",
    "bit_scheme",
    "compression_ratio",
    "convert",
    "lsq_layers",
    "regularization",
    "trainable_parameters",
]
