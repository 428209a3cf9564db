"""Training-checkpoint (fake-quant format, ``save_pretrained(msq_format="fake")``) round trips and Trainer acceptance.

``save_pretrained`` without ``msq_format`` writes the packed export: tests/integrations/test_save_push.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS
from transformers import AutoConfig, AutoModelForImageClassification, Trainer, TrainingArguments

import msq_hf
from msq_hf import MSQConfig, MSQLinear, bit_scheme, quantize_model, set_bit_scheme
from msq_hf.nn.layers import MSQLayerMixin

CASES = [("hf/vit", "eager"), ("hf/vit", "sdpa"), ("hf/resnet", None)]


def _build(name: str, attn: str | None):
    model = TINY_MODELS[name]()
    if attn is not None:
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn
    return model


def _msq_state(model) -> dict[str, tuple[int, int]]:
    return {n: (m.n_bits, m.n_k) for n, m in model.named_modules() if isinstance(m, MSQLayerMixin)}


@pytest.mark.parametrize("name, attn", CASES)
def test_fake_format_round_trip(name: str, attn: str | None, tmp_path: Path, images: torch.Tensor) -> None:
    model = _build(name, attn)
    quantize_model(model, MSQConfig(init_bits=8))
    names = sorted(bit_scheme(model))
    changed = {names[0]: 3, names[-1]: 5, names[len(names) // 2]: 1}
    set_bit_scheme(model, changed)
    model.get_submodule(names[1]).set_bits(8, k=2)
    expected = _msq_state(model)
    assert expected[names[0]] == (3, 0) and expected[names[1]] == (8, 2)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=images).logits

    model.save_pretrained(tmp_path, msq_format="fake")
    saved = json.loads((tmp_path / "config.json").read_text())
    qc = saved["quantization_config"]
    assert qc["quant_method"] == "msq" and qc["msq_format"] == "fake"
    assert qc["bit_scheme"] == {n: b for n, (b, _) in expected.items()}

    kwargs = {"attn_implementation": attn} if attn else {}
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, **kwargs)
    assert type(loaded) is type(model)
    assert _msq_state(loaded) == expected
    assert loaded.is_quantized and isinstance(loaded.hf_quantizer, msq_hf.MSQQuantizer)
    for n, layer in loaded.named_modules():
        if isinstance(layer, MSQLayerMixin):
            assert torch.equal(layer.weight, model.get_submodule(n).weight), n
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=images).logits, logits)

    # saving the reloaded model again is stable
    loaded.save_pretrained(tmp_path / "again", msq_format="fake")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["bit_scheme"] == qc["bit_scheme"]


@pytest.mark.parametrize("name", ["hf/vit", "hf/resnet"])
def test_float_checkpoint_quantized_on_load(name: str, tmp_path: Path, images: torch.Tensor) -> None:
    model = TINY_MODELS[name]()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, quantization_config=MSQConfig(init_bits=6))
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, MSQLayerMixin)}
    assert layers and all((m.n_bits, m.n_k) == (6, 0) for m in layers.values())
    float_params = dict(model.named_parameters())
    for n, layer in layers.items():
        assert torch.equal(layer.weight, float_params[f"{n}.weight"]), n
    assert loaded.config.quantization_config.init_bits == 6
    # the quantized model computes with 6-bit weights (differs from float, but not wildly)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        ref = model(pixel_values=images).logits
        out = loaded(pixel_values=images).logits
    assert not torch.equal(out, ref)
    # and it round-trips through its own save
    loaded.save_pretrained(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert set(qc["bit_scheme"].values()) == {6}


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_user_config_is_ignored_for_msq_checkpoint(tmp_path: Path) -> None:
    """transformers keeps the checkpoint's quantization_config (documented pitfall 4)."""
    model = TINY_MODELS["hf/vit"]()
    quantize_model(model, init_bits=4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, quantization_config=MSQConfig(init_bits=7))
    assert set(bit_scheme(loaded).values()) == {4}
    assert AutoConfig.from_pretrained(tmp_path).quantization_config["init_bits"] == 4


def test_bit_scheme_naming_unknown_layer_fails_loudly(tmp_path: Path) -> None:
    model = TINY_MODELS["hf/vit"]()
    quantize_model(model)
    model.save_pretrained(tmp_path, msq_format="fake")
    cfg_path = tmp_path / "config.json"
    data = json.loads(cfg_path.read_text())
    data["quantization_config"]["bit_scheme"]["vit.no_such_layer"] = 4
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no_such_layer"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_checkpoint_bits_disagreeing_with_bit_scheme_fail_loudly(tmp_path: Path) -> None:
    model = TINY_MODELS["hf/resnet"]()
    quantize_model(model, init_bits=8)
    model.save_pretrained(tmp_path, msq_format="fake")
    cfg_path = tmp_path / "config.json"
    data = json.loads(cfg_path.read_text())
    layer = sorted(data["quantization_config"]["bit_scheme"])[0]
    data["quantization_config"]["bit_scheme"][layer] = 3  # the safetensors file still stores bits=8
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(layer)):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_trainer_accepts_quantized_model(tmp_path: Path) -> None:
    model = TINY_MODELS["hf/vit"]()
    quantize_model(model, init_bits=8)
    assert isinstance(model.classifier, MSQLinear)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args)  # runs validate_quantization_for_training
    assert trainer.model is model
    # a float model pretending to be quantized by a non-QAT method is refused (the check is real)
    float_model = TINY_MODELS["hf/vit"]()
    quantize_model(float_model)
    float_model.hf_quantizer.__class__ = type("NoQAT", (msq_hf.MSQQuantizer,), {"is_qat_trainable": False})
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=float_model, args=args)


def test_dequantize_gives_plain_layers_with_the_same_outputs(images: torch.Tensor) -> None:
    model = TINY_MODELS["hf/vit"]()
    quantize_model(model, init_bits=3)
    model.eval()
    with torch.no_grad():
        ref = model(pixel_values=images).logits
    model.dequantize()  # transformers API -> MSQQuantizer._dequantize
    assert not any(isinstance(m, MSQLayerMixin) for m in model.modules())
    assert type(model.classifier) is torch.nn.Linear
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).logits, ref, rtol=0, atol=1e-6)
