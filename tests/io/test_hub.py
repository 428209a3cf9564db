"""Hub round trip without network: mocked push, load by repo id from a pre-populated Hub cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import pytest
import timm
import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

import msq_hf
from msq_hf.errors import MSQExportError
from msq_hf.io.export import export
from msq_hf.io.format import MANIFEST_NAME, WEIGHTS_NAME
from msq_hf.io.inspect import inspect_export
from msq_hf.io.load import from_pretrained

EXPECTED = {"README.md", "bit_scheme.png", "config.json", MANIFEST_NAME, WEIGHTS_NAME}


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.utils.hub as tf_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if hasattr(tf_hub, "is_offline_mode"):
        monkeypatch.setattr(tf_hub, "is_offline_mode", lambda: True)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ViTForImageClassification(
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
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
    msq_hf.set_bit_scheme(model, {n: 1 + i % 8 for i, n in enumerate(msq_hf.bit_scheme(model))})
    return model


def test_push_to_hub_uploads_the_whole_export(tmp_path: Path) -> None:
    model = tiny_vit()
    seen: dict = {}

    def fake_create_repo(self, repo_id, **kwargs):
        seen["create"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def fake_upload_folder(self, **kwargs):
        seen["upload"] = kwargs
        seen["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return SimpleNamespace(commit_url="https://huggingface.co/me/tiny-msq/commit/abc")

    with (
        mock.patch.object(huggingface_hub.HfApi, "create_repo", fake_create_repo),
        mock.patch.object(huggingface_hub.HfApi, "upload_folder", fake_upload_folder),
    ):
        result = export(
            model, tmp_path / "out", push_to_hub=True, repo_id="me/tiny-msq", private=True, commit_message="msq test"
        )
    assert seen["create"][0] == "me/tiny-msq"
    assert seen["create"][1]["exist_ok"] is True and seen["create"][1]["private"] is True
    assert seen["upload"]["repo_id"] == "me/tiny-msq" and seen["upload"]["commit_message"] == "msq test"
    assert Path(seen["upload"]["folder_path"]) == tmp_path / "out"
    assert set(seen["files"]) == EXPECTED
    assert result.repo_id == "me/tiny-msq" and result.commit_url.endswith("/abc")
    assert "me/tiny-msq" in (tmp_path / "out" / "README.md").read_text()


def test_push_needs_repo_id(tmp_path: Path) -> None:
    with pytest.raises(MSQExportError, match="repo_id"):
        export(tiny_vit(), tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()


def _populate_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_load_by_repo_id_from_hub_cache(tmp_path: Path, offline: None) -> None:
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    export(model, tmp_path / "out")
    cache = tmp_path / "hub"
    _populate_cache(cache, "me/tiny-msq", tmp_path / "out")

    loaded = from_pretrained("me/tiny-msq", cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, ref)
    auto = AutoModelForImageClassification.from_pretrained("me/tiny-msq", cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(auto(pixel_values=x).logits, ref)
    report = inspect_export("me/tiny-msq", cache_dir=cache)
    assert report.ok and report.bit_scheme == msq_hf.bit_scheme(model)

    with pytest.raises(FileNotFoundError, match="me/other"):
        from_pretrained("me/other", cache_dir=cache)


def test_raw_timm_by_repo_id(tmp_path: Path, offline: None) -> None:
    torch.manual_seed(1)
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=4).eval()
    msq_hf.quantize_model(net, msq_hf.MSQConfig(init_bits=5))
    export(net, tmp_path / "out")
    cache = tmp_path / "hub"
    _populate_cache(cache, "me/eff-msq", tmp_path / "out")
    loaded = from_pretrained("me/eff-msq", cache_dir=cache, local_files_only=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
