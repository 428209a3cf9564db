"""``msq_hf.from_pretrained``: load an msq_hf export (local folder or Hub repo) with integrity checks.

Everything is validated first by :func:`msq_hf.io.verify.read_export` (hashes, names, headers, scales); then the
model skeleton's size is compared with the weights present (on the meta device, nothing allocated), and only then
is anything loaded, with safetensors only (never ``torch.load``/pickle).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig

from msq_hf.errors import MSQFormatError, MSQMissingFileError
from msq_hf.integrations.timm import load_timm_export
from msq_hf.integrations.transformers import GUARD_KEY, register
from msq_hf.io.format import CONFIG_NAME
from msq_hf.io.verify import ExportContents, read_export
from msq_hf.nn.decode_cache import CacheOption, make_decode_cache
from msq_hf.nn.packed import set_decode_cache

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
# loading


def _check_hf_size(cls: type, hf_config: Any, contents: ExportContents) -> None:
    """``config.json`` must not describe a larger model than the weights hold (e.g. a huge ``num_labels``):
    the skeleton is built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        skeleton = cls._from_config(copy.deepcopy(hf_config))
    needed, stored = sum(p.numel() for p in skeleton.parameters()), contents.stored_numel()
    if needed > stored:
        raise MSQFormatError(
            f"{contents.directory / CONFIG_NAME} describes a {cls.__name__} with {needed:,} parameters, but the "
            f"weight files hold {stored:,} values: config.json does not belong to these weights"
        )


def _load_hf(contents: ExportContents, dequantize: bool, **kwargs: Any) -> nn.Module:
    register()  # idempotent; `import msq_hf` already did it unless the mappings were reset
    class_name = contents.manifest["model"]["class"]
    cls = getattr(transformers, class_name)  # read_export checked it is a PreTrainedModel listed in config.json
    hf_config = AutoConfig.from_pretrained(contents.directory)
    qc = hf_config.quantization_config
    qc = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    qc["dequantize"] = bool(dequantize)
    hf_config.quantization_config = qc
    _check_hf_size(cls, hf_config, contents)
    # the weight file comes from the verified manifest (the quantizer's hook sets the same name again)
    setattr(hf_config, GUARD_KEY, contents.manifest["weights"])
    try:
        model, info = cls.from_pretrained(
            contents.directory, config=hf_config, output_loading_info=True, use_safetensors=True, **kwargs
        )
    except RuntimeError as exc:
        if "mismatched_sizes" not in str(exc):
            raise
        raise MSQFormatError(
            f"{contents.directory}: a stored tensor's size disagrees with the bit scheme in "
            f"config.json (transformers' load report above names it): {str(exc).splitlines()[0]}"
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
    decode_cache: CacheOption = None,
    **kwargs: Any,
) -> nn.Module:
    """Load an msq_hf export (transformers or timm model) from a folder or a Hub repo id.

    Args:
        path_or_repo_id: export folder, or ``owner/name`` on the Hub (downloaded with
            ``huggingface_hub.snapshot_download`` into the Hub cache; ``revision``, ``cache_dir``,
            ``token``, ``local_files_only`` are passed to it).
        dequantize: return plain ``nn.Linear``/``nn.Conv2d`` layers holding the dequantized weights
            (same logits) instead of packed layers.
        verify: check the sha256 of every weight file against the manifest. ``verify=False`` skips only that
            pass: sizes, the sha256 of config.json / the index / processor files, headers, scales and bit
            widths are always checked (docs/export.md, "What is verified").
        decode_cache: packed layers decode their weight in every ``forward`` (``None``, the default: the
            model stays packed in memory); ``"all"`` keeps every decoded weight, an int keeps the most
            recently used ones within that many bytes (docs/packing.md, "Packed inference").
        kwargs: passed to the transformers ``from_pretrained`` of HF models (e.g. ``device_map``);
            raw timm exports take ``dtype`` only.

    Returns the model in eval mode; packed layers (``MSQPackedLinear``/``MSQPackedConv2d``) reproduce
    the exported fake-quantized model's outputs bit for bit.
    """
    directory = resolve_export_dir(path_or_repo_id, revision, cache_dir, token, local_files_only)
    make_decode_cache(decode_cache)  # a bad option fails before anything is read
    contents = read_export(directory, verify=verify)
    if contents.kind == "hf":
        return _with_cache(_load_hf(contents, dequantize, **kwargs), decode_cache)
    dtype = kwargs.pop("dtype", None) or getattr(torch, contents.manifest["model"]["dtype"])  # checked name
    if kwargs:
        raise TypeError(
            f"from_pretrained got argument(s) {sorted(kwargs)} that a timm export does not take (only dtype)"
        )
    msq_config = contents.msq_config.copy(dequantize=bool(dequantize))
    shapes = {key: entry["shape"] for key, (_, entry) in contents.tensors.items()}
    model = load_timm_export(directory, contents.config, msq_config, contents.weight_files, dtype, shapes)
    return _with_cache(model, decode_cache)


def _with_cache(model: nn.Module, option: CacheOption) -> nn.Module:
    set_decode_cache(model, option)
    return model


__all__ = ["ExportContents", "from_pretrained", "read_export", "resolve_export_dir"]
