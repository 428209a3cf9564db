"""Packed inference: a loaded export keeps its weights packed, decodes them in forward, bit for bit.

Table-driven over the tiny model families of tests/conftest.py: quantize at every width 1..8, export, load,
and compare logits with ``torch.equal`` -- without a decode cache, with every layer cached, with a small LRU
and with ``dequantize=True``. Loading must not materialise a float weight for any packed layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, TINY_MODELS, forward_logits
from torch import nn

import msq_hf
from msq_hf.convert import iter_msq_layers
from msq_hf.io.export import export
from msq_hf.io.load import from_pretrained
from msq_hf.nn.decode_cache import DecodeCache, make_decode_cache
from msq_hf.nn.packed import MSQPackedLinear, MSQPackedMixin, set_decode_cache
from msq_hf.quant import packing

# every family msq_hf.export takes; "timm/conv2d_same" is a bare nn.Sequential (no timm/HF model to rebuild)
FAMILIES = sorted(set(TINY_MODELS) - {"timm/conv2d_same"})


def _images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _export_family(name: str, root: Path, wnorm: str = "signmag") -> tuple[Path, torch.Tensor, int]:
    """Quantize family ``name`` with every width somewhere, export it; returns (folder, logits, float bytes
    of the tensors that are not quantized weights)."""
    torch.manual_seed(0)
    model = TINY_MODELS[name]().eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4, wnorm=wnorm))
    with torch.no_grad():
        for i, (_, layer) in enumerate(iter_msq_layers(model)):
            layer.bits.fill_(1 + (3 * i) % 8)
        logits = forward_logits(model, _images())
    quantized = {id(layer.weight) for _, layer in iter_msq_layers(model)}
    extra = {id(t) for _, layer in iter_msq_layers(model) for t in (layer.bits, layer.k)}
    other = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in quantized | extra]
    export(model, root / name.replace("/", "_"))
    return root / name.replace("/", "_"), logits, _tensor_bytes(other)


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_inference_is_bit_exact_and_holds_no_float_weights(name: str, tmp_path: Path) -> None:
    directory, ref, other_bytes = _export_family(name, tmp_path)
    model = from_pretrained(directory)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MSQPackedMixin)}
    assert layers
    # no float tensor of a quantized weight's size survives the load, in any packed layer
    packed_bytes = 0
    for lname, layer in layers.items():
        numel = math.prod(layer.expected_shape)
        own = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
        big = [tuple(t.shape) for t in own if t.is_floating_point() and t.numel() >= numel]
        assert not big, f"{name}: layer {lname} holds float tensor(s) {big} of its weight's size"
        packed_bytes += _tensor_bytes(layer.buffers(recurse=False))
    # the whole model: packed bytes + the float tensors that were never quantized, nothing more
    assert _tensor_bytes([*model.parameters(), *model.buffers()]) <= packed_bytes + other_bytes
    x = _images()
    packing.release_scratch()
    with torch.no_grad():
        assert torch.equal(forward_logits(model, x), ref)
    # the decode workspace is one layer's weight (float) plus its codes, not the model's
    largest = max(math.prod(m.expected_shape) for m in layers.values())
    assert packing.scratch_nbytes() <= 4 * largest + 3 * 8 * (largest + 64) + 4096
    decoded = sum(math.prod(m.expected_shape) * 4 for m in layers.values())
    for option in ("all", decoded // 2):
        cache = set_decode_cache(model, option)
        for _ in range(2):  # the second pass reads what the first one kept
            with torch.no_grad():
                assert torch.equal(forward_logits(model, x), ref), option
        assert cache is not None and cache.hits >= len(cache.entries) > 0  # ViT also reads .weight.dtype
        assert len(cache.entries) == len(layers) if option == "all" else 0 < cache.nbytes <= decoded // 2
    set_decode_cache(model, None)
    with torch.no_grad():
        assert torch.equal(forward_logits(model, x), ref)


@pytest.mark.parametrize("name", ["hf/vit", "timm/test_resnet"])
def test_cache_option_and_dequantize_at_load(name: str, tmp_path: Path) -> None:
    directory, ref, _ = _export_family(name, tmp_path, wnorm="dorefa")
    x = _images()
    for kwargs in ({"decode_cache": "all"}, {"decode_cache": 1 << 20}, {"dequantize": True}):
        model = from_pretrained(directory, **kwargs)
        with torch.no_grad():
            assert torch.equal(forward_logits(model, x), ref), kwargs
    with pytest.raises(ValueError, match="decode_cache must be None, 'all' or a number of bytes"):
        from_pretrained(directory, decode_cache="some")


def test_training_forward_gets_its_own_weight() -> None:
    """When autograd saves the weight for backward it must not be the shared workspace (the next layer
    would overwrite it): gradients equal those of the dequantized float layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=3))
    from msq_hf.io.format import packed_state_dict

    state, _ = packed_state_dict(model)
    packed = nn.Sequential(
        MSQPackedLinear(8, 16, bits=3, layer_name="0"), MSQPackedLinear(16, 4, bits=3, layer_name="1")
    )
    packed.load_state_dict(state)
    plain = nn.Sequential(packed[0].to_float(), packed[1].to_float())
    x = torch.randn(5, 8, requires_grad=True)
    packed(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    plain(x).square().sum().backward()
    assert torch.equal(grad, x.grad)


def test_dtype_follows_the_model() -> None:
    layer = MSQPackedLinear(4, 3, bits=2, layer_name="fc")
    layer.refresh()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype is torch.bfloat16
    assert layer(torch.randn(2, 4, dtype=torch.bfloat16)).dtype is torch.bfloat16


def test_bounded_cache_keeps_what_fits() -> None:
    cache = DecodeCache(max_bytes=3 * 16)
    for key in range(4):
        cache.put(key, torch.zeros(4))  # the fourth does not fit: nothing is evicted for it
    assert list(cache.entries) == [0, 1, 2] and cache.nbytes == 48
    for _ in range(2):  # a cyclic scan (a forward pass) hits the kept layers every time; an LRU never would
        for key in range(4):
            if cache.get(key) is None:
                cache.put(key, torch.zeros(4))
    assert cache.hits == 6 and cache.misses == 2
    cache.discard(0)
    assert cache.put(3, torch.zeros(4)) and cache.nbytes == 48
    assert make_decode_cache(None) is None and make_decode_cache("all").max_bytes is None
    for bad in (-1, True, "lots", 1.5):
        with pytest.raises(ValueError, match="decode_cache must be"):
            make_decode_cache(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("width", range(1, 10))
@pytest.mark.parametrize("numel", [1, 63, 64, 1000, 4099])
def test_unpack_into_float_out_and_scratch_reuse(width: int, numel: int) -> None:
    gen = torch.Generator().manual_seed(width * 7 + numel)
    codes = torch.randint(0, 1 << width, (numel,), generator=gen)
    packed = packing.pack_codes(codes, width)
    out = torch.empty(numel, dtype=torch.float32)
    assert packing.unpack_codes(packed, width, numel, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, codes.float())
    before = packing.scratch_nbytes()
    packing.unpack_codes(packed, width, numel, out=out)  # same size again: no new scratch memory
    assert packing.scratch_nbytes() == before
    with pytest.raises(ValueError, match=f"out must hold {numel} elements"):
        packing.unpack_codes(packed, width, numel, out=torch.empty(numel + 1))
