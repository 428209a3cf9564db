"""CIFAR ResNets registered with timm, and the bundled offline accuracy metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import msq_hf.models  # noqa: F401  (registers resnet*_cifar with timm)
from msq_hf.models import ResNetCifar


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_via_timm() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", pretrained=False, num_classes=10, in_chans=3)
    assert isinstance(model, ResNetCifar)
    # 3x3 stem (432) + 9 BasicBlocks + 2 projection shortcuts + BN + fc(64->10): 272,474 parameters.
    assert _count(model) == 272_474
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 21  # stem + 18 block convs + 2 shortcut 1x1 convs
    assert timm.models.get_model_args(model) == {"num_classes": 10, "in_chans": 3, "global_pool": "avg"}
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc"
    assert model.default_cfg is model.pretrained_cfg
    assert timm.data.resolve_data_config({}, model=model)["mean"] == cfg["mean"]


@pytest.mark.parametrize("name, blocks, params", [("resnet32_cifar", 5, 466_906), ("resnet56_cifar", 9, 855_770)])
def test_deeper_variants(name: str, blocks: int, params: int) -> None:
    model = timm.create_model(name)
    assert len(model.layer1) == blocks and _count(model) == params
    assert name in timm.list_models("*_cifar")


def test_timm_kwargs_and_head_api() -> None:
    model = timm.create_model("resnet20_cifar", num_classes=100, in_chans=1, drop_rate=0.5)
    assert model.conv1.in_channels == 1 and model.drop_rate == 0.5
    x = torch.randn(3, 1, 32, 32)
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (3, 64, 8, 8)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 64)
    assert torch.allclose(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == "fc"
    model.reset_classifier(7)
    assert model(x).shape == (3, 7) and timm.models.get_model_args(model)["num_classes"] == 7
    model.reset_classifier(0)
    assert model(x).shape == (3, 64)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")
    with pytest.raises(TypeError, match="unexpected arguments"):
        ResNetCifar(depth=20)


def test_dropout_active_only_in_training() -> None:
    model = timm.create_model("resnet20_cifar", drop_rate=0.9)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_features_only() -> None:
    model = timm.create_model("resnet20_cifar", features_only=True)
    outs = model(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_save_for_hf_roundtrip(tmp_path: Path) -> None:
    model = timm.create_model("resnet20_cifar", num_classes=10).eval()
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "resnet20_cifar" and config["num_features"] == 64
    assert config["model_args"] == {"num_classes": 10, "in_chans": 3, "global_pool": "avg"}
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), reloaded(x))


def test_double_backward_supported() -> None:
    # MSQ's Hessian trace needs grad-of-grad through every layer.
    model = timm.create_model("resnet20_cifar").eval()
    params = [p for p in model.parameters() if p.ndim == 4]
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
    hv = torch.autograd.grad(grads, params, grad_outputs=vs)
    assert all(h.shape == p.shape for h, p in zip(hv, params))
    assert any(float(h.abs().sum()) > 0 for h in hv)


# ------------------------------------------------------------------------------------------------
# offline metric
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import evaluate.config
    import huggingface_hub.constants

    # evaluate reads these at import time; point the already-imported module at the temp dir.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True, raising=False)
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules", raising=False)
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path / "metrics", raising=False)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_CACHE", tmp_path / "evaluate", raising=False)
    return tmp_path


def test_offline_accuracy_metric(offline_hf_home: Path) -> None:
    from msq_hf import metrics

    assert "accuracy" in metrics.available_metrics()
    metric = metrics.load_metric("accuracy", keep_in_memory=True)
    assert metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=[2], references=[2])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)
    assert metric.compute(predictions=[0, 1], references=[0, 0], normalize=False) == {"accuracy": 1.0}
    assert metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3, 1]) == {"accuracy": 0.75}
    assert any(offline_hf_home.joinpath("modules").rglob("accuracy.py"))  # cached under our HF_HOME
    with pytest.raises(ValueError, match="not bundled.*accuracy"):
        metrics.load_metric("f1")


def test_compute_accuracy_metrics_for_trainer(offline_hf_home: Path) -> None:
    from transformers import EvalPrediction

    from msq_hf.metrics import compute_accuracy_metrics

    logits = np.eye(4, dtype=np.float32)[[0, 1, 2, 2, 3]]
    labels = np.array([0, 1, 2, 3, -100])  # -100 = ignored
    assert compute_accuracy_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 0.75}
    assert compute_accuracy_metrics(((logits, None), labels)) == {"accuracy": 0.75}
    assert compute_accuracy_metrics((np.array([1, 1]), np.array([1, 0]))) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="do not match"):
        compute_accuracy_metrics((np.zeros((3, 4)), np.zeros(2)))
