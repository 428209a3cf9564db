"""BSQ, CSQ and DoReFa/PACT baselines (msq_hf/baselines): the key equations of each method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msq_hf.baselines import PACT, bsq, csq, dorefa, trainable_parameters
from msq_hf.baselines.common import split_bits
from msq_hf.quant import functional as QF

METHODS = {"bsq": bsq, "csq": csq, "dorefa": dorefa}


def reference_quantized(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed integer codes, dequantized weight) of the BSQ/CSQ N-bit sign-magnitude quantizer."""
    s = weight.abs().max()
    levels = 2**bits - 1
    codes = torch.sign(weight) * torch.round(weight.abs() * levels / s)
    return codes, codes / levels * s


def one_layer(module: nn.Module) -> nn.Sequential:
    return nn.Sequential(module)


# ------------------------------------------------------------------------------------------------
# BSQ


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize(
    "make",
    [lambda: nn.Linear(7, 5), lambda: nn.Conv2d(6, 4, 3, groups=2, bias=False), lambda: nn.Conv2d(4, 4, 3, groups=4)],
)
def test_bsq_ini2bit_reconstructs_the_quantized_weight_exactly(bits, make) -> None:
    model = one_layer(make())
    w = model[0].weight.detach().clone()
    bsq.convert(model, init_bits=bits)
    layer = model[0]
    assert isinstance(layer, bsq.BSQLayer) and layer.n_bits == bits
    assert layer.pweight.shape == (*w.shape, bits)
    p, n = layer.pweight.detach(), layer.nweight.detach()
    assert set(p.unique().tolist()) <= {0.0, 1.0} and set(n.unique().tolist()) <= {0.0, 1.0}
    assert not bool(((p > 0) & (n > 0)).any())  # a weight is either positive or negative
    codes, wq = reference_quantized(w, bits)
    assert float(layer.scale.detach()) == float(w.abs().max())
    assert torch.equal(torch.round(layer.latent().detach() * (2**bits - 1)), codes)
    torch.testing.assert_close(layer.quantized_weight().detach(), wq, rtol=0, atol=1e-7)


def test_bsq_bit_gradient_is_g_times_exponent() -> None:
    model = one_layer(nn.Linear(6, 4))
    bsq.convert(model, init_bits=5)
    layer = model[0]
    with torch.no_grad():  # relaxed (non-binary) bits inside [0, 2], as during training
        layer.pweight.add_(torch.rand_like(layer.pweight) * 0.3)
        layer.nweight.add_(torch.rand_like(layer.nweight) * 0.3)
    upstream = torch.randn(4, 6)
    (layer.quantized_weight() * upstream).sum().backward()
    g = upstream * layer.scale.detach()  # dL/dw for the normalized latent weight w
    for b in range(5):
        expected = g * 2 ** (5 - 1 - b) / (2**5 - 1)
        torch.testing.assert_close(layer.pweight.grad[..., b], expected)
        torch.testing.assert_close(layer.nweight.grad[..., b], -expected)
    w = layer.latent().detach()
    torch.testing.assert_close(layer.scale.grad, (upstream * bsq.bit_quantize(w, 5)).sum())


def test_bsq_group_lasso_matches_hand_computation() -> None:
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Conv2d(1, 2, 2, bias=False))
    bsq.convert(model, init_bits=2)
    lin, conv = model[0], model[1]
    with torch.no_grad():
        lin.pweight.copy_(torch.tensor([[[1.0, 0.0], [0.5, 2.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0], [1.5, 0.0]]]))
        lin.nweight.zero_()
        lin.nweight[0, 2, 1] = 1.0
        conv.pweight.fill_(0.5)
        conv.nweight.zero_()
    # layer 1 (6 weights): plane 0 sum sq = 1 + 0.25 + 2.25 = 3.5, plane 1 = 4 + 1 + 1 = 6
    bgl_lin = math.sqrt(3.5 + 1e-8) + math.sqrt(6.0 + 1e-8)
    # layer 2 (8 weights): each plane 8 * 0.25 = 2
    bgl_conv = 2 * math.sqrt(2.0 + 1e-8)
    tp = 6 + 8
    expected = (2 * 6 / tp) * bgl_lin + (2 * 8 / tp) * bgl_conv
    assert float(bsq.regularization(model).detach()) == pytest.approx(expected, rel=1e-6)


def _set_codes(layer: bsq.BSQLayer, codes: torch.Tensor) -> None:
    with torch.no_grad():
        layer.pweight.copy_(split_bits(codes.clamp_min(0), layer.n_bits))
        layer.nweight.copy_(split_bits((-codes).clamp_min(0), layer.n_bits))


def test_bsq_requantize_drops_empty_msb_and_lsb_planes_keeping_values() -> None:
    model = one_layer(nn.Linear(8, 6))
    bsq.convert(model, init_bits=4)
    layer = model[0]
    codes = torch.randint(0, 4, (6, 8)) * 2 * (torch.randint(0, 2, (6, 8)) * 2 - 1)  # even, |code| <= 6
    codes[0, :3] = torch.tensor([6, -2, 4])  # planes 1 and 2 are used, plane 0 (MSB) and 3 (LSB) empty
    _set_codes(layer, codes)
    with torch.no_grad():
        layer.scale.fill_(0.7)
    before = layer.quantized_weight().detach().clone()
    assert layer.plane_density()[0] == 0 and layer.plane_density()[3] == 0
    assert bsq.requantize_and_adjust(model) == {"0": 2}
    assert layer.pweight.shape == (6, 8, 2)
    # LSB drop doubles the scale, then the exponent table change rescales by (2^2-1)/(2^4-1)
    assert float(layer.scale.detach()) == pytest.approx(0.7 * 2 * 3 / 15, rel=1e-6)
    torch.testing.assert_close(layer.quantized_weight().detach(), before, rtol=1e-6, atol=1e-7)
    assert bsq.bit_scheme(model) == {"0": 2}


def test_bsq_requantize_grows_a_bit_on_overflow_and_rebinarizes() -> None:
    model = one_layer(nn.Linear(4, 3))
    bsq.convert(model, init_bits=3)
    layer = model[0]
    _set_codes(layer, torch.tensor([[7, 1, -3, 0], [5, 4, -7, 2], [1, 1, 1, 1]]))
    with torch.no_grad():
        layer.pweight[0, 0, 0] = 1.75  # relaxed MSB: w = (1.75*4 + 2 + 1)/7 = 10/7 > 1
        layer.pweight[1, 1, 2] = 0.4  # relaxed LSB: rounds back to 4
    w = layer.latent().detach()
    expected = float(layer.scale.detach()) * torch.sign(w) * torch.round(w.abs() * 7) / 7
    scheme = bsq.requantize_and_adjust(model, max_bits=8)
    assert scheme == {"0": 4}  # 10 > 7 needs a fourth bit; no plane is empty
    assert set(layer.pweight.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(layer.quantized_weight().detach(), expected, rtol=1e-6, atol=1e-7)
    # at the cap the code saturates instead
    model2 = one_layer(nn.Linear(4, 3))
    bsq.convert(model2, init_bits=3)
    with torch.no_grad():
        model2[0].pweight[0, 0, :] = 2.0
    assert bsq.requantize_and_adjust(model2, max_bits=3)["0"] == 3


def test_bsq_threshold_drops_sparse_lsb_plane() -> None:
    model = one_layer(nn.Linear(10, 10))
    bsq.convert(model, init_bits=3)
    codes = torch.randint(0, 4, (10, 10)) * 2
    codes[0, 0], codes[0, 1] = 7, 6  # LSB density 1 % (< 2 %), MSB used
    _set_codes(model[0], codes)
    assert bsq.requantize_and_adjust(model, threshold=0.02) == {"0": 2}
    assert bsq.requantize_and_adjust(model, threshold=0.0) == {"0": 2}


def test_bsq_stale_optimizer_fails_loudly_after_shape_change() -> None:
    model = one_layer(nn.Linear(8, 6))
    bsq.convert(model, init_bits=4)
    _set_codes(model[0], torch.randint(-3, 4, (6, 8)) * 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    bsq.requantize_and_adjust(model)
    assert model[0].n_bits < 4
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(RuntimeError):
        opt.step()


def test_bsq_clamp_bits_clips_to_zero_two() -> None:
    model = one_layer(nn.Linear(3, 3))
    bsq.convert(model, init_bits=2)
    with torch.no_grad():
        model[0].pweight.fill_(3.0)
        model[0].nweight.fill_(-1.0)
    bsq.clamp_bits_(model)
    assert float(model[0].pweight.detach().max()) == 2.0 and float(model[0].nweight.detach().min()) == 0.0


# ------------------------------------------------------------------------------------------------
# CSQ


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_csq_large_temperature_with_masks_on_reproduces_quantized_weight(bits) -> None:
    model = one_layer(nn.Conv2d(3, 4, 3, groups=1))
    w = model[0].weight.detach().clone()
    csq.convert(model, init_bits=bits)
    layer = model[0]
    with torch.no_grad():
        layer.mask_weight.fill_(1.0)
    csq.set_temperature(model, 1e4)
    _, wq = reference_quantized(w, bits)
    torch.testing.assert_close(layer.quantized_weight().detach(), wq, rtol=0, atol=1e-6)
    csq.finalize_masks(model)  # hard masks 1[m > 0]: all on, same weight
    torch.testing.assert_close(layer.quantized_weight().detach(), wq, rtol=0, atol=1e-6)
    assert csq.bit_scheme(model) == {"0": bits}


def test_csq_official_code_init_gives_half_the_weight() -> None:
    model = one_layer(nn.Linear(5, 3))
    w = model[0].weight.detach().clone()
    csq.convert(model, init_bits=4, bit_init="code")
    with torch.no_grad():
        model[0].mask_weight.fill_(1.0)
    csq.set_temperature(model, 1e4)
    _, wq = reference_quantized(w, 4)  # sigmoid(beta * 0) = 0.5 for a 0 digit
    torch.testing.assert_close(model[0].quantized_weight().detach(), wq / 2, rtol=0, atol=1e-6)


def test_csq_forward_is_differentiable_in_bits_masks_and_scale() -> None:
    model = one_layer(nn.Linear(5, 3))
    csq.convert(model, init_bits=3)
    csq.set_temperature(model, 2.0)
    layer = model[0]
    beta = 2.0
    gates = torch.sigmoid(beta * layer.mask_weight.detach())
    soft = torch.sigmoid(beta * layer.pweight.detach()) - torch.sigmoid(beta * layer.nweight.detach())
    exps = torch.tensor([4.0, 2.0, 1.0]) / 7
    expected = layer.scale.detach() * (soft * gates * exps).sum(-1)
    torch.testing.assert_close(layer.quantized_weight().detach(), expected)
    model(torch.randn(2, 5)).sum().backward()
    for p in (layer.pweight, layer.nweight, layer.mask_weight, layer.scale):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_csq_hard_masks_select_bits() -> None:
    model = one_layer(nn.Linear(4, 4))
    csq.convert(model, init_bits=4)
    with torch.no_grad():
        model[0].mask_weight.copy_(torch.tensor([2.0, -1.0, 0.5, -0.1]))
    scheme = csq.finalize_masks(model)
    assert scheme == {"0": 2}
    assert model[0].gates().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert csq.compression_ratio(model) == pytest.approx(16.0)


def test_csq_budget_regularizer_sign_flips_under_budget() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    csq.convert(model, init_bits=8, target_bits=2)
    csq.set_temperature(model, 3.0)
    layers = [model[0], model[1]]

    def reg_and_grad(fill: float) -> tuple[float, float, float]:
        for m in layers:
            with torch.no_grad():
                m.mask_weight.fill_(fill)
            m.mask_weight.grad = None
        r = csq.regularization(model)
        r.backward()
        return float(r.detach()), float(layers[0].mask_weight.grad[0]), csq.mask_ratio(model)

    value, grad, ratio = reg_and_grad(0.5)  # every mask on: r = 1 > T/N = 0.25, prune
    gate = torch.sigmoid(torch.tensor(1.5))
    assert ratio == 1.0
    assert value == pytest.approx((1 - 0.25) * 16 * float(gate), rel=1e-6)
    assert grad > 0  # gradient descent lowers the masks
    value, grad, ratio = reg_and_grad(-0.5)  # every mask off: r = 0 < 0.25, grow
    assert ratio == 0.0
    assert value < 0 and grad < 0
    assert value == pytest.approx((0 - 0.25) * 16 * float(torch.sigmoid(torch.tensor(-1.5))), rel=1e-6)
    # the target is an option too: T = N means "never over budget" for all-on masks
    reg_and_grad(0.5)
    assert float(csq.regularization(model, target_bits=8).detach()) == pytest.approx(0.0, abs=1e-6)


def test_csq_temperature_schedule() -> None:
    assert csq.temperature_schedule(0, ticket_epoch=10) == 1.0
    assert csq.temperature_schedule(10, ticket_epoch=10) == pytest.approx(200.0)
    assert csq.temperature_schedule(5, 10, final_temp=100.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="ticket_epoch"):
        csq.temperature_schedule(1, ticket_epoch=0)


# ------------------------------------------------------------------------------------------------
# trainable parameters, compression


@pytest.mark.parametrize("name", ["bsq", "csq"])
def test_bit_level_methods_need_2n_variables_per_weight(name) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    float_params = trainable_parameters(model)
    weights = 8 * 3 * 9 + 10 * 8 * 30 * 30
    others = float_params - weights  # biases and BN stay float and trainable
    METHODS[name].convert(model, init_bits=8)
    per_layer = 1 + (8 if name == "csq" else 0)  # scale (+ CSQ's 8 mask logits)
    assert trainable_parameters(model) == 2 * 8 * weights + 2 * per_layer + others
    assert trainable_parameters(model) >= 8 * float_params


def test_compression_ratios() -> None:
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 30))  # 100 and 300 weights
    bsq.convert(model, init_bits=4)
    assert bsq.compression_ratio(model) == pytest.approx(8.0)
    _set_codes(model[1], torch.randint(-1, 2, (30, 10)))  # only the LSB plane used: 1 bit after pruning
    assert bsq.requantize_and_adjust(model)["1"] == 1
    assert bsq.compression_ratio(model) == pytest.approx(32 * 400 / (100 * 4 + 300 * 1))
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 30))
    dorefa.convert(model, bits=2)
    assert dorefa.compression_ratio(model) == pytest.approx(16.0)
    assert float(dorefa.regularization(model)) == 0.0


# ------------------------------------------------------------------------------------------------
# DoReFa + PACT


def test_dorefa_uses_the_functional_quantizer(monkeypatch) -> None:
    model = one_layer(nn.Linear(6, 3))
    dorefa.convert(model, bits=3)
    x = torch.randn(4, 6)
    layer = model[0]
    expected = F.linear(x, QF.dorefa_quantize(layer.weight, 3), layer.bias)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    calls = []

    def spy(weight: torch.Tensor, bits: int) -> torch.Tensor:
        calls.append(bits)
        return QF.dorefa_quantize(weight, bits)

    monkeypatch.setattr(dorefa, "dorefa_quantize", spy)
    model(x)
    assert calls == [3]
    # the straight-through round: gradient flows to the latent float weight
    model(x).sum().backward()
    assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_alpha_gradient(signed) -> None:
    pact = PACT(bits=3, init_alpha=1.0)
    x = torch.randn(200) * 1.5
    if not signed:  # post-ReLU input: non-negative, with exact zeros
        x = torch.relu(x)
    g = torch.randn(200)
    x.requires_grad_(True)
    y = pact(x)
    (y * g).sum().backward()
    xd = x.detach()
    expected_alpha = (g * (xd >= 1.0)).sum()
    if signed:
        expected_alpha = expected_alpha - (g * (xd <= -1.0)).sum()
        inside = (xd >= -1.0) & (xd <= 1.0)
        levels = 3
    else:
        inside = (xd >= 0.0) & (xd <= 1.0)
        levels = 7
    assert bool(pact.signed) == signed
    torch.testing.assert_close(pact.alpha.grad, expected_alpha)
    torch.testing.assert_close(x.grad, g * inside.float())
    codes = y.detach() * levels
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)  # on the uniform grid
    assert float(y.detach().max()) <= 1.0 and float(y.detach().min()) >= (-1.0 if signed else 0.0)


def test_dorefa_act_bits_adds_pact_except_first_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    dorefa.convert(model, bits=4, act_bits=2)
    assert model[0].act_quant is None
    assert isinstance(model[2].act_quant, PACT) and isinstance(model[4].act_quant, PACT)
    model(torch.randn(3, 4)).sum().backward()
    assert model[2].act_quant.alpha.grad is not None
    with pytest.raises(ValueError, match="act_bits"):
        dorefa.convert(nn.Sequential(nn.Linear(2, 2)), bits=4, act_bits=1)


# ------------------------------------------------------------------------------------------------
# conversion on real models


def test_convert_errors_are_clear() -> None:
    for name, module in METHODS.items():
        with pytest.raises(ValueError, match=f"{name}.convert.*no nn.Linear/nn.Conv2d"):
            module.convert(nn.Sequential(nn.ReLU()))
        with pytest.raises(ValueError, match=f"no {name} layers"):
            module.bit_scheme(nn.Sequential(nn.Linear(2, 2)))
    model = bsq.convert(nn.Sequential(nn.Linear(2, 2)), init_bits=4)
    with pytest.raises(ValueError, match="already holds baseline"):
        csq.convert(model)
    with pytest.raises(ValueError, match="init_bits"):
        bsq.convert(nn.Sequential(nn.Linear(2, 2)), init_bits=9)
    with pytest.raises(ValueError, match="bits"):
        dorefa.convert(nn.Sequential(nn.Linear(2, 2)), bits=16)


@pytest.mark.parametrize(
    "key", ["timm/test_resnet", "timm/test_efficientnet_same", "timm/conv2d_same", "timm/test_vit", "hf/vit"]
)
def test_float_dorefa_reproduces_layer_geometry(key, tiny_model_factories, images) -> None:
    """``bits=32`` makes DoReFa the identity: any geometry mistake (groups, padding, SAME) shows up."""
    from conftest import forward_logits

    model = tiny_model_factories[key]().eval()
    with torch.no_grad():
        expected = forward_logits(model, images)
    dorefa.convert(model, bits=32)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, images), expected, rtol=1e-5, atol=1e-5)


def test_conv_padding_modes_and_groups() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2, bias=True)
    x = torch.randn(2, 4, 7, 7)
    for module in (bsq, csq):
        model = one_layer(conv)
        module.convert(model, init_bits=6)
        layer = model[0]
        expected = conv._conv_forward(x, layer.quantized_weight(), conv.bias)
        torch.testing.assert_close(model(x), expected)
        assert layer.bias is conv.bias  # float bias shared, not copied


@pytest.mark.parametrize("method", ["bsq", "csq", "dorefa"])
@pytest.mark.parametrize("key", ["timm/test_resnet", "timm/test_vit", "timm/test_efficientnet"])
def test_tiny_timm_model_trains_with_every_method(method, key, tiny_model_factories, images) -> None:
    import timm.layers

    model = tiny_model_factories[key]()
    n_float_layers = sum(1 for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d, timm.layers.Linear))
    module = METHODS[method]
    if method == "dorefa":
        module.convert(model, bits=2, act_bits=4)
    else:
        module.convert(model, init_bits=4)
    assert len(module.bit_scheme(model)) == n_float_layers
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    if method == "csq":
        csq.set_temperature(model, csq.temperature_schedule(3, ticket_epoch=10))
    model.train()
    labels = torch.tensor([1, 7])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(images), labels) + 1e-3 * module.regularization(model)
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        opt.step()
        if method == "bsq":
            bsq.clamp_bits_(model)
    if method == "bsq":
        scheme = bsq.requantize_and_adjust(model)
        assert all(1 <= b <= 8 for b in scheme.values())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    if method == "csq":
        csq.finalize_masks(model)
        F.cross_entropy(model(images), labels).backward()
    ratio = module.compression_ratio(model)
    if method == "dorefa":
        assert ratio == pytest.approx(16.0)
    elif method == "bsq":
        assert ratio >= 32 / 8
    else:
        assert ratio >= 32 / 4  # CSQ only ever switches bits off


@pytest.mark.parametrize("method", ["bsq", "csq", "dorefa"])
@pytest.mark.parametrize("key", ["hf/vit", "hf/timm_wrapper", "timm/test_efficientnet_same"])
def test_hf_and_same_pad_models_run_forward_backward(method, key, tiny_model_factories, images) -> None:
    from conftest import forward_logits

    model = tiny_model_factories[key]()
    METHODS[method].convert(model, init_bits=3)
    loss = forward_logits(model, images).logsumexp(-1).mean() + METHODS[method].regularization(model)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert min(METHODS[method].bit_scheme(model).values()) == 3


def test_bsq_precision_change_mid_training_keeps_backward_working() -> None:
    """A plane-count change while an earlier step's graph is still referenced (the usual
    ``logits`` variable of a training loop) must not break the next backward."""
    import timm

    torch.manual_seed(0)
    model = bsq.convert(timm.create_model("test_resnet", pretrained=False, num_classes=4), 8)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(x)
    (torch.nn.functional.cross_entropy(logits, y) + bsq.regularization(model)).backward()
    opt.step()
    before = bsq.bit_scheme(model)
    bsq.requantize_and_adjust(model, threshold=0.9)  # drops planes: parameters change shape
    assert bsq.bit_scheme(model) != before
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(x)
    (torch.nn.functional.cross_entropy(logits, y) + bsq.regularization(model)).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
