"""``lsb_pull="sensitivity"``: lambda pulls only the layers the greedy Hessian allocation would cut
(allocation.pull_weights); the regularizer applies the shares to the loss term and to the proximal step, and the
pull limit bounds the layer pulled hardest."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msq_hf
from msq_hf.config import ConfigFieldError
from msq_hf.convert import msq_layers
from msq_hf.training.allocation import cheapest_bits, pull_weights
from msq_hf.training.pacing import MAX_PULL, pull_limit
from msq_hf.training.regularizer import LSBRegularizer
from msq_hf.training.schedule import BitPruningSchedule

layer_sets = st.lists(
    st.tuples(
        st.floats(-1e-6, 1e-2, allow_nan=False),  # sensitivity, negative = Hutchinson noise around zero
        st.integers(1, 10**6),  # numel
        st.integers(1, 8),  # bits now
        st.floats(0, 1),  # LSB nonzero rate (ties)
    ),
    min_size=1,
    max_size=10,
)


def _shares(layers, target: float, scale: float = 1.0, min_bits: int = 1) -> tuple[dict, dict, dict]:
    names = [f"l{i}" for i in range(len(layers))]
    sens = {n: layer[0] * scale for n, layer in zip(names, layers, strict=True)}
    numels = {n: layer[1] for n, layer in zip(names, layers, strict=True)}
    bits = {n: max(layer[2], min_bits) for n, layer in zip(names, layers, strict=True)}
    rates = {n: layer[3] for n, layer in zip(names, layers, strict=True)}
    tests = BitPruningSchedule(target, 0.5, min_bits=min_bits, prune_order="sensitivity").target_tests(numels)
    return pull_weights(bits, min_bits, (sens, rates, numels), *tests), bits, (sens, rates, numels, tests)


@settings(max_examples=200, deadline=None)
@given(layer_sets, st.floats(4.0, 32.0), st.floats(1e-3, 1e3))
def test_the_pulled_layers_are_those_the_greedy_allocation_cuts(layers, target, scale) -> None:
    shares, bits, (sens, rates, numels, tests) = _shares(layers, target)
    assert set(shares) == set(bits) and set(shares.values()) <= {0.0, 1.0}
    names = [n for n in bits if bits[n] > 1]
    destination, _, _ = cheapest_bits(bits, names, 1, (sens, rates, numels), *tests)
    assert {n for n, w in shares.items() if w} == {n for n in bits if destination[n] < bits[n]}
    assert all(shares[n] == 0.0 for n in bits if bits[n] == 1), "a layer at min_bits is never pulled"
    if tests[0](bits):
        assert not any(shares.values()), "the target is met: nothing to pull"
    elif tests[0](dict.fromkeys(bits, 1)):
        assert any(shares.values()), "short of a reachable target: some layer is pulled"
    scaled, _, _ = _shares(layers, target, scale)
    assert scaled == shares, "a Hessian scaled by a constant picks the same layers"


def test_the_layer_the_loss_barely_feels_is_pulled_and_the_sensitive_one_is_not() -> None:
    numels, bits = {"padded": 9000, "seen": 1000}, {"padded": 8, "seen": 8}
    sens, rates = {"padded": 1e-9, "seen": 1e-3}, {"padded": 0.7, "seen": 0.7}
    tests = BitPruningSchedule(8.0, 0.5, prune_order="sensitivity").target_tests(numels)  # 4 bits on average
    assert pull_weights(bits, 1, (sens, rates, numels), *tests) == {"padded": 1.0, "seen": 0.0}
    # at 1 bit on average the padded layer alone cannot get there: both are cut
    tests = BitPruningSchedule(30.0, 0.5, prune_order="sensitivity").target_tests(numels)
    assert pull_weights(bits, 1, (sens, rates, numels), *tests) == {"padded": 1.0, "seen": 1.0}


def test_pull_limit_bounds_the_layer_pulled_hardest_in_grid_steps() -> None:
    # an 8-bit layer at a tenth of lambda moves 0.1 * 2^0 grid steps; a 6-bit one at full lambda 2^-2: the 6-bit binds
    assert pull_limit(0.1, [8, 6], "scale", [0.1, 1.0]) == pytest.approx(MAX_PULL / (0.1 * 0.25))
    assert pull_limit(0.1, [8, 6], "scale", [1.0, 1.0]) == pull_limit(0.1, [8, 6], "scale")
    assert pull_limit(0.1, [8, 6], "step", [0.5, 0.25]) == pytest.approx(MAX_PULL / (0.1 * 0.5))
    assert pull_limit(0.1, [8, 6], "scale", [0.0, 0.0]) is None, "nothing pulled: no bound"
    with pytest.raises(ValueError):
        pull_limit(0.1, [8, 6], "scale", [1.0])


def test_the_sensitivity_pull_needs_the_hessian_pass() -> None:
    with pytest.raises(ConfigFieldError, match="lsb_pull"):
        msq_hf.MSQConfig(lsb_pull="sensitivity", hessian_guided=False)
    assert msq_hf.MSQConfig(lsb_pull="sensitivity").lsb_pull == "sensitivity"
    with pytest.raises(ConfigFieldError, match="lsb_pull"):
        msq_hf.MSQConfig(lsb_pull="hessian")


def _two_layer_model(update: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model = msq_hf.quantize_model(net, msq_hf.MSQConfig(init_bits=8, lsb_update=update))
    for layer in msq_layers(model).values():
        layer.set_bits(8, 2)
    return model


@pytest.mark.filterwarnings("ignore:msq_hf. Sequential has MSQ layers")  # driven by hand here
def test_the_loss_term_is_the_share_weighted_sum() -> None:
    model = _two_layer_model("gradient")
    layers = msq_layers(model)
    reg = LSBRegularizer(layers)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    uniform = [layer.pop_regularization() for layer in layers.values()]
    model(x).sum().backward()
    reg.weights = {"0": 0.25, "2": 1.0}
    got = reg.collect(2.0)
    want = 2.0 * (0.25 * uniform[0] + uniform[1])
    torch.testing.assert_close(got, want.float())
    assert got.requires_grad


def test_the_proximal_step_moves_each_layer_by_its_share() -> None:
    moved = {}
    for share in (0.0, 0.5, 1.0):
        model = _two_layer_model("proximal")
        layers = msq_layers(model)
        before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        reg = LSBRegularizer(layers)
        reg.weights = {"0": share, "2": 1.0}
        reg.proximal_step(0.05)
        moved[share] = {n: (layers[n].weight.detach() - before[n]).abs().sum().item() for n in layers}
    assert moved[0.0]["0"] == 0.0, "a zero share does not move the layer"
    assert 0 < moved[0.5]["0"] < moved[1.0]["0"], moved
    assert moved[0.0]["2"] == moved[0.5]["2"] == moved[1.0]["2"] > 0, "the other layer's full pull is unchanged"


@pytest.mark.filterwarnings("ignore:msq_hf. Sequential has MSQ layers")
def test_the_gradient_joining_after_clipping_is_share_weighted() -> None:
    model = _two_layer_model("gradient")
    layers = msq_layers(model)
    want = {n: layer.regularizer_gradient().clone() for n, layer in layers.items()}
    for layer in layers.values():
        layer.weight.grad = torch.ones_like(layer.weight)
    reg = LSBRegularizer(layers)
    reg.weights = {"0": 0.0, "2": 1.0}
    reg.add_gradients(3.0)
    torch.testing.assert_close(layers["0"].weight.grad, torch.ones_like(layers["0"].weight))  # share 0: untouched
    torch.testing.assert_close(layers["2"].weight.grad, 1 + 3.0 * want["2"])
    assert want["2"].abs().sum() > 0, "the pulled layer has an LSB gradient to add"
