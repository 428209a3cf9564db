"""Short console lines for a training run, instead of the Trainer's whole log dicts.

The Trainer's console printer writes every log dict, which holds ~4 ``msq/*`` keys per layer: unreadable.
:class:`ConsoleCallback` keeps loss, lr, compression, bits and accuracy, plus one line per pruning step;
:func:`attach_console` puts it in place of the printer on a Trainer (its tqdm bars stay).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from msq_hf.quant.kernels import KERNELS
from msq_hf.training.controller import MSQController
from msq_hf.training.log_metrics import PHASE_CODES

_PHASE_NAMES = {float(code): name for name, code in PHASE_CODES.items()}


class ConsoleCallback(TrainerCallback):
    """Writes ``[step 40/628] loss ..., 4.30x, avg 7.45 bits, phase regularize`` lines with ``write``.

    The first step also compiles the fused kernels and runs the first Hessian pass (``MSQController.start``):
    a line says so before it, another gives its time after it, and the ETA of ``progress``'s bar restarts then
    (measured from that one slow step, it would read hours).
    """

    def __init__(self, controller: MSQController, write: Callable[[str], None], progress: Any = None) -> None:
        self.controller = controller
        self.write = write
        self.progress = progress  # transformers' ProgressCallback, if any
        self.seen = 0  # controller history entries already printed
        self.first_step_start: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.controller.started or self.first_step_start is not None or state.global_step > 0:
            return
        work = ["compiling the fused MSQ kernels"] if KERNELS.state is None else []
        if self.controller.config.hessian_guided and self.controller.warmup_step == 0:
            work.append("measuring the Hessian sensitivity of every layer")
        self.write(
            f"[step {state.global_step + 1}] first step: {' and '.join(work or ['MSQ set-up'])}; "
            "slower than the steps after it..."
        )
        self.first_step_start = time.perf_counter()

    def _first_step_done(self, state: Any) -> None:
        seconds = time.perf_counter() - self.first_step_start
        self.first_step_start = None
        self.write(f"[step {state.global_step}] first step done in {seconds:.1f} s")
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None:  # restart the bar's clock: its ETA comes from the steps after this one
            bar.reset(total=bar.total)
            bar.initial = bar.n = bar.last_print_n = state.global_step
            bar.refresh()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first_step_start is not None:
            self._first_step_done(state)
        history = self.controller.history
        for index, entry in enumerate(history[self.seen :], start=self.seen):
            if index == 0:
                plan = self.controller.plan
                self.write(
                    f"[step {entry['step']}] MSQ starts: regularizer and pruning on"
                    + (f", planned to reach the target by step {plan.reach_step}" if plan is not None else "")
                )
            elif entry.get("pruned") or entry.get("phase") == "final":
                pruned = entry.get("pruned") or []
                names = ", ".join(pruned[:3]) + (f" +{len(pruned) - 3} more" if len(pruned) > 3 else "")
                label = "pruned"
                if entry.get("phase") == "final":
                    label = "forced final round" if entry.get("forced") else "final round"
                self.write(
                    f"[step {entry['step']}] {label}: {entry['compression']:.2f}x, avg "
                    f"{entry['avg_bits']:.2f} bits" + (f" ({names})" if names else "")
                )
        self.seen = len(history)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        logs = logs or {}
        if any(k.startswith("eval_") for k in logs):
            acc = logs.get("eval_accuracy")
            self.write(
                f"[step {state.global_step}] eval: "
                + (f"accuracy {100 * acc:.2f}%, " if acc is not None else "")
                + f"loss {logs.get('eval_loss', float('nan')):.4f}"
            )
            return
        if "loss" not in logs:
            return  # the end-of-training summary dict (train_runtime...): the front end prints its own
        if state.global_step % max(args.logging_steps, 1) and state.global_step != state.max_steps:
            return  # forced log of a pruning step: already printed by on_step_end
        phase = _PHASE_NAMES.get(float(logs.get("msq/phase", -1)), "?")
        self.write(
            f"[step {state.global_step}/{state.max_steps}] loss {logs['loss']:.4f}, lr "
            f"{logs.get('learning_rate', 0):.4g}, {logs.get('msq/compression', 0):.2f}x, avg "
            f"{logs.get('msq/avg_bits', 0):.2f} bits, lambda {logs.get('msq/lambda', 0):.3g}, phase {phase}"
        )


def _silent_on_log(*args: Any, **kwargs: Any) -> None:
    return None


def attach_console(trainer: Trainer, controller: MSQController, write: Callable[[str], None] = print) -> None:
    """Replace the Trainer's log-dict printing with :class:`ConsoleCallback` lines (through the tqdm bar if any)."""
    progress = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)), None)

    def through_bar(line: str) -> None:
        bar = getattr(progress, "training_bar", None)
        (bar.write if bar is not None else write)(line)

    if progress is not None:
        progress.on_log = _silent_on_log  # keep its bars, drop its dict dump
    trainer.remove_callback(PrinterCallback)  # the disable_tqdm=True printer of whole log dicts
    trainer.add_callback(ConsoleCallback(controller, through_bar, progress))


__all__ = ["ConsoleCallback", "attach_console"]
