"""``msq_hf.export``: write a bit-packed, self-describing export of an MSQ model and optionally push it.

The folder layout is declared in :mod:`msq_hf.io.format`; :mod:`msq_hf.io.files` makes the folder appear
atomically; transformers models are written through ``save_pretrained`` with the packed state dict handed to
:class:`~msq_hf.integrations.transformers.MSQQuantizer`, raw timm models through timm's config writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from msq_hf.config import FORMAT_VERSION, MSQConfig
from msq_hf.errors import MSQExportError
from msq_hf.integrations.timm import save_timm_config, timm_data_config
from msq_hf.integrations.transformers import GUARD_KEY, LOAD_GUARD, MSQQuantizer
from msq_hf.io import card
from msq_hf.io.files import (
    Overwrite,
    atomic_directory,
    check_target,
    json_safe,
    push_export,
    save_safetensors,
    source_folders,
    write_json,
)
from msq_hf.io.format import (
    CARD_NAME,
    CONFIG_NAME,
    CONFIG_WEIGHTS_KEY,
    FORMAT_NAME,
    MANIFEST_NAME,
    PLOT_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    compute_totals,
    file_entry,
    packed_metadata,
    packed_state_dict,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# export


@dataclass
class ExportResult:
    """What ``msq_hf.export`` wrote."""

    directory: Path
    files: dict[str, int]  # file name -> bytes
    weight_files: list[str]
    weight_bytes: int  # bytes of the safetensors weight files on disk
    packed_bytes: int  # bytes of all weight_packed tensors
    unquantized_bytes: int  # bytes of every other tensor
    float_bytes: int  # bytes the same tensors take unquantized (quantized weights at their float dtype)
    compression_ratio: float  # paper accounting (magnitude bits)
    storage_compression_ratio: float  # incl. the sign bit: what the bitstream really holds
    average_bits: float
    bit_scheme: dict[str, int]
    manifest: dict[str, Any] = field(repr=False)
    repo_id: str | None = None
    commit_url: str | None = None

    @property
    def size_ratio(self) -> float:
        """``float_bytes / weight_bytes``: measured size reduction of the weight files."""
        return self.float_bytes / max(self.weight_bytes, 1)


def _model_kind(model: nn.Module) -> str:
    if isinstance(model, PreTrainedModel):
        return "hf"
    if getattr(model, "pretrained_cfg", None) is not None and hasattr(model, "forward_features"):
        return "timm"
    raise MSQExportError(
        f"cannot export a {type(model).__name__}: msq_hf.export supports transformers "
        "PreTrainedModel (incl. TimmWrapperForImageClassification) and timm models"
    )


def _model_config(model: nn.Module) -> MSQConfig:
    cfg = getattr(model, "msq_config", None)
    if cfg is None:
        quantizer = getattr(model, "hf_quantizer", None)
        cfg = getattr(quantizer, "quantization_config", None)
    if not isinstance(cfg, MSQConfig):
        raise MSQExportError(
            f"{type(model).__name__} carries no MSQConfig (model.msq_config); quantize it with "
            "msq_hf.quantize_model before exporting"
        )
    return cfg


def _versions() -> dict[str, str]:
    """Versions of the packages that wrote the export (the manifest's ``versions``)."""
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for dist, key in (("msq-hf", "msq_hf"), ("safetensors", "safetensors"), ("timm", "timm")):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):  # e.g. run from a source tree
            out[key] = importlib_metadata.version(dist)
    return out


def _base_model(model: nn.Module) -> str | None:
    """The Hub repo the float weights came from, when the model says so (``config.name_or_path``)."""
    config = getattr(model, "config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    name = getattr(config, "name_or_path", None)
    if not name or getattr(quantizer, "pre_quantized", False) or os.path.exists(name):
        return None  # built locally, loaded from a folder, or already an MSQ checkpoint/export
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name if "/" in name else None


def _checkpoint_keys(
    model: nn.Module, kind: str, state: dict[str, torch.Tensor], layers: dict[str, dict]
) -> dict[str, str | None]:
    """On-disk key of each layer's ``weight_packed`` (transformers renames legacy layouts on save)."""
    keys = {n: (f"{n}.weight_packed" if n else "weight_packed") for n in layers}
    if kind != "hf":
        return dict(keys)
    try:
        renamed = revert_weight_conversion(model, dict(state))
    except Exception as exc:  # the mapping is only used for early, friendlier checks
        logger.warning("msq_hf: could not compute checkpoint key names (%s); load-time checks still apply", exc)
        return {n: None for n in layers}
    by_id = {id(t): k for k, t in renamed.items()}
    return {n: by_id.get(id(state[k])) for n, k in keys.items()}


def _rename_hf_weights(directory: Path) -> tuple[list[str], str]:
    """``model*.safetensors`` written by save_pretrained -> ``msq_model*.safetensors`` (+ index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        renames = {f: "msq_" + f for f in sorted(set(data["weight_map"].values()))}
        for old, new in renames.items():
            os.replace(directory / old, directory / new)
        data["weight_map"] = {k: renames[v] for k, v in data["weight_map"].items()}
        write_json(directory / WEIGHTS_INDEX_NAME, data)
        index.unlink()
        return sorted(renames.values()), WEIGHTS_INDEX_NAME
    single = directory / "model.safetensors"
    if not single.exists():
        raise MSQExportError(
            f"save_pretrained wrote no model.safetensors in {directory}: {sorted(p.name for p in directory.iterdir())}"
        )
    os.replace(single, directory / WEIGHTS_NAME)
    return [WEIGHTS_NAME], WEIGHTS_NAME


@contextlib.contextmanager
def _packed_save(model: nn.Module, state: dict[str, torch.Tensor], cfg: MSQConfig) -> Iterator[None]:
    """Let ``save_pretrained`` write ``state`` and ``cfg``; the model's quantizer and config are restored after."""
    own = getattr(model, "hf_quantizer", None)
    quantizer = own if isinstance(own, MSQQuantizer) else MSQQuantizer(cfg)
    hf_config = model.config
    old_qc = getattr(hf_config, "quantization_config", None)
    model.hf_quantizer = quantizer
    try:
        with quantizer.exporting(state, cfg):
            yield
    finally:
        if own is None:
            del model.hf_quantizer
        else:
            model.hf_quantizer = own
        if old_qc is not None:
            hf_config.quantization_config = old_qc
        elif hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config


def _write_hf(
    model: nn.Module,
    tmp: Path,
    cfg: MSQConfig,
    state: dict[str, torch.Tensor],
    max_shard_size: int | str | None,
    data_config: dict[str, Any] | None,
) -> tuple[list[str], str, dict[str, Any]]:
    with _packed_save(model, state, cfg):
        # the class method: the instance's save_pretrained (msq_hf.io.save) is the one that calls export()
        type(model).save_pretrained(model, tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    weight_files, weights_entry = _rename_hf_weights(tmp)
    config = json.loads((tmp / CONFIG_NAME).read_text())
    config[CONFIG_WEIGHTS_KEY] = weights_entry
    config[GUARD_KEY] = LOAD_GUARD  # transformers without msq_hf stops here and prints it
    if data_config and isinstance(config.get("pretrained_cfg"), dict):  # TimmWrapper: its processor lives here
        config["pretrained_cfg"].update(data_config)
    write_json(tmp / CONFIG_NAME, json_safe(config, CONFIG_NAME))
    info = {"class": type(model).__name__, "model_type": getattr(model.config, "model_type", None)}
    return weight_files, weights_entry, info


def _write_timm(
    model: nn.Module,
    tmp: Path,
    cfg: MSQConfig,
    state: dict[str, torch.Tensor],
    max_shard_size: int | str | None,
    data_config: dict[str, Any] | None,
) -> tuple[list[str], str, dict[str, Any]]:
    weight_files, weights_entry = save_safetensors(state, tmp, packed_metadata(), max_shard_size)
    config = save_timm_config(model, tmp / CONFIG_NAME, cfg, weights_entry, data_config=data_config)
    info = {k: config[k] for k in ("architecture", "num_classes", "model_args")}
    license_name = (config.get("pretrained_cfg") or {}).get("license")
    if isinstance(license_name, str):
        info["license"] = license_name
    return weight_files, weights_entry, info


def export(
    model: nn.Module,
    save_directory: str | os.PathLike,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    max_shard_size: int | str | None = None,
    *,
    overwrite: Overwrite = False,
    processor: Any = None,
    processing_class: Any = None,
    verify: bool = True,
    card_data: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write a bit-packed, self-describing export of an MSQ model and optionally push it to the Hub.

    Args:
        model: an MSQ-quantized transformers model (incl. ``TimmWrapperForImageClassification``) or timm
            model, or a model loaded from an export. Neither the model nor its ``MSQConfig`` is modified.
        save_directory: target folder. Written atomically: everything goes to a temporary sibling folder
            that is renamed into place at the end, so a failure leaves neither a partial folder nor
            temporary files. An existing non-empty folder is refused unless ``overwrite=True``, which only
            replaces an msq_hf export; ``overwrite="force"`` replaces any other folder (docs/export.md).
        push_to_hub, repo_id, private, token, commit_message: upload the finished folder with
            ``HfApi.create_repo(exist_ok=True)`` + ``upload_folder`` (``repo_id`` is required).
        max_shard_size: split the weights into several safetensors files above this size.
        processor: the model's image processor, saved alongside (``processor.save_pretrained``:
            ``preprocessor_config.json``) and hashed in the manifest, so that
            ``transformers.pipeline("image-classification", model=save_directory)`` preprocesses images the
            way training did. A ``TimmWrapperImageProcessor`` (TimmWrapper and raw timm models, e.g.
            :func:`msq_hf.integrations.timm.timm_processor`) goes into ``config.json``'s ``pretrained_cfg``
            instead (input size, interpolation, mean/std, crop), where transformers and timm read it. Without
            one, an HF export holds no processor (``pipeline`` needs ``image_processor=...``) and a timm export
            keeps the model's own ``pretrained_cfg``.
        processing_class: the same under the ``Trainer``'s name: ``export(trainer.model, d,
            processing_class=trainer.processing_class)``. Give one of the two.
        verify: decode every packed layer again and require bit-exact equality with the model.
        card_data: model card metadata (:data:`msq_hf.io.card.CARD_KEYS`): ``base_model`` (Hub id of the float
            weights; default: the model's ``name_or_path`` when it is a Hub id), ``datasets``, ``license``,
            ``tags``, ``model_name``, ``metrics`` (e.g. ``{"accuracy": 0.91}``, rendered as ``model-index``
            evaluation results on ``datasets[0]``) and ``dataset_split``. Kept in the manifest (``card``).

    Returns an :class:`ExportResult` with the files, their sizes and the compression figures.
    """
    if push_to_hub and not repo_id:
        raise MSQExportError("push_to_hub=True needs repo_id='owner/name'")
    if processor is not None and processing_class is not None and processor is not processing_class:
        raise MSQExportError("export() got both processor= and processing_class=: pass one image processor")
    processor = processor if processor is not None else processing_class
    data_config = timm_data_config(processor)  # a timm processor goes into config.json's pretrained_cfg
    card_meta = card.check_card_data(card_data)
    sources = source_folders(model)
    target = check_target(save_directory, overwrite, sources)
    kind = _model_kind(model)
    base_cfg = _model_config(model)

    state, layers = packed_state_dict(model, verify=verify)
    scheme = {n: info["bits"] for n, info in layers.items()}
    cfg = base_cfg.copy(bit_scheme=scheme, msq_format="packed", dequantize=False)
    for name, key in _checkpoint_keys(model, kind, state, layers).items():
        layers[name]["checkpoint_key"] = key
    totals = compute_totals(state, layers)

    with atomic_directory(target, overwrite, sources) as tmp:
        write = _write_hf if kind == "hf" else _write_timm
        weight_files, weights_entry, model_info = write(model, tmp, cfg, state, max_shard_size, data_config)
        model_info = {"kind": kind, **model_info, "dtype": str(next(iter(layers.values()))["dtype"])}
        if base_model := card_meta.pop("base_model", None) or (_base_model(model) if kind == "hf" else None):
            model_info["base_model"] = base_model
        if processor is not None and data_config is None:
            processor.save_pretrained(tmp)  # (TimmWrapperImageProcessor: data_config, saved in config.json)
        # every file written so far (config, weights, index, processor files) is hashed; the manifest, card and
        # plot come after and are never read on load
        files = {p.name: file_entry(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "model": model_info,
            "wnorm": cfg.wnorm,
            "qat_grid": cfg.qat_grid,
            "act_bits": cfg.act_bits,
            "weights": weights_entry,
            "layers": layers,
            "totals": {**totals, "weight_file_bytes": sum(files[f]["size"] for f in weight_files)},
            "files": files,
            **({"card": card_meta} if card_meta else {}),
        }
        write_json(tmp / MANIFEST_NAME, manifest)
        card.plot_bit_scheme(manifest, tmp / PLOT_NAME)
        card.build_model_card(manifest, repo_id=repo_id).save(tmp / CARD_NAME)

    result = ExportResult(
        directory=target,
        files={p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file()},
        weight_files=weight_files,
        weight_bytes=manifest["totals"]["weight_file_bytes"],
        packed_bytes=totals["quantized_bytes"],
        unquantized_bytes=totals["unquantized_bytes"],
        float_bytes=totals["float_bytes"],
        compression_ratio=totals["compression_ratio"],
        storage_compression_ratio=totals["storage_compression_ratio"],
        average_bits=totals["average_bits"],
        bit_scheme=scheme,
        manifest=manifest,
    )
    if push_to_hub:
        result.repo_id, result.commit_url = push_export(
            target, repo_id, private=private, token=token, commit_message=commit_message
        )
    return result


__all__ = ["ExportResult", "export", "push_export"]
