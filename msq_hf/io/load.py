"""``msq_hf.from_pretrained``: load an msq_hf export (local folder or Hub repo) with integrity checks.

Everything is validated first by :func:`msq_hf.io.verify.read_export` (hashes, names, headers, scales); then the
model skeleton's size is compared with the weights present (on the meta device, nothing allocated), and only then
is a model built, from safetensors files only (never ``torch.load``/pickle).

The weight files are read once (:func:`read_weight_file`), each tensor into memory of its own; the hash and the
checks run on those bytes, and a transformers model is built from exactly them (``from_pretrained(state_dict=)``):
the process holds the packed bytes once, and no file mapping stays open behind the model.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig

from msq_hf.errors import MSQFormatError, MSQIntegrityError, MSQMissingFileError
from msq_hf.integrations.timm import load_timm_export
from msq_hf.integrations.transformers import GUARD_KEY, register
from msq_hf.io.format import CONFIG_NAME, MANIFEST_NAME, parse_json
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
# reading the weights: once, into tensors that own their bytes

_DTYPES = {  # safetensors dtype -> torch dtype, for the tensors msq_hf reads into memory
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
_MAX_HEADER = 100 * 2**20  # the limit of msq_hf.io.format.read_safetensors_header


def _fill(fh: Any, buf: torch.Tensor, sha: Any) -> int:
    """Read from raw file ``fh`` straight into the memory of uint8 ``buf`` until it is full or the file ends;
    hash what was read. Returns the number of bytes read."""
    view, got = memoryview(buf.numpy()), 0
    while got < len(view) and (n := fh.readinto(view[got:])):
        got += n
    sha.update(view[:got])
    return got


def _layout(raw: bytes, data_bytes: int) -> tuple[Any, list[tuple[str, torch.dtype, list[int], int]] | None]:
    """The parsed header and its tensors in file order ``(key, dtype, shape, bytes)``, or ``None`` for the tensors
    unless they tile the ``data_bytes`` after the header exactly (the header checks then name the fault)."""
    try:
        header = parse_json(raw, "safetensors header")
    except MSQFormatError:
        return None, None
    parts, pos = [], 0
    try:
        items = sorted(((k, e) for k, e in header.items() if k != "__metadata__"), key=lambda i: i[1]["data_offsets"])
        for key, entry in items:
            dtype, shape, (start, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, start, end)):
                return header, None
            if start != pos or end - start != math.prod(shape) * dtype.itemsize:
                return header, None
            parts.append((key, dtype, shape, end - start))
            pos = end
    except (AttributeError, KeyError, TypeError, ValueError):
        return header, None
    return header, parts if pos == data_bytes else None


def read_weight_file(path: Path, size: int, digest: str | None) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """Read safetensors file ``path`` (``size`` bytes per the manifest) once: ``(header, {key: tensor})``.

    Each tensor's bytes go straight from the file into a tensor of its own: no file mapping stays open (an
    in-place rewrite of the file after loading cannot change the model), no second copy, no storage shared
    between tensors. With ``digest`` the sha256 of exactly the bytes read must match. The tensors are ``None``
    when the header does not describe the data (:func:`msq_hf.io.verify.check_headers` names the fault).
    ``MSQIntegrityError`` for a hash mismatch or a file whose size changed since it was checked. This is the
    ``read_weights`` that :func:`from_pretrained` hands :func:`msq_hf.io.verify.read_export`.
    """
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        head = torch.empty(8, dtype=torch.uint8)
        got = _fill(fh, head, sha)
        length = int.from_bytes(head.numpy().tobytes(), "little") if got == 8 else -1
        header, parts = None, None
        if 0 <= length <= min(size - 8, _MAX_HEADER):
            raw = torch.empty(length, dtype=torch.uint8)
            got += _fill(fh, raw, sha)
            header, parts = _layout(raw.numpy().tobytes(), size - 8 - length)
        tensors = {}
        for key, dtype, shape, nbytes in parts or []:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            got += _fill(fh, buf, sha)
            if sys.byteorder == "big" and dtype.itemsize > 1:  # safetensors stores little-endian
                buf = buf.view(-1, dtype.itemsize).flip(1).reshape(-1)
            tensors[key] = buf.view(dtype).reshape(shape)
        if parts is None:  # nothing to keep, but hash the rest: a corrupt file fails its sha256 check first
            chunk = torch.empty(1 << 20, dtype=torch.uint8)
            while n := _fill(fh, chunk, sha):
                got += n
        got += len(fh.read(1))  # a file that grew since its size was checked
    if got != size:
        raise MSQIntegrityError(f"weight file {path} changed while it was read (its manifest size is {size} bytes)")
    if digest is not None and sha.hexdigest() != digest:
        raise MSQIntegrityError(
            f"{path} fails its sha256 check against {path.parent / MANIFEST_NAME}: the file is corrupt or was modified"
        )
    return header, tensors if parts is not None else None


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
    # transformers opens no weight file (state_dict below), but the quantizer's hook names one: the manifest's
    setattr(hf_config, GUARD_KEY, contents.manifest["weights"])
    if contents.state is None:
        raise ValueError("_load_hf builds from ExportContents.state: call read_export(..., read_weights=...)")
    try:
        # the tensors read and checked by read_export become the model's: the packed bytes are held once, and
        # they are the bytes that were hashed
        model, info = cls.from_pretrained(
            None, config=hf_config, state_dict=contents.state, output_loading_info=True, **kwargs
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
    model.config.name_or_path = model.name_or_path = str(contents.directory)  # what from_pretrained(dir) sets
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
    contents = read_export(directory, verify=verify, read_weights=read_weight_file)
    if contents.kind == "hf":
        return _with_cache(_load_hf(contents, dequantize, **kwargs), decode_cache)
    dtype = kwargs.pop("dtype", None) or getattr(torch, contents.manifest["model"]["dtype"])  # checked name
    if kwargs:
        raise TypeError(
            f"from_pretrained got argument(s) {sorted(kwargs)} that a timm export does not take (only dtype)"
        )
    msq_config = contents.msq_config.copy(dequantize=bool(dequantize))
    shapes = {key: entry["shape"] for key, (_, entry) in contents.tensors.items()}
    state, contents.state = contents.state, None  # the model takes the checked bytes; keep no second reference
    model = load_timm_export(directory, contents.config, msq_config, state, dtype, shapes)
    return _with_cache(model, decode_cache)


def _with_cache(model: nn.Module, option: CacheOption) -> nn.Module:
    set_decode_cache(model, option)
    return model


__all__ = ["ExportContents", "from_pretrained", "read_export", "read_weight_file", "resolve_export_dir"]
