"""What each method really stores per weight, checked against the layers themselves.

:func:`msq_hf.report.accounting.layer_stored_bits` says MSQ, BSQ and CSQ store sign + n magnitude bits and DoReFa
stores n bits. Here the quantized weights of real converted layers are counted: the number of distinct levels must
fit in the stored width, and must not fit in one bit fewer (so the convention is neither generous nor stingy).
The paper ratio the accounting reports must also equal each method's own ``compression_ratio``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msq_hf
from msq_hf.baselines import bsq, csq, dorefa
from msq_hf.convert import iter_msq_layers
from msq_hf.report.accounting import layer_stored_bits, method_accounting


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    # enough weights (and a heavy-tailed init) for every level of an 8-bit grid to be hit
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn_like(m.weight) ** 3)
    return model


def distinct_levels(weight: torch.Tensor) -> int:
    """Distinct values, on a grid far finer than any tested width (the STE's ``w + (q - w)`` leaves float noise)."""
    w = weight.detach()
    return int(torch.unique(torch.round(w / w.abs().max() * 2**12)).numel())


def layer_weights(model: nn.Module, family: str) -> list[tuple[nn.Module, torch.Tensor]]:
    if family == "msq":
        return [(m, m.quantized_weight()) for _, m in iter_msq_layers(model)]
    module = {"bsq": bsq, "csq": csq, "dorefa": dorefa}[family]
    layers = getattr(module, f"{family}_layers")(model)
    return [(m, m.quantized_weight()) for m in layers.values()]


def convert(model: nn.Module, family: str, bits: int) -> None:
    if family == "msq":
        msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=bits))
    elif family == "csq":
        csq.convert(model, init_bits=bits, target_bits=bits, mask_init=1.0)
        csq.set_temperature(model, 1e4)  # at a large temperature the relaxed bits are the quantized weight
        csq.finalize_masks(model)  # hard masks, every bit on
    else:
        {"bsq": bsq, "dorefa": dorefa}[family].convert(model, init_bits=bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("family", ["msq", "bsq", "csq", "dorefa"])
def test_stored_width_holds_every_level_and_no_fewer_bits_would(family: str, bits: int) -> None:
    model = two_layers()
    convert(model, family, bits)
    stored = layer_stored_bits(family, bits)
    assert stored == (bits if family == "dorefa" else bits + 1)
    levels = max(distinct_levels(w) for _, w in layer_weights(model, family))
    assert levels <= 2**stored, f"{family} {bits}-bit: {levels} levels do not fit in {stored} bits"
    assert levels > 2 ** (stored - 1), f"{family} {bits}-bit: {levels} levels would fit in {stored - 1} bits"


@pytest.mark.parametrize("family", ["bsq", "csq", "dorefa"])
def test_paper_ratio_is_each_baselines_own_compression_ratio(family: str) -> None:
    model = two_layers()
    convert(model, family, 3)
    module = {"bsq": bsq, "csq": csq, "dorefa": dorefa}[family]
    scheme = module.bit_scheme(model)
    numels = {name: m.numel for name, m in getattr(module, f"{family}_layers")(model).items()}
    acc = method_accounting(family, scheme, numels)
    assert acc.paper_ratio == pytest.approx(module.compression_ratio(model))
    assert acc.stored_ratio == pytest.approx(32 / 3 if family == "dorefa" else 32 / 4)
