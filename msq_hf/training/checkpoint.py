"""What :class:`~msq_hf.training.trainer.MSQTrainer` adds to a checkpoint folder, and how it is read back.

* ``msq_state.json``: the controller's pruning state (:func:`write_msq_state` / :func:`read_msq_state`), so a
  resumed run ends with the same bit scheme;
* with ``rewind_weights``, before the final round: ``msq_rewind.safetensors``, the weights the run goes back to
  (:class:`msq_hf.training.rewind.WeightSnapshot`, written by ``MSQCallback.on_save``);
* for raw (non-transformers) models, a ``config.json`` that rebuilds them: timm's own layout
  (``save_config_for_hf``) plus ``quantization_config`` with the current bit scheme
  (:func:`write_raw_model_config`); :func:`load_timm_checkpoint` rebuilds a raw timm MSQ model from it.

:func:`load_checkpoint_exact` puts a checkpoint folder back into a live model (resume, best model): every tensor
or nothing. transformers 5 saves ViT/DeiT/Swin checkpoints under their legacy key names (``save_pretrained``
reverts its weight-conversion mapping) while ``Trainer`` reloads them with ``load_state_dict(strict=False)``, which
skips those tensors -- MSQ ``bits``/``k`` buffers included -- with only a "missing keys" warning. Here the keys
are renamed the way ``from_pretrained`` renames them, then loaded strictly, in place (the optimizer keeps its
parameters).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from msq_hf.config import MSQConfig
from msq_hf.convert import bit_scheme
from msq_hf.errors import MSQFormatError, MSQMissingFileError
from msq_hf.integrations.timm import save_timm_config
from msq_hf.io.format import CONFIG_NAME, MSQ_STATE_NAME
from msq_hf.quantize import quantize_model
from msq_hf.training.controller import MSQController

logger = logging.getLogger(__name__)


def write_msq_state(controller: MSQController, directory: str | os.PathLike[str]) -> str:
    """Write ``controller.state_dict()`` as ``<directory>/msq_state.json``; return the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MSQ_STATE_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(controller.state_dict(), handle, indent=1, sort_keys=True)
    os.replace(tmp, path)  # never leave a half-written state in a checkpoint
    return path


def read_msq_state(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``msq_state.json`` of a checkpoint folder, or ``None`` if the folder has none."""
    path = os.path.join(directory, MSQ_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from exc


def require_msq_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`read_msq_state`, but a checkpoint without ``msq_state.json`` is an error (resume, best model)."""
    state = read_msq_state(directory)
    if state is None:
        raise MSQMissingFileError(
            f"{os.path.join(directory, MSQ_STATE_NAME)} is missing: the checkpoint was not written by MSQTrainer or "
            "MSQCallback, so the MSQ pruning schedule cannot be restored. To start a new MSQ run from its weights, "
            "load the model from it and train without resume_from_checkpoint"
        )
    return state


def write_raw_model_config(
    model: nn.Module, config: MSQConfig, directory: str | os.PathLike[str], model_args: dict[str, Any] | None = None
) -> None:
    """``config.json`` of a raw model checkpoint, with ``quantization_config`` = ``config`` + the current bits.

    timm models get timm's layout (``model_args`` override what timm recorded from ``create_model``); other
    modules only their class name (and ``model_args``): they are rebuilt by the user, then ``load_state_dict``.
    """
    saved = config.copy(bit_scheme=bit_scheme(model))
    path = os.path.join(directory, CONFIG_NAME)
    if hasattr(model, "pretrained_cfg"):
        try:
            save_timm_config(model, path, saved, model_args=model_args)
            return
        except Exception as exc:  # the weights are saved anyway; the config is a convenience
            logger.warning(
                "msq_hf: could not write a timm config.json for %s (%s); only weights are saved",
                type(model).__name__,
                exc,
            )
    data: dict[str, Any] = {"model_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    if model_args:
        data["model_args"] = model_args
    data["quantization_config"] = saved.to_dict()
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)


def load_timm_checkpoint(checkpoint_dir: str | os.PathLike[str], **create_kwargs: Any) -> nn.Module:
    """Rebuild a raw timm MSQ model saved by :class:`MSQTrainer` (weights, bits and ``k`` included).

    Uses ``config.json`` (``architecture``, ``num_classes``, ``model_args``, ``quantization_config``)
    and ``model.safetensors`` of the folder; ``create_kwargs`` override ``timm.create_model`` arguments.
    Raises ``FileNotFoundError`` naming the missing file, ``ValueError`` if the config has no timm
    architecture.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, CONFIG_NAME)
    weights_path = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; is {checkpoint_dir} an MSQTrainer checkpoint of a timm model?")
    with open(config_path, encoding="utf-8") as handle:
        data = json.load(handle)
    architecture = data.get("architecture")
    if not architecture:
        raise ValueError(
            f"{config_path} has no 'architecture' field (keys: {sorted(data)}); only timm models can be "
            "rebuilt, load other models yourself and call load_state_dict"
        )
    kwargs: dict[str, Any] = dict(data.get("model_args") or {})
    if "num_classes" in data:
        kwargs.setdefault("num_classes", data["num_classes"])
    kwargs.update(create_kwargs)
    model = timm.create_model(architecture, pretrained=False, **kwargs)
    # the preprocessing the run trained with (input size, mean/std, crop) and its class names: an export of the
    # rebuilt model must record them again, or transformers' pipeline would prepare images with timm's defaults
    recorded = data.get("pretrained_cfg")
    restored = {**model.pretrained_cfg, **recorded} if isinstance(recorded, dict) else dict(model.pretrained_cfg)
    names = data.get("label_names")
    if isinstance(names, list) and len(names) == getattr(model, "num_classes", None):
        restored["label_names"] = [str(n) for n in names]
    model.pretrained_cfg = restored
    quantize_model(model, MSQConfig.from_dict(data["quantization_config"]))
    model.load_state_dict(load_file(weights_path), strict=True)
    return model


# ------------------------------------------------------------------------------------------------
# exact reload of a checkpoint folder (resume, best model)


def read_checkpoint_tensors(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a Trainer checkpoint folder (``model.safetensors``, its sharded index, or
    ``pytorch_model.bin``) under the keys stored in the file(s)."""
    folder = os.fspath(folder)
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    legacy = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(folder, shard)))
        return tensors
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise MSQMissingFileError(
        f"{folder} holds no model weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME}); "
        "is it a Trainer checkpoint folder?"
    )


def _checkpoint_key_map(model: nn.Module, keys: list[str], folder: str) -> dict[str, str]:
    """checkpoint key -> model state-dict key, renamed exactly as ``from_pretrained`` renames them."""
    if not isinstance(model, PreTrainedModel):
        return {key: key for key in keys}
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    own = model.state_dict()
    out: dict[str, str] = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if renamed not in own and key in own:  # as from_pretrained: a key already in the model's own naming
            renamed, pattern = key, None
        if pattern is not None:
            raise MSQFormatError(
                f"{folder}: tensor {key!r} needs transformers' weight conversion {pattern!r} (not a plain "
                f"renaming); reload this checkpoint with {type(model).__name__}.from_pretrained({folder!r})"
            )
        out[key] = renamed
    return out


def load_checkpoint_exact(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Load every tensor of checkpoint ``folder`` into ``model`` in place, or raise and change nothing.

    Keys are renamed as ``from_pretrained`` renames them (transformers' conversion mapping: legacy names such
    as ``vit.encoder.layer.0.attention.attention.query``); the model's weights *and* MSQ buffers (``bits``,
    ``k``) must then match the file one to one. ``MSQFormatError`` names the folder and the missing,
    unexpected or mismatched keys.
    """
    folder = os.fspath(folder)
    stored = read_checkpoint_tensors(folder)
    key_map = _checkpoint_key_map(model, sorted(stored), folder)
    state = {key_map[key]: tensor for key, tensor in stored.items()}
    own = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = sorted(k for k in own if k not in state and not (k in tied and tied[k] in state))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)}/{str(state[k].dtype)[6:]} vs {tuple(own[k].shape)}/{str(own[k].dtype)[6:]}"
        for k in state
        if k in own and (state[k].shape != own[k].shape or state[k].dtype != own[k].dtype)
    )
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
            if keys
        ]
        raise MSQFormatError(
            f"checkpoint {folder} does not match {type(model).__name__}; refusing a partial load. "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=not tied)


__all__ = [
    "load_checkpoint_exact",
    "load_timm_checkpoint",
    "read_checkpoint_tensors",
    "read_msq_state",
    "require_msq_state",
    "write_msq_state",
    "write_raw_model_config",
]
