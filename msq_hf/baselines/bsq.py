"""BSQ baseline: bit-level sparsity quantization (Yang et al., ICLR 2021), faithful to ``yanghr/BSQ``.

Every ``nn.Linear``/``nn.Conv2d`` weight of precision ``N`` becomes two trainable bit-plane tensors
``p, n`` of shape ``[*weight_shape, N]`` (relaxed to reals, clipped to [0, 2] after every optimizer
step) plus a trainable scalar ``scale`` (initialised to ``max|W|``)::

    w   = sum_b (p_b - n_b) * 2^(N-1-b) / (2^N - 1)           (b = 0 is the MSB)
    W_q = scale * sign(w~) * round(|w~| (2^N - 1)) / (2^N - 1),  w~ = clamp(w, -1, 1)

with a straight-through gradient from ``W_q / scale`` to ``w`` (``bit_STE``), so bit ``b`` of ``p``
receives ``g * 2^(N-1-b)/(2^N-1)`` and the same bit of ``n`` its negative (``g = dL/dw``).

Training schedule (``docs/baselines.md``)::

    convert(model, init_bits=8)
    requantize_and_adjust(model)                 # epoch 0, then every Prun_Int epochs and at the end
    opt = make_optimizer(model)                  # re-create: parameter shapes change
    loss = ce + alpha * regularization(model)    # alpha = BSQ's --decay
    loss.backward(); opt.step(); clamp_bits_(model)

Biases stay float (BSQ bit-quantizes the FC bias separately; here biases are neither quantized
nor counted, as in the MSQ accounting).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from msq_hf.baselines.common import (
    QuantLayerBase,
    exponent_vector,
    iter_layers,
    layers_compression,
    layers_of,
    replace_layers,
    split_bits,
    trainable_parameters,
)
from msq_hf.convert import register_layer
from msq_hf.nn.base import CONV_TYPES, LINEAR_TYPES
from msq_hf.quant.functional import check_bits, signed_codes, ste

#: BSQ's ``quant(maxbit=8)``: re-quantization never grows a layer beyond this
DEFAULT_MAX_BITS = 8


def bit_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """BSQ's ``bit_STE`` forward (no gradient): ``sign(w~) round(|w~|(2^N-1))/(2^N-1)``, ``w~ = clamp(w,-1,1)``."""
    return signed_codes(w.detach().clamp(-1.0, 1.0), bits, 1.0, nested=False) / (2**bits - 1)


class BSQLayer(QuantLayerBase):
    """A Linear/Conv2d whose weight is ``N`` relaxed bit planes ``pweight - nweight`` times ``scale``."""

    method = "bsq"

    def __init__(self, module: nn.Module, bits: int, act_quantizer: nn.Module | None = None):
        super().__init__()
        self._init_geometry(module, act_quantizer)
        bits = check_bits(bits, "bsq init_bits")
        w = module.weight.detach()
        shape = (*w.shape, bits)
        self.pweight = nn.Parameter(w.new_zeros(shape))
        self.nweight = nn.Parameter(w.new_zeros(shape))
        self.scale = nn.Parameter(w.new_ones(()))
        self._bits = bits
        self.register_buffer("exps", exponent_vector(bits, w), persistent=False)
        self.ini2bit(w)

    # -- representation ------------------------------------------------------------------------
    @property
    def n_bits(self) -> int:
        """Current precision ``N`` (number of bit planes)."""
        return self._bits

    def _set_bits(self, bits: int) -> None:
        self._bits = bits
        self.exps = exponent_vector(bits, self.pweight)

    @torch.no_grad()
    def ini2bit(self, weight: torch.Tensor) -> None:
        """BSQ ``ini2bit``: exact 0/1 planes of ``R = round(|W| (2^N-1) / max|W|)``; ``scale = max|W|``.

        Positive weights go to ``p``, the others to ``n``. An all-zero weight keeps zero planes and
        ``scale = 1`` (a zero scale would freeze the layer: every bit gradient carries a factor scale).
        """
        n_bits = self._bits
        s = weight.abs().max()
        if s == 0:
            self.pweight.zero_()
            self.nweight.zero_()
            self.scale.fill_(1.0)
            return
        codes = signed_codes(weight, n_bits, s, nested=False)
        self.pweight.copy_(split_bits(codes.clamp_min(0), n_bits))
        self.nweight.copy_(split_bits((-codes).clamp_min(0), n_bits))
        self.scale.fill_(float(s))

    def latent(self) -> torch.Tensor:
        """The normalized real weight ``w = (p - n) @ exps`` (with autograd graph)."""
        return torch.matmul(self.pweight - self.nweight, self.exps)

    def quantized_weight(self) -> torch.Tensor:
        """``W_q = scale * bit_STE(w)`` (straight-through in ``w``, exact in ``scale``)."""
        w = self.latent()
        return ste(bit_quantize(w, self._bits), w) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The quantized weight, so code that reads ``layer.weight`` keeps working."""
        return self.quantized_weight()

    def group_lasso(self) -> torch.Tensor:
        """``B_GL = sum_b sqrt(sum_i p_ib^2 + n_ib^2 + 1e-8)`` (BSQ ``L1reg``, one group per bit plane)."""
        sq = (self.pweight.square() + self.nweight.square()).reshape(-1, self._bits).sum(0)
        return torch.sqrt(sq + 1e-8).sum()

    @torch.no_grad()
    def plane_density(self) -> list[float]:
        """Fraction of weights with a non-zero digit ``p_b - n_b`` in each plane (MSB first)."""
        d = (self.pweight - self.nweight).reshape(-1, self._bits)
        return (d != 0).to(torch.float32).mean(0).tolist()

    # -- schedule ------------------------------------------------------------------------------
    def _replace_planes(self, p: torch.Tensor, n: torch.Tensor) -> None:
        """Give ``pweight``/``nweight`` new bit planes (their number may change), keeping the Parameters.

        Keeping the Parameter objects means an optimizer built before the change fails loudly on its
        next step (state of the old shape) instead of silently updating orphaned tensors; callers rebuild
        it, as BSQ does. PyTorch drops a leaf's cached gradient accumulator on ``.data`` assignment only
        when the dtype or device changes, and a stale accumulator of the old shape (alive while any
        earlier graph is referenced, e.g. last step's logits) would reject the next gradient; passing
        through another dtype first forces a fresh one.
        """
        for param, data in ((self.pweight, p), (self.nweight, n)):
            other = torch.float64 if data.dtype != torch.float64 else torch.float32
            param.data = data.to(other)
            param.data = data
            param.grad = None

    @torch.no_grad()
    def requantize(self, max_bits: int = DEFAULT_MAX_BITS) -> None:
        """BSQ ``quant``: round ``w`` back to exact planes, growing ``N`` by one if it overflows.

        ``R = round(|w| (2^N - 1))`` split by sign. If ``max R > 2^N - 1`` and ``N < max_bits`` the
        layer gets one more MSB and ``scale *= (2^(N+1)-1)/(2^N-1)``, which keeps every value
        (planes in [0, 2] give ``|w| <= 2``, so one extra bit always suffices); otherwise ``R`` saturates.
        """
        n_bits = self._bits
        w = self.latent()
        levels = 2**n_bits - 1
        codes = signed_codes(w, n_bits, 1.0, nested=False)
        r_pos, r_neg = codes.clamp_min(0), (-codes).clamp_min(0)
        if float(torch.maximum(r_pos.max(), r_neg.max())) > levels and n_bits < max_bits:
            n_bits += 1
            self.scale.mul_((2**n_bits - 1) / levels)
            levels = 2**n_bits - 1
        r_pos.clamp_(max=levels)
        r_neg.clamp_(max=levels)
        self._replace_planes(
            split_bits(r_pos, n_bits).to(self.pweight.dtype), split_bits(r_neg, n_bits).to(self.nweight.dtype)
        )
        self._set_bits(n_bits)

    @torch.no_grad()
    def prune_planes(self, threshold: float = 0.0) -> None:
        """BSQ ``pruning``: drop empty MSB planes and sparse LSB planes, keeping the values.

        * MSB side: a leading plane with no non-zero digit is dropped; one with a non-zero
          fraction below ``threshold`` is OR-merged into every lower plane (saturating those weights)
          and dropped. Stops at the first denser plane.
        * LSB side: trailing planes with a non-zero fraction ``<= threshold`` are dropped, each one
          doubling ``scale``.
        * ``scale *= (2^N' - 1)/(2^N0 - 1)`` because the exponent table depends on ``N``.
        Never goes below one bit. ``threshold`` is a fraction (BSQ's percent ``--thre`` / 100).
        """
        n0 = self._bits
        if n0 <= 1:
            return
        p, n = self.pweight.data, self.nweight.data
        bits = n0
        while bits > 1:
            density = float(((p[..., 0] - n[..., 0]) != 0).to(torch.float32).mean())
            if density == 0:
                p, n = p[..., 1:], n[..., 1:]
            elif density < threshold:
                p = (p[..., 1:] + p[..., :1]).clamp_(max=1.0)
                n = (n[..., 1:] + n[..., :1]).clamp_(max=1.0)
            else:
                break
            bits -= 1
        while bits > 1:
            density = float(((p[..., -1] - n[..., -1]) != 0).to(torch.float32).mean())
            if density > threshold:
                break
            p, n = p[..., :-1], n[..., :-1]
            self.scale.mul_(2.0)
            bits -= 1
        self.scale.mul_((2**bits - 1) / (2**n0 - 1))
        self._replace_planes(p.contiguous(), n.contiguous())
        self._set_bits(bits)

    def extra_repr(self) -> str:
        return f"{self.geometry_repr()}, bits={self._bits}"


# ------------------------------------------------------------------------------------------------
# module-level API (same shape for every baseline)


def convert(
    model: nn.Module,
    init_bits: int = 8,
    *,
    modules_to_not_convert: Sequence[str] | None = None,
    act_bits: int | None = None,
    act_skip_first: bool = True,
) -> nn.Module:
    """Replace every Linear/Conv2d of ``model`` in place by a :class:`BSQLayer` at ``init_bits``.

    Planes are the exact binary digits of the ``init_bits``-bit quantized float weight
    (``ini2bit``), ``scale = max|W|``. ``act_bits`` adds a PACT input quantizer to every layer but
    the first. Raises ``ValueError`` if nothing was converted.
    """
    check_bits(init_bits, "bsq init_bits")
    replace_layers(model, "bsq", modules_to_not_convert, act_bits, act_skip_first, bits=init_bits)
    return model


register_layer("bsq", *LINEAR_TYPES, *CONV_TYPES)(BSQLayer)


def bsq_layers(model: nn.Module) -> dict[str, BSQLayer]:
    """``{name: layer}`` of every BSQ layer (``ValueError`` if none)."""
    return layers_of(model, BSQLayer, "bsq")


def regularization(model: nn.Module) -> torch.Tensor:
    """Memory-aware bit-level group Lasso ``sum_l (N_l * numel_l / TP) * B_GL(l)``.

    ``TP`` is the total number of converted weights. Multiply by BSQ's ``--decay`` (alpha).
    """
    layers = list(bsq_layers(model).values())
    total = sum(m.numel for m in layers)
    return torch.stack([m.group_lasso() * (m.n_bits * m.numel / total) for m in layers]).sum()


@torch.no_grad()
def clamp_bits_(model: nn.Module) -> None:
    """Clip every bit plane to [0, 2]; call after each optimizer step (BSQ does this every step)."""
    for _, layer in iter_layers(model, BSQLayer):
        layer.pweight.clamp_(0.0, 2.0)
        layer.nweight.clamp_(0.0, 2.0)


def requantize_and_adjust(model: nn.Module, threshold: float = 0.0, max_bits: int = DEFAULT_MAX_BITS) -> dict[str, int]:
    """BSQ's periodic re-quantization + precision adjustment; returns the new ``{layer: bits}``.

    Per layer: ``requantize(max_bits)`` (planes exactly 0/1 again, one more bit on overflow) then
    ``prune_planes(threshold)`` (empty MSBs, sparse LSBs). Quantized values are preserved (up to the
    re-rounding of relaxed bits). **Parameter shapes change: the caller must re-create the
    optimizer** (a stale SGD with momentum fails loudly on the shape mismatch).
    """
    check_bits(max_bits, "max_bits")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold={threshold} must be a fraction in [0, 1)")
    layers = bsq_layers(model)
    for layer in layers.values():
        layer.requantize(max_bits)
        layer.prune_planes(threshold)
    return {name: layer.n_bits for name, layer in layers.items()}


def bit_scheme(model: nn.Module) -> dict[str, int]:
    """``{layer: N}`` (magnitude bits; the sign is not counted, as in BSQ)."""
    return {name: layer.n_bits for name, layer in bsq_layers(model).items()}


def compression_ratio(model: nn.Module) -> float:
    """``32 * sum_l numel_l / sum_l N_l numel_l`` over the converted weights."""
    layers = bsq_layers(model)
    return layers_compression(layers)


def plane_density(model: nn.Module) -> dict[str, list[float]]:
    """Per layer, the non-zero fraction of each bit plane (MSB first) -- BSQ's ``print_stat``."""
    return {name: layer.plane_density() for name, layer in bsq_layers(model).items()}


__all__ = [
    "BSQLayer",
    "bit_quantize",
    "bit_scheme",
    "bsq_layers",
    "clamp_bits_",
    "compression_ratio",
    "convert",
    "plane_density",
    "regularization",
    "requantize_and_adjust",
    "trainable_parameters",
]
