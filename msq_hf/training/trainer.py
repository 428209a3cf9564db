"""``MSQTrainer``: MSQ inside the Hugging Face ``Trainer`` (``MSQCallback`` for a plain ``Trainer``: ``callback.py``).

``MSQTrainer`` is a :class:`transformers.Trainer` that

* converts the model with :func:`msq_hf.quantize_model` when it has no MSQ layer yet;
* adds the LSB regularizer of the :class:`~msq_hf.training.controller.MSQController` to the training loss,
  scaled so that gradient accumulation gives the gradient of the full accumulated batch;
* trains raw timm / ``nn.Module`` classifiers (``forward(x) -> logits``) as well as HF models;
* keeps a detached reference to the last training batch for the Hessian pass;
* writes ``msq_state.json`` (the pruning schedule) into every checkpoint; ``train(resume_from_checkpoint=...)``
  and ``load_best_model_at_end`` reload a checkpoint exactly -- every tensor (``bits``/``k`` included, under
  transformers' legacy key names for ViT-family models) and the schedule -- or raise naming what does not match
  (``Trainer`` alone loads with ``strict=False`` and skips those tensors with a warning);
* merges the ``msq/*`` metrics into every training log (TensorBoard, W&B, ``log_history``);
* refuses a packed export (inference-only) and says how to fine-tune it.

Its :class:`~msq_hf.training.callback.MSQCallback` forwards the Trainer events to the controller.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_sagemaker_mp_enabled

from msq_hf.config import MSQConfig
from msq_hf.convert import iter_msq_layers
from msq_hf.data.collate import collate_pixel_values
from msq_hf.io.format import MSQ_STATE_NAME
from msq_hf.io.save import adopt_trainer_card
from msq_hf.quantize import quantize_model
from msq_hf.training.callback import MSQCallback, refuse_packed, unwrap_model
from msq_hf.training.checkpoint import (
    load_checkpoint_exact,
    load_timm_checkpoint,
    read_msq_state,
    require_msq_state,
    write_msq_state,
    write_raw_model_config,
)
from msq_hf.training.controller import MSQController
from msq_hf.training.measure import check_finite_loss, detach_batch, output_logits

logger = logging.getLogger(__name__)


def _is_hf_model(model: nn.Module) -> bool:
    return isinstance(unwrap_model(model), PreTrainedModel)


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # DatasetDict
        names = next(iter(names.values()), None)
    return list(names) if names is not None else None


class MSQTrainer(Trainer):
    """A :class:`transformers.Trainer` that trains with MSQ (LSB regularizer + bit pruning, then QAT).

    Args:
        model: an HF model (``PreTrainedModel``, including ``TimmWrapperForImageClassification``) or a
            raw classifier ``nn.Module`` (timm) whose ``forward(x)`` returns logits. If it has no MSQ
            layer it is converted in place with ``quantize_model(model, msq_config)``.
        args: ``TrainingArguments``. For raw models ``remove_unused_columns=False`` and
            ``label_names=["labels"]`` are set (with a warning) when left at their defaults.
        msq_config: MSQ hyperparameters. Defaults to the config attached by ``quantize_model``.
        model_args: for raw timm models, the ``timm.create_model`` keyword arguments needed to rebuild
            the architecture; stored in the checkpoint ``config.json`` (see :func:`load_timm_checkpoint`).
        msq_layer_logs: when the per-layer ``msq/bits/*``, ``msq/k/*``, ``msq/nonzero/*``, ``msq/sens/*``
            entries join a training log: ``"never"`` (default), ``"pruning"`` (the logs of pruning steps and
            the final one, i.e. whenever they changed) or ``"always"``. The few global ``msq/*`` entries are
            in every training log. (A ResNet-20 has ~90 per-layer values: the Trainer's console printer
            would show them all; the per-layer history is in ``msq_controller.history`` and
            ``msq_history.json`` either way.)
        **kwargs: every other ``Trainer`` argument. When ``data_collator`` is not given and the data
            has ``pixel_values``/``labels`` columns (or the model is raw), ``collate_pixel_values`` is used.

    Attributes:
        msq_controller: the :class:`MSQController` (bits, schedule, history, ``log_dict()``).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        *,
        msq_config: MSQConfig | None = None,
        model_args: dict[str, Any] | None = None,
        msq_layer_logs: str = "never",
        **kwargs: Any,
    ):
        if model is None:
            raise ValueError(
                "MSQTrainer needs model=... (model_init is not supported: the MSQ layers and "
                "their schedule belong to one model instance)"
            )
        if kwargs.get("model_init") is not None:
            raise ValueError("MSQTrainer does not support model_init; pass model=...")
        if msq_layer_logs not in ("pruning", "always", "never"):
            raise ValueError(f"msq_layer_logs={msq_layer_logs!r} is invalid: expected 'pruning', 'always' or 'never'")
        self._msq_layer_logs = msq_layer_logs
        refuse_packed(model, "MSQTrainer")
        if msq_config is not None and not isinstance(msq_config, MSQConfig):
            raise TypeError(f"msq_config must be an msq_hf.MSQConfig, got {type(msq_config).__name__}")
        has_msq = any(True for _ in iter_msq_layers(model))
        if not has_msq:
            if msq_config is None:
                raise ValueError(
                    f"{type(model).__name__} has no MSQ layers and no msq_config was given: pass "
                    "msq_config=MSQConfig(...) or call msq_hf.quantize_model(model, config) first"
                )
            quantize_model(model, msq_config)
        config = msq_config if msq_config is not None else getattr(model, "msq_config", None)
        if config is None:
            raise ValueError(
                f"{type(model).__name__} has MSQ layers but no msq_config attribute; pass msq_config=MSQConfig(...)"
            )
        self._msq_raw = not _is_hf_model(model)
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        if self._msq_raw:
            self._raw_model_defaults(args)
        train_dataset = kwargs.get("train_dataset")
        if data_collator is None:
            columns = _column_names(train_dataset) if train_dataset is not None else None
            if self._msq_raw or (
                columns is not None and set(columns) <= {"pixel_values", "labels"} and "pixel_values" in columns
            ):
                data_collator = collate_pixel_values
        self._msq_model_args = dict(model_args) if model_args else None
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        if self._msq_raw:
            # the raw-model loss below is a per-micro-batch mean: the Trainer must divide it by GA
            self.model_accepts_loss_kwargs = False
        self.msq_controller = MSQController(self.model, config, total_steps=None, seed=self.args.seed)
        self.msq_callback = MSQCallback(config)
        self.msq_callback.attach(self.msq_controller)
        self.add_callback(self.msq_callback)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _raw_model_defaults(args: TrainingArguments) -> None:
        changed = []
        if args.remove_unused_columns:
            # forward(x) has no column names: the Trainer would drop pixel_values and labels
            args.remove_unused_columns = False
            changed.append("remove_unused_columns=False")
        if args.label_names is None:
            # without label names, evaluation reports no eval_loss for models that are not PreTrainedModel
            args.label_names = ["labels"]
            changed.append("label_names=['labels']")
        if changed:
            logger.warning(
                "msq_hf: the model is not a transformers PreTrainedModel; set %s in TrainingArguments",
                ", ".join(changed),
            )

    def _loss_is_ga_scaled(self, num_items_in_batch: Any) -> bool:
        """Exactly the rule ``Trainer.training_step`` uses to decide whether to divide the loss by GA."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def _raw_compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[torch.Tensor, Any]:
        label_name = (self.label_names or ["labels"])[0]
        if "pixel_values" not in inputs or label_name not in inputs:
            raise KeyError(
                f"MSQTrainer with a raw model needs 'pixel_values' and {label_name!r} in each batch, got "
                f"keys {sorted(inputs)}; use msq_hf.data.collate_pixel_values or rename the columns"
            )
        labels = inputs[label_name]
        outputs = model(inputs["pixel_values"])
        logits = output_logits(outputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func({"logits": logits}, labels, num_items_in_batch=num_items_in_batch)
        elif self.label_smoother is not None:
            loss = self.label_smoother({"logits": logits}, labels)
        else:
            loss = F.cross_entropy(logits.float(), labels)
        return loss, {"logits": logits}

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Task loss (HF: ``Trainer.compute_loss``; raw models: CE on logits) + the MSQ regularizer.

        With ``MSQConfig.regularizer_after_clipping`` and a Trainer that clips gradients, the regularizer's gradient
        joins after the clipping instead (:meth:`_clip_grad_norm`) and the loss is the task loss alone.

        The regularizer joins only in training. It is divided by ``current_gradient_accumulation_steps``
        when the Trainer will not divide the loss itself (loss already normalised by
        ``num_items_in_batch``), so with GA the gradient equals that of one step on the whole batch.
        """
        training = model.training
        controller = self.msq_controller
        if training:
            self.msq_callback.last_batch = detach_batch(inputs)
            controller.maybe_start(self.state.global_step, self.msq_callback.last_batch)  # after the warm-up
        if self._msq_raw:
            loss, outputs = self._raw_compute_loss(model, inputs, num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if training:
            reg = controller.regularization()  # also clears the layers' terms and records msq/reg
            if reg.requires_grad and not self.msq_callback.after_clipping:  # else: joins after the clipping
                if self._loss_is_ga_scaled(num_items_in_batch):
                    steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                    reg = reg / steps
                loss = loss + reg.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """``Trainer._clip_grad_norm`` on the task gradient, then the regularizer's gradient joins unclipped (before
        any callback's ``on_pre_optimizer_step`` sees the gradients); returns the task gradient's norm."""
        norm = super()._clip_grad_norm(model)
        if self.msq_callback.after_clipping:
            self.msq_callback.add_regularizer_after_clipping()
        return norm

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """``Trainer.training_step``, then stop on a NaN/inf loss, before the optimizer step applies it (the
        Trainer's ``logging_nan_inf_filter`` would log it away as a finite mean). The check runs after the
        backward, where the Trainer reads this loss on the host anyway: it adds no synchronisation point."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_finite_loss(loss, self.state.global_step + 1)
        return loss

    # ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the ``msq/*`` metrics to training logs before they reach ``log_history`` and the loggers.

        (Editing ``logs`` in a callback's ``on_log`` is too late: ``log_history`` is copied before
        ``on_log`` and the ``report_to`` callbacks run before user callbacks.)
        """
        if not any(key.startswith(("eval_", "test_")) for key in logs):
            final = "train_runtime" in logs
            per_layer = self._msq_layer_logs == "always" or (
                self._msq_layer_logs == "pruning" and (self.msq_callback.layers_changed or final)
            )
            logs = {**logs, **self.msq_controller.log_dict(per_layer=per_layer)}
            if per_layer:
                self.msq_callback.layers_changed = False
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run restores the MSQ schedule from the checkpoint's ``msq_state.json``
        (required) and its weights exactly (see :meth:`_load_from_checkpoint`)."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:
            if not os.path.isdir(checkpoint):
                raise FileNotFoundError(f"resume_from_checkpoint={checkpoint!r} is not a checkpoint folder")
            self.msq_callback.stage_resume(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _exact_loading(self) -> bool:
        # DeepSpeed / FSDP / SageMaker load their own (sharded) states, strictly
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_sagemaker_mp_enabled())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Every tensor of the checkpoint (transformers' legacy key names renamed, ``bits``/``k`` included) or a
        ``MSQFormatError`` naming the folder and the missing/unexpected keys -- never a partial load."""
        if not self._exact_loading():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_checkpoint_exact(unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """The best checkpoint exactly: its tensors (bits and k too) and its MSQ schedule, or a loud error."""
        folder = self.state.best_model_checkpoint
        if not self._exact_loading():
            super()._load_best_model()
            self.msq_callback.restore(require_msq_state(folder), folder)
            return
        logger.info("msq_hf: loading the best model from %s (score %s)", folder, self.state.best_metric)
        self.msq_callback.restore_checkpoint(folder)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save as ``Trainer`` does, plus ``msq_state.json``; raw timm models also get a rebuildable ``config.json``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        if self._msq_raw:
            write_raw_model_config(
                unwrap_model(self.model), self.msq_controller.config, output_dir, self._msq_model_args
            )
        write_msq_state(self.msq_controller, output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """``Trainer.create_model_card``, then the export's own card again when ``output_dir`` holds the packed
        export (``save_model``/``push_to_hub`` write one), keeping the Trainer's datasets and eval results."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            adopt_trainer_card(self.args.output_dir)


__all__ = ["MSQ_STATE_NAME", "MSQCallback", "MSQTrainer", "load_timm_checkpoint", "read_msq_state", "write_msq_state"]
