"""``MSQController``: the training-loop side of MSQ, free of any trainer framework.

The controller ties the pieces of MSQ Algorithm 1 together for one model:

* it finds the MSQ layers (:func:`msq_hf.convert.msq_layers`) and owns a
  :class:`~msq_hf.schedule.BitPruningSchedule` plus its state;
* :meth:`MSQController.regularization` returns ``lambda * sum_l R_l`` for the loss, where the
  per-layer LSB terms ``R_l`` were already computed by the fused quantizer in the training forward
  (the layers record them; the controller only sums them, so it costs nothing);
* :meth:`MSQController.maybe_step` runs a pruning step every ``config.prune_interval`` optimizer
  steps: it measures the LSB nonzero rates, (optionally) the Hessian-trace sensitivities on a slice
  of the current batch, reduces both across ranks so every process takes the same decision, asks the
  schedule what to do and writes the new ``bits``/``k`` into the layers. After the final round every
  ``k`` is 0: the regularizer stops and training continues as plain QAT.

It works in a hand-written loop (see ``docs/training.md``) and is what :class:`msq_hf.MSQTrainer`
drives from its callback.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import MSQConfig
from .convert import msq_layers
from .functional import compression_ratio as _compression_ratio

logger = logging.getLogger(__name__)

STATE_VERSION = 1
PHASE_CODES: dict[str, int] = {"regularize": 0, "final": 1, "qat": 2}
"""Numeric code of each phase, logged as ``msq/phase`` (loggers such as TensorBoard want numbers)."""

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Batch = Any


# --------------------------------------------------------------------------------------------
# batches and the default task loss
# --------------------------------------------------------------------------------------------

def detach_batch(batch: Batch) -> Batch:
    """A structural copy of ``batch`` whose tensors are detached (the storage is shared, not copied)."""
    if isinstance(batch, torch.Tensor):
        return batch.detach()
    if isinstance(batch, Mapping):
        return {key: detach_batch(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(detach_batch(value) for value in batch) if isinstance(batch, list) \
            else tuple(detach_batch(value) for value in batch)
    return batch


def batch_size(batch: Batch) -> int | None:
    """Leading dimension of the first tensor found in ``batch`` (``None`` if there is no tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        size = batch_size(value)
        if size is not None:
            return size
    return None


def slice_batch(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of ``batch``: tensors whose leading dimension is the batch size are sliced."""
    size = batch_size(batch)
    if size is None or size <= n:
        return batch

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[:n] if value.dim() > 0 and value.shape[0] == size else value
        if isinstance(value, Mapping):
            return {key: cut(v) for key, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value) if isinstance(value, list) else tuple(cut(v) for v in value)
        return value

    return cut(batch)


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in a model output of type {type(outputs).__name__}; "
                        "pass loss_fn=... to the MSQController")
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
        return F.cross_entropy(_logits(fwd(batch[0])).float(), batch[1])
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict (pixel_values/labels) or an (inputs, labels) tuple, "
                        f"got {type(batch).__name__}")
    if "labels" not in batch:
        raise KeyError(f"the batch has no 'labels' key (keys: {sorted(batch)}); pass loss_fn=... to the controller")
    if forward_takes_kwargs(getattr(model, "forward", fwd)):
        outputs = fwd(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss
        return F.cross_entropy(_logits(outputs).float(), batch["labels"])
    if "pixel_values" not in batch:
        raise KeyError(f"the batch has no 'pixel_values' key (keys: {sorted(batch)}); pass loss_fn=... to the "
                       "controller")
    return F.cross_entropy(_logits(fwd(batch["pixel_values"])).float(), batch["labels"])


def hutchinson_seed(seed: int, global_step: int) -> int:
    """Probe seed for a pruning step: a pure function of ``(seed, global_step)``.

    A resumed run therefore draws the same Rademacher probes as an uninterrupted one, whatever
    other random numbers were consumed in between.
    """
    return (int(seed) * 1_000_003 + int(global_step) * 7_919 + 17) % (2**63 - 1)
