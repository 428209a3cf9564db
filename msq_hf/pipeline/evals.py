"""Evaluations around pruning: evaluate right before every pruning step and right after each one that lowered bits,
and measure the drops.

Issue 14's bar for gradual pruning is that no evaluation right after a pruning step loses more than a few points
against the evaluation before it. ``--eval_after_pruning`` (RunArguments) adds those evaluations to a run;
:func:`pruning_drops` reads them back from the Trainer's ``log_history``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

from msq_hf.training.controller import MSQController
from msq_hf.training.pacing import final_round_step, k_flip_rate

__all__ = ["EvalAfterPruning", "pacing_summary", "pruning_drops"]


class EvalAfterPruning(TrainerCallback):
    """Ask the Trainer to evaluate right before every pruning step and right after each one that lowered some
    layer's bits, so that a drop measures the pruning and not the training between two distant evaluations.

    "Before" is the end of the previous optimizer step (one SGD step earlier): measured against the evaluation at the
    previous pruning step instead (10 steps earlier in the demo), early from-scratch training alone moved the
    accuracy by up to 6 points. Add it after the MSQ callback (``MSQTrainer`` adds that first), so the decision of
    the step is known.
    """

    def __init__(self, controller: MSQController):
        self.controller = controller
        self.seen = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        history = self.controller.history
        fresh, self.seen = history[self.seen :], len(history)
        pruning_next = self.controller.started and self.controller.is_pruning_step(state.global_step + 1)
        if any(entry.get("pruned") for entry in fresh) or pruning_next:
            control.should_evaluate = True
        return control


def pruning_drops(
    history: Sequence[Mapping[str, Any]], log_history: Sequence[Mapping[str, Any]], metric: str = "eval_accuracy"
) -> list[dict[str, Any]]:
    """For every pruning step that lowered bits, the evaluation right after it against the one before it.

    Returns ``[{"step", "before_step", "before", "after", "drop", "forced"}]`` (``drop`` in the metric's units,
    positive when the metric fell); pruning steps without an evaluation at that step are skipped.
    """
    evals = {int(e["step"]): float(e[metric]) for e in log_history if metric in e and "step" in e}
    rows = []
    for entry in history[1:]:
        step = int(entry["step"])
        if not entry.get("pruned") or step not in evals:
            continue
        earlier = [s for s in evals if s < step]
        if not earlier:
            continue
        before_step = max(earlier)
        rows.append(
            {
                "step": step,
                "before_step": before_step,
                "before": evals[before_step],
                "after": evals[step],
                "drop": evals[before_step] - evals[step],
                "forced": bool(entry.get("forced")),
            }
        )
    return rows


def pacing_summary(
    controller: MSQController, log_history: Sequence[Mapping[str, Any]], train_seconds: float
) -> dict[str, Any]:
    """The run-summary fields about how the target was reached: the share of the bit reduction done by threshold
    pruning, the forced round's extent, the ``k`` flip rate, the final lambda, the largest post-pruning drop and
    the share of training time spent measuring (nonzero rates and sensitivity passes) and how many of those passes
    ran the Hessian (``hessian_interval``)."""
    share = controller.pruning_share()
    drops = pruning_drops(controller.history, log_history)
    return {
        "threshold_share": round(share["threshold_share"], 4),
        "forced_round_layers": int(share["forced_layers"]),
        "forced_round_max_drop": int(share["forced_max_drop"]),
        "k_flip_rate": k_flip_rate(controller.history, controller.config.min_bits),
        "final_reg_strength": controller.reg_strength,
        "max_pruning_eval_drop": max((row["drop"] for row in drops), default=None),
        "measure_share": round(controller.measure_seconds / train_seconds, 4) if train_seconds > 0 else None,
        "hessian_passes": controller.traces.hessian_passes,
        "sensitivity_passes": controller.traces.passes,
        # rewind_weights: the weights went back to the start at the final round (msq_hf.training.rewind)
        "rewound_at_step": final_round_step(controller.history) if controller.config.rewind_weights else None,
    }
