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

Implementation (pure torch, no Python loop over elements): 64 codes of ``width`` bits fill exactly
``width`` little-endian ``int64`` words (a "super-group"). Unpacking cuts each super-group into 8 fields
of 8 codes (16 fields of 4 codes for width 9) with one shift/mask/or per field column, then spreads every
field's codes into byte (16-bit) lanes with log2 in-place "SWAR" steps (one shift, two masks, one or
each). Packing runs the same steps backwards; width 1 gathers its 8 bits with a single multiply and
width 8 is a copy. Every op works on whole aligned ``int64`` arrays -- no byte-strided copies, which
torch runs an order of magnitude slower -- and the working buffers come from a per-thread scratch
(:func:`scratch`) so repeated calls do not page-fault fresh memory. A portable column-wise fallback
(per output byte, shift-or of the 8 code columns) serves big-endian hosts.
"""

from __future__ import annotations

import sys
import threading
from functools import cache

import torch

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


@cache
def _swar_steps(width: int, lane: int) -> tuple[tuple[int, int, int], ...]:
    """Lane-merging steps ``(shift, mask_lo, mask_hi)`` from ``lane``-bit lanes up to 64 bits.

    Before a step, every ``L``-bit lane holds ``m`` payload bits at its bottom; afterwards every
    ``2L``-bit lane holds ``2m``: the lower lane's bits stay (``mask_lo``), the upper lane's move
    down by ``L - m`` to bits ``[m, 2m)`` (``mask_hi``). No mask touches bit 63, so the arithmetic
    right shift of int64 never leaks sign bits into the payload.
    """

    def lanes(size: int, lo: int, hi: int) -> int:
        field = ((1 << (hi - lo)) - 1) << lo
        return sum(field << base for base in range(0, 64, size))

    steps = []
    size, m = lane, width
    while size < 64:
        steps.append((size - m, lanes(2 * size, 0, m), lanes(2 * size, m, 2 * m)))
        size, m = 2 * size, 2 * m
    return tuple(steps)


# ------------------------------------------------------------------------------------------------
# per-thread scratch buffers

#: a scratch buffer larger than this (bytes) is allocated per call and not kept
SCRATCH_LIMIT = 64 * 2**20


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
# little-endian fast path: super-groups of 64 codes = ``width`` int64 words


def _lane(width: int) -> int:
    """Bits per code lane while (un)packing: a byte, or 16 bits for 9-bit codes."""
    return 8 if width <= 8 else 16


def _fields(width: int) -> tuple[int, int]:
    """``(fields per super-group, bits per field)``: a field is the codes of one int64 lane word."""
    per_field = 64 // _lane(width)
    return 64 // per_field, per_field * width


def _compact_(words: torch.Tensor, width: int, lane: int, tmp: torch.Tensor) -> None:
    """In place: gather the ``width``-bit codes in each ``lane``-bit lane of int64 ``words``."""
    for shift, mask_lo, mask_hi in _swar_steps(width, lane):
        torch.bitwise_right_shift(words, shift, out=tmp)
        tmp &= mask_hi
        words &= mask_lo
        words |= tmp


def _expand_(words: torch.Tensor, width: int, lane: int, tmp: torch.Tensor) -> None:
    """In place inverse of ``_compact_``; bits above the payload may hold anything on entry."""
    for shift, mask_lo, mask_hi in reversed(_swar_steps(width, lane)):
        torch.bitwise_and(words, mask_hi, out=tmp)
        tmp <<= shift
        words &= mask_lo
        words |= tmp


def _split_fields(stream: torch.Tensor, width: int, groups: int, fields: torch.Tensor, tmp: torch.Tensor) -> None:
    """``fields[s, m]`` = the ``m``-th field of super-group ``s`` of ``stream`` (bits above it: anything)."""
    count, bits = _fields(width)
    words = stream.view(torch.int64).view(groups, width)
    for m in range(count):
        word, shift = divmod(m * bits, 64)
        col = fields[:, m]
        if shift == 0:
            col.copy_(words[:, word])
            continue
        torch.bitwise_right_shift(words[:, word], shift, out=col)
        if shift + bits > 64:  # the field continues in the next word
            col &= (1 << (64 - shift)) - 1  # drop the sign copies of the arithmetic shift
            torch.bitwise_left_shift(words[:, word + 1], 64 - shift, out=tmp)
            col |= tmp


def _join_fields(fields: torch.Tensor, width: int, groups: int, out: torch.Tensor, tmp: torch.Tensor) -> None:
    """Inverse of ``_split_fields``: OR every (clean, non-negative) field into its stream word(s)."""
    count, bits = _fields(width)
    words = out.view(torch.int64).view(groups, width)
    for word in range(width):
        col = words[:, word]
        first = True
        for m in range(count):
            offset = m * bits - 64 * word
            if offset >= 64 or offset + bits <= 0:
                continue
            dst = col if first else tmp
            if offset >= 0:
                torch.bitwise_left_shift(fields[:, m], offset, out=dst)  # wraps: bits >= 64 go to the next word
            else:
                torch.bitwise_right_shift(fields[:, m], -offset, out=dst)
            if not first:
                col |= tmp
            first = False


# ------------------------------------------------------------------------------------------------
# portable path (big-endian hosts; also the reference the fast path is tested against)


def _byte_terms(width: int) -> list[list[tuple[int, int]]]:
    """For each byte of an 8-code group: ``(code index, code bit offset - byte bit offset)``."""
    return [
        [(k, k * width - 8 * b) for k in range(8) if k * width < 8 * b + 8 and (k + 1) * width > 8 * b]
        for b in range(width)
    ]


def _pack_columns(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Portable pack of ``(G, 8)`` codes (uint8, or int16 for width 9) into ``(G, width)`` bytes."""
    out = torch.empty(groups.shape[0], width, dtype=torch.uint8, device=groups.device)
    for b, terms in enumerate(_byte_terms(width)):
        acc = None
        for k, off in terms:
            term = groups[:, k] << off if off >= 0 else groups[:, k] >> -off
            acc = term if acc is None else acc | term
        out[:, b] = acc & 0xFF  # int16 work values carry bits above the byte
    return out


def _unpack_columns(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Portable inverse of ``_pack_columns``: ``(G, width)`` bytes to ``(G, 8)`` codes."""
    dtype = torch.uint8 if width <= 8 else torch.int16
    src = groups.to(dtype)
    out = torch.empty(groups.shape[0], 8, dtype=dtype, device=groups.device)
    terms_of_code: list[list[tuple[int, int]]] = [[] for _ in range(8)]
    for b, terms in enumerate(_byte_terms(width)):
        for k, off in terms:
            terms_of_code[k].append((b, off))
    for k, terms in enumerate(terms_of_code):
        acc = None
        for b, off in terms:
            term = src[:, b] >> off if off >= 0 else src[:, b] << -off
            acc = term if acc is None else acc | term
        out[:, k] = acc & ((1 << width) - 1)
    return out


# ------------------------------------------------------------------------------------------------
# public API


def _check_range(flat: torch.Tensor, width: int) -> None:
    info = torch.iinfo(flat.dtype)
    if info.min >= 0 and info.max <= (1 << width) - 1:
        return  # every value of this dtype is a valid code: skip the scan
    if flat.dtype in (torch.uint16, torch.uint32, torch.uint64):
        flat = flat.to(torch.int64)  # limited op support for these dtypes; uint64 > 2^63 goes negative
    lo, hi = torch.aminmax(flat)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi > (1 << width) - 1:
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
    _check_range(flat, width)
    if width == 8:
        return flat.to(torch.uint8, copy=True)

    lane_dtype = torch.uint8 if width <= 8 else torch.int16
    if not _LITTLE_ENDIAN:
        buf = torch.zeros(-(-n // 8) * 8, dtype=lane_dtype, device=device)
        buf[:n].copy_(flat)
        return _pack_columns(buf.view(-1, 8), width).view(-1)[:nbytes]

    groups = -(-n // 64)  # super-groups of 64 codes
    lanes = scratch("codes", groups * 64, lane_dtype, device)
    lanes[:n].copy_(flat)
    lanes[n:].zero_()  # padding codes must be zero: they land in the last byte's spare bits
    words = lanes.view(torch.int64)
    if width == 1:
        words.mul_(_GATHER_1BIT)  # int64 multiply wraps; the 8 bits land at 56..63
        words >>= 56
        return words.to(torch.uint8)[:nbytes]  # truncating cast keeps the low byte: 1 byte per 8 codes
    tmp = scratch("tmp", words.numel(), torch.int64, device)
    _compact_(words, width, _lane(width), tmp)
    out = torch.empty(groups * 8 * width, dtype=torch.uint8, device=device)
    _join_fields(words.view(groups, -1), width, groups, out, tmp[:groups])
    return out[:nbytes]


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
        codes = _unpack_columns(stream.view(-1, width), width).view(-1)[:numel]
    else:
        codes = _unpack_le(packed, width, numel)
    if out is None:
        return codes.to(lane_dtype, copy=True)
    flat = out.view(-1)
    flat.copy_(codes)
    return flat


def _unpack_le(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Little-endian unpack into scratch: a view of the ``numel`` codes, valid until the next codec call."""
    device = packed.device
    groups = -(-numel // 64)
    nbytes = packed.numel()
    if nbytes == groups * 8 * width and packed.is_contiguous() and packed.data_ptr() % 8 == 0:
        stream = packed  # whole super-groups at an aligned address: read the int64 words in place
    else:  # a partial last super-group or an unaligned slice: copy into zero-padded scratch
        stream = scratch("stream", groups * 8 * width, torch.uint8, device)
        stream[:nbytes].copy_(packed)
        stream[nbytes:].zero_()
    count = _fields(width)[0]
    fields = scratch("codes", groups * count, torch.int64, device)
    tmp = scratch("tmp", groups * count, torch.int64, device)
    _split_fields(stream, width, groups, fields.view(groups, count), tmp[:groups])
    _expand_(fields, width, _lane(width), tmp)
    return fields.view(torch.uint8 if width <= 8 else torch.int16)[:numel]


__all__ = [
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
