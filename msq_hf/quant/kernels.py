"""Elementwise kernels of the fused MSQ quantizer: an eager version and a ``torch.compile`` one.

A training step of MSQ touches every weight a few extra times (scale, quantize, LSB sign,
regularizer gradient). On CPU those passes are memory-bound and, for many small layers, dominated
by per-op dispatch overhead. By default the whole per-layer computation therefore runs as one
inductor-generated graph forward and one backward, instead of about fifteen eager ops. Both
versions compute the same numbers: the compiled one is checked against eager on first use and
abandoned (with a warning) on any mismatch or compile failure.

The precision ``bits`` and the pruned LSBs ``k`` enter as 0-d integer tensors (the layers' buffers) and
every constant is derived from them on the device (:func:`grid_constants`): the training forward never
reads a tensor back to the host, and a bit-width change is new data, not a new graph. The same graph
forms are what a whole-model ``torch.compile`` traces (docs/training.md, "torch.compile").

Selection: environment variable ``MSQ_HF_COMPILE`` = ``auto`` (default: compile when inductor
works here), ``1`` (compile, raise if impossible) or ``0`` (eager only: about an order of magnitude
slower per quantizer call on CPU, see docs/training.md). Inference (no grad) uses the eager
:func:`fake_quantize`, bit-identical to the formula exports are checked against.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)


REFERENCE_LEVELS = 256.0  # 2^8: "scale" units measure the pull in grid steps of an 8-bit grid of the layer


def grid_constants(
    bits: torch.Tensor, k: torch.Tensor, dtype: torch.dtype, units: str, numel: int | None
) -> tuple[torch.Tensor, ...]:
    """The kernels' scalars from the 0-d integer tensors ``bits``/``k`` -- on the device, no host read.

    Returns ``(levels, qmax, 2^-k, low_max, 2^k)`` in ``dtype`` (exact: powers of two and ``2^m - 1``
    for m <= 8) and ``(coef_mult, reg_mult)`` in float32, both 0 when ``k == 0`` (a layer that is not
    regularized gets ``R = 0`` and no regularizer gradient). Reading ``bits``/``k`` as Python ints would
    cost one host synchronisation per layer and step, and would make ``torch.compile`` specialize
    (recompile) on every bit-width change; computed here they are ordinary graph inputs.

    ``units`` (see :data:`msq_hf.quant.functional.LSBUnits`) fixes how the layer scale ``S`` enters: the
    kernels form ``c = coef_mult * S^p`` and ``R = reg_mult * S^(p+1) * sum|l|`` with ``p = +1`` for
    ``"scale"``/``"step"`` and ``-1`` otherwise (:func:`scale_powers`).
    """
    one = torch.ones_like(bits)
    levels = torch.bitwise_left_shift(one, bits).to(torch.float32)
    two_k = torch.bitwise_left_shift(one, k).to(torch.float32)
    low_max = (torch.bitwise_left_shift(one, bits - k) - 1).to(dtype)
    active = (k > 0).to(torch.float32) * (1.0 / numel if numel else 1.0)
    if units == "code":  # dR/dW = 2^n/S sign(l): one grid step of l per grid step of W
        coef_mult, reg_mult = levels * active, active
    elif units == "value":  # dR/dW = sign(l)/S: l measured as a fraction of S
        coef_mult, reg_mult = active, active / levels
    elif units == "scale":  # dR/dW = S/2^8 sign(l): lr*lambda*2^(n-8) grid steps, in proportion to S
        coef_mult, reg_mult = active / REFERENCE_LEVELS, active / (REFERENCE_LEVELS * levels)
    else:  # "step": dR/dW = S/2^n sign(l): SGD moves W by lr*lambda grid steps, whatever S and n are
        coef_mult, reg_mult = active / levels, active / (levels * levels)
    return (
        levels.to(dtype),
        (levels - 1).to(dtype),
        (1.0 / two_k).to(dtype),
        low_max,
        two_k.to(dtype),
        coef_mult,
        reg_mult,
    )


def scale_powers(units: str) -> tuple[int, int]:
    """``(p, p + 1)``: the powers of the layer scale ``S`` in ``c`` and in ``R`` (see :func:`grid_constants`)."""
    if units not in ("scale", "step", "code", "value"):
        raise ValueError(f"units={units!r} is not one of 'scale', 'step', 'code', 'value'")
    return (1, 2) if units in ("scale", "step") else (-1, 0)


def _scale_factors(scale: torch.Tensor, units: str) -> tuple[torch.Tensor, torch.Tensor]:
    # S^p and S^(p+1) in float32 for the coefficient and the regularizer value
    s = scale.float()
    return (s, s * s) if scale_powers(units)[0] == 1 else (1.0 / s, torch.ones_like(s))


def fake_quantize(w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``S/2^n * clamp(round(W / (S/2^n)), +-(2^n-1))`` with ``bits`` a 0-d tensor; no autograd.

    Bit-identical to :func:`msq_hf.quant.functional.fake_quantize_signmag` at ``max_abs_scale(W)`` (the
    formula exports are checked against), but traceable by ``torch.compile`` without a host read.
    """
    w = w.detach()
    lo, hi = torch.aminmax(w)
    scale = torch.maximum(-lo, hi).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.bitwise_left_shift(torch.ones_like(bits), bits).to(torch.float32)
    step = (scale / levels).to(w.dtype)
    qmax = (levels - 1).to(w.dtype)
    return torch.clamp(torch.round(w / step), -qmax, qmax) * step


def fused_forward_eager(
    w: torch.Tensor, bits: torch.Tensor, k: torch.Tensor, continuous: bool, units: str, mean: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_q, sign(l), R, c)`` for a weight tensor ``w`` (no autograd); ``bits``/``k`` are 0-d int tensors.

    ``S = max|W|``, ``x = W / (S/2^n)``, ``W_q = clamp(round(x), +-(2^n-1)) * S/2^n``,
    ``l = (x or round-clamped x) - 2^k clamp(round(x 2^-k), +-(2^(n-k)-1))`` (code units),
    ``R = reg_mult S^(p+1) sum|l|``, ``c = coef_mult S^p`` (so that ``dR/dW = c sign(l)``, see :func:`grid_constants`);
    ``R = c = 0`` at ``k = 0``.
    ``W_q`` is :func:`msq_hf.quant.functional.signed_codes` times the step, fused with the LSB term into
    one pass over ``x`` (``tests/nn/test_layers.py`` checks the two agree bit for bit).
    """
    levels, qmax, low_scale, low_max, two_k, coef_mult, reg_mult = grid_constants(
        bits, k, w.dtype, units, w.numel() if mean else None
    )
    lo, hi = torch.aminmax(w)
    scale = torch.maximum(-lo, hi)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    step = scale / levels
    x = torch.div(w, step)
    q = torch.round(x).clamp_(-qmax, qmax)
    low = torch.mul(x, low_scale).round_().clamp_(-low_max, low_max).mul_(two_k)
    ell = torch.sub(x if continuous else q, low, out=low)
    s_coef, s_reg = _scale_factors(scale, units)
    reg = (torch.linalg.vector_norm(ell, 1).float() * reg_mult * s_reg).to(w.dtype)
    return q.mul_(step), ell.sign_().to(torch.int8), reg, (coef_mult * s_coef).to(w.dtype)


def fused_backward_eager(grad: torch.Tensor, sign: torch.Tensor, grad_reg: torch.Tensor, coef: torch.Tensor):
    """``grad + (dL/dR * c) * sign`` -- the straight-through gradient plus MSQ Eq. 7."""
    return torch.addcmul(grad, sign.to(grad.dtype), (grad_reg * coef).to(grad.dtype))


def fused_forward_graph(
    w: torch.Tensor, bits: torch.Tensor, k: torch.Tensor, continuous: bool, units: str, mean: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fused_forward_eager` without in-place ops or ``out=``: the form ``torch.compile`` traces."""
    levels, qmax, low_scale, low_max, two_k, coef_mult, reg_mult = grid_constants(
        bits, k, w.dtype, units, w.numel() if mean else None
    )
    lo, hi = torch.aminmax(w)
    scale = torch.maximum(-lo, hi)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    step = scale / levels
    x = w / step
    q = torch.clamp(torch.round(x), -qmax, qmax)
    low = torch.clamp(torch.round(x * low_scale), -low_max, low_max) * two_k
    ell = (x if continuous else q) - low
    s_coef, s_reg = _scale_factors(scale, units)
    reg = (torch.linalg.vector_norm(ell, 1).float() * reg_mult * s_reg).to(w.dtype)
    return q * step, torch.sign(ell).to(torch.int8), reg, (coef_mult * s_coef).to(w.dtype)


def fused_backward_graph(grad: torch.Tensor, sign: torch.Tensor, grad_reg: torch.Tensor, coef: torch.Tensor):
    """:func:`fused_backward_eager` in the form ``torch.compile`` traces."""
    return grad + sign.to(grad.dtype) * (grad_reg * coef).to(grad.dtype)


def _fused_backward_inplace_graph(grad, sign, grad_reg, coef):
    # the weight gradient autograd hands the quantizer is a fresh buffer owned by this backward
    # call; adding into it saves one weight-sized allocation and write per layer and step
    grad.add_(sign.to(grad.dtype) * (grad_reg * coef).to(grad.dtype))
    return grad


def as_int_tensor(value: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d int32 tensor on ``device`` (tensors are passed through: no host read)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(int(value), dtype=torch.int32, device=device)


class _Kernels:
    """Lazily compiled per-layer kernels with a one-time self-check against the eager versions.

    Inside a model that is itself being compiled (``torch.compile(model)``, ``TrainingArguments(torch_compile=
    True)``) the graph forms are traced straight into the model's graph instead (no nested compile, no
    in-place update of a tensor autograd owns), so the whole forward and backward is one graph.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: str | None = None  # None (untried), "compiled", "eager"
        self._fwd = None
        self._bwd = None
        self._bwd_inplace = None

    @staticmethod
    def mode() -> str:
        """The requested mode from ``MSQ_HF_COMPILE``."""
        return os.environ.get("MSQ_HF_COMPILE", "auto").strip().lower()

    def _try_compile(self) -> None:
        mode = self.mode()
        if mode in ("0", "false", "no", "eager"):
            self._state = "eager"
            return
        try:
            fwd = torch.compile(fused_forward_graph, dynamic=True, fullgraph=True)
            bwd = torch.compile(fused_backward_graph, dynamic=True, fullgraph=True)
            bwd_inplace = torch.compile(_fused_backward_inplace_graph, dynamic=True, fullgraph=True)
            self._self_check(fwd, bwd, bwd_inplace)
        except Exception as exc:  # no compiler, unsupported platform, mismatch, ...
            if mode in ("1", "true", "yes", "compile"):
                raise RuntimeError(f"MSQ_HF_COMPILE={mode}: compiling the MSQ kernels failed: {exc}") from exc
            logger.warning("msq_hf: using eager MSQ kernels (torch.compile unavailable here: %s)", exc)
            self._state = "eager"
            return
        self._fwd, self._bwd, self._bwd_inplace = fwd, bwd, bwd_inplace
        self._state = "compiled"

    @staticmethod
    def _self_check(fwd, bwd, bwd_inplace) -> None:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(4099, generator=gen)
        w[:64] = torch.arange(-32, 32) / 16.0  # exact ties on several grids
        for bits, k in ((8, 1), (3, 2), (2, 1), (4, 0)):
            for continuous in (True, False):
                b, kk = torch.tensor(bits, dtype=torch.int32), torch.tensor(k, dtype=torch.int32)
                ref = fused_forward_eager(w, b, kk, continuous, "step", False)
                got = fwd(w, b, kk, continuous, "step", False)
                if not (
                    torch.equal(ref[0], got[0])
                    and torch.equal(ref[1], got[1])
                    and torch.allclose(ref[2], got[2], rtol=1e-5)
                    and torch.equal(ref[3], got[3])
                ):
                    raise RuntimeError(f"compiled forward kernel disagrees with eager at bits={bits}, k={k}")
        g = torch.randn(4099, generator=gen)
        args = (got[1], torch.tensor(0.5), torch.tensor(0.25))
        ref = fused_backward_eager(g, *args)
        if not (torch.allclose(bwd(g, *args), ref) and torch.allclose(bwd_inplace(g.clone(), *args), ref)):
            raise RuntimeError("compiled backward kernel disagrees with the eager reference")

    def _ready(self) -> bool:
        if self._state is None:
            with self._lock:
                if self._state is None:
                    self._try_compile()
        return self._state == "compiled"

    def _fall_back(self, exc: Exception) -> None:
        """Give up on the compiled kernels for the rest of the process (e.g. recompile limit hit)."""
        if self.mode() in ("1", "true", "yes", "compile"):
            raise RuntimeError(f"MSQ_HF_COMPILE={self.mode()}: a compiled MSQ kernel failed: {exc}") from exc
        logger.warning(
            "msq_hf: compiled MSQ kernel failed (%s: %s); using the eager kernels from now on", type(exc).__name__, exc
        )
        self._state = "eager"

    def forward(
        self,
        w: torch.Tensor,
        bits: int | torch.Tensor,
        k: int | torch.Tensor,
        continuous: bool,
        units: str,
        mean: bool,
    ):
        """``(W_q, sign, R, c)`` of one layer; ``bits``/``k`` as 0-d int tensors (or ints, for tests and tools).

        Compiled per layer when possible (float32 CPU weights), traced into the caller's graph under
        ``torch.compile``, eager otherwise.
        """
        bits, k = as_int_tensor(bits, w.device), as_int_tensor(k, w.device)
        if torch.compiler.is_compiling():
            return fused_forward_graph(w, bits, k, continuous, units, mean)
        if self._ready() and w.device.type == "cpu" and w.dtype == torch.float32:
            # always a flat contiguous vector that is not a view (detach drops ``_base``, on whose
            # strides dynamo would otherwise guard): the compiled graph sees one input layout whatever
            # the weight's rank, size-1 dims or memory format, so layer variety causes no recompiles
            flat = w.reshape(-1).contiguous().detach()
            try:
                wq, sign, reg, coef = self._fwd(flat, bits, k, bool(continuous), str(units), bool(mean))
            except Exception as exc:  # noqa: BLE001 -- any compiler failure must not break training
                self._fall_back(exc)
            else:
                return wq.view(w.shape), sign.view(w.shape), reg, coef
        return fused_forward_eager(w, bits, k, continuous, units, mean)

    def backward(
        self,
        grad: torch.Tensor,
        sign: torch.Tensor,
        grad_reg: torch.Tensor,
        coef: torch.Tensor,
        may_overwrite: bool = False,
    ):
        """Straight-through gradient plus the regularizer gradient, compiled when possible.

        ``may_overwrite``: the caller owns ``grad`` (see ``msq_quantize_weight(owns_grad=...)``); the
        sum is then written into it when that is safe (contiguous, no graph recorded through it, not
        inside a compiled graph, where autograd's buffers are not ours to overwrite).
        """
        if torch.compiler.is_compiling():
            return fused_backward_graph(grad, sign, grad_reg, coef)
        if self._state == "compiled" and grad.device.type == "cpu" and grad.dtype == torch.float32:
            inplace = (
                may_overwrite
                and grad.is_contiguous()
                and not grad.requires_grad
                and not torch.is_grad_enabled()
                and grad._base is None
            )
            flat = (grad.reshape(-1) if inplace else grad.reshape(-1).contiguous()).detach()
            try:
                kernel = self._bwd_inplace if inplace else self._bwd
                out = kernel(flat, sign.reshape(-1).contiguous().detach(), grad_reg.detach(), coef.detach())
            except Exception as exc:  # noqa: BLE001
                self._fall_back(exc)
            else:
                return out.view(grad.shape)
        return fused_backward_eager(grad, sign, grad_reg, coef)

    @staticmethod
    def fake_quantize(w: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
        """:func:`fake_quantize` (the straight-through forward without a regularizer)."""
        return fake_quantize(w, as_int_tensor(bits, w.device))

    @property
    def state(self) -> str | None:
        """``"compiled"``, ``"eager"`` or ``None`` before first use."""
        return self._state


KERNELS = _Kernels()

__all__ = [
    "KERNELS",
    "as_int_tensor",
    "fake_quantize",
    "fused_backward_eager",
    "fused_backward_graph",
    "fused_forward_eager",
    "fused_forward_graph",
    "grid_constants",
    "scale_powers",
]
