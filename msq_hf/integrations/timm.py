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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._hub import save_config_for_hf
from torch import nn
from transformers import TimmWrapperImageProcessor

from msq_hf.config import MSQConfig
from msq_hf.convert import finalize_packed_model, prepare_packed_model
from msq_hf.errors import MSQExportError, MSQFormatError
from msq_hf.integrations.transformers import GUARD_KEY, LOAD_GUARD, attach_quantizer
from msq_hf.io.format import CONFIG_WEIGHTS_KEY

# what timm's eval transform (and so TimmWrapperImageProcessor, i.e. transformers.pipeline) reads from pretrained_cfg
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def timm_data_config(processor: Any) -> dict[str, Any] | None:
    """The preprocessing a ``TimmWrapperImageProcessor`` applies (timm's data config), None for other processors."""
    data = getattr(processor, "data_config", None)
    if not isinstance(data, Mapping):
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items() if k in DATA_CONFIG_KEYS}


def timm_processor(
    model: nn.Module,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    crop_mode: str = "squash",
    interpolation: str = "bilinear",
) -> TimmWrapperImageProcessor:
    """A ``TimmWrapperImageProcessor`` for a timm model (raw, or TimmWrapper's ``timm_model``) trained at
    ``image_size`` on data normalized with ``mean``/``std``.

    The defaults reproduce msq_hf's image loader (a bilinear, antialiased resize of the whole image to
    ``image_size`` x ``image_size``, then normalization); ``crop_pct`` > 1 with ``crop_mode="center"`` reproduces
    zero padding instead (resize to ``image_size / crop_pct``, then a center crop that pads). Exported through
    ``msq_hf.export(..., processor=...)`` it becomes ``config.json``'s ``pretrained_cfg``, which
    ``transformers.pipeline`` and timm read.
    """
    owner = getattr(model, "timm_model", model)
    cfg = dict(getattr(owner, "pretrained_cfg", None) or {})
    channels = len(mean)
    cfg.update(
        input_size=[channels, image_size, image_size],
        mean=list(mean),
        std=list(std),
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation=interpolation,
    )
    cfg.pop("test_input_size", None)  # timm's eval transform would prefer it over input_size
    return TimmWrapperImageProcessor(pretrained_cfg=cfg)


def record_preprocessing(model: nn.Module, processor: Any, label_names: Sequence[str] | None = None) -> None:
    """Write a timm processor's data config (and the class names) into the model's timm ``pretrained_cfg``.

    timm's convention: ``pretrained_cfg`` says how inputs must be prepared for these weights. A raw timm model's
    ``pretrained_cfg`` (and TimmWrapper's ``config.pretrained_cfg``) is what its checkpoints and exports write to
    ``config.json``, so after this call every one of them carries the training preprocessing, with or without
    ``processor=``. The dicts are replaced, never edited in place (timm may share them between models).
    """
    data = timm_data_config(processor) or {}
    for owner in (model, getattr(model, "timm_model", None)):
        if isinstance(getattr(owner, "pretrained_cfg", None), Mapping):
            labels = {} if label_names is None else {"label_names": [str(n) for n in label_names]}
            owner.pretrained_cfg = {**owner.pretrained_cfg, **data, **labels}
    hf_cfg = getattr(getattr(model, "config", None), "pretrained_cfg", None)
    if isinstance(hf_cfg, Mapping):  # TimmWrapper: class names live in config.id2label
        model.config.pretrained_cfg = {**hf_cfg, **data}


def save_timm_config(
    model: nn.Module,
    path: str | os.PathLike,
    quantization_config: MSQConfig,
    weights_entry: str | None = None,
    model_args: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``config.json`` for a raw timm model with timm's own writer; return what was written.

    timm records the architecture, ``model_args`` (what ``create_model`` was called with, updated by
    ``model_args``) and the preprocessing ``pretrained_cfg`` (updated by ``data_config``: see
    :func:`timm_data_config`); msq_hf adds ``quantization_config``, ``label_names`` (when the model's
    ``pretrained_cfg`` has one name per class) and, for an export, the weight file name (``msq_weights``) and
    the load guard that stops transformers without msq_hf (``transformers_weights``).
    ``MSQExportError`` if timm cannot describe the model.
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
        extra[GUARD_KEY] = LOAD_GUARD  # transformers without msq_hf (TimmWrapper) stops here and prints it
    names = dict(getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if isinstance(names, (list, tuple)) and len(names) == getattr(model, "num_classes", None):
        extra["label_names"] = [str(n) for n in names]  # TimmWrapperConfig's id2label (pipeline's labels)
    try:
        save_config_for_hf(model, str(path), model_config=extra, model_args=model_args, data_config=data_config)
    except ValueError as exc:  # timm refuses model_args it cannot write as JSON
        raise MSQExportError(
            f"timm could not describe {arch} ({exc}); pass plain values (ints, strings, lists) to "
            "create_model so the model can be rebuilt"
        ) from exc
    return json.loads(Path(path).read_text())


# The timm.create_model keyword arguments an export may record: plain architecture hyperparameters. Everything
# else is refused, above all create_model's own file/Hub arguments (checkpoint_path -> torch.load, pretrained,
# pretrained_cfg[_overlay], cache_dir) and build_model_with_cfg's (features_only, feature_cfg, ...).
TIMM_MODEL_ARGS = frozenset(
    {
        # heads, inputs, pooling
        *("num_classes", "in_chans", "img_size", "global_pool", "class_token", "no_embed_class", "reg_tokens"),
        *("fc_norm", "head_hidden_size", "dynamic_img_size", "dynamic_img_pad", "pos_embed", "output_stride"),
        # widths, depths, attention
        *("patch_size", "embed_dim", "embed_dims", "dims", "depth", "depths", "layers", "num_heads", "mlp_ratio"),
        *("mlp_ratios", "window_size", "qkv_bias", "qk_norm", "init_values", "ls_init_value", "layer_scale_init_value"),
        *("stem_width", "stem_type", "base_width", "cardinality", "channel_multiplier", "depth_multiplier"),
        *("width_multiplier", "conv_mlp", "kernel_sizes", "stem_chs", "num_features", "channels", "widths"),
        *("zero_init_last", "avg_down", "down_kernel_size", "block_reduce_first"),
        # layer choices by registered name (resolved from timm's own tables)
        *("act_layer", "norm_layer", "attn_layer", "pad_type", "weight_init"),
        # regularisation (no effect in eval mode, recorded by timm)
        *("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "patch_drop_rate"),
        *("drop_block_rate", "drop_connect_rate"),
    }
)


def _plain(value: Any, depth: int = 0) -> bool:
    """JSON scalars and (nested, at most 2 deep) lists of them: no objects that could carry a config."""
    if isinstance(value, (list, tuple)):
        return depth < 2 and all(_plain(v, depth + 1) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def timm_model_args(config: dict[str, Any]) -> dict[str, Any]:
    """The ``create_model`` keyword arguments of ``config.json``, allow-listed (:data:`TIMM_MODEL_ARGS`)."""
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise MSQFormatError(f"config.json model_args={model_args!r:.80} is invalid: expected a JSON object")
    model_args = dict(model_args)
    if "num_classes" in config:
        model_args.setdefault("num_classes", config["num_classes"])
    for key, value in model_args.items():
        if key not in TIMM_MODEL_ARGS:
            raise MSQFormatError(
                f"config.json model_args.{key} is not allowed: msq_hf passes only plain architecture "
                "hyperparameters (msq_hf.integrations.timm.TIMM_MODEL_ARGS) to timm.create_model"
            )
        if not _plain(value):
            raise MSQFormatError(f"config.json model_args.{key}={value!r:.80} is not a plain value or list")
    return model_args


def build_timm_skeleton(
    config: dict[str, Any], msq_config: MSQConfig, dtype: torch.dtype = torch.float32, device: Any = None
) -> nn.Module:
    """The float timm model of ``config.json`` with the bit scheme's layers replaced by packed layers."""
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise MSQFormatError(f"config.json architecture={arch!r} is not a timm model known to timm {timm.__version__}")
    model_args = timm_model_args(config)
    try:
        with torch.device(device or "cpu"):
            model = timm.create_model(arch, pretrained=False, **model_args)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:  # timm's reactions to arguments it rejects
        raise MSQFormatError(f"config.json model_args {sorted(model_args)} do not fit timm's {arch}: {exc}") from exc
    model = model.to(dtype)
    model.eval()
    return prepare_packed_model(model, msq_config, dequantize=msq_config.dequantize)


def _compare_shapes(directory: Path, arch: Any, expected: dict[str, list[int]], stored: dict[str, list[int]]) -> None:
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise MSQFormatError(
            f"{directory}: the weight file(s) do not match the rebuilt {arch}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, shape in stored.items():
        if list(shape) != list(expected[key]):
            raise MSQFormatError(
                f"{directory}: tensor {key!r} has shape {list(shape)} but the bit scheme "
                f"in config.json needs {list(expected[key])}: a stored tensor's size "
                "disagrees with the bit scheme"
            )


def load_timm_export(
    directory: Path,
    config: dict[str, Any],
    msq_config: MSQConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    stored_shapes: dict[str, list[int]] | None = None,
) -> nn.Module:
    """Rebuild a raw timm export from its checked tensors ``state``: skeleton, packed layers, strict load, decode.

    ``state`` holds the bytes the export checks ran on (:func:`msq_hf.io.load.read_weight_file`), so what was
    verified is what the model gets; the files are not read again. With ``stored_shapes`` (the safetensors headers)
    the skeleton is first built on the meta device and compared key by key, so a config that does not fit the
    weights (e.g. a huge ``num_classes``) allocates nothing.
    """
    if stored_shapes is not None:
        meta = build_timm_skeleton(config, msq_config, dtype, device="meta")
        _compare_shapes(
            directory, config["architecture"], {k: list(v.shape) for k, v in meta.state_dict().items()}, stored_shapes
        )
    model = build_timm_skeleton(config, msq_config, dtype)
    current = model.state_dict()
    _compare_shapes(
        directory,
        config["architecture"],
        {k: list(v.shape) for k, v in current.items()},
        {k: list(v.shape) for k, v in state.items()},
    )
    model.load_state_dict(state, strict=True)  # packed layers decode themselves in a post hook
    model = finalize_packed_model(model, msq_config)
    if not msq_config.dequantize:
        attach_quantizer(model, msq_config, pre_quantized=True)
    model.eval()
    return model


__all__ = [
    "DATA_CONFIG_KEYS",
    "TIMM_MODEL_ARGS",
    "build_timm_skeleton",
    "load_timm_export",
    "record_preprocessing",
    "save_timm_config",
    "timm_data_config",
    "timm_model_args",
    "timm_processor",
]
