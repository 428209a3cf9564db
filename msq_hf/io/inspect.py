"""``inspect_export``: read an msq_hf export without building the model, and report on it.

``inspect_export(path_or_repo_id)`` returns an :class:`InspectReport` (bit scheme, compression,
parameter counts, bytes on disk, integrity result); ``format_report`` renders it as text.
``msq-hf inspect`` (``msq_hf.commands.inspect``) prints it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from msq_hf.errors import MSQError
from msq_hf.io.card import human_bytes
from msq_hf.io.format import CONFIG_NAME, MANIFEST_NAME
from msq_hf.io.load import read_export, resolve_export_dir


@dataclass
class InspectReport:
    """What ``inspect_export`` found. ``ok`` is False when any check failed (see ``errors``)."""

    path: str
    ok: bool
    errors: list[str] = field(default_factory=list)
    kind: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    format_version: int | None = None
    wnorm: str | None = None
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # every file in the folder -> bytes
    bytes_on_disk: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    verified_sha256: bool = False

    @property
    def bit_scheme(self) -> dict[str, int]:
        """``{layer: bits}``."""
        return {n: int(i["bits"]) for n, i in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        data = asdict(self)
        data["bit_scheme"] = self.bit_scheme
        return data


def inspect_export(
    path_or_repo_id: str | os.PathLike,
    verify: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> InspectReport:
    """Inspect an export folder or Hub repo. Problems are collected in ``report.errors``, not raised
    (only an unreachable path/repo raises ``MSQMissingFileError``)."""
    directory = resolve_export_dir(path_or_repo_id, revision, cache_dir, token, local_files_only)
    report = InspectReport(path=str(directory), ok=True, verified_sha256=verify)
    report.files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    report.bytes_on_disk = sum(report.files.values())
    # best-effort raw read first, so a broken export still shows what it claims
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        if isinstance(manifest, dict):
            report.format, report.format_version = manifest.get("format"), manifest.get("format_version")
            report.model = dict(manifest.get("model") or {})
            report.kind = report.model.get("kind")
            report.wnorm = manifest.get("wnorm")
            report.layers = dict(manifest.get("layers") or {})
            report.totals = dict(manifest.get("totals") or {})
            report.versions = dict(manifest.get("versions") or {})
    except (OSError, ValueError):
        pass  # read_export below reports the precise problem
    try:
        read_export(directory, verify=verify)
    except MSQError as exc:
        report.ok = False
        report.errors.append(str(exc))
    if not (directory / CONFIG_NAME).exists() and not report.errors:
        report.ok = False
        report.errors.append(f"{directory / CONFIG_NAME} is missing")
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
    out.append(f"  format     : {report.format} v{report.format_version}, wnorm={report.wnorm}")
    if report.versions:
        out.append("  written by : " + ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items())))
    t = report.totals
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
            shape = "x".join(str(d) for d in i.get("shape", []))
            kind = "dwconv" if i.get("depthwise") else str(i.get("type", "?"))
            out.append(
                f"  {name:<{width}}  {kind:<7} {shape:<16} {i.get('bits', '?'):>4} {i.get('stored_bits', '?'):>6} "
                f"{i.get('packed_bytes', 0):>10,}"
            )
        if len(shown) < len(names):
            out.append(f"  ... {len(names) - len(shown)} more layers")
    out.append("")
    check = "sizes, headers, bit scheme" + (", sha256" if report.verified_sha256 else "")
    out.append(f"  integrity  : {'OK' if report.ok else 'FAILED'} ({check})")
    out += [f"    - {e}" for e in report.errors]
    return "\n".join(out)


__all__ = ["InspectReport", "format_report", "inspect_export"]
