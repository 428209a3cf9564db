"""Top-1 accuracy as an ``evaluate`` metric script that ships inside msq_hf (no Hub access needed).

Loaded with ``msq_hf.metrics.load_metric()`` or ``evaluate.load("<msq_hf>/metrics/accuracy")``.
evaluate scans this file's imports line by line to decide what to install, so keep exactly one
import per line.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy: the fraction of predictions equal to their reference label,
(TP + TN) / (TP + TN + FP + FN) for classification, optionally weighted per sample.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): ground-truth class indices.
    normalize (`bool`, default True): return the fraction (True) or the number (False) of correct predictions.
    sample_weight (`list` of `float`, optional): per-sample weights.
Returns:
    accuracy (`float`): in [0, 1] when normalize=True, else the (weighted) count of correct predictions.
Examples:
    >>> metric = msq_hf.metrics.load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 classification accuracy computed with numpy."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Accuracy_and_precision"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"accuracy: predictions {predictions.shape} and references {references.shape} differ in shape"
            )
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            weights = np.ones_like(correct)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != correct.shape:
                raise ValueError(f"accuracy: sample_weight {weights.shape} must match predictions {correct.shape}")
        total = float((correct * weights).sum())
        if not normalize:
            return {"accuracy": total}
        denominator = float(weights.sum())
        if denominator == 0.0:
            raise ValueError("accuracy: no samples (or all sample weights are zero)")
        return {"accuracy": total / denominator}
