"""``MSQWeightOp``: the one-node quantizer + op path the MSQ layers train with where ``recompute_weight`` selects it.

It must give exactly the numbers of the two-node path (``msq_quantize_weight`` then ``F.linear``/``F.conv2d``,
``recompute_weight = False``; the default ``"auto"`` picks per layer): outputs, the LSB term and every gradient bit
for bit, for conv and linear layers, with activation quantizers on and off, in both LSB phases (regularizing,
k > 0, with R in the loss; QAT, k = 0, R popped but not in the loss). And it must keep no float weight-sized tensor
for the backward other than the latent ``Parameter`` itself (only the int8 LSB sign), which is why it exists.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conftest import IMAGE_SIZE, NUM_CLASSES, TINY_MODELS, is_hf_model
from timm.layers import Conv2dSame
from torch import nn

import msq_hf
from msq_hf.convert import iter_msq_layers
from msq_hf.nn.act import make_act_quantizer
from msq_hf.nn.layers import MSQConv2d, MSQLayerMixin, MSQLinear
from msq_hf.nn.quantizer import MSQWeightOp
from msq_hf.quant.kernels import KERNELS

LAMBDA = 0.37


@pytest.fixture(autouse=True)
def _one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers built in these tests train through the op node unless a test turns it off."""
    monkeypatch.setattr(MSQLayerMixin, "recompute_weight", True)


@pytest.fixture(scope="module")
def compiled_kernels() -> Iterator[bool]:
    """The compiled kernels for this module, even if an earlier test left the process on the eager fallback
    (e.g. after dynamo's recompile limit); the previous kernel state is put back afterwards."""
    saved = dict(vars(KERNELS))
    if KERNELS.state != "compiled":
        torch._dynamo.reset()
        KERNELS._state = None
    yield KERNELS._ready()
    vars(KERNELS).update(saved)


@pytest.fixture(params=["eager", "compiled"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, compiled_kernels: bool) -> str:
    """Both kernel implementations (the compiled one adds the regularizer gradient in place)."""
    if request.param == "eager":
        monkeypatch.setattr(KERNELS, "_state", "eager")
    elif not compiled_kernels or KERNELS.state != "compiled":
        pytest.skip("torch.compile is unavailable here")
    return request.param


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (``torch.equal`` would let -0.0 stand for +0.0)."""
    return t.detach().contiguous().view(torch.int32)


def _assert_same(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is not None:
        assert a.shape == b.shape and a.dtype == b.dtype, what
        assert torch.equal(_bits(a), _bits(b)), f"{what} differs (max |diff| {(a - b).abs().max().item():.3g})"


def _run(layer: nn.Module, x: torch.Tensor, regularize: bool) -> dict[str, torch.Tensor | None]:
    """One training step's output, LSB term and gradients (of the parameters and of the input)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = layer(x)
    reg = layer.pop_regularization()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out * g).sum()
    if regularize:
        loss = loss + LAMBDA * reg
    loss.backward()
    got = {"out": out, "reg": reg, "x.grad": x.grad}
    got.update({f"{n}.grad": p.grad for n, p in layer.named_parameters()})
    return got


def _compare(layer: nn.Module, x: torch.Tensor, k: int, uses_op: bool = True) -> None:
    """The layer with ``recompute_weight`` on and off gives identical steps (and the op node ran iff expected)."""
    layer.set_bits(6, k)
    layer.train()
    two_node = copy.deepcopy(layer)
    two_node.recompute_weight = False
    seen: list[str] = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(type(o.grad_fn).__name__))
    got, ref = _run(layer, x, k > 0), _run(two_node, x, k > 0)
    hook.remove()
    assert (seen == ["MSQWeightOpBackward"]) == uses_op, seen
    assert set(got) == set(ref)
    for name in ref:
        _assert_same(got[name], ref[name], name)
    if k > 0:  # a real check: the regularizer gradient is in there
        assert got["reg"].item() > 0


def _input(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _linear(bias: bool, act: bool, seed: int = 0) -> MSQLinear:
    torch.manual_seed(seed)
    act_q = make_act_quantizer("lsq", 4, linear=True) if act else None
    return MSQLinear(24, 10, bias=bias, bits=8, act_quantizer=act_q)


def _conv(act: bool, **geometry) -> MSQConv2d:
    torch.manual_seed(0)
    act_q = make_act_quantizer("pact", 4, linear=False) if act else None
    return MSQConv2d(8, 12, geometry.pop("kernel_size", 3), bits=8, act_quantizer=act_q, **geometry)


@pytest.mark.parametrize("k", [1, 0], ids=["regularize", "qat"])
@pytest.mark.parametrize("act", [False, True], ids=["float-in", "act-quant"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(16, 24), (4, 9, 24), (2, 3, 5, 24)], ids=["2d", "3d", "4d"])
def test_linear_matches_two_node_path(kernels, k, act, bias, shape) -> None:
    _compare(_linear(bias, act), _input(*shape), k)


@pytest.mark.parametrize("k", [1, 0], ids=["regularize", "qat"])
def test_linear_strided_inputs(kernels, k) -> None:
    tokens = _input(4, 9, 24)
    _compare(_linear(True, False), tokens[:, 0], k)  # a class token: 2-D, rows strided
    _compare(_linear(True, False), _input(24, 16).t(), k)  # column-major 2-D: autograd's other mm branch
    # a non-contiguous 3-D input takes F.linear's matmul path: the layer keeps the two-node path for it
    _compare(_linear(True, False), _input(9, 4, 24).transpose(0, 1), k, uses_op=False)


CONVS = {
    "plain": {"padding": 1},
    "no-bias-stride2": {"padding": 1, "stride": 2, "bias": False},
    "depthwise": {"padding": 1, "groups": 4},
    "dilated": {"padding": 2, "dilation": 2},
    "1x1": {"kernel_size": 1},
    "reflect": {"padding": 1, "padding_mode": "reflect"},
    "5x5-asym": {"kernel_size": (5, 3), "padding": (2, 1), "stride": (2, 1)},
}


@pytest.mark.parametrize("k", [1, 0], ids=["regularize", "qat"])
@pytest.mark.parametrize("act", [False, True], ids=["float-in", "act-quant"])
@pytest.mark.parametrize("geometry", list(CONVS), ids=list(CONVS))
def test_conv_matches_two_node_path(kernels, k, act, geometry) -> None:
    _compare(_conv(act, **CONVS[geometry]), _input(3, 8, 10, 10), k)


def test_conv_same_padding_variants(kernels) -> None:
    torch.manual_seed(0)
    timm_same = MSQConv2d.from_float(Conv2dSame(8, 12, 3, stride=2), bits=8)
    _compare(timm_same, _input(2, 8, 9, 9), 1)  # padded in Python first, then the op node
    # padding="same" runs another aten overload: the two-node path
    _compare(_conv(False, padding="same"), _input(2, 8, 9, 9), 1, uses_op=False)


def test_channels_last_and_input_without_grad(kernels) -> None:
    x = _input(3, 8, 10, 10).detach().to(memory_format=torch.channels_last)
    _compare(_conv(False, padding=1), x, 1)  # first layer: no input gradient at all
    frozen = _linear(True, False)
    frozen.weight.requires_grad_(False)
    _compare(frozen, _input(16, 24), 1)  # frozen weight: only the input and bias gradients


@pytest.mark.parametrize("units", ["scale", "step", "code", "value"])
@pytest.mark.parametrize("form, reduction", [("continuous", "sum"), ("discrete", "mean")])
def test_every_regularizer_variant(monkeypatch: pytest.MonkeyPatch, units, form, reduction) -> None:
    # eager kernels: the compiled ones specialize on these constants, and eight variants in one process would hit
    # dynamo's recompile limit (a run uses one variant; the compiled kernels are checked in tests/quant)
    monkeypatch.setattr(KERNELS, "_state", "eager")
    layer = _conv(False, padding=1)
    layer.lsb_units, layer.lsb_form, layer.reg_reduction = units, form, reduction
    _compare(layer, _input(2, 8, 6, 6), 2)


def _saved(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    (out.sum() + layer.pop_regularization()).backward()
    return saved


@pytest.mark.parametrize("make", [lambda: _linear(True, False), lambda: _conv(False, padding=1)], ids=["fc", "conv"])
def test_no_quantized_weight_is_kept_for_the_backward(kernels, make) -> None:
    layer = make().train()
    layer.set_bits(6, 1)
    x = _input(2, 8, 6, 6) if isinstance(layer, MSQConv2d) else _input(16, 24)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def new_bytes(saved: list[torch.Tensor]) -> int:  # what the backward keeps beyond tensors alive anyway
        return sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in params)

    saved = _saved(layer, x)
    # the input, the latent Parameter itself (not a copy), the bias, the int8 LSB sign, and four 0-d tensors (the
    # precision bits/k, the scale, the regularizer coefficient)
    assert sum(t.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr() for t in saved) == 1
    assert new_bytes(saved) == x.numel() * 4 + layer.weight.numel() + 4 * 4
    # the two-node path also keeps a float W_q (4 bytes per weight), not the three 0-d bits/k/scale
    layer.recompute_weight = False
    assert new_bytes(_saved(layer, x)) - new_bytes(saved) == layer.weight.numel() * 4 - 3 * 4


def test_training_double_backward_matches_two_node_path(kernels) -> None:
    # (the compiled regularizer-gradient kernel detaches: there the weight gradient is not differentiable on either
    # path; the eager one keeps it differentiable)
    for layer in (_linear(True, True), _conv(True, padding=1)):
        layer.set_bits(6, 1)
        two_node = copy.deepcopy(layer)
        two_node.recompute_weight = False
        x = _input(2, 8, 6, 6) if isinstance(layer, MSQConv2d) else _input(16, 24)
        results = []
        for m in (layer, two_node):
            m.train()
            xi = x.detach().clone().requires_grad_(True)
            loss = (m(xi) ** 2).sum() + LAMBDA * m.pop_regularization()
            params = [xi, *m.parameters()]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            live = [g.requires_grad for g in grads]
            hv = torch.autograd.grad(
                [g for g in grads if g.requires_grad],
                params,
                [torch.ones_like(g) for g in grads if g.requires_grad],
                allow_unused=True,
            )
            results.append((grads, live, hv))
        (g_new, live_new, h_new), (g_old, live_old, h_old) = results
        assert live_new == live_old
        for a, b in zip(g_new, g_old):
            _assert_same(a, b, "gradient")
        for a, b in zip(h_new, h_old):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert any(h is not None and h.abs().sum() > 0 for h in h_new)
        if kernels == "eager":
            assert all(live_new)


def test_backward_uses_the_precision_of_the_forward(kernels) -> None:
    layer = _conv(False, padding=1)
    layer.set_bits(6, 1)
    two_node = copy.deepcopy(layer)
    two_node.recompute_weight = False
    x = _input(2, 8, 6, 6)
    grads = []
    for m in (layer, two_node):
        m.train()
        out = m(x.detach())
        reg = m.pop_regularization()
        m.set_bits(3, 2)  # the controller prunes between forward and backward: the backward still uses 6 bits
        ((out**2).sum() + reg).backward()
        grads.append(m.weight.grad)
    _assert_same(grads[0], grads[1], "weight.grad")


def test_weight_changed_in_place_before_backward_is_refused() -> None:
    # like any float layer (which saves its weight too), not silently the gradient of another weight
    layer = _linear(True, False).train()
    layer.set_bits(6, 1)
    out = layer(_input(4, 24))
    with torch.no_grad():
        layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_op_node_only_in_training_with_grad() -> None:
    layer = _conv(False, padding=1)
    x = _input(2, 8, 6, 6)
    layer.train()
    assert isinstance(layer(x).grad_fn, MSQWeightOp._backward_cls)
    with torch.no_grad():
        assert layer(x).grad_fn is None and layer.pop_regularization() is None
    layer.eval()
    assert type(layer(x).grad_fn).__name__ == "ConvolutionBackward0"  # eval: the STE path for Hessian passes
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(layer(x).grad_fn).__name__ == "ConvolutionBackward0"  # autocast keeps the two-node path


def test_auto_uses_the_op_node_where_the_weight_outweighs_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    # "auto" (the default): the one-node path only where W_q would dominate the layer's saved memory
    monkeypatch.setattr(MSQLayerMixin, "recompute_weight", "auto")
    assert MSQConv2d.recompute_weight == "auto" and MSQLinear(4, 4, bits=8).recompute_weight == "auto"
    layer = MSQConv2d(8, 16, 3, padding=1, bits=8).train()  # 1,152 weights
    small, large = _input(1, 8, 3, 3), _input(2, 8, 6, 6)  # 72 and 576 input elements: op node
    assert isinstance(layer(small).grad_fn, MSQWeightOp._backward_cls)
    assert isinstance(layer(large).grad_fn, MSQWeightOp._backward_cls)
    assert isinstance(layer(_input(4, 8, 6, 6)).grad_fn, MSQWeightOp._backward_cls)  # 1,152: a tie takes the node
    assert type(layer(_input(5, 8, 6, 6)).grad_fn).__name__ == "ConvolutionBackward0"  # 1,440 > 1,152: two nodes
    layer.recompute_weight = "always"
    with pytest.raises(ValueError, match="recompute_weight='always'"):
        layer(small)
    fc = MSQLinear(24, 10, bits=8).train()  # 240 weights
    assert isinstance(fc(_input(10, 24)).grad_fn, MSQWeightOp._backward_cls)  # 240 input elements
    assert type(fc(_input(11, 24)).grad_fn).__name__ != "MSQWeightOpBackward"


@pytest.mark.parametrize("one_node", [True, False], ids=["one-node", "two-node"])
@pytest.mark.parametrize("k", [0, 1], ids=["qat", "regularize"])
def test_training_step_runs_the_fused_kernels(monkeypatch: pytest.MonkeyPatch, one_node: bool, k: int) -> None:
    # In both phases (after the final round every k is 0) the training step goes through the fused kernels, never
    # the eager multi-op fake quantizer: one fused forward per layer; on the one-node path the backward rebuilds W_q
    # from the saved scale (no second fused forward) and adds the regularizer gradient only where R is in the loss.
    entries = ("forward", "op_forward", "requantize", "backward", "fake_quantize")
    calls = dict.fromkeys(entries, 0)
    for name in entries:
        original = getattr(KERNELS, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(KERNELS, name, counted)
    monkeypatch.setattr(MSQLayerMixin, "recompute_weight", one_node)
    model = nn.Sequential(_conv(False, padding=1), nn.Flatten(), MSQLinear(12 * 36, 5, bits=8)).train()
    layers = (model[0], model[2])
    for layer in layers:
        layer.set_bits(4, k)
    out = model(_input(2, 8, 6, 6))
    forward = {"op_forward": 2} if one_node else {"forward": 2}
    assert {n: c for n, c in calls.items() if c} == forward
    reg = torch.stack([layer.pop_regularization() for layer in layers]).sum()
    assert (reg.item() == 0) == (k == 0)
    loss = F.cross_entropy(out, torch.tensor([0, 1]))
    (loss + reg if k else loss).backward()  # the QAT phase pops the terms but leaves them out of the loss
    # the regularizer-gradient pass runs only where R reached the loss, on either path
    backward = ({"requantize": 2} if one_node else {}) | ({"backward": 2} if k else {})
    assert {n: c for n, c in calls.items() if c} == forward | backward


# -- whole models: torch.compile fullgraph and no host reads on the one-node path -------------------------------


def _tiny_model_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    inner = getattr(model, "_orig_mod", model)
    for p in inner.parameters():
        p.grad = None
    logits = model(pixel_values=x).logits if is_hf_model(inner) else model(x)
    layers = [layer for _, layer in iter_msq_layers(inner)]
    reg = torch.stack([layer.pop_regularization() for layer in layers]).sum()
    (F.cross_entropy(logits, y) + 1e-3 * reg).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["hf/vit", "timm/test_resnet"])
def test_one_node_model_compiles_fullgraph_and_equals_eager(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(KERNELS, "_state", "eager")  # the reference numbers (aot_eager runs the same aten kernels)
    torch._dynamo.reset()
    eager = TINY_MODELS[name]()
    msq_hf.quantize_model(eager, msq_hf.MSQConfig(init_bits=8, act_bits=4))
    for i, (_, layer) in enumerate(iter_msq_layers(eager)):
        layer.set_bits(8 - i % 5, min(i % 3, 7 - i % 5))  # regularized and k = 0 layers
    eager.train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the first batch initialises the activation quantizers
        x, y = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)
        ref_logits, ref_grads = _tiny_model_step(eager, x, y)
        logits, grads = _tiny_model_step(compiled, x, y)
        assert torch.equal(logits, ref_logits)
        assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], v) for k, v in ref_grads.items())
    # and the eager one-node step reads nothing on the host
    for method in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, **k: pytest.fail("host read in the training step"))
    _tiny_model_step(eager, x, y)
