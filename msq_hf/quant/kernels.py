"""Elementwise kernels of the fused MSQ quantizer: an eager version and a ``torch.compile`` one.

A training step of MSQ touches every weight a few extra times (scale, quantize, LSB sign,
regularizer gradient). On CPU those passes are memory-bound and, for many small layers, dominated
by per-op dispatch overhead. By default the whole per-layer computation therefore runs as one
inductor-generated graph forward and one backward, instead of about fifteen eager ops. Both
versions compute the same numbers: the compiled one is checked against eager on first use and
abandoned (with a warning) on any mismatch or compile failure.

Selection: environment variable ``MSQ_HF_COMPILE`` = ``auto`` (default: compile when inductor
works here), ``1`` (compile, raise if impossible) or ``0`` (eager only). Inference (no grad) always
uses the eager path, which is the one exports are checked against.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)


def _constants(bits: int, k: int, code_units: bool, mean_numel: int | None) -> tuple[float, ...]:
    """Scalar inputs of the kernels: levels, qmax, 2^-k, low_max, 2^k, coefficient and reg multipliers."""
    levels = float(2**bits)
    coef_mult = (levels if code_units else 1.0) / (mean_numel or 1)
    reg_mult = (1.0 if code_units else 1.0 / levels) / (mean_numel or 1)
    return levels, levels - 1, 2.0**-k, float(2 ** (bits - k) - 1), float(2**k), coef_mult, reg_mult


def fused_forward_eager(
    w: torch.Tensor, levels, qmax, low_scale, low_max, two_k, coef_mult, reg_mult, continuous: bool
):
    """``(W_q, sign(l), R, c)`` for a weight tensor ``w`` (no autograd).

    ``S = max|W|``, ``x = W / (S/2^n)``, ``W_q = clamp(round(x), +-(2^n-1)) * S/2^n``,
    ``l = (x or round-clamped x) - 2^k clamp(round(x 2^-k), +-(2^(n-k)-1))`` (code units),
    ``R = reg_mult * sum|l|``, ``c = coef_mult / S`` (so that ``dR/dW = c sign(l)``).
    ``W_q`` is :func:`msq_hf.quant.functional.signed_codes` times the step, fused with the LSB term into
    one pass over ``x`` (``tests/test_layers.py`` checks the two agree bit for bit).
    """
    lo, hi = torch.aminmax(w)
    scale = torch.maximum(-lo, hi)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    step = scale / levels
    x = torch.div(w, step)
    q = torch.round(x).clamp_(-qmax, qmax)
    low = torch.mul(x, low_scale).round_().clamp_(-low_max, low_max)
    ell = torch.add(x if continuous else q, low, alpha=-two_k, out=low)
    reg = torch.linalg.vector_norm(ell, 1) * reg_mult
    return q.mul_(step), ell.sign_().to(torch.int8), reg, coef_mult / scale


def fused_backward_eager(grad: torch.Tensor, sign: torch.Tensor, grad_reg: torch.Tensor, coef: torch.Tensor):
    """``grad + (dL/dR * c) * sign`` -- the straight-through gradient plus MSQ Eq. 7."""
    return torch.addcmul(grad, sign.to(grad.dtype), (grad_reg * coef).to(grad.dtype))


def _fused_forward_graph(w, levels, qmax, low_scale, low_max, two_k, coef_mult, reg_mult, continuous: bool):
    lo, hi = torch.aminmax(w)
    scale = torch.maximum(-lo, hi)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    step = scale / levels
    x = w / step
    q = torch.clamp(torch.round(x), -qmax, qmax)
    low = torch.clamp(torch.round(x * low_scale), -low_max, low_max)
    ell = (x if continuous else q) - low * two_k
    return q * step, torch.sign(ell).to(torch.int8), ell.abs().sum() * reg_mult, coef_mult / scale


def _fused_backward_graph(grad, sign, grad_reg, coef):
    return grad + sign.to(grad.dtype) * (grad_reg * coef).to(grad.dtype)


def _fused_backward_inplace_graph(grad, sign, grad_reg, coef):
    # the weight gradient autograd hands the quantizer is a fresh buffer owned by this backward
    # call; adding into it saves one weight-sized allocation and write per layer and step
    grad.add_(sign.to(grad.dtype) * (grad_reg * coef).to(grad.dtype))
    return grad


class _Kernels:
    """Lazily compiled kernels with a one-time self-check against the eager versions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: str | None = None  # None (untried), "compiled", "eager"
        self._fwd = None
        self._bwd = None
        self._bwd_inplace = None
        self._consts: dict[tuple, tuple[torch.Tensor, ...]] = {}

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
            fwd = torch.compile(_fused_forward_graph, dynamic=True, fullgraph=True)
            bwd = torch.compile(_fused_backward_graph, dynamic=True, fullgraph=True)
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
        for bits, k in ((8, 1), (3, 2), (2, 1)):
            for continuous in (True, False):
                consts = _constants(bits, k, True, None)
                ref = fused_forward_eager(w, *consts, continuous)
                got = fwd(w, *(torch.tensor(c) for c in consts), continuous)
                if not (
                    torch.equal(ref[0], got[0])
                    and torch.equal(ref[1], got[1])
                    and torch.allclose(ref[2], got[2], rtol=1e-5)
                    and torch.equal(ref[3], got[3])
                ):
                    raise RuntimeError(f"compiled forward kernel disagrees with eager at bits={bits}, k={k}")
        g = torch.randn(4099, generator=gen)
        args = (got[1], torch.tensor(0.5), got[3])
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

    def forward(self, w: torch.Tensor, bits: int, k: int, continuous: bool, code_units: bool, mean: bool):
        """``(W_q, sign, R, c)`` of one layer, compiled when possible (float32 CPU weights)."""
        numel = w.numel() if mean else None
        if self._ready() and w.device.type == "cpu" and w.dtype == torch.float32:
            key = (bits, k, code_units, numel)
            consts = self._consts.get(key)
            if consts is None:  # cached: four tensor constructions per layer per step are measurable
                consts = self._consts.setdefault(key, tuple(torch.tensor(c) for c in _constants(*key)))
            # always a flat contiguous vector that is not a view (detach drops ``_base``, on whose
            # strides dynamo would otherwise guard): the compiled graph sees one input layout whatever
            # the weight's rank, size-1 dims or memory format, so layer variety causes no recompiles
            flat = w.reshape(-1).contiguous().detach()
            try:
                wq, sign, reg, coef = self._fwd(flat, *consts, bool(continuous))
            except Exception as exc:  # noqa: BLE001 -- any compiler failure must not break training
                self._fall_back(exc)
            else:
                return wq.view(w.shape), sign.view(w.shape), reg, coef
        return fused_forward_eager(w, *_constants(bits, k, code_units, numel), continuous)

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
        sum is then written into it when that is safe (contiguous, no graph recorded through it).
        """
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

    @property
    def state(self) -> str | None:
        """``"compiled"``, ``"eager"`` or ``None`` before first use."""
        return self._state


KERNELS = _Kernels()
