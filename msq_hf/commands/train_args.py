"""The options of ``msq-hf train``: its argument dataclasses, the demo's defaults and the parser (no torch).

The options are dataclasses parsed by ``transformers.HfArgumentParser``: the pipeline's
:class:`~msq_hf.pipeline.arguments.ModelArguments`, :class:`~msq_hf.pipeline.arguments.DataArguments` and
:class:`~msq_hf.pipeline.arguments.RunArguments`, :class:`msq_hf.arguments.MSQArguments` (every ``MSQConfig``
field) and :class:`TrainArguments`, the short demo flags that become ``TrainingArguments``. Where the demo's
defaults differ from the declarations, :data:`DEMO_DEFAULTS` says so, in one table.

Building this parser, printing its help and checking the parsed values import neither torch nor
``transformers.TrainingArguments`` (only ``transformers.hf_argparser``): ``msq-hf train --help`` answers at once
(docs/cli.md, "Startup time"). The run itself is :mod:`msq_hf.commands.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from transformers.hf_argparser import HfArg

from msq_hf.arguments import MSQArguments, cli_config_values
from msq_hf.commands.common import HelpFormatter
from msq_hf.pipeline.arguments import DataArguments, ModelArguments, RunArguments

IN_TRAINING_EVAL_IMAGES = 1000  # the demo's --in_training_eval_samples
LOG_LINES = 20  # --logging-steps default: about this many lines per run

# The built-in demo: every default of `msq-hf train` that differs from the declaration of its flag (MSQConfig,
# the pipeline's dataclasses). A short CPU run needs a stronger regularizer, a higher pruning threshold and a
# short interval to reach 16x in ~600 steps; measured on 2 shared CPU cores, see docs/cli.md.
DEMO_DEFAULTS: dict[str, Any] = {
    # model and data
    "model_name_or_path": "resnet20_cifar",
    "dataset_name": "fashion_mnist",
    "max_train_samples": 20000,
    "max_eval_samples": 2000,
    # MSQ (MSQConfig: 0.01, 100, 16, 64)
    "prune_threshold": 0.3,
    "prune_interval": 10,
    "hessian_max_probes": 2,
    "hessian_batch_size": 32,
    # outputs: the trained MSQ model goes to OUTPUT/model next to the export
    "save_final_model": True,
    # periodic evals score a slice of the eval set; the full set is scored once at the end (RunArguments: all)
    "in_training_eval_samples": IN_TRAINING_EVAL_IMAGES,
}


@dataclass
class TrainArguments:
    """The short demo flags of ``msq-hf train``, mapped to ``transformers.TrainingArguments`` by
    :func:`msq_hf.commands.train.training_arguments`."""

    _argument_group_name = "training and output"

    epochs: float | None = HfArg(
        default=None, help="passes over the training subset (default: 4 unless --max-steps is given)"
    )
    max_steps: int | None = HfArg(default=None, help="number of optimizer steps (instead of --epochs)")
    batch_size: int = HfArg(default=128, help="training batch size")
    lr: float = HfArg(default=0.1, help="SGD learning rate (cosine schedule)")
    momentum: float = HfArg(default=0.9, help="SGD momentum")
    weight_decay: float = HfArg(default=5e-4, help="weight decay")
    seed: int = HfArg(default=0, help="seed of the data subset, initialization and probes")
    output: str = HfArg(default="msq-run", aliases=["-o"], help="output folder")
    overwrite: bool = HfArg(default=False, help="reuse a non-empty output folder")
    report_to: str = HfArg(default="none", help="comma-separated Trainer loggers (tensorboard, wandb, ...), or 'none'")
    logging_steps: int | None = HfArg(
        default=None, help=f"print/log every N steps (default: about {LOG_LINES} lines per run)"
    )
    evals: int = HfArg(
        default=4,
        help=f"evaluations during training, on the first {IN_TRAINING_EVAL_IMAGES} eval images "
        "(0 = only the final one)",
    )
    threads: int | None = HfArg(default=None, help="torch CPU threads (default: the cores available to this process)")
    no_progress: bool = HfArg(default=False, help="no progress bars")
    no_report: bool = HfArg(default=False, help="skip the plots and report.md (same as --write_report false)")
    full_train_set: bool = HfArg(default=False, help="ignore --train-limit and use every training image")

    DEFAULT_EPOCHS = 4.0

    def __post_init__(self) -> None:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("argument --max-steps: not allowed with argument --epochs")
        positive = ("max_steps", "batch_size", "logging_steps", "threads")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value} is not allowed (expected a positive integer)")
        for name, value in (("epochs", self.epochs), ("lr", self.lr)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} {value:g} is not allowed (expected a positive number)")
        for name in ("momentum", "weight_decay", "evals"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} {value:g} is not allowed (expected a number >= 0)")


ARGUMENT_TYPES = (ModelArguments, DataArguments, MSQArguments, TrainArguments, RunArguments)


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``sub`` (the ``add_subparsers()`` object of ``msq-hf``)."""
    parser = sub.add_parser(
        "train",
        dataclass_types=ARGUMENT_TYPES,
        description="MSQ quantization-aware training with MSQTrainer: the LSB regularizer and Hessian-guided "
        "bit pruning until --target compression, then QAT. Afterwards the model is evaluated, saved to "
        "OUTPUT/model, exported bit-packed to OUTPUT/export, and OUTPUT/msq_history.json plus OUTPUT/report/ "
        "are written. Without options: timm resnet20_cifar on Fashion-MNIST (8 bits -> 16x). Every option "
        "has an underscore spelling too (--init_bits).",
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(**DEMO_DEFAULTS)
    parser.set_defaults(train_parser=parser)  # parse_namespace reports bad values through it
    return parser


def parse_namespace(args: argparse.Namespace) -> tuple[Any, ...]:
    """The argument dataclasses of a parsed ``msq-hf train`` namespace, in :data:`ARGUMENT_TYPES` order.

    Bad values are usage errors (``parser.error``: one line, exit code 2); an impossible MSQ combination is a
    ``ValueError`` naming every flag involved (exit code 1).
    """
    parser = args.train_parser
    try:
        parsed = tuple(
            kind(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kind) if f.init})
            for kind in ARGUMENT_TYPES
        )
    except ValueError as exc:
        parser.error(str(exc))
    cli_config_values(parser, parsed[2])  # MSQ values are checked before anything loads
    return parsed


__all__ = [
    "ARGUMENT_TYPES",
    "DEMO_DEFAULTS",
    "IN_TRAINING_EVAL_IMAGES",
    "LOG_LINES",
    "TrainArguments",
    "add_train_parser",
    "parse_namespace",
]
