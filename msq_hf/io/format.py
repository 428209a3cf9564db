"""The ``msq-packed`` export format (version 1), declared once: file names, the packed state dict, the totals.

An export directory holds

* ``msq_model.safetensors`` (or ``msq_model-0000i-of-0000N.safetensors`` + ``msq_model.safetensors.index.json``):
  per quantized layer ``<module>.weight_packed`` / ``weight_scale`` / ``weight_bits`` / ``weight_shape``
  (see ``msq_hf.nn.packed``), every other tensor at its own dtype under its own key; safetensors metadata
  ``format=pt, msq_format=packed, format_version=1``. The file is deliberately *not* called
  ``model.safetensors``: transformers or timm without ``import msq_hf`` then stop with "no file named
  model.safetensors" instead of silently building a float model with random weights.
* ``config.json``: the HF config (``quantization_config`` = the ``MSQConfig`` with ``msq_format="packed"`` and
  the bit scheme keyed by in-memory module names, plus ``msq_weights`` = the weight file name) or, for raw timm
  models, timm's ``save_config_for_hf`` fields (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``) plus the same two keys;
* ``msq_manifest.json``: format, versions, per-layer bits / stored bits / shape / packed bytes, compression
  totals, size and sha256 of every weight file, and how to rebuild the model;
* ``README.md`` (model card) and ``bit_scheme.png`` (bits per layer).

This is the lowest io level: the transformers quantizer (``msq_hf.integrations``) packs state dicts with it,
and ``msq_hf.io.export`` / ``load`` / ``inspect`` write and read the files it names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msq_hf.config import FORMAT_VERSION
from msq_hf.convert import quantized_layers
from msq_hf.errors import MSQExportError, MSQFormatError, MSQIntegrityError
from msq_hf.nn.layers import MSQLayerMixin
from msq_hf.nn.packed import MSQPackedConv2d, MSQPackedMixin, encode_layer, packed_nbytes, stored_bits
from msq_hf.quant.functional import average_bits, compression_ratio

FORMAT_NAME = "msq-packed"
WEIGHTS_NAME = "msq_model.safetensors"
WEIGHTS_INDEX_NAME = "msq_model.safetensors.index.json"
WEIGHTS_PATTERN = "msq_model{suffix}.safetensors"  # huggingface_hub's shard file name pattern
CONFIG_NAME = "config.json"
MANIFEST_NAME = "msq_manifest.json"
CARD_NAME = "README.md"
PLOT_NAME = "bit_scheme.png"
CONFIG_WEIGHTS_KEY = "msq_weights"  # top-level config.json key naming the weight file (or index)
MSQ_STATE_NAME = "msq_state.json"  # the pruning schedule in every MSQTrainer checkpoint


def packed_metadata() -> dict[str, str]:
    """The safetensors metadata of every packed weight file."""
    return {"format": "pt", "msq_format": "packed", "format_version": str(FORMAT_VERSION)}


def check_weights_entry(value: Any, where: str) -> str:
    """``config.json[msq_weights]``: a safetensors file (or index) name inside the export directory."""
    if (
        not isinstance(value, str)
        or os.path.basename(value) != value
        or not value.endswith((".safetensors", ".safetensors.index.json"))
    ):
        raise MSQFormatError(
            f"{where} {CONFIG_WEIGHTS_KEY}={value!r} is invalid: expected a safetensors file name (or index) "
            "inside the export directory"
        )
    return value


# ------------------------------------------------------------------------------------------------
# packed state dict and totals


def layer_info(module: nn.Module, bits: int, wnorm: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """The manifest entry of one quantized layer (``bits``, ``stored_bits``, ``shape``, ``packed_bytes``...)."""
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
            info[name] = layer_info(layer, layer.n_bits, layer.wnorm, tuple(layer.weight.shape), layer.weight.dtype)
        else:
            assert isinstance(layer, MSQPackedMixin)
            info[name] = layer_info(layer, layer.bits, layer.wnorm, layer.expected_shape, layer.weight_dtype)
    return state, info


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return t.numel() * t.element_size()


def compute_totals(state: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, Any]:
    """Compression and size totals of an export (what the manifest, card and report show)."""
    names = list(layers)
    numels = [layers[n]["numel"] for n in names]
    bits = [layers[n]["bits"] for n in names]
    stored = [layers[n]["stored_bits"] for n in names]
    packed_keys = {f"{n}.weight_packed" if n else "weight_packed" for n in names}
    quantized_bytes = sum(tensor_bytes(state[k]) for k in packed_keys if k in state)
    other = {k: v for k, v in state.items() if k not in packed_keys}
    unquantized_bytes = sum(tensor_bytes(v) for v in other.values())
    float_params = sum(v.numel() for k, v in other.items() if v.is_floating_point() and not k.endswith(".weight_scale"))
    float_bytes = sum(
        n * torch.empty((), dtype=getattr(torch, layers[name]["dtype"])).element_size()
        for name, n in zip(names, numels)
    )
    float_bytes += sum(
        tensor_bytes(v) for k, v in other.items() if not k.endswith((".weight_scale", ".weight_bits", ".weight_shape"))
    )
    weighted, unweighted = average_bits(numels, bits)
    return {
        "quantized_layers": len(names),
        "quantized_params": sum(numels),
        "unquantized_params": float_params,
        "compression_ratio": compression_ratio(numels, bits),
        "storage_compression_ratio": compression_ratio(numels, stored),
        "average_bits": weighted,
        "average_bits_unweighted": unweighted,
        "average_stored_bits": average_bits(numels, stored)[0],
        "min_bits": min(bits),
        "max_bits": max(bits),
        "quantized_bytes": quantized_bytes,
        "unquantized_bytes": unquantized_bytes,
        "tensor_bytes": quantized_bytes + unquantized_bytes,
        "float_bytes": float_bytes,
    }


# ------------------------------------------------------------------------------------------------
# reading files


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (no tensor data is read)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise MSQIntegrityError(f"weight file {path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(path.stat().st_size - 8, 100 * 2**20):
            raise MSQIntegrityError(f"weight file {path} has a corrupt safetensors header (length {length})")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MSQIntegrityError(f"weight file {path} has a corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise MSQIntegrityError(f"weight file {path} has a corrupt safetensors header")
    return header


__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "CONFIG_WEIGHTS_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MSQ_STATE_NAME",
    "PLOT_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_PATTERN",
    "check_weights_entry",
    "compute_totals",
    "layer_info",
    "packed_metadata",
    "packed_state_dict",
    "read_safetensors_header",
    "sha256_file",
    "tensor_bytes",
]
