"""The codec's fast kernels give the reference bytes: byte fields (CPU, widths 1..7) and super-groups (width 9,
other devices) against the portable column path and a bit-by-bit statement of the layout, at any length, dtype
and byte alignment, and without touching a byte outside the stream."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msq_hf.quant import packing, packing_kernels
from msq_hf.quant.packing import pack_codes, packed_nbytes, unpack_codes

WIDTHS = list(range(1, 10))
SENTINEL = 0xA5  # bytes around a stream: a kernel that reads them corrupts codes, one that writes them shows


def bit_reference(values: list[int], width: int) -> list[int]:
    """The documented layout bit by bit: code i at stream bits [i*width, (i+1)*width), LSB first."""
    bits = [(v >> i) & 1 for v in values for i in range(width)]
    bits += [0] * (-len(bits) % 8)
    return [sum(bits[8 * j + i] << i for i in range(8)) for j in range(len(bits) // 8)]


def column_reference(codes: torch.Tensor, width: int) -> torch.Tensor:
    """The portable column path (big-endian hosts) on zero-padded 8-code groups, cut to the stream length."""
    n = codes.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8 if width <= 8 else torch.int16)
    padded[:n] = codes
    return packing_kernels.pack_columns(padded.view(-1, 8), width).reshape(-1)[: packed_nbytes(n, width)]


def embedded(stream: torch.Tensor, offset: int) -> torch.Tensor:
    """``stream`` copied into a bigger buffer at byte ``offset`` (any alignment), sentinel bytes on both sides."""
    buf = torch.full((offset + stream.numel() + 16,), SENTINEL, dtype=torch.uint8)
    buf[offset : offset + stream.numel()] = stream
    return buf[offset : offset + stream.numel()]


lengths = st.one_of(
    st.integers(0, 80),  # every residue mod 8 (partial last group) and mod 64 (partial super-group)
    st.integers(81, 5000),
    st.sampled_from([8 * 1021, 64 * 257, 64 * 257 + 3]),
)


@given(width=st.sampled_from(WIDTHS), n=lengths, seed=st.integers(0, 2**32 - 1), data=st.data())
@settings(max_examples=200, deadline=None)
def test_fast_paths_give_the_reference_bytes(width: int, n: int, seed: int, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.int16, torch.int32, torch.int64] + ([torch.uint8] if width <= 8 else [])
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    shift = data.draw(st.integers(0, 7), label="input offset")  # the codes start at any element of a buffer
    high = data.draw(st.sampled_from([1 << width, 1, 2]), label="code range")  # random, all zero, 0/1
    codes = torch.randint(0, min(high, 1 << width), (shift + n,), generator=gen).to(dtype)[shift:]
    reference = column_reference(codes, width)

    packed = pack_codes(codes, width)
    assert torch.equal(packed, reference)
    if n <= 400:
        assert packed.tolist() == bit_reference(codes.tolist(), width)
    if n and width != 8:  # the super-group kernel (width 9 and other devices) agrees byte for byte
        assert torch.equal(packing._pack_super_groups(codes, width, packed.numel()), reference)

    offset = data.draw(st.integers(0, 15), label="stream offset")
    stream = embedded(reference, offset)
    expected = codes.to(torch.uint8 if width <= 8 else torch.int16)
    assert torch.equal(unpack_codes(stream, width, n), expected)
    into = torch.full((n,), -1.0)
    assert torch.equal(unpack_codes(stream, width, n, out=into), expected.float())
    if n and width != 8:
        assert torch.equal(packing._unpack_super_groups(stream, width, n), expected)


@pytest.mark.parametrize("width", range(1, 8))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1003, 4096])
def test_byte_fields_stay_inside_the_stream(width: int, n: int) -> None:
    gen = torch.Generator().manual_seed(width * 1000 + n)
    codes = torch.randint(0, 1 << width, (-(-n // 8) * 8,), generator=gen, dtype=torch.uint8)
    codes[n:] = 0  # the padding codes of a partial last group
    nbytes = packed_nbytes(n, width)
    words, fields = codes.view(torch.int64), torch.empty(codes.numel() // 8, dtype=torch.int64)
    packing_kernels.compact_groups(words, fields, torch.empty_like(fields), width)
    # a field is the group's 8 codes, code k at bit k*width, nothing above
    weights = torch.tensor([1 << (width * k) for k in range(8)])
    assert torch.equal(fields, (codes.view(-1, 8).long() * weights).sum(1))

    buf = torch.full((nbytes + 16,), SENTINEL, dtype=torch.uint8)
    out = buf[3 : 3 + nbytes]
    out.zero_()
    packing_kernels.write_fields(fields, width, out)
    assert torch.equal(out, column_reference(codes[:n], width))
    assert buf[:3].eq(SENTINEL).all() and buf[3 + nbytes :].eq(SENTINEL).all()

    back = torch.empty_like(fields)
    packing_kernels.read_fields(out, width, back)
    assert torch.equal(back & ((1 << 8 * width) - 1), fields)
    decoded = torch.empty_like(fields)
    packing_kernels.expand_groups(back, torch.empty_like(fields), width, decoded)
    assert torch.equal(decoded.view(torch.uint8), codes)


def test_byte_windows_view_any_alignment_and_refuse_to_run_past_the_buffer() -> None:
    buf = torch.arange(40, dtype=torch.uint8)
    windows = packing_kernels.byte_windows(buf[1:], 2, 16, 2)  # bytes 3..10 and 19..26 of buf
    assert windows.tolist() == [int.from_bytes(bytes(range(s, s + 8)), "little") for s in (3, 19)]
    windows |= 0xFF  # a view: writes land in buf
    assert buf[3].item() == buf[19].item() == 0xFF
    with pytest.raises(RuntimeError):
        packing_kernels.byte_windows(buf[1:], 2, 16, 3)  # the third word would end past byte 39


def test_byte_fields_serve_cpu_widths_1_to_7_only() -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert all(packing._byte_fields(cpu, w) for w in range(1, 8))
    assert not packing._byte_fields(cpu, 9) and not packing._byte_fields(meta, 5)


def test_pack_reads_aligned_uint8_codes_in_place_without_changing_them() -> None:
    codes = torch.randint(0, 32, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    before = codes.clone()
    packed = pack_codes(codes, 5)
    assert torch.equal(codes, before)
    assert torch.equal(unpack_codes(packed, 5, codes.numel()), codes)


@given(
    width=st.sampled_from(range(1, 8)),
    chunk=st.sampled_from([8, 16, 64, 136, 1024]),
    n=st.integers(1, 2500),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=80, deadline=None)
def test_chunks_join_seamlessly(width: int, chunk: int, n: int, seed: int) -> None:
    """Big layers go through the byte-field kernel in chunks of CHUNK_CODES codes: shrunk here to cover chunk
    boundaries at every residue, a last chunk of a few codes, and windows that reach into the next chunk."""
    codes = torch.randint(0, 1 << width, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    reference = column_reference(codes, width)
    saved = packing.CHUNK_CODES
    packing.CHUNK_CODES = chunk
    try:
        assert torch.equal(pack_codes(codes, width), reference)
        assert torch.equal(pack_codes(codes.to(torch.int32), width), reference)
        stream = embedded(reference, seed % 8)
        assert torch.equal(unpack_codes(stream, width, n), codes)
        assert torch.equal(unpack_codes(stream, width, n, out=torch.empty(n)), codes.float())
    finally:
        packing.CHUNK_CODES = saved


def test_out_of_range_code_in_a_later_chunk_reports_the_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "CHUNK_CODES", 64)
    codes = torch.zeros(1000, dtype=torch.int32)
    codes[100], codes[900] = 35, 40  # the first bad chunk's max is 35, the tensor's 40
    with pytest.raises(ValueError, match=r"\[0, 31\] for width 5, got min 0 and max 40"):
        pack_codes(codes, 5)
    codes[100], codes[900], codes[3], codes[500] = 7, 3, -2, -9
    with pytest.raises(ValueError, match=r"got min -9 and max 7"):
        pack_codes(codes, 5)


@pytest.mark.parametrize("width", WIDTHS)
def test_big_endian_hosts_take_the_column_path(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int64 views of both fast kernels assume little-endian words: a big-endian host must not reach them."""
    monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)
    assert not packing._byte_fields(torch.device("cpu"), width)
    codes = torch.randint(0, 1 << width, (1001,), generator=torch.Generator().manual_seed(width))
    reference = column_reference(codes, width)
    assert torch.equal(pack_codes(codes, width), reference)
    assert torch.equal(unpack_codes(reference, width, 1001).long(), codes)
