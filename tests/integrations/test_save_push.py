"""save_pretrained / push_to_hub / Trainer(push_to_hub=True) of MSQ models write the packed export with its card;
nothing msq_hf writes loads silently in plain transformers; quantize_model never touches the caller's objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import pytest
import torch
from conftest import IMAGE_SIZE, TINY_MODELS
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TrainingArguments

import msq_hf
from msq_hf.errors import MSQFormatError
from msq_hf.integrations.transformers import LOAD_GUARD
from msq_hf.io.format import MANIFEST_NAME, WEIGHTS_NAME

HF_FAMILIES = ["hf/vit", "hf/deit", "hf/swin", "hf/convnext", "hf/resnet", "hf/timm_wrapper"]
EXPORT_FILES = {"README.md", "bit_scheme.png", "config.json", MANIFEST_NAME, WEIGHTS_NAME}


def _quantized(name: str) -> torch.nn.Module:
    model = TINY_MODELS[name]().eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    names = sorted(msq_hf.bit_scheme(model))
    msq_hf.set_bit_scheme(model, {n: 1 + i % 8 for i, n in enumerate(names)})
    return model


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_save_pretrained_writes_the_packed_export(name: str, tmp_path: Path, images: torch.Tensor) -> None:
    model = _quantized(name)
    ref = _logits(model, images)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"stale float weights")  # an earlier float save
    model.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == EXPORT_FILES, files  # the stale model.safetensors is gone
    assert torch.equal(_logits(msq_hf.from_pretrained(tmp_path / "out"), images), ref)
    assert torch.equal(_logits(AutoModelForImageClassification.from_pretrained(tmp_path / "out"), images), ref)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    weight_bytes = (tmp_path / "out" / WEIGHTS_NAME).stat().st_size
    assert weight_bytes < manifest["totals"]["float_bytes"]  # packed: smaller than the float tensors
    assert json.loads((tmp_path / "out" / "config.json").read_text())["transformers_weights"] == LOAD_GUARD
    # Trainer checkpoints (checkpoint-<step>) stay resumable training checkpoints: latent weights + bits/k
    model.save_pretrained(tmp_path / "run" / "checkpoint-7")
    state = load_file(str(tmp_path / "run" / "checkpoint-7" / "model.safetensors"))
    assert any(k.endswith(".bits") for k in state)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "checkpoint-7")
    assert msq_hf.bit_scheme(loaded) == msq_hf.bit_scheme(model)
    assert torch.equal(_logits(loaded, images), ref)
    # and on request anywhere
    model.save_pretrained(tmp_path / "fake", msq_format="fake")
    assert (tmp_path / "fake" / "model.safetensors").is_file() and not (tmp_path / "fake" / MANIFEST_NAME).exists()


def test_plain_transformers_never_loads_msq_folders(tmp_path: Path) -> None:
    """Fresh process, no msq_hf: every folder msq_hf writes is refused with a message naming msq_hf."""
    folders = []
    for name in ("hf/vit", "hf/resnet", "hf/timm_wrapper"):
        model = _quantized(name)
        slug = name.replace("/", "_")
        model.save_pretrained(tmp_path / f"{slug}_export")
        model.save_pretrained(tmp_path / slug / "checkpoint-3")
        folders += [tmp_path / f"{slug}_export", tmp_path / slug / "checkpoint-3"]
    code = (
        "import sys\nfrom transformers import AutoModelForImageClassification\n"
        f"for folder in {[str(f) for f in folders]!r}:\n"
        "    try:\n"
        "        AutoModelForImageClassification.from_pretrained(folder)\n"
        "        print('LOADED', folder)\n"
        "    except Exception as exc:\n"
        "        print('REFUSED', type(exc).__name__, str(exc).replace(chr(10), ' '))\n"
        "assert 'msq_hf' not in sys.modules\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("LOADED", "REFUSED"))]
    assert len(lines) == len(folders) and all(ln.startswith("REFUSED") for ln in lines), lines
    assert all("import msq_hf" in ln and "pip install msq-hf" in ln for ln in lines), lines


class _FakeHub:
    """Records what HfApi would upload (the folder exists only during the call)."""

    def __init__(self) -> None:
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, *args, **kwargs):
        return SimpleNamespace(repo_id=repo_id, url=f"https://hf.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        ignore = kwargs.get("ignore_patterns") or []
        files = {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and not any(p.relative_to(root).match(pat) for pat in ignore)
        }
        files = {k: v for k, v in files.items() if not k.startswith("checkpoint-")}
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://hf.co/{repo_id}/commit/1")

    def patch(self):
        hub = self
        return mock.patch.multiple(
            huggingface_hub.HfApi,
            create_repo=lambda api, *a, **k: hub.create_repo(api, *a, **k),
            upload_folder=lambda api, **k: hub.upload_folder(api, **k),
            create_commit=mock.DEFAULT,
        )


def _check_uploaded_export(files: dict[str, bytes], tmp_path: Path, ref: torch.Tensor, images: torch.Tensor) -> None:
    assert set(files) >= EXPORT_FILES, sorted(files)
    assert "model.safetensors" not in files
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    card = ModelCard.load(folder / "README.md")
    assert {"msq", "quantized", "mixed-precision"} <= set(card.data.tags)
    assert "MSQ mixed-precision export" in card.text
    assert torch.equal(_logits(msq_hf.from_pretrained(folder), images), ref)


@pytest.mark.parametrize("name", ["hf/deit", "hf/convnext", "hf/timm_wrapper"])
def test_model_push_to_hub_uploads_the_packed_export(name: str, tmp_path: Path, images: torch.Tensor) -> None:
    model = _quantized(name)
    ref = _logits(model, images)
    hub = _FakeHub()
    with hub.patch() as mocks:
        url = model.push_to_hub("me/tiny-msq", tags=["my-tag"])
        assert not mocks["create_commit"].called  # transformers' own path would commit its empty card
    assert url == "https://hf.co/me/tiny-msq/commit/1"
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/tiny-msq"
    _check_uploaded_export(upload["files"], tmp_path, ref, images)
    card = ModelCard.load(tmp_path / "downloaded" / "README.md")
    assert "my-tag" in card.data.tags


def test_trainer_push_to_hub_pushes_the_packed_export(tmp_path: Path, images: torch.Tensor) -> None:
    model = TINY_MODELS["hf/vit"]()
    data = [{"pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE), "labels": i % 10} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        push_to_hub=True,
        hub_model_id="me/vit-msq",
        hub_strategy="end",
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
    )
    hub = _FakeHub()
    with hub.patch():
        trainer = msq_hf.MSQTrainer(model=model, args=args, train_dataset=data, msq_config=msq_hf.MSQConfig())
        trainer.train()
        trainer.push_to_hub()
    model.eval()
    ref = _logits(model, images)
    final = hub.uploads[-1]
    assert final["repo_id"] == "me/vit-msq"
    _check_uploaded_export(final["files"], tmp_path, ref, images)
    # the checkpoints of the run are still resumable training checkpoints
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()


def test_dequantized_model_saves_as_plain_transformers(tmp_path: Path, images: torch.Tensor) -> None:
    model = _quantized("hf/resnet")
    model.dequantize()
    model.save_pretrained(tmp_path / "float")
    assert (tmp_path / "float" / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


# -- item 7: the caller's objects -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_quantize_model_leaves_the_callers_config_objects_alone(
    name: str, tmp_path: Path, images: torch.Tensor
) -> None:
    first = TINY_MODELS[name]()
    hf_config = first.config
    before = hf_config.to_dict()
    cfg = msq_hf.MSQConfig(init_bits=4)
    cfg_before = cfg.to_dict()
    msq_hf.quantize_model(first, cfg)
    assert hf_config.to_dict() == before and cfg.to_dict() == cfg_before
    assert not hasattr(hf_config, "quantization_config")
    assert first.config is not hf_config and first.config.quantization_config is cfg
    # every module that held the caller's config now holds the model's own copy
    held = [m for m in first.modules() for v in vars(m).values() if v is hf_config]
    assert held == []
    # the bug of issue 11: a float model built from the same config object saved as MSQ, then failed to load
    second = type(first)(hf_config).eval()
    second.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "float").eval()
    assert torch.equal(_logits(reloaded, images), _logits(second, images))


def test_float_weights_with_a_quantization_config_are_refused(tmp_path: Path) -> None:
    model = TINY_MODELS["hf/vit"]()
    model.save_pretrained(tmp_path / "float")  # float weights, then a stale msq quantization_config added
    quantized = _quantized("hf/vit")
    quantized.save_pretrained(tmp_path / "run" / "checkpoint-1")
    config = json.loads((tmp_path / "run" / "checkpoint-1" / "config.json").read_text())
    (tmp_path / "float" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MSQFormatError, match=r"float weights.*quantization_config"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "float")
