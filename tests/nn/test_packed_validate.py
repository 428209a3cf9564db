"""The code check of a packed layer looks at every code, a slice at a time (bounded working memory at load)."""

from __future__ import annotations

import pytest
import torch

from msq_hf.errors import MSQFormatError
from msq_hf.nn.codec import stored_bits
from msq_hf.nn.packed import MSQPackedLinear
from msq_hf.quant import packing


def loaded_layer(
    bits: int, codes: torch.Tensor, out_features: int, in_features: int, full_grid: bool = False
) -> MSQPackedLinear:
    layer = MSQPackedLinear(in_features, out_features, bits=bits, layer_name="fc", full_grid=full_grid)
    layer.weight_packed = packing.pack_codes(codes, stored_bits(bits, "signmag"))
    layer.weight_scale.fill_(0.125)
    return layer


@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("step", [8, 64, 1 << 17])
def test_an_invalid_code_anywhere_is_found_whatever_the_slice(
    monkeypatch: pytest.MonkeyPatch, bits: int, step: int
) -> None:
    monkeypatch.setattr(MSQPackedLinear, "CHECK_STEP", step)
    out_features, in_features = 13, 11  # 143 codes: a partial last slice, a stream that ends mid-byte
    top = 2 ** (bits + 1) - 2  # largest valid sign-magnitude offset code; top + 1 (all ones) is invalid
    codes = torch.randint(0, top + 1, (out_features * in_features,), generator=torch.Generator().manual_seed(bits))
    loaded_layer(bits, codes, out_features, in_features).validate()  # valid codes pass
    for where in (0, 7, 8, 71, 136, 142):  # first/last code of a slice, the last slice, the last code
        bad = codes.clone()
        bad[where] = top + 1
        with pytest.raises(MSQFormatError, match=rf"layer 'fc': a stored code is {top + 1}, above the largest valid"):
            loaded_layer(bits, bad, out_features, in_features).validate()


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_the_all_ones_code_is_valid_only_in_a_full_grid_export(bits: int) -> None:
    """``qat_grid="full"`` stores the level ``+2^n`` as the all-ones code ``2^(n+1) - 1``: a full-grid layer decodes it
    to ``2^n`` steps; a sign-magnitude layer refuses it as corrupt."""
    top = 2 ** (bits + 1) - 1
    codes = torch.tensor([0, 2**bits - 1, top])  # -(2^n-1), 0 and +2^n steps
    layer = loaded_layer(bits, codes, 1, 3, full_grid=True)
    layer.validate()
    assert layer.dequantized_weight().flatten().tolist() == [-(2**bits - 1) * 0.125, 0.0, 2**bits * 0.125]
    with pytest.raises(
        MSQFormatError, match=rf"a stored code is {top}, above the largest valid {bits}-bit signmag code"
    ):
        loaded_layer(bits, codes, 1, 3).validate()


def test_the_code_check_works_in_slices_not_in_layer_sized_buffers() -> None:
    """Load-time validation must not grow the codec's per-thread scratch to the size of the largest layer (that
    memory stays in the process): its working memory is bounded by one slice of ``CHECK_STEP`` codes."""
    out_features, in_features, bits = 2048, 1024, 8  # 2M codes at 9 stored bits
    codes = torch.randint(0, 2 ** (bits + 1) - 1, (out_features * in_features,), generator=torch.Generator())
    layer = loaded_layer(bits, codes, out_features, in_features)
    packing.release_scratch()
    layer.validate()
    assert packing.scratch_nbytes() <= 8 * MSQPackedLinear.CHECK_STEP < out_features * in_features
    packing.release_scratch()
