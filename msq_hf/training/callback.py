"""``MSQCallback``: the MSQ method inside any transformers ``Trainer``.

Two ways to use it:

* ``transformers.Trainer(model=converted_model, ..., callbacks=[MSQCallback(config)])`` -- a plain ``Trainer``.
  The callback builds the :class:`~msq_hf.training.controller.MSQController` when the Trainer is built (and
  refuses a model it cannot train: no MSQ layer, a packed export); it applies the LSB regularizer's gradient
  without touching the loss: a gradient hook on every MSQ weight adds ``lambda * dR/dW`` once per optimizer step,
  on the first micro-batch's backward (times the AMP loss scale), exactly what ``lambda * R`` in the loss gives
  over an accumulated step -- or, with ``MSQConfig.regularizer_after_clipping`` and a Trainer that clips, after
  the clipping (:func:`can_join_after_clipping`). It records the training batch
  in a forward pre-hook (for the Hessian pass), prunes every ``prune_interval`` steps, writes ``msq_state.json``
  into every checkpoint, and on resume / at ``load_best_model_at_end`` reloads that checkpoint exactly (every
  tensor, ``bits``/``k`` included, plus the schedule), which the plain ``Trainer`` alone does not do for ViT-family
  models.
* inside :class:`msq_hf.MSQTrainer`, which adds the regularizer to its loss itself (unless it joins after the
  clipping, as above) and hands the batches over.

Clipping and the regularizer. As a loss term, ``lambda * R`` is clipped with the task gradient: once lambda is
large the sum's norm is the regularizer's, and clipping scales the *task* gradient down with it -- in effect a
lower learning rate while the LSBs are emptied, which is what let threshold pruning work in the short, high
learning-rate demo run. After the clipping (``regularizer_after_clipping=True``) the task gradient alone is
clipped, lambda's pull arrives in full and is bounded by the learning rate instead
(:func:`msq_hf.training.pacing.pull_limit`); the Trainer's logged ``grad_norm`` is then the task gradient's
norm. docs/results.md ("Gradual pruning", "Fine-tuning pretrained checkpoints") measures both.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from msq_hf.config import MSQConfig
from msq_hf.convert import iter_msq_layers
from msq_hf.errors import MSQFormatError
from msq_hf.integrations.guard import PACKED_HINT, is_packed_model
from msq_hf.io.format import MSQ_STATE_NAME, REWIND_NAME
from msq_hf.training.checkpoint import load_checkpoint_exact, require_msq_state, write_msq_state
from msq_hf.training.controller import MSQController
from msq_hf.training.measure import LossFn, detach_batch
from msq_hf.training.rewind import WeightSnapshot

logger = logging.getLogger(__name__)


def can_join_after_clipping(args: TrainingArguments) -> bool:
    """Whether the LSB regularizer's gradient can join after the Trainer's gradient clipping (with
    ``MSQConfig.regularizer_after_clipping``): the Trainer clips (``max_grad_norm > 0``) and the gradients are the
    parameters' own full ``.grad`` (not DeepSpeed's or FSDP's shards, where it stays in the loss and is clipped)."""
    if not (args.max_grad_norm and args.max_grad_norm > 0):
        return False
    return PartialState().distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)


#: settings that write whole weights in place: (field, value, what writes, what to do instead)
IN_PLACE_WRITES = (
    ("lsb_update", "proximal", "the proximal step writes", "use lsb_update='gradient' (the default) there"),
    ("rewind_weights", True, "the rewind writes back", "use DDP (or one process) for a rewinding run"),
    ("qat_scale", "mse", "the clip (fitted to each layer's max|W|) writes", "use DDP (or one process), or 'max'"),
    ("qat_scale", "learned", "each learned step starts from", "use DDP (or one process), or 'max'"),
)


def refuse_sharded_writes(config: MSQConfig) -> None:
    """``lsb_update="proximal"`` (after every optimizer step), ``rewind_weights`` and ``qat_scale="mse"`` (from the
    final round on) write the weights in place, and ``qat_scale="learned"`` starts each step from its layer's whole
    weight: they need every rank to hold the full weights, which DeepSpeed and FSDP shard. Raises ``ValueError``
    naming the field there."""
    kind = PartialState().distributed_type
    if kind not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return
    for field, value, writer, instead in IN_PLACE_WRITES:
        if getattr(config, field) == value:
            raise ValueError(
                f"MSQConfig.{field}={value!r} is not supported under {kind.value}, which shards the weights {writer} "
                f"in place: {instead}"
            )


def refuse_static_graph_ddp(config: MSQConfig, args: TrainingArguments, model: nn.Module) -> None:
    """``qat_scale="learned"`` gives every layer a step that the forward first uses at the final round, so DDP must
    allow unused parameters until then. ``ValueError`` if several processes run with ``ddp_find_unused_parameters``
    off, or left to the Trainer, which turns it off for activation checkpointing."""
    if config.qat_scale != "learned" or PartialState().num_processes <= 1:
        return
    find_unused = args.ddp_find_unused_parameters
    checkpointing = bool(getattr(model, "is_activation_checkpointing", False) or args.activation_checkpointing)
    if find_unused is False or (find_unused is None and checkpointing):
        raise ValueError(
            "MSQConfig.qat_scale='learned' under DDP needs TrainingArguments(ddp_find_unused_parameters=True): each "
            "layer's learned step is unused until the final round (MSQ's non-reentrant checkpointing allows it)"
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def refuse_packed(model: nn.Module, who: str) -> None:
    """``ValueError`` if ``model`` is a loaded packed export (inference-only), saying how to fine-tune it."""
    if is_packed_model(model):
        raise ValueError(f"{who} cannot train {type(model).__name__}: {PACKED_HINT}")


def check_restored_bits(model_layers: dict[str, nn.Module], state: dict[str, Any], folder: str) -> None:
    """The ``bits``/``k`` tensors loaded from a checkpoint must be those its ``msq_state.json`` records."""
    wrong = [
        f"{name}: tensors bits={layer.n_bits} k={layer.n_k}, msq_state bits={state['bits'].get(name)} "
        f"k={state['k'].get(name)}"
        for name, layer in model_layers.items()
        if layer.n_bits != state["bits"].get(name) or layer.n_k != state["k"].get(name)
    ]
    if wrong:
        raise MSQFormatError(
            f"checkpoint {folder}: the model tensors and {MSQ_STATE_NAME} disagree ({len(wrong)} layer(s), e.g. "
            f"{wrong[:3]}); the checkpoint is corrupt or was assembled from different runs"
        )


class MSQCallback(TrainerCallback):
    """Runs MSQ (LSB regularizer, bit pruning, checkpoint state) inside a ``transformers.Trainer``.

    Args:
        msq_config: the MSQ hyperparameters; defaults to the config :func:`msq_hf.quantize_model` attached to the
            model. The model must already be converted (``msq_hf.quantize_model(model, config)``) before the
            ``Trainer`` is built: the Trainer owns its parameters from then on.
        loss_fn: ``loss_fn(model, batch) -> loss`` for the Hessian pass (default: the model's own loss on the
            recorded ``pixel_values``/``labels`` batch).

    Attributes:
        controller: the :class:`MSQController` (bits, schedule, history, ``log_dict()``); ``None`` until bound.
        last_batch: the last training batch (detached), used by the Hessian pass of a pruning step.
        layers_changed: True when a pruning step changed the bits since the per-layer values were last logged.
    """

    def __init__(self, msq_config: MSQConfig | None = None, *, loss_fn: LossFn | None = None):
        if msq_config is not None and not isinstance(msq_config, MSQConfig):
            raise TypeError(f"msq_config must be an msq_hf.MSQConfig, got {type(msq_config).__name__}")
        self.msq_config = msq_config
        self.loss_fn = loss_fn
        self.controller: MSQController | None = None
        self.last_batch: Any = None
        self.layers_changed = True  # the first log shows the starting scheme
        self.standalone = True  # False inside MSQTrainer, which adds the regularizer to its loss
        self.after_clipping = False  # config.regularizer_after_clipping and can_join_after_clipping(args)
        self._pull_bounded = True  # whether the learning rate bounds lambda (fixed at on_train_begin)
        self._model: nn.Module | None = None
        self._resume: tuple[dict[str, Any], str] | None = None
        self._reg_pending: set[str] = set()
        self._reg_scale: float | None = None  # lambda * AMP loss scale of this step, 0.0 when not regularizing
        self._measuring = False
        self._optimizer: Any = None
        self._hooks: list[Any] = []
        self._global_step = 0  # optimizer steps done, as of the last on_step_begin

    # -- binding ----------------------------------------------------------------------------------
    def attach(self, controller: MSQController) -> None:
        """Used by ``MSQTrainer``: drive ``controller``; the trainer adds the regularizer and sets ``last_batch``."""
        self.controller = controller
        self._model = controller.model
        self.standalone = False

    def bind(self, model: nn.Module, seed: int = 0) -> MSQController:
        """Take ``model`` over under a plain ``Trainer`` (called at ``on_init_end``); returns the controller."""
        model = unwrap_model(model)
        refuse_packed(model, "MSQCallback")
        if not any(True for _ in iter_msq_layers(model)):
            raise ValueError(
                f"MSQCallback: {type(model).__name__} has no MSQ layers; convert it before building the Trainer "
                "(msq_hf.quantize_model(model, config)), or use msq_hf.MSQTrainer, which converts it"
            )
        config = self.msq_config if self.msq_config is not None else getattr(model, "msq_config", None)
        if config is None:
            raise ValueError(f"MSQCallback: {type(model).__name__} has no msq_config; pass MSQCallback(MSQConfig(...))")
        if config.hessian_guided and self.loss_fn is None and not isinstance(model, PreTrainedModel):
            raise ValueError(
                f"MSQCallback with a plain Trainer sees only the inputs of {type(model).__name__}.forward, which "
                "get no labels, so the Hessian pass has no loss: use msq_hf.MSQTrainer (it trains raw timm "
                "models), pass loss_fn=..., or set MSQConfig(hessian_guided=False)"
            )
        self._model = model
        self.controller = MSQController(model, config, seed=seed, loss_fn=self.loss_fn)
        self._hooks.append(model.register_forward_pre_hook(self._record_batch, with_kwargs=True))
        for name, layer in self.controller.layers.items():
            self._hooks.append(layer.weight.register_hook(functools.partial(self._add_reg_grad, name, layer)))
        return self.controller

    # -- plain-Trainer machinery --------------------------------------------------------------------
    def _record_batch(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._measuring or not module.training or not torch.is_grad_enabled():
            return
        batch = dict(kwargs) if kwargs else {"pixel_values": args[0]}
        self.last_batch = detach_batch(batch)
        if not self.controller.started:
            self._measuring = True
            try:
                self.controller.maybe_start(self._global_step, self.last_batch)  # after the warm-up
            finally:
                self._measuring = False

    def _add_reg_grad(self, name: str, layer: nn.Module, grad: torch.Tensor) -> torch.Tensor | None:
        """``grad + lambda * w_l * s * dR_l/dW`` on the first backward of an optimizer step (``w_l``: the layer's share
        of lambda, ``s``: AMP loss scale)."""
        if self._measuring or name not in self._reg_pending:
            return None
        self._reg_pending.discard(name)
        if self._reg_scale is None:  # once per step, not per layer (each query syncs with the device)
            self._reg_scale = self._regularizer_scale()
        scale = self._reg_scale * self.controller.regularizer.weights[name]  # the layer's share of lambda (lsb_pull)
        if scale == 0.0 or layer.n_k <= 0:
            return None
        return grad + (layer.regularizer_gradient() * scale).to(grad.dtype)

    def add_regularizer_after_clipping(self) -> None:
        """``W.grad += lambda * w_l * dR_l/dW`` for every MSQ layer that got a gradient this step (after clipping;
        ``w_l`` the layer's share, :meth:`~msq_hf.training.regularizer.LSBRegularizer.add_gradients`)."""
        self.controller.regularizer.add_gradients(self.controller.reg_strength if self.controller.regularizing else 0.0)

    def _regularizer_scale(self) -> float:
        """``lambda`` times the loss scale the backward carries (accelerate's GradScaler under fp16), 0 if off."""
        if not self.controller.regularizing or self.controller.proximal:
            return 0.0
        scaler = getattr(self._optimizer, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return self.controller.reg_strength * scale

    # -- checkpoints ----------------------------------------------------------------------------
    def stage_resume(self, folder: str) -> None:
        """Read ``folder``'s ``msq_state.json`` (required); it is restored at ``on_train_begin``."""
        self._resume = (require_msq_state(folder), folder)

    def restore(self, state: dict[str, Any], folder: str) -> None:
        """Restore the controller from ``state`` after the model tensors were loaded from ``folder``."""
        check_restored_bits(self.controller.layers, state, folder)
        self.controller.load_state_dict(state)
        self.layers_changed = True

    def restore_checkpoint(self, folder: str) -> None:
        """Load ``folder`` exactly into the model (every tensor) and restore the schedule from it."""
        state = require_msq_state(folder)
        load_checkpoint_exact(self._model, folder)
        self.restore(state, folder)
        if state.get("phase") == "regularize":
            logger.warning(
                "msq_hf: %s was saved before the final pruning round (compression %.2f, target %.2f): the model is "
                "below the target compression",
                folder,
                self.controller.compression,
                self.controller.config.target_compression,
            )

    # -- Trainer events -------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.standalone and self.controller is None:
            self.bind(model, seed=args.seed)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, optimizer: Any = None, **kw: Any):
        controller = self.controller
        refuse_sharded_writes(controller.config)
        refuse_static_graph_ddp(controller.config, args, self._model)
        controller.total_steps = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        self._optimizer = optimizer
        self.after_clipping = (
            controller.config.regularizer_after_clipping and not controller.proximal and can_join_after_clipping(args)
        )
        # lambda's learning-rate bound applies to an unclipped pull: not when clipping scales the loss term too
        self._pull_bounded = (
            self.after_clipping or controller.proximal or not (args.max_grad_norm and args.max_grad_norm > 0)
        )
        if self.standalone and state.global_step > 0 and self._resume is None:
            # the plain Trainer loaded the checkpoint with strict=False: reload it exactly, from output_dir
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"MSQCallback: resuming at step {state.global_step}, but {folder} does not exist; resume from a "
                    "checkpoint inside args.output_dir (or use msq_hf.MSQTrainer, which takes any folder)"
                )
            load_checkpoint_exact(self._model, folder)
            self.stage_resume(folder)
        resumed_from = None
        if self._resume is not None:
            resume, resumed_from = self._resume
            self._resume = None
            self.restore(resume, resumed_from)
            logger.info(
                "msq_hf: restored the pruning schedule of %s (phase %s, compression %.2f)",
                resumed_from,
                controller.phase,
                controller.compression,
            )
        if resumed_from and controller.snapshot is not None:  # rewind_weights: the start this run must go back to
            controller.snapshot = WeightSnapshot.load(resumed_from)

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        self._global_step = state.global_step
        if self.standalone and not self.after_clipping:
            self._reg_pending = set(self.controller.names)
            self._reg_scale = None

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        self._reg_pending.clear()  # a layer that got no gradient this step gets no regularizer either
        if self.after_clipping and self.standalone:  # the Trainer has just clipped (and unscaled) the task gradient
            self.add_regularizer_after_clipping()  # (MSQTrainer does it in _clip_grad_norm, before any callback)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> Any:
        if self.standalone:
            self.controller.regularization()  # clears the terms of the last forward, records msq/reg
        if self.controller.proximal and self._optimizer is not None:  # the LSB pull, after the optimizer step
            self.controller.proximal_step(float(self._optimizer.param_groups[0]["lr"]))
        if self.last_batch is None:
            return None
        if self._pull_bounded and self._optimizer is not None and self.controller.is_pruning_step(state.global_step):
            # the learning rate bounds lambda's pull (msq_hf.training.pacing.pull_limit); read at pruning steps only
            self.controller.learning_rate = float(self._optimizer.param_groups[0]["lr"])
        self._measuring = True
        try:
            decision = self.controller.maybe_step(state.global_step, self.last_batch, optimizer=self._optimizer)
        finally:
            self._measuring = False
        if decision is None:
            return None
        if decision.finalized and self.controller.config.rewind_weights:
            logger.info("msq_hf: step %d: weights rewound to the start of training for QAT", state.global_step)
        # log at this step through the normal path (log_history + every report_to target)
        self.layers_changed = True
        control.should_log = True
        return control

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        # MSQTrainer merges msq/* into the logs before log_history; under a plain Trainer the console sees them
        if self.standalone and logs is not None and not any(k.startswith(("eval_", "test_")) for k in logs):
            logs.update(self.controller.log_dict(per_layer=self.layers_changed or "train_runtime" in logs))
            self.layers_changed = False

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, MSQ_STATE_NAME)):
            write_msq_state(self.controller, folder)
        snapshot = self.controller.snapshot  # rewind_weights before the final round: a resume goes back to it too
        if os.path.isdir(folder) and snapshot is not None and not os.path.isfile(os.path.join(folder, REWIND_NAME)):
            snapshot.save(folder)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        # the plain Trainer loaded the best checkpoint with strict=False: reload it exactly, schedule included
        if self.standalone and args.load_best_model_at_end and state.best_model_checkpoint:
            self.restore_checkpoint(state.best_model_checkpoint)


__all__ = [
    "MSQCallback",
    "can_join_after_clipping",
    "check_restored_bits",
    "refuse_packed",
    "refuse_sharded_writes",
    "refuse_static_graph_ddp",
    "unwrap_model",
]
