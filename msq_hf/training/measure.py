"""What a pruning step measures on a training batch: the task loss, the Hessian slice, the probe seed.

* :func:`default_loss` is the task loss (no regularizer) MSQ's Hessian pass differentiates twice;
* :func:`layer_sensitivities` runs the HAWQ-V2 sensitivity pass (MSQ Eq. 9) on ``hessian_batch_size``
  samples of a batch, with probes seeded by :func:`hutchinson_seed` so a resumed run draws the same ones;
* :func:`detach_batch` / :func:`slice_batch` are the batch utilities the controller and trainer need, built on
  accelerate's nested-structure helpers (``recursively_apply``, ``find_batch_size``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import find_batch_size, recursively_apply
from torch import nn

from msq_hf.config import MSQConfig
from msq_hf.errors import MSQTrainingError
from msq_hf.training.sensitivity import TraceEstimate, estimate_sensitivities

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Batch = Any


def detach_batch(batch: Batch) -> Batch:
    """A structural copy of ``batch`` whose tensors are detached (the storage is shared, not copied)."""
    return recursively_apply(torch.Tensor.detach, batch)


def slice_batch(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of ``batch``: tensors whose leading dimension is the batch size are sliced.

    The batch size is that of the batch's first entry (``accelerate.utils.find_batch_size``); a batch whose
    first entry is not a tensor is returned whole. Unlike ``accelerate.utils.slice_tensors``, tensors that
    are not per-sample (another leading size, or 0-dim) are kept as they are.
    """
    try:
        size = int(find_batch_size(batch))
    except (TypeError, ValueError, IndexError):
        return batch
    if size <= n:
        return batch

    def per_sample(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size

    return recursively_apply(lambda t: t[:n], batch, test_type=per_sample)


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``.logits``, ``["logits"]`` or the first element."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"cannot find logits in a model output of type {type(outputs).__name__}; "
            "pass loss_fn=... to the MSQController"
        )
    return logits


def forward_takes_kwargs(forward: Callable[..., Any]) -> bool:
    """True if ``forward`` is called with keyword inputs (HF style ``pixel_values=``, ``**kwargs``)."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "pixel_values" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def default_loss(model: nn.Module, batch: Batch, forward: Callable[..., Any] | None = None) -> torch.Tensor:
    """Task loss of ``model`` on ``batch`` (no regularizer), as MSQ's Hessian pass needs it.

    * ``(x, y)`` tuples/lists: ``cross_entropy(model(x), y)``;
    * dicts, HF-style models (forward takes ``pixel_values=`` or ``**kwargs``): ``model(**batch).loss``,
      or cross entropy on ``.logits`` against ``batch["labels"]`` when the model returns no loss;
    * dicts, plain models (timm, ``forward(x)``): ``cross_entropy(model(batch["pixel_values"]), batch["labels"])``.

    ``forward`` replaces ``model.__call__`` (e.g. accelerate's ``model._original_forward``, the fp32 forward).
    """
    fwd = forward if forward is not None else model
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(f"a tuple batch must be (inputs, labels), got {len(batch)} element(s)")
        return F.cross_entropy(output_logits(fwd(batch[0])).float(), batch[1])
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch must be a dict (pixel_values/labels) or an (inputs, labels) tuple, got {type(batch).__name__}"
        )
    if "labels" not in batch:
        raise KeyError(f"the batch has no 'labels' key (keys: {sorted(batch)}); pass loss_fn=... to the controller")
    if forward_takes_kwargs(getattr(model, "forward", fwd)):
        outputs = fwd(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss
        return F.cross_entropy(output_logits(outputs).float(), batch["labels"])
    if "pixel_values" not in batch:
        raise KeyError(
            f"the batch has no 'pixel_values' key (keys: {sorted(batch)}); pass loss_fn=... to the controller"
        )
    return F.cross_entropy(output_logits(fwd(batch["pixel_values"])).float(), batch["labels"])


def fp32_default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """:func:`default_loss` through accelerate's fp32 forward when mixed precision wrapped the model
    (``model._original_forward``, hf-integration §2.4)."""
    return default_loss(model, batch, getattr(model, "_original_forward", None))


_DIVERGED_HINT = "the run diverged; lower the learning rate or reg_strength, or resume from an earlier checkpoint"


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    """``MSQTrainingError`` naming ``step`` when the training loss is NaN/inf (the Trainer would log it as 0)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise MSQTrainingError(
            f"the training loss is {float(loss.detach().float().sum())} at step {step}: {_DIVERGED_HINT}"
        )


def check_finite_weights(layers: Mapping[str, nn.Module], step: int) -> None:
    """``MSQTrainingError`` naming ``step`` and the layers whose weights hold NaN/inf.

    Such weights have an LSB nonzero rate of 0, so the schedule would prune them down to its floor and
    report the target reached on a model that no longer computes anything.
    """
    with torch.no_grad():
        bad = [name for name, layer in layers.items() if not bool(torch.isfinite(layer.weight).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise MSQTrainingError(f"non-finite (NaN/inf) weights in {shown} at step {step}: {_DIVERGED_HINT}")


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def recalibrate_batchnorm(model: nn.Module, batch: Batch, loss_fn: LossFn = fp32_default_loss) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batch``; returns how many BatchNorms there were.

    Called right after a pruning step changed quantized weights: the running statistics still describe the
    previous weights, so an evaluation right after the step would normalise with stale statistics (in training,
    BatchNorm uses the batch's own). One train-mode forward without gradients, with cumulative averaging over
    that single batch, replaces them; momentum and the training flags are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
            m.train()
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(norms)


def hutchinson_seed(seed: int, global_step: int) -> int:
    """Probe seed for a pruning step: a pure function of ``(seed, global_step)``.

    A resumed run therefore draws the same Rademacher probes as an uninterrupted one, whatever
    other random numbers were consumed in between.
    """
    return (int(seed) * 1_000_003 + int(global_step) * 7_919 + 17) % (2**63 - 1)


def layer_sensitivities(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batch: Batch,
    config: MSQConfig,
    seed: int,
    loss_fn: LossFn = fp32_default_loss,
    traces: TraceEstimate | None = None,
) -> tuple[dict[str, float], TraceEstimate]:
    """HAWQ-V2 sensitivity of every layer (MSQ Eq. 9) on ``config.hessian_batch_size`` samples of ``batch``, and
    the trace estimate it used (``traces``: reuse that one, no Hessian pass; see :func:`estimate_sensitivities`).

    Runs in eval mode and fp32 inside :func:`msq_hf.training.hessian.hessian_safe`; uses
    ``torch.autograd.grad`` only, so ``.grad``, the optimizer and BatchNorm running statistics are
    untouched. ``seed`` seeds the Hutchinson probes (see :func:`hutchinson_seed`).
    """
    sens, estimate = estimate_sensitivities(
        model,
        layers,
        slice_batch(batch, config.hessian_batch_size),
        loss_fn,
        max_probes=config.hessian_max_probes,
        tol=config.hessian_tol,
        normalize=config.sensitivity_norm,
        seed=seed,
        min_probes=min(4, config.hessian_max_probes),
        traces=traces,
    )
    return dict(sens), estimate


class TraceReuse:
    """The Hutchinson traces of the last Hessian pass, reused for ``interval - 1`` sensitivity passes after it.

    A layer's trace moves slowly during training; what a pruning step changes at once is its quantization error
    ``||Q(W) - W||^2``, which is recomputed at every pass (no backward). ``interval = 1`` runs the Hessian at every
    pass (MSQConfig.hessian_interval; docs/pruning.md, "Cost of the sensitivity passes").
    """

    def __init__(self, interval: int) -> None:
        self.interval = int(interval)
        self.passes = 0  # sensitivity passes so far; the Hessian runs at passes 0, interval, 2*interval, ...
        self.hessian_passes = 0
        self.estimate: TraceEstimate | None = None

    def sensitivities(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        batch: Batch,
        config: MSQConfig,
        seed: int,
        loss_fn: LossFn = fp32_default_loss,
    ) -> dict[str, float]:
        """:func:`layer_sensitivities`, with the kept traces unless this pass is due for a Hessian pass."""
        reuse = self.estimate if self.estimate is not None and self.passes % self.interval else None
        sens, self.estimate = layer_sensitivities(model, layers, batch, config, seed, loss_fn, traces=reuse)
        self.hessian_passes += reuse is None
        self.passes += 1
        return sens

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the pass counters and the kept traces (so that a resumed run reuses the same ones)."""
        traces = dict(self.estimate.trace) if self.estimate is not None else None
        return {"passes": self.passes, "hessian_passes": self.hessian_passes, "traces": traces}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (an empty mapping: nothing kept, the next pass runs the Hessian)."""
        self.passes = int(state.get("passes", 0))
        self.hessian_passes = int(state.get("hessian_passes", 0))
        traces = state.get("traces")
        self.estimate = None if traces is None else TraceEstimate({k: float(v) for k, v in traces.items()}, {}, 0)


__all__ = [
    "Batch",
    "LossFn",
    "TraceReuse",
    "check_finite_loss",
    "check_finite_weights",
    "default_loss",
    "detach_batch",
    "forward_takes_kwargs",
    "fp32_default_loss",
    "hutchinson_seed",
    "layer_sensitivities",
    "recalibrate_batchnorm",
    "output_logits",
    "slice_batch",
]
