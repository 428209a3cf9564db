"""Machinery shared by the BSQ, CSQ and DoReFa baselines.

* :class:`QuantLayerBase` -- a module that keeps the geometry of the ``nn.Linear`` / ``nn.Conv2d`` it
  replaces (:func:`msq_hf.nn.base.copy_geometry`: grouped / depthwise convs, padding modes, timm's
  ``Conv2dSame``) and applies the same op (:func:`msq_hf.nn.base.conv_forward`) with whatever weight
  its subclass builds.
* :data:`PACT` -- the activation quantizer used on layer inputs when a method is converted with
  ``act_bits``: the same class the MSQ layers use (:class:`msq_hf.nn.act.PACTActQuantizer`), so every
  method is compared with one activation quantizer.
* :func:`replace_layers` -- in-place conversion through the replacement engine
  (:func:`msq_hf.convert.replace_modules`; each method registers its layer class as a replacement kind).
* accounting helpers: :func:`trainable_parameters`, :func:`layers_compression`.

None of this is used by the MSQ path; the baselines only exist for benchmarks and comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from msq_hf.convert import find_convertible_layers, replace_modules
from msq_hf.nn.act import MAX_ACT_BITS, MIN_ACT_BITS, PACTActQuantizer
from msq_hf.nn.base import conv_forward, copy_geometry
from msq_hf.quant.functional import check_bits, compression_ratio

#: the PACT input quantizer of the baselines (one implementation with the MSQ layers')
PACT = PACTActQuantizer


# ------------------------------------------------------------------------------------------------
# layer base


class QuantLayerBase(nn.Module):
    """Geometry of a replaced ``nn.Linear``/``nn.Conv2d`` plus the matching functional op.

    Subclasses implement :meth:`quantized_weight` (the weight used in the forward pass, with its
    autograd graph) and :attr:`n_bits`. ``bias`` is the float bias of the original layer (shared
    Parameter, kept in float and never counted in the compression ratio), ``act_quant`` an optional
    input quantizer (:class:`PACT`).
    """

    #: "linear" or "conv"
    kind: str
    #: short method name used in error messages ("bsq", "csq", "dorefa")
    method: str = "baseline"

    def _init_geometry(self, module: nn.Module, act_quantizer: nn.Module | None = None) -> None:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{type(module).__name__} is neither nn.Linear nor nn.Conv2d")
        self.kind = "linear" if isinstance(module, nn.Linear) else "conv"
        copy_geometry(self, module)
        self.weight_shape = tuple(module.weight.shape)
        self.bias = module.bias  # shared Parameter (or None)
        self.act_quant = act_quantizer

    @property
    def n_bits(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def numel(self) -> int:
        """Number of weights (what the compression ratio counts)."""
        return math.prod(self.weight_shape)

    def quantized_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        return conv_forward(self, x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.quantized_weight())

    def geometry_repr(self) -> str:
        if self.kind == "linear":
            return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, bias={self.bias is not None}"
        )


# ------------------------------------------------------------------------------------------------
# conversion


L = TypeVar("L", bound=QuantLayerBase)


def replace_layers(
    model: nn.Module,
    method: str,
    modules_to_not_convert: Sequence[str] | None = None,
    act_bits: int | None = None,
    act_skip_first: bool = True,
    act_init_alpha: float = 10.0,
    **options: Any,
) -> list[str]:
    """Swap every ``nn.Linear``/``nn.Conv2d`` (and timm's ``Linear``/``Conv2dSame``) for ``method``'s layer.

    ``method`` is the replacement kind the method's module registered (``"bsq"``, ``"csq"``, ``"dorefa"``);
    its layer class is built as ``cls(float_module, **options, act_quantizer=...)``. With ``act_bits``
    each replaced layer (except the first one when ``act_skip_first``) gets a :data:`PACT` input quantizer.
    Raises ``ValueError`` naming the model if it already holds baseline layers or if nothing was
    converted. Returns the converted layer names.
    """
    existing = [n for n, m in model.named_modules() if isinstance(m, QuantLayerBase)]
    if existing:
        raise ValueError(
            f"{type(model).__name__} already holds baseline-quantized layers "
            f"(e.g. {existing[0]!r}); {method}.convert needs the float model"
        )
    names = find_convertible_layers(model, modules_to_not_convert)
    if not names:
        raise ValueError(
            f"{method}.convert: {type(model).__name__} has no nn.Linear/nn.Conv2d layer to convert"
            + (" after modules_to_not_convert" if modules_to_not_convert else "")
        )
    if act_bits is not None:
        act_bits = check_bits(act_bits, f"{method}.convert act_bits", MIN_ACT_BITS, MAX_ACT_BITS)

    def act_quantizer(first: bool) -> nn.Module | None:
        if act_bits is None or (first and act_skip_first):
            return None
        return PACT(act_bits, act_init_alpha)

    plan = {name: {**options, "act_quantizer": act_quantizer(i == 0)} for i, name in enumerate(names)}
    replace_modules(model, method, plan)
    return names


def iter_layers(model: nn.Module, cls: type[L]) -> Iterator[tuple[str, L]]:
    """``(name, layer)`` for every layer of type ``cls`` (each shared layer once)."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, cls) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def layers_of(model: nn.Module, cls: type[L], method: str) -> dict[str, L]:
    """``{name: layer}`` of one method; ``ValueError`` if the model holds none."""
    layers = dict(iter_layers(model, cls))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no {method} layers; call msq_hf.baselines.{method}.convert(model) first"
        )
    return layers


class UniformMethod:
    """The module-level interface of a uniform (one bit width for every layer, no regularizer) baseline.

    ``dorefa`` and ``lsq`` bind their module functions to one instance: ``convert``, ``layers``, ``regularization``
    (a zero tensor), ``bit_scheme`` and ``compression_ratio``, and :meth:`check_bits` for their layers.
    """

    def __init__(self, method: str, layer_cls: type[QuantLayerBase], allowed_bits: tuple[int, ...]) -> None:
        self.method, self.layer_cls, self.allowed_bits = method, layer_cls, tuple(allowed_bits)

    def check_bits(self, bits: int) -> int:
        """``bits`` if it is one of the method's weight bit widths, else ``ValueError`` naming the method."""
        if isinstance(bits, bool) or bits not in self.allowed_bits:
            raise ValueError(f"{self.method} weight bits={bits!r} must be one of {self.allowed_bits}")
        return int(bits)

    def convert(
        self,
        model: nn.Module,
        init_bits: int = 8,
        *,
        bits: int | None = None,
        act_bits: int | None = None,
        act_skip_first: bool = True,
        act_init_alpha: float = 10.0,
        modules_to_not_convert: Sequence[str] | None = None,
    ) -> nn.Module:
        """Replace every Linear/Conv2d in place by the method's layer with ``bits`` weight bits.

        ``bits`` is an alias of ``init_bits`` (the common baseline signature); giving both with different values is
        an error. ``act_bits`` (2..8) adds PACT input quantizers (the first layer keeps float inputs when
        ``act_skip_first``). Raises ``ValueError`` if nothing was converted.
        """
        if bits is not None and bits != init_bits and init_bits != 8:
            raise ValueError(f"{self.method}.convert got init_bits={init_bits} and bits={bits}; pass only one")
        weight_bits = self.check_bits(init_bits if bits is None else bits)
        replace_layers(
            model, self.method, modules_to_not_convert, act_bits, act_skip_first, act_init_alpha, bits=weight_bits
        )
        return model

    def layers(self, model: nn.Module) -> dict[str, QuantLayerBase]:
        """``{name: layer}`` of every layer of the method (``ValueError`` if none)."""
        return layers_of(model, self.layer_cls, self.method)

    def regularization(self, model: nn.Module) -> torch.Tensor:
        """No regularizer: a zero scalar on the model's device (keeps training loops uniform)."""
        return next(iter(self.layers(model).values())).weight.new_zeros(())

    def bit_scheme(self, model: nn.Module) -> dict[str, int]:
        """``{layer: k}``."""
        return {name: layer.n_bits for name, layer in self.layers(model).items()}

    def compression_ratio(self, model: nn.Module) -> float:
        """``32 * sum_l numel_l / sum_l k_l numel_l`` over the converted weights (``32/k`` when uniform)."""
        return layers_compression(self.layers(model))


# ------------------------------------------------------------------------------------------------
# accounting


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (what the optimizer holds state for; shared tensors once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layers_compression(layers: Mapping[str, QuantLayerBase]) -> float:
    """``32 * sum_l N_l / sum_l n_l N_l`` over converted layers (:func:`msq_hf.quant.functional.compression_ratio`);
    ``inf`` when every layer has 0 bits (CSQ can switch every bit of a layer off)."""
    if not layers:
        raise ValueError("compression ratio of an empty bit scheme")
    if all(m.n_bits == 0 for m in layers.values()):
        return float("inf")
    return compression_ratio([m.numel for m in layers.values()], [m.n_bits for m in layers.values()])


def exponent_vector(bits: int, like: torch.Tensor) -> torch.Tensor:
    """``[2^(N-1-b) / (2^N - 1)]_{b=0..N-1}`` (index 0 = MSB), on ``like``'s device and dtype."""
    exps = 2.0 ** torch.arange(bits - 1, -1, -1, dtype=torch.float64) / (2**bits - 1)
    return exps.to(device=like.device, dtype=like.dtype)


def split_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Binary digits of non-negative integer ``codes`` as a ``[*codes.shape, bits]`` 0/1 tensor (MSB first)."""
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device)
    return torch.bitwise_and(torch.bitwise_right_shift(codes.to(torch.int64).unsqueeze(-1), shifts), 1)


__all__ = [
    "PACT",
    "QuantLayerBase",
    "exponent_vector",
    "iter_layers",
    "layers_of",
    "replace_layers",
    "split_bits",
    "layers_compression",
    "trainable_parameters",
]
