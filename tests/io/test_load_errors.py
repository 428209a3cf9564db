"""Every kind of broken export fails with a clear msq_hf error naming the file or layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

import msq_hf
from msq_hf.commands.main import main
from msq_hf.errors import MSQFormatError, MSQIntegrityError, MSQMissingFileError
from msq_hf.io.export import export
from msq_hf.io.format import MANIFEST_NAME, WEIGHTS_NAME, file_entry, layer_totals
from msq_hf.io.inspect import inspect_export
from msq_hf.io.load import from_pretrained
from msq_hf.nn.codec import packed_nbytes


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=8,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    ).eval()
    msq_hf.quantize_model(vit, msq_hf.MSQConfig(init_bits=4))
    export(vit, root / "hf")
    net = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    msq_hf.quantize_model(net, msq_hf.MSQConfig(init_bits=3))
    export(net, root / "timm")
    return {"hf": root / "hf", "timm": root / "timm"}


@pytest.fixture(params=["hf", "timm"])
def export_dir(request: pytest.FixtureRequest, exports: dict[str, Path], tmp_path: Path) -> Path:
    target = tmp_path / request.param
    shutil.copytree(exports[request.param], target)
    return target


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _resign(export_dir: Path, name: str) -> None:
    """Record a file's new size and sha256 in the manifest: a consistent edit, past the integrity check."""
    path = export_dir / name
    _edit_json(export_dir / MANIFEST_NAME, lambda m: m["files"][name].update(file_entry(path)), resign=False)


def _edit_json(path: Path, change, resign: bool = True) -> None:
    """Edit a JSON file; a file the manifest hashes is re-signed (the test targets the checks behind the hash)."""
    data = _json(path)
    change(data)
    path.write_text(json.dumps(data))
    if resign and path.name != MANIFEST_NAME:
        _resign(path.parent, path.name)


def _first_layer(export_dir: Path) -> tuple[str, dict]:
    layers = _json(export_dir / MANIFEST_NAME)["layers"]
    name = next(iter(layers))
    return name, layers[name]


def _rewrite_weights(export_dir: Path, change) -> None:
    """Edit tensors and re-sign the manifest, i.e. a consistent but semantically broken export."""
    path = export_dir / WEIGHTS_NAME
    with safe_open(path, framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    _resign(export_dir, WEIGHTS_NAME)


def test_intact_exports_load(export_dir: Path) -> None:
    assert from_pretrained(export_dir) is not None
    assert inspect_export(export_dir).ok


def test_truncated_weight_file(export_dir: Path) -> None:
    path = export_dir / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MSQIntegrityError, match=r"msq_model\.safetensors.*truncated"):
        from_pretrained(export_dir)
    report = inspect_export(export_dir)
    assert not report.ok and "truncated" in report.errors[0]
    assert main(["inspect", str(export_dir)]) == 1


def test_flipped_bit_fails_sha256(export_dir: Path) -> None:
    path = export_dir / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(MSQIntegrityError, match=r"msq_model\.safetensors fails its sha256"):
        from_pretrained(export_dir)
    assert inspect_export(export_dir, verify=False).ok  # size and header are still fine


@pytest.mark.parametrize("missing", [WEIGHTS_NAME, MANIFEST_NAME, "config.json"])
def test_missing_file(export_dir: Path, missing: str) -> None:
    (export_dir / missing).unlink()
    with pytest.raises(MSQMissingFileError, match=missing.replace(".", r"\.")) as info:
        from_pretrained(export_dir)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_directory_and_cli_exit_codes(tmp_path: Path) -> None:
    with pytest.raises(MSQMissingFileError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    assert main(["inspect", str(tmp_path / "nope")]) == 2


def test_config_not_json(export_dir: Path) -> None:
    (export_dir / "config.json").write_text("{ not json")
    with pytest.raises(MSQFormatError, match=r"config\.json is not valid JSON"):
        from_pretrained(export_dir)


@pytest.mark.parametrize("bits", [0, 9, "4"])
def test_bits_outside_range_in_config(export_dir: Path, bits) -> None:
    name, _ = _first_layer(export_dir)
    _edit_json(export_dir / "config.json", lambda c: c["quantization_config"]["bit_scheme"].update({name: bits}))
    with pytest.raises(MSQFormatError, match=rf"config\.json.*bit_scheme\[{name!r}\].*1\.\.8"):
        from_pretrained(export_dir)


def test_bits_outside_range_in_manifest(export_dir: Path) -> None:
    name, _ = _first_layer(export_dir)
    _edit_json(export_dir / MANIFEST_NAME, lambda m: m["layers"][name].update(bits=9))
    with pytest.raises(MSQFormatError, match=rf"msq_manifest\.json: layer {name!r}: bits=9 .*1\.\.8"):
        from_pretrained(export_dir)


def test_config_and_manifest_disagree(export_dir: Path) -> None:
    name, info = _first_layer(export_dir)
    new = 1 if info["bits"] != 1 else 2
    _edit_json(export_dir / "config.json", lambda c: c["quantization_config"]["bit_scheme"].update({name: new}))
    with pytest.raises(MSQFormatError, match=rf"layer {name!r}: .*bit_scheme says {new} bits"):
        from_pretrained(export_dir)


def _set_bits_everywhere(export_dir: Path, name: str, info: dict, new: int, drop_key: bool = False) -> None:
    _edit_json(export_dir / "config.json", lambda c: c["quantization_config"]["bit_scheme"].update({name: new}))

    def fix(m):
        layer = m["layers"][name]
        layer.update(bits=new, stored_bits=new + 1, packed_bytes=packed_nbytes(info["numel"], new, "signmag"))
        if drop_key:
            layer["checkpoint_key"] = None
        m["totals"].update(layer_totals(m["layers"]))  # keep the claim consistent: the test targets the tensors

    _edit_json(export_dir / MANIFEST_NAME, fix)


def test_bit_scheme_disagrees_with_stored_tensors(export_dir: Path) -> None:
    name, info = _first_layer(export_dir)
    _set_bits_everywhere(export_dir, name, info, 8)
    with pytest.raises(MSQFormatError, match=rf"layer {name!r}: .*bit scheme disagrees with the stored tensors"):
        from_pretrained(export_dir)
    assert not inspect_export(export_dir).ok


def test_bit_scheme_disagrees_without_header_hint(export_dir: Path) -> None:
    """Even without the manifest's key hint, the loader's own shape check catches it."""
    name, info = _first_layer(export_dir)
    _set_bits_everywhere(export_dir, name, info, 8, drop_key=True)
    with pytest.raises(MSQFormatError, match="size disagrees with the bit scheme"):
        from_pretrained(export_dir)


def test_stored_weight_bits_disagree(export_dir: Path) -> None:
    name, info = _first_layer(export_dir)
    key = info["checkpoint_key"].removesuffix("weight_packed") + "weight_bits"
    _rewrite_weights(export_dir, lambda t: t.update({key: torch.tensor([info["bits"] % 8 + 1], dtype=torch.uint8)}))
    with pytest.raises(MSQFormatError, match=rf"layer {name!r}: stored weight_bits=\d disagrees"):
        from_pretrained(export_dir)


def test_invalid_codes_are_rejected(export_dir: Path) -> None:
    name, info = _first_layer(export_dir)
    key = info["checkpoint_key"]
    _rewrite_weights(export_dir, lambda t: t.update({key: torch.full_like(t[key], 255)}))
    with pytest.raises(MSQFormatError, match=rf"layer {name!r}: a stored code is \d+, above the largest valid"):
        from_pretrained(export_dir)


def test_the_all_ones_code_loads_only_from_a_full_grid_export(export_dir: Path) -> None:
    """``qat_grid="full"`` makes the all-ones code (``+2^n`` steps) valid: only when config.json says so, and the
    manifest agrees; a manifest written before the field existed is sign-magnitude."""
    name, info = _first_layer(export_dir)
    key = info["checkpoint_key"]
    _rewrite_weights(export_dir, lambda t: t.update({key: torch.full_like(t[key], 255)}))
    _edit_json(export_dir / MANIFEST_NAME, lambda m: m.update(qat_grid="full"))
    with pytest.raises(MSQFormatError, match=r"msq_manifest\.json: qat_grid='full' disagrees with .*'signmag'"):
        from_pretrained(export_dir)
    _edit_json(
        export_dir / "config.json", lambda c: c["quantization_config"].update(qat_scale="learned", qat_grid="full")
    )
    model = from_pretrained(export_dir)
    weight = model.get_submodule(name).weight
    assert bool((weight > 0).all() and (weight == weight.max()).all())  # every code is the extra level +2^n steps
    _edit_json(export_dir / MANIFEST_NAME, lambda m: m.pop("qat_grid"))
    with pytest.raises(MSQFormatError, match=r"qat_grid='signmag' disagrees with .*\(qat_grid='full'\)"):
        from_pretrained(export_dir)


def test_unknown_module_names(export_dir: Path) -> None:
    name, _ = _first_layer(export_dir)
    ghost = name + "_ghost"

    def rename(mapping: dict) -> None:
        mapping[ghost] = mapping.pop(name)

    _edit_json(export_dir / "config.json", lambda c: rename(c["quantization_config"]["bit_scheme"]))
    _edit_json(export_dir / MANIFEST_NAME, lambda m: rename(m["layers"]))
    with pytest.raises(MSQFormatError, match=rf"names layer\(s\) \[{ghost!r}\] that .* does not have"):
        from_pretrained(export_dir)


def test_unknown_format_version(export_dir: Path) -> None:
    _edit_json(export_dir / MANIFEST_NAME, lambda m: m.update(format_version=99))
    with pytest.raises(MSQFormatError, match=r"format_version=99 is not supported.*upgrade msq_hf"):
        from_pretrained(export_dir)
    _edit_json(export_dir / MANIFEST_NAME, lambda m: m.update(format_version=1, format="something-else"))
    with pytest.raises(MSQFormatError, match="format='something-else'"):
        from_pretrained(export_dir)


def test_training_checkpoint_is_not_an_export(export_dir: Path) -> None:
    _edit_json(export_dir / "config.json", lambda c: c["quantization_config"].update(msq_format="fake"))
    with pytest.raises(MSQFormatError, match="msq_format='fake'"):
        from_pretrained(export_dir)
