"""Model card (``README.md``, a ``huggingface_hub.ModelCard``) and bit-scheme plot (``bit_scheme.png``) of an export.

Both are rendered from the manifest alone, so ``msq-hf inspect``/re-rendering needs no model. The card's YAML
metadata follows the Hub's conventions (``ModelCardData``): ``library_name`` is the library that owns the
architecture (``transformers`` or ``timm``), tags ``msq``/``quantized``/``mixed-precision``, ``base_model`` with
``base_model_relation: quantized`` when the manifest knows where the weights came from, and ``license``,
``datasets`` and ``model-index`` (evaluation results) from the card metadata passed to ``export(card_data=...)``
(kept in the manifest under ``card``, checked by :func:`check_card_data`). The plot uses matplotlib's
object API with the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from msq_hf.io.format import MANIFEST_NAME, PLOT_NAME, WEIGHTS_NAME

TAGS = ["msq", "quantized", "mixed-precision", "bit-packed", "image-classification"]
TASK = "image-classification"
#: keys of ``export(card_data=...)`` and their JSON types (``metrics``: metric name -> value)
CARD_KEYS: dict[str, type | tuple[type, ...]] = {
    "base_model": str,
    "datasets": list,
    "license": str,
    "tags": list,
    "model_name": str,
    "metrics": dict,
    "dataset_split": str,
}

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

The weights are bit-packed codes in `{{ weights_name }}`, which only msq_hf reads. Without `import msq_hf`,
transformers stops before loading anything and says to install and import msq_hf (`config.json` names no
loadable weight file on purpose), so the codes can never be mistaken for float weights.
{% if kind == "timm" %}`timm.create_model("hf-hub:...")` cannot rebuild packed layers (it stops with
"Missing key(s)"): `msq_hf.from_pretrained` returns the timm model itself.
{% endif %}
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


def check_card_data(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """``export(card_data=...)`` as a plain dict; ``ValueError`` naming the key at fault.

    ``datasets``/``tags`` may be given as one string; ``metrics`` need ``datasets`` (the Hub's ``model-index``
    names the dataset each result was measured on) and numeric values.
    """
    out: dict[str, Any] = {}
    for key, value in dict(data or {}).items():
        if key not in CARD_KEYS:
            raise ValueError(f"card_data key {key!r} is unknown; allowed: {sorted(CARD_KEYS)}")
        if value is None:
            continue
        if key in ("datasets", "tags") and isinstance(value, str):
            value = [value]
        if not isinstance(value, CARD_KEYS[key]) or (
            isinstance(value, list) and not all(isinstance(v, str) and v for v in value)
        ):
            raise ValueError(f"card_data[{key!r}]={value!r} is invalid: expected {CARD_KEYS[key].__name__} of strings")
        out[key] = list(value) if isinstance(value, list) else value
    metrics = out.get("metrics") or {}
    for name, value in metrics.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"card_data['metrics'][{name!r}]={value!r} is invalid: expected a number")
    if metrics and not out.get("datasets"):
        raise ValueError("card_data['metrics'] needs card_data['datasets']: the dataset the metrics were measured on")
    return out


def _hub_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repo id (not a local path), else None."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def run_card_data(
    base_model: str | None, dataset: str | None, accuracy: float | None, split: str | None = None
) -> dict[str, Any]:
    """Card metadata of a training run (CLI, recipes): what is known, local paths left out."""
    meta: dict[str, Any] = {}
    if base := _hub_id(base_model.removeprefix("hf-hub:") if base_model else None):
        meta["base_model"] = base if "/" in base else None
    if data := _hub_id(dataset):
        meta["datasets"] = [data]
        if accuracy is not None:
            meta["metrics"] = {"accuracy": float(accuracy)}
            meta["dataset_split"] = split
    return {k: v for k, v in meta.items() if v is not None}


def eval_results(meta: dict[str, Any]) -> list[EvalResult] | None:
    """``model-index`` entries: one per metric, on ``datasets[0]`` (``huggingface_hub.EvalResult``)."""
    metrics = meta.get("metrics") or {}
    if not metrics:
        return None
    dataset = meta["datasets"][0]
    return [
        EvalResult(
            task_type=TASK,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=meta.get("dataset_split"),
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in metrics.items()
    ]


def card_data(manifest: dict[str, Any], repo_id: str | None = None) -> ModelCardData:
    """The card's YAML metadata (Hub conventions) from ``manifest["model"]`` and ``manifest["card"]``."""
    model = manifest["model"]
    meta = manifest.get("card") or {}
    base_model = model.get("base_model")
    results = eval_results(meta)
    default_name = (repo_id or "").split("/")[-1] or f"{model.get('class') or model.get('architecture')}-msq"
    tags = TAGS + (["timm"] if model["kind"] == "timm" else [])
    return ModelCardData(
        library_name="transformers" if model["kind"] == "hf" else "timm",
        pipeline_tag=TASK,
        tags=tags + [t for t in meta.get("tags", []) if t not in tags],
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        license=meta.get("license") or model.get("license"),
        datasets=meta.get("datasets") or model.get("datasets"),
        model_name=meta.get("model_name") or (default_name if results else None),
        eval_results=results,
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
        card_data(manifest, repo_id),
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


__all__ = [
    "CARD_KEYS",
    "CARD_TEMPLATE",
    "TAGS",
    "build_model_card",
    "card_data",
    "check_card_data",
    "eval_results",
    "human_bytes",
    "plot_bit_scheme",
    "run_card_data",
]
