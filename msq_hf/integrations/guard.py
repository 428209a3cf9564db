"""Never train an MSQ model silently without MSQ.

A converted model trains under any loop (``Trainer``, a hand-written one) as plain fake-quantized training at
its current bits: no LSB regularizer, no bit pruning. That is almost never what its user meant, so every MSQ
model carries a forward pre-hook (:func:`watch_training`) that warns at its first training forward (train mode,
gradients on) unless something drives MSQ on it: :class:`msq_hf.MSQController` (and with it ``MSQTrainer`` and
``MSQCallback``) removes the hook when it takes the model over (:func:`mark_driven`). A packed export is
inference-only: the hook says so and how to fine-tune it instead.

The hook removes itself after warning, and stays out of ``torch.compile`` graphs (it returns at once while
compiling), so a driven or compiled model pays nothing for it.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from msq_hf.nn.packed import MSQPackedMixin

logger = logging.getLogger(__name__)

HOOK_ATTR = "_msq_training_guard"
PACKED_HINT = (
    "it is a packed msq_hf export (inference-only: its layers hold bit-packed integer codes, not trainable "
    "latent weights). To fine-tune it, load it dequantized: msq_hf.from_pretrained(path, dequantize=True), "
    "then MSQTrainer(model=..., msq_config=MSQConfig(...)) (or msq_hf.quantize_model); or resume from the "
    "MSQTrainer training checkpoint (a checkpoint-<step> folder) with trainer.train(resume_from_checkpoint=...)"
)


def is_packed_model(model: nn.Module) -> bool:
    """True if ``model`` holds packed MSQ layers (a loaded export)."""
    return any(isinstance(m, MSQPackedMixin) for m in model.modules())


def untrained_message(model: nn.Module) -> str:
    """What the guard says about training ``model`` without MSQ."""
    name = type(model).__name__
    if is_packed_model(model):
        return f"msq_hf: training {name}, but {PACKED_HINT}"
    return (
        f"msq_hf: {name} has MSQ layers but nothing drives MSQ: this trains plain fake-quantized weights at "
        "the current bits, with no LSB regularizer and no bit pruning. Use msq_hf.MSQTrainer, or "
        "transformers.Trainer(..., callbacks=[msq_hf.MSQCallback(config)]), or an msq_hf.MSQController in "
        "your own loop"
    )


def _guard(module: nn.Module, args: tuple) -> None:
    if not module.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    message = untrained_message(module)
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)
    mark_driven(module)  # once is enough


def watch_training(model: nn.Module) -> None:
    """Install the guard on ``model`` (idempotent; no-op once a controller drives it)."""
    if getattr(model, HOOK_ATTR, None) is None:
        model.__dict__[HOOK_ATTR] = model.register_forward_pre_hook(_guard)


def mark_driven(model: nn.Module) -> None:
    """Remove the guard: MSQ is driven on ``model`` (or the warning was given)."""
    handle = model.__dict__.pop(HOOK_ATTR, None)
    if handle is not None:
        handle.remove()


__all__ = ["PACKED_HINT", "is_packed_model", "mark_driven", "untrained_message", "watch_training"]
