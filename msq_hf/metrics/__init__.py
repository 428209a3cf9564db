"""Offline evaluation metrics.

``evaluate.load("accuracy")`` downloads a script from the Hub, which fails offline. msq_hf ships
its own metric scripts inside the package and loads them by path, so nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["METRICS_DIR", "available_metrics", "compute_accuracy_metrics", "load_metric"]

METRICS_DIR = Path(__file__).resolve().parent
_ACCURACY: Any = None


def available_metrics() -> list[str]:
    """Names of the metric scripts bundled with msq_hf (``<name>/<name>.py``)."""
    return sorted(p.parent.name for p in METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)


def load_metric(name: str = "accuracy", **kwargs: Any) -> Any:
    """Load a bundled metric with ``evaluate.load(<path inside msq_hf>)``; works with ``HF_HUB_OFFLINE=1``.

    ``kwargs`` go to ``evaluate.load`` (e.g. ``keep_in_memory=True``, ``experiment_id``).
    evaluate copies the script to ``$HF_HOME/modules``; no other global state is touched.
    """
    script_dir = METRICS_DIR / name
    if not (script_dir / f"{name}.py").is_file():
        raise ValueError(f"metric {name!r} is not bundled with msq_hf; available: {available_metrics()}")
    import evaluate

    return evaluate.load(str(script_dir), **kwargs)


def _shared_accuracy() -> Any:
    # Loading copies and imports the script (~tens of ms); do it once per process.
    global _ACCURACY
    if _ACCURACY is None:
        _ACCURACY = load_metric("accuracy", keep_in_memory=True)
    return _ACCURACY


def compute_accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``Trainer(compute_metrics=...)`` helper: top-1 accuracy from logits and labels.

    Accepts a ``transformers.EvalPrediction`` or a ``(predictions, label_ids)`` tuple. Predictions
    may be logits ``(N, C)`` (argmax is taken), a tuple whose first element is the logits, or
    class indices ``(N,)``. Labels equal to ``-100`` (ignored by the loss) are skipped.
    """
    if hasattr(eval_pred, "predictions"):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        predictions, labels = eval_pred
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"compute_accuracy_metrics: predictions {predictions.shape} do not match labels "
            f"{labels.shape} (expected logits (N, C) or class ids (N,))"
        )
    keep = labels.reshape(-1) != -100
    result = _shared_accuracy().compute(predictions=predictions.reshape(-1)[keep], references=labels.reshape(-1)[keep])
    return {"accuracy": float(result["accuracy"])}
