"""``qat_scale="mse"``: once the bit scheme is final, fit every MSQ layer's scale to its final grid by clipping.

The controller calls :func:`fit_clipped_scales` at the final round (after a rewind, if any) and every
``prune_interval`` steps of the QAT phase after it, so that weights the optimizer pushes past the clipped range
do not pull ``S = max|W|`` back up. The math is in :mod:`msq_hf.quant.clip`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

from msq_hf.quant.clip import best_clip_ratio, clip_weight_
from msq_hf.training.sensitivity import reduce_across_ranks

logger = logging.getLogger(__name__)


def fit_clipped_scales(layers: Mapping[str, nn.Module]) -> dict[str, float]:
    """Clip each layer's latent weight to ``c max|W|`` with the least quantization error at its current bits.

    Returns ``{name: c}``. The ratios are averaged across ranks before any weight changes (the weights are the
    same on every rank under DDP, so this only guards against a device whose sums round differently), so every
    process clips alike. Layers must use ``wnorm="signmag"`` (a ``ValueError`` names the first that does not).
    """
    for name, layer in layers.items():
        if layer.wnorm != "signmag":
            raise ValueError(f"qat_scale='mse': layer {name!r} has wnorm={layer.wnorm!r}; the clip needs 'signmag'")
    ratios = reduce_across_ranks({name: best_clip_ratio(layer.weight, layer.n_bits) for name, layer in layers.items()})
    for name, layer in layers.items():
        clip_weight_(layer.weight.data, min(1.0, ratios[name]))
    logger.debug("msq_hf: clipped scales %s", ratios)
    return ratios


__all__ = ["fit_clipped_scales"]
