"""One training pipeline for ``msq-hf train`` and the paper recipes.

model → data → train → evaluate → export → history → report:

* :mod:`~msq_hf.pipeline.arguments`: :class:`ModelArguments`, :class:`DataArguments`, :class:`RunArguments`
  (the MSQ hyperparameters are :class:`msq_hf.arguments.MSQArguments`);
* :mod:`~msq_hf.pipeline.model`: what a model reference names, building the network;
* :mod:`~msq_hf.pipeline.splits`: the training and evaluation splits and their class names;
* :mod:`~msq_hf.pipeline.console`: short console lines instead of the Trainer's log dicts;
* :mod:`~msq_hf.pipeline.outputs`: per-rank bit files, the export check, the run summary;
* :mod:`~msq_hf.pipeline.run`: :func:`prepare`, :func:`train_and_export` and :func:`run_pipeline`.

The history file is :class:`msq_hf.report.RunHistory`, written once per run by :func:`train_and_export`.
"""

from __future__ import annotations

from msq_hf.pipeline.arguments import DataArguments, GroupedTrainingArguments, ModelArguments, RunArguments
from msq_hf.pipeline.console import ConsoleCallback, attach_console
from msq_hf.pipeline.model import ModelSpec, build_model, logits_of, model_normalization, resolve_model
from msq_hf.pipeline.outputs import SUMMARY_KEYS, verify_export
from msq_hf.pipeline.run import (
    PipelineResult,
    Prepared,
    make_msq_config,
    prepare,
    run_pipeline,
    steps_per_epoch,
    train_and_export,
)
from msq_hf.pipeline.splits import EVAL_SPLITS, DataSplits, class_names

__all__ = [
    "EVAL_SPLITS",
    "SUMMARY_KEYS",
    "ConsoleCallback",
    "DataArguments",
    "DataSplits",
    "GroupedTrainingArguments",
    "ModelArguments",
    "ModelSpec",
    "PipelineResult",
    "Prepared",
    "RunArguments",
    "attach_console",
    "build_model",
    "class_names",
    "logits_of",
    "make_msq_config",
    "model_normalization",
    "prepare",
    "resolve_model",
    "run_pipeline",
    "steps_per_epoch",
    "train_and_export",
    "verify_export",
]
