"""``msq-hf train``: the command-line front end of :mod:`msq_hf.pipeline`.

Without arguments it runs the built-in demo (timm ``resnet20_cifar`` on Fashion-MNIST, 8 bits -> 16x
compression, ~10 min on 2 CPU cores). The options are dataclasses parsed by ``transformers.HfArgumentParser``:
the pipeline's :class:`~msq_hf.pipeline.ModelArguments`, :class:`~msq_hf.pipeline.DataArguments` and
:class:`~msq_hf.pipeline.RunArguments`, :class:`msq_hf.arguments.MSQArguments` (every ``MSQConfig`` field)
and :class:`TrainArguments`, the short demo flags that become ``TrainingArguments``. Where the demo's defaults
differ from the declarations, :data:`DEMO_DEFAULTS` says so, in one table. This module maps the flags,
runs the pipeline and prints the console summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainingArguments
from transformers.hf_argparser import HfArg

import msq_hf
from msq_hf.arguments import MSQArguments, config_from_args
from msq_hf.commands.common import CLIError, HelpFormatter, scheme_summary
from msq_hf.io.card import human_bytes
from msq_hf.pipeline import (
    DataArguments,
    ModelArguments,
    PipelineResult,
    RunArguments,
    prepare,
    resolve_model,
    train_and_export,
)

RUN_NAME = "msq-hf train"
IN_TRAINING_EVAL_IMAGES = 1000  # periodic evals use a slice of the eval set: the full set is scored once at the end
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
}


@dataclass
class TrainArguments:
    """The short demo flags of ``msq-hf train``, mapped to ``transformers.TrainingArguments``."""

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

    def training_arguments(self, output_dir: Path, train_images: int) -> TrainingArguments:
        """The ``TrainingArguments`` of these flags: SGD + momentum, cosine, logs and evals spread over the run."""
        steps_in_epoch = math.ceil(train_images / self.batch_size)
        max_steps = self.max_steps or max(1, math.ceil((self.epochs or self.DEFAULT_EPOCHS) * steps_in_epoch))
        eval_steps = max(1, max_steps // self.evals) if self.evals else None
        return TrainingArguments(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=max(self.batch_size, 256),
            learning_rate=self.lr,
            lr_scheduler_type="cosine",
            weight_decay=self.weight_decay,
            optim="sgd",
            optim_args=f"momentum={self.momentum}",
            logging_steps=self.logging_steps or max(1, max_steps // LOG_LINES),
            eval_strategy="steps" if eval_steps else "no",
            eval_steps=eval_steps,
            save_strategy="no",
            report_to=[s.strip() for s in self.report_to.split(",") if s.strip()] or ["none"],
            seed=self.seed,
            data_seed=self.seed,
            disable_tqdm=self.no_progress,
            remove_unused_columns=False,
            label_names=["labels"],
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
        )


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
    parser.set_defaults(func=cmd_train, train_parser=parser)
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
    config_from_args(parser, parsed[2])  # MSQ values are checked before anything loads
    return parsed


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"--output {out} is not empty; pass --overwrite or choose another --output")
    out.mkdir(parents=True, exist_ok=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def cmd_train(args: argparse.Namespace) -> int:
    """``msq-hf train``: the pipeline run, then a console summary."""
    start = time.time()
    try:
        model_args, data_args, msq_args, train_args, run_args = parse_namespace(args)
    except SystemExit as exc:  # a usage error, already printed on one line
        return int(exc.code or 0)
    if train_args.full_train_set:
        data_args.max_train_samples = None
    if train_args.no_report:
        run_args.write_report = False
    out = Path(train_args.output).expanduser().resolve()
    _prepare_output(out, train_args.overwrite)

    threads = train_args.threads or _available_cores()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # the raw-model / optimizer notices are not for this console
    logging.getLogger("msq_hf").setLevel(logging.WARNING)
    # inductor (used by the fused MSQ kernels) notes that no CUDA exists: true and irrelevant on CPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    spec = resolve_model(model_args.model_name_or_path, model_args.timm_kwargs())
    size = data_args.image_size or spec.image_size
    print(
        f"{RUN_NAME}: {model_args.model_name_or_path} on {data_args.dataset_name}, {size}x{size}, {threads} CPU "
        f"thread{'s' if threads != 1 else ''} -> {out}"
    )
    prepared = prepare(model_args, data_args, train_args.seed, spec)
    training = train_args.training_arguments(out, len(prepared.splits.train))
    result = train_and_export(
        prepared,
        training,
        model_args,
        data_args,
        msq_args,
        run_args,
        run_name=RUN_NAME,
        argv=getattr(args, "argv", None),
        extra_args={"train": dataclasses.asdict(train_args)},
        in_training_eval_limit=IN_TRAINING_EVAL_IMAGES,
        say=print,
        start_time=start,
    )
    print_summary(result, time.time() - start)
    return 0


def print_summary(result: PipelineResult, wall_seconds: float) -> None:
    """The human summary of a finished run: accuracy, compression, bit mix, sizes and where things are."""
    summary = result.summary
    say = print
    say("")
    say(
        f"MSQ done in {_duration(wall_seconds)} (training {_duration(summary['train_seconds'])}, "
        f"{summary['steps']} steps)"
    )
    acc = summary["test_accuracy"]
    say(
        f"  accuracy    : {100 * acc:.2f}% on {summary['eval_images']:,} {summary['eval_split']} images"
        if acc is not None
        else "  accuracy    : n/a"
    )
    signed = summary["storage_compression"]
    say(
        f"  compression : {summary['compression']:.2f}x (target {summary['target_compression']:g}x, avg "
        f"{summary['average_bits']:.2f} magnitude bits"
        + (f"; {signed:.2f}x with the sign bit)" if signed is not None else ")")
    )
    say(f"  bit scheme  : {scheme_summary(msq_hf.bit_scheme(result.model), msq_hf.layer_numels(result.model))}")
    if result.export is not None and result.export_dir is not None:
        export = result.export
        folder_bytes = sum(p.stat().st_size for p in result.export_dir.iterdir() if p.is_file())
        say(
            f"  on disk     : export weights {human_bytes(export.weight_bytes, 1)} vs "
            f"{human_bytes(export.float_bytes, 1)} float32 ({export.size_ratio:.1f}x smaller); "
            f"export folder {human_bytes(folder_bytes, 1)}"
        )
        say(f"  export      : {result.export_dir}   (msq-hf inspect {result.export_dir})")
        if summary["export_logits_equal"] is not None:
            verdict = "identical logits" if summary["export_logits_equal"] else "DIFFERENT logits"
            say(f"  reloaded    : {verdict} on the first eval images ({summary['export_reloaded_class']})")
    if result.model_dir is not None:
        say(f"  checkpoint  : {result.model_dir}")
    if result.report_paths:
        pngs = [p for p in result.report_paths if p.suffix == ".png"]
        say(f"  report      : {result.output_dir / 'report' / 'report.md'} (+{len(pngs)} plots)")
    say(f"  history     : {result.history_path}")


__all__ = ["ARGUMENT_TYPES", "DEMO_DEFAULTS", "TrainArguments", "add_train_parser", "cmd_train", "print_summary"]
