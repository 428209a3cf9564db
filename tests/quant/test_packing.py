"""Bit-packing of integer codes: layout, round trips, exact sizes and input validation."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msq_hf.quant import packing, packing_kernels
from msq_hf.quant.packing import pack_codes, packed_nbytes, unpack_codes

WIDTHS = list(range(1, 10))
SMALL_LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65]


def reference_pack(values: list[int], width: int) -> list[int]:
    """Bit-by-bit statement of the documented layout (LSB-first little-endian bit stream)."""
    bits = [(v >> i) & 1 for v in values for i in range(width)]
    bits += [0] * (-len(bits) % 8)
    return [sum(bits[8 * j + i] << i for i in range(8)) for j in range(len(bits) // 8)]


def out_dtype(width: int) -> torch.dtype:
    return torch.uint8 if width <= 8 else torch.int16


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(packing, raise_on_error=False, verbose=False)
    assert result.attempted >= 3 and result.failed == 0


def test_worked_example_bytes() -> None:
    # 5=101, 3=110, 7=111, 0=000, 6=011 (LSB first) -> 10111011 | 1000011(0)
    packed = pack_codes(torch.tensor([5, 3, 7, 0, 6]), 3)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b11011101, 0b01100001] == [221, 97]
    assert unpack_codes(packed, 3, 5).tolist() == [5, 3, 7, 0, 6]


@pytest.mark.parametrize("width", WIDTHS)
def test_packed_nbytes_is_ceil(width: int) -> None:
    for n in [0, 1, 7, 8, 9, 1000, 10**9 + 3]:
        assert packed_nbytes(n, width) == -(-n * width // 8)


@given(width=st.sampled_from(WIDTHS), data=st.data())
@settings(max_examples=150, deadline=None)
def test_matches_reference_layout_and_round_trips(width: int, data: st.DataObject) -> None:
    n = data.draw(st.one_of(st.sampled_from(SMALL_LENGTHS), st.integers(0, 300)), label="n")
    values = data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=n, max_size=n), label="values")
    dtype = data.draw(
        st.sampled_from([torch.int16, torch.int32, torch.int64] + ([torch.uint8] if width <= 8 else [])), label="dtype"
    )
    packed = pack_codes(torch.tensor(values, dtype=dtype), width)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, width)
    assert packed.tolist() == reference_pack(values, width)
    back = unpack_codes(packed, width, n)
    assert back.dtype == out_dtype(width) and back.tolist() == values


@given(width=st.sampled_from(WIDTHS), n=st.integers(1, 20_000), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_random_round_trip(width: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << width, (n,), generator=gen, dtype=torch.int64)
    packed = pack_codes(codes, width)
    assert packed.numel() == packed_nbytes(n, width)
    assert torch.equal(unpack_codes(packed, width, n).to(torch.int64), codes)


@pytest.mark.parametrize("width", WIDTHS)
def test_large_round_trip_and_spare_bits_zero(width: int) -> None:
    n = 1_000_003  # several million bits, partial last group
    gen = torch.Generator().manual_seed(width)
    codes = torch.randint(0, 1 << width, (n,), generator=gen, dtype=torch.int64).to(out_dtype(width))
    packed = pack_codes(codes, width)
    assert packed.numel() == packed_nbytes(n, width)
    assert torch.equal(unpack_codes(packed, width, n), codes)
    spare = packed.numel() * 8 - n * width
    assert int(packed[-1]) >> (8 - spare) == 0  # spare bits of the last byte are zero (shift 8: whole)
    # The tail matches the reference layout (bits of the last codes end exactly at the stream end).
    tail = 8 * width + (n % 8)
    assert packed[-packed_nbytes(tail, width) :].tolist() == reference_pack(codes[-tail:].tolist(), width)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_all_max_codes_give_all_ones(width: int, n: int) -> None:
    codes = torch.full((n,), (1 << width) - 1, dtype=torch.int32)
    packed = pack_codes(codes, width)
    bits = n * width
    assert packed[: bits // 8].eq(255).all()
    if bits % 8:
        assert int(packed[-1]) == (1 << (bits % 8)) - 1  # spare high bits stay zero
    assert torch.equal(unpack_codes(packed, width, n).to(torch.int32), codes)


def test_c_order_flattening_and_noncontiguous_input() -> None:
    codes = torch.arange(24, dtype=torch.int64).reshape(2, 3, 4) % 32
    assert torch.equal(pack_codes(codes, 5), pack_codes(codes.reshape(-1), 5))
    transposed = codes.transpose(0, 2)  # non-contiguous view: packed in its own C order
    assert torch.equal(pack_codes(transposed, 5), pack_codes(transposed.contiguous().reshape(-1), 5))


def test_unpack_accepts_unaligned_slice() -> None:
    # a stream that starts at an odd byte offset inside a bigger buffer (e.g. a checkpoint blob)
    codes = torch.randint(0, 4, (1003,), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 2)
    blob = torch.cat([torch.tensor([7], dtype=torch.uint8), packed])
    assert torch.equal(unpack_codes(blob[1:], 2, 1003).to(torch.int64), codes)


@pytest.mark.parametrize("width", WIDTHS)
def test_portable_column_path_matches_fast_path(width: int) -> None:
    gen = torch.Generator().manual_seed(100 + width)
    n = 8 * 37
    codes = torch.randint(0, 1 << width, (n,), generator=gen).to(out_dtype(width))
    fast = pack_codes(codes, width)
    slow = packing_kernels.pack_columns(codes.view(-1, 8), width).view(-1)
    assert torch.equal(fast, slow)
    assert torch.equal(packing_kernels.unpack_columns(slow.view(-1, width), width).view(-1), codes)


@pytest.mark.parametrize("width", WIDTHS)
def test_out_of_range_codes_rejected(width: int) -> None:
    too_big = torch.tensor([0, 1 << width, 1], dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"\[0, {(1 << width) - 1}\].*width {width}.*max {1 << width}"):
        pack_codes(too_big, width)
    with pytest.raises(ValueError, match=r"min -1"):
        pack_codes(torch.tensor([0, -1], dtype=torch.int16), width)


def test_uint8_codes_wider_than_width_rejected() -> None:
    with pytest.raises(ValueError, match=r"max 200"):
        pack_codes(torch.tensor([3, 200], dtype=torch.uint8), 7)


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 2.0]), torch.tensor([True, False])])
def test_non_integer_codes_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(bad, 4)


@pytest.mark.parametrize("width", [0, 10, -1, 3.0, True])
def test_bad_width_rejected(width: object) -> None:
    with pytest.raises(ValueError, match=r"width must be an int in \[1, 9\]"):
        pack_codes(torch.tensor([0]), width)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        packed_nbytes(4, width)  # type: ignore[arg-type]


def test_unpack_wrong_length_rejected() -> None:
    packed = pack_codes(torch.tensor([5, 3, 7, 0, 6]), 3)
    with pytest.raises(ValueError, match=r"must be 2 bytes, got 3 bytes"):
        unpack_codes(torch.cat([packed, packed[:1]]), 3, 5)
    with pytest.raises(ValueError, match=r"must be 3 bytes, got 2 bytes"):
        unpack_codes(packed, 3, 6)
    with pytest.raises(ValueError, match="numel"):
        unpack_codes(packed, 3, -1)


@pytest.mark.parametrize(
    "bad", [torch.zeros(2, dtype=torch.int8), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.uint8)]
)
def test_unpack_wrong_dtype_or_shape_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"1-D torch.uint8"):
        unpack_codes(bad, 8, 2)


def test_empty() -> None:
    for width in WIDTHS:
        packed = pack_codes(torch.empty(0, dtype=torch.int64), width)
        assert packed.dtype == torch.uint8 and packed.numel() == 0
        back = unpack_codes(packed, width, 0)
        assert back.dtype == out_dtype(width) and back.numel() == 0
