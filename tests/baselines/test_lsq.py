"""LSQ weight baseline (msq_hf/baselines/lsq.py): the grid, the step initialisation, the gradients, the accounting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from msq_hf.baselines import METHODS, lsq
from msq_hf.report.accounting import method_accounting


def converted(bits: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    return lsq.convert(model, bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_lie_on_a_signed_grid_of_2_to_the_k_levels(bits) -> None:
    model = converted(bits)
    for layer in lsq.lsq_layers(model).values():
        w = layer.weight.detach().clone()
        q = layer.quantized_weight().detach()
        qp = 2 ** (bits - 1) - 1
        # the first forward sets the paper's initial step 2 mean|W| / sqrt(Qp)
        assert float(layer.step.detach()) == pytest.approx(float(2 * w.abs().mean() / math.sqrt(qp)), rel=1e-5)
        codes = q / layer.step.detach().abs()
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().min() >= -(2 ** (bits - 1)) and codes.round().max() <= qp
        expected = torch.clamp(torch.round(w / layer.step.detach()), -(2 ** (bits - 1)), qp) * layer.step.detach()
        assert torch.allclose(q, expected, atol=1e-6)


def test_gradients_are_lsq_straight_through_and_scaled_by_the_weight_count() -> None:
    model = converted(3)
    layer = lsq.lsq_layers(model)["2"]
    layer.quantized_weight()  # first call: initialise the step
    step = layer.step.detach().clone()
    upstream = torch.randn(layer.weight.shape)
    (layer.quantized_weight() * upstream).sum().backward()
    w, qn, qp = layer.weight.detach(), -4, 3
    v = w / step
    inside = (v >= qn) & (v <= qp)
    # weight: straight through inside the clip range, zero outside
    assert torch.allclose(layer.weight.grad, upstream * inside)
    # step: LSQ's d(w_q)/ds (round(v) - v inside, the clip bound outside), scaled by 1/sqrt(Qp * N_W)
    dstep = torch.where(inside, v.round() - v, v.clamp(qn, qp))
    expected = (upstream * dstep).sum() / math.sqrt(qp * w.numel())
    assert float(layer.step.grad) == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


def test_interface_and_accounting_match_the_uniform_baselines() -> None:
    model = converted(3)
    assert METHODS["lsq"] is lsq
    assert set(lsq.bit_scheme(model).values()) == {3}
    assert lsq.compression_ratio(model) == pytest.approx(32 / 3)
    assert float(lsq.regularization(model)) == 0.0
    assert lsq.trainable_parameters(model) == sum(p.numel() for p in model.parameters())
    # a uniform k-bit grid stores k bits: an LSQ W4 run sits at MSQ's stored bits at 3 magnitude bits
    assert method_accounting("lsq", 4).stored_bits == method_accounting("msq", 3).stored_bits == 4
    with pytest.raises(ValueError, match="lsq weight bits"):
        lsq.convert(nn.Sequential(nn.Linear(2, 2)), bits=1)


@pytest.mark.parametrize("key", ["timm/test_resnet", "hf/timm_wrapper"])
def test_tiny_models_train_with_lsq_weights(key, tiny_model_factories, images) -> None:
    from conftest import forward_logits

    model = tiny_model_factories[key]()
    n_float_layers = sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    lsq.convert(model, bits=4, act_bits=4)
    assert len(lsq.bit_scheme(model)) == n_float_layers
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    steps = []
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward_logits(model, images), torch.tensor([1, 7]))
        loss.backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        opt.step()
        steps.append(torch.stack([layer.step.detach().clone() for layer in lsq.lsq_layers(model).values()]))
    assert not torch.equal(steps[0], steps[1])  # the steps are trained, not frozen at their initial values
