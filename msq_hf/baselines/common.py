"""Machinery shared by the BSQ, CSQ and DoReFa baselines.

* :class:`QuantLayerBase` -- a module that remembers the geometry of the ``nn.Linear`` /
  ``nn.Conv2d`` it replaces (including grouped / depthwise convs, padding modes and timm's
  ``Conv2dSame``) and applies the plain linear / conv op with whatever weight its subclass builds.
* :class:`PACT` -- the PACT activation clip + uniform quantizer (Choi et al. 2018) used on layer
  inputs when a method is converted with ``act_bits``.
* :func:`replace_layers` -- in-place swap of every convertible layer (all references of a shared
  module are swapped, so a model can never run half float, half quantized).
* accounting helpers: :func:`trainable_parameters`, :func:`layers_compression`.

None of this is used by the MSQ path; the baselines only exist for benchmarks and comparisons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from msq_hf.convert import _references, _same_pad_conv_types, find_convertible_layers
from msq_hf.quant.functional import compression_ratio, ste

#: bits a PACT input quantizer accepts
PACT_BITS = range(2, 9)


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

    def _init_geometry(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            self.kind = "linear"
            self.in_features, self.out_features = module.in_features, module.out_features
        elif isinstance(module, nn.Conv2d):
            self.kind = "conv"
            for name in (
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "groups",
                "padding_mode",
                "_reversed_padding_repeated_twice",
            ):
                setattr(self, name, getattr(module, name))
            same = _same_pad_conv_types()
            self.same_pad = bool(same) and isinstance(module, same)
        else:
            raise TypeError(f"{type(module).__name__} is neither nn.Linear nor nn.Conv2d")
        self.weight_shape = tuple(module.weight.shape)
        self.bias = module.bias  # shared Parameter (or None)
        self.act_quant: nn.Module | None = None

    @property
    def n_bits(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def numel(self) -> int:
        """Number of weights (what the compression ratio counts)."""
        n = 1
        for s in self.weight_shape:
            n *= s
        return n

    def quantized_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        padding: Any = self.padding
        if self.same_pad:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

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
# PACT activation quantizer


class _PACTClip(torch.autograd.Function):
    """``y = clip(x, lo, alpha)`` with the PACT gradients.

    Unsigned (``lo = 0``): ``dy/dx = 1[0 <= x <= alpha]``, ``dL/dalpha = sum g * 1[x >= alpha]``.
    Signed (``lo = -alpha``): ``dy/dx = 1[|x| <= alpha]``,
    ``dL/dalpha = sum g * 1[x >= alpha] - sum g * 1[x <= -alpha]``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, signed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        a = alpha.to(x.dtype)
        lo = -a if signed else torch.zeros_like(a)
        return torch.minimum(torch.maximum(x, lo), a)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        a = alpha.to(x.dtype)
        lo = -a if ctx.signed else torch.zeros_like(a)
        grad_x = g * ((x >= lo) & (x <= a)).to(g.dtype)
        grad_alpha = (g * (x >= a).to(g.dtype)).sum()
        if ctx.signed:
            grad_alpha = grad_alpha - (g * (x <= -a).to(g.dtype)).sum()
        return grad_x, grad_alpha.to(alpha.dtype).reshape(alpha.shape), None


class PACT(nn.Module):
    """PACT input quantizer: learnable clip ``alpha`` (init 10.0) + uniform ``bits``-bit grid.

    ``y = clip(x, 0, alpha)`` (or ``clip(x, -alpha, alpha)`` for signed inputs, e.g. after a
    LayerNorm; the mode is fixed by the first batch and stored in the ``signed`` buffer), then
    ``y_q = round(y / s) * s`` with ``s = alpha / (2^b - 1)`` (unsigned) or
    ``alpha / (2^(b-1) - 1)`` (signed). The rounding is straight-through and ``s`` is detached,
    so ``alpha`` gets exactly PACT's gradient ``sum dL/dy_q * 1[x >= alpha]``.
    """

    def __init__(self, bits: int, init_alpha: float = 10.0):
        super().__init__()
        if int(bits) not in PACT_BITS:
            raise ValueError(f"PACT act_bits={bits} is outside {PACT_BITS.start}..{PACT_BITS.stop - 1}")
        if init_alpha <= 0:
            raise ValueError(f"PACT init_alpha={init_alpha} must be > 0")
        self.bits = int(bits)
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.register_buffer("signed", torch.tensor(-1, dtype=torch.int8))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(self.signed) < 0:  # first batch decides: post-ReLU inputs stay unsigned
            self.signed.fill_(int(bool((x.detach() < 0).any())))
        signed = bool(int(self.signed))
        y = _PACTClip.apply(x, self.alpha, signed)
        levels = 2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1
        step = (self.alpha.detach().abs() / levels).clamp_min(1e-12).to(x.dtype)
        return ste(torch.round(y.detach() / step) * step, y)


# ------------------------------------------------------------------------------------------------
# conversion


L = TypeVar("L", bound=QuantLayerBase)


def replace_layers(
    model: nn.Module,
    factory: Callable[[str, nn.Module], QuantLayerBase],
    method: str,
    modules_to_not_convert: Sequence[str] | None = None,
    act_bits: int | None = None,
    act_skip_first: bool = True,
    act_init_alpha: float = 10.0,
) -> list[str]:
    """Swap every ``nn.Linear``/``nn.Conv2d`` (and timm's ``Linear``/``Conv2dSame``) in place.

    ``factory(name, float_module)`` builds the replacement. With ``act_bits`` each replaced layer
    (except the first one when ``act_skip_first``) gets a :class:`PACT` input quantizer.
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
    if act_bits is not None and int(act_bits) not in PACT_BITS:
        raise ValueError(
            f"{method}.convert: act_bits={act_bits} is outside "
            f"{PACT_BITS.start}..{PACT_BITS.stop - 1} (None keeps activations float)"
        )
    refs = _references(model)
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        new = factory(name, module)
        if act_bits is not None and not (act_skip_first and i == 0):
            new.act_quant = PACT(int(act_bits), act_init_alpha).to(module.weight.device)
        new.train(module.training)
        for parent, attr in refs.get(id(module), []):
            setattr(parent, attr, new)
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


def check_bits(bits: int, what: str, lo: int = 1, hi: int = 8) -> int:
    """Validate an integer bit width, naming the option at fault."""
    if isinstance(bits, bool) or int(bits) != bits or not lo <= int(bits) <= hi:
        raise ValueError(f"{what}={bits!r} must be an integer in {lo}..{hi}")
    return int(bits)


__all__ = [
    "PACT",
    "QuantLayerBase",
    "check_bits",
    "exponent_vector",
    "iter_layers",
    "layers_of",
    "replace_layers",
    "split_bits",
    "layers_compression",
    "trainable_parameters",
]
