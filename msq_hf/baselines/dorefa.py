"""Uniform-precision QAT baseline: DoReFa weights (Zhou et al. 2016) + PACT activations (Choi et al. 2018).

Every ``nn.Linear``/``nn.Conv2d`` keeps its float weight as the trainable latent and uses
:func:`msq_hf.quant.functional.dorefa_quantize` in the forward pass::

    k >= 2:  W_q = 2 round((2^k-1) w~)/(2^k-1) - 1,  w~ = tanh W / (2 max|tanh W|) + 1/2
    k == 1:  W_q = sign(W) * mean|W|        (BWN)
    k == 32: W_q = W

with the round replaced by the identity in the backward pass. With ``act_bits`` every layer but the
first quantizes its input with :class:`~msq_hf.baselines.common.PACT` (learnable clip, init 10).
The bit width is the same for every layer (no regularizer: :func:`regularization` is a zero tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from msq_hf.baselines.common import QuantLayerBase, UniformMethod, trainable_parameters
from msq_hf.convert import register_layer
from msq_hf.nn.base import CONV_TYPES, LINEAR_TYPES
from msq_hf.quant.functional import dorefa_quantize

#: weight bit widths DoReFa accepts here (32 = float)
ALLOWED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)


class DoReFaLayer(QuantLayerBase):
    """A Linear/Conv2d that applies DoReFa weight quantization to its (shared) float weight."""

    method = "dorefa"

    def __init__(self, module: nn.Module, bits: int, act_quantizer: nn.Module | None = None):
        super().__init__()
        self._init_geometry(module, act_quantizer)
        self.weight = module.weight  # shared Parameter: the latent float weight
        self._bits = _METHOD.check_bits(bits)

    @property
    def n_bits(self) -> int:
        """Weight bit width ``k``."""
        return self._bits

    def quantized_weight(self) -> torch.Tensor:
        """``dorefa_quantize(W, k)`` with the straight-through round."""
        return dorefa_quantize(self.weight, self._bits)

    def extra_repr(self) -> str:
        return f"{self.geometry_repr()}, bits={self._bits}"


register_layer("dorefa", *LINEAR_TYPES, *CONV_TYPES)(DoReFaLayer)

#: the uniform-baseline interface (msq_hf.baselines.common.UniformMethod) bound to this method
_METHOD = UniformMethod("dorefa", DoReFaLayer, ALLOWED_BITS)
convert = _METHOD.convert
dorefa_layers = _METHOD.layers
regularization = _METHOD.regularization
bit_scheme = _METHOD.bit_scheme
compression_ratio = _METHOD.compression_ratio


__all__ = [
    "ALLOWED_BITS",
    "DoReFaLayer",
    "bit_scheme",
    "compression_ratio",
    "convert",
    "dorefa_layers",
    "regularization",
    "trainable_parameters",
]
