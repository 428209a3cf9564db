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
  totals, size and sha256 of every file the loader reads (``config.json``, the weight files, the index, a saved
  processor's files), and how to rebuild the model;
* ``README.md`` (model card) and ``bit_scheme.png`` (bits per layer): written after the manifest, never read back.

This is the lowest io level: the transformers quantizer (``msq_hf.integrations``) packs state dicts with it,
and ``msq_hf.io.export`` / ``load`` / ``inspect`` write and read the files it names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msq_hf.config import FORMAT_VERSION
from msq_hf.convert import quantized_layers
from msq_hf.errors import MSQExportError, MSQFormatError, MSQIntegrityError, MSQMissingFileError
from msq_hf.nn.codec import encode_layer, packed_nbytes, stored_bits
from msq_hf.nn.layers import TRAINING_TENSORS, MSQLayerMixin
from msq_hf.nn.packed import MSQPackedConv2d, MSQPackedMixin
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
REWIND_NAME = "msq_rewind.safetensors"  # the weights a rewind_weights run goes back to, in checkpoints before it


def packed_metadata() -> dict[str, str]:
    """The safetensors metadata of every packed weight file."""
    return {"format": "pt", "msq_format": "packed", "format_version": str(FORMAT_VERSION)}


WEIGHTS_ENTRIES = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)  # the only values of manifest["weights"]
UNVERIFIED_NAMES = (MANIFEST_NAME, CARD_NAME, PLOT_NAME)  # written after (or as) the manifest: never read on load
MODEL_DTYPES = ("float32", "float16", "bfloat16", "float64")  # dtypes a layer / exported model may have
MAX_JSON_BYTES = 64 * 2**20  # config.json / manifest / index: far above any real export, far below a memory problem
MAX_JSON_DEPTH = 32  # every msq_hf JSON file is at most ~6 levels deep
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_weights_entry(value: Any, where: str) -> str:
    """The weight entry of an export (``manifest["weights"]``): ``msq_model.safetensors`` or its index."""
    if not isinstance(value, str) or value not in WEIGHTS_ENTRIES:
        raise MSQFormatError(
            f"{where} weights={value!r} is invalid: expected {WEIGHTS_NAME!r} or {WEIGHTS_INDEX_NAME!r}"
        )
    return value


def check_file_name(value: Any, where: str) -> str:
    """A plain file name inside the export folder (no directory part, no ``..``), else ``MSQFormatError``."""
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or any(c in value for c in "/\\\x00")
        or os.path.basename(value) != value
    ):
        raise MSQFormatError(f"{where}: file name {value!r} is invalid: expected a plain file name inside the export")
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

    MSQ layers lose their :data:`~msq_hf.nn.layers.TRAINING_TENSORS` and gain the four packed tensors;
    already-packed layers (a loaded export) are taken as they are; every other tensor is kept unchanged. With ``verify``
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
            for key in TRAINING_TENSORS:
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


def layer_totals(layers: dict[str, dict]) -> dict[str, Any]:
    """The totals that follow from the manifest's layers alone (bits, numel, packed bytes of each layer)."""
    numels = [layers[n]["numel"] for n in layers]
    bits = [layers[n]["bits"] for n in layers]
    stored = [layers[n]["stored_bits"] for n in layers]
    weighted, unweighted = average_bits(numels, bits)
    return {
        "quantized_layers": len(layers),
        "quantized_params": sum(numels),
        "compression_ratio": compression_ratio(numels, bits),
        "storage_compression_ratio": compression_ratio(numels, stored),
        "average_bits": weighted,
        "average_bits_unweighted": unweighted,
        "average_stored_bits": average_bits(numels, stored)[0],
        "min_bits": min(bits),
        "max_bits": max(bits),
        "quantized_bytes": sum(layers[n]["packed_bytes"] for n in layers),
    }


def compute_totals(state: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, Any]:
    """Compression and size totals of an export (what the manifest, card and report show)."""
    packed_keys = {f"{n}.weight_packed" if n else "weight_packed" for n in layers}
    other = {k: v for k, v in state.items() if k not in packed_keys}
    unquantized_bytes = sum(tensor_bytes(v) for v in other.values())
    float_params = sum(v.numel() for k, v in other.items() if v.is_floating_point() and not k.endswith(".weight_scale"))
    float_bytes = sum(
        info["numel"] * torch.empty((), dtype=getattr(torch, info["dtype"])).element_size() for info in layers.values()
    )
    float_bytes += sum(
        tensor_bytes(v) for k, v in other.items() if not k.endswith((".weight_scale", ".weight_bits", ".weight_shape"))
    )
    totals = layer_totals(layers)
    totals["quantized_bytes"] = sum(tensor_bytes(state[k]) for k in packed_keys if k in state)
    return {
        **totals,
        "unquantized_params": float_params,
        "unquantized_bytes": unquantized_bytes,
        "tensor_bytes": totals["quantized_bytes"] + unquantized_bytes,
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


def _json_depth(data: Any) -> int:
    """Nesting depth of parsed JSON, computed without recursion."""
    depth, level = 0, [data]
    while level:
        depth += 1
        level = [
            v
            for item in level
            if isinstance(item, (dict, list))
            for v in (item.values() if isinstance(item, dict) else item)
        ]
    return depth


def parse_json(raw: bytes, where: str) -> Any:
    """JSON from untrusted bytes: ``MSQFormatError`` naming ``where`` for bad UTF-8/JSON, deep nesting, NaN."""

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise MSQFormatError(f"{where} is not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MSQFormatError(f"{where} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise MSQFormatError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep: not an msq_hf file")
    return data


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of an export; ``MSQMissingFileError`` (hint ``what``) or ``MSQFormatError``."""
    if not path.is_file():
        raise MSQMissingFileError(f"{path} is missing: {what}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise MSQFormatError(f"{path} is larger than {MAX_JSON_BYTES} bytes: not an msq_hf file")
    data = parse_json(path.read_bytes(), str(path))
    if not isinstance(data, dict):
        raise MSQFormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


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
            header = parse_json(fh.read(length), f"the safetensors header of {path}")
        except MSQFormatError as exc:
            raise MSQIntegrityError(f"weight file {path} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise MSQIntegrityError(f"weight file {path} has a corrupt safetensors header")
    return header


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one file: ``{"size": bytes, "sha256": hex}``."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _manifest_files(manifest: dict[str, Any], where: str) -> dict[str, tuple[int, str]]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise MSQFormatError(f"{where}: 'files' must map every file the loader reads to its size and sha256")
    out = {}
    for name, meta in files.items():
        check_file_name(name, f"{where}: files")
        size, digest = (meta.get("size"), meta.get("sha256")) if isinstance(meta, dict) else (None, None)
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0) or not (
            isinstance(digest, str) and _SHA256.fullmatch(digest)
        ):
            raise MSQFormatError(
                f"{where}: files[{name!r}] is malformed: expected {{'size': <bytes>, 'sha256': <64 hex digits>}}, "
                f"got {str(meta)[:80]}"
            )
        out[name] = (size, digest.lower())  # hex case carries no information
    return out


def index_weight_files(directory: Path) -> dict[str, str]:
    """``weight_map`` of ``msq_model.safetensors.index.json``: tensor key -> plain shard file name."""
    path = directory / WEIGHTS_INDEX_NAME
    weight_map = read_json(path, "a sharded export needs its index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MSQFormatError(f"{path}: 'weight_map' must map tensor names to shard file names")
    for key, name in weight_map.items():
        if not check_file_name(name, f"{path}: weight_map[{key!r}]").endswith(".safetensors"):
            raise MSQFormatError(f"{path}: weight_map[{key!r}]={name!r} is not a .safetensors file")
    return weight_map


def verify_files(directory: Path, manifest: dict[str, Any], verify: bool = True) -> list[Path]:
    """Check every file of ``manifest["files"]`` (size; sha256 of JSON files always, of weight files with
    ``verify``) and return the weight files. ``config.json`` and the weight entry must be listed; for a
    sharded export the index's shard names must be exactly the manifest's ``.safetensors`` files."""
    where = directory / MANIFEST_NAME
    entries = _manifest_files(manifest, str(where))
    weights = check_weights_entry(manifest.get("weights"), str(where))
    for name in (CONFIG_NAME, weights):
        if name not in entries:
            raise MSQFormatError(
                f"{where}: 'files' does not list {name}; every file the loader reads must be hashed "
                "(an export from an older msq_hf: export it again)"
            )
    for name, (size, _) in entries.items():
        path = directory / name
        if not path.is_file():
            raise MSQMissingFileError(f"{path} is missing (listed in {where})")
        if path.stat().st_size != size:
            raise MSQIntegrityError(
                f"{path} has {path.stat().st_size} bytes but {where} says {size}: the file is truncated or was modified"
            )
    for name, (_, digest) in entries.items():
        if (verify or not name.endswith(".safetensors")) and sha256_file(directory / name) != digest:
            raise MSQIntegrityError(
                f"{directory / name} fails its sha256 check against {where}: the file is corrupt or was modified"
            )
    names = sorted(set(index_weight_files(directory).values())) if weights == WEIGHTS_INDEX_NAME else [weights]
    listed = sorted(n for n in entries if n.endswith(".safetensors"))
    if names != listed:
        raise MSQFormatError(
            f"{where}: the weight files {listed} differ from the ones the export loads {names}"
            + (f" (named by {WEIGHTS_INDEX_NAME})" if weights == WEIGHTS_INDEX_NAME else "")
        )
    return [directory / n for n in names]


def export_weights_entry(name_or_path: Any, claimed: Any) -> str:
    """The weight file (or index) transformers must load for an export at ``name_or_path``.

    A local folder: taken from its manifest after :func:`verify_files` (sizes, JSON hashes, shard names),
    never from ``config.json``. A Hub repo id (resolved by transformers itself): ``claimed`` (config.json's
    ``msq_weights``) only if it is one of the two names the format uses.
    """
    directory = Path(str(name_or_path or ""))
    if str(name_or_path or "") and directory.is_dir():
        manifest = read_json(directory / MANIFEST_NAME, "every msq_hf export has a manifest")
        verify_files(directory, manifest, verify=False)
        return manifest["weights"]
    return check_weights_entry(claimed, f"{CONFIG_NAME} {CONFIG_WEIGHTS_KEY}:")


__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "CONFIG_WEIGHTS_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MODEL_DTYPES",
    "MSQ_STATE_NAME",
    "REWIND_NAME",
    "PLOT_NAME",
    "UNVERIFIED_NAMES",
    "WEIGHTS_ENTRIES",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_PATTERN",
    "check_file_name",
    "check_weights_entry",
    "compute_totals",
    "export_weights_entry",
    "file_entry",
    "index_weight_files",
    "layer_info",
    "layer_totals",
    "packed_metadata",
    "packed_state_dict",
    "parse_json",
    "read_json",
    "read_safetensors_header",
    "sha256_file",
    "tensor_bytes",
    "verify_files",
]
