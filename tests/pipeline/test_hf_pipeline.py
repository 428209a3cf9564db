"""Exports work with ``transformers.pipeline("image-classification", model=export_dir)``.

For raw timm models (``test_resnet``, ``test_vit``, and the ``msq-hf train`` demo's ``resnet20_cifar``): the export
loads as ``TimmWrapperForImageClassification`` with logits bit-identical to ``msq_hf.from_pretrained`` (the raw timm
model), still verified against the manifest, with the training preprocessing (size, pad/resize, mean/std) and
class names recorded in ``config.json``. For an HF ViT and a TimmWrapper model: MSQTrainer with
``processing_class`` → ``msq_hf.export`` (or
``trainer.save_model``) → ``pipeline(model=dir)`` labels a PIL image with the model's class names and the
export's logits; ``msq-hf export`` of a checkpoint keeps its ``preprocessor_config.json``; and the training
pipeline behind ``msq-hf train`` and the recipes normalizes a transformers model's data with the model's own
processor statistics and exports that processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, NUM_CLASSES, TINY_MODELS
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
    TrainingArguments,
    ViTImageProcessor,
    pipeline,
)
from transformers.utils import IMAGE_PROCESSOR_NAME

import msq_hf
from msq_hf.arguments import MSQArguments
from msq_hf.commands.main import main as cli_main
from msq_hf.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, find_fashion_mnist
from msq_hf.data.arrays import to_pixel_values
from msq_hf.errors import MSQIntegrityError
from msq_hf.integrations.timm import record_preprocessing, timm_processor
from msq_hf.pipeline import DataArguments, ModelArguments, RunArguments, prepare, train_and_export
from msq_hf.quant.kernels import KERNELS
from msq_hf.training.trainer import MSQTrainer

LABELS = [f"class_{i}" for i in range(NUM_CLASSES)]
TIMM_CFG = {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KERNELS, "_state", "eager")  # a few steps: compile time would dominate


def _vit() -> tuple[torch.nn.Module, object]:
    model = TINY_MODELS["hf/vit"]()
    proc = ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return model, proc


def _timm_wrapper() -> tuple[torch.nn.Module, object]:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    # what a Hub TimmWrapper checkpoint holds: the preprocessing in config.json's pretrained_cfg
    config = TimmWrapperConfig(architecture="test_resnet", num_labels=NUM_CLASSES, pretrained_cfg=TIMM_CFG)
    return TimmWrapperForImageClassification(config), TimmWrapperImageProcessor(pretrained_cfg=TIMM_CFG)


FAMILIES = {"hf/vit": _vit, "hf/timm_wrapper": _timm_wrapper}


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g), "labels": torch.tensor(i % NUM_CLASSES)}
        for i in range(n)
    ]


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((45, 40, 3)) * 255).astype("uint8"))


def _trained(name: str, tmp_path: Path) -> MSQTrainer:
    model, proc = FAMILIES[name]()
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {label: i for i, label in enumerate(LABELS)}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
    )
    cfg = msq_hf.MSQConfig(init_bits=6, target_compression=8.0, prune_interval=1)
    trainer = MSQTrainer(model=model, args=args, msq_config=cfg, train_dataset=_dataset(), processing_class=proc)
    trainer.train()
    trainer.model.eval()
    return trainer


def _check_pipeline(directory: Path, proc: object) -> None:
    """pipeline(model=directory) gives the class names and the export's own probabilities."""
    classify = pipeline("image-classification", model=str(directory), top_k=NUM_CLASSES)
    image = _image()
    predictions = classify(image)
    assert {p["label"] for p in predictions} == set(LABELS)
    reloaded = msq_hf.from_pretrained(directory).eval()
    pixels = proc(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = reloaded(pixel_values=pixels).logits if isinstance(reloaded, PreTrainedModel) else reloaded(pixels)
    probs = logits.softmax(-1)[0]
    by_label = {p["label"]: p["score"] for p in predictions}
    torch.testing.assert_close(torch.tensor([by_label[label] for label in LABELS]), probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_with_processing_class_works_with_pipeline(name: str, tmp_path: Path) -> None:
    trainer = _trained(name, tmp_path)
    out = tmp_path / "export"
    msq_hf.export(trainer.model, out, processing_class=trainer.processing_class)
    manifest = json.loads((out / "msq_manifest.json").read_text())
    if name == "hf/vit":
        assert IMAGE_PROCESSOR_NAME in manifest["files"]  # hashed like every file a load reads
    else:  # TimmWrapper: the processor is config.json's pretrained_cfg
        assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["mean"] == TIMM_CFG["mean"]
    _check_pipeline(out, trainer.processing_class)


def test_trainer_save_model_works_with_pipeline(tmp_path: Path) -> None:
    trainer = _trained("hf/vit", tmp_path)
    trainer.save_model(str(tmp_path / "saved"))
    _check_pipeline(tmp_path / "saved", trainer.processing_class)


def test_export_refuses_two_different_processors(tmp_path: Path) -> None:
    model, proc = _vit()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=6))
    with pytest.raises(msq_hf.MSQExportError, match="processor= and processing_class="):
        msq_hf.export(model, tmp_path / "e", processor=proc, processing_class=ViTImageProcessor())


def test_cli_export_keeps_the_checkpoint_processor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _trained("hf/vit", tmp_path)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    trainer._save_checkpoint(trainer.model, trial=None)  # what save_strategy="steps" writes
    assert (checkpoint / IMAGE_PROCESSOR_NAME).is_file()
    assert cli_main(["export", str(checkpoint), str(tmp_path / "cli_export")]) == 0
    assert (tmp_path / "cli_export" / IMAGE_PROCESSOR_NAME).is_file()
    _check_pipeline(tmp_path / "cli_export", trainer.processing_class)


def _image_folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return root


def test_pipeline_normalizes_with_the_models_processor_and_exports_it(tmp_path: Path) -> None:
    """``msq-hf train`` / recipes: a transformers model folder with its processor (mean 0.5, std 0.5, not
    ImageNet's) -> the data is normalized with those statistics and the export works with pipeline()."""
    model, proc = _vit()
    model.save_pretrained(tmp_path / "float")
    proc.save_pretrained(tmp_path / "float")
    data = _image_folder(tmp_path / "images")
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "float"))
    data_args = DataArguments(dataset_name=str(data))
    prepared = prepare(model_args, data_args, seed=0)
    assert prepared.processor is not None and list(prepared.processor.image_mean) == [0.5] * 3
    # the loader normalized with (x - 0.5) / 0.5: every value lies in [-1, 1] (ImageNet stats reach ~2.6)
    pixels = torch.stack([prepared.splits.train[i]["pixel_values"] for i in range(4)])
    assert pixels.min() >= -1.0 - 1e-6 and pixels.max() <= 1.0 + 1e-6 and pixels.min() < -0.9
    training = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
    )
    msq_args = MSQArguments(init_bits=6, target_compression=8.0, prune_interval=1)
    result = train_and_export(
        prepared, training, model_args, data_args, msq_args, RunArguments(write_report=False), run_name="t"
    )
    classify = pipeline("image-classification", model=str(result.export_dir))
    assert {p["label"] for p in classify(_image())} <= {"cat", "dog"}


# -- raw timm models ------------------------------------------------------------------------------
RAW_TIMM = ["timm/test_resnet", "timm/test_vit"]


def _raw_timm_export(name: str, directory: Path) -> TimmWrapperImageProcessor:
    model = TINY_MODELS[name]()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=6))
    model.eval()
    proc = timm_processor(model, IMAGE_SIZE, [0.5] * 3, [0.25] * 3)
    record_preprocessing(model, proc, LABELS)
    msq_hf.export(model, directory, processor=proc)
    return proc


@pytest.mark.parametrize("name", RAW_TIMM)
def test_raw_timm_export_works_with_auto_model_and_pipeline(name: str, tmp_path: Path) -> None:
    out = tmp_path / "export"
    proc = _raw_timm_export(name, out)
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]  # the training size, not timm's
    assert config["pretrained_cfg"]["mean"] == [0.5] * 3 and config["label_names"] == LABELS
    wrapped = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    raw = msq_hf.from_pretrained(out).eval()
    assert isinstance(wrapped, TimmWrapperForImageClassification) and not isinstance(raw, PreTrainedModel)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(wrapped(pixel_values=x).logits, raw(x))
    assert json.loads((out / "config.json").read_text()) == config  # nothing rewritten on load
    _check_pipeline(out, proc)


def test_raw_timm_export_is_verified_when_loaded_by_transformers(tmp_path: Path) -> None:
    """The manifest still guards an export that transformers loads: config.json (which holds the processor) is
    hashed, the weight file is size-checked."""
    out = tmp_path / "export"
    _raw_timm_export("timm/test_resnet", out)
    config_path = out / "config.json"
    original = config_path.read_text()
    config_path.write_text(original.replace('"std": [\n      0.25', '"std": [\n      0.26'))
    assert config_path.read_text() != original
    with pytest.raises(MSQIntegrityError, match="config.json fails its sha256"):
        AutoModelForImageClassification.from_pretrained(str(out))
    with pytest.raises(ValueError, match="config.json fails its sha256"):  # pipeline() wraps the loader's error
        pipeline("image-classification", model=str(out))
    config_path.write_text(original)
    weights = out / "msq_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(MSQIntegrityError, match="msq_model.safetensors has"):
        AutoModelForImageClassification.from_pretrained(str(out))


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST not installed (bash scripts/setup_data.sh)")
def test_cli_demo_export_works_with_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``msq-hf train`` (timm ``resnet20_cifar`` on Fashion-MNIST padded 28 -> 32): the pipeline's processor
    reproduces the loader's pixels exactly and labels with the dataset's class names."""
    monkeypatch.setenv("MSQ_HF_COMPILE", "0")
    argv = ["train", "--train-limit", "64", "--eval-limit", "32", "--max-steps", "2", "--batch-size", "32"]
    argv += ["--hessian-probes", "1", "--hessian-batch-size", "8", "--threads", "1", "--no-progress"]
    assert cli_main([*argv, "--output", str(tmp_path / "run")]) == 0
    export_dir = tmp_path / "run" / "export"
    classify = pipeline("image-classification", model=str(export_dir), top_k=NUM_CLASSES)
    image = (np.random.default_rng(0).random((28, 28)) * 255).astype("uint8")  # a Fashion-MNIST-shaped image
    loader = to_pixel_values(image[None], 32, 3, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 255.0, "auto")
    pixels = classify.image_processor(Image.fromarray(image).convert("RGB"))["pixel_values"]
    assert torch.equal(pixels, torch.from_numpy(loader))
    predictions = classify(Image.fromarray(image))
    raw = msq_hf.from_pretrained(export_dir).eval()
    assert type(raw).__name__ == "ResNetCifar"
    with torch.no_grad():
        probs = raw(pixels).softmax(-1)[0]
    names = json.loads((export_dir / "config.json").read_text())["label_names"]
    assert names[:2] == ["T-shirt/top", "Trouser"]
    by_label = {p["label"]: p["score"] for p in predictions}
    torch.testing.assert_close(torch.tensor([by_label[n] for n in names]), probs, rtol=1e-5, atol=1e-6)
