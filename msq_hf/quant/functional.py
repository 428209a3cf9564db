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

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch

WeightNorm = Literal["signmag", "dorefa"]
LSBForm = Literal["continuous", "discrete"]
LSBUnits = Literal["code", "value"]

MIN_BITS = 1
MAX_BITS = 8


def _check_bits(bits: int, name: str = "bits") -> int:
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name}={bits} is outside the supported range {MIN_BITS}..{MAX_BITS}")
    return bits


def max_abs_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-layer scale ``S = max|W|`` (detached; 1.0 for an all-zero tensor to avoid 0/0).

    Uses a single ``aminmax`` pass instead of ``abs().max()`` (which would allocate a copy).
    """
    with torch.no_grad():
        lo, hi = torch.aminmax(weight.detach())
        scale = torch.maximum(-lo, hi).to(torch.float32)
        return torch.where(scale > 0, scale, torch.ones_like(scale))


def roundclamp_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer RoundClamp codes ``RC_n(u) = clamp(round(2^n u), 0, 2^n - 1)`` for ``u`` in [0, 1].

    Returned as a float tensor holding integers (use ``.to(torch.uint8)`` to store them).
    """
    bits = _check_bits(bits)
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


def signed_codes(weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Signed integer codes ``sign(W) * RC_n(|W|/S)``, in ``[-(2^n-1), 2^n-1]`` (float tensor)."""
    bits = _check_bits(bits)
    scale = max_abs_scale(weight) if scale is None else scale
    levels = 2**bits
    # same arithmetic as fake_quantize_signmag (division by the power-of-two step), so that
    # codes * step reproduces the fake-quantized weight bit for bit
    step = (scale / levels).to(weight.dtype)
    return torch.div(weight.detach(), step).round_().clamp_(-(levels - 1), levels - 1)


def fake_quantize_signmag(weight: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude RoundClamp fake quantization, no gradient (``S * sign(W) * v_n(|W|/S)``).

    Computed as ``clamp(round(W / step), -(2^n-1), 2^n-1) * step`` with ``step = S/2^n``: dividing
    by a power-of-two multiple of ``S`` rounds exactly like ``round(2^n * (|W|/S))``, so the result
    is bit-identical to the textbook formula, in four in-place passes (measured ~4x faster than
    ``torch.fake_quantize_per_tensor_affine`` on CPU).
    """
    bits = _check_bits(bits)
    levels = 2**bits
    step = (scale / levels).to(weight.dtype)
    x = torch.div(weight.detach(), step)
    x.round_().clamp_(-(levels - 1), levels - 1)
    return x.mul_(step)


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


def lsb_signed_residual(
    weight: torch.Tensor,
    bits: int,
    k: int,
    scale: torch.Tensor,
    form: LSBForm = "continuous",
) -> torch.Tensor:
    """Signed LSB ``sign(W) * l_{n,k}`` in n-bit code units, without gradient.

    * continuous (MSQ Eq. 5): ``l = 2^n u - 2^k RC_{n-k}(u)`` -- distance (in n-bit steps) to the
      nearest (n-k)-bit level; real-valued, slope ``2^n`` in ``u``.
    * discrete (Eq. 3): ``d = RC_n(u) - 2^k RC_{n-k}(u)`` -- the integer value of the k-LSB field
      relative to the nearest (n-k)-bit level; zero exactly when the k LSBs of the code are zero.

    Multiplying by ``sign(W)`` keeps the formula odd-symmetric so it can be computed on the
    signed weight directly. ``k`` must satisfy ``1 <= k < n``.
    """
    bits = _check_bits(bits)
    if not 1 <= k < bits:
        raise ValueError(f"k={k} must satisfy 1 <= k < bits={bits}")
    w = weight.detach()
    low = fake_quantize_signmag(w, bits - k, scale)
    top = fake_quantize_signmag(w, bits, scale) if form == "discrete" else w
    return (top - low) * (2**bits / scale)


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
    bits = _check_bits(bits)
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
    units: LSBUnits = "code",
    reduction: Literal["sum", "mean"] = "sum",
    wnorm: WeightNorm = "signmag",
) -> torch.Tensor:
    """Reference L1 LSB regularizer of one layer, with a full autograd graph (MSQ Eq. 6).

    ``R = sum_i |l_{n,k}(u_i)|`` (``units="code"``) or ``sum_i |l/2^n|`` (``units="value"``).
    Its gradient is ``dR/dW = c * sign(l) * sign(W) / S`` with ``c = 2^n`` (code) or 1 (value)
    (Eq. 7). The layers use a fused equivalent (``msq_hf.nn.layers``); this one is the readable
    reference the tests check them against.
    """
    if wnorm == "signmag":
        scale = max_abs_scale(weight)
        u = weight.abs() / scale
    else:
        u = dorefa_affine_normalize(weight)
    ell = lsb_continuous(u, bits, k) if form == "continuous" else lsb_discrete(u, bits, k)
    if units == "value":
        ell = ell / 2**bits
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


def compression_of_scheme(scheme: Mapping[str, int], numels: Mapping[str, int], count_sign_bit: bool = False) -> float:
    """``compression_ratio`` of a ``{layer: bits}`` scheme given ``{layer: numel}``."""
    names = list(scheme)
    return compression_ratio([numels[n] for n in names], [scheme[n] for n in names], count_sign_bit)


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


def dorefa_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa integer codes ``round((2^n - 1) u)`` on ``u`` in [0, 1] (grids are *not* nested)."""
    return torch.round(u * (2**bits - 1))


def dorefa_lsb_continuous(u: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The LSB construction applied to DoReFa: ``(2^n-1) u - 2^k round((2^{n-k}-1) u)``.

    Shown for contrast: its sign is biased positive (about 79 % of uniform u for n=3, k=1), so an L1
    penalty mostly pushes weights down -- the failure MSQ's RoundClamp fixes.
    """
    return (2**bits - 1) * u - 2**k * torch.round((2 ** (bits - k) - 1) * u)


def storage_bits(bits: int, wnorm: WeightNorm = "signmag") -> int:
    """Bits per weight actually stored on disk: sign + magnitude for signmag, ``n`` for dorefa."""
    return bits + 1 if wnorm == "signmag" else bits


def bits_for_ratio(target: float, count_sign_bit: bool = False) -> float:
    """Average magnitude bits that realise a compression ``target`` (``32/target``, minus sign)."""
    return 32.0 / target - (1 if count_sign_bit else 0)


__all__ = [
    "average_bits",
    "bits_for_ratio",
    "compression_of_scheme",
    "compression_ratio",
    "dorefa_affine_normalize",
    "dorefa_codes",
    "dorefa_lsb_continuous",
    "dorefa_quantize",
    "fake_quantize_signmag",
    "lsb_continuous",
    "lsb_discrete",
    "lsb_field",
    "lsb_l1",
    "lsb_nonzero_rate",
    "lsb_signed_residual",
    "max_abs_scale",
    "quantize_weight",
    "roundclamp_codes",
    "roundclamp_value",
    "signed_codes",
    "ste",
    "storage_bits",
]
