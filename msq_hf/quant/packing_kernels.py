"""Little-endian kernels of the bit-packing codec (:mod:`msq_hf.quant.packing`, which documents the layout).

The two fast kernels read and write the stream as ``int64`` words with whole-tensor torch ops (no Python loop over
elements); every buffer is passed in, so the codec decides where working memory comes from.

**Byte fields** (CPU, widths 1..7): a *group* of 8 codes is one ``int64`` word of byte codes (code ``k`` at bit
``8k``), and its ``8*width`` bits are exactly ``width`` whole bytes of the stream, starting at byte ``width*q`` for
group ``q``. ``compact_groups`` squeezes every word's codes into a clean *field* (bits ``[0, 8*width)``, zeros
above) with three lane-merging steps on ``int16``, ``int32`` and ``int64`` views; ``write_fields`` ORs each field
into the stream through an ``int64`` view of the 8-byte *window* at byte ``width*q``, i.e. at any byte alignment,
which x86 and ARM CPUs load and store directly. Windows of groups ``q = r, r+8, ...`` are ``8*width`` bytes
apart, one strided view per residue ``r``: 8 such ops whatever the length. ``read_fields`` and
``expand_groups`` run the same steps backwards. Per chunk of codes that is 10 whole-array ops and 8 strided ones in
each direction, where the super-group kernel needs 13 whole-array ops and 19..26 strided column ops at widths 5..7
(docs/packing.md has the profile). Unaligned words are only for CPU tensors: GPUs fault on them.

**Super-groups** (any device; the only fast path for width 9, whose 8-code groups are 9 bytes): 64 codes of
``width`` bits fill exactly ``width`` aligned ``int64`` words. ``split_fields`` cuts each super-group into 8
fields of 8 codes (16 of 4 codes for width 9) with one shift/mask/or per field column, ``expand_`` spreads each
field into byte (16-bit) lanes with log2 in-place "SWAR" steps; packing runs the same steps backwards.

**Columns** (portable: big-endian hosts, and the reference the fast kernels are tested against): each stream byte
of an 8-code group is the shift-or of the codes that overlap it.
"""

from __future__ import annotations

from functools import cache

import torch

# ------------------------------------------------------------------------------------------------
# byte fields (CPU)


def _lanes(size: int, lo: int, hi: int) -> int:
    """An int64 mask with bits ``[lo, hi)`` set in every ``size``-bit lane."""
    field = ((1 << (hi - lo)) - 1) << lo
    return sum(field << base for base in range(0, 64, size))


def byte_windows(buf: torch.Tensor, first: int, step: int, count: int) -> torch.Tensor:
    """``count`` ``int64`` words of the 1-D contiguous uint8 ``buf`` at bytes ``first``, ``first + step``, ...

    A view (writes go to ``buf``) at any byte alignment; ``step`` must be a multiple of 8. The view's storage is a
    slice of ``buf``'s that ends with the last word, so torch refuses (``RuntimeError``) rather than reads or
    writes past it.
    """
    start = buf.storage_offset() + first
    storage = buf.untyped_storage()[start : start + (count - 1) * step + 8]
    return torch.empty(0, dtype=torch.int64, device=buf.device).set_(storage, 0, (count,), (step // 8,))


def _in_place_groups(nbytes: int, width: int, groups: int) -> int:
    """Leading groups whose 8-byte window fits in a ``nbytes``-byte stream."""
    return 0 if nbytes < 8 else min(groups, (nbytes - 8) // width + 1)


def _fields_op(buf: torch.Tensor, width: int, fields: torch.Tensor, read: bool) -> None:
    """``fields[q] = window q`` (``read``) or ``window q |= fields[q]``, one strided op per residue mod 8."""
    count = fields.numel()
    for r in range(min(8, count)):
        windows = byte_windows(buf, width * r, 8 * width, (count - r + 7) // 8)
        if read:
            fields[r::8].copy_(windows)
        else:
            windows |= fields[r::8]


def read_fields(stream: torch.Tensor, width: int, fields: torch.Tensor) -> None:
    """``fields[q]`` = the ``8*width`` bits of group ``q`` of the uint8 CPU ``stream`` (at the bottom; the bits above
    are the next groups' and :func:`expand_groups` ignores them).

    ``stream`` is 1-D contiguous at any byte offset and holds ``ceil(numel * width / 8)`` bytes for
    ``fields.numel()`` groups (a partial last group reads as zero codes).
    """
    groups, nbytes = fields.numel(), stream.numel()
    done = _in_place_groups(nbytes, width, groups)
    _fields_op(stream, width, fields[:done], read=True)
    if done < groups:  # the last windows would read past the stream: read them from a zero-padded copy
        tail = torch.zeros(width * (groups - done) + 8, dtype=torch.uint8, device=stream.device)
        tail[: nbytes - width * done].copy_(stream[width * done :])
        _fields_op(tail, width, fields[done:], read=True)


def write_fields(fields: torch.Tensor, width: int, out: torch.Tensor) -> None:
    """Inverse of :func:`read_fields`: OR the clean fields into the zero-filled uint8 stream ``out``."""
    groups, nbytes = fields.numel(), out.numel()
    done = _in_place_groups(nbytes, width, groups)
    _fields_op(out, width, fields[:done], read=False)
    if done < groups:  # the windows of the last groups run past the stream: build that tail aside
        tail = torch.zeros(width * (groups - done) + 8, dtype=torch.uint8, device=out.device)
        _fields_op(tail, width, fields[done:], read=False)
        out[width * done :].copy_(tail[: nbytes - width * done])  # earlier windows only ORed zeros here


def compact_groups(words: torch.Tensor, fields: torch.Tensor, tmp: torch.Tensor, width: int) -> None:
    """``fields[q]`` = the clean field of the 8 byte codes (each < ``2**width``) of ``words[q]``.

    ``fields`` may be ``words``; ``tmp`` is ``int64`` working space of the same length. Each step moves the upper
    half of every lane down next to the lower half: ``x - (x >> L) * (2**L - 2**m)`` for ``L``-bit halves that
    hold ``m`` payload bits, which stays non-negative and carry-free for widths <= 7.
    """
    src, dst, t = words.view(torch.int16), fields.view(torch.int16), tmp.view(torch.int16)
    torch.bitwise_right_shift(src, 8, out=t)
    torch.sub(src, t, alpha=256 - (1 << width), out=dst)
    dst, t = fields.view(torch.int32), tmp.view(torch.int32)
    torch.bitwise_right_shift(dst, 16, out=t)
    dst.sub_(t, alpha=(1 << 16) - (1 << 2 * width))
    # int64 arithmetic is emulated on AVX2 (no 64-bit multiply): the last step uses shifts and masks only
    torch.bitwise_right_shift(fields, 32, out=tmp)
    fields &= 0xFFFFFFFF
    tmp <<= 4 * width
    fields |= tmp


def expand_groups(fields: torch.Tensor, tmp: torch.Tensor, width: int, words: torch.Tensor) -> None:
    """Inverse of :func:`compact_groups`: ``words[q]`` = the 8 byte codes of the field at the bottom ``8*width``
    bits of ``fields[q]`` (the bits above may hold anything).

    ``words`` may be ``fields``; both ``fields`` and ``tmp`` are overwritten. Each step moves the upper half of
    every lane up: ``x + (x & hi_mask) * (2**k - 1)``, which never carries out of a lane.
    """
    w = width
    torch.bitwise_and(fields, _lanes(64, 4 * w, 8 * w), out=tmp)
    fields &= (1 << 4 * w) - 1  # drops the upper half and whatever lies above the field
    tmp <<= 32 - 4 * w
    fields |= tmp
    torch.bitwise_and(fields, _lanes(32, 2 * w, 4 * w), out=tmp)
    fields.view(torch.int32).add_(tmp.view(torch.int32), alpha=(1 << (16 - 2 * w)) - 1)
    torch.bitwise_and(fields, _lanes(16, w, 2 * w), out=tmp)
    torch.add(fields.view(torch.int16), tmp.view(torch.int16), alpha=(1 << (8 - w)) - 1, out=words.view(torch.int16))


# ------------------------------------------------------------------------------------------------
# super-groups (any device): 64 codes = ``width`` aligned int64 words


@cache
def _swar_steps(width: int, lane: int) -> tuple[tuple[int, int, int], ...]:
    """Lane-merging steps ``(shift, mask_lo, mask_hi)`` from ``lane``-bit lanes up to 64 bits.

    Before a step, every ``L``-bit lane holds ``m`` payload bits at its bottom; afterwards every
    ``2L``-bit lane holds ``2m``: the lower lane's bits stay (``mask_lo``), the upper lane's move
    down by ``L - m`` to bits ``[m, 2m)`` (``mask_hi``). No mask touches bit 63, so the arithmetic
    right shift of int64 never leaks sign bits into the payload.
    """
    steps = []
    size, m = lane, width
    while size < 64:
        steps.append((size - m, _lanes(2 * size, 0, m), _lanes(2 * size, m, 2 * m)))
        size, m = 2 * size, 2 * m
    return tuple(steps)


def lane_bits(width: int) -> int:
    """Bits per code lane of the super-group kernel: a byte, or 16 bits for 9-bit codes."""
    return 8 if width <= 8 else 16


def field_layout(width: int) -> tuple[int, int]:
    """``(fields per super-group, bits per field)``: a field is the codes of one int64 lane word."""
    per_field = 64 // lane_bits(width)
    return 64 // per_field, per_field * width


def compact_(words: torch.Tensor, width: int, tmp: torch.Tensor) -> None:
    """In place: gather the ``width``-bit codes in each lane of int64 ``words`` at the bottom of the word."""
    for shift, mask_lo, mask_hi in _swar_steps(width, lane_bits(width)):
        torch.bitwise_right_shift(words, shift, out=tmp)
        tmp &= mask_hi
        words &= mask_lo
        words |= tmp


def expand_(words: torch.Tensor, width: int, tmp: torch.Tensor) -> None:
    """In place inverse of :func:`compact_`; bits above the payload may hold anything on entry."""
    for shift, mask_lo, mask_hi in reversed(_swar_steps(width, lane_bits(width))):
        torch.bitwise_and(words, mask_hi, out=tmp)
        tmp <<= shift
        words &= mask_lo
        words |= tmp


def split_fields(stream: torch.Tensor, width: int, groups: int, fields: torch.Tensor, tmp: torch.Tensor) -> None:
    """``fields[s, m]`` = the ``m``-th field of super-group ``s`` of ``stream`` (bits above it: anything)."""
    count, bits = field_layout(width)
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


def join_fields(fields: torch.Tensor, width: int, groups: int, out: torch.Tensor, tmp: torch.Tensor) -> None:
    """Inverse of :func:`split_fields`: OR every (clean, non-negative) field into its stream word(s)."""
    count, bits = field_layout(width)
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
# portable path (big-endian hosts; also the reference the fast paths are tested against)


def _byte_terms(width: int) -> list[list[tuple[int, int]]]:
    """For each byte of an 8-code group: ``(code index, code bit offset - byte bit offset)``."""
    return [
        [(k, k * width - 8 * b) for k in range(8) if k * width < 8 * b + 8 and (k + 1) * width > 8 * b]
        for b in range(width)
    ]


def pack_columns(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Portable pack of ``(G, 8)`` codes (uint8, or int16 for width 9) into ``(G, width)`` bytes."""
    out = torch.empty(groups.shape[0], width, dtype=torch.uint8, device=groups.device)
    for b, terms in enumerate(_byte_terms(width)):
        acc = None
        for k, off in terms:
            term = groups[:, k] << off if off >= 0 else groups[:, k] >> -off
            acc = term if acc is None else acc | term
        out[:, b] = acc & 0xFF  # int16 work values carry bits above the byte
    return out


def unpack_columns(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Portable inverse of :func:`pack_columns`: ``(G, width)`` bytes to ``(G, 8)`` codes."""
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


__all__ = [
    "byte_windows",
    "compact_",
    "compact_groups",
    "expand_",
    "expand_groups",
    "field_layout",
    "join_fields",
    "lane_bits",
    "pack_columns",
    "read_fields",
    "split_fields",
    "unpack_columns",
    "write_fields",
]
