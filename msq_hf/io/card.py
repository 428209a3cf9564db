"""Model card (``README.md``) and bit-scheme plot (``bit_scheme.png``) of an msq_hf export.

Both are rendered from the manifest alone, so ``msq-hf inspect``/re-rendering needs no model.
The plot uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def human_bytes(n: float, digits: int = 2) -> str:
    """``1234567 -> '1.23 MB'`` (decimal units; whole bytes below 1 kB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000.0
    return f"{n:.{digits}f} GB"


def plot_bit_scheme(manifest: dict[str, Any], path: str | Path) -> Path:
    """Bar plot of magnitude bits per quantized layer (bar width ~ nothing, colour ~ layer type)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = manifest["layers"]
    names = list(layers)
    bits = [layers[n]["bits"] for n in names]
    colors = ["tab:blue" if layers[n]["type"] == "conv2d" else "tab:orange" for n in names]
    width = min(max(6.0, 0.22 * len(names) + 2), 24.0)
    fig = Figure(figsize=(width, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), bits, color=colors)
    ax.set_ylim(0, 8.5)
    ax.set_yticks(range(0, 9))
    ax.set_ylabel("magnitude bits")
    totals = manifest["totals"]
    ax.set_title(
        f"MSQ bit scheme: {len(names)} layers, avg {totals['average_bits']:.2f} bits, "
        f"compression {totals['compression_ratio']:.1f}x"
    )
    if len(names) <= 60:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("layer index (model order)")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color="tab:blue", label="Conv2d"), Patch(color="tab:orange", label="Linear")],
        loc="upper right",
        fontsize=7,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def render_model_card(manifest: dict[str, Any], repo_id: str | None = None, plot_name: str = "bit_scheme.png") -> str:
    """README.md text: YAML front matter, how to load, sizes, the bit table and the plot."""
    model = manifest["model"]
    totals = manifest["totals"]
    versions = manifest.get("versions", {})
    where = repo_id or "path/to/this/folder"
    if model["kind"] == "hf":
        what = f"`{model.get('class')}` (transformers, model_type `{model.get('model_type')}`)"
    else:
        what = f"timm `{model.get('architecture')}` ({model.get('num_classes')} classes)"
    lines = [
        "---",
        "library_name: msq_hf",
        "pipeline_tag: image-classification",
        "tags:",
        "- msq",
        "- quantization",
        "- mixed-precision",
        "- bit-packed",
        "- image-classification",
    ]
    if model["kind"] == "timm":
        lines.append("- timm")
    lines += [
        "---",
        "",
        f"# MSQ mixed-precision export of {what}",
        "",
        "Weights were trained with MSQ (LSB-sparsity regularized quantization-aware training with learned",
        "per-layer bit widths) and are stored **bit-packed**: each quantized layer keeps `n+1`-bit",
        "sign-magnitude codes (`weight_packed`), one fp32 scale, its bit width and shape; everything else",
        "(biases, norms, unquantized layers) is stored at its own dtype.",
        "",
        "## How to load",
        "",
        "```python",
        "import msq_hf  # required: registers the 'msq' quantization method",
        f'model = msq_hf.from_pretrained("{where}")                    # verifies sha256, packed layers',
        f'model = msq_hf.from_pretrained("{where}", dequantize=True)   # plain nn.Linear / nn.Conv2d',
    ]
    if model["kind"] == "hf":
        lines += [
            "# or, after `import msq_hf`:",
            "from transformers import AutoModelForImageClassification",
            f'model = AutoModelForImageClassification.from_pretrained("{where}")',
        ]
    lines += [
        "```",
        "",
        'Without `import msq_hf`, transformers/timm stop with "no file named model.safetensors": the weights are',
        "in `msq_model.safetensors` on purpose, so the packed codes can never be mistaken for float weights.",
        "",
        "## Compression",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| quantized layers | {totals['quantized_layers']} |",
        f"| quantized weights | {totals['quantized_params']:,} |",
        f"| other parameters/buffers (float) | {totals['unquantized_params']:,} |",
        f"| average magnitude bits (weighted / per layer) | {totals['average_bits']:.3f} / "
        f"{totals['average_bits_unweighted']:.3f} |",
        f"| compression ratio (paper: 32 / magnitude bits) | {totals['compression_ratio']:.2f}x |",
        f"| storage compression (incl. sign bit) | {totals['storage_compression_ratio']:.2f}x |",
        f"| packed weight bytes | {human_bytes(totals['quantized_bytes'])} |",
        f"| other tensor bytes | {human_bytes(totals['unquantized_bytes'])} |",
        f"| weight file(s) on disk | {human_bytes(totals.get('weight_file_bytes', 0))} |",
        f"| same tensors unquantized | {human_bytes(totals['float_bytes'])} |",
        "",
        f"![bits per layer]({plot_name})",
        "",
        "## Bit scheme",
        "",
        "| layer | type | shape | bits | stored bits | packed bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in manifest["layers"].items():
        kind = info["type"] + (" (depthwise)" if info.get("depthwise") else "")
        lines.append(
            f"| `{name}` | {kind} | {'x'.join(map(str, info['shape']))} | {info['bits']} | "
            f"{info['stored_bits']} | {info['packed_bytes']:,} |"
        )
    lines += [
        "",
        "## Format",
        "",
        f"`{manifest['format']}` version {manifest['format_version']}; `msq_manifest.json` lists every layer, the",
        "totals and the size + sha256 of each weight file. Written by "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        + ".",
        "",
    ]
    return "\n".join(lines)


__all__ = ["plot_bit_scheme", "render_model_card"]
