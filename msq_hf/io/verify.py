"""Validation of an export folder before anything is loaded: ``read_export`` and the safetensors header checks.

Order (each failure raises an ``msq_hf.errors`` exception with a one-line message naming the file/layer/field):
``config.json`` is an msq packed export -> ``msq_manifest.json`` parses, known format and version ->
every file the manifest lists (``config.json``, the weight files, the index, processor files) has its size and
sha256 (``msq_hf.io.format.verify_files``; the weights' sha256 only with ``verify``), the index names exactly the
manifest's weight files -> ``config.json`` and the manifest agree (model class/architecture, wnorm, act_bits,
bit scheme) -> the manifest's layers are self-consistent and its totals are recomputed -> the safetensors files
open, the index places every tensor, every packed tensor has its fixed dtype and shape, every scale decodes to
finite weights -> a ``num_classes``/``num_labels`` is bounded by the weights present. Nothing here builds a model.

For ``inspect`` the weight files are hashed in chunks and only the four-byte scales and one-byte bit widths are
read as tensors. The loader passes ``read_export`` a ``read_weights`` function instead
(:func:`msq_hf.io.load.read_weight_file`): every weight file is then read exactly once into tensors that own their
bytes, the sha256 and the tensor checks run on those bytes, and the model is built from them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from msq_hf.config import FORMAT_VERSION, MSQConfig
from msq_hf.errors import MSQFormatError, MSQIntegrityError
from msq_hf.integrations.timm import timm_model_args
from msq_hf.integrations.transformers import GUARD_KEY, LOAD_GUARD
from msq_hf.io.format import (
    CONFIG_NAME,
    CONFIG_WEIGHTS_KEY,
    FORMAT_NAME,
    MANIFEST_NAME,
    MODEL_DTYPES,
    WEIGHTS_INDEX_NAME,
    index_weight_files,
    layer_totals,
    read_json,
    read_safetensors_header,
    verify_files,
)
from msq_hf.nn.codec import decode_weight, packed_nbytes, stored_bits, top_code
from msq_hf.quant.functional import MAX_BITS, MIN_BITS, check_bits

WeightReader = Callable[[Path, int, "str | None"], "tuple[Any, dict[str, torch.Tensor] | None]"]


@dataclass
class ExportContents:
    """The parsed, validated description of an export folder."""

    directory: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    msq_config: MSQConfig
    weight_files: list[Path]
    kind: str
    totals: dict[str, Any]  # the manifest's totals with the recomputed values
    tensors: dict[str, tuple[Path, dict]]  # on-disk tensor key -> (weight file, safetensors header entry)
    state: dict[str, torch.Tensor] | None = None  # with read_weights: on-disk key -> tensor holding its checked bytes

    def stored_numel(self, dense_only: bool = False) -> int:
        """Number of values the weight files hold (quantized weights counted as weights, not bytes)."""
        packed = {
            k for k in self.tensors if k.endswith(("weight_packed", "weight_scale", "weight_bits", "weight_shape"))
        }
        dense = sum(math.prod(e["shape"]) for k, (_, e) in self.tensors.items() if k not in packed)
        return dense + (0 if dense_only else self.totals["quantized_params"])


def _is_int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _msq_config(config: dict[str, Any], config_path: Path) -> MSQConfig:
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
        return MSQConfig.from_dict(qc)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # untrusted input: any rejection is a format error
        raise MSQFormatError(f"{config_path}: quantization_config is invalid: {exc}") from exc


def _check_model(manifest: dict[str, Any], config: dict[str, Any], where: Path) -> dict[str, Any]:
    """``manifest["model"]``: a known kind and dtype, agreeing with the (hashed) config.json."""
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise MSQFormatError(f"{where}: 'model' must be an object (kind, class/architecture, dtype), got {model!r:.80}")
    kind = model.get("kind")
    if kind not in ("hf", "timm"):
        raise MSQFormatError(f"{where}: model.kind={kind!r:.80}, expected 'hf' or 'timm'")
    if model.get("dtype") not in MODEL_DTYPES:
        raise MSQFormatError(f"{where}: model.dtype={model.get('dtype')!r:.80}, expected one of {list(MODEL_DTYPES)}")
    if kind == "hf":
        name = model.get("class")
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        architectures = config.get("architectures")
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)) or not (
            isinstance(architectures, list) and name in architectures
        ):
            raise MSQFormatError(
                f"{where}: model.class={name!r:.80} is not a transformers {transformers.__version__} model class "
                f"listed in config.json architectures={architectures!r:.80}"
            )
        pairs = {"model_type": config.get("model_type")}
    else:
        pairs = {k: config.get(k) for k in ("architecture", "num_classes", "model_args")}
    for key, value in pairs.items():
        if model.get(key) != value:
            raise MSQFormatError(
                f"{where}: model.{key}={model.get(key)!r:.80} disagrees with config.json ({value!r:.80})"
            )
    return model


def _check_layers(manifest: dict[str, Any], msq_config: MSQConfig, where: Path, config_path: Path) -> dict[str, dict]:
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise MSQFormatError(f"{where}: 'layers' must be a non-empty object")
    for name, info in layers.items():
        at = f"{where}: layer {name!r}"
        if not isinstance(info, dict):
            raise MSQFormatError(f"{at} must be an object")
        bits = info.get("bits")
        try:
            check_bits(bits, f"{at}: bits")
        except ValueError as exc:
            raise MSQFormatError(str(exc)) from None
        shape = info.get("shape")
        if not isinstance(shape, list) or len(shape) not in (2, 4) or not all(_is_int_in(d, 1, 2**40) for d in shape):
            raise MSQFormatError(f"{at}: shape={shape!r:.80} is invalid: expected 2 or 4 positive integers")
        numel = math.prod(shape)
        want = {
            "stored_bits": stored_bits(bits, msq_config.wnorm),
            "numel": numel,
            "packed_bytes": packed_nbytes(numel, bits, msq_config.wnorm),
            "type": "conv2d" if len(shape) == 4 else "linear",
        }
        for key, value in want.items():
            if info.get(key) != value:
                raise MSQFormatError(
                    f"{at}: {key}={info.get(key)!r:.80} disagrees with bits={bits}, shape={shape} (expected {value!r})"
                )
        key = info.get("checkpoint_key")
        if info.get("dtype") not in MODEL_DTYPES or not isinstance(info.get("depthwise"), bool):
            raise MSQFormatError(
                f"{at}: dtype={info.get('dtype')!r:.40} / depthwise={info.get('depthwise')!r:.40} invalid"
            )
        if key is not None and not (isinstance(key, str) and key.endswith("weight_packed")):
            raise MSQFormatError(f"{at}: checkpoint_key={key!r:.80} is invalid: expected '<module>.weight_packed'")
    scheme = msq_config.bit_scheme or {}
    only_cfg, only_man = sorted(set(scheme) - set(layers)), sorted(set(layers) - set(scheme))
    if only_cfg or only_man:
        raise MSQFormatError(
            f"{config_path} bit_scheme and {where} list different layers: only in config "
            f"{only_cfg[:5]}, only in manifest {only_man[:5]}"
        )
    differ = sorted(n for n in scheme if scheme[n] != layers[n]["bits"])
    if differ:
        n = differ[0]
        raise MSQFormatError(
            f"layer {n!r}: {config_path} bit_scheme says {scheme[n]} bits but {where} "
            f"says {layers[n]['bits']} ({len(differ)} layer(s) disagree)"
        )
    return layers


def _check_totals(manifest: dict[str, Any], layers: dict[str, dict], weight_files: list[Path], where: Path) -> dict:
    """``manifest["totals"]`` recomputed from the layers and files: a claim that disagrees is an error."""
    totals = manifest.get("totals")
    if not isinstance(totals, dict):
        raise MSQFormatError(f"{where}: 'totals' must be an object, got {totals!r:.80}")
    want = {**layer_totals(layers), "weight_file_bytes": sum(p.stat().st_size for p in weight_files)}
    for key, value in want.items():
        got = totals.get(key)
        if not _is_number(got) or not math.isclose(got, value, rel_tol=1e-9):
            raise MSQFormatError(f"{where}: totals.{key}={got!r:.40} disagrees with the layers and files ({value!r})")
    for key, value in totals.items():
        if key not in want and not (_is_number(value) and value >= 0):
            raise MSQFormatError(f"{where}: totals.{key}={value!r:.40} is invalid: expected a non-negative number")
    return {**totals, **want}


def read_export(
    directory: str | os.PathLike, verify: bool = True, read_weights: WeightReader | None = None
) -> ExportContents:
    """Parse and validate an export folder (see the module docstring); ``verify`` adds the weights' sha256.

    ``read_weights(file, size, sha256 or None)`` (e.g. :func:`msq_hf.io.load.read_weight_file`) reads each weight
    file into memory, checking its size and hash, and returns ``(parsed header, {key: tensor})`` (tensors ``None``
    if the header does not describe the data). The header and tensor checks then run on what it read, and
    ``ExportContents.state`` holds the tensors: a model built from them holds exactly the bytes that were checked.
    """
    directory = Path(directory)
    config_path, manifest_path = directory / CONFIG_NAME, directory / MANIFEST_NAME
    config = read_json(config_path, "every msq_hf export has a config.json")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "msq" or qc.get("msq_format") != "packed":
        _msq_config(config, config_path)  # raises the precise "not an export" error
    manifest = read_json(manifest_path, "every msq_hf export has a manifest; re-export with msq_hf.export")
    if manifest.get("format") != FORMAT_NAME:
        raise MSQFormatError(f"{manifest_path}: format={manifest.get('format')!r:.80}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise MSQFormatError(
            f"{manifest_path}: format_version={manifest.get('format_version')!r:.80} is not supported "
            f"by this msq_hf (reads version {FORMAT_VERSION}); upgrade msq_hf"
        )
    # integrity first: from here on config.json, the index and the weights are the files the manifest hashed
    weight_files = verify_files(directory, manifest, verify=verify and read_weights is None)
    loaded = None
    if read_weights is not None:  # hashed here, on the bytes that are kept, instead of in a separate pass
        files = manifest["files"]  # checked by verify_files
        loaded = {
            p: read_weights(p, files[p.name]["size"], files[p.name]["sha256"].lower() if verify else None)
            for p in weight_files
        }
    weights = manifest["weights"]
    if config.get(GUARD_KEY, LOAD_GUARD) != LOAD_GUARD or config.get(CONFIG_WEIGHTS_KEY, weights) != weights:
        raise MSQFormatError(
            f"{config_path}: {GUARD_KEY}/{CONFIG_WEIGHTS_KEY} name a weight file other than {weights!r}; "
            f"the weight files come from {MANIFEST_NAME} only"
        )
    msq_config = _msq_config(config, config_path)
    model = _check_model(manifest, config, manifest_path)
    # (a manifest written before qat_grid existed holds sign-magnitude codes)
    agree = (("wnorm", msq_config.wnorm, None), ("qat_grid", msq_config.qat_grid, "signmag"))
    for key, value, absent in (*agree, ("act_bits", msq_config.act_bits, None)):
        if (found := manifest.get(key, absent)) != value:
            raise MSQFormatError(f"{manifest_path}: {key}={found!r:.80} disagrees with {config_path} ({key}={value!r})")
    if model["kind"] == "timm":
        timm_model_args(config)  # allow-listed create_model arguments only (also checked when building)
    layers = _check_layers(manifest, msq_config, manifest_path, config_path)
    totals = _check_totals(manifest, layers, weight_files, manifest_path)
    weight_map = index_weight_files(directory) if weights == WEIGHTS_INDEX_NAME else None
    dtype = getattr(torch, model["dtype"])
    entries = check_headers(weight_files, layers, weight_map, msq_config.wnorm, dtype, loaded)
    state = None if loaded is None else {k: t for _, tensors in loaded.values() for k, t in (tensors or {}).items()}
    contents = ExportContents(
        directory, config, manifest, msq_config, weight_files, model["kind"], totals, entries, state
    )
    stored = contents.stored_numel()
    labels = {k: config[k] for k in ("num_labels", "num_classes") if k in config}
    if isinstance(config.get("id2label"), dict):
        labels["len(id2label)"] = len(config["id2label"])
    for key, value in labels.items():  # a classifier needs at least one stored weight per class
        if not _is_int_in(value, 0, stored):
            raise MSQFormatError(f"{config_path}: {key}={value!r:.40} is impossible for {stored} stored weights")
    return contents


_PACKED_TENSORS = {  # per packed layer: suffix -> (safetensors dtype, shape rule)
    "weight_packed": ("U8", "[bytes]"),
    "weight_scale": ("F32", "[1]"),
    "weight_bits": ("U8", "[1]"),
    "weight_shape": ("I64", "[ndim]"),
}


def _tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(key)


def _check_packed_tensors(
    entries: dict[str, tuple[Path, dict]],
    wnorm: str,
    dtype: torch.dtype,
    read: Callable[[Path, str], torch.Tensor] = _tensor,
) -> None:
    """Every packed layer's four tensors: fixed dtype and shape; its scale decodes to finite ``dtype`` weights.
    ``read(file, key)`` gives a stored tensor (from the file, or from the bytes already loaded)."""
    for packed_key in [k for k in entries if k.endswith("weight_packed")]:
        prefix = packed_key.removesuffix("weight_packed")
        for suffix, (want, rule) in _PACKED_TENSORS.items():
            key = prefix + suffix
            path, entry = entries.get(key, (None, {}))
            shape = entry.get("shape")
            if path is None or entry.get("dtype") != want or len(shape) != 1 or (rule == "[1]" and shape != [1]):
                found = "missing" if path is None else f"stored as {entry.get('dtype')} {shape}"
                raise MSQFormatError(f"tensor {key!r} is {found}; a packed layer stores it as {want} {rule}")
        bits = int(read(entries[prefix + "weight_bits"][0], prefix + "weight_bits")[0])
        scale = read(entries[prefix + "weight_scale"][0], prefix + "weight_scale")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise MSQFormatError(f"tensor {prefix}weight_bits={bits} is outside {MIN_BITS}..{MAX_BITS}")
        top = top_code(bits, wnorm, full_grid=True)  # the widest range any grid of this storage decodes
        extremes = decode_weight(torch.tensor([0, top]), scale, bits, wnorm, (2,), dtype)
        # the step is S / 2^n with S = max|W|, a finite float32: S itself must be finite too
        full_range = scale.to(torch.float32) * 2**bits
        if not (
            float(scale[0]) > 0 and bool(torch.isfinite(full_range).all()) and bool(torch.isfinite(extremes).all())
        ):
            raise MSQFormatError(
                f"tensor {prefix}weight_scale={float(scale[0])!r} is invalid: {bits}-bit codes must decode to "
                f"finite {str(dtype).removeprefix('torch.')} weights with a positive scale"
            )


def check_headers(
    weight_files: list[Path],
    layers: dict[str, dict],
    weight_map: dict[str, str] | None,
    wnorm: str,
    dtype: torch.dtype,
    loaded: dict[Path, tuple[Any, dict[str, torch.Tensor] | None]] | None = None,
) -> dict[str, tuple[Path, dict]]:
    """Validate the safetensors files without loading the weights; return ``{key: (file, header entry)}``.

    Each file must open with safetensors (offsets, dtypes, sizes) and carry ``msq_format=packed``; the index (if
    any) must place every key in the file that holds it; packed tensors are checked by
    :func:`_check_packed_tensors`; each layer's ``weight_packed`` must have the length its bits need. With
    ``loaded`` (``read_export``'s ``read_weights`` per file) the bytes in memory must carry the same header as the
    file, and the tensor checks run on them.
    """
    entries: dict[str, tuple[Path, dict]] = {}
    for path in weight_files:
        header = read_safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt"):
                pass  # safetensors' own validation: dtypes, shapes, offsets covering the data exactly
        except SafetensorError as exc:
            raise MSQIntegrityError(f"weight file {path} is not a valid safetensors file ({exc})") from None
        if loaded is not None:  # the bytes in memory are those checked here (same header, same size)
            if loaded[path][0] != header:
                raise MSQIntegrityError(f"weight file {path} changed while it was being loaded")
            if loaded[path][1] is None:
                dtypes = sorted({str(e.get("dtype")) for k, e in header.items() if k != "__metadata__"})
                raise MSQFormatError(f"weight file {path} holds tensor dtypes {dtypes} that msq_hf cannot load")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("msq_format") != "packed":
            raise MSQFormatError(f"weight file {path}: safetensors metadata {meta!r:.80} lacks msq_format='packed'")
        for key, entry in header.items():
            if key in entries:
                raise MSQFormatError(f"tensor {key!r} is stored twice ({entries[key][0].name} and {path.name})")
            if weight_map is not None and weight_map.get(key) != path.name:
                raise MSQFormatError(
                    f"{WEIGHTS_INDEX_NAME} puts tensor {key!r} in {weight_map.get(key)!r}, but {path.name} holds it"
                )
            entries[key] = (path, entry)
    if weight_map is not None and (missing := sorted(set(weight_map) - set(entries))):
        raise MSQFormatError(f"{WEIGHTS_INDEX_NAME} lists tensor(s) {missing[:5]} that no weight file holds")
    if loaded is None:
        _check_packed_tensors(entries, wnorm, dtype)
    else:
        _check_packed_tensors(entries, wnorm, dtype, lambda path, key: loaded[path][1][key])  # type: ignore[index]
    for name, info in layers.items():
        key = info.get("checkpoint_key")
        if key is None:
            continue  # unknown on-disk name: the loader's own shape checks still apply
        if key not in entries:
            raise MSQFormatError(f"layer {name!r}: tensor {key!r} is missing from the weight files")
        path, entry = entries[key]
        if entry.get("shape") != [info["packed_bytes"]]:
            raise MSQFormatError(
                f"layer {name!r}: {path.name} stores {key!r} as {entry.get('dtype')} "
                f"{entry.get('shape')}, but {info['bits']}-bit codes of shape {info['shape']} "
                f"need U8 [{info['packed_bytes']}]: the bit scheme disagrees with the stored tensors"
            )
    return entries


__all__ = ["ExportContents", "WeightReader", "check_headers", "read_export"]
