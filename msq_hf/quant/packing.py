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

Implementation (pure torch, no Python loop over elements): 8 codes of ``width`` bits fill
exactly ``width`` bytes, so the stream is a sequence of independent 8-code groups. On
little-endian hosts one group of byte-sized codes is one ``int64`` word (two words of ``int16``
codes for width 9), and the group is compacted in registers with log2 "SWAR" steps: each step
merges pairs of neighbouring lanes with one shift, two masks and one or, all in place on a single
buffer. A width-1 group is gathered with a single multiplication instead. Unpacking runs the same
steps backwards. A portable column-wise fallback (per output byte, shift-or of the 8 code columns)
serves big-endian hosts.
"""

from __future__ import annotations

import sys
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


def _compact_(words: torch.Tensor, width: int, lane: int) -> None:
    """In place: gather the ``width``-bit codes in each ``lane``-bit lane of int64 ``words``."""
    tmp = torch.empty_like(words)
    for shift, mask_lo, mask_hi in _swar_steps(width, lane):
        torch.bitwise_right_shift(words, shift, out=tmp)
        tmp &= mask_hi
        words &= mask_lo
        words |= tmp


def _expand_(words: torch.Tensor, width: int, lane: int) -> None:
    """In place inverse of ``_compact_``; bits above the payload may hold anything on entry."""
    tmp = torch.empty_like(words)
    for shift, mask_lo, mask_hi in reversed(_swar_steps(width, lane)):
        torch.bitwise_and(words, mask_hi, out=tmp)
        tmp <<= shift
        words &= mask_lo
        words |= tmp


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

    groups = (n + 7) // 8
    work_dtype = torch.uint8 if width <= 8 else torch.int16
    buf = torch.empty(groups * 8, dtype=work_dtype, device=device)
    buf[:n].copy_(flat)
    buf[n:].zero_()  # padding codes must be zero: they land in the last byte's spare bits
    if not _LITTLE_ENDIAN:
        return _pack_columns(buf.view(groups, 8), width).view(-1)[:nbytes]

    words = buf.view(torch.int64)  # one group per word (two words per group for width 9)
    if width == 1:
        words.mul_(_GATHER_1BIT)  # int64 multiply wraps; the 8 bits land at 56..63
        words >>= 56
        return words.to(torch.uint8)  # truncating cast keeps the low byte; groups == nbytes
    if width <= 7:
        _compact_(words, width, lane=8)
        if width in (2, 4):
            # the payload is the whole low int16/int32 of each word: one aligned strided copy
            half = torch.int16 if width == 2 else torch.int32
            out = torch.empty(groups, dtype=half, device=device)
            out.copy_(words.view(half).view(groups, 8 // width)[:, 0])
            out = out.view(torch.uint8)
        else:
            out = torch.empty(groups, width, dtype=torch.uint8, device=device)
            out.copy_(words.view(torch.uint8).view(groups, 8)[:, :width])
        return out.view(-1)[:nbytes]

    # width 9: word 0 of a group holds codes 0-3, word 1 codes 4-7 (16-bit lanes, 36 bits each)
    _compact_(words, width, lane=16)
    pair = words.view(groups, 2)
    low = pair[:, 1] << 36  # wraps: stream bits 36..63 come from codes 4-7
    low |= pair[:, 0]
    out = torch.empty(groups, 9, dtype=torch.uint8, device=device)
    out[:, :8].copy_(low.view(torch.uint8).view(groups, 8))
    out[:, 8].copy_(pair[:, 1] >> 28)  # stream bits 64..71; the value is < 256
    return out.view(-1)[:nbytes]


def unpack_codes(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``numel`` codes of a ``width``-bit stream.

    Args:
        packed: 1-D ``uint8`` tensor of exactly ``packed_nbytes(numel, width)`` bytes.
        width: bits per code, 1..9.
        numel: number of codes to return.

    Returns:
        1-D tensor of ``numel`` codes on ``packed.device``: ``uint8`` for width <= 8, ``int16``
        for width 9. Reshape it to the original shape yourself.

    Raises:
        ValueError: bad width or numel, ``packed`` not 1-D uint8, or wrong byte length.
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
    out_dtype = torch.uint8 if width <= 8 else torch.int16
    if numel == 0:
        return torch.empty(0, dtype=out_dtype, device=device)
    if width == 8:
        return packed.clone()

    groups = (numel + 7) // 8
    if nbytes != groups * width:  # partial last group: zero-pad to whole groups
        stream = torch.zeros(groups * width, dtype=torch.uint8, device=device)
        stream[:nbytes].copy_(packed)
    elif packed.is_contiguous() and packed.storage_offset() % 8 == 0:
        stream = packed
    else:  # the int16/int32 views below need an aligned, contiguous stream
        stream = packed.clone(memory_format=torch.contiguous_format)
    if not _LITTLE_ENDIAN:
        return _unpack_columns(stream.view(groups, width), width).view(-1)[:numel]

    if width <= 7:
        # bytes [width, 8) of each word stay uninitialized: _expand_ masks them away
        buf = torch.empty(groups, 8, dtype=torch.uint8, device=device)
        if width in (1, 2, 4):
            half = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[width]
            buf.view(half)[:, 0].copy_(stream.view(half))
        else:
            buf[:, :width].copy_(stream.view(groups, width))
        words = buf.view(torch.int64).view(groups)
        _expand_(words, width, lane=8)
        return buf.view(-1)[:numel]

    # width 9: rebuild the two 36-bit halves of every 72-bit group, then expand 16-bit lanes
    rows = stream.view(groups, 9)
    low = torch.empty(groups, 8, dtype=torch.uint8, device=device)
    low.copy_(rows[:, :8])
    low = low.view(torch.int64).view(groups)
    buf = torch.empty(groups * 8, dtype=torch.int16, device=device)
    pair = buf.view(torch.int64).view(groups, 2)
    torch.bitwise_and(low, (1 << 36) - 1, out=pair[:, 0])
    high = rows[:, 8].to(torch.int64)
    high <<= 28
    low >>= 36  # arithmetic shift: mask off the sign copies
    low &= (1 << 28) - 1
    torch.bitwise_or(low, high, out=pair[:, 1])
    _expand_(buf.view(torch.int64), width, lane=16)
    return buf[:numel]
