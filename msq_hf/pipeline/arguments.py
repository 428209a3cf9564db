"""The pipeline's arguments besides MSQ's: which model, which data, which outputs.

Dataclasses for ``transformers.HfArgumentParser`` (``--model_name_or_path`` and ``--model-name-or-path``
both work; short aliases such as ``--model``, ``--dataset``, ``--train-limit`` too). The MSQ hyperparameters
are :class:`msq_hf.arguments.MSQArguments`, generated from :class:`msq_hf.MSQConfig`; nothing here repeats
them. ``_argument_group_name`` titles each group in ``--help``.

This module imports only ``transformers.hf_argparser`` (no torch, no ``TrainingArguments``: those are in
:mod:`msq_hf.pipeline.trainer_arguments`), so ``msq-hf train --help`` builds its parser at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from transformers.hf_argparser import HfArg


@dataclass
class ModelArguments:
    """Which network to train (see :func:`msq_hf.pipeline.model.resolve_model`)."""

    _argument_group_name = "model"

    model_name_or_path: str = HfArg(
        default="",
        aliases=["--model"],
        help="timm model name (resnet20_cifar, deit_tiny_patch16_224), timm Hub id (timm/<name>.<tag>), "
        "transformers Hub id (owner/name), or a local folder: timm save_for_hf folder, transformers "
        "save_pretrained folder, MSQTrainer checkpoint or msq_hf export (quantized ones are dequantized "
        "and re-trained from --init-bits)",
    )
    pretrained: bool | None = HfArg(
        default=None,
        # a bare --pretrained means true (HfArgumentParser gives Optional[bool] no const of its own)
        metadata={"nargs": "?", "const": True},
        help="load pretrained weights: true also downloads timm's weights for timm names; false builds "
        "every architecture with random weights (offline); unset: the weights a folder, checkpoint, "
        "export or transformers Hub id holds, random weights for timm names",
    )
    model_kwargs: str | None = HfArg(
        default=None,
        help='JSON object of extra timm.create_model keyword arguments, e.g. \'{"img_size": 32, "depth": 2}\' '
        "(timm models only; dropped when --model_name_or_path is given without it)",
    )

    def __post_init__(self) -> None:
        self.timm_kwargs()  # a malformed --model_kwargs fails at parse time, naming the flag

    def timm_kwargs(self) -> dict[str, Any]:
        """``model_kwargs`` parsed (``{}`` when unset); ``ValueError`` naming ``--model_kwargs`` if malformed."""
        if not self.model_kwargs:
            return {}
        try:
            kwargs = json.loads(self.model_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model_kwargs is not valid JSON ({exc}): {self.model_kwargs!r}") from exc
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model_kwargs must be a JSON object, got {self.model_kwargs!r}")
        return kwargs


@dataclass
class DataArguments:
    """Which images to train and evaluate on (see :func:`msq_hf.data.load_image_dataset`)."""

    _argument_group_name = "data"

    dataset_name: str = HfArg(
        default="",
        aliases=["--dataset"],
        help="'fashion_mnist' (local IDX files), 'digits' (scikit-learn), a Hub dataset id "
        "(uoft-cs/cifar10, ILSVRC/imagenet-1k) or a local image folder (root/<split>/<class>/*.png)",
    )
    train_split: str = HfArg(default="train", help="split used for training")
    eval_split: str | None = HfArg(
        default=None,
        help="split used for evaluation (unset: the first of test, validation, valid, val that exists; "
        "'' = no evaluation)",
    )
    image_size: int | None = HfArg(default=None, help="square input side in pixels (unset: the model's own size)")
    channels: int | None = HfArg(default=None, help="image channels, 3 (RGB) or 1 (gray) (unset: the model's own)")
    max_train_samples: int | None = HfArg(
        default=None,
        aliases=["--train-limit"],
        help="train on a subset of this many images (class-stratified for fashion_mnist and digits)",
    )
    max_eval_samples: int | None = HfArg(
        default=None, aliases=["--eval-limit"], help="evaluate on a subset of this many images"
    )

    def __post_init__(self) -> None:
        for name in ("image_size", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value} is not allowed (expected a positive integer)")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels {self.channels} is not allowed (expected 1 or 3)")


@dataclass
class RunArguments:
    """What a run writes besides the Trainer's own output, and the pruning interval in epochs."""

    _argument_group_name = "outputs"

    prune_interval_epochs: float | None = HfArg(
        default=None,
        help="pruning interval in epochs, converted to optimizer steps from the data size, batch, processes "
        "and gradient accumulation; replaces --prune_interval unless that is given on the command line",
    )
    save_final_model: bool = HfArg(
        default=False, help="save the trained MSQ model (MSQTrainer.save_model) to <output_dir>/model"
    )
    export: bool = HfArg(default=True, help="write the bit-packed export to <output_dir>/export (msq_hf.export)")
    verify_export: bool = HfArg(
        default=True, help="reload the export and require bit-identical logits on 8 evaluation images"
    )
    write_report: bool = HfArg(default=True, help="write plots and report.md to <output_dir>/report")
    in_training_eval_samples: int | None = HfArg(
        default=None,
        help="evaluations during training (eval_strategy, --eval_after_pruning) score the first N evaluation images; "
        "the final evaluation scores them all (default: all, every time)",
    )
    eval_after_pruning: bool = HfArg(
        default=False,
        help="also evaluate right before every pruning step and right after each one that lowered bits (the summary "
        "then gives the largest accuracy drop a pruning step caused)",
    )

    def __post_init__(self) -> None:
        if self.prune_interval_epochs is not None and not self.prune_interval_epochs > 0:
            raise ValueError(f"--prune_interval_epochs {self.prune_interval_epochs} must be > 0")
        if self.in_training_eval_samples is not None and not self.in_training_eval_samples > 0:
            raise ValueError(f"--in_training_eval_samples {self.in_training_eval_samples} must be > 0")


__all__ = ["DataArguments", "ModelArguments", "RunArguments"]
