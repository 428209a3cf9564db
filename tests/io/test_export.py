"""Bit-packed export -> verify -> reload round trips (HF, TimmWrapper, raw timm), sizes, atomicity, safety."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import msq_hf
from msq_hf.commands.main import main
from msq_hf.errors import MSQExportError
from msq_hf.io.export import export
from msq_hf.io.format import MANIFEST_NAME, WEIGHTS_NAME
from msq_hf.io.inspect import format_report, inspect_export
from msq_hf.io.load import from_pretrained
from msq_hf.nn.packed import MSQPackedConv2d, MSQPackedLinear

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exports and loads must never unpickle anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def random_scheme(model: torch.nn.Module, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    scheme = {name: rng.randint(1, 8) for name in msq_hf.bit_scheme(model)}
    msq_hf.set_bit_scheme(model, scheme)
    return scheme


def hf_vit() -> torch.nn.Module:
    return ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=8,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    )


def hf_resnet() -> torch.nn.Module:
    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )


def timm_wrapper() -> torch.nn.Module:
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=4))


HF_MODELS = {"vit": (hf_vit, 16), "resnet": (hf_resnet, 32), "timm_wrapper": (timm_wrapper, 32)}
TIMM_MODELS = {"test_vit": 160, "test_resnet": 32, "test_efficientnet": 32}


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x) if hasattr(model, "config") and hasattr(model.config, "model_type") else model(x)
    return out.logits if hasattr(out, "logits") else out


def _check_packed_layers(model: torch.nn.Module, scheme: dict[str, int]) -> None:
    modules = dict(model.named_modules())
    for name, bits in scheme.items():
        layer = modules[name]
        assert isinstance(layer, (MSQPackedLinear, MSQPackedConv2d)), name
        assert layer.bits == bits and int(layer.weight_bits) == bits
        assert layer.weight_packed.dtype == torch.uint8


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_roundtrip_mixed_bits(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    build, size = HF_MODELS[name]
    model = build().eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    scheme = random_scheme(model, seed=len(name))
    assert len(set(scheme.values())) > 1
    x = torch.randn(2, 3, size, size)
    ref = _logits(model, x)

    result = export(model, tmp_path / "out")
    assert torch.equal(_logits(model, x), ref)  # exporting leaves the in-memory model untouched
    assert model.hf_quantizer.quantization_config.msq_format == "fake"
    files = set(result.files)
    assert {WEIGHTS_NAME, "config.json", MANIFEST_NAME, "README.md", "bit_scheme.png"} <= files
    assert "model.safetensors" not in files
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["msq_format"] == "packed" and qc["bit_scheme"] == scheme and qc["quant_method"] == "msq"
    with safe_open(tmp_path / "out" / WEIGHTS_NAME, framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["msq_format"] == "packed" and meta["format"] == "pt" and meta["format_version"] == "1"
    assert not any(k.endswith((".bits", ".k")) for k in keys)
    assert sum(k.endswith(".weight_packed") for k in keys) == len(scheme)

    loaded = from_pretrained(tmp_path / "out")
    _check_packed_layers(loaded, scheme)
    assert torch.equal(_logits(loaded, x), ref)
    # the reporting API reads loaded (packed) models like trained ones
    assert msq_hf.bit_scheme(loaded) == scheme
    assert msq_hf.layer_numels(loaded) == msq_hf.layer_numels(model)
    assert msq_hf.compression_ratio(loaded) == msq_hf.compression_ratio(model) == result.compression_ratio
    auto = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert type(auto) is type(model)
    assert torch.equal(_logits(auto, x), ref)
    assert not hasattr(auto.config, "transformers_weights")  # load-time redirect is not kept
    # save_pretrained of a loaded export writes the packed tensors again (model.safetensors this time)
    loaded.save_pretrained(tmp_path / "resaved")
    assert (
        json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]["msq_format"] == "packed"
    )
    assert torch.equal(_logits(AutoModelForImageClassification.from_pretrained(tmp_path / "resaved"), x), ref)

    plain = from_pretrained(tmp_path / "out", dequantize=True)
    assert not any(isinstance(m, (MSQPackedLinear, MSQPackedConv2d)) for m in plain.modules())
    assert getattr(plain, "is_quantized", False) is False
    assert torch.equal(_logits(plain, x), ref)


@pytest.mark.parametrize("arch", list(TIMM_MODELS))
def test_raw_timm_roundtrip_mixed_bits(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    scheme = random_scheme(model, seed=7 + len(arch))
    x = torch.randn(2, 3, TIMM_MODELS[arch], TIMM_MODELS[arch])
    ref = _logits(model, x)
    result = export(model, tmp_path / arch)
    config = json.loads((tmp_path / arch / "config.json").read_text())
    assert config["architecture"] == arch and config["num_classes"] == 5
    assert config["model_args"] == json.loads(json.dumps(timm.models.get_model_args(model))) | {"num_classes": 5}
    assert result.manifest["model"]["kind"] == "timm"
    if arch == "test_efficientnet":
        assert any(i["depthwise"] for i in result.manifest["layers"].values())

    loaded = from_pretrained(tmp_path / arch)
    assert type(loaded) is type(model)
    _check_packed_layers(loaded, scheme)
    assert torch.equal(_logits(loaded, x), ref)
    plain = from_pretrained(tmp_path / arch, dequantize=True)
    assert torch.equal(_logits(plain, x), ref)
    # a loaded export can be exported again with identical tensors (the safetensors header's metadata
    # order is not deterministic, so compare tensors, not file hashes)
    again = export(loaded, tmp_path / "again")
    first, second = (load_file(str(tmp_path / d / WEIGHTS_NAME)) for d in (arch, "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert again.manifest["layers"] == result.manifest["layers"]


def test_bf16_and_dorefa_and_act_quant_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    bf = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval().to(torch.bfloat16)
    msq_hf.quantize_model(bf, msq_hf.MSQConfig(init_bits=6))
    random_scheme(bf, 3)
    export(bf, tmp_path / "bf16")
    loaded = from_pretrained(tmp_path / "bf16")
    first = next(m for m in loaded.modules() if isinstance(m, MSQPackedConv2d))
    assert first.weight.dtype is torch.bfloat16 and first.weight_scale.dtype is torch.float32
    assert torch.equal(_logits(loaded, x.bfloat16()), _logits(bf, x.bfloat16()))

    dq = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    msq_hf.quantize_model(dq, msq_hf.MSQConfig(init_bits=4, wnorm="dorefa", act_bits=8))
    random_scheme(dq, 4)
    dq(x)  # fixes the activation quantizers' sign mode / LSQ step from a first batch
    result = export(dq, tmp_path / "dorefa")
    assert all(i["stored_bits"] == i["bits"] for i in result.manifest["layers"].values())
    loaded = from_pretrained(tmp_path / "dorefa")
    assert torch.equal(_logits(loaded, x), _logits(dq, x))
    with pytest.raises(ValueError, match="act_bits"):
        from_pretrained(tmp_path / "dorefa", dequantize=True)


def test_resnet18_size_on_disk(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    random_scheme(model, seed=11)
    result = export(model, tmp_path / "r18")
    weight_file = (tmp_path / "r18" / WEIGHTS_NAME).stat().st_size
    assert weight_file == result.weight_bytes
    assert weight_file <= 1.02 * (result.packed_bytes + result.unquantized_bytes)
    # the packed payload is exactly what the bit widths promise (n+1 stored bits per weight, byte-rounded)
    layers = result.manifest["layers"]
    assert result.packed_bytes == sum((i["numel"] * i["stored_bits"] + 7) // 8 for i in layers.values())
    assert result.storage_compression_ratio == pytest.approx(
        32 * sum(i["numel"] for i in layers.values()) / sum(i["numel"] * i["stored_bits"] for i in layers.values())
    )
    assert result.compression_ratio == pytest.approx(msq_hf.compression_ratio(model))

    float_dir = tmp_path / "float.safetensors"
    plain = from_pretrained(tmp_path / "r18", dequantize=True)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(float_dir))
    ratio = float_dir.stat().st_size / weight_file
    print(
        f"\nresnet18 (10 classes): float {float_dir.stat().st_size} B, packed export {weight_file} B "
        f"(packed {result.packed_bytes} + other {result.unquantized_bytes}), {ratio:.2f}x smaller; "
        f"average {result.average_bits:.2f} bits, storage ratio {result.storage_compression_ratio:.2f}x"
    )
    expected = 32 / (result.manifest["totals"]["average_stored_bits"])
    assert 0.9 * expected < ratio < expected  # dominated by the packed weights


def test_export_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
    import msq_hf.io.card as card

    def boom(*args, **kwargs):
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(card, "build_model_card", boom)
    target = tmp_path / "exp"
    with pytest.raises(RuntimeError, match="injected"):
        export(model, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind

    monkeypatch.undo()
    monkeypatch.setattr(torch, "load", boom)
    first = export(model, target)
    msq_hf.set_bit_scheme(model, {n: 2 for n in msq_hf.bit_scheme(model)})
    with pytest.raises(MSQExportError, match="not empty"):
        export(model, target)
    assert json.loads((target / MANIFEST_NAME).read_text()) == first.manifest  # untouched
    monkeypatch.setattr(card, "build_model_card", boom)
    with pytest.raises(RuntimeError, match="injected"):
        export(model, target, overwrite=True)
    assert json.loads((target / MANIFEST_NAME).read_text()) == first.manifest  # old export survives a failure
    monkeypatch.undo()
    second = export(model, target, overwrite=True)
    assert set(second.bit_scheme.values()) == {2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_export_refuses_unquantized_model(tmp_path: Path) -> None:
    with pytest.raises(MSQExportError, match="quantize_model"):
        export(timm.create_model("test_resnet", pretrained=False), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_sharded_hf_export(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = hf_vit().eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    random_scheme(model, 5)
    x = torch.randn(1, 3, 16, 16)
    result = export(model, tmp_path / "sh", max_shard_size="4KB")
    assert len(result.weight_files) > 1 and all(f.startswith("msq_model-") for f in result.weight_files)
    assert not any(f.startswith("model") for f in result.files)
    assert torch.equal(_logits(from_pretrained(tmp_path / "sh"), x), _logits(model, x))
    assert torch.equal(_logits(AutoModelForImageClassification.from_pretrained(tmp_path / "sh"), x), _logits(model, x))


def test_plain_transformers_refuses_export_in_fresh_process(tmp_path: Path) -> None:
    """Without `import msq_hf`, transformers must fail loudly, never load random float weights."""
    model = hf_vit().eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
    export(model, tmp_path / "vit")
    code = (
        "import sys\nfrom transformers import AutoModelForImageClassification\n"
        f"AutoModelForImageClassification.from_pretrained({str(tmp_path / 'vit')!r})\n"
        "assert 'msq_hf' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    # config.json names no loadable weight file; transformers prints msq_hf's instruction instead
    assert "import msq_hf" in proc.stderr and "pip install msq-hf" in proc.stderr


def test_model_card_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5).eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    scheme = random_scheme(model, 9)
    export(model, tmp_path / "e")
    card = (tmp_path / "e" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: timm" in front and "pipeline_tag: image-classification" in front
    assert all(f"`{n}`" in card for n in scheme) and "bit_scheme.png" in card
    # the metadata is what the Hub reads: it parses with huggingface_hub and follows its conventions
    data = ModelCard.load(tmp_path / "e" / "README.md").data
    assert isinstance(data, ModelCardData) and data.library_name == "timm"
    assert {"msq", "quantized", "mixed-precision", "timm"} <= set(data.tags)
    assert data.pipeline_tag == "image-classification"
    assert data.license == model.pretrained_cfg["license"]
    assert (tmp_path / "e" / "bit_scheme.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = inspect_export(tmp_path / "e")
    assert report.ok and report.errors == [] and report.bit_scheme == scheme and report.kind == "timm"
    assert report.bytes_on_disk == sum(p.stat().st_size for p in (tmp_path / "e").iterdir())
    text = format_report(report)
    assert "integrity  : OK" in text and "compression" in text
    assert main(["inspect", str(tmp_path / "e")]) == 0
    assert main(["inspect", str(tmp_path / "e"), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["bit_scheme"] == scheme


def test_export_has_ordinary_permissions(tmp_path: Path) -> None:
    """The temp-dir machinery must not leave an owner-only (0700/0600) export behind."""
    import os
    import stat

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
    old = os.umask(0o022)
    try:
        export(model, tmp_path / "exp")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "exp").stat().st_mode) == 0o755
    for path in (tmp_path / "exp").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_hf_card_metadata_names_the_base_model(tmp_path: Path) -> None:
    model = hf_vit().eval()
    model.config.name_or_path = "google/vit-base-patch16-224"  # as from_pretrained("google/...") sets it
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
    result = export(model, tmp_path / "vit")
    assert result.manifest["model"]["base_model"] == "google/vit-base-patch16-224"
    data = ModelCard.load(tmp_path / "vit" / "README.md").data
    assert data.library_name == "transformers" and data.base_model == "google/vit-base-patch16-224"
    assert data.to_dict()["base_model_relation"] == "quantized"
    assert {"msq", "quantized", "mixed-precision"} <= set(data.tags) and "timm" not in data.tags
    # a model built locally claims no base model
    local = hf_vit().eval()
    msq_hf.quantize_model(local, msq_hf.MSQConfig(init_bits=4))
    export(local, tmp_path / "local")
    assert ModelCard.load(tmp_path / "local" / "README.md").data.base_model is None


@pytest.mark.parametrize("build", [hf_vit, lambda: timm.create_model("test_resnet", pretrained=False, num_classes=3)])
def test_export_and_save_leave_the_users_config_unchanged(build, tmp_path: Path) -> None:
    """The MSQConfig the user passed is shared by the model and its quantizer: saving must not write into it."""
    model = build().eval()
    cfg = msq_hf.MSQConfig(init_bits=6, target_compression=8.0)
    msq_hf.quantize_model(model, cfg)
    random_scheme(model, seed=3)
    before = cfg.to_dict()
    export(model, tmp_path / "export")
    assert cfg.to_dict() == before and model.msq_config is cfg
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp_path / "checkpoint", msq_format="fake")
        saved = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["quantization_config"]
        assert saved["bit_scheme"] == msq_hf.bit_scheme(model) and saved["msq_format"] == "fake"
        assert model.hf_quantizer.quantization_config is cfg
    assert cfg.to_dict() == before and cfg.bit_scheme is None and cfg.msq_format == "fake"
