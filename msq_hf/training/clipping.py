"""``qat_scale``: once the bit scheme is final, fit every MSQ layer's scale to its final grid.

* ``"mse"``: clip the latent weights to the scale of least quantization error. The controller calls
  :func:`fit_clipped_scales` at the final round (after a rewind, if any) and every ``prune_interval`` steps of the
  QAT phase after it, so that weights the optimizer pushes past the clipped range do not pull ``S = max|W|`` back up.
* ``"learned"``: start each layer's learned step (:mod:`msq_hf.quant.learned`) at that same least-error scale (or,
  with ``learned_step_init="lsq"``, where LSQ starts its step), at the final round; from then on the loss trains it
  (:func:`start_learned_steps`).

The math is in :mod:`msq_hf.quant.clip`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

from msq_hf.quant.clip import best_clip_ratio, clip_weight_
from msq_hf.quant.functional import max_abs_scale
from msq_hf.quant.learned import lsq_initial_step
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


def start_learned_steps(layers: Mapping[str, nn.Module], init: str = "mse") -> dict[str, float]:
    """Start every layer's learned step at ``c max|W| / 2^n``: the least-error clipped scale at its final ``n`` bits
    (``init="mse"``), or LSQ's ``2 mean|W| / sqrt(2^n - 1)`` (``"lsq"``, :func:`msq_hf.quant.learned.lsq_initial_step`).

    Returns ``{name: c}``, averaged across ranks like :func:`fit_clipped_scales`. The weights are not touched (LSQ's
    clamp already holds the weights beyond the range at the top level). A ``ValueError`` names the first layer built
    without ``qat_scale="learned"`` (no ``weight_step``) or not at its final bit width.
    """
    for name, layer in layers.items():
        if getattr(layer, "weight_step", None) is None:
            raise ValueError(f"qat_scale='learned': layer {name!r} has no weight_step (built with another qat_scale)")
    if init not in ("mse", "lsq"):
        raise ValueError(f"learned_step_init={init!r} is not one of 'mse', 'lsq'")
    tops = {name: max_abs_scale(layer.weight.detach()).float() for name, layer in layers.items()}
    ratios = reduce_across_ranks(
        {
            name: best_clip_ratio(layer.weight, layer.n_bits)
            if init == "mse"
            else float(lsq_initial_step(layer.weight, 2**layer.n_bits - 1) * 2**layer.n_bits / tops[name])
            for name, layer in layers.items()
        }
    )
    for name, layer in layers.items():
        ratio = min(1.0, ratios[name]) if init == "mse" else ratios[name]  # LSQ's start may lie beyond max|W|
        layer.start_learned_step(tops[name] * ratio / 2**layer.n_bits)
    logger.debug("msq_hf: learned steps start at clip ratios %s", ratios)
    return ratios


def fit_final_scales(layers: Mapping[str, nn.Module], qat_scale: str, init: str = "mse") -> dict[str, float] | None:
    """What ``qat_scale`` does at the final round: ``{name: c}`` for ``"mse"``/``"learned"`` (the learned steps
    started as ``init``, ``MSQConfig.learned_step_init``, says), ``None`` for ``"max"``."""
    if qat_scale == "mse":
        return fit_clipped_scales(layers)
    if qat_scale == "learned":
        return start_learned_steps(layers, init)
    if qat_scale != "max":
        raise ValueError(f"qat_scale={qat_scale!r} is not one of 'max', 'mse', 'learned'")
    return None


__all__ = ["fit_clipped_scales", "fit_final_scales", "start_learned_steps"]
