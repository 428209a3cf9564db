"""Raw timm models in msq_hf exports: the ``config.json`` that describes them and the rebuild on load.

An export of a raw timm model stores timm's own ``config.json`` (written by ``timm.models._hub.save_config_for_hf``:
``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``) plus
``quantization_config`` and ``msq_weights``. Loading rebuilds the float skeleton with
``timm.create_model(architecture, pretrained=False, **model_args)``, swaps the layers of the bit scheme for packed
layers and loads the safetensors tensors with ``strict=True`` (missing or unexpected keys are errors, unlike
``PyTorchModelHubMixin``'s default ``strict=False``).

Why not a ``PyTorchModelHubMixin`` subclass: the mixin captures the constructor arguments once
(a bit scheme changed during training would be written stale), wraps the timm model in another
module (every key would gain a prefix) and loads non-strictly. ``msq_hf.export(..., push_to_hub=True)``
and ``msq_hf.from_pretrained(repo_id)`` give the same Hub round trip without those pitfalls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models._hub import save_config_for_hf
from torch import nn

from msq_hf.config import MSQConfig
from msq_hf.convert import finalize_packed_model, prepare_packed_model
from msq_hf.errors import MSQExportError, MSQFormatError
from msq_hf.integrations.transformers import attach_quantizer
from msq_hf.io.format import CONFIG_WEIGHTS_KEY


def save_timm_config(
    model: nn.Module,
    path: str | os.PathLike,
    quantization_config: MSQConfig,
    weights_entry: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``config.json`` for a raw timm model with timm's own writer; return what was written.

    timm records the architecture, ``model_args`` (what ``create_model`` was called with, updated by
    ``model_args``) and the preprocessing ``pretrained_cfg``; msq_hf adds ``quantization_config`` and, for an
    export, the weight file name (``msq_weights``). ``MSQExportError`` if timm cannot describe the model.
    """
    arch = dict(getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        raise MSQExportError(
            f"cannot tell which timm architecture this {type(model).__name__} is "
            f"(pretrained_cfg['architecture']={arch!r}); build it with timm.create_model"
        )
    extra: dict[str, Any] = {"quantization_config": quantization_config.to_dict()}
    if weights_entry is not None:
        extra[CONFIG_WEIGHTS_KEY] = weights_entry
    try:
        save_config_for_hf(model, str(path), model_config=extra, model_args=model_args)
    except ValueError as exc:  # timm refuses model_args it cannot write as JSON
        raise MSQExportError(
            f"timm could not describe {arch} ({exc}); pass plain values (ints, strings, lists) to "
            "create_model so the model can be rebuilt"
        ) from exc
    return json.loads(Path(path).read_text())


def build_timm_skeleton(config: dict[str, Any], msq_config: MSQConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The float timm model of ``config.json`` with the bit scheme's layers replaced by packed layers."""
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


__all__ = ["build_timm_skeleton", "load_timm_export", "save_timm_config"]
