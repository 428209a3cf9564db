"""Dense bit-packing of unsigned integer codes (1..9 bits) into a ``uint8`` byte stream.

MSQ stores each layer's weights as integer codes of the layer's learned width. Sign-magnitude
weights with ``n`` magnitude bits (``n`` in 1..8) become ``(n+1)``-bit offset codes, hence widths
up to 9. This module turns such codes into the smallest possible byte string and back; it knows
nothing about layers or checkpoints.

Layout: a little-endian bit stream. Bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``;
code ``i`` occupies stream bits ``[i*width, (i+1)*width)``, least-significant bit first. Codes are
taken in C (row-major) order of the input tensor. Unused bits of the last byte are zero, and the
stream is exactly ``ceil(numel * width / 8)`` bytes long (no header: the caller records ``numel``
and ``width``).

Worked example, 3-bit codes ``[5, 3, 7, 0, 6]`` (15 bits, so 2 bytes)::

    code      5      3      7      0      6
    bits    1 0 1  1 1 0  1 1 1  0 0 0  0 1 1     (LSB first)
    stream  1 0 1 1 1 0 1 1 | 1 0 0 0 0 1 1 0     (byte 0 | byte 1, 1 padding bit)
    byte 0 = 0b11011101 = 221,  byte 1 = 0b01100001 = 97

>>> import torch
>>> from msq_hf.quant.packing import pack_codes, unpack_codes
>>> packed = pack_codes(torch.tensor([5, 3, 7, 0, 6]), width=3)
>>> packed.tolist()
[221, 97]
>>> unpack_codes(packed, width=3, numel=5).tolist()
[5, 3, 7, 0, 6]

Implementation (pure torch, no Python loop over elements; the kernels are in
:mod:`msq_hf.quant.packing_kernels`). On the CPU, widths 1..7 use *byte fields*: 8 codes of ``width`` bits
are exactly ``width`` bytes, so each ``int64`` word of 8 byte codes is squeezed into one field (three
lane-merging steps on ``int16``/``int32``/``int64`` views) and ORed into the stream through an ``int64`` view
of the 8 bytes at its (unaligned) byte offset; unpacking reads the same windows and spreads the fields back.
Width 9, and every width on other devices, uses *super-groups*: 64 codes fill exactly ``width`` aligned
``int64`` words, cut into fields with shift/mask/or column ops and "SWAR" lane steps. Width 1 gathers its 8
bits with a single multiply and width 8 is a copy. No op is a byte-strided copy (torch runs those an order of
magnitude slower), and the working buffers come from a per-thread scratch (:func:`scratch`) so repeated
calls do not page-fault fresh memory. A portable column-wise fallback (per output byte, shift-or of the 8
code columns) serves big-endian hosts and is the reference the fast paths are tested against.
"""

from __future__ import annotations

import sys
import threading

import torch

from msq_hf.quant.packing_kernels import (
    compact_,
    compact_groups,
    expand_,
    expand_groups,
    field_layout,
    join_fields,
    pack_columns,
    read_fields,
    split_fields,
    unpack_columns,
    write_fields,
)

MIN_WIDTH = 1
MAX_WIDTH = 9

_LITTLE_ENDIAN = sys.byteorder == "little"
# Byte k of the group word holds the 1-bit code k at bit 8k; multiplying by sum_k 2^(56-7k) moves
# it to bit 56+k with no two partial products overlapping (8k-7j is unique), so no carries.
_GATHER_1BIT = sum(1 << (56 - 7 * k) for k in range(8))


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or not MIN_WIDTH <= width <= MAX_WIDTH:
        raise ValueError(f"width must be an int in [{MIN_WIDTH}, {MAX_WIDTH}], got {width!r}")


def packed_nbytes(numel: int, width: int) -> int:
    """Number of bytes ``pack_codes`` produces for ``numel`` codes of ``width`` bits."""
    _check_width(width)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * width + 7) // 8


# ------------------------------------------------------------------------------------------------
# per-thread scratch buffers

#: a scratch buffer larger than this (bytes) is allocated per call and not kept
SCRATCH_LIMIT = 64 * 2**20
#: codes per chunk of the byte-field kernel: its working set (~3 bytes a code) stays in a 16 MB L3 cache
CHUNK_CODES = 1 << 21


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.device], torch.Tensor] = {}


_SCRATCH = _Scratch()


def scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """A 1-D ``dtype`` tensor of ``numel`` elements backed by this thread's buffer ``slot`` on ``device``.

    The buffer grows to the largest request and is reused: fresh multi-MB allocations page-fault on
    every call (on the project's VM that alone costs more than the codec), a reused one does not.
    Contents are undefined, and the tensor is only valid until the next request of ``slot`` on this
    thread: callers copy out what they keep. Requests above :data:`SCRATCH_LIMIT` bytes get a fresh
    tensor. :func:`release_scratch` frees the buffers.
    """
    device = torch.device(device if device is not None else "cpu")
    nbytes = numel * dtype.itemsize
    if nbytes > SCRATCH_LIMIT or device.type == "meta":
        return torch.empty(numel, dtype=dtype, device=device)
    key = (slot, device)
    buf = _SCRATCH.buffers.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 64), dtype=torch.uint8, device=device)
        _SCRATCH.buffers[key] = buf
    return buf[:nbytes].view(dtype)


def scratch_nbytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    return sum(b.numel() for b in _SCRATCH.buffers.values())


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are rebuilt on the next codec call)."""
    _SCRATCH.buffers.clear()


# ------------------------------------------------------------------------------------------------
# public API


def _check_range(flat: torch.Tensor, width: int, whole: torch.Tensor | None = None) -> None:
    """Raise unless every code of ``flat`` lies in ``[0, 2**width - 1]``; the message gives the min and max of
    ``whole`` (default ``flat``), the tensor the caller passed."""
    info = torch.iinfo(flat.dtype)
    if info.min >= 0 and info.max <= (1 << width) - 1:
        return  # every value of this dtype is a valid code: skip the scan
    if flat.dtype in (torch.uint16, torch.uint32, torch.uint64):
        flat = flat.to(torch.int64)  # limited op support for these dtypes; uint64 > 2^63 goes negative
    lo, hi = torch.aminmax(flat)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi > (1 << width) - 1:
        if whole is not None:
            _check_range(whole, width)
        raise ValueError(f"codes must lie in [0, {(1 << width) - 1}] for width {width}, got min {lo} and max {hi}")


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` of ``width`` bits (1..9) into a dense bit stream.

    Args:
        codes: integer tensor of any shape and device, flattened in C order; every value must
            lie in ``[0, 2**width - 1]``.
        width: bits per code, 1..9.

    Returns:
        1-D ``uint8`` tensor of ``packed_nbytes(codes.numel(), width)`` bytes, on ``codes.device``.

    Raises:
        ValueError: bad width, non-integer dtype, or a code out of range (message names the
            observed min/max).
    """
    _check_width(width)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise ValueError(f"codes must have an integer dtype (uint8, int16, int32, int64), got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    nbytes = packed_nbytes(n, width)
    device = codes.device
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if _byte_fields(device, width) and width > 1:
        return _pack_groups(flat, width, nbytes)
    _check_range(flat, width)
    if width == 8:
        return flat.to(torch.uint8, copy=True)

    if not _LITTLE_ENDIAN:
        buf = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8 if width <= 8 else torch.int16, device=device)
        buf[:n].copy_(flat)
        return pack_columns(buf.view(-1, 8), width).view(-1)[:nbytes]

    if width == 1:
        src, words = _code_words(flat, -(-n // 8))
        torch.mul(src, _GATHER_1BIT, out=words)  # int64 multiply wraps; the 8 bits land at 56..63
        words >>= 56
        return words.to(torch.uint8)  # truncating cast keeps the low byte: 1 byte per 8 codes
    return _pack_super_groups(flat, width, nbytes)


def unpack_codes(packed: torch.Tensor, width: int, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``numel`` codes of a ``width``-bit stream.

    Args:
        packed: 1-D ``uint8`` tensor of exactly ``packed_nbytes(numel, width)`` bytes.
        width: bits per code, 1..9.
        numel: number of codes to return.
        out: optional tensor of ``numel`` elements on ``packed.device`` to write the codes into,
            converted to its dtype (e.g. a float32 workspace: unpack and convert in one pass).

    Returns:
        1-D tensor of ``numel`` codes on ``packed.device`` (``out`` reshaped to 1-D if given):
        ``uint8`` for width <= 8, ``int16`` for width 9. Reshape it to the original shape yourself.

    Raises:
        ValueError: bad width or numel, ``packed`` not 1-D uint8, wrong byte length, or an ``out``
            of the wrong size or device.
    """
    nbytes = packed_nbytes(numel, width)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        what = (
            f"{packed.dtype} tensor of shape {tuple(packed.shape)}"
            if isinstance(packed, torch.Tensor)
            else type(packed).__name__
        )
        raise ValueError(f"packed must be a 1-D torch.uint8 tensor, got {what}")
    if packed.numel() != nbytes:
        raise ValueError(
            f"packed stream of {numel} codes x {width} bits must be {nbytes} bytes, got {packed.numel()} bytes"
        )
    device = packed.device
    if out is not None and (out.numel() != numel or out.device != device):
        raise ValueError(
            f"out must hold {numel} elements on {device}, got {out.numel()} on {out.device} (unpack_codes)"
        )
    lane_dtype = torch.uint8 if width <= 8 else torch.int16
    if numel == 0 or width == 8:
        codes = packed
    elif not _LITTLE_ENDIAN:
        stream = torch.zeros(-(-numel // 8) * width, dtype=torch.uint8, device=device)
        stream[:nbytes].copy_(packed)
        codes = unpack_columns(stream.view(-1, width), width).view(-1)[:numel]
    elif _byte_fields(device, width):
        return _unpack_groups(packed, width, numel, out)
    else:
        codes = _unpack_super_groups(packed, width, numel)
    if out is None:
        return codes.to(lane_dtype, copy=True)
    flat = out.view(-1)
    flat.copy_(codes)
    return flat


# ------------------------------------------------------------------------------------------------
# little-endian paths (kernels in msq_hf.quant.packing_kernels)


def _byte_fields(device: torch.device, width: int) -> bool:
    """Whether the byte-field kernel serves ``width`` on ``device``: little-endian CPU (unaligned int64 words),
    widths 1..7, eager (dynamo does not trace storage slices)."""
    return _LITTLE_ENDIAN and device.type == "cpu" and width <= 7 and not torch.compiler.is_compiling()


def _code_words(flat: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)`` for ``groups`` words of 8 byte codes: ``src`` holds the codes zero-padded to whole words,
    ``dst`` is scratch to write words to. ``src`` is ``flat`` itself when it already is such words (no copy),
    else it is ``dst``, filled with the codes."""
    n, device = flat.numel(), flat.device
    dst = scratch("codes", groups, torch.int64, device)
    aligned = flat.storage_offset() % 8 == 0 and flat.data_ptr() % 8 == 0
    if flat.dtype == torch.uint8 and n == 8 * groups and flat.is_contiguous() and aligned:
        return flat.view(torch.int64), dst
    lanes = dst.view(torch.uint8)
    lanes[:n].copy_(flat)
    lanes[n:].zero_()  # padding codes must be zero: they land in the last byte's spare bits
    return dst, dst


def _pack_groups(flat: torch.Tensor, width: int, nbytes: int) -> torch.Tensor:
    """Byte-field pack (CPU, widths 2..7) of the 1-D integer ``flat`` into a fresh ``nbytes``-byte stream, checking
    the codes on the way, one chunk of :data:`CHUNK_CODES` at a time so that its buffers stay in the cache."""
    n, device = flat.numel(), flat.device
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for start in range(0, n, CHUNK_CODES):
        chunk = flat[start : start + CHUNK_CODES]
        _check_range(chunk, width, whole=flat)
        src, fields = _code_words(chunk, -(-chunk.numel() // 8))
        compact_groups(src, fields, scratch("tmp", fields.numel(), torch.int64, device), width)
        stream = out[start // 8 * width :]
        # zero what this chunk's windows reach just before ORing into it (cache-hot); earlier chunks only
        # ORed zeros past their own bytes
        stream[: fields.numel() * width + 8].zero_()
        write_fields(fields, width, stream)
    return out


def _unpack_groups(packed: torch.Tensor, width: int, numel: int, out: torch.Tensor | None) -> torch.Tensor:
    """Byte-field unpack (CPU, widths 1..7) into ``out`` (converted to its dtype) or a fresh uint8 tensor, one
    chunk of :data:`CHUNK_CODES` at a time; returns the 1-D result."""
    device, packed = packed.device, packed.contiguous()
    result = torch.empty(numel, dtype=torch.uint8, device=device) if out is None else out.view(-1)
    for start in range(0, numel, CHUNK_CODES):
        count = min(numel - start, CHUNK_CODES)
        groups = -(-count // 8)
        fields = scratch("codes", groups, torch.int64, device)
        read_fields(packed[start // 8 * width :], width, fields)
        tmp = scratch("tmp", groups, torch.int64, device)
        target = result[start : start + count]
        if out is None and count == 8 * groups:  # expand straight into the result
            expand_groups(fields, tmp, width, target.view(torch.int64))
        else:
            expand_groups(fields, tmp, width, fields)
            target.copy_(fields.view(torch.uint8)[:count])
    return result


def _pack_super_groups(flat: torch.Tensor, width: int, nbytes: int) -> torch.Tensor:
    """Super-group pack of the 1-D integer ``flat`` (valid codes) into a fresh ``nbytes``-byte stream."""
    n, device = flat.numel(), flat.device
    groups = -(-n // 64)  # super-groups of 64 codes
    lanes = scratch("codes", groups * 64, torch.uint8 if width <= 8 else torch.int16, device)
    lanes[:n].copy_(flat)
    lanes[n:].zero_()  # padding codes must be zero: they land in the last byte's spare bits
    words = lanes.view(torch.int64)
    tmp = scratch("tmp", words.numel(), torch.int64, device)
    compact_(words, width, tmp)
    out = torch.empty(groups * 8 * width, dtype=torch.uint8, device=device)
    join_fields(words.view(groups, -1), width, groups, out, tmp[:groups])
    return out[:nbytes]


def _unpack_super_groups(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Super-group unpack into scratch: a view of the ``numel`` codes, valid until the next codec call."""
    device = packed.device
    groups = -(-numel // 64)
    nbytes = packed.numel()
    if nbytes == groups * 8 * width and packed.is_contiguous() and packed.data_ptr() % 8 == 0:
        stream = packed  # whole super-groups at an aligned address: read the int64 words in place
    else:  # a partial last super-group or an unaligned slice: copy into zero-padded scratch
        stream = scratch("stream", groups * 8 * width, torch.uint8, device)
        stream[:nbytes].copy_(packed)
        stream[nbytes:].zero_()
    count = field_layout(width)[0]
    fields = scratch("codes", groups * count, torch.int64, device)
    tmp = scratch("tmp", groups * count, torch.int64, device)
    split_fields(stream, width, groups, fields.view(groups, count), tmp[:groups])
    expand_(fields, width, tmp)
    return fields.view(torch.uint8 if width <= 8 else torch.int16)[:numel]


__all__ = [
    "CHUNK_CODES",
    "MAX_WIDTH",
    "MIN_WIDTH",
    "SCRATCH_LIMIT",
    "pack_codes",
    "packed_nbytes",
    "release_scratch",
    "scratch",
    "scratch_nbytes",
    "unpack_codes",
]
