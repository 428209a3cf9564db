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

from msq_hf.quant.grid import grid_constants, grid_values, max_abs_scale, scale_factors

logger = logging.getLogger(__name__)


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
    scale = max_abs_scale(w)
    step = scale / levels
    x = torch.div(w, step)
    q = torch.round(x).clamp_(-qmax, qmax)
    low = torch.mul(x, low_scale).round_().clamp_(-low_max, low_max).mul_(two_k)
    ell = torch.sub(x if continuous else q, low, out=low)
    s_coef, s_reg = scale_factors(scale, units)
    reg = (torch.linalg.vector_norm(ell, 1).float() * reg_mult * s_reg).to(w.dtype)
    return q.mul_(step), ell.sign_().to(torch.int8), reg, (coef_mult * s_coef).to(w.dtype)


def fused_backward_eager(grad: torch.Tensor, sign: torch.Tensor, grad_reg: torch.Tensor, coef: torch.Tensor):
    """``grad + (dL/dR * c) * sign`` -- the straight-through gradient plus MSQ Eq. 7."""
    return torch.addcmul(grad, sign.to(grad.dtype), (grad_reg * coef).to(grad.dtype))


def fused_forward_graph(
    w: torch.Tensor, bits: torch.Tensor, k: torch.Tensor, continuous: bool, units: str, mean: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fused_forward_eager` without in-place ops or ``out=``: the form ``torch.compile`` traces."""
    q, step, ell, reg, coef = grid_values(w, max_abs_scale(w), bits, k, continuous, units, mean)
    return q * step, torch.sign(ell).to(torch.int8), reg, coef


def fused_backward_graph(grad: torch.Tensor, sign: torch.Tensor, grad_reg: torch.Tensor, coef: torch.Tensor):
    """:func:`fused_backward_eager` in the form ``torch.compile`` traces."""
    return grad + sign.to(grad.dtype) * (grad_reg * coef).to(grad.dtype)


def _fused_backward_inplace_graph(grad, sign, grad_reg, coef):
    # the weight gradient autograd hands the quantizer is a fresh buffer owned by this backward
    # call; adding into it saves one weight-sized allocation and write per layer and step
    grad.add_(sign.to(grad.dtype) * (grad_reg * coef).to(grad.dtype))
    return grad


# -- the kernels of the one-node path (msq_hf.nn.quantizer.MSQWeightOp) -------------------------------------
# The forward also returns the scale S it used; the backward rebuilds W_q from (W, S) in one elementwise pass (no
# reduction) for the op's input gradient, then adds c sign(l) into the op's fresh weight gradient with the saved
# int8 sign (the ordinary backward kernel). The same operations as the forward: the same bits.


def op_forward_graph(
    w: torch.Tensor, bits: torch.Tensor, k: torch.Tensor, continuous: bool, units: str, mean: bool
) -> tuple[torch.Tensor, ...]:
    """``(W_q, sign(l), R, c, S)``: :func:`fused_forward_graph` plus the scale it used."""
    scale = max_abs_scale(w)
    q, step, ell, reg, coef = grid_values(w, scale, bits, k, continuous, units, mean)
    return q * step, torch.sign(ell).to(torch.int8), reg, coef, scale


def requantize_graph(w: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``W_q`` of ``w`` at the given scale: bit-identical to the ``W_q`` of :func:`op_forward_graph`."""
    q, step, *_ = grid_values(w, scale, bits, torch.zeros_like(bits), True, "scale", False)
    return q * step


def requantize_eager(w: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """:func:`requantize_graph` with in-place ops (one allocation): the operations of :func:`fused_forward_eager`."""
    levels, qmax, *_ = grid_constants(bits, torch.zeros_like(bits), w.dtype, "scale", None)
    step = scale / levels
    return torch.div(w, step).round_().clamp_(-qmax, qmax).mul_(step)


def as_int_tensor(value: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d int32 tensor on ``device`` (tensors are passed through: no host read)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(int(value), dtype=torch.int32, device=device)


# name -> the traced form compiled for it; all are compiled together and checked against the eager functions first
_GRAPHS = {
    "forward": fused_forward_graph,
    "backward": fused_backward_graph,
    "backward_inplace": _fused_backward_inplace_graph,
    "op_forward": op_forward_graph,
    "requantize": requantize_graph,
}


def _flat(t: torch.Tensor) -> torch.Tensor:
    # a flat contiguous vector that is not a view (detach drops ``_base``, on whose strides dynamo would
    # otherwise guard): the compiled graphs see one input layout whatever the weight's rank, size-1 dims or
    # memory format, so layer variety causes no recompiles
    return t.reshape(-1).contiguous().detach()


def _owned(grad: torch.Tensor, may_overwrite: bool) -> bool:
    # whether ``grad`` may be updated in place: the caller owns it, and it is plain contiguous storage with no
    # graph recorded through it (inside a compiled graph autograd's buffers are never ours to overwrite)
    return (
        may_overwrite
        and grad.is_contiguous()
        and not grad.requires_grad
        and not torch.is_grad_enabled()
        and grad._base is None
    )


class _Kernels:
    """Lazily compiled per-layer kernels with a one-time self-check against the eager versions.

    Each kernel runs compiled for float32 CPU tensors when compiling works here, traced into the caller's graph
    inside a model that is itself being compiled (``torch.compile(model)``, ``TrainingArguments(torch_compile=
    True)``: no nested compile, no in-place update of a tensor autograd owns), and eager otherwise.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: str | None = None  # None (untried), "compiled", "eager"
        self._compiled: dict[str, object] = {}

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
            compiled = {name: torch.compile(g, dynamic=True, fullgraph=True) for name, g in _GRAPHS.items()}
            _self_check(compiled)
        except Exception as exc:  # no compiler, unsupported platform, mismatch, ...
            if mode in ("1", "true", "yes", "compile"):
                raise RuntimeError(f"MSQ_HF_COMPILE={mode}: compiling the MSQ kernels failed: {exc}") from exc
            logger.warning("msq_hf: using eager MSQ kernels (torch.compile unavailable here: %s)", exc)
            self._state = "eager"
            return
        self._compiled = compiled
        self._state = "compiled"

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

    def _compiled_call(self, name: str, like: torch.Tensor, *args):
        """The compiled kernel ``name`` on ``args`` if it applies to tensors like ``like``, else None."""
        if not (self._ready() and like.device.type == "cpu" and like.dtype == torch.float32):
            return None
        try:
            return self._compiled[name](*args)
        except Exception as exc:  # noqa: BLE001 -- any compiler failure must not break training
            self._fall_back(exc)
            return None

    def forward(
        self,
        w: torch.Tensor,
        bits: int | torch.Tensor,
        k: int | torch.Tensor,
        continuous: bool,
        units: str,
        mean: bool,
    ):
        """``(W_q, sign, R, c)`` of one layer; ``bits``/``k`` as 0-d int tensors (or ints, for tests and tools)."""
        bits, k = as_int_tensor(bits, w.device), as_int_tensor(k, w.device)
        if torch.compiler.is_compiling():
            return fused_forward_graph(w, bits, k, continuous, units, mean)
        out = self._compiled_call("forward", w, _flat(w), bits, k, bool(continuous), str(units), bool(mean))
        if out is None:
            return fused_forward_eager(w, bits, k, continuous, units, mean)
        wq, sign, reg, coef = out
        return wq.view(w.shape), sign.view(w.shape), reg, coef

    def backward(
        self,
        grad: torch.Tensor,
        sign: torch.Tensor,
        grad_reg: torch.Tensor,
        coef: torch.Tensor,
        may_overwrite: bool = False,
    ):
        """Straight-through gradient plus the regularizer gradient.

        ``may_overwrite``: the caller owns ``grad`` (see ``msq_quantize_weight(owns_grad=...)``); the
        sum is then written into it when that is safe.
        """
        if torch.compiler.is_compiling():
            return fused_backward_graph(grad, sign, grad_reg, coef)
        inplace = _owned(grad, may_overwrite)
        flat = grad.reshape(-1).detach() if inplace else _flat(grad)
        name = "backward_inplace" if inplace else "backward"
        out = self._compiled_call(name, grad, flat, _flat(sign), grad_reg.detach(), coef.detach())
        return fused_backward_eager(grad, sign, grad_reg, coef) if out is None else out.view(grad.shape)

    def op_forward(
        self, w: torch.Tensor, bits: torch.Tensor, k: torch.Tensor, continuous: bool, units: str, mean: bool
    ) -> tuple[torch.Tensor, ...]:
        """``(W_q, sign, R, c, S)`` of one layer for the one-node path (:meth:`forward` plus the scale)."""
        if torch.compiler.is_compiling():
            return op_forward_graph(w, bits, k, continuous, units, mean)
        out = self._compiled_call("op_forward", w, _flat(w), bits, k, bool(continuous), str(units), bool(mean))
        if out is None:
            return (*fused_forward_eager(w, bits, k, continuous, units, mean), max_abs_scale(w))
        wq, sign, reg, coef, scale = out
        return wq.view(w.shape), sign.view(w.shape), reg, coef, scale

    def requantize(self, w: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """``W_q`` rebuilt from ``W`` and the forward's scale: bit-identical to :meth:`op_forward`'s."""
        if torch.compiler.is_compiling():
            return requantize_graph(w, scale, bits)
        out = self._compiled_call("requantize", w, _flat(w), scale, bits)
        return requantize_eager(w, scale, bits) if out is None else out.view(w.shape)

    @staticmethod
    def fake_quantize(w: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
        """:func:`fake_quantize` (the straight-through forward without a regularizer)."""
        return fake_quantize(w, as_int_tensor(bits, w.device))

    @property
    def state(self) -> str | None:
        """``"compiled"``, ``"eager"`` or ``None`` before first use."""
        return self._state


def _self_check(compiled: dict) -> None:
    """Raise unless every compiled kernel reproduces its eager reference (ties on several grids included)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4099, generator=gen)
    w[:64] = torch.arange(-32, 32) / 16.0  # exact ties on several grids
    for bits, k in ((8, 1), (3, 2), (2, 1), (4, 0)):
        for continuous in (True, False):
            b, kk = torch.tensor(bits, dtype=torch.int32), torch.tensor(k, dtype=torch.int32)
            wq, sign, reg, coef = fused_forward_eager(w, b, kk, continuous, "step", False)
            got = compiled["forward"](w, b, kk, continuous, "step", False)
            ok = torch.equal(wq, got[0]) and torch.equal(sign, got[1]) and torch.equal(coef, got[3])
            ok = ok and torch.allclose(reg, got[2], rtol=1e-5)
            op = compiled["op_forward"](w, b, kk, continuous, "step", False)
            ok = ok and all(torch.equal(a, c) for a, c in zip(op[:4:2], got[:4:2], strict=True))
            ok = ok and torch.equal(op[1], sign) and torch.equal(op[3], coef)
            ok = ok and torch.equal(compiled["requantize"](w, op[4], b), wq)
            if not ok:
                raise RuntimeError(f"compiled MSQ kernels disagree with eager at bits={bits}, k={k}")
    g = torch.randn(4099, generator=gen)
    args = (sign, torch.tensor(0.5), torch.tensor(0.25))
    ref = fused_backward_eager(g, *args)
    if not (
        torch.allclose(compiled["backward"](g, *args), ref)
        and torch.allclose(compiled["backward_inplace"](g.clone(), *args), ref)
    ):
        raise RuntimeError("compiled backward kernel disagrees with the eager reference")


KERNELS = _Kernels()

__all__ = [
    "KERNELS",
    "as_int_tensor",
    "fake_quantize",
    "fused_backward_eager",
    "fused_backward_graph",
    "fused_forward_eager",
    "fused_forward_graph",
    "op_forward_graph",
    "requantize_eager",
    "requantize_graph",
]
