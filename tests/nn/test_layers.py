"""MSQ layers: the fused quantizer + regularizer, layer wrapping, buffers, codes, activation quantizers."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msq_hf.nn.act import LSQActQuantizer, PACTActQuantizer, make_act_quantizer
from msq_hf.nn.layers import MSQConv2d, MSQLinear, msq_quantize_weight
from msq_hf.quant import functional as QF
from msq_hf.quant.kernels import KERNELS

VARIANTS = list(
    itertools.product([True, False], ["scale", "step", "code", "value"], [True, False])
)  # continuous, units, mean


def _weight(shape=(6, 5), seed=0) -> torch.Tensor:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    flat = w.view(-1)
    flat[:4] = torch.tensor([0.0, 1 / 16, -3 / 16, 0.5]) * flat.abs().max()  # grid points and a zero
    return w.requires_grad_(True)


def _reference(w: torch.Tensor, n: int, k: int, continuous: bool, units: str, mean: bool):
    return QF.lsb_l1(
        w,
        n,
        k,
        form="continuous" if continuous else "discrete",
        units=units,
        reduction="mean" if mean else "sum",
    )


# -- fused quantizer + regularizer ------------------------------------------------------------------


@pytest.mark.parametrize("continuous, units, mean", VARIANTS)
@pytest.mark.parametrize("n, k", [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 7)])
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
def test_fused_regularizer_matches_autograd_reference(n, k, continuous, units, mean, shape) -> None:
    w = _weight(shape)
    g = torch.randn(shape)
    wq, reg = msq_quantize_weight(w, n, k, continuous=continuous, units=units, mean=mean)
    ref_reg = _reference(w, n, k, continuous, units, mean)
    torch.testing.assert_close(reg, ref_reg, rtol=1e-5, atol=1e-6)
    assert torch.equal(wq, QF.fake_quantize_signmag(w.detach(), n, QF.max_abs_scale(w)))

    lam = 0.37
    ((wq * g).sum() + lam * reg).backward()
    (ref_grad,) = torch.autograd.grad(lam * ref_reg, w)
    torch.testing.assert_close(w.grad, g + ref_grad, rtol=1e-5, atol=1e-6)
    # the regularizer gradient is not identically zero (a real check of Eq. 7)
    assert ref_grad.abs().max() > 0


@pytest.mark.parametrize("continuous, units, mean", VARIANTS[:6])
def test_regularizer_gradient_scales_with_its_loss_weight(continuous, units, mean) -> None:
    """Whatever multiplies R in the loss (lambda, 1/GA) multiplies dR/dW."""
    g = torch.randn(6, 5) * 1e-6  # a small task gradient: (w.grad - g) then keeps the regularizer's digits
    grads = {}
    for factor in (1.0, 0.25, 1e-3 / 4):  # lambda = 1, 1/GA with GA = 4, lambda/GA
        w = _weight()
        wq, reg = msq_quantize_weight(w, 6, 1, continuous=continuous, units=units, mean=mean)
        ((wq * g).sum() + factor * reg).backward()
        grads[factor] = w.grad - g
    unit = grads[1.0].abs().max()
    assert unit > 0
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0], rtol=1e-4, atol=1e-4 * float(unit))
    torch.testing.assert_close(grads[1e-3 / 4], 1e-3 / 4 * grads[1.0], rtol=1e-3, atol=1e-6 * float(unit))
    assert grads[1e-3 / 4].abs().max() > 0.5 * 1e-3 / 4 * unit


def test_k_zero_gives_zero_regularizer_and_pure_ste() -> None:
    w = _weight()
    g = torch.randn(6, 5)
    wq, reg = msq_quantize_weight(w, 5, 0)
    assert reg.item() == 0.0
    ((wq * g).sum() + 3.0 * reg).backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("downstream", ["plain_sum", "shared_gradient"])
def test_fused_gradient_with_any_downstream_graph(downstream: str) -> None:
    """The W_q gradient autograd hands the quantizer may be an expanded or shared tensor.

    ``wq.sum()`` gives a stride-0 (expanded) gradient; ``wq + w`` gives the *same* gradient tensor
    to both branches, so the quantizer must not modify it in place.
    """
    w = _weight()
    ref_w = w.detach().clone().requires_grad_(True)
    wq, reg = msq_quantize_weight(w, 4, 1)
    out = wq.sum() if downstream == "plain_sum" else ((wq + w) * torch.linspace(-1, 1, 30).view(6, 5)).sum()
    (out + reg).backward()
    rq = QF.quantize_weight(ref_w, 4)
    rout = rq.sum() if downstream == "plain_sum" else ((rq + ref_w) * torch.linspace(-1, 1, 30).view(6, 5)).sum()
    (rout + QF.lsb_l1(ref_w, 4, 1, units="scale")).backward()
    torch.testing.assert_close(w.grad, ref_w.grad, atol=1e-5, rtol=1e-5)


def test_compiled_and_eager_kernels_agree() -> None:
    """Whatever kernel backend is active gives the eager numbers (forward and backward)."""
    from msq_hf.quant.kernels import as_int_tensor, fused_backward_eager, fused_forward_eager

    w = _weight((8, 4, 3, 3)).detach()
    for n, k, cont in [(8, 1, True), (3, 2, False), (2, 1, True), (5, 0, True)]:
        wq, sign, reg, coef = KERNELS.forward(w, n, k, cont, "step", False)
        ref = fused_forward_eager(w, as_int_tensor(n, w.device), as_int_tensor(k, w.device), cont, "step", False)
        assert torch.equal(wq, ref[0]) and torch.equal(sign, ref[1]) and torch.equal(coef, ref[3])
        torch.testing.assert_close(reg, ref[2])
        g = torch.randn_like(w)
        with torch.no_grad():
            got = KERNELS.backward(g.clone(), sign, torch.tensor(0.5), coef)
        torch.testing.assert_close(got, fused_backward_eager(g, sign, torch.tensor(0.5), coef))


def test_kernels_survive_many_layer_kinds() -> None:
    """Linear + several conv shapes with both LSB forms in one process (an ablation notebook, a sweep).

    Every kind must train, and the compiled kernels (when active) must stay active: the quantizer
    feeds them flat contiguous vectors, so weight rank, size-1 dims and memory format cause no
    recompiles that could hit dynamo's recompile limit.
    """
    import torch._dynamo

    torch._dynamo.reset()
    KERNELS._ready()
    state_before = KERNELS.state
    kinds = [
        lambda: MSQLinear(8, 4),
        lambda: MSQConv2d(3, 8, 3),
        lambda: MSQConv2d(8, 8, 1),
        lambda: MSQConv2d(8, 8, 3, groups=8),
        lambda: MSQConv2d(1, 4, 3),
        lambda: MSQLinear(1, 4),
        lambda: MSQConv2d(8, 1, 1),
        lambda: MSQConv2d(8, 8, 3).to(memory_format=torch.channels_last),
    ]
    error = None
    for form in ("continuous", "discrete"):
        for make in kinds:
            layer = make()
            layer.lsb_form = form
            layer.set_bits(4, k=1)
            x = (
                torch.randn(2, layer.in_features)
                if isinstance(layer, MSQLinear)
                else torch.randn(2, layer.in_channels, 6, 6)
            )
            try:
                (layer(x).square().sum() + layer.pop_regularization()).backward()
            except Exception as exc:  # noqa: BLE001
                error = exc
                break
            assert layer.weight.grad is not None and layer.weight.grad.any()
        if error is not None:
            break
    state_after = KERNELS.state
    torch._dynamo.reset()
    assert error is None, error
    if state_before == "compiled":
        assert state_after == "compiled", "the compiled kernels fell back to eager on ordinary layer shapes"


def test_no_regularizer_in_eval_or_no_grad() -> None:
    layer = MSQLinear(5, 4, bits=6)
    layer.set_bits(6, k=2)
    x = torch.randn(3, 5)
    layer.train()
    layer(x)
    reg = layer.pop_regularization()
    assert reg is not None and reg.requires_grad
    torch.testing.assert_close(reg, QF.lsb_l1(layer.weight, 6, 2, units="scale"))
    assert layer.pop_regularization() is None  # popping clears it
    layer.eval()
    layer(x)
    assert layer.pop_regularization() is None
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.pop_regularization() is None
    # k = 0 in training: a zero term (whether k is 0 is data, read on no host) with no regularizer gradient
    layer.set_bits(6, k=0)
    layer.weight.grad = None
    g = torch.randn(3, 4)
    out = layer(x)
    reg = layer.pop_regularization()
    assert reg is not None and reg.item() == 0.0
    ((out * g).sum() + 5.0 * reg).backward()
    ref_w = layer.weight.detach().clone().requires_grad_(True)
    (F.linear(x, QF.quantize_weight(ref_w, 6), layer.bias.detach()) * g).sum().backward()
    assert torch.equal(layer.weight.grad, ref_w.grad)


def test_layer_variants_are_passed_to_the_regularizer() -> None:
    layer = MSQConv2d(3, 4, 3, bits=5, lsb_form="discrete", lsb_units="value", reg_reduction="mean")
    layer.set_bits(5, k=2)
    layer(torch.randn(1, 3, 8, 8))
    torch.testing.assert_close(layer.pop_regularization(), QF.lsb_l1(layer.weight, 5, 2, "discrete", "value", "mean"))


@pytest.mark.parametrize(
    ("wnorm", "form", "units", "reduction"),
    [
        ("signmag", "continuous", "scale", "sum"),
        ("signmag", "discrete", "step", "mean"),
        ("signmag", "continuous", "code", "sum"),
        ("dorefa", "continuous", "scale", "sum"),
    ],
)
def test_regularizer_gradient_is_the_training_backwards_lsb_term(wnorm, form, units, reduction) -> None:
    # what the trainers add after gradient clipping must be exactly the pull lambda * R gives in the loss
    torch.manual_seed(0)
    layer = MSQConv2d(3, 4, 3, bits=6, wnorm=wnorm, lsb_form=form, lsb_units=units, reg_reduction=reduction)
    layer.set_bits(6, k=2)
    x = torch.randn(2, 3, 8, 8)
    layer(x).sum().backward()
    task = layer.weight.grad.clone()
    layer.weight.grad = None
    out = layer(x)
    (out.sum() + layer.pop_regularization()).backward()
    expected = layer.weight.grad - task
    assert expected.abs().max() > 0
    # (expected is a difference of two gradients ~100x larger: float32 cancellation, hence atol)
    torch.testing.assert_close(layer.regularizer_gradient(), expected, rtol=1e-3, atol=1e-5)
    layer.set_bits(6, k=0)
    assert torch.count_nonzero(layer.regularizer_gradient()) == 0


# -- wrapping float layers ------------------------------------------------------------------------------


def test_linear_from_float_shares_parameters_and_matches() -> None:
    lin = nn.Linear(7, 5)
    q = MSQLinear.from_float(lin, bits=8)
    assert q.weight is lin.weight and q.bias is lin.bias
    x = torch.randn(4, 7)
    q.eval()
    assert torch.equal(q(x), F.linear(x, q.quantized_weight(), lin.bias))
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=0.02)
    noq = MSQLinear.from_float(nn.Linear(7, 5, bias=False), bits=3)
    assert noq.bias is None and noq(x).shape == (4, 5)


CONV_CASES = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
    "no_bias_stride": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),
    "dilation": dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, padding_mode="circular"),
    "same": dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding="same", dilation=(1, 2)),
    "rect_stride": dict(in_channels=4, out_channels=6, kernel_size=(1, 3), stride=(2, 1), padding=(0, 1)),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_from_float_preserves_every_config(case: str) -> None:
    conv = nn.Conv2d(**CONV_CASES[case])
    q = MSQConv2d.from_float(conv, bits=4)
    assert q.weight is conv.weight and q.bias is conv.bias
    for attr in (
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "_reversed_padding_repeated_twice",
    ):
        assert getattr(q, attr) == getattr(conv, attr), attr
    x = torch.randn(2, 4, 11, 10)
    ref = nn.Conv2d(**CONV_CASES[case])
    with torch.no_grad():
        ref.weight.copy_(q.quantized_weight())
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    q.eval()
    assert torch.equal(q(x), ref(x))
    assert "bits=4" in repr(q)
    plain = q.to_float()
    assert type(plain) is nn.Conv2d and torch.equal(plain(x), ref(x))


def test_timm_conv2d_same_and_linear_are_converted() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import create_conv2d
    from timm.layers.conv2d_same import Conv2dSame

    from msq_hf import quantize_model

    conv = create_conv2d(3, 6, 3, stride=2, padding="same", bias=True)
    assert isinstance(conv, Conv2dSame)
    model = nn.Sequential(conv, nn.Flatten(), timm.layers.Linear(6 * 5 * 5, 4))
    x = torch.randn(2, 3, 9, 9)
    ref_conv = create_conv2d(3, 6, 3, stride=2, padding="same", bias=True)
    quantize_model(model, init_bits=5)
    assert isinstance(model[0], MSQConv2d) and model[0].same_pad
    assert isinstance(model[2], MSQLinear)
    with torch.no_grad():
        ref_conv.weight.copy_(model[0].quantized_weight())
        ref_conv.bias.copy_(model[0].bias)
    model.eval()
    assert torch.equal(model[0](x), ref_conv(x))
    back = model[0].to_float()
    assert isinstance(back, Conv2dSame) and torch.equal(back(x), ref_conv(x))


def test_bits_and_k_are_persistent_int_buffers() -> None:
    q = MSQLinear.from_float(nn.Linear(3, 2), bits=7)
    q.set_bits(5, k=2)
    sd = q.state_dict()
    assert sd["bits"].dtype == torch.int32 and int(sd["bits"]) == 5
    assert sd["k"].dtype == torch.int32 and int(sd["k"]) == 2
    fresh = MSQLinear(3, 2, bits=8)
    fresh.load_state_dict(sd)
    assert fresh.n_bits == 5 and fresh.n_k == 2
    assert torch.equal(fresh.quantized_weight(), q.quantized_weight())


def test_set_bits_validation() -> None:
    q = MSQLinear(3, 2, bits=4)
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match="bits"):
            q.set_bits(bad)
    q.set_bits(4, k=1)
    with pytest.raises(ValueError, match="k=6"):
        q.set_bits(6, k=6)
    with pytest.raises(ValueError, match="k=-1"):
        q.set_bits(7, k=-1)
    with pytest.raises(ValueError, match="bits"):
        MSQLinear(3, 2, bits=0)
    assert (q.n_bits, q.n_k) == (4, 1)  # rejected calls leave the layer unchanged
    q.set_bits(6, k=3)
    q.set_bits(2)  # k capped to keep bits - k >= 1
    assert (q.n_bits, q.n_k) == (2, 1)


@pytest.mark.parametrize("wnorm", ["signmag", "dorefa"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_to_float_and_integer_codes_reconstruct_quantized_weight(wnorm: str, bits: int) -> None:
    q = MSQConv2d(3, 4, 3, bits=bits, wnorm=wnorm)
    wq = q.quantized_weight()
    codes, scale = q.integer_codes()
    assert codes.dtype == torch.int16
    if wnorm == "signmag":
        assert codes.abs().max() <= 2**bits - 1
        assert torch.equal(codes.float() * scale, wq)
    else:
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        assert torch.equal(2 * codes.float() * scale - 1, wq)
    assert torch.equal(q.to_float().weight, wq)
    lin = MSQLinear(5, 3, bits=bits, wnorm=wnorm)
    assert torch.equal(lin.to_float().weight, lin.quantized_weight())


def test_dorefa_layer_forward_backward() -> None:
    layer = MSQLinear(6, 4, bits=3, wnorm="dorefa")
    layer.set_bits(3, k=1)
    x = torch.randn(5, 6)
    out = layer(x)
    reg = layer.pop_regularization()
    assert reg is not None
    (out.square().sum() + 1e-2 * reg).backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().max() > 0
    # forward uses the DoReFa-affine grid 2 v_n(u) - 1
    assert torch.equal(layer.quantized_weight(), QF.quantize_weight(layer.weight, 3, "dorefa").detach())


def test_quantized_weight_ste_carries_identity_gradient() -> None:
    q = MSQLinear(4, 3, bits=3)
    g = torch.randn(3, 4)
    (q.quantized_weight_ste() * g).sum().backward()
    assert torch.equal(q.weight.grad, g)


# -- activation quantizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pact", "lsq"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_activation_quantizers(kind: str, bits: int, signed: bool) -> None:
    quant = make_act_quantizer(kind, bits)
    assert isinstance(quant, PACTActQuantizer if kind == "pact" else LSQActQuantizer)
    x = torch.randn(64, 33) * 3
    if not signed:
        x = x.relu()
    if kind == "pact":  # some inputs beyond the clip level (init 10): PACT's alpha gradient flows through them
        x[0, :3] = torch.tensor([12.0, 15.0, -12.0 if signed else 11.0])
    x.requires_grad_(True)
    y = quant(x)
    assert torch.unique(y.detach()).numel() <= 2**bits
    assert torch.unique(y.detach()).numel() >= min(2**bits, 4) - 1  # not collapsed
    assert int(quant.signed) == int(signed)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    param = quant.alpha if kind == "pact" else quant.step
    assert param.grad is not None and param.grad.abs() > 0


def test_activation_quantizer_validation() -> None:
    for cls in (PACTActQuantizer, LSQActQuantizer):
        for bad in (1, 9):
            with pytest.raises(ValueError, match="act_bits"):
                cls(bad)
    with pytest.raises(ValueError, match="act_quantizer"):
        make_act_quantizer("minmax", 4)


def test_one_activation_quantizer_for_msq_and_the_baselines() -> None:
    """The baselines' PACT is the MSQ layers' PACT (paper gradient: tests/test_baselines.py), and the
    state-dict keys of both quantizers are those existing checkpoints and exports hold."""
    from msq_hf.baselines import PACT

    assert PACT is PACTActQuantizer
    assert isinstance(make_act_quantizer("auto", 4, linear=False), PACTActQuantizer)
    assert isinstance(make_act_quantizer("auto", 8, linear=True), LSQActQuantizer)
    assert set(PACTActQuantizer(4).state_dict()) == {"alpha", "signed"}
    assert set(LSQActQuantizer(8).state_dict()) == {"step", "signed"}


def test_layer_with_activation_quantizer() -> None:
    lin = MSQLinear.from_float(nn.Linear(8, 3), bits=4, act_quantizer=LSQActQuantizer(4))
    x = torch.randn(5, 8, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.act_quant.step.grad is not None


def test_layer_backward_uses_the_in_place_kernel_and_stays_exact(monkeypatch) -> None:
    """Inside a layer W_q feeds only its own conv, so the compiled backward may write into the fresh
    weight gradient; the result must equal the autograd reference either way."""
    KERNELS._ready()
    calls = {"inplace": 0}
    if KERNELS.state == "compiled":
        original = KERNELS._bwd_inplace

        def counting(*args):
            calls["inplace"] += 1
            return original(*args)

        monkeypatch.setattr(KERNELS, "_bwd_inplace", counting)
    torch.manual_seed(0)
    layer = MSQConv2d(4, 6, 3, padding=1)
    layer.set_bits(5, k=2)
    ref_w = layer.weight.detach().clone().requires_grad_(True)
    x = torch.randn(2, 4, 5, 5)
    (layer(x).square().sum() + layer.pop_regularization()).backward()
    ref = F.conv2d(x, QF.quantize_weight(ref_w, 5), layer.bias.detach(), padding=1)
    (ref.square().sum() + QF.lsb_l1(ref_w, 5, 2, units="scale")).backward()
    torch.testing.assert_close(layer.weight.grad, ref_w.grad, atol=1e-4, rtol=1e-5)
    if KERNELS.state == "compiled":
        assert calls["inplace"] == 1
