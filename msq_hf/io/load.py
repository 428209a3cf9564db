"""``msq_hf.from_pretrained``: load an msq_hf export (local folder or Hub repo) with integrity checks.

Order of checks (each failure raises an ``msq_hf.errors`` exception naming the file/layer/field):
``config.json`` parses and holds a valid packed ``MSQConfig`` -> ``msq_manifest.json`` parses, has a
known format name and version -> manifest layers are self-consistent and agree with the bit scheme ->
every weight file exists with the manifest's size and sha256 -> the safetensors headers hold a
``weight_packed`` of exactly the expected length for every layer. Only then is anything loaded, with
safetensors only (never ``torch.load``/pickle).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig

from msq_hf.config import FORMAT_VERSION, MSQConfig
from msq_hf.errors import MSQFormatError, MSQIntegrityError, MSQMissingFileError
from msq_hf.integrations.timm import load_timm_export
from msq_hf.integrations.transformers import register
from msq_hf.io.format import (
    CONFIG_NAME,
    CONFIG_WEIGHTS_KEY,
    FORMAT_NAME,
    MANIFEST_NAME,
    WEIGHTS_INDEX_NAME,
    check_weights_entry,
    read_safetensors_header,
    sha256_file,
)
from msq_hf.nn.packed import packed_nbytes, stored_bits
from msq_hf.quant.functional import check_bits


@dataclass
class ExportContents:
    """The parsed, validated description of an export folder."""

    directory: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    msq_config: MSQConfig
    weight_files: list[Path]
    kind: str


# ------------------------------------------------------------------------------------------------
# locating


def resolve_export_dir(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local export folder as is, else a Hub repo id fetched with ``snapshot_download`` (Hub cache)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists():
        raise MSQMissingFileError(f"{text} is a file; pass the export directory (or a Hub repo id)")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_local:
        raise MSQMissingFileError(f"export directory {text} does not exist")
    try:
        return Path(
            snapshot_download(
                repo_id=text,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=bool(local_files_only),
                repo_type="model",
            )
        )
    except Exception as exc:  # huggingface_hub has many error types; keep the cause, name the repo
        raise MSQMissingFileError(
            f"{text} is neither a local export directory nor a reachable Hub repo "
            f"(revision={revision or 'main'}): {type(exc).__name__}: {exc}"
        ) from exc


# ------------------------------------------------------------------------------------------------
# reading + validating


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MSQMissingFileError(f"{path} is missing: {what}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MSQFormatError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MSQFormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _is_int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def read_export(directory: str | os.PathLike, verify: bool = True) -> ExportContents:
    """Parse and validate an export folder (see the module docstring); ``verify`` adds sha256 checks."""
    directory = Path(directory)
    config_path, manifest_path = directory / CONFIG_NAME, directory / MANIFEST_NAME
    config = _read_json(config_path, "every msq_hf export has a config.json")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "msq":
        raise MSQFormatError(
            f"{config_path}: quantization_config with quant_method 'msq' is missing; this is not an msq_hf export"
        )
    if qc.get("msq_format") != "packed":
        raise MSQFormatError(
            f"{config_path}: quantization_config.msq_format={qc.get('msq_format')!r}; "
            "msq_hf.from_pretrained reads packed exports (msq_format 'packed'); load a training "
            "checkpoint with AutoModel*.from_pretrained after `import msq_hf`"
        )
    try:
        msq_config = MSQConfig.from_dict(qc)
    except (TypeError, ValueError) as exc:
        raise MSQFormatError(f"{config_path}: quantization_config is invalid: {exc}") from exc

    manifest = _read_json(manifest_path, "every msq_hf export has a manifest; re-export with msq_hf.export")
    if manifest.get("format") != FORMAT_NAME:
        raise MSQFormatError(f"{manifest_path}: format={manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise MSQFormatError(
            f"{manifest_path}: format_version={manifest.get('format_version')!r} is not supported "
            f"by this msq_hf (reads version {FORMAT_VERSION}); upgrade msq_hf"
        )
    kind = (manifest.get("model") or {}).get("kind")
    if kind not in ("hf", "timm"):
        raise MSQFormatError(f"{manifest_path}: model.kind={kind!r}, expected 'hf' or 'timm'")
    if manifest.get("wnorm") != msq_config.wnorm:
        raise MSQFormatError(
            f"{manifest_path}: wnorm={manifest.get('wnorm')!r} disagrees with {config_path} "
            f"(wnorm={msq_config.wnorm!r})"
        )

    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise MSQFormatError(f"{manifest_path}: 'layers' must be a non-empty object")
    for name, info in layers.items():
        where = f"{manifest_path}: layer {name!r}"
        if not isinstance(info, dict):
            raise MSQFormatError(f"{where} must be an object")
        bits = info.get("bits")
        try:
            check_bits(bits, f"{where}: bits")
        except ValueError as exc:
            raise MSQFormatError(str(exc)) from None
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int_in(d, 1, 2**40) for d in shape):
            raise MSQFormatError(f"{where}: shape={shape!r} is invalid: expected a list of positive integers")
        numel = math.prod(shape)
        want = {
            "stored_bits": stored_bits(bits, msq_config.wnorm),
            "numel": numel,
            "packed_bytes": packed_nbytes(numel, bits, msq_config.wnorm),
        }
        for key, value in want.items():
            if info.get(key) != value:
                raise MSQFormatError(
                    f"{where}: {key}={info.get(key)!r} disagrees with bits={bits}, shape={shape} (expected {value})"
                )
    scheme = msq_config.bit_scheme or {}
    only_cfg, only_man = sorted(set(scheme) - set(layers)), sorted(set(layers) - set(scheme))
    if only_cfg or only_man:
        raise MSQFormatError(
            f"{config_path} bit_scheme and {manifest_path} list different layers: only in config "
            f"{only_cfg[:5]}, only in manifest {only_man[:5]}"
        )
    differ = sorted(n for n in scheme if scheme[n] != layers[n]["bits"])
    if differ:
        n = differ[0]
        raise MSQFormatError(
            f"layer {n!r}: {config_path} bit_scheme says {scheme[n]} bits but {manifest_path} "
            f"says {layers[n]['bits']} ({len(differ)} layer(s) disagree)"
        )

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise MSQFormatError(f"{manifest_path}: 'files' must list the weight files with size and sha256")
    weights_entry = config.get(CONFIG_WEIGHTS_KEY) or manifest.get("weights")
    if weights_entry != manifest.get("weights"):
        raise MSQFormatError(
            f"{config_path}: {CONFIG_WEIGHTS_KEY}={weights_entry!r} disagrees with "
            f"{manifest_path} weights={manifest.get('weights')!r}"
        )
    check_weights_entry(weights_entry, str(config_path))
    weight_files = []
    for name, meta in files.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise MSQFormatError(
                f"{manifest_path}: weight file name {name!r} is invalid (a .safetensors file "
                "inside the export directory is expected)"
            )
        path = directory / name
        if not path.is_file():
            raise MSQMissingFileError(f"weight file {path} is missing (listed in {manifest_path})")
        size = path.stat().st_size
        if not isinstance(meta, dict) or size != meta.get("size"):
            raise MSQIntegrityError(
                f"weight file {path} has {size} bytes but {manifest_path} says "
                f"{(meta or {}).get('size')!r}: the file is truncated or was modified"
            )
        if verify and sha256_file(path) != meta.get("sha256"):
            raise MSQIntegrityError(
                f"weight file {path} fails its sha256 check against {manifest_path}: the file "
                "is corrupt or was modified"
            )
        weight_files.append(path)
    if weights_entry == WEIGHTS_INDEX_NAME and not (directory / WEIGHTS_INDEX_NAME).is_file():
        raise MSQMissingFileError(f"{directory / WEIGHTS_INDEX_NAME} is missing (named by {config_path})")
    _check_headers(weight_files, layers)
    return ExportContents(directory, config, manifest, msq_config, weight_files, kind)


def _check_headers(weight_files: list[Path], layers: dict[str, dict]) -> None:
    entries: dict[str, tuple[Path, dict]] = {}
    for path in weight_files:
        header = read_safetensors_header(path)
        meta = header.pop("__metadata__", {}) or {}
        if meta.get("msq_format") != "packed":
            raise MSQFormatError(
                f"weight file {path}: safetensors metadata msq_format={meta.get('msq_format')!r}, expected 'packed'"
            )
        for key, entry in header.items():
            entries[key] = (path, entry)
    for name, info in layers.items():
        key = info.get("checkpoint_key")
        if not key:
            continue  # unknown on-disk name: the loader's own shape checks still apply
        if key not in entries:
            raise MSQFormatError(f"layer {name!r}: tensor {key!r} is missing from the weight files")
        path, entry = entries[key]
        if entry.get("dtype") != "U8" or entry.get("shape") != [info["packed_bytes"]]:
            raise MSQFormatError(
                f"layer {name!r}: {path.name} stores {key!r} as {entry.get('dtype')} "
                f"{entry.get('shape')}, but {info['bits']}-bit codes of shape {info['shape']} "
                f"need U8 [{info['packed_bytes']}]: the bit scheme disagrees with the stored tensors"
            )


# ------------------------------------------------------------------------------------------------
# loading


def _load_hf(contents: ExportContents, dequantize: bool, **kwargs: Any) -> nn.Module:
    register()  # idempotent; `import msq_hf` already did it unless the mappings were reset
    class_name = contents.manifest["model"].get("class")
    cls = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise MSQFormatError(
            f"{contents.directory / MANIFEST_NAME}: model class {class_name!r} is not provided by "
            f"transformers {transformers.__version__}"
        )
    hf_config = AutoConfig.from_pretrained(contents.directory)
    qc = hf_config.quantization_config
    qc = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    qc["dequantize"] = bool(dequantize)
    hf_config.quantization_config = qc
    # the weight file is named explicitly; transformers never keeps this attribute in a saved config.json
    hf_config.transformers_weights = contents.manifest["weights"]
    try:
        model, info = cls.from_pretrained(
            contents.directory, config=hf_config, output_loading_info=True, use_safetensors=True, **kwargs
        )
    except RuntimeError as exc:
        if "mismatched_sizes" not in str(exc):
            raise
        raise MSQFormatError(
            f"{contents.directory}: a stored tensor's size disagrees with the bit scheme in "
            f"config.json (transformers' load report above names it): {exc}"
        ) from exc
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise MSQFormatError(
            f"{contents.directory}: weights do not match {class_name}: "
            + "; ".join(f"{k} {v[:5]}" for k, v in problems.items())
        )
    model.eval()
    return model


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    dequantize: bool = False,
    verify: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Load an msq_hf export (transformers or timm model) from a folder or a Hub repo id.

    Args:
        path_or_repo_id: export folder, or ``owner/name`` on the Hub (downloaded with
            ``huggingface_hub.snapshot_download`` into the Hub cache; ``revision``, ``cache_dir``,
            ``token``, ``local_files_only`` are passed to it).
        dequantize: return plain ``nn.Linear``/``nn.Conv2d`` layers holding the dequantized weights
            (same logits) instead of packed layers.
        verify: check the sha256 of every weight file against the manifest (sizes, header shapes and
            bit widths are always checked).
        kwargs: passed to the transformers ``from_pretrained`` of HF models (e.g. ``device_map``);
            raw timm exports take ``dtype`` only.

    Returns the model in eval mode; packed layers (``MSQPackedLinear``/``MSQPackedConv2d``) reproduce
    the exported fake-quantized model's outputs bit for bit.
    """
    directory = resolve_export_dir(path_or_repo_id, revision, cache_dir, token, local_files_only)
    contents = read_export(directory, verify=verify)
    if contents.kind == "hf":
        return _load_hf(contents, dequantize, **kwargs)
    dtype = kwargs.pop("dtype", None) or getattr(torch, contents.manifest["model"].get("dtype", "float32"))
    if kwargs:
        raise TypeError(
            f"from_pretrained got argument(s) {sorted(kwargs)} that a timm export does not take (only dtype)"
        )
    msq_config = contents.msq_config.copy(dequantize=bool(dequantize))
    return load_timm_export(directory, contents.config, msq_config, contents.weight_files, dtype)


__all__ = ["ExportContents", "from_pretrained", "read_export", "resolve_export_dir"]
