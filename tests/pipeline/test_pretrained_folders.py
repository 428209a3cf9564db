"""The local Fashion-MNIST "pretrained" folders of ``benchmarks/pretrain.py`` reach the recipes and pipeline().

The folders are written with random weights here (training them is the script's job); what is checked is the
path: the recipes' ``--model_name_or_path`` resolves them at their own input size, timm and
``transformers.pipeline`` load exactly the saved weights, the saved preprocessing reproduces the loader's
pixels (28 px zero-padded to 32), and a recipe run starts from them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, TrainingArguments, pipeline

import msq_hf
from msq_hf.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, find_fashion_mnist
from msq_hf.data.arrays import to_pixel_values
from msq_hf.pipeline import logits_of, resolve_model

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("resnet18", "deit_tiny")

pytestmark = pytest.mark.skipif(
    find_fashion_mnist() is None, reason="Fashion-MNIST not installed (bash scripts/setup_data.sh)"
)


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain() -> ModuleType:
    return _load(ROOT / "benchmarks" / "pretrain.py", "msq_benchmarks_pretrain")


@pytest.fixture(scope="module")
def folders(pretrain: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each model as ``save_final`` writes it, with the in-memory model it was saved from."""
    out = tmp_path_factory.mktemp("pretrained")
    saved = {}
    for name in MODELS:
        prepared = pretrain.prepare_run(name, seed=0, limits=(20, 20))
        pretrain.save_final(prepared, prepared.model, out / name)
        saved[name] = (out / name, prepared.model)
    return saved


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("name", "kind"), [("resnet18", "timm_dir"), ("deit_tiny", "transformers")])
def test_recipes_resolve_the_folder_at_its_own_size(name: str, kind: str, folders: dict) -> None:
    spec = resolve_model(str(folders[name][0]))
    assert (spec.kind, spec.image_size, spec.channels) == (kind, 32, 3)


@pytest.mark.parametrize("name", MODELS)
def test_pipeline_loads_the_saved_weights_and_the_loaders_preprocessing(name: str, folders: dict) -> None:
    folder, original = folders[name]
    classify = pipeline("image-classification", model=str(folder), top_k=len(FASHION_MNIST_CLASSES))
    model = getattr(classify.model, "timm_model", classify.model)  # TimmWrapper holds the timm module
    assert _state_equal(model, original)
    image = (np.random.default_rng(0).random((28, 28)) * 255).astype("uint8")  # a Fashion-MNIST-shaped image
    loader = to_pixel_values(image[None], 32, 3, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 255.0, "auto")
    pixels = classify.image_processor(Image.fromarray(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, torch.from_numpy(loader), rtol=0, atol=1e-6)  # padded, not resized
    assert {p["label"] for p in classify(Image.fromarray(image))} == set(FASHION_MNIST_CLASSES)


def test_timm_folder_loads_with_timm_and_auto_model(folders: dict) -> None:
    import timm

    folder, original = folders["resnet18"]
    config = json.loads((folder / "config.json").read_text())
    # TimmWrapper passes num_classes itself: a second copy in model_args would make it fail
    assert "num_classes" not in config["model_args"] and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and "test_input_size" not in config["pretrained_cfg"]
    assert _state_equal(timm.create_model(f"local-dir:{folder}", pretrained=True), original)
    assert _state_equal(AutoModelForImageClassification.from_pretrained(str(folder)).timm_model, original)


@pytest.fixture
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # pretrain.main sets its own (--threads)


@pytest.mark.usefixtures("_keep_threads")
def test_pretraining_records_epochs_and_resumes(pretrain: ModuleType, tmp_path: Path) -> None:
    argv = ["resnet18", "--max-train-samples", "40", "--max-eval-samples", "20", "--output-root", str(tmp_path)]
    argv += ["--results-dir", str(tmp_path / "results")]
    assert pretrain.main([*argv, "--epochs", "1"]) == 0
    results = tmp_path / "results" / "resnet18.json"
    first = json.loads(results.read_text())
    assert first["status"] == "done" and [e["epoch"] for e in first["evaluations"]] == [1.0]
    assert 0 <= first["test_accuracy"] <= 1 and first["test_images"] == 20 and first["seed"] == 0
    assert first["evaluations"][0]["test_images"] == 20 and first["epoch_minutes"] > 0
    assert (tmp_path / "resnet18" / "model.safetensors").is_file()
    # a second run with more epochs continues from the newest checkpoint and keeps the first epoch's record
    assert pretrain.main([*argv, "--epochs", "2"]) == 0
    second = json.loads(results.read_text())
    assert second["resumed_from"].endswith("checkpoint-1")
    assert [e["epoch"] for e in second["evaluations"]] == [1.0, 2.0] and second["evaluations"][1]["resumed"]
    # --skip-done leaves a finished model alone
    before = (tmp_path / "resnet18" / "model.safetensors").stat().st_mtime_ns
    assert pretrain.main([*argv, "--epochs", "3", "--skip-done"]) == 0
    assert (tmp_path / "resnet18" / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads(results.read_text())["epochs_planned"] == 2


@pytest.mark.parametrize("name", MODELS)
def test_recipe_fine_tunes_from_the_folder(name: str, folders: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MSQ_HF_COMPILE", "0")
    recipes = ROOT / "recipes"
    monkeypatch.syspath_prepend(str(recipes))
    script = {"resnet18": "resnet18_imagenet", "deit_tiny": "deit_tiny"}[name]
    recipe = _load(recipes / f"{script}.py", f"msq_recipe_{script}_local")
    argv = ["--model_name_or_path", str(folders[name][0]), "--dataset_name", "fashion_mnist", "--eval_split", "test"]
    argv += ["--max_train_samples", "16", "--max_eval_samples", "16", "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--save_strategy", "no"]
    argv += ["--eval_strategy", "no", "--dataloader_num_workers", "0", "--hessian_max_probes", "1"]
    argv += ["--hessian_batch_size", "4", "--write_report", "false", "--output_dir", str(tmp_path)]
    result = recipe.main(argv)
    assert result.results["train_images"] == 16 and result.results["export_logits_equal"] is True
    cfg = result.results["msq_config"]
    expected = (4, 8, "lsq") if name == "deit_tiny" else (8, None, "auto")  # the paper's starts
    assert (cfg["init_bits"], cfg["act_bits"], cfg["act_quantizer"]) == expected
    exported = msq_hf.from_pretrained(result.export_dir)
    with torch.no_grad():  # trained at the folder's 32 px, not the recipes' former 224 px default
        logits = logits_of(exported.eval(), torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 10)


@pytest.mark.usefixtures("_keep_threads")
def test_evaluations_on_a_test_subset_end_with_the_whole_test_set(
    pretrain: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeiT's setting: evaluations every N steps on part of the test set, then the finished model on all of it."""
    setting = dataclasses.replace(pretrain.SETTINGS["resnet18"], batch_size=16, eval_steps=2, eval_images=8)
    monkeypatch.setitem(pretrain.SETTINGS, "resnet18", setting)
    argv = ["resnet18", "--max-train-samples", "32", "--max-eval-samples", "20", "--epochs", "2"]
    assert pretrain.main([*argv, "--output-root", str(tmp_path), "--results-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "resnet18.json").read_text())
    points = [(e["step"], e["test_images"]) for e in record["evaluations"]]
    assert points == [(2, 8), (4, 8), (4, 20)]
    assert record["test_accuracy"] == record["evaluations"][-1]["test_accuracy"]


def test_resume_loads_every_weight_of_a_vit_checkpoint(pretrain: ModuleType, tmp_path: Path) -> None:
    # a Trainer checkpoint of a transformers ViT holds the legacy key names; the plain Trainer's strict=False load
    # kept none of them (a resumed DeiT-tiny pretraining restarted from random weights), FloatTrainer keeps all
    saved = pretrain.prepare_run("deit_tiny", seed=0, limits=(20, 20)).model
    saved.save_pretrained(tmp_path / "checkpoint-1")
    target = pretrain.prepare_run("deit_tiny", seed=0, limits=(20, 20)).model
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = pretrain.FloatTrainer(model=target, args=args)
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    assert _state_equal(target, saved)
