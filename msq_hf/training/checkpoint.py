"""What :class:`~msq_hf.training.trainer.MSQTrainer` adds to a checkpoint folder, and how it is read back.

* ``msq_state.json``: the controller's pruning state (:func:`write_msq_state` / :func:`read_msq_state`), so a
  resumed run ends with the same bit scheme;
* for raw (non-transformers) models, a ``config.json`` that rebuilds them: timm's own layout
  (``save_config_for_hf``) plus ``quantization_config`` with the current bit scheme
  (:func:`write_raw_model_config`); :func:`load_timm_checkpoint` rebuilds a raw timm MSQ model from it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import timm
from safetensors.torch import load_file
from torch import nn
from transformers.utils import SAFE_WEIGHTS_NAME

from msq_hf.config import MSQConfig
from msq_hf.convert import bit_scheme
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
    quantize_model(model, MSQConfig.from_dict(data["quantization_config"]))
    model.load_state_dict(load_file(weights_path), strict=True)
    return model


__all__ = ["load_timm_checkpoint", "read_msq_state", "write_msq_state", "write_raw_model_config"]
