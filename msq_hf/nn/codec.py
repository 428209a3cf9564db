"""The weight codec of an export: MSQ layer -> integer codes -> packed bytes, and back to the weight.

Storage of one quantized weight ``W`` with ``n`` magnitude bits (format version 1):

* ``wnorm="signmag"``: the layer's signed codes ``c`` in ``[-(2^n-1), 2^n-1]`` and step ``s = S/2^n``
  (``W_q = c * s``) are stored as offset codes ``c + (2^n - 1)`` in ``n + 1`` bits per weight; a model trained with
  ``MSQConfig.qat_grid="full"`` also uses ``c = 2^n`` (offset code ``2^(n+1) - 1``), the one code sign-magnitude
  leaves free, and ``s`` is its learned step;
* ``wnorm="dorefa"``: codes ``c`` in ``[0, 2^n-1]`` in ``n`` bits, ``W_q = 2 c s - 1`` with ``s = 1/2^n``.

The exporter (:mod:`msq_hf.io.format`) encodes with :func:`encode_layer`; packed layers
(:mod:`msq_hf.nn.packed`) and the export check (:mod:`msq_hf.io.verify`) decode with :func:`dequantize_`.
"""

from __future__ import annotations

from typing import Any

import torch

from msq_hf.errors import MSQFormatError
from msq_hf.quant import functional as QF
from msq_hf.quant import packing


def stored_bits(bits: int, wnorm: str) -> int:
    """Bits per weight in the bitstream: ``n + 1`` (sign-magnitude offset codes) or ``n`` (DoReFa)."""
    return QF.storage_bits(int(bits), wnorm)  # type: ignore[arg-type]


def top_code(bits: int, wnorm: str, full_grid: bool = False) -> int:
    """The largest valid stored code at ``bits`` magnitude bits: ``2^(n+1) - 2`` (signmag; ``2^(n+1) - 1`` with
    ``full_grid``, ``MSQConfig.qat_grid="full"``) or ``2^n - 1`` (dorefa)."""
    if wnorm == "signmag":
        return 2 ** (bits + 1) - (1 if full_grid else 2)
    return 2**bits - 1


def packed_nbytes(numel: int, bits: int, wnorm: str) -> int:
    """Bytes of the ``weight_packed`` tensor of a layer with ``numel`` weights at ``bits`` magnitude bits."""
    return int(packing.packed_nbytes(int(numel), stored_bits(bits, wnorm)))


def dequantize_(values: torch.Tensor, scale: torch.Tensor, bits: int, wnorm: str) -> torch.Tensor:
    """In place on float32 ``values`` holding unsigned stored codes: ``(c - (2^n-1)) * s`` (signmag) or
    ``2 (c s) - 1`` (dorefa) -- the one dequantization formula, op for op, so every caller is bit-identical."""
    s = scale.reshape(())
    if wnorm == "signmag":
        return values.sub_(2**bits - 1).mul_(s)
    return values.mul_(s).mul_(2).sub_(1)


def decode_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    wnorm: str,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize unsigned stored codes (:func:`dequantize_`) in fp32, then cast to ``dtype`` (the exporter
    checks this reproduces the layer bit for bit)."""
    w = codes.reshape(shape).to(torch.float32, copy=True)
    return dequantize_(w, scale.to(device=w.device, dtype=torch.float32), bits, wnorm).to(dtype)


def encode_layer(name: str, layer: Any, verify: bool = True) -> dict[str, torch.Tensor]:
    """The four packed tensors of MSQ layer ``name`` (keys without the module prefix).

    With ``verify`` the codes are unpacked and dequantized again and compared with
    ``layer.quantized_weight()`` using ``torch.equal``; a difference raises ``MSQFormatError``.
    """
    bits = layer.n_bits
    width = stored_bits(bits, layer.wnorm)
    codes, scale = layer.integer_codes()
    if layer.wnorm == "signmag":  # stored as offset codes c + (2^n - 1) >= 0
        codes = codes + (2**bits - 1)
    packed = packing.pack_codes(codes.reshape(-1), width)
    shape = tuple(layer.weight.shape)
    if verify:
        back = packing.unpack_codes(packed, width, codes.numel())
        deq = decode_weight(back, scale, bits, layer.wnorm, shape, layer.weight.dtype)
        if not torch.equal(deq, layer.quantized_weight()):
            raise MSQFormatError(
                f"layer {name!r}: packed codes do not reproduce the fake-quantized weight "
                f"(bits={bits}, wnorm={layer.wnorm}, dtype={layer.weight.dtype}); refusing to "
                "write an export that would not match the model"
            )
    return {
        "weight_packed": packed.contiguous(),
        "weight_scale": scale.reshape(1).to(torch.float32).contiguous(),
        "weight_bits": torch.tensor([bits], dtype=torch.uint8),
        "weight_shape": torch.tensor(shape, dtype=torch.int64),
    }


__all__ = ["decode_weight", "dequantize_", "encode_layer", "packed_nbytes", "stored_bits", "top_code"]
