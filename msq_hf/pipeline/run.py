"""The run: model → data → train → evaluate → export → history → report, for every front end.

Two stages, so that a front end can size its training from the data (the CLI turns ``--epochs`` into
steps, logging and evaluation intervals):

* :func:`prepare`: resolve the model reference, load the splits, build the float network;
* :func:`train_and_export`: the MSQ config, :class:`~msq_hf.training.trainer.MSQTrainer`, the final
  evaluation, and on the main process the export, its check, ``msq_history.json`` and the report.

:func:`run_pipeline` is both in one call (the recipes use it; ``msq-hf train`` calls the two stages).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DefaultDataCollator, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy

import msq_hf
from msq_hf.arguments import MSQArguments
from msq_hf.config import MSQConfig
from msq_hf.data import DIGITS_MEAN, DIGITS_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, builtin_source
from msq_hf.data.arrays import resolve_fit
from msq_hf.integrations.timm import record_preprocessing, timm_data_config, timm_processor
from msq_hf.io.card import run_card_data
from msq_hf.io.export import ExportResult
from msq_hf.metrics import compute_accuracy_metrics
from msq_hf.pipeline.arguments import DataArguments, ModelArguments, RunArguments
from msq_hf.pipeline.console import attach_console
from msq_hf.pipeline.evals import EvalAfterPruning, pacing_summary
from msq_hf.pipeline.model import (
    ModelSpec,
    build_model,
    image_processor,
    model_kind,
    model_normalization,
    resolve_model,
    set_normalization,
)
from msq_hf.pipeline.outputs import summary_dict, verify_export, write_rank_bits
from msq_hf.pipeline.splits import DataSplits, class_names, load_eval_split, load_split
from msq_hf.report import RunHistory, write_history, write_report
from msq_hf.training.trainer import MSQTrainer

Say = Callable[[str], None]

# the built-in sources' own normalization (one gray value for every channel), recorded in the export's processor
_BUILTIN_STATS = {"fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD), "digits": (DIGITS_MEAN, DIGITS_STD)}
_BUILTIN_SIDE = {"fashion_mnist": 28}  # square images the loader may pad (fit="auto"); digits are always resized


@dataclass
class Prepared:
    """The output of :func:`prepare`: what the model reference is, the network and the data."""

    spec: ModelSpec
    model: nn.Module
    timm_model_args: dict[str, Any] | None  # recorded in checkpoints so the architecture can be rebuilt
    splits: DataSplits
    image_size: int
    channels: int
    processor: Any = None  # the image processor exports carry (see image_processor, _timm_processor)


@dataclass
class PipelineResult:
    """What :func:`train_and_export` produced; the model and trainer stay in memory for the caller."""

    model: nn.Module
    trainer: MSQTrainer
    config: MSQConfig
    summary: dict[str, Any]
    splits: DataSplits
    output_dir: Path
    model_dir: Path | None = None
    export_dir: Path | None = None
    export: ExportResult | None = None
    history_path: Path | None = None
    report_paths: list[Path] = field(default_factory=list)


def prepare(model_args: ModelArguments, data_args: DataArguments, seed: int, spec: ModelSpec | None = None) -> Prepared:
    """Resolve the model (unless ``spec`` is given), load the splits and build the float network.

    The input size and channels are ``--image_size``/``--channels`` or the model's own. Hub and image-folder
    data are normalised with the statistics the model was trained with when known: its image processor's
    (transformers models) or timm's ``pretrained_cfg``. ``Prepared.processor`` is that processor, at the training
    input size and with the data's statistics: the one the export will carry. Raw timm and TimmWrapper models get
    a ``TimmWrapperImageProcessor`` describing the loader (size, resize or pad, mean/std), also recorded in the
    model's ``pretrained_cfg`` with the class names (:func:`msq_hf.integrations.timm.record_preprocessing`).
    """
    set_seed(seed)  # the network's initialisation and the data subsets
    spec = spec or resolve_model(model_args.model_name_or_path, model_args.timm_kwargs())
    size = data_args.image_size or spec.image_size
    channels = data_args.channels or spec.channels
    shape = {"image_size": size, "channels": channels, "seed": seed}
    train = load_split(data_args, data_args.train_split, data_args.max_train_samples, **shape)
    names = class_names(train)
    model, timm_args = build_model(spec, model_args, names)
    processor = image_processor(spec, model, size)
    # Hub and image-folder data take the model's statistics; the built-in sources keep their own
    builtin = builtin_source(data_args.dataset_name)
    norm = model_normalization(model, processor) if builtin is None else None
    if norm is not None and len(norm[0]) != channels:
        norm = None  # e.g. an RGB model's statistics for --channels 1: the loader's own defaults
    if norm is not None:
        train = load_split(data_args, data_args.train_split, data_args.max_train_samples, normalization=norm, **shape)
    if builtin is not None:
        mean, std = _BUILTIN_STATS[builtin]
        set_normalization(processor, [mean] * channels, [std] * channels)
    elif norm is not None:
        set_normalization(processor, *norm)
    stats = ([_BUILTIN_STATS[builtin][0]] * channels, [_BUILTIN_STATS[builtin][1]] * channels) if builtin else norm
    if stats is not None and (processor is None or timm_data_config(processor) is not None):
        processor = _timm_processor(model, size, stats, builtin)
        record_preprocessing(model, processor, names)  # checkpoints and exports carry it in config.json
    evaluation, eval_split = load_eval_split(data_args, normalization=norm, **shape)
    splits = DataSplits(train, evaluation, eval_split, names)
    return Prepared(spec, model, timm_args, splits, size, channels, processor)


def _timm_processor(model: nn.Module, size: int, stats: tuple[Any, Any], builtin: str | None) -> Any:
    """The processor of a raw timm or TimmWrapper model: the loader's preprocessing as a timm data config.

    A Fashion-MNIST image padded to ``size`` by the loader is reproduced by a center crop larger than the resized
    image (``crop_pct = size / (28 + 0.5)``: timm resizes to ``floor(size / crop_pct) = 28``, then the crop pads
    with black, the background); every other image is resized whole, like the loader's resize.
    """
    side = _BUILTIN_SIDE.get(builtin or "")
    if side is not None and resolve_fit(side, side, size) == "pad":
        return timm_processor(model, size, *stats, crop_pct=size / (side + 0.5), crop_mode="center")
    return timm_processor(model, size, *stats)


def steps_per_epoch(num_samples: int, training: TrainingArguments) -> int:
    """Optimizer steps per epoch on ``num_samples`` with the run's batch size, processes and accumulation."""
    global_batch = training.per_device_train_batch_size * max(1, training.world_size)
    batches = math.ceil(num_samples / global_batch)
    return max(1, batches // max(1, training.gradient_accumulation_steps))


def make_msq_config(msq_args: MSQArguments, run_args: RunArguments, steps_in_epoch: int) -> MSQConfig:
    """The run's :class:`MSQConfig`: ``--prune_interval_epochs``, when set, gives ``prune_interval`` in steps."""
    if run_args.prune_interval_epochs is None:
        return MSQConfig(**msq_args.config_values())
    interval = max(1, round(run_args.prune_interval_epochs * steps_in_epoch))
    return MSQConfig(**msq_args.config_values(prune_interval=interval))


def _arguments_record(*groups: Any, training: TrainingArguments, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    record = {
        type(group).__name__.removesuffix("Arguments").lower() or type(group).__name__: dataclasses.asdict(group)
        for group in groups
    }
    return {**record, "training": training.to_dict(), **(extra or {})}


def train_and_export(
    prepared: Prepared,
    training: TrainingArguments,
    model_args: ModelArguments,
    data_args: DataArguments,
    msq_args: MSQArguments,
    run_args: RunArguments,
    *,
    run_name: str,
    baselines: Sequence[tuple[str, float, float]] = (),
    argv: Sequence[str] | None = None,
    extra_args: Mapping[str, Any] | None = None,
    say: Say | None = None,
    start_time: float | None = None,
) -> PipelineResult:
    """Train ``prepared.model`` with MSQ, evaluate, and write the outputs (see the module docstring).

    ``say``: print progress and short training lines with it (the Trainer's log dicts are not printed).
    Evaluations during training use the first ``run_args.in_training_eval_samples`` eval images; the final
    one uses them all. ``baselines``: ``(label, compression, accuracy %)`` drawn next to the run in the report.
    ``extra_args`` joins the recorded arguments (a front end's own flags).
    """
    start = time.time() if start_time is None else start_time
    splits, out = prepared.splits, Path(training.output_dir)
    steps_in_epoch = steps_per_epoch(len(splits.train), training)
    cfg = make_msq_config(msq_args, run_args, steps_in_epoch)
    evaluation = splits.eval
    if evaluation is None and training.eval_strategy != IntervalStrategy.NO:
        training.eval_strategy = IntervalStrategy.NO  # nothing to evaluate on
    in_training = evaluation
    limit = run_args.in_training_eval_samples
    if evaluation is not None and limit is not None:
        in_training = evaluation.select(range(min(len(evaluation), limit)))
    trainer = MSQTrainer(
        model=prepared.model,
        args=training,
        msq_config=cfg,
        model_args=prepared.timm_model_args,
        train_dataset=splits.train,
        eval_dataset=in_training,
        data_collator=DefaultDataCollator(),
        compute_metrics=compute_accuracy_metrics,
        processing_class=prepared.processor,
    )
    controller = trainer.msq_controller
    if run_args.eval_after_pruning and in_training is not None:
        trainer.add_callback(EvalAfterPruning(controller))
    if say is not None:
        attach_console(trainer, controller, say)
        _announce(say, trainer, cfg, len(splits.train), steps_in_epoch)
    train_start = time.time()
    # TrainingArguments only records --resume_from_checkpoint; the Trainer must be told explicitly
    train_output = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    train_seconds = time.time() - train_start
    metrics: dict[str, Any] = {}
    if evaluation is not None:
        if say is not None:
            say(f"evaluating on {len(evaluation):,} {splits.eval_split} images")
        metrics = trainer.evaluate(eval_dataset=evaluation, metric_key_prefix="test")
    model = trainer.model
    model.eval()
    if training.world_size > 1:
        write_rank_bits(out, training, model, controller)
    model_dir = out / "model" if run_args.save_final_model else None
    if model_dir is not None:
        trainer.save_model(str(model_dir))  # every rank: the Trainer decides who writes
    result = PipelineResult(model, trainer, cfg, {}, splits, out, model_dir=model_dir)
    if not trainer.is_world_process_zero():
        return result
    extra: dict[str, Any] = {}
    if run_args.export:
        result.export_dir = out / "export"
        card_data = run_card_data(
            model_args.model_name_or_path, data_args.dataset_name, metrics.get("test_accuracy"), splits.eval_split
        )
        result.export = msq_hf.export(
            model, result.export_dir, overwrite=True, card_data=card_data, processor=prepared.processor
        )
        extra.update(
            storage_compression=result.export.storage_compression_ratio,
            export_weight_bytes=result.export.weight_bytes,
            float_weight_bytes=result.export.float_bytes,
        )
        if run_args.verify_export and evaluation is not None:
            extra.update(verify_export(model, result.export_dir, evaluation))
    result.summary = summary_dict(
        run=run_name,
        model=model_args.model_name_or_path,
        model_kind=model_kind(model),
        dataset=data_args.dataset_name,
        num_classes=len(splits.class_names),
        train_images=len(splits.train),
        eval_images=len(evaluation) if evaluation is not None else None,
        eval_split=splits.eval_split,
        steps=int(trainer.state.global_step),
        world_size=training.world_size,
        threads=torch.get_num_threads(),
        train_loss=train_output.training_loss,
        train_seconds=round(train_seconds, 1),
        test_accuracy=metrics.get("test_accuracy"),
        test_loss=metrics.get("test_loss"),
        compression=msq_hf.compression_ratio(model, count_sign_bit=False),
        average_bits=controller.avg_bits,
        target_compression=cfg.target_compression,
        phase=controller.phase,
        pruning_steps=max(len(controller.history) - 1, 0),  # the first entry is the start
        **pacing_summary(controller, trainer.state.log_history, train_seconds),
        wall_seconds=round(time.time() - start, 1),
        **extra,
    )
    report_dir = out / "report"
    record = RunHistory(
        run=run_name,
        summary=result.summary,
        history=controller.history,
        log_history=trainer.state.log_history,
        bit_scheme=msq_hf.bit_scheme(model),
        numels=msq_hf.layer_numels(model),
        target_compression=cfg.target_compression,
        count_sign_bit=cfg.count_sign_bit,
        total_steps=int(trainer.state.max_steps),
        msq_config=cfg.to_dict(),
        args=_arguments_record(model_args, data_args, msq_args, run_args, training=training, extra=extra_args),
        argv=list(argv) if argv is not None else None,
        baselines=[list(b) for b in baselines],
        paths={
            "model": str(model_dir) if model_dir else None,
            "export": str(result.export_dir) if result.export_dir else None,
            "report": str(report_dir) if run_args.write_report else None,
        },
        msq_hf_version=msq_hf.__version__,
    )
    result.history_path = write_history(out, record)
    if run_args.write_report:
        result.report_paths = write_report(out, report_dir)
    return result


def _announce(say: Say, trainer: MSQTrainer, cfg: MSQConfig, images: int, steps_in_epoch: int) -> None:
    args = trainer.args
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_in_epoch)
    if steps < cfg.prune_interval:
        say(
            f"note: {steps} steps is less than --prune-interval {cfg.prune_interval}: only the forced final "
            "round will prune"
        )
    say(
        f"training {steps} steps ({steps / steps_in_epoch:.2f} epochs of {images:,} images, batch "
        f"{args.per_device_train_batch_size}); MSQ {cfg.init_bits} bits -> {cfg.target_compression:g}x, pruning "
        f"every {cfg.prune_interval} steps"
    )


def run_pipeline(
    training: TrainingArguments,
    model_args: ModelArguments,
    data_args: DataArguments,
    msq_args: MSQArguments,
    run_args: RunArguments,
    **kwargs: Any,
) -> PipelineResult:
    """:func:`prepare` then :func:`train_and_export` (``kwargs`` are the latter's keyword arguments)."""
    start = time.time()
    prepared = prepare(model_args, data_args, training.seed)
    kwargs.setdefault("start_time", start)
    return train_and_export(prepared, training, model_args, data_args, msq_args, run_args, **kwargs)


__all__ = [
    "PipelineResult",
    "Prepared",
    "make_msq_config",
    "prepare",
    "run_pipeline",
    "steps_per_epoch",
    "train_and_export",
]
