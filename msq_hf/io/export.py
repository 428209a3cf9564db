"""Bit-packed export of MSQ models (``msq_hf.export``) and the packed-model building used on load.

An export directory (format ``msq-packed``, version 1) holds

* ``msq_model.safetensors`` (or ``msq_model-0000i-of-0000N.safetensors`` + ``msq_model.safetensors.index.json``):
  per quantized layer ``<module>.weight_packed`` / ``weight_scale`` / ``weight_bits`` / ``weight_shape``
  (see ``msq_hf.nn.packed``), every other tensor at its own dtype under its own key; safetensors
  metadata ``format=pt, msq_format=packed, format_version=1``. The file is deliberately *not* called
  ``model.safetensors``: transformers or timm without ``import msq_hf`` then stop with "no file named
  model.safetensors" instead of silently building a float model with random weights.
* ``config.json``: the HF config (``quantization_config`` = the ``MSQConfig`` with ``msq_format="packed"``
  and the bit scheme keyed by in-memory module names, plus ``msq_weights`` = the weight file name that
  ``MSQQuantizer`` hands to transformers) or, for raw timm models, timm's fields (``architecture``,
  ``num_classes``, ``model_args``, ``pretrained_cfg``) plus the same two keys;
* ``msq_manifest.json``: format, versions, per-layer bits / stored bits / shape / packed bytes,
  compression totals, size and sha256 of every weight file, and how to rebuild the model;
* ``README.md`` (model card) and ``bit_scheme.png`` (bits per layer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msq_hf.config import FORMAT_VERSION, MSQConfig
from msq_hf.convert import quantized_layers
from msq_hf.errors import MSQExportError, MSQFormatError
from msq_hf.nn.layers import MSQLayerMixin
from msq_hf.nn.packed import (
    MSQPackedConv2d,
    MSQPackedLinear,
    MSQPackedMixin,
    encode_layer,
    packed_nbytes,
    stored_bits,
)
from msq_hf.quant.functional import MAX_BITS, MIN_BITS, average_bits, compression_ratio

logger = logging.getLogger(__name__)

FORMAT_NAME = "msq-packed"
WEIGHTS_NAME = "msq_model.safetensors"
WEIGHTS_INDEX_NAME = "msq_model.safetensors.index.json"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "msq_manifest.json"
CARD_NAME = "README.md"
PLOT_NAME = "bit_scheme.png"
CONFIG_WEIGHTS_KEY = "msq_weights"  # top-level config.json key naming the weight file (or index)
_TMP_MARK = ".msq-export-tmp-"


# ------------------------------------------------------------------------------------------------
# packed state dict


def _layer_info(module: nn.Module, bits: int, wnorm: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    numel = math.prod(shape)
    groups = getattr(module, "groups", 1)
    return {
        "type": "conv2d" if isinstance(module, (nn.Conv2d, MSQPackedConv2d)) else "linear",
        "bits": int(bits),
        "stored_bits": stored_bits(bits, wnorm),
        "shape": list(shape),
        "numel": numel,
        "packed_bytes": packed_nbytes(numel, bits, wnorm),
        "dtype": str(dtype).removeprefix("torch."),
        "depthwise": bool(groups > 1 and groups == getattr(module, "in_channels", -1)),
    }


def packed_state_dict(model: nn.Module, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The export state dict of ``model`` and per-layer info ``{name: {bits, stored_bits, shape, ...}}``.

    MSQ layers lose ``weight``/``bits``/``k`` and gain the four packed tensors; already-packed layers
    (a loaded export) are taken as they are; every other tensor is kept unchanged. With ``verify``
    each layer's codes are decoded again and compared bit for bit with ``quantized_weight()``.
    """
    layers = quantized_layers(model, required=False)
    if not layers:
        raise MSQExportError(
            f"{type(model).__name__} has no MSQ layers; call msq_hf.quantize_model(model, config) "
            "(and train it) before exporting"
        )
    state = model.state_dict()
    info: dict[str, dict] = {}
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        if isinstance(layer, MSQLayerMixin):
            for key in ("weight", "bits", "k"):
                state.pop(prefix + key, None)
            for key, tensor in encode_layer(name, layer, verify=verify).items():
                state[prefix + key] = tensor
            info[name] = _layer_info(layer, layer.n_bits, layer.wnorm, tuple(layer.weight.shape), layer.weight.dtype)
        else:
            assert isinstance(layer, MSQPackedMixin)
            info[name] = _layer_info(layer, layer.bits, layer.wnorm, layer.expected_shape, layer.weight_dtype)
    return state, info


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def compute_totals(state: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, Any]:
    """Compression and size totals of an export (what the manifest, card and report show)."""
    names = list(layers)
    numels = [layers[n]["numel"] for n in names]
    bits = [layers[n]["bits"] for n in names]
    stored = [layers[n]["stored_bits"] for n in names]
    packed_keys = {f"{n}.weight_packed" if n else "weight_packed" for n in names}
    quantized_bytes = sum(_tensor_bytes(state[k]) for k in packed_keys if k in state)
    other = {k: v for k, v in state.items() if k not in packed_keys}
    unquantized_bytes = sum(_tensor_bytes(v) for v in other.values())
    float_params = sum(v.numel() for k, v in other.items() if v.is_floating_point() and not k.endswith(".weight_scale"))
    float_bytes = sum(
        n * torch.empty((), dtype=getattr(torch, layers[name]["dtype"])).element_size()
        for name, n in zip(names, numels)
    )
    float_bytes += sum(
        _tensor_bytes(v) for k, v in other.items() if not k.endswith((".weight_scale", ".weight_bits", ".weight_shape"))
    )
    weighted, unweighted = average_bits(numels, bits)
    return {
        "quantized_layers": len(names),
        "quantized_params": sum(numels),
        "unquantized_params": float_params,
        "compression_ratio": compression_ratio(numels, bits),
        "storage_compression_ratio": 32.0 * sum(numels) / sum(n * s for n, s in zip(numels, stored)),
        "average_bits": weighted,
        "average_bits_unweighted": unweighted,
        "average_stored_bits": sum(n * s for n, s in zip(numels, stored)) / sum(numels),
        "min_bits": min(bits),
        "max_bits": max(bits),
        "quantized_bytes": quantized_bytes,
        "unquantized_bytes": unquantized_bytes,
        "tensor_bytes": quantized_bytes + unquantized_bytes,
        "float_bytes": float_bytes,
    }


# ------------------------------------------------------------------------------------------------
# building packed models on load (used by MSQQuantizer and the timm loader)


def _config_bits(cfg: MSQConfig) -> dict[str, int]:
    scheme = cfg.bit_scheme or {}
    if not scheme:
        raise MSQFormatError(
            "quantization_config.bit_scheme is empty: a packed MSQ export must list the bits of every quantized layer"
        )
    for name, bits in scheme.items():
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise MSQFormatError(
                f"quantization_config.bit_scheme[{name!r}]={bits!r} is invalid: expected an "
                f"integer in {MIN_BITS}..{MAX_BITS}"
            )
    return dict(scheme)


def prepare_packed_model(model: nn.Module, cfg: MSQConfig, dequantize: bool = False) -> nn.Module:
    """Replace every layer named in ``cfg.bit_scheme`` by an empty packed layer of the right shapes.

    Works on the meta device (transformers) and on real tensors (timm). ``dequantize`` only checks
    that the layers can become plain float layers (no activation quantizers); the swap to
    ``nn.Linear``/``nn.Conv2d`` happens in :func:`finalize_packed_model`, once the codes are loaded.
    """
    from msq_hf.convert import _act_quantizer, _allowed_linear_types, _references, _same_pad_conv_types

    scheme = _config_bits(cfg)
    modules = dict(model.named_modules())
    unknown = sorted(n for n in scheme if n not in modules)
    if unknown:
        sample = ", ".join(n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)))[:300]
        raise MSQFormatError(
            f"quantization_config.bit_scheme names layer(s) {unknown[:5]} that "
            f"{type(model).__name__} does not have (the export comes from a different "
            f"architecture or transformers version); its Linear/Conv2d layers are: {sample}"
        )
    same_pad = _same_pad_conv_types()
    linear_types = _allowed_linear_types()
    order = [n for n in modules if n in scheme]
    if dequantize and cfg.act_bits is not None:
        raise MSQFormatError(
            f"dequantize=True is impossible: the export quantizes layer inputs (act_bits="
            f"{cfg.act_bits}), which plain float layers cannot reproduce"
        )
    refs = _references(model)
    for name in order:
        module = modules[name]
        bits = scheme[name]
        act = None if (cfg.act_skip_first and name == order[0]) else _act_quantizer(cfg, module)
        if act is not None:
            act.to(device=module.weight.device)
        if type(module) in linear_types:
            new: nn.Module = MSQPackedLinear.from_linear(module, bits, cfg.wnorm, act, name)
        elif type(module) is nn.Conv2d or (same_pad and isinstance(module, same_pad)):
            new = MSQPackedConv2d.from_conv(
                module, bits, cfg.wnorm, act, name, same_pad=bool(same_pad) and isinstance(module, same_pad)
            )
        else:
            raise MSQFormatError(
                f"quantization_config.bit_scheme names {name!r}, a {type(module).__name__}; "
                "only nn.Linear / nn.Conv2d layers can hold packed MSQ weights"
            )
        new.train(module.training)
        for parent, attr in refs.get(id(module), []):
            setattr(parent, attr, new)
    model.msq_config = cfg
    return model


def finalize_packed_model(model: nn.Module, cfg: MSQConfig) -> nn.Module:
    """After the tensors are loaded: decode every packed layer (validating it), then either keep the
    packed layers or, with ``cfg.dequantize``, swap them for plain float layers."""
    from msq_hf.convert import forget_quantization, swap_to_float

    layers = {n: m for n, m in model.named_modules() if isinstance(m, MSQPackedMixin)}
    for module in layers.values():
        module.refresh()
    if cfg.dequantize:
        swap_to_float(model, layers)
        forget_quantization(model)
    else:
        model.msq_config = cfg
    hf_config = getattr(model, "config", None)
    for attr in ("transformers_weights", CONFIG_WEIGHTS_KEY):
        # load-time redirection only: a later save_pretrained writes model.safetensors
        if hf_config is not None and hasattr(hf_config, attr):
            with contextlib.suppress(AttributeError):
                delattr(hf_config, attr)
    return model


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
    from transformers import PreTrainedModel

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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    from msq_hf import __version__

    out = {
        "msq_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }
    with contextlib.suppress(ImportError):
        import timm

        out["timm"] = timm.__version__
    return out


def _checkpoint_keys(
    model: nn.Module, kind: str, state: dict[str, torch.Tensor], layers: dict[str, dict]
) -> dict[str, str | None]:
    """On-disk key of each layer's ``weight_packed`` (transformers renames legacy layouts on save)."""
    keys = {n: (f"{n}.weight_packed" if n else "weight_packed") for n in layers}
    if kind != "hf":
        return dict(keys)
    from transformers.core_model_loading import revert_weight_conversion

    try:
        renamed = revert_weight_conversion(model, dict(state))
    except Exception as exc:  # the mapping is only used for early, friendlier checks
        logger.warning("msq_hf: could not compute checkpoint key names (%s); load-time checks still apply", exc)
        return {n: None for n in layers}
    by_id = {id(t): k for k, t in renamed.items()}
    return {n: by_id.get(id(state[k])) for n, k in keys.items()}


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage: give each later alias its own copy
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            tensor = tensor.clone()
        seen.add(ident)
        out[key] = tensor
    return out


def _save_safetensors(
    state: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str], max_shard_size: int | str | None
) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state = _dedupe_shared(state)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="msq_model{suffix}.safetensors", max_shard_size=max_shard_size or "50GB"
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({k: state[k] for k in names}, str(directory / filename), metadata=metadata)
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(_tensor_bytes(t) for t in state.values())},
            "weight_map": split.tensor_to_filename,
        }
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def _rename_hf_weights(directory: Path) -> tuple[list[str], str]:
    """``model*.safetensors`` written by save_pretrained -> ``msq_model*.safetensors`` (+ index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        renames = {f: "msq_" + f for f in sorted(set(data["weight_map"].values()))}
        for old, new in renames.items():
            os.replace(directory / old, directory / new)
        data["weight_map"] = {k: renames[v] for k, v in data["weight_map"].items()}
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
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
def _hf_packed_save(
    model: nn.Module, cfg: MSQConfig, state: dict[str, torch.Tensor], metadata: dict[str, str], scheme: dict[str, int]
) -> Iterator[None]:
    """Make ``save_pretrained`` write the packed state dict and a packed ``quantization_config``."""
    from msq_hf.convert import attach_quantizer
    from msq_hf.integrations.transformers import MSQQuantizer

    quantizer = getattr(model, "hf_quantizer", None)
    attached = False
    if not isinstance(quantizer, MSQQuantizer):
        attach_quantizer(model, cfg)
        quantizer, attached = model.hf_quantizer, True
    qcfg = quantizer.quantization_config
    saved = {k: getattr(qcfg, k) for k in ("bit_scheme", "msq_format", "dequantize")}
    hf_cfg = model.config
    old_qc = getattr(hf_cfg, "quantization_config", None)
    quantizer._msq_export_payload = (state, metadata, scheme)
    hf_cfg.quantization_config = quantizer.quantization_config
    try:
        yield
    finally:
        quantizer._msq_export_payload = None
        for k, v in saved.items():
            setattr(qcfg, k, v)
        if old_qc is not None:
            hf_cfg.quantization_config = old_qc
        if attached:
            for attr in ("hf_quantizer",):
                delattr(model, attr)


def _json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise MSQExportError(f"{what} is not JSON-serialisable ({exc}); the export could not be rebuilt") from exc


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _prepare_target(save_directory: Path, overwrite: bool) -> None:
    if save_directory.exists():
        if not save_directory.is_dir():
            raise MSQExportError(f"export target {save_directory} exists and is not a directory")
        if any(save_directory.iterdir()) and not overwrite:
            raise MSQExportError(
                f"export target {save_directory} exists and is not empty; pass overwrite=True to replace it"
            )


def _apply_umask_permissions(root: Path) -> None:
    """Give the export the permissions a plain ``mkdir``/``open`` would have (``mkdtemp`` and
    ``mkstemp`` create owner-only 0700/0600 entries, which would hide an export from other users)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _install(tmp: Path, target: Path) -> None:
    """Move the finished temp dir into place; an existing target is swapped out, then deleted."""
    _apply_umask_permissions(tmp)
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}old-", dir=target.parent))
        os.replace(target, backup / "old")
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            os.replace(backup / "old", target)
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


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
    overwrite: bool = False,
    processor: Any = None,
    verify: bool = True,
) -> ExportResult:
    """Write a bit-packed, self-describing export of an MSQ model and optionally push it to the Hub.

    Args:
        model: an MSQ-quantized transformers model (incl. ``TimmWrapperForImageClassification``) or timm
            model, or a model loaded from an export.
        save_directory: target folder. Written atomically: everything goes to a temporary sibling folder
            that is renamed into place at the end, so a failure leaves neither a partial folder nor
            temporary files. An existing non-empty folder is refused unless ``overwrite=True``.
        push_to_hub, repo_id, private, token, commit_message: upload the finished folder with
            ``HfApi.create_repo(exist_ok=True)`` + ``upload_folder`` (``repo_id`` is required).
        max_shard_size: split the weights into several safetensors files above this size.
        processor: optional image processor saved alongside (``processor.save_pretrained``).
        verify: decode every packed layer again and require bit-exact equality with the model.

    Returns an :class:`ExportResult` with the files, their sizes and the compression figures.
    """
    if push_to_hub and not repo_id:
        raise MSQExportError("push_to_hub=True needs repo_id='owner/name'")
    target = Path(save_directory).expanduser().resolve()
    _prepare_target(target, overwrite)
    kind = _model_kind(model)
    base_cfg = _model_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)

    state, layers = packed_state_dict(model, verify=verify)
    scheme = {n: info["bits"] for n, info in layers.items()}
    cfg = base_cfg.copy(bit_scheme=scheme, msq_format="packed", dequantize=False)
    checkpoint_keys = _checkpoint_keys(model, kind, state, layers)
    for name, key in checkpoint_keys.items():
        layers[name]["checkpoint_key"] = key
    totals = compute_totals(state, layers)
    metadata = {"format": "pt", "msq_format": "packed", "format_version": str(FORMAT_VERSION)}

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent))
    try:
        model_info: dict[str, Any] = {"kind": kind}
        if kind == "hf":
            model_info.update({"class": type(model).__name__, "model_type": getattr(model.config, "model_type", None)})
            with _hf_packed_save(model, cfg, state, metadata, scheme):
                model.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
            weight_files, weights_entry = _rename_hf_weights(tmp)
            config = json.loads((tmp / CONFIG_NAME).read_text())
            config["quantization_config"] = cfg.to_dict()
            config[CONFIG_WEIGHTS_KEY] = weights_entry
        else:
            from msq_hf.integrations.timm import timm_config

            weight_files = _save_safetensors(state, tmp, metadata, max_shard_size)
            weights_entry = WEIGHTS_INDEX_NAME if (tmp / WEIGHTS_INDEX_NAME).exists() else WEIGHTS_NAME
            config = timm_config(model, cfg, weights_entry)
            model_info.update({k: config[k] for k in ("architecture", "num_classes", "model_args")})
        model_info["dtype"] = str(next(iter(layers.values()))["dtype"])
        _write_json(tmp / CONFIG_NAME, _json_safe(config, "config.json"))
        if processor is not None:
            processor.save_pretrained(tmp)

        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "model": model_info,
            "wnorm": cfg.wnorm,
            "act_bits": cfg.act_bits,
            "weights": weights_entry,
            "layers": layers,
            "totals": totals,
            "files": {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in weight_files},
        }
        manifest["totals"]["weight_file_bytes"] = sum(v["size"] for v in manifest["files"].values())
        _write_json(tmp / MANIFEST_NAME, manifest)

        from msq_hf.io.card import plot_bit_scheme, render_model_card

        plot_bit_scheme(manifest, tmp / PLOT_NAME)
        (tmp / CARD_NAME).write_text(render_model_card(manifest, repo_id=repo_id))
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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


def push_export(
    directory: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> tuple[str, str | None]:
    """Upload an export folder to the Hub (``create_repo(exist_ok=True)`` + ``upload_folder``)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        repo_type="model",
        commit_message=commit_message or "Upload MSQ bit-packed export (msq_hf)",
    )
    return repo_id, getattr(info, "commit_url", None) or (str(info) if info is not None else None)


__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "CONFIG_WEIGHTS_KEY",
    "ExportResult",
    "FORMAT_NAME",
    "MANIFEST_NAME",
    "PLOT_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "compute_totals",
    "export",
    "finalize_packed_model",
    "packed_state_dict",
    "prepare_packed_model",
    "push_export",
    "sha256_file",
]
