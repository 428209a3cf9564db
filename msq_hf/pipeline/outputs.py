"""What a finished run writes: per-rank bit files, the bit-packed export and its check, the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DefaultDataCollator, TrainingArguments

import msq_hf
from msq_hf.pipeline.model import logits_of
from msq_hf.training.controller import MSQController

VERIFY_IMAGES = 8  # eval images whose logits the reloaded export must reproduce bit for bit


def write_rank_bits(output_dir: Path, training: TrainingArguments, model: nn.Module, controller: MSQController) -> Path:
    """``<output_dir>/ranks/bits_rank<r>.json``: this rank's bit scheme and pruning decisions.

    Written by every process of a multi-process run, so that diverging pruning decisions would show.
    """
    rank = training.process_index
    path = output_dir / "ranks" / f"bits_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world_size": training.world_size,
        "bit_scheme": msq_hf.bit_scheme(model),
        "history": [
            {"step": h["step"], "bits": h["bits"], "k": h["k"], "phase": h["phase"]} for h in controller.history
        ],
    }
    path.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    return path


def verify_export(model: nn.Module, export_dir: Path, eval_dataset: Any, n: int = VERIFY_IMAGES) -> dict[str, Any]:
    """Reload the export and compare its logits with ``model`` on the first ``n`` eval images.

    Returns ``export_logits_equal`` (``torch.equal``), ``export_logits_max_abs_diff`` and
    ``export_reloaded_class``. Both models run on the same device, so equal means bit-identical kernels.
    """
    batch = DefaultDataCollator()([eval_dataset[i] for i in range(min(n, len(eval_dataset)))])
    reloaded = msq_hf.from_pretrained(export_dir)
    device = next(model.parameters()).device
    reloaded.to(device)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = logits_of(model, batch["pixel_values"].to(device)).cpu()
        got = logits_of(reloaded, batch["pixel_values"].to(device)).cpu()
    return {
        "export_logits_equal": bool(torch.equal(expected, got)),
        "export_logits_max_abs_diff": float((expected.float() - got.float()).abs().max()),
        "export_reloaded_class": type(reloaded).__name__,
    }


SUMMARY_KEYS = (
    "run",
    "model",
    "model_kind",
    "dataset",
    "num_classes",
    "train_images",
    "eval_images",
    "eval_split",
    "steps",
    "world_size",
    "threads",
    "train_loss",
    "train_seconds",
    "test_accuracy",
    "test_loss",
    "compression",
    "average_bits",
    "target_compression",
    "phase",
    "pruning_steps",
    "threshold_share",
    "forced_round_layers",
    "forced_round_max_drop",
    "k_flip_rate",
    "final_reg_strength",
    "max_pruning_eval_drop",
    "measure_share",
    "hessian_passes",
    "sensitivity_passes",
    "rewound_at_step",
    "storage_compression",
    "export_weight_bytes",
    "float_weight_bytes",
    "export_logits_equal",
    "export_logits_max_abs_diff",
    "export_reloaded_class",
    "wall_seconds",
)
"""Every key of a run's summary, always present (``None`` when a step was switched off)."""


def summary_dict(**values: Any) -> dict[str, Any]:
    """A summary with every :data:`SUMMARY_KEYS` entry (missing ones ``None``); unknown keys are refused."""
    unknown = sorted(set(values) - set(SUMMARY_KEYS))
    if unknown:
        raise KeyError(f"summary keys {unknown} are not in SUMMARY_KEYS")
    return {key: values.get(key) for key in SUMMARY_KEYS}


__all__ = ["SUMMARY_KEYS", "VERIFY_IMAGES", "summary_dict", "verify_export", "write_rank_bits"]
