"""Raw timm models in msq_hf exports: the ``config.json`` that describes them and the rebuild on load.

An export of a raw timm model stores timm's own ``config.json`` fields (``architecture``,
``num_classes``, ``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg`` -- the layout of
``timm.models.save_for_hf``) plus ``quantization_config`` and ``msq_weights``. Loading rebuilds the
float skeleton with ``timm.create_model(architecture, pretrained=False, **model_args)``, swaps the
layers of the bit scheme for packed layers and loads the safetensors tensors with ``strict=True``
(missing or unexpected keys are errors, unlike ``PyTorchModelHubMixin``'s default ``strict=False``).

Why not a ``PyTorchModelHubMixin`` subclass: the mixin captures the constructor arguments once
(a bit scheme changed during training would be written stale), wraps the timm model in another
module (every key would gain a prefix) and loads non-strictly. ``msq_hf.export(..., push_to_hub=True)``
and ``msq_hf.from_pretrained(repo_id)`` give the same Hub round trip without those pitfalls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msq_hf.config import MSQConfig
from msq_hf.errors import MSQExportError, MSQFormatError


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def timm_model_info(model: nn.Module) -> dict[str, Any]:
    """``architecture``, ``model_args`` and ``num_classes`` needed to rebuild a timm model."""
    import timm

    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = pretrained_cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        raise MSQExportError(
            f"cannot tell which timm architecture this {type(model).__name__} is "
            f"(pretrained_cfg['architecture']={arch!r}); build it with timm.create_model"
        )
    model_args = dict(timm.models.get_model_args(model) or {})
    bad = sorted(k for k, v in model_args.items() if not _jsonable(v))
    if bad:
        raise MSQExportError(
            f"timm model_args {bad} of {arch} are not JSON-serialisable, so the export could "
            "not rebuild the model; pass plain values (ints, strings, lists) to create_model"
        )
    num_classes = int(getattr(model, "num_classes", model_args.get("num_classes", 0)) or 0)
    model_args.setdefault("num_classes", num_classes)
    return {"architecture": arch, "model_args": json.loads(json.dumps(model_args)), "num_classes": num_classes}


def timm_config(model: nn.Module, cfg: MSQConfig, weights_entry: str) -> dict[str, Any]:
    """The ``config.json`` of a raw timm export."""
    info = timm_model_info(model)
    pretrained_cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items() if _jsonable(v)}
    pretrained_cfg["num_classes"] = info["num_classes"]
    return {
        "architecture": info["architecture"],
        "num_classes": info["num_classes"],
        "num_features": int(getattr(model, "num_features", 0) or 0),
        "global_pool": getattr(model, "global_pool", None)
        if isinstance(getattr(model, "global_pool", None), str)
        else info["model_args"].get("global_pool"),
        "model_args": info["model_args"],
        "pretrained_cfg": pretrained_cfg,
        "quantization_config": cfg.to_dict(),
        "msq_weights": weights_entry,
        "msq_model_kind": "timm",
    }


def build_timm_skeleton(config: dict[str, Any], msq_config: MSQConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The float timm model of ``config.json`` with the bit scheme's layers replaced by packed layers."""
    import timm

    from msq_hf.io.export import prepare_packed_model

    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise MSQFormatError(f"config.json architecture={arch!r} is not a timm model known to timm {timm.__version__}")
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise MSQFormatError(f"config.json model_args={model_args!r} is invalid: expected a JSON object")
    model_args = dict(model_args)
    if "num_classes" in config:
        model_args.setdefault("num_classes", config["num_classes"])
    try:
        model = timm.create_model(arch, pretrained=False, **model_args)
    except TypeError as exc:
        raise MSQFormatError(f"config.json model_args {sorted(model_args)} do not fit timm's {arch}: {exc}") from exc
    model = model.to(dtype)
    model.eval()
    return prepare_packed_model(model, msq_config, dequantize=msq_config.dequantize)


def load_timm_export(
    directory: Path,
    config: dict[str, Any],
    msq_config: MSQConfig,
    weight_files: list[Path],
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Rebuild a raw timm export: skeleton, packed layers, strict safetensors load, decode."""
    from safetensors.torch import load_file

    from msq_hf.convert import attach_quantizer
    from msq_hf.io.export import finalize_packed_model

    model = build_timm_skeleton(config, msq_config, dtype)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files:
        state.update(load_file(str(path)))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MSQFormatError(
            f"{directory}: the weight file(s) do not match the rebuilt {config['architecture']}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    current = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(current[key].shape):
            raise MSQFormatError(
                f"{directory}: tensor {key!r} has shape {list(tensor.shape)} but the bit scheme "
                f"in config.json needs {list(current[key].shape)}: a stored tensor's size "
                "disagrees with the bit scheme"
            )
    model.load_state_dict(state, strict=True)  # packed layers decode themselves in a post hook
    model = finalize_packed_model(model, msq_config)
    if not msq_config.dequantize:
        attach_quantizer(model, msq_config, pre_quantized=True)
    model.eval()
    return model


__all__ = ["build_timm_skeleton", "load_timm_export", "timm_config", "timm_model_info"]
