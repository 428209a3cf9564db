"""``msq-hf train``: the command-line front end of :mod:`msq_hf.pipeline`.

Without arguments it runs the built-in demo (timm ``resnet20_cifar`` on Fashion-MNIST, 8 bits -> 16x
compression, ~10 min on 2 CPU cores). Its options, the demo's defaults and the parser are in
:mod:`msq_hf.commands.train_args` (no torch, so ``msq-hf train --help`` answers at once); this module maps the
flags to ``TrainingArguments``, runs the pipeline and prints the console summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments

import msq_hf
from msq_hf.commands.common import CLIError, scheme_summary
from msq_hf.commands.train_args import LOG_LINES, TrainArguments, parse_namespace
from msq_hf.io.card import human_bytes
from msq_hf.pipeline.model import resolve_model
from msq_hf.pipeline.run import PipelineResult, prepare, train_and_export

RUN_NAME = "msq-hf train"


def training_arguments(flags: TrainArguments, output_dir: Path, train_images: int) -> TrainingArguments:
    """The ``TrainingArguments`` of the demo flags: SGD + momentum, cosine, logs and evals spread over the run."""
    steps_in_epoch = math.ceil(train_images / flags.batch_size)
    max_steps = flags.max_steps or max(1, math.ceil((flags.epochs or flags.DEFAULT_EPOCHS) * steps_in_epoch))
    eval_steps = max(1, max_steps // flags.evals) if flags.evals else None
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=flags.batch_size,
        per_device_eval_batch_size=max(flags.batch_size, 256),
        learning_rate=flags.lr,
        lr_scheduler_type="cosine",
        weight_decay=flags.weight_decay,
        optim="sgd",
        optim_args=f"momentum={flags.momentum}",
        logging_steps=flags.logging_steps or max(1, max_steps // LOG_LINES),
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="no",
        report_to=[s.strip() for s in flags.report_to.split(",") if s.strip()] or ["none"],
        seed=flags.seed,
        data_seed=flags.seed,
        disable_tqdm=flags.no_progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


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
    training = training_arguments(train_args, out, len(prepared.splits.train))
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


__all__ = ["cmd_train", "print_summary", "training_arguments"]
