"""``inspect_export``: read an msq_hf export without building the model, and report on it.

``inspect_export(path_or_repo_id)`` returns an :class:`InspectReport` (bit scheme, compression,
parameter counts, bytes on disk, integrity result); ``format_report`` renders it as text.
``msq-hf inspect`` (``msq_hf.commands.inspect``) prints it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from msq_hf.errors import MSQError, MSQMissingFileError
from msq_hf.io.card import human_bytes
from msq_hf.io.format import MANIFEST_NAME, UNVERIFIED_NAMES, read_json
from msq_hf.io.load import resolve_export_dir
from msq_hf.io.verify import read_export


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class InspectReport:
    """What ``inspect_export`` found. ``ok`` is False when any check failed (see ``errors``).

    With ``ok`` every value shown was verified (totals recomputed from the layers); otherwise the fields show
    what the manifest claims, restricted to values of the right type.
    """

    path: str
    ok: bool
    errors: list[str] = field(default_factory=list)
    kind: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    format_version: int | None = None
    wnorm: str | None = None
    qat_grid: str | None = None
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # every file in the folder -> bytes
    bytes_on_disk: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    verified_sha256: bool = False
    unverified: list[str] = field(default_factory=list)  # files the manifest does not hash (never read on load)

    @property
    def bit_scheme(self) -> dict[str, int]:
        """``{layer: bits}``."""
        return {n: i["bits"] for n, i in self.layers.items() if isinstance(i.get("bits"), int)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        data = asdict(self)
        data["bit_scheme"] = self.bit_scheme
        return data


def _fill(report: InspectReport, manifest: dict[str, Any], totals: dict[str, Any] | None) -> None:
    """Copy what the manifest says into ``report``, keeping only values of the expected types."""

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    report.format, report.wnorm = text(manifest.get("format")), text(manifest.get("wnorm"))
    report.qat_grid = text(manifest.get("qat_grid", "signmag"))
    version = manifest.get("format_version")
    report.format_version = version if isinstance(version, int) and not isinstance(version, bool) else None
    model = manifest.get("model")
    report.model = {k: v for k, v in model.items() if isinstance(k, str)} if isinstance(model, dict) else {}
    report.kind = text(report.model.get("kind"))
    layers = manifest.get("layers")
    report.layers = {n: dict(i) for n, i in layers.items() if isinstance(i, dict)} if isinstance(layers, dict) else {}
    raw = totals if totals is not None else manifest.get("totals")
    report.totals = {k: v for k, v in raw.items() if _is_number(v)} if isinstance(raw, dict) else {}
    versions = manifest.get("versions")
    if isinstance(versions, dict):
        report.versions = {k: v for k, v in versions.items() if isinstance(v, str)}
    files = manifest.get("files")
    hashed = set(files) if isinstance(files, dict) else set()
    report.unverified = sorted(n for n in report.files if n not in hashed and n != MANIFEST_NAME)


def inspect_export(
    path_or_repo_id: str | os.PathLike,
    verify: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> InspectReport:
    """Inspect an export folder or Hub repo. Problems are collected in ``report.errors``, not raised; a path
    that is not an msq_hf export at all (unreachable, or no ``msq_manifest.json``) raises ``MSQMissingFileError``."""
    directory = resolve_export_dir(path_or_repo_id, revision, cache_dir, token, local_files_only)
    if not (directory / MANIFEST_NAME).is_file():
        raise MSQMissingFileError(f"{directory} is not an msq_hf export: it has no {MANIFEST_NAME}")
    report = InspectReport(path=str(directory), ok=True, verified_sha256=verify)
    report.files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    report.bytes_on_disk = sum(report.files.values())
    try:
        contents = read_export(directory, verify=verify)
    except MSQError as exc:
        report.ok = False
        report.errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        try:  # show what the broken export claims, type-filtered
            _fill(report, read_json(directory / MANIFEST_NAME, "manifest"), None)
        except MSQError:
            pass  # the error above already says why
    else:
        _fill(report, contents.manifest, contents.totals)
    return report


def format_report(report: InspectReport, max_layers: int | None = None) -> str:
    """A readable text report: summary, totals, per-layer table, integrity status."""
    out = [f"msq_hf export: {report.path}"]
    model = report.model
    if report.kind == "hf":
        out.append(
            f"  model      : {model.get('class')} (transformers, {model.get('model_type')}), {model.get('dtype')}"
        )
    elif report.kind == "timm":
        out.append(
            f"  model      : timm {model.get('architecture')} ({model.get('num_classes')} classes), "
            f"{model.get('dtype')}"
        )
    grid = f", qat_grid={report.qat_grid}" if report.wnorm == "signmag" else ""
    out.append(f"  format     : {report.format} v{report.format_version}, wnorm={report.wnorm}{grid}")
    if report.versions:
        out.append("  written by : " + ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items())))
    t = {k: v for k, v in report.totals.items() if _is_number(v)}
    if t:
        out += [
            f"  layers     : {t.get('quantized_layers')} quantized, {t.get('quantized_params', 0):,} weights "
            f"(+{t.get('unquantized_params', 0):,} other float params)",
            f"  bits       : avg {t.get('average_bits', 0):.3f} weighted / {t.get('average_bits_unweighted', 0):.3f} "
            f"per layer, range {t.get('min_bits')}..{t.get('max_bits')}",
            f"  compression: {t.get('compression_ratio', 0):.2f}x (paper, magnitude bits), "
            f"{t.get('storage_compression_ratio', 0):.2f}x stored (incl. sign bit)",
            f"  bytes      : packed {human_bytes(t.get('quantized_bytes', 0))}, other tensors "
            f"{human_bytes(t.get('unquantized_bytes', 0))}, weight files {human_bytes(t.get('weight_file_bytes', 0))} "
            f"(float: {human_bytes(t.get('float_bytes', 0))})",
        ]
    out.append(
        f"  on disk    : {human_bytes(report.bytes_on_disk)} in {len(report.files)} files: "
        + ", ".join(f"{n} ({human_bytes(s)})" for n, s in report.files.items())
    )
    if report.layers:
        names = list(report.layers)
        shown = names if max_layers is None else names[:max_layers]
        width = max(len(n) for n in shown)
        out.append("")
        out.append(f"  {'layer':<{width}}  {'type':<7} {'shape':<16} {'bits':>4} {'stored':>6} {'packed B':>10}")
        for name in shown:
            i = report.layers[name]
            shape = "x".join(str(d) for d in i["shape"]) if isinstance(i.get("shape"), list) else "?"
            kind = "dwconv" if i.get("depthwise") is True else str(i.get("type", "?"))
            packed = f"{i['packed_bytes']:,}" if _is_number(i.get("packed_bytes")) else "?"
            out.append(
                f"  {name:<{width}}  {kind:<7} {shape:<16} {str(i.get('bits', '?')):>4} "
                f"{str(i.get('stored_bits', '?')):>6} {packed:>10}"
            )
        if len(shown) < len(names):
            out.append(f"  ... {len(names) - len(shown)} more layers")
    out.append("")
    check = "sizes, headers, bit scheme" + (", sha256" if report.verified_sha256 else "")
    out.append(f"  integrity  : {'OK' if report.ok else 'FAILED'} ({check})")
    extra = [n for n in report.unverified if n not in UNVERIFIED_NAMES]
    if report.unverified:
        out.append(f"  not hashed : {', '.join(report.unverified)} (never read by msq_hf.from_pretrained)")
    if extra:
        out.append(f"               {', '.join(extra)} are not part of the export as written")
    out += [f"    - {e}" for e in report.errors]
    return "\n".join(out)


__all__ = ["InspectReport", "format_report", "inspect_export"]
