"""One training pipeline for ``msq-hf train`` and the paper recipes.

model → data → train → evaluate → export → history → report:

* :mod:`~msq_hf.pipeline.arguments`: :class:`ModelArguments`, :class:`DataArguments`, :class:`RunArguments`
  (the MSQ hyperparameters are :class:`msq_hf.arguments.MSQArguments`);
  :mod:`~msq_hf.pipeline.trainer_arguments`: :class:`GroupedTrainingArguments`, for the recipes;
* :mod:`~msq_hf.pipeline.model`: what a model reference names, building the network;
* :mod:`~msq_hf.pipeline.splits`: the training and evaluation splits and their class names;
* :mod:`~msq_hf.pipeline.console`: short console lines instead of the Trainer's log dicts;
* :mod:`~msq_hf.pipeline.outputs`: per-rank bit files, the export check, the run summary;
* :mod:`~msq_hf.pipeline.run`: :func:`prepare`, :func:`train_and_export` and :func:`run_pipeline`.

The history file is :class:`msq_hf.report.RunHistory`, written once per run by :func:`train_and_export`.

Like the top-level package, this one is lazy (PEP 562): ``from msq_hf.pipeline import prepare`` imports
:mod:`~msq_hf.pipeline.run` (torch, transformers' Trainer, timm) on first use, and importing
:mod:`msq_hf.pipeline.arguments` alone stays light, which is what lets ``msq-hf train --help`` answer without
torch (docs/cli.md, "Startup time"). Modules inside msq_hf import from the submodules, so the architecture test
sees their real dependencies.
"""

from __future__ import annotations

from msq_hf.lazy import lazy_exports

# module -> the public names it defines; ``msq_hf.pipeline.<name>`` imports the module on first use
_PUBLIC: dict[str, tuple[str, ...]] = {
    "msq_hf.pipeline.arguments": ("DataArguments", "ModelArguments", "RunArguments"),
    "msq_hf.pipeline.console": ("ConsoleCallback", "attach_console"),
    "msq_hf.pipeline.model": ("ModelSpec", "build_model", "logits_of", "model_normalization", "resolve_model"),
    "msq_hf.pipeline.outputs": ("SUMMARY_KEYS", "verify_export"),
    "msq_hf.pipeline.run": (
        "PipelineResult",
        "Prepared",
        "make_msq_config",
        "prepare",
        "run_pipeline",
        "steps_per_epoch",
        "train_and_export",
    ),
    "msq_hf.pipeline.splits": ("EVAL_SPLITS", "DataSplits", "class_names"),
    "msq_hf.pipeline.trainer_arguments": ("GroupedTrainingArguments",),
}
__all__ = sorted(name for names in _PUBLIC.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, globals())
