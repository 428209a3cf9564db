"""Which network ``--model`` names, and building it with as many outputs as the data has classes.

:func:`resolve_model` decides what a reference is without building anything (so the input size is known
before the data loads); :func:`build_model` builds the float network. A reference is one of:

* a timm model name (``resnet20_cifar``, ``deit_tiny_patch16_224``), a timm Hub id (``timm/<name>.<tag>``,
  ``hf-hub:<owner>/<repo>``);
* a local folder: a timm ``save_for_hf`` folder, an ``MSQTrainer`` checkpoint of a timm model, a transformers
  ``save_pretrained`` folder or an ``msq_hf`` export (a folder holding ``checkpoint-N`` subfolders means
  its newest checkpoint);
* a transformers Hub model id (``owner/name``).

A quantized starting point (checkpoint or export) is dequantized: MSQ restarts from ``init_bits``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    ViTImageProcessor,
)
from transformers.trainer_utils import get_last_checkpoint

import msq_hf
from msq_hf.convert import iter_msq_layers
from msq_hf.data import IMAGENET_MEAN, IMAGENET_STD
from msq_hf.pipeline.arguments import ModelArguments

DEFAULT_IMAGE_SIZE = 224  # timm's and transformers' usual input when a model states none
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle weight files
KINDS = ("timm", "timm_dir", "timm_checkpoint", "transformers", "export")


@dataclass(frozen=True)
class ModelSpec:
    """What a model reference names. ``kind`` is one of :data:`KINDS`; ``ref`` the timm name, folder or Hub id."""

    kind: str
    ref: str
    image_size: int
    channels: int = 3
    config: Mapping[str, Any] = field(default_factory=dict)  # the folder's config.json, if any


def read_config(path: Path) -> dict[str, Any]:
    """A ``config.json`` as a dict; ``ValueError`` naming the file when it is not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def refuse_pickle_weights(folder: Path, what: str) -> None:
    """``ValueError`` when ``folder`` holds its weights only as pickle files (``pytorch_model.bin``, ``*.pt``...).

    Unpickling runs code chosen by whoever wrote the file, so msq_hf never loads one (not even with
    ``torch.load(weights_only=True)``, whose unpickler has had escapes); only safetensors weights are read.
    """
    if any(folder.glob("*.safetensors")):
        return  # transformers and timm prefer these; e.g. optimizer.pt next to them is never read
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise ValueError(
            f"{what} {folder}: its weights are only in pickle files ({', '.join(pickles)}), which msq_hf never "
            "loads (unpickling can run arbitrary code); convert a checkpoint you trust to safetensors first "
            "(transformers: from_pretrained + save_pretrained; timm: timm.models.save_for_hf)"
        )


def _timm_input_size(name: str) -> int:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size:
            return int(cfg.input_size[-1])
    except Exception:  # noqa: BLE001 - unknown tag or hf-hub id: fall back to the usual ImageNet size
        pass
    return DEFAULT_IMAGE_SIZE


def _hf_image_size(config: Mapping[str, Any]) -> int:
    size = config.get("image_size")
    if size is None and isinstance(config.get("pretrained_cfg"), dict):  # TimmWrapper configs
        size = (config["pretrained_cfg"].get("input_size") or [DEFAULT_IMAGE_SIZE])[-1]
    if isinstance(size, (list, tuple)):
        size = size[-1]
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return int(size or DEFAULT_IMAGE_SIZE)


def timm_name(name: str) -> str | None:
    """The timm model name for ``name`` (``timm/<name>`` Hub ids included), or None if timm has no such model."""
    bare = name[len("timm/") :] if name.startswith("timm/") else name
    if bare.startswith("hf-hub:"):
        return bare
    return bare if timm.is_model(bare) else None


def _resolve_folder(name: str, path: Path) -> ModelSpec:
    if not path.is_dir():
        raise ValueError(f"--model {name}: {path} is a file; pass a model folder, a timm name or a Hub model id")
    config_path = path / "config.json"
    if not config_path.is_file() and (latest := get_last_checkpoint(str(path))):
        path, config_path = Path(latest), Path(latest) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"--model {name}: {config_path} is missing (expected a Hugging Face or timm "
            "model folder, an MSQTrainer checkpoint or an msq_hf export)"
        )
    config = read_config(config_path)
    refuse_pickle_weights(path, "--model")
    if config.get("architecture"):  # timm's Hub layout
        if (path / "msq_manifest.json").is_file():
            kind = "export"
        else:
            kind = "timm_checkpoint" if config.get("quantization_config") else "timm_dir"
        size = (config.get("pretrained_cfg") or {}).get("input_size") or [3, _timm_input_size(config["architecture"])]
        return ModelSpec(kind, str(path), int(size[-1]), 3, config)
    kind = "export" if (path / "msq_manifest.json").is_file() else "transformers"
    return ModelSpec(kind, str(path), _hf_image_size(config), int(config.get("num_channels") or 3), config)


def resolve_model(name: str, model_kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
    """Decide what ``name`` is (see the module docstring); ``ValueError``/``FileNotFoundError`` name ``--model``.

    Only a transformers Hub id is looked up (its ``config.json``, for the input size); nothing is built.
    ``model_kwargs["img_size"]`` (timm) overrides the input size of the architecture.
    """
    if not name:
        raise ValueError("--model is empty: pass a timm name, a Hub model id or a local folder")
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_folder(name, path)
    timm_ref = timm_name(name)
    if timm_ref is not None:
        size = (model_kwargs or {}).get("img_size")
        return ModelSpec("timm", timm_ref, int(size) if isinstance(size, int) else _timm_input_size(timm_ref))
    if name.count("/") != 1 or any(c.isspace() for c in name):
        raise ValueError(
            f"--model {name!r} is neither a timm model name, an existing folder nor a Hub model id "
            "(owner/name); e.g. --model resnet20_cifar"
        )
    config = AutoConfig.from_pretrained(name).to_dict()
    return ModelSpec("transformers", name, _hf_image_size(config), int(config.get("num_channels") or 3), config)


def _transformers_model(ref: str, pretrained: bool, names: Sequence[str]) -> nn.Module:
    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {label: i for i, label in enumerate(names)},
    }
    if pretrained:
        # a head trained for other classes is replaced by a fresh one of the right size
        return AutoModelForImageClassification.from_pretrained(
            ref, ignore_mismatched_sizes=True, use_safetensors=True, **labels
        )
    return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(ref, **labels))


def build_model(
    spec: ModelSpec, model_args: ModelArguments, class_names: Sequence[str]
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The float network for ``class_names``, and the ``timm.create_model`` kwargs to record (timm only).

    ``model_args.pretrained``: ``None`` loads the weights a folder, checkpoint, export or transformers Hub id
    holds and builds timm names with random weights; ``True`` also loads timm's pretrained weights (Hub);
    ``False`` builds every architecture with random weights (offline). transformers models get the class
    names as ``config.id2label``. The recorded kwargs let :func:`msq_hf.load_timm_checkpoint` rebuild the
    architecture from a checkpoint.
    """
    names = [str(n) for n in class_names]
    n = len(names)
    kwargs = model_args.timm_kwargs()
    if kwargs and spec.kind not in ("timm", "timm_dir"):
        raise ValueError(
            f"--model_kwargs is only supported for timm models; {spec.ref!r} is a {spec.kind} model "
            "(edit its config.json instead)"
        )
    pretrained = model_args.pretrained
    recorded: dict[str, Any] | None = None
    if spec.kind == "timm":
        model = timm.create_model(spec.ref, pretrained=bool(pretrained), num_classes=n, **kwargs)
        recorded = {**kwargs, "num_classes": n}
    elif spec.kind == "timm_dir":
        model = timm.create_model(f"local-dir:{spec.ref}", pretrained=pretrained is not False, num_classes=n, **kwargs)
        recorded = {**(spec.config.get("model_args") or {}), **kwargs, "num_classes": n}
    elif spec.kind == "timm_checkpoint":
        model = msq_hf.load_timm_checkpoint(spec.ref)
        recorded = {**(spec.config.get("model_args") or {}), "num_classes": n}
    elif spec.kind == "export":
        model = msq_hf.from_pretrained(spec.ref, dequantize=True)
    else:
        model = _transformers_model(spec.ref, pretrained is not False, names)
    if any(True for _ in iter_msq_layers(model)):
        # a quantized starting point: keep its (dequantized) weights, restart MSQ from init_bits
        model = msq_hf.dequantize_model(model)
    if hasattr(model, "pretrained_cfg") and hasattr(model, "reset_classifier"):
        if getattr(model, "num_classes", n) != n:
            model.reset_classifier(n)
    elif getattr(getattr(model, "config", None), "num_labels", n) != n:
        raise ValueError(
            f"--model {spec.ref} has {model.config.num_labels} output classes but the dataset has {n}; "
            f"pass a model with {n} labels"
        )
    return model, recorded


def model_kind(model: nn.Module) -> str:
    """``"transformers"`` for a ``PreTrainedModel`` (``pixel_values=`` forward), else ``"timm"`` (positional)."""
    return "transformers" if isinstance(model, PreTrainedModel) else "timm"


def model_normalization(model: nn.Module, processor: Any = None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input mean/std the model was trained with, or None if unknown.

    From its image processor when given (``image_mean``/``image_std``; a ``TimmWrapperImageProcessor``'s
    ``data_config``), else from timm's ``pretrained_cfg`` (raw timm models, and TimmWrapper's ``timm_model``).
    """
    data_config = getattr(processor, "data_config", None)  # TimmWrapperImageProcessor
    if isinstance(data_config, Mapping) and data_config.get("mean") and data_config.get("std"):
        return tuple(data_config["mean"]), tuple(data_config["std"])
    if processor is not None and getattr(processor, "do_normalize", False):
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None:
            return _per_channel(mean), _per_channel(std)
    for owner in (model, getattr(model, "timm_model", None)):
        cfg = getattr(owner, "pretrained_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("mean") and cfg.get("std"):
            return tuple(cfg["mean"]), tuple(cfg["std"])
    return None


def _per_channel(value: Any) -> tuple[float, ...]:
    """A processor's ``image_mean``/``image_std`` (a list, or one float for every RGB channel) as a tuple."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def _size_field(size: Any, key: str) -> Any:
    # a processor's size is a dict in transformers 4.x and a SizeDict (attributes, not a Mapping) in 5.x
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


def _fit_size(processor: Any, image_size: int) -> None:
    """Make ``processor`` produce ``image_size`` square inputs, the size the network is trained at."""
    size = getattr(processor, "size", None)
    if size is None or not (isinstance(size, Mapping) or hasattr(size, "height")):
        return  # TimmWrapperImageProcessor: its input size is config.json's pretrained_cfg
    if _size_field(size, "shortest_edge") is not None and _size_field(size, "height") is None:
        processor.size = {"shortest_edge": image_size}
    else:
        processor.size = {"height": image_size, "width": image_size}
    crop = getattr(processor, "crop_size", None)
    if crop is not None and (isinstance(crop, Mapping) or hasattr(crop, "height")):
        processor.crop_size = {"height": image_size, "width": image_size}


def image_processor(spec: ModelSpec, model: nn.Module, image_size: int) -> Any | None:
    """The transformers model's own image processor, set to the training input size; None for raw timm models.

    ``AutoImageProcessor`` from the model reference (a Hub id or folder: ``preprocessor_config.json``, or for
    TimmWrapper ``config.json``'s ``pretrained_cfg``). A model that has none (built from a bare config) gets a
    ``ViTImageProcessor`` (resize, rescale, ImageNet mean/std). The processor is what the export carries so
    that ``transformers.pipeline("image-classification", model=export_dir)`` preprocesses images as training did.
    """
    if not isinstance(model, PreTrainedModel):
        return None
    processor = None
    if spec.kind in ("transformers", "export"):
        try:
            processor = AutoImageProcessor.from_pretrained(spec.ref)
        except (OSError, ValueError, KeyError):  # the folder or Hub repo has no image processor
            processor = None
    if processor is None:
        processor = ViTImageProcessor(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    _fit_size(processor, image_size)
    return processor


def set_normalization(processor: Any, mean: Sequence[float], std: Sequence[float]) -> None:
    """Record the mean/std the data was normalized with in ``processor`` (processors with ``image_mean``)."""
    if processor is not None and hasattr(processor, "image_mean"):
        processor.do_normalize = True
        processor.image_mean, processor.image_std = list(mean), list(std)


def logits_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers (``pixel_values=``) or timm (positional) classifier."""
    if isinstance(model, PreTrainedModel):
        return model(pixel_values=pixel_values).logits
    return model(pixel_values)


__all__ = [
    "KINDS",
    "ModelSpec",
    "build_model",
    "image_processor",
    "logits_of",
    "model_kind",
    "model_normalization",
    "refuse_pickle_weights",
    "resolve_model",
    "set_normalization",
    "timm_name",
]
