"""Pure tensor math of MSQ (and DoReFa, for contrast).

Notation (see ``docs/design-choices.md``): a layer has latent float weights ``W``, a precision of
``n`` magnitude bits and removes ``k`` least-significant bits (LSBs) per pruning step.

Sign-magnitude normalization (the default, ``wnorm="signmag"``)::

    S = max|W|            (per layer, detached)
    u = |W| / S           (in [0, 1])

RoundClamp (MSQ Eq. 4)::

    RC_n(u) = clamp(round(2^n * u), 0, 2^n - 1)          integer code of n bits
    v_n(u)  = RC_n(u) / 2^n                               dequantized value
    W_q     = S * sign(W) * v_n(u)

Dividing by ``2^n`` (not ``2^n - 1``) nests the grids: every (n-k)-bit level is an n-bit level, so
a weight whose k LSBs are zero keeps its exact value when the layer drops k bits.

Because ``round`` is odd-symmetric, the sign-magnitude quantizer equals a symmetric uniform
quantizer on the signed value ``x = 2^n W / S``: ``W_q = S/2^n * clamp(round(x), -(2^n-1), 2^n-1)``.
The implementation uses that form (a few in-place passes per call) for speed.

All functions here are side-effect free; none of them knows about modules or training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from msq_hf.quant import grid

# the supported precisions are declared in quant.bits (torch-free, so the CLI can build its flags without torch)
from msq_hf.quant.bits import MAX_ACT_BITS, MAX_BITS, MIN_ACT_BITS, MIN_BITS, check_bits

WeightNorm = Literal["signmag", "dorefa"]
LSBForm = Literal["continuous", "discrete"]
LSBUnits = Literal["scale", "step", "code", "value"]


def max_abs_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-layer scale ``S = max|W|`` in float32, detached (the kernels' :func:`msq_hf.quant.grid.max_abs_scale`)."""
    return grid.max_abs_scale(weight.detach()).to(torch.float32)


def roundclamp_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer RoundClamp codes ``RC_n(u) = clamp(round(2^n u), 0, 2^n - 1)`` for ``u`` in [0, 1].

    Returned as a float tensor holding integers (use ``.to(torch.uint8)`` to store them).
    """
    bits = check_bits(bits)
    levels = 2**bits
    return torch.clamp(torch.round(u * levels), 0, levels - 1)


def roundclamp_value(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantized RoundClamp value ``v_n(u) = RC_n(u) / 2^n`` (in ``[0, 1 - 2^-n]``)."""
    return roundclamp_codes(u, bits) / 2**bits


def ste(x_quantized: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: forward value of ``x_quantized``, gradient of identity in ``x``.

    ``d ste(q, x) / dx = 1`` (the rounding is treated as identity in the backward pass).
    """
    return x + (x_quantized - x).detach()


def signed_codes(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | float | None = None, *, nested: bool = True
) -> torch.Tensor:
    """Sign-magnitude integer codes ``sign(W) * round(|W| L / S)`` (float tensor, no gradient): the one code formula.

    * ``nested=True`` (MSQ's RoundClamp): ``L = 2^n``, clamped to ``[-(2^n-1), 2^n-1]``; nested grids.
    * ``nested=False`` (the bit-plane baselines BSQ/CSQ): ``L = 2^n - 1``, not clamped, so a
      re-quantization can see codes that overflow ``n`` bits.

    ``S`` defaults to :func:`max_abs_scale`. For ``L = 2^n`` the code is computed as ``W / step`` with
    ``step = S/2^n`` cast to the weight's dtype: dividing by a power-of-two multiple of ``S`` rounds
    exactly like ``W 2^n / S`` in one pass fewer, and ``codes * step`` then reproduces
    :func:`fake_quantize_signmag` bit for bit in any dtype. For ``L = 2^n - 1`` the step is not exact,
    so the textbook order ``(W L) / S`` is kept.
    """
    bits = check_bits(bits)
    scale = max_abs_scale(weight) if scale is None else scale
    w = weight.detach()
    if not nested:
        levels = 2**bits - 1
        s = scale.to(w.dtype) if isinstance(scale, torch.Tensor) else scale
        return torch.mul(w, levels).div_(s).round_()
    levels = 2**bits
    step = (scale / levels).to(w.dtype) if isinstance(scale, torch.Tensor) else scale / levels
    return torch.div(w, step).round_().clamp_(-(levels - 1), levels - 1)


def fake_quantize_signmag(weight: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude RoundClamp fake quantization, no gradient (``S * sign(W) * v_n(|W|/S)``).

    ``signed_codes(W, n, S) * S/2^n``: bit-identical to the textbook formula, in four in-place passes
    (measured ~4x faster than ``torch.fake_quantize_per_tensor_affine`` on CPU).
    """
    return signed_codes(weight, bits, scale).mul_((scale / 2 ** check_bits(bits)).to(weight.dtype))


def quantize_weight(weight: torch.Tensor, bits: int, wnorm: WeightNorm = "signmag") -> torch.Tensor:
    """Fake-quantized weight with the straight-through estimator (no regularizer).

    * ``signmag``: ``W_q = S * sign(W) * v_n(|W|/S)``, ``dW_q/dW = 1``.
    * ``dorefa``: DoReFa-affine normalization ``u = tanh(W)/(2 max|tanh W|) + 1/2`` followed by
      RoundClamp, ``W_q = 2 v_n(u) - 1``; STE through the rounding only (tanh and the affine maps
      are differentiated normally, the max is detached).
    """
    if wnorm == "signmag":
        return ste(fake_quantize_signmag(weight, bits, max_abs_scale(weight)), weight)
    if wnorm == "dorefa":
        u = dorefa_affine_normalize(weight)
        return 2 * ste(roundclamp_value(u.detach(), bits), u) - 1
    raise ValueError(f"wnorm={wnorm!r} is not one of 'signmag', 'dorefa'")


def dorefa_affine_normalize(weight: torch.Tensor) -> torch.Tensor:
    """DoReFa's affine map to [0, 1]: ``u = tanh(W) / (2 max|tanh W|) + 1/2`` (max detached)."""
    t = torch.tanh(weight)
    denom = 2 * t.detach().abs().max().clamp_min(1e-12)
    return t / denom + 0.5


def lsb_continuous(u: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Continuous LSB of MSQ Eq. 5 on normalized magnitudes: ``l = 2^n u - 2^k RC_{n-k}(u)``.

    Differentiable in ``u`` with ``dl/du = 2^n`` (the RoundClamp term is piecewise constant).
    """
    return u * 2**bits - 2**k * roundclamp_codes(u, bits - k).detach()


def lsb_discrete(u: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Discrete LSB ``d = STE(RC_n(u)) - 2^k RC_{n-k}(u)``: gradient ``2^n`` through the first term only."""
    codes = roundclamp_codes(u.detach(), bits)
    return ste(codes, u * 2**bits) - 2**k * roundclamp_codes(u, bits - k).detach()


def lsb_field(codes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-LSB field of unsigned integer codes: ``codes mod 2^k``."""
    return torch.remainder(codes, 2**k)


def lsb_nonzero_rate(weight: torch.Tensor, bits: int, k: int, wnorm: WeightNorm = "signmag") -> float:
    """LSB nonzero rate: fraction of weights whose n-bit code has a non-zero k-LSB field.

    ``rho = mean[ RC_n(u) mod 2^k != 0 ]``. A layer with ``rho == 0`` can drop k bits without
    changing a single quantized value.
    """
    bits = check_bits(bits)
    with torch.no_grad():
        if wnorm == "signmag":
            codes = signed_codes(weight, bits).abs()
        else:
            codes = roundclamp_codes(dorefa_affine_normalize(weight), bits)
        return float((lsb_field(codes, k) != 0).float().mean())


def lsb_l1(
    weight: torch.Tensor,
    bits: int,
    k: int,
    form: LSBForm = "continuous",
    units: LSBUnits = "step",
    reduction: Literal["sum", "mean"] = "sum",
    wnorm: WeightNorm = "signmag",
) -> torch.Tensor:
    """Reference L1 LSB regularizer of one layer, with a full autograd graph (MSQ Eq. 6).

    ``l`` is measured in n-bit grid steps. ``R = sum_i |l_i| * m`` with ``m = S^2/(2^8 2^n)`` (``units="scale"``),
    ``(S/2^n)^2`` (``"step"``), 1 (``"code"``) or ``2^-n`` (``"value"``); ``S`` is detached. Its gradient (Eq. 7)
    is ``dR/dW = c * sign(l) * sign(W)`` with ``c = S/2^8`` (scale), ``S/2^n`` (step), ``2^n/S`` (code) or
    ``1/S`` (value).

    SGD at learning rate ``eta`` moves each weight by ``eta * lambda * 2^(n-8)`` grid steps of its layer
    (``"scale"``) or ``eta * lambda`` (``"step"``): both the same for a layer scaled by any constant. ``"scale"``
    also keeps the pull in proportion to the task gradient's noise in grid steps, which halves with every bit a
    layer loses. With ``"code"`` the pull is ``eta * lambda * 4^n / S^2`` grid steps, so layers with small weights
    or many bits are pulled far harder.
    The layers use a fused equivalent (``msq_hf.nn.layers``); this one is the readable reference the tests
    check them against. Under ``wnorm="dorefa"`` the scale is 1 (the grid lives on ``u`` in [0, 1]).
    """
    if wnorm == "signmag":
        scale = max_abs_scale(weight)
        u = weight.abs() / scale
    else:
        scale = torch.ones((), device=weight.device)
        u = dorefa_affine_normalize(weight)
    ell = lsb_continuous(u, bits, k) if form == "continuous" else lsb_discrete(u, bits, k)
    if units == "value":
        ell = ell / 2**bits
    elif units == "step":
        ell = ell * (scale / 2**bits) ** 2
    elif units == "scale":
        ell = ell * scale**2 / (2**8 * 2**bits)
    elif units != "code":
        raise ValueError(f"units={units!r} is not one of 'scale', 'step', 'code', 'value'")
    total = ell.abs().sum()
    return total / weight.numel() if reduction == "mean" else total


def compression_ratio(
    numels: Sequence[int] | Iterable[int], bits: Sequence[int] | Iterable[int], count_sign_bit: bool = False
) -> float:
    """Parameter-weighted compression ratio ``C = 32 * sum_l N_l / sum_l b_l N_l``.

    ``N_l`` is the number of *weights* of quantized layer ``l`` (``weight.numel()``; biases, norms
    and unquantized layers are excluded, as in the paper and BSQ). ``b_l = n_l`` magnitude bits
    (the paper's accounting: a 1-bit layer is ternary and counts 1 bit), or ``n_l + 1`` when
    ``count_sign_bit`` is set (what a sign-magnitude file really stores).
    """
    numels = list(numels)
    bits = list(bits)
    if len(numels) != len(bits) or not numels:
        raise ValueError("compression_ratio needs one bit width per layer and at least one layer")
    extra = 1 if count_sign_bit else 0
    total = sum(numels)
    stored = sum(n * (b + extra) for n, b in zip(numels, bits))
    return 32.0 * total / stored


def average_bits(numels: Sequence[int], bits: Sequence[int]) -> tuple[float, float]:
    """(parameter-weighted, unweighted) mean bit width over layers."""
    numels = list(numels)
    bits = list(bits)
    weighted = sum(n * b for n, b in zip(numels, bits)) / sum(numels)
    return weighted, sum(bits) / len(bits)


def dorefa_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight quantizer (for contrast and the uniform baseline), with STE on the round.

    ``k >= 2``: ``W_q = 2 * round((2^k-1) w~)/(2^k-1) - 1`` with ``w~ = tanh W/(2 max|tanh W|) + 1/2``.
    ``k = 1``: BWN, ``W_q = sign(W) * E`` with ``E = mean|W|`` (detached). ``k >= 32``: identity.
    """
    if bits >= 32:
        return weight
    if bits == 1:
        e = weight.detach().abs().mean()
        return ste(torch.sign(weight.detach()) * e, weight)
    levels = 2**bits - 1
    u = dorefa_affine_normalize(weight)
    q = ste(torch.round(u.detach() * levels) / levels, u)
    return 2 * q - 1


def storage_bits(bits: int, wnorm: WeightNorm = "signmag") -> int:
    """Bits per weight actually stored on disk: sign + magnitude for signmag, ``n`` for dorefa."""
    return bits + 1 if wnorm == "signmag" else bits


__all__ = [
    "MAX_ACT_BITS",
    "MAX_BITS",
    "MIN_ACT_BITS",
    "MIN_BITS",
    "average_bits",
    "check_bits",
    "compression_ratio",
    "dorefa_affine_normalize",
    "dorefa_quantize",
    "fake_quantize_signmag",
    "lsb_continuous",
    "lsb_discrete",
    "lsb_field",
    "lsb_l1",
    "lsb_nonzero_rate",
    "max_abs_scale",
    "quantize_weight",
    "roundclamp_codes",
    "roundclamp_value",
    "signed_codes",
    "ste",
    "storage_bits",
]
