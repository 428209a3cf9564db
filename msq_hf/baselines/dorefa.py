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

from collections.abc import Sequence

import torch
from torch import nn

from msq_hf.baselines.common import QuantLayerBase, layers_compression, layers_of, replace_layers, trainable_parameters
from msq_hf.convert import register_layer
from msq_hf.nn.base import CONV_TYPES, LINEAR_TYPES
from msq_hf.quant.functional import dorefa_quantize

#: weight bit widths DoReFa accepts here (32 = float)
ALLOWED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)


def _check_weight_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"dorefa weight bits={bits!r} must be one of {ALLOWED_BITS}")
    return int(bits)


class DoReFaLayer(QuantLayerBase):
    """A Linear/Conv2d that applies DoReFa weight quantization to its (shared) float weight."""

    method = "dorefa"

    def __init__(self, module: nn.Module, bits: int, act_quantizer: nn.Module | None = None):
        super().__init__()
        self._init_geometry(module, act_quantizer)
        self.weight = module.weight  # shared Parameter: the latent float weight
        self._bits = _check_weight_bits(bits)

    @property
    def n_bits(self) -> int:
        """Weight bit width ``k``."""
        return self._bits

    def quantized_weight(self) -> torch.Tensor:
        """``dorefa_quantize(W, k)`` with the straight-through round."""
        return dorefa_quantize(self.weight, self._bits)

    def extra_repr(self) -> str:
        return f"{self.geometry_repr()}, bits={self._bits}"


def convert(
    model: nn.Module,
    init_bits: int = 8,
    *,
    bits: int | None = None,
    act_bits: int | None = None,
    act_skip_first: bool = True,
    act_init_alpha: float = 10.0,
    modules_to_not_convert: Sequence[str] | None = None,
) -> nn.Module:
    """Replace every Linear/Conv2d in place by a :class:`DoReFaLayer` with ``bits`` weight bits.

    ``bits`` is an alias of ``init_bits`` (the common baseline signature); giving both with
    different values is an error. ``act_bits`` (2..8) adds PACT input quantizers (the first layer
    keeps float inputs when ``act_skip_first``). Raises ``ValueError`` if nothing was converted.
    """
    if bits is not None and bits != init_bits and init_bits != 8:
        raise ValueError(f"dorefa.convert got init_bits={init_bits} and bits={bits}; pass only one")
    weight_bits = _check_weight_bits(init_bits if bits is None else bits)
    replace_layers(model, "dorefa", modules_to_not_convert, act_bits, act_skip_first, act_init_alpha, bits=weight_bits)
    return model


register_layer("dorefa", *LINEAR_TYPES, *CONV_TYPES)(DoReFaLayer)


def dorefa_layers(model: nn.Module) -> dict[str, DoReFaLayer]:
    """``{name: layer}`` of every DoReFa layer (``ValueError`` if none)."""
    return layers_of(model, DoReFaLayer, "dorefa")


def regularization(model: nn.Module) -> torch.Tensor:
    """DoReFa has no regularizer: a zero scalar on the model's device (keeps training loops uniform)."""
    layer = next(iter(dorefa_layers(model).values()))
    return layer.weight.new_zeros(())


def bit_scheme(model: nn.Module) -> dict[str, int]:
    """``{layer: k}`` (32 for float layers converted with ``bits=32``)."""
    return {name: layer.n_bits for name, layer in dorefa_layers(model).items()}


def compression_ratio(model: nn.Module) -> float:
    """``32 * sum_l numel_l / sum_l k_l numel_l`` over the converted weights (``32/k`` when uniform)."""
    layers = dorefa_layers(model)
    return layers_compression(layers)


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
