"""Bit-packed MSQ layers: what an export loads into.

The stored form of a weight (codes, offset, scale) is :mod:`msq_hf.nn.codec`'s.

Buffers of a packed layer (the checkpoint keys ``<module>.weight_packed`` etc.):
``weight_packed`` (uint8 little-endian bitstream, ``msq_hf.quant.packing``), ``weight_scale`` (float32 [1]),
``weight_bits`` (uint8 [1], ``n``), ``weight_shape`` (int64 [ndim]); the bias stays a float parameter.

Packed inference: the layer keeps only the packed buffers. Each ``forward`` unpacks the codes straight into a
float32 per-thread workspace shared by every layer (:func:`msq_hf.quant.packing.unpack_codes` with ``out=``),
dequantizes it in place (:func:`dequantize_`) and runs the plain ``F.linear``/``F.conv2d``: a loaded export holds
packed bytes, not float weights. A :class:`DecodeCache` (:func:`set_decode_cache`) trades memory back for speed.
The stored scale is used as is: re-quantizing the dequantized weight with a fresh ``max|W|`` scale would *not*
reproduce it (the largest weight is usually clamped to ``2^n - 1`` steps, so ``max|W_q| != S``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from msq_hf.errors import MSQFormatError
from msq_hf.nn.base import conv_forward, copy_geometry, float_twin
from msq_hf.nn.codec import dequantize_, packed_nbytes, stored_bits, top_code
from msq_hf.nn.decode_cache import CacheOption, DecodeCache, make_decode_cache
from msq_hf.quant import functional as QF
from msq_hf.quant import packing

# ------------------------------------------------------------------------------------------------
# decode cache


def set_decode_cache(model: nn.Module, option: CacheOption) -> DecodeCache | None:
    """Give every packed layer of ``model`` one shared decode cache (see :func:`make_decode_cache`); returns it."""
    cache = make_decode_cache(option)
    for module in model.modules():
        if isinstance(module, MSQPackedMixin):
            module.decode_cache = cache
    return cache


# ------------------------------------------------------------------------------------------------
# modules


class MSQPackedMixin:
    """State shared by the packed layers: packed buffers, the expected bit width, on-the-fly decoding."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_bits: torch.Tensor
    weight_shape: torch.Tensor
    bias: torch.Tensor | None
    decode_cache: DecodeCache | None
    CHECK_STEP = 1 << 16  # codes per slice of the code check in validate (a multiple of 8)

    def _init_packed(
        self,
        shape: tuple[int, ...],
        bits: int,
        wnorm: str,
        dtype: torch.dtype,
        device: Any,
        act_quantizer: nn.Module | None,
        layer_name: str,
        full_grid: bool = False,
    ) -> None:
        QF.check_bits(bits)
        numel = math.prod(shape)
        self.bits = int(bits)
        self.wnorm = wnorm
        self.full_grid = full_grid  # which stored codes are valid (top_code)
        self.weight_dtype = dtype
        self.layer_name = layer_name
        self.expected_shape = tuple(int(d) for d in shape)
        self.register_buffer(
            "weight_packed", torch.zeros(packed_nbytes(numel, bits, wnorm), dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("weight_bits", torch.full((1,), int(bits), dtype=torch.uint8, device=device))
        self.register_buffer("weight_shape", torch.tensor(self.expected_shape, dtype=torch.int64, device=device))
        # no float weight is kept: forward decodes it (packed inference); see decode_cache
        self.decode_cache = None
        self.act_quant = act_quantizer
        self._msq_ready = False
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())  # type: ignore[arg-type]

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        bits: int,
        wnorm: str = "signmag",
        act_quantizer: nn.Module | None = None,
        layer_name: str = "",
        full_grid: bool = False,
    ) -> Any:
        """Empty packed twin of float layer ``module``: its geometry, dtype and device (its bias tensor is reused)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        copy_geometry(new, module)
        weight = module.weight
        new._init_packed(
            tuple(weight.shape), bits, wnorm, weight.dtype, weight.device, act_quantizer, layer_name, full_grid
        )
        new.bias = module.bias
        return new

    def to_float(self) -> nn.Module:
        """A plain ``nn.Linear`` / ``nn.Conv2d`` (timm ``Conv2dSame`` if SAME-padded) with the dequantized weight."""
        return float_twin(self, self.weight)

    @property
    def n_bits(self) -> int:
        """Magnitude bits of the stored weight."""
        return self.bits

    @property
    def stored_bits(self) -> int:
        """Bits per weight in ``weight_packed``."""
        return stored_bits(self.bits, self.wnorm)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, decoded now (or taken from the decode cache): a tensor the caller owns.

        Kept for code that reads ``layer.weight`` (e.g. transformers' ViT reads its dtype); ``forward`` does
        not go through it. Decoding costs about one pass over the float weight.
        """
        return self._decoded(transient=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to(dtype)/.half()/.to(device) convert tensors; the decoded weight's dtype follows the float tensors
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        if self.decode_cache is not None:
            self.decode_cache.discard(id(self))
        return result

    def dequantized_weight(self) -> torch.Tensor:
        """Validate the packed buffers and decode them (``MSQFormatError`` naming the layer on a mismatch)."""
        self.validate()
        return self._decode(transient=False)

    def validate(self) -> None:
        """Check the packed buffers against the bit scheme and the model (``MSQFormatError`` naming the layer)."""
        where = f"layer {self.layer_name!r}"
        bits = int(self.weight_bits.reshape(-1)[0]) if self.weight_bits.numel() == 1 else None
        if bits is None or not QF.MIN_BITS <= bits <= QF.MAX_BITS:
            raise MSQFormatError(
                f"{where}: weight_bits={self.weight_bits.tolist()} is invalid: expected one "
                f"integer in {QF.MIN_BITS}..{QF.MAX_BITS}"
            )
        if bits != self.bits:
            raise MSQFormatError(f"{where}: stored weight_bits={bits} disagrees with the bit scheme ({self.bits} bits)")
        shape = tuple(int(d) for d in self.weight_shape.tolist())
        if shape != self.expected_shape:
            raise MSQFormatError(
                f"{where}: stored weight_shape={list(shape)} disagrees with the model ({list(self.expected_shape)})"
            )
        numel = math.prod(shape)
        width = self.stored_bits
        want = packed_nbytes(numel, bits, self.wnorm)
        if self.weight_packed.dtype != torch.uint8 or self.weight_packed.numel() != want:
            raise MSQFormatError(
                f"{where}: weight_packed has {self.weight_packed.numel()} "
                f"{self.weight_packed.dtype} elements, expected {want} uint8 for {numel} "
                f"weights at {width} stored bits ({bits}-bit {self.wnorm})"
            )
        scale = self.weight_scale
        if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale.reshape(-1)[0]) <= 0:
            raise MSQFormatError(
                f"{where}: weight_scale={scale.tolist()} is invalid: expected one finite positive number"
            )
        top = top_code(bits, self.wnorm, self.full_grid)
        stream, largest = self.weight_packed.reshape(-1), 0
        # look for invalid codes a slice at a time: the unpack memory (kept by the process) is a slice's, not a layer's
        for start in range(0, numel if top < (1 << width) - 1 else 0, self.CHECK_STEP):
            n, first = min(self.CHECK_STEP, numel - start), start * width // 8
            codes = packing.unpack_codes(stream[first : first + packing.packed_nbytes(n, width)], width, n)
            largest = max(largest, int(codes.max()))
        if largest > top:
            raise MSQFormatError(
                f"{where}: a stored code is {largest}, above the largest valid {bits}-bit {self.wnorm} code {top}; "
                "the weight file is corrupt"
            )

    def refresh(self) -> None:
        """Validate the packed buffers after loading and drop any cached decode of the old ones."""
        self.validate()
        if self.decode_cache is not None:
            self.decode_cache.discard(id(self))
        self._msq_ready = True

    def _decode(self, transient: bool) -> torch.Tensor:
        """Fused unpack + dequantize of the packed buffers; ``transient`` decodes into the shared per-thread
        workspace (valid until the next packed layer runs on this thread) instead of a fresh tensor."""
        numel = math.prod(self.expected_shape)
        device = self.weight_packed.device
        values = (
            packing.scratch("packed_weight", numel, torch.float32, device)
            if transient
            else torch.empty(numel, dtype=torch.float32, device=device)
        )
        packing.unpack_codes(self.weight_packed, self.stored_bits, numel, out=values)
        dequantize_(values, self.weight_scale, self.bits, self.wnorm)
        if self.weight_dtype != torch.float32:
            cast = packing.scratch("packed_weight_cast", numel, self.weight_dtype, device) if transient else None
            values = cast.copy_(values) if cast is not None else values.to(self.weight_dtype)
        return values.view(self.expected_shape)

    def _decoded(self, transient: bool) -> torch.Tensor:
        """The weight for this call: from the decode cache, else decoded (and cached when a cache is set)."""
        cache = self.decode_cache
        if cache is not None:
            w = cache.get(id(self))
            if w is None:
                w = self._decode(transient=False)
                cache.put(id(self), w)
            return w
        return self._decode(transient=transient)

    def packed_weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight ``forward`` multiplies ``x`` with. Without autograd recording (inference) it lives in
        the shared workspace; when autograd will save it for backward it gets its own tensor."""
        return self._decoded(transient=not (torch.is_grad_enabled() and x.requires_grad))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self._msq_ready:
            raise RuntimeError(
                f"packed layer {self.layer_name!r} was never loaded (its packed weight is not "
                "validated); load an export with msq_hf.from_pretrained"
            )
        return self.act_quant(x) if self.act_quant is not None else x

    def packed_extra_repr(self) -> str:
        return f"bits={self.bits}, stored_bits={self.stored_bits}, wnorm={self.wnorm}"


class MSQPackedLinear(MSQPackedMixin, nn.Module):
    """Inference ``Linear`` whose weight is stored bit-packed (``F.linear`` on the dequantized weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int,
        wnorm: str = "signmag",
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        act_quantizer: nn.Module | None = None,
        layer_name: str = "",
        full_grid: bool = False,
    ):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_packed((out_features, in_features), bits, wnorm, dtype, device, act_quantizer, layer_name, full_grid)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        return F.linear(x, self.packed_weight_for(x), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.packed_extra_repr()}"
        )


class MSQPackedConv2d(MSQPackedMixin, nn.Module):
    """Inference ``Conv2d`` (any groups/dilation/padding mode, timm SAME padding) with a bit-packed weight."""

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
        bits: int,
        wnorm: str = "signmag",
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        act_quantizer: nn.Module | None = None,
        same_pad: bool = False,
        layer_name: str = "",
        full_grid: bool = False,
    ):
        nn.Module.__init__(self)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self.same_pad = same_pad
        if padding_mode != "zeros":
            pads = (0, 0) if isinstance(self.padding, str) else self.padding
            self._reversed_padding_repeated_twice = [p for p in reversed(pads) for _ in range(2)]
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_packed(shape, bits, wnorm, dtype, device, act_quantizer, layer_name, full_grid)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        return conv_forward(self, x, self.packed_weight_for(x))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, bias={self.bias is not None}, {self.packed_extra_repr()}"
        )


__all__ = [
    "MSQPackedConv2d",
    "MSQPackedLinear",
    "MSQPackedMixin",
    "set_decode_cache",
]
