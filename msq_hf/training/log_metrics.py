"""The flat ``msq/*`` metrics an MSQ run logs (console, TensorBoard, W&B...): where their names are declared.

Pure Python: :meth:`msq_hf.training.controller.MSQController.log_dict` feeds its current state in.
"""

from __future__ import annotations

from collections.abc import Mapping

PHASE_CODES: dict[str, int] = {"regularize": 0, "final": 1, "qat": 2}
"""Numeric code of each phase, logged as ``msq/phase`` (loggers such as TensorBoard want numbers)."""


def msq_metrics(
    summary: Mapping[str, float | str],
    per_layer: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """``msq/compression``, ``msq/avg_bits``, ``msq/phase`` (a :data:`PHASE_CODES` code), ``msq/reg``,
    ``msq/lambda``, ``msq/pruning_steps`` from ``summary`` (keys ``compression``, ``avg_bits``, ``phase``, ``reg``,
    ``reg_strength``, ``pruning_steps``) and, from ``per_layer`` (metric -> layer -> value, metrics ``bits``,
    ``k``, ``nonzero``, ``sens``), ``msq/<metric>/<layer>`` for every value given."""
    out: dict[str, float] = {
        "msq/compression": round(float(summary["compression"]), 4),
        "msq/avg_bits": round(float(summary["avg_bits"]), 4),
        "msq/phase": float(PHASE_CODES[str(summary["phase"])]),
        "msq/reg": float(summary["reg"]),
        "msq/lambda": float(summary["reg_strength"]),
        "msq/pruning_steps": float(summary["pruning_steps"]),
    }
    for metric, values in (per_layer or {}).items():
        out.update({f"msq/{metric}/{name}": float(value) for name, value in values.items()})
    return out


__all__ = ["PHASE_CODES", "msq_metrics"]
