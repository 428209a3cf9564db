"""What every replacement layer shares: the float types it stands in for, its geometry, its op, its float twin.

MSQ training layers, packed inference layers and the baselines' layers all replace an ``nn.Linear`` or
``nn.Conv2d`` (or timm's ``Linear`` / ``Conv2dSame``) and must behave exactly like it apart from the
weight. The pieces that guarantee that live here once:

* :data:`LINEAR_TYPES` / :data:`CONV_TYPES` -- the float layers whose ``forward`` is the plain op;
* :func:`copy_geometry` -- the shape/stride/padding attributes a replacement copies from the original;
* :func:`conv_forward` -- the convolution of a layer's geometry with a given weight (padding modes and
  timm's per-input "SAME" padding included; :func:`conv_input` is its input side);
* :func:`float_twin` -- the plain float layer holding a given weight (``to_float`` of every layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from timm.layers import Linear as TimmLinear
from torch import nn

#: Linear layers whose forward is exactly ``F.linear`` (other subclasses may override ``forward``)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, TimmLinear)
#: Conv layers whose forward is exactly the conv op (``Conv2dSame`` pads per input size first)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, Conv2dSame)

_LINEAR_ATTRS = ("in_features", "out_features")
_CONV_ATTRS = (
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
)


def copy_geometry(dst: nn.Module, src: nn.Module) -> None:
    """Copy the geometry of Linear/Conv2d ``src`` onto ``dst`` (and ``same_pad`` for timm's ``Conv2dSame``)."""
    if isinstance(src, nn.Linear):
        attrs = _LINEAR_ATTRS
    elif isinstance(src, nn.Conv2d):
        attrs = _CONV_ATTRS
        dst.same_pad = isinstance(src, Conv2dSame) or bool(getattr(src, "same_pad", False))
    else:
        raise TypeError(f"{type(src).__name__} is neither nn.Linear nor nn.Conv2d")
    for name in attrs:
        setattr(dst, name, getattr(src, name))


def conv_input(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(x, padding)`` as ``layer``'s convolution op sees them: timm SAME and non-zero padding modes applied to
    ``x`` here (the op's ``padding`` is then 0), else ``layer.padding`` (a tuple, or ``"same"``/``"valid"``)."""
    if getattr(layer, "same_pad", False):
        x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0)
    return x, padding


def conv_forward(layer: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s convolution of ``x`` with ``weight`` (``nn.Conv2d._conv_forward`` plus timm SAME padding)."""
    x, padding = conv_input(layer, x)
    return F.conv2d(x, weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups)


def float_twin(layer: Any, weight: torch.Tensor) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` (timm ``Conv2dSame`` for SAME padding) with ``layer``'s geometry,
    holding a copy of ``weight`` and of ``layer.bias``, on the weight's device and dtype."""
    bias = layer.bias is not None
    factory = {"device": weight.device, "dtype": weight.dtype}
    if hasattr(layer, "in_features"):
        twin: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=bias, **factory)
    elif getattr(layer, "same_pad", False):
        args = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride)
        twin = Conv2dSame(*args, 0, layer.dilation, layer.groups, bias).to(**factory)
    else:
        args = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding)
        twin = nn.Conv2d(*args, layer.dilation, layer.groups, bias, layer.padding_mode, **factory)
    with torch.no_grad():
        twin.weight.copy_(weight)
        if bias:
            twin.bias.copy_(layer.bias)
    return twin


__all__ = ["CONV_TYPES", "LINEAR_TYPES", "conv_forward", "conv_input", "copy_geometry", "float_twin"]
