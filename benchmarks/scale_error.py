"""How much weight-quantization error the max-based scale costs: MSQ's ``S = max|W|`` against a clipped scale.

MSQ's RoundClamp grid spans ``[0, S]`` with ``S = max|W|`` per layer (the paper's choice, and what every export
stores), so a single large weight sets the step of the whole layer. LSQ learns its step instead. This script takes
the float weights of a checkpoint (every 2-D/4-D ``*.weight`` tensor in its ``model.safetensors``, the layers MSQ
quantizes) and, at each precision, reports the relative squared error ``||Q(W) - W||^2 / ||W||^2`` summed over the
layers for

* ``max``: MSQ's sign-magnitude grid at ``S = max|W|``;
* ``clipped``: the same grid at the best ``S = c max|W|`` per layer (``c`` in (0, 1], 1 included: the scale
  ``MSQConfig(qat_scale="mse")`` clips each layer to once the bit scheme is final, :mod:`msq_hf.quant.clip`);
* ``uniform``: a uniform grid with the same stored bits (sign + n magnitude bits: ``2^(n+1)`` signed levels,
  ``-2^n .. 2^n - 1``, the grid LSQ learns) at its best step per layer.

No training: it says how far the max-based grid is from the best grid of its kind before any training, not what
accuracy a clipped scale reaches (for that, docs/results.md, "At three stored bits").

Usage::

    python benchmarks/scale_error.py runs/pretrained/resnet18 --bits 1 2 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msq_hf.quant.clip import best_clip_ratio, quantization_error, search_ratio  # noqa: E402
from msq_hf.quant.functional import max_abs_scale  # noqa: E402


def squared_errors(weight: torch.Tensor, bits: int) -> dict[str, float]:
    """``||Q(W) - W||^2`` of one layer for the max, best clipped and best uniform grids at ``bits`` magnitude bits."""
    w = weight.detach().float()
    top = max_abs_scale(w)
    levels = 2**bits  # the uniform grid stores the same bits: codes -2^n .. 2^n - 1

    def uniform(step: torch.Tensor) -> float:
        return float((torch.clamp(torch.round(w / step), -levels, levels - 1) * step - w).double().pow(2).sum())

    return {
        "max": quantization_error(w, bits, top),
        "clipped": quantization_error(w, bits, top * best_clip_ratio(w, bits)),  # what qat_scale="mse" clips to
        "uniform": uniform(top * search_ratio(lambda c: uniform(top * c / levels)) / levels),
    }


def relative_errors(weights: dict[str, torch.Tensor], bits: int) -> dict[str, float]:
    """The errors of :func:`squared_errors` summed over ``weights`` and divided by ``sum ||W||^2``."""
    energy = sum(w.float().pow(2).sum().item() for w in weights.values())
    totals = {"max": 0.0, "clipped": 0.0, "uniform": 0.0}
    for w in weights.values():
        for kind, err in squared_errors(w, bits).items():
            totals[kind] += err
    return {kind: err / energy for kind, err in totals.items()}


def quantized_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The conv and linear weights (2-D/4-D ``*.weight`` tensors) of ``checkpoint/model.safetensors``."""
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors in the checkpoint folder {checkpoint}")
    return {k: v for k, v in load_file(path).items() if k.endswith("weight") and v.dim() in (2, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a folder with model.safetensors (e.g. runs/pretrained/resnet18)")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3], help="magnitude bits of the MSQ grid")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's numbers to this file")
    args = parser.parse_args(argv)
    weights = quantized_weights(args.checkpoint)
    print(f"{args.checkpoint}: {len(weights)} layers, {sum(w.numel() for w in weights.values()):,} weights")
    print("| magnitude bits (stored) | max|W| scale | best clipped scale | max / clipped | uniform, same stored bits |")
    print("|---|---|---|---|---|")
    rows = []
    for bits in args.bits:
        e = relative_errors(weights, bits)
        rows.append({"bits": bits, **e})
        print(
            f"| {bits} ({bits + 1}) | {e['max']:.4f} | {e['clipped']:.4f} | {e['max'] / e['clipped']:.2f}x "
            f"| {e['uniform']:.4f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
