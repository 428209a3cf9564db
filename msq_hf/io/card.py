"""Model card (``README.md``, a ``huggingface_hub.ModelCard``) and bit-scheme plot (``bit_scheme.png``) of an export.

Both are rendered from the manifest alone, so ``msq-hf inspect``/re-rendering needs no model. The card's YAML
metadata follows the Hub's conventions (``ModelCardData``): ``library_name`` is the library that owns the
architecture (``transformers`` or ``timm``), tags ``msq``/``quantized``/``mixed-precision``, and ``base_model`` with
``base_model_relation: quantized`` when the manifest knows where the weights came from. The plot uses matplotlib's
object API with the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from msq_hf.io.format import MANIFEST_NAME, PLOT_NAME, WEIGHTS_NAME

TAGS = ["msq", "quantized", "mixed-precision", "bit-packed", "image-classification"]

# Rendered by ModelCard.from_template (jinja2); every number arrives pre-formatted.
CARD_TEMPLATE = """---
{{ card_data }}
---

# MSQ mixed-precision export of {{ what }}

Weights were trained with MSQ (LSB-sparsity regularized quantization-aware training with learned
per-layer bit widths) and are stored **bit-packed**: each quantized layer keeps `n+1`-bit
sign-magnitude codes (`weight_packed`), one fp32 scale, its bit width and shape; everything else
(biases, norms, unquantized layers) is stored at its own dtype.
{% if base_model %}
Quantized from [`{{ base_model }}`](https://huggingface.co/{{ base_model }}).
{% endif %}
## How to load

```python
import msq_hf  # required: registers the 'msq' quantization method
model = msq_hf.from_pretrained("{{ where }}")                    # verifies sha256, packed layers
model = msq_hf.from_pretrained("{{ where }}", dequantize=True)   # plain nn.Linear / nn.Conv2d
{% if kind == "hf" %}# or, after `import msq_hf`:
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("{{ where }}")
{% endif %}```

Without `import msq_hf`, transformers/timm stop with "no file named model.safetensors": the weights are
in `{{ weights_name }}` on purpose, so the packed codes can never be mistaken for float weights.

## Compression

| quantity | value |
|---|---|
{% for label, value in totals %}| {{ label }} | {{ value }} |
{% endfor %}
![bits per layer]({{ plot_name }})

## Bit scheme

| layer | type | shape | bits | stored bits | packed bytes |
|---|---|---|---|---|---|
{% for row in layers %}| `{{ row[0] }}` | {{ row[1] }} | {{ row[2] }} | {{ row[3] }} | {{ row[4] }} | {{ row[5] }} |
{% endfor %}
## Format

`{{ format }}` version {{ format_version }}; `{{ manifest_name }}` lists every layer, the
totals and the size + sha256 of each weight file. Written by {{ versions }}.
"""


def human_bytes(n: float, digits: int = 2) -> str:
    """``1234567 -> '1.23 MB'`` (decimal units; whole bytes below 1 kB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000.0
    return f"{n:.{digits}f} GB"


def plot_bit_scheme(manifest: dict[str, Any], path: str | Path) -> Path:
    """Bar plot of magnitude bits per quantized layer (colour ~ layer type)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

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
    ax.legend(
        handles=[Patch(color="tab:blue", label="Conv2d"), Patch(color="tab:orange", label="Linear")],
        loc="upper right",
        fontsize=7,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def card_data(manifest: dict[str, Any]) -> ModelCardData:
    """The card's YAML metadata (Hub conventions) from ``manifest["model"]``."""
    model = manifest["model"]
    base_model = model.get("base_model")
    return ModelCardData(
        library_name="transformers" if model["kind"] == "hf" else "timm",
        pipeline_tag="image-classification",
        tags=TAGS + (["timm"] if model["kind"] == "timm" else []),
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        license=model.get("license"),
        datasets=model.get("datasets"),
    )


def _totals_rows(totals: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("quantized layers", f"{totals['quantized_layers']}"),
        ("quantized weights", f"{totals['quantized_params']:,}"),
        ("other parameters/buffers (float)", f"{totals['unquantized_params']:,}"),
        (
            "average magnitude bits (weighted / per layer)",
            f"{totals['average_bits']:.3f} / {totals['average_bits_unweighted']:.3f}",
        ),
        ("compression ratio (paper: 32 / magnitude bits)", f"{totals['compression_ratio']:.2f}x"),
        ("storage compression (incl. sign bit)", f"{totals['storage_compression_ratio']:.2f}x"),
        ("packed weight bytes", human_bytes(totals["quantized_bytes"])),
        ("other tensor bytes", human_bytes(totals["unquantized_bytes"])),
        ("weight file(s) on disk", human_bytes(totals.get("weight_file_bytes", 0))),
        ("same tensors unquantized", human_bytes(totals["float_bytes"])),
    ]


def build_model_card(manifest: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The export's ``README.md``: Hub metadata, how to load, sizes, the plot and the bit table."""
    model = manifest["model"]
    if model["kind"] == "hf":
        what = f"`{model.get('class')}` (transformers, model_type `{model.get('model_type')}`)"
    else:
        what = f"timm `{model.get('architecture')}` ({model.get('num_classes')} classes)"
    layers = [
        (
            name,
            info["type"] + (" (depthwise)" if info.get("depthwise") else ""),
            "x".join(map(str, info["shape"])),
            info["bits"],
            info["stored_bits"],
            f"{info['packed_bytes']:,}",
        )
        for name, info in manifest["layers"].items()
    ]
    return ModelCard.from_template(
        card_data(manifest),
        template_str=CARD_TEMPLATE,
        what=what,
        kind=model["kind"],
        where=repo_id or "path/to/this/folder",
        base_model=model.get("base_model"),
        weights_name=WEIGHTS_NAME,
        totals=_totals_rows(manifest["totals"]),
        plot_name=PLOT_NAME,
        layers=layers,
        format=manifest["format"],
        format_version=manifest["format_version"],
        manifest_name=MANIFEST_NAME,
        versions=", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items())),
    )


__all__ = ["CARD_TEMPLATE", "TAGS", "build_model_card", "card_data", "human_bytes", "plot_bit_scheme"]
