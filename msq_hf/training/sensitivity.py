"""Hessian-trace (Hutchinson) estimation and HAWQ-V2 layer sensitivity (MSQ Eq. 9).

MSQ chooses how many LSBs a layer may lose per pruning step from its sensitivity

    S_l = (Tr(H_l) / N_l) * ||Q_{n_l}(W_l) - W_l||^2          (normalize="avg", HAWQ-V2)
    S_l =  Tr(H_l)        * ||Q_{n_l}(W_l) - W_l||^2          (normalize="sum")

where ``H_l`` is the diagonal block of the task-loss Hessian for layer ``l``'s weights. The trace is
estimated with Hutchinson's method: ``Tr(H) = E[z^T H z]`` for Rademacher ``z`` (entries +-1),
each ``Hz`` computed by a double backward (Pearlmutter's trick) without ever forming ``H``.

Everything here uses ``torch.autograd.grad`` only, so no ``.grad`` attribute, optimizer state or
gradient accumulation of the training loop is touched. :func:`msq_hf.training.hessian.hessian_safe`
makes a model double-differentiable for the pass (eval mode, math SDPA, eager attention, pure-PyTorch
hard activations, fp32) and restores everything afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from msq_hf.training.hessian import hessian_safe

Normalize = Literal["avg", "sum"]

__all__ = [
    "TraceEstimate",
    "estimate_sensitivities",
    "hawq_sensitivity",
    "hutchinson_trace",
    "reduce_across_ranks",
]


# --------------------------------------------------------------------------------------------
# Hutchinson trace estimator
# --------------------------------------------------------------------------------------------


@dataclass
class TraceEstimate:
    """Result of :func:`hutchinson_trace`.

    Attributes:
        trace: estimated ``Tr(H_l)`` per parameter (mean of ``z_l^T (H z)_l`` over probes).
        stderr: standard error of that mean (sample std / sqrt(probes)); ``inf`` with one probe.
        probes: number of Rademacher probes used.
        converged: True if the relative-change criterion stopped the loop before ``max_probes``.
        history: running mean of the summed trace after every probe (for diagnostics).
    """

    trace: dict[str, float]
    stderr: dict[str, float]
    probes: int
    converged: bool = False
    history: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Estimated trace of the whole block-diagonal (sum over parameters)."""
        return math.fsum(self.trace.values())


def _rademacher(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # draw on the generator's device (CPU by default) and move: the same seed then gives the same
    # probes whatever device the model is on
    device = generator.device if generator is not None else p.device
    z = torch.randint(0, 2, p.shape, generator=generator, device=device, dtype=torch.int8)
    return z.to(device=p.device, dtype=p.dtype) * 2 - 1


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    max_probes: int = 50,
    tol: float = 1e-2,
    min_probes: int = 4,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Hutchinson estimate of the Hessian trace of ``loss_fn()`` per parameter block.

    One forward/backward with ``create_graph=True`` gives the gradient ``g``; each probe then draws
    Rademacher ``z`` for all parameters jointly and computes ``Hz = d(g.z)/dW`` by a double backward,
    accumulating ``z_l . (Hz)_l`` per parameter. The loop stops when the running mean of the summed
    trace changes by less than ``tol`` (relative) after at least ``min_probes`` probes, or at
    ``max_probes``.

    Args:
        loss_fn: zero-argument callable returning the scalar loss (the forward runs once).
        params: ``{name: tensor}``; every tensor must require grad and be used by the loss (an unused
            parameter gets trace 0).
        max_probes, tol, min_probes: stopping rule (``tol >= 0``; ``min_probes`` is clamped to ``max_probes``).
        generator: RNG for the probes (``None``: torch's global RNG).

    Never reads or writes ``.grad`` (``torch.autograd.grad`` only) and releases the graph on return.
    """
    if not params:
        raise ValueError("hutchinson_trace: params is empty")
    if not (isinstance(max_probes, int) and max_probes >= 1):
        raise ValueError(f"hutchinson_trace: max_probes={max_probes!r} must be a positive integer")
    if not (isinstance(min_probes, int) and min_probes >= 1):
        raise ValueError(f"hutchinson_trace: min_probes={min_probes!r} must be a positive integer")
    min_probes = min(min_probes, max_probes)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"hutchinson_trace: tol={tol!r} must be a number >= 0")
    names = list(params)
    tensors = [params[n] for n in names]
    frozen = [n for n, t in zip(names, tensors) if not t.requires_grad]
    if frozen:
        raise ValueError(f"hutchinson_trace: parameter(s) {frozen[:5]} do not require grad")

    sums = [0.0] * len(names)
    sq_sums = [0.0] * len(names)
    history: list[float] = []
    probes = 0
    converged = False
    loss = grads = None
    try:
        with torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else ""
                raise ValueError(
                    f"hutchinson_trace: loss_fn must return a scalar tensor, got {type(loss).__name__}{shape}"
                )
            grads = torch.autograd.grad(loss.reshape(()), tensors, create_graph=True, allow_unused=True)
        # gradients that do not depend on any parameter (loss linear in them, or unused) have Hz = 0
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        prev_mean: float | None = None
        for probe in range(1, max_probes + 1):
            vs = [_rademacher(t, generator) for t in tensors]
            values = torch.zeros(len(names), dtype=torch.float64, device=tensors[0].device)
            if live:
                hvs = torch.autograd.grad(
                    [grads[i] for i in live],
                    tensors,
                    grad_outputs=[vs[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
                parts = [
                    torch.zeros((), dtype=torch.float64, device=tensors[0].device)
                    if hv is None
                    else (v.double() * hv.double()).sum().to(tensors[0].device)
                    for v, hv in zip(vs, hvs)
                ]
                values = torch.stack(parts)
            per_layer = values.tolist()  # one host sync per probe
            for i, value in enumerate(per_layer):
                sums[i] += value
                sq_sums[i] += value * value
            probes = probe
            mean = math.fsum(sums) / probes
            history.append(mean)
            if (
                probe >= min_probes
                and prev_mean is not None
                and abs(mean - prev_mean) <= tol * (abs(prev_mean) + 1e-12)
            ):
                converged = True
                break
            prev_mean = mean
    finally:
        # drop every reference to the double-backward graph so its buffers are freed now
        del loss, grads
    trace = {n: sums[i] / probes for i, n in enumerate(names)}
    stderr: dict[str, float] = {}
    for i, n in enumerate(names):
        if probes < 2:
            stderr[n] = math.inf
        else:
            var = max(sq_sums[i] - sums[i] ** 2 / probes, 0.0) / (probes - 1)
            stderr[n] = math.sqrt(var / probes)
    return TraceEstimate(trace=trace, stderr=stderr, probes=probes, converged=converged, history=history)


# --------------------------------------------------------------------------------------------
# HAWQ-V2 sensitivity
# --------------------------------------------------------------------------------------------


def hawq_sensitivity(
    trace: Mapping[str, float],
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    normalize: Normalize = "avg",
) -> dict[str, float]:
    """HAWQ-V2 sensitivity ``S_l = (Tr_l / N_l) * ||Q(W_l) - W_l||^2`` (``avg``) or ``Tr_l * ||.||^2`` (``sum``).

    Computed in float64. Keys (and their order) are those of ``trace``.
    """
    if normalize not in ("avg", "sum"):
        raise ValueError(f"hawq_sensitivity: normalize={normalize!r} must be 'avg' or 'sum'")
    out: dict[str, float] = {}
    for name, tr in trace.items():
        if name not in weights or name not in quantized:
            raise KeyError(
                f"hawq_sensitivity: layer {name!r} has a trace but no "
                f"{'weight' if name not in weights else 'quantized weight'}"
            )
        w, q = weights[name], quantized[name]
        if w.shape != q.shape:
            raise ValueError(
                f"hawq_sensitivity: layer {name!r}: quantized shape {tuple(q.shape)} != weight shape {tuple(w.shape)}"
            )
        with torch.no_grad():
            err = float((q.detach().double() - w.detach().double()).pow(2).sum())
        scale = float(tr) / w.numel() if normalize == "avg" else float(tr)
        out[name] = scale * err
    return out


# --------------------------------------------------------------------------------------------
# distributed reduction
# --------------------------------------------------------------------------------------------


def reduce_across_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Mean of ``values`` over all ranks of the default process group (identity without one).

    The values are packed in sorted-key order into one float64 tensor and all-reduced, so every rank
    gets bit-identical results; the returned dict keeps the caller's key order. Every rank must pass
    the same keys (checked: a ``ValueError`` names the difference).
    """
    out = {name: float(v) for name, v in values.items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return out
    keys = sorted(out)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    for rank, other in enumerate(gathered):
        if other != keys:
            diff = sorted(set(other) ^ set(keys))
            raise ValueError(
                f"reduce_across_ranks: rank {rank} has different keys than rank {dist.get_rank()} "
                f"(differing: {diff[:5]})"
            )
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    reduced = dict(zip(keys, buf.cpu().tolist()))
    return {name: reduced[name] for name in out}


# --------------------------------------------------------------------------------------------
# everything together
# --------------------------------------------------------------------------------------------


def _default_quantized_weight(module: nn.Module) -> torch.Tensor:
    fn = getattr(module, "quantized_weight", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__} has no quantized_weight(); pass quantized_weight_fn=...")
    return fn()


def _float_reference(module: nn.Module) -> torch.Tensor:
    # the float weight Q(W) approximates, in Q's own domain: W itself for sign-magnitude, the normalized
    # 2u - 1 in [-1, 1] for DoReFa (comparing that Q with the raw W would measure the normalization, not the
    # rounding)
    fn = getattr(module, "quantization_reference", None)
    return fn() if fn is not None else module.weight.detach()


def _trace_estimate(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    max_probes: int,
    tol: float,
    min_probes: int,
    seed: int | None,
) -> TraceEstimate:
    # Hutchinson over the layers' weights inside hessian_safe, grads switched on for the pass where they are off
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
    toggled = [p for p in params.values() if not p.requires_grad]
    try:
        for p in toggled:
            p.requires_grad_(True)
        with hessian_safe(model):
            return hutchinson_trace(
                lambda: loss_fn(model, batch),
                dict(params),
                max_probes=max_probes,
                tol=tol,
                min_probes=min_probes,
                generator=generator,
            )
    finally:
        for p in toggled:
            p.requires_grad_(False)


def estimate_sensitivities(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    quantized_weight_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    max_probes: int = 50,
    tol: float = 1e-2,
    normalize: Normalize = "avg",
    seed: int | None = 0,
    min_probes: int = 4,
    traces: TraceEstimate | None = None,
) -> tuple[dict[str, float], TraceEstimate]:
    """HAWQ-V2 sensitivities of ``layers`` (MSQ Eq. 9) on one batch: ``(sensitivities, trace estimate)``.

    Args:
        model: the (unwrapped) model; ``loss_fn(model, batch)`` must return the scalar task loss
            (no regularizer), and must use ``layers`` (submodules of ``model``) in its forward.
        layers: ``{name: module}``; each module needs a ``.weight`` tensor.
        quantized_weight_fn: ``module -> Q(W)`` at the current precision; default
            ``module.quantized_weight()`` (what MSQ layers provide). ``||Q(W) - W||`` compares it with
            ``module.quantization_reference()`` where the module has one (MSQ layers: the float weight in the
            quantizer's domain, see :meth:`msq_hf.nn.layers.MSQLayerMixin.quantization_reference`), else ``W``.
        max_probes, tol, min_probes: Hutchinson stopping rule (see :func:`hutchinson_trace`).
        normalize: ``"avg"`` (``Tr/N``, HAWQ-V2) or ``"sum"`` (``Tr``).
        seed: seeds a private CPU generator for the probes (``None``: torch's global RNG).
        traces: an earlier estimate to reuse instead of new Hutchinson probes (no forward or backward pass): the
            sensitivities then combine those traces with the *current* ``||Q(W) - W||^2``, which is what changes
            when a layer loses bits. It must cover every layer.

    Runs inside :func:`hessian_safe`. Weights that do not require grad are switched on for the pass and
    switched back; ``.grad`` of every parameter is left untouched.
    """
    if normalize not in ("avg", "sum"):
        raise ValueError(f"estimate_sensitivities: normalize={normalize!r} must be 'avg' or 'sum'")
    if not layers:
        raise ValueError("estimate_sensitivities: layers is empty")
    qfn = quantized_weight_fn if quantized_weight_fn is not None else _default_quantized_weight
    params: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"estimate_sensitivities: layer {name!r} ({type(module).__name__}) has no .weight tensor")
        params[name] = weight
    if traces is not None:
        missing = sorted(set(params) - set(traces.trace))
        if missing:
            raise KeyError(f"estimate_sensitivities: the reused traces have no layer(s) {missing[:5]}")
        est = traces
    else:
        est = _trace_estimate(model, params, batch, loss_fn, max_probes, tol, min_probes, seed)
    with torch.no_grad():
        quantized = {name: qfn(module) for name, module in layers.items()}
        references = {name: _float_reference(module) for name, module in layers.items()}
    sens = hawq_sensitivity(est.trace, references, quantized, normalize)
    return sens, est
