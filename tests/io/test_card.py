"""The export's model card follows Hub conventions (huggingface_hub.ModelCard): metadata, model-index, guard text."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_MODELS
from huggingface_hub import ModelCard

import msq_hf
from msq_hf.io.card import check_card_data


def _export(model: torch.nn.Module, path: Path, **kwargs) -> ModelCard:
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
    msq_hf.export(model, path, **kwargs)
    return ModelCard.load(path / "README.md")


@pytest.mark.parametrize("name", ["hf/vit", "hf/swin", "hf/timm_wrapper", "timm/test_resnet"])
def test_card_metadata_and_model_index(name: str, tmp_path: Path) -> None:
    meta = {
        "base_model": "google/vit-base-patch16-224",
        "datasets": ["cifar10"],
        "license": "apache-2.0",
        "metrics": {"accuracy": 0.9123},
        "dataset_split": "test",
        "tags": ["demo"],
    }
    card = _export(TINY_MODELS[name]().eval(), tmp_path / "e", card_data=meta, repo_id="me/tiny-msq")
    data = card.data
    assert data.library_name == ("timm" if name.startswith("timm/") else "transformers")
    assert data.base_model == "google/vit-base-patch16-224" and data.to_dict()["base_model_relation"] == "quantized"
    assert data.datasets == ["cifar10"] and data.license == "apache-2.0"
    assert {"msq", "quantized", "mixed-precision", "demo"} <= set(data.tags)
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type, result.dataset_split) == (
        "accuracy",
        0.9123,
        "cifar10",
        "test",
    )
    assert data.model_name == "tiny-msq"
    assert "model-index" in (tmp_path / "e" / "README.md").read_text()
    assert "import msq_hf" in card.text and "pip install msq-hf" not in card.data.to_yaml()
    # the card is rebuilt from the manifest alone, with the same metadata
    report = msq_hf.inspect_export(tmp_path / "e")
    assert report.ok


def test_card_without_metadata_claims_nothing(tmp_path: Path) -> None:
    data = _export(timm.create_model("test_resnet", pretrained=False, num_classes=3), tmp_path / "e").data
    assert data.base_model is None and data.eval_results is None and data.datasets is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"accuracy": 0.9}, "unknown"),
        ({"metrics": {"accuracy": 0.9}}, "needs card_data\\['datasets'\\]"),
        ({"datasets": ["x"], "metrics": {"accuracy": "high"}}, "expected a number"),
        ({"license": 3}, "license"),
    ],
)
def test_bad_card_data_is_refused_naming_the_key(bad: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        check_card_data(bad)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    msq_hf.quantize_model(model)
    with pytest.raises(ValueError, match=match):
        msq_hf.export(model, tmp_path / "e", card_data=bad)
    assert not (tmp_path / "e").exists()
