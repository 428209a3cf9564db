"""Table-driven conversion suite over tiny offline timm and transformers models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, TINY_MODELS, forward_logits, is_hf_model
from torch import nn

from msq_hf import MSQConfig, bit_scheme, compression_ratio, layer_numels, quantize_model, set_bit_scheme
from msq_hf.convert import find_convertible_layers, pattern_matches
from msq_hf.nn.layers import MSQConv2d, MSQLayerMixin, MSQLinear

timm = pytest.importorskip("timm")


def _expected_convertible(model: nn.Module) -> list[str]:
    """Names of exactly-typed Linear/Conv2d (+ timm Linear / Conv2dSame), outside nn.MultiheadAttention."""
    from timm.layers import Linear as TimmLinear
    from timm.layers.conv2d_same import Conv2dSame

    in_mha = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            in_mha.update(f"{name}.{sub}" for sub, _ in mod.named_modules() if sub)
    ok = (nn.Linear, nn.Conv2d, TimmLinear, Conv2dSame)
    return [n for n, m in model.named_modules() if type(m) in ok and n not in in_mha]


def _unzero_norms(model: nn.Module) -> None:
    """Zero-initialised norm gains (timm ``zero_init_last``) block gradients to the conv before them."""
    with torch.no_grad():
        for mod in model.modules():
            norm = isinstance(mod, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
            if norm and getattr(mod, "weight", None) is not None and not mod.weight.any():
                mod.weight.fill_(1.0)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_convert_table(name: str, images: torch.Tensor) -> None:
    model = TINY_MODELS[name]()
    _unzero_norms(model)
    expected = _expected_convertible(model)
    assert expected, f"{name}: the tiny model has no layer to convert"
    float_types = {n: type(model.get_submodule(n)) for n in expected}
    model.eval()
    with torch.no_grad():
        ref = forward_logits(model, images)

    quantize_model(model, MSQConfig(init_bits=8))

    # every Linear/Conv2d was converted, to the matching MSQ type, parameters shared
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MSQLayerMixin)}
    assert sorted(layers) == sorted(expected)
    for n, layer in layers.items():
        want = MSQLinear if issubclass(float_types[n], nn.Linear) else MSQConv2d
        assert isinstance(layer, want), n
        assert layer.n_bits == 8 and layer.n_k == 0
    leftovers = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert leftovers == [n for n in leftovers if n not in expected]

    # 8-bit outputs stay close to float
    with torch.no_grad():
        out = forward_logits(model, images)
    rel = (out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert rel < 5e-2, f"{name}: 8-bit relative max error {rel:.3g}"
    assert ref.abs().max() > 1e-9, f"{name}: degenerate (underflowing) float logits"
    assert rel > 1e-5, f"{name}: outputs identical to float -- weights are not being quantized"

    # bookkeeping: bits in the state dict, scheme and compression ratio
    sd = model.state_dict()
    for n in layers:
        assert int(sd[f"{n}.bits"]) == 8 and f"{n}.k" in sd
    assert bit_scheme(model) == {n: 8 for n in layers}
    assert compression_ratio(model) == pytest.approx(4.0)
    assert layer_numels(model) == {n: m.weight.numel() for n, m in layers.items()}

    # one training step (with the regularizer active) reaches EVERY quantized weight
    for layer in layers.values():
        layer.set_bits(8, k=1)
    model.train()
    logits = forward_logits(model, images)
    loss = F.cross_entropy(logits, torch.arange(images.shape[0]) % NUM_CLASSES)
    regs = [layer.pop_regularization() for layer in layers.values()]
    assert all(r is not None for r in regs)
    (loss + 1e-6 * torch.stack(regs).sum()).backward()
    no_grad = [n for n, m in layers.items() if m.weight.grad is None or not m.weight.grad.any()]
    assert not no_grad, f"{name}: quantized weights without gradient: {no_grad}"

    if is_hf_model(model):
        assert model.is_quantized and model.quantization_method == "msq"
        assert model.config.quantization_config.quant_method == "msq"


def test_mixed_bits_compression_ratio() -> None:
    model = TINY_MODELS["hf/resnet"]()
    quantize_model(model, init_bits=8)
    numels = layer_numels(model)
    names = sorted(numels)
    scheme = {n: (2 if i % 2 else 5) for i, n in enumerate(names)}
    set_bit_scheme(model, scheme)
    assert bit_scheme(model) == scheme
    total = sum(numels.values())
    assert compression_ratio(model) == pytest.approx(32 * total / sum(numels[n] * scheme[n] for n in names))
    assert compression_ratio(model, count_sign_bit=True) == pytest.approx(
        32 * total / sum(numels[n] * (scheme[n] + 1) for n in names)
    )
    with pytest.raises(KeyError, match="not.a.layer"):
        set_bit_scheme(model, {"not.a.layer": 3})
    with pytest.raises(ValueError, match="bits"):
        set_bit_scheme(model, {names[0]: 9})


def test_bit_scheme_in_config_sets_initial_bits() -> None:
    model = TINY_MODELS["hf/vit"]()
    quantize_model(model, MSQConfig(init_bits=6, bit_scheme={"classifier": 3}))
    scheme = bit_scheme(model)
    assert scheme["classifier"] == 3 and all(b == 6 for n, b in scheme.items() if n != "classifier")


# -- exclusions ---------------------------------------------------------------------------------


def test_pattern_matching_rules() -> None:
    assert pattern_matches("classifier", "classifier")
    assert pattern_matches("classifier", "head.classifier")
    assert not pattern_matches("classifier", "classifier2")
    assert pattern_matches("attn.*", "blocks.0.attn.qkv")
    assert pattern_matches("blocks.*.mlp.fc1", "blocks.3.mlp.fc1")
    assert pattern_matches("re:.*\\.fc[12]", "blocks.3.mlp.fc1")
    assert not pattern_matches("re:fc1", "blocks.3.mlp.fc1")  # full match on the whole name


@pytest.mark.parametrize(
    "patterns, excluded",
    [
        (["head"], {"head"}),  # exact name
        (["fc1"], {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}),  # dotted suffix
        (["blocks.*.attn.*"], {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"}),
        (
            ["re:blocks\\.1\\..*", "patch_embed.proj"],
            {"blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "patch_embed.proj"},
        ),
    ],
)
def test_exclusion_patterns(patterns: list[str], excluded: set[str]) -> None:
    model = timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES, img_size=32, depth=2)
    everything = set(_expected_convertible(model))
    assert excluded <= everything
    quantize_model(model, MSQConfig(modules_to_not_convert=patterns))
    assert set(bit_scheme(model)) == everything - excluded
    for n in excluded:
        assert type(model.get_submodule(n)) in (nn.Linear, nn.Conv2d)


def test_pattern_matching_nothing_is_an_error() -> None:
    model = TINY_MODELS["hf/vit"]()
    with pytest.raises(ValueError, match="clasifier"):
        quantize_model(model, MSQConfig(modules_to_not_convert=["classifier", "clasifier"]))
    assert not any(isinstance(m, MSQLayerMixin) for m in model.modules())  # nothing half-converted
    with pytest.raises(ValueError, match="re:nothing.*"):
        find_convertible_layers(model, ["re:nothing.*"])


def test_no_convertible_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match="no nn.Linear/nn.Conv2d"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="no nn.Linear/nn.Conv2d"):
        quantize_model(nn.Sequential(nn.Linear(3, 3)), modules_to_not_convert=["0"])


def test_converting_twice_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    quantize_model(model)
    with pytest.raises(ValueError, match="already MSQ-quantized"):
        quantize_model(model)


def test_multihead_attention_internals_stay_float() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    model = Block()
    out_proj_type = type(model.attn.out_proj)
    quantize_model(model)
    assert type(model.attn.out_proj) is out_proj_type
    assert not isinstance(model.attn.out_proj, MSQLayerMixin)
    assert list(bit_scheme(model)) == ["fc"]
    x = torch.randn(2, 5, 8)
    model(x).sum().backward()
    assert model.attn.in_proj_weight.grad is not None and model.fc.weight.grad.any()


def test_unsupported_subclass_is_left_float_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    class ScaledLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # a custom forward that reads the weight
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledLinear(4, 4), nn.Linear(4, 2))
    with caplog.at_level("WARNING"):
        quantize_model(model)
    assert type(model[0]) is ScaledLinear and isinstance(model[1], MSQLinear)
    assert "unsupported" in caplog.text and "0" in caplog.text


def test_shared_module_is_swapped_everywhere() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_model(model, init_bits=3)
    assert model[0] is model[2] and isinstance(model[0], MSQLinear)


def test_quantize_model_rejects_non_config() -> None:
    with pytest.raises(TypeError, match="MSQConfig"):
        quantize_model(nn.Linear(2, 2), config={"init_bits": 4})  # type: ignore[arg-type]


# -- the replacement registry -------------------------------------------------------------------------


def _registry_table() -> list[tuple[str, str, type, dict]]:
    """(kind, source, expected type, factory options) for every registered (kind, source type) pair."""
    from timm.layers import Conv2dSame
    from timm.layers import Linear as TimmLinear

    from msq_hf.baselines import bsq, csq, dorefa
    from msq_hf.nn.packed import MSQPackedConv2d, MSQPackedLinear

    linears, convs = (
        {"nn.Linear": nn.Linear, "timm.Linear": TimmLinear},
        {"nn.Conv2d": nn.Conv2d, "Conv2dSame": Conv2dSame},
    )
    targets = {
        "msq": (MSQLinear, MSQConv2d, {"bits": 4}),
        "packed": (MSQPackedLinear, MSQPackedConv2d, {"bits": 4, "layer_name": "a"}),
        "bsq": (bsq.BSQLayer, bsq.BSQLayer, {"bits": 4}),
        "csq": (csq.CSQLayer, csq.CSQLayer, {"bits": 4, "target_bits": 2.0}),
        "dorefa": (dorefa.DoReFaLayer, dorefa.DoReFaLayer, {"bits": 4}),
    }
    rows = []
    for kind, (lin, conv, options) in targets.items():
        rows += [(kind, src, lin, options) for src in linears] + [(kind, src, conv, options) for src in convs]
    rows += [("float", src, nn.Linear, {}) for src in ("MSQLinear", "MSQPackedLinear")]
    rows += [("float", src, nn.Conv2d, {}) for src in ("MSQConv2d", "MSQPackedConv2d")]
    rows += [("float", "MSQConv2d(same)", Conv2dSame, {}), ("float", "MSQPackedConv2d(same)", Conv2dSame, {})]
    return rows


def _make_source(source: str) -> nn.Module:
    from timm.layers import Conv2dSame
    from timm.layers import Linear as TimmLinear

    from msq_hf.nn.packed import MSQPackedConv2d, MSQPackedLinear

    same = source.endswith("(same)")
    makers = {
        "nn.Linear": lambda: nn.Linear(6, 5),
        "timm.Linear": lambda: TimmLinear(6, 5),
        "nn.Conv2d": lambda: nn.Conv2d(3, 4, 3, padding=1),
        "Conv2dSame": lambda: Conv2dSame(3, 4, 3, stride=2),
        "MSQLinear": lambda: MSQLinear(6, 5, bits=3),
        "MSQConv2d": lambda: MSQConv2d.from_float(Conv2dSame(3, 4, 3, stride=2) if same else nn.Conv2d(3, 4, 3), 3),
        "MSQPackedLinear": lambda: MSQPackedLinear.from_float(nn.Linear(6, 5), 3),
        "MSQPackedConv2d": lambda: MSQPackedConv2d.from_float(
            Conv2dSame(3, 4, 3, stride=2) if same else nn.Conv2d(3, 4, 3), 3
        ),
    }
    layer = makers[source.removesuffix("(same)")]()
    if hasattr(layer, "refresh"):
        layer.refresh()  # decode the (all-default) packed buffers, as loading does
    return layer


@pytest.mark.parametrize("kind, source, expected, options", _registry_table())
def test_registry_swaps_every_registered_type_in_every_parent(kind, source, expected, options) -> None:
    """Each registered (kind, source type) builds the expected class, in every parent, keeping mode and geometry."""
    from msq_hf.convert import layer_factory, replace_modules

    layer = _make_source(source).eval()
    model = nn.Module()
    model.a = layer
    model.b = nn.Sequential(nn.Identity(), layer)  # the same layer registered under a second parent
    assert layer_factory(kind, layer) is not None
    swapped = replace_modules(model, kind, {"a": options})
    assert type(model.a) is expected and model.b[1] is model.a is swapped["a"]
    assert not model.a.training  # the mode of the replaced layer
    if kind == "packed":
        return  # an empty skeleton until an export's tensors are loaded into it
    x = torch.randn(2, 6) if "Linear" in source else torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        out, ref = model.a(x), layer(x)
    assert out.shape == ref.shape
    if kind == "float":
        assert torch.equal(out, ref)  # the float twin computes exactly what the quantized layer computed


def test_registry_moves_the_new_layer_to_the_old_layers_device() -> None:
    """Built on the meta device (how transformers instantiates models), every new buffer stays there."""
    from msq_hf.convert import replace_modules
    from msq_hf.nn.act import LSQActQuantizer

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    replace_modules(model, "msq", {"1": {"bits": 4, "act_quantizer": LSQActQuantizer(8)}})
    assert {t.device.type for t in model[1].state_dict().values()} == {"meta"}
    replace_modules(model, "packed", {"0": {"bits": 4, "layer_name": "0"}})
    assert {t.device.type for t in model[0].state_dict().values()} == {"meta"}


def test_registry_refuses_unregistered_types_before_swapping_anything() -> None:
    from msq_hf.convert import replace_modules

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"'msq'.*'1' \(LayerNorm\)"):
        replace_modules(model, "msq", {"0": {"bits": 4}, "1": {"bits": 4}})
    assert type(model[0]) is nn.Linear  # nothing half-swapped
    with pytest.raises(KeyError, match="no replacement kind 'nope'"):
        replace_modules(model, "nope", {"0": {}})
