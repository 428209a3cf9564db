"""The clipped scale of a layer whose bit width is final: ``S = c max|W|`` with the least quantization error.

MSQ's grid spans ``[0, S]`` with ``S = max|W|`` (the paper's choice): one large weight sets the step of the whole
layer. While bits are being pruned that scale must not move on its own, or a weight whose LSBs are zero would not
keep its value when its layer drops them (the nesting every threshold decision relies on). Once the bit scheme is
final nothing is pruned any more, and the scale is free to fit each layer's final grid: ``c`` in (0, 1] minimizing
``||Q_n(W; c max|W|) - W||^2`` at the layer's final ``n`` bits. Weights beyond ``c max|W|`` lose nothing by being
clipped to it (both round to the top level), so clipping the latent weights *is* the clipped scale: ``max|W|``
then equals the clipped range, and every path that computes ``S = max|W|`` (the fused kernels, the export's codes
and scale) uses it without a change (docs/training.md, "A clipped scale once the scheme is final").

Pure functions; the controller decides when to call them (:mod:`msq_hf.training.controller`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from msq_hf.quant.functional import fake_quantize_signmag, max_abs_scale

#: points of the first, coarse search over ``c`` in (0, 1] (``1`` included: never worse than ``max|W|``)
COARSE_POINTS = 20
#: points of the second search, on the coarse step around the coarse optimum (resolution ``1/(20*20)``)
FINE_POINTS = 20


def search_ratio(error: Callable[[float], float]) -> float:
    """The ratio ``c`` in (0, 1] with the least ``error(c)``: a coarse grid, then a fine grid around its best point.

    Ties go to the larger ``c`` (less clipping). ``error`` is called ``COARSE_POINTS + FINE_POINTS`` times.
    """
    coarse = [(i + 1) / COARSE_POINTS for i in range(COARSE_POINTS)]
    best = _argmin(error, coarse)
    width = 1.0 / COARSE_POINTS
    fine = [best - width + 2 * width * (i + 1) / (FINE_POINTS + 1) for i in range(FINE_POINTS)]
    return _argmin(error, [c for c in fine if 0 < c <= 1] + [best])


def _argmin(error: Callable[[float], float], ratios: list[float]) -> float:
    scored = [(error(c), -c) for c in ratios]
    return -min(scored)[1]


def quantization_error(weight: torch.Tensor, bits: int, scale: torch.Tensor) -> float:
    """``||Q_n(W; S) - W||^2`` of MSQ's sign-magnitude grid at ``bits`` magnitude bits and scale ``S`` (float64 sum)."""
    w = weight.detach().float()
    return float(fake_quantize_signmag(w, bits, scale.float()).sub_(w).square_().sum(dtype=torch.float64))


def best_clip_ratio(weight: torch.Tensor, bits: int) -> float:
    """The ``c`` of :func:`search_ratio` for MSQ's grid at ``bits``: the clipped scale ``c max|W|`` of least error."""
    w = weight.detach().float()
    top = max_abs_scale(w)
    return search_ratio(lambda c: quantization_error(w, bits, top * c))


def clip_weight_(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Clamp ``weight`` in place to ``[-c max|W|, c max|W|]`` (a no-op at ``c = 1``); returns it."""
    if not 0 < ratio <= 1:
        raise ValueError(f"clip ratio {ratio!r} is not in (0, 1]")
    if ratio < 1:
        with torch.no_grad():
            bound = max_abs_scale(weight).to(weight.dtype) * ratio
            weight.clamp_(-bound, bound)
    return weight


__all__ = ["COARSE_POINTS", "FINE_POINTS", "best_clip_ratio", "clip_weight_", "quantization_error", "search_ratio"]
