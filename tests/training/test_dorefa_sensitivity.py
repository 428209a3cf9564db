"""HAWQ sensitivity under DoReFa weights compares Q(W) with the float weight in Q's own domain (2u - 1).

DoReFa's quantized weight ``Q = 2 v_n(u) - 1`` lives in [-1, 1] whatever the scale of ``W``; measuring
``||Q - W||^2`` against the raw weight (the old formula) measures the tanh-affine normalization, not the
rounding, and is off by orders of magnitude for ordinary (small) weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_hf
from msq_hf.convert import msq_layers
from msq_hf.training.sensitivity import estimate_sensitivities

torch.set_num_threads(1)


class SmallNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 8, 8, generator=g), torch.arange(8) % 3


def sq_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).sum())


@pytest.mark.parametrize("bits", [3, 6])
def test_dorefa_sensitivity_uses_the_normalized_reference(bits: int) -> None:
    torch.manual_seed(0)
    model = msq_hf.quantize_model(SmallNet(), msq_hf.MSQConfig(init_bits=bits, target_compression=16.0, wnorm="dorefa"))
    layers = msq_layers(model)
    assert set(layers) == {"conv", "fc"}
    sens, est = estimate_sensitivities(model, layers, batch(), ce, max_probes=3, min_probes=3, seed=0)
    for name, layer in layers.items():
        q, ref, w = layer.quantized_weight(), layer.quantization_reference(), layer.weight.detach()
        assert not ref.requires_grad
        # the reference is 2u - 1 in [-1, 1], and Q differs from it by rounding only (at most 2^(1-n))
        assert float(ref.min()) >= -1.0 and float(ref.max()) <= 1.0
        assert float((q - ref).abs().max()) <= 2.0 ** (1 - bits) + 1e-6
        per_weight_trace = est.trace[name] / w.numel()
        assert est.trace[name] != 0.0
        assert sens[name] == pytest.approx(per_weight_trace * sq_err(q, ref), rel=1e-9)
        # the old formula (raw W) is wrong by a large factor: it measures the normalization, not the rounding
        assert sq_err(q, w) / sq_err(q, ref) > 10.0
        assert sens[name] != pytest.approx(per_weight_trace * sq_err(q, w), rel=0.5)


def test_signmag_reference_is_the_weight_itself() -> None:
    torch.manual_seed(0)
    model = msq_hf.quantize_model(SmallNet(), msq_hf.MSQConfig(init_bits=4, target_compression=16.0))
    layers = msq_layers(model)
    sens, est = estimate_sensitivities(model, layers, batch(), ce, max_probes=3, min_probes=3, seed=0)
    for name, layer in layers.items():
        w = layer.weight.detach()
        assert torch.equal(layer.quantization_reference(), w)
        expected = est.trace[name] / w.numel() * sq_err(layer.quantized_weight(), w)
        assert sens[name] == pytest.approx(expected, rel=1e-9)


def test_modules_without_a_reference_compare_with_the_raw_weight() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    layers = {"conv": model.conv, "fc": model.fc}

    def halves(module: nn.Module) -> torch.Tensor:
        return (module.weight * 2).round() / 2

    sens, est = estimate_sensitivities(model, layers, batch(), ce, halves, max_probes=3, min_probes=3, seed=0)
    for name, module in layers.items():
        w = module.weight.detach()
        expected = est.trace[name] / w.numel() * sq_err(halves(module).detach(), w)
        assert sens[name] == pytest.approx(expected, rel=1e-9)
