"""Pacing MSQ's gradual pruning: the planned trajectory, the lambda feedback, and what a run reports about it.

Pure Python (no torch), like :mod:`msq_hf.training.schedule`: the controller feeds numbers in and writes the
results back into the model.

Why a feedback on lambda. Threshold pruning drops a layer's ``k`` LSBs once fewer than ``tau`` of its codes
have them set, and the L1 regularizer is what empties them. How fast depends on the balance between its pull
(``eta * lambda * 2^(n-8)`` grid steps per SGD step in the default "scale" units) and the noise the task gradient
adds in grid steps, which shrinks as the learning rate decays. A fixed lambda is therefore too weak early (nothing
is pruned until the learning rate is small, and a forced round does the work) or too strong late. The feedback
keeps the compression close to a linear plan in average bits that reaches the target at ``target_fraction`` of
training, well before the forced round at ``final_round_fraction``: lambda is multiplied by ``gain`` at every
pruning step that finds the run behind the plan and not closing the gap, and divided by it when the run is more
than ``tolerance_bits`` ahead; the plan also caps how far one step may prune (:meth:`Pacer.floor_bits`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Pacer",
    "PruningPlan",
    "k_flip_rate",
    "pruning_share",
    "smooth_sensitivities",
]


@dataclass(frozen=True)
class PruningPlan:
    """Linear plan of the parameter-weighted average magnitude bits from ``start_bits`` at ``start_step`` down to
    ``target_bits`` at ``reach_step``."""

    start_step: int
    reach_step: int
    start_bits: float
    target_bits: float

    def __post_init__(self) -> None:
        if not self.reach_step > self.start_step >= 0:
            raise ValueError(
                f"PruningPlan: reach_step={self.reach_step} must be after start_step={self.start_step} >= 0"
            )

    def planned_bits(self, step: int) -> float:
        """Average bits the plan expects after ``step`` optimizer steps."""
        progress = min(max((step - self.start_step) / (self.reach_step - self.start_step), 0.0), 1.0)
        return self.start_bits + (self.target_bits - self.start_bits) * progress

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return asdict(self)


def _fraction_of(fraction: float, total_steps: int) -> int:
    # the first step at or after fraction * total_steps; rounded first so that 0.07 * 100 is step 7, not 8
    return math.ceil(round(fraction * total_steps, 9))


class Pacer:
    """Warm-up, planned trajectory, lambda feedback and sensitivity averaging of one MSQ run.

    Args:
        reg_strength: lambda at the start (``MSQConfig.reg_strength``).
        feedback: ``True`` for ``reg_control="trajectory"``; ``False`` keeps lambda fixed.
        gain: factor applied to lambda per pruning step when off-plan (> 1).
        warmup_fraction, target_fraction: where the run starts and where the plan reaches the target.
        target_bits: average magnitude bits that meet the target compression.
        hessian_ema: weight of the previous sensitivities in their moving average.
        tolerance_bits: how far ahead of the plan (in average bits) the run may be before lambda is lowered.
        span: lambda stays within ``[reg_strength / span, reg_strength * span]``.
    """

    def __init__(
        self,
        reg_strength: float,
        *,
        feedback: bool = True,
        gain: float = 1.5,
        warmup_fraction: float = 0.0,
        target_fraction: float = 1.0,
        target_bits: float = 2.0,
        hessian_ema: float = 0.0,
        tolerance_bits: float = 0.5,
        span: float = 100.0,
    ):
        if not (math.isfinite(reg_strength) and reg_strength >= 0):
            raise ValueError(f"Pacer: reg_strength={reg_strength!r} must be a finite number >= 0")
        if not (math.isfinite(gain) and gain > 1):
            raise ValueError(f"Pacer: gain={gain!r} must be a finite number > 1")
        self.base = float(reg_strength)
        self.feedback = bool(feedback)
        self.gain = float(gain)
        self.warmup_fraction = float(warmup_fraction)
        self.target_fraction = float(target_fraction)
        self.target_bits = float(target_bits)
        self.hessian_ema = float(hessian_ema)
        self.tolerance_bits = float(tolerance_bits)
        self.span = float(span)
        self.multiplier = 1.0
        self.plan: PruningPlan | None = None
        self.sensitivities: dict[str, float] | None = None  # the moving average
        self.last: tuple[int, float] | None = None  # (step, average bits) of the previous update

    @classmethod
    def from_config(cls, config: Any) -> Pacer:
        """The pacer of an ``MSQConfig`` (read by attribute: this module does not import the config)."""
        return cls(
            config.reg_strength,
            feedback=config.reg_control == "trajectory",
            gain=config.reg_gain,
            warmup_fraction=config.warmup_fraction,
            target_fraction=config.target_fraction,
            target_bits=32.0 / config.target_compression - (1 if config.count_sign_bit else 0),
            hessian_ema=config.hessian_ema,
        )

    @property
    def strength(self) -> float:
        """The lambda in use now."""
        return self.base * self.multiplier if self.feedback else self.base

    def warmup_step(self, total_steps: int | None) -> int:
        """Optimizer steps before MSQ starts (0 when the run length is unknown)."""
        return 0 if total_steps is None else _fraction_of(self.warmup_fraction, total_steps)

    def begin(self, step: int, total_steps: int | None, avg_bits: float) -> PruningPlan | None:
        """Fix the plan from ``avg_bits`` at ``step`` (the start) to the target at ``target_fraction`` (``None`` with a
        fixed lambda, an unknown run length, or a reach step not after the start)."""
        self.last = (int(step), float(avg_bits))
        reach = None if total_steps is None else _fraction_of(self.target_fraction, total_steps)
        usable = self.feedback and reach is not None and reach > step  # a fixed lambda follows no plan
        self.plan = PruningPlan(int(step), reach, avg_bits, self.target_bits) if usable else None
        return self.plan

    def floor_bits(self, step: int) -> float | None:
        """Lowest average bits threshold pruning may reach at ``step`` (the plan minus the tolerance; ``None``
        without feedback or plan): the schedule lets the rest of the candidates wait."""
        if not self.feedback or self.plan is None:
            return None
        return self.plan.planned_bits(step) - self.tolerance_bits

    def update(self, step: int, avg_bits: float) -> float:
        """One feedback step after the pruning decision at ``step``; returns the new lambda.

        Behind the plan and not catching up (the gap to the plan did not shrink since the last update): lambda
        times ``gain``. More than ``tolerance_bits`` ahead: lambda divided by ``gain``. Otherwise kept --
        a run that is behind but pruning fast enough keeps its lambda, so lambda does not wind up while the
        weights are still catching up with it.
        """
        last = self.last
        self.last = (int(step), float(avg_bits))
        if not (self.feedback and self.plan is not None and step >= self.plan.start_step):
            return self.strength
        gap = avg_bits - self.plan.planned_bits(step)  # > 0: more bits than planned, the run is behind
        if gap > 1e-9:
            since = last if last is not None and last[0] >= self.plan.start_step else None
            catching_up = since is not None and gap < since[1] - self.plan.planned_bits(since[0]) - 1e-9
            if not catching_up:
                self.multiplier = min(self.multiplier * self.gain, self.span)
        elif gap < -self.tolerance_bits:
            self.multiplier = max(self.multiplier / self.gain, 1.0 / self.span)
        return self.strength

    def smooth(self, fresh: Mapping[str, float]) -> dict[str, float]:
        """Fold freshly measured sensitivities into the moving average and return the average."""
        self.sensitivities = smooth_sensitivities(self.sensitivities, fresh, self.hessian_ema)
        return dict(self.sensitivities)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (the hyperparameters come from the config)."""
        return {
            "multiplier": self.multiplier,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "sensitivities": dict(self.sensitivities) if self.sensitivities is not None else None,
            "last": list(self.last) if self.last is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (an empty mapping resets to the start values)."""
        multiplier = float(state.get("multiplier", 1.0))
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"Pacer state: multiplier={multiplier!r} must be a positive number")
        self.multiplier = multiplier
        plan = state.get("plan")
        self.plan = PruningPlan(**plan) if plan else None
        average = state.get("sensitivities")
        self.sensitivities = {k: float(v) for k, v in average.items()} if average else None
        last = state.get("last")
        self.last = (int(last[0]), float(last[1])) if last else None


def smooth_sensitivities(
    previous: Mapping[str, float] | None, fresh: Mapping[str, float], keep: float
) -> dict[str, float]:
    """Exponential moving average ``keep * previous + (1 - keep) * fresh`` per layer (``fresh`` where new).

    A few Hutchinson probes give traces whose sign can flip between pruning steps; averaging across steps
    steadies the ``k`` decision at no extra Hessian cost. ``keep = 0`` returns ``fresh`` unchanged.
    """
    if not 0 <= keep < 1:
        raise ValueError(f"smooth_sensitivities: keep={keep!r} must be in [0, 1)")
    if not previous or keep == 0:
        return dict(fresh)
    return {
        name: keep * previous[name] + (1 - keep) * value if name in previous else value for name, value in fresh.items()
    }


def k_flip_rate(history: Sequence[Mapping[str, Any]], min_bits: int = 1) -> float | None:
    """How often a layer's ``k`` changed between consecutive assignments without the layer being pruned.

    Counts the (layer, pruning step) pairs where both ``k`` values were free choices (the layer had room for
    2 bits both times and both ``k`` are 1 or 2) and the layer was not pruned at that step; returns the
    fraction that changed, or ``None`` if there was no such pair. ``history`` is the controller's history.
    """
    changed = total = 0
    for before, after in zip(history, history[1:]):
        if after.get("phase") in ("final", "qat"):
            continue
        pruned = set(after.get("pruned", ()))
        for name, k_before in before["k"].items():
            k_after = after["k"].get(name, 0)
            free = (
                name not in pruned
                and k_before in (1, 2)
                and k_after in (1, 2)
                and after["bits"][name] - min_bits >= 2
                and before["bits"][name] - min_bits >= 2
            )
            if free:
                total += 1
                changed += k_before != k_after
    return changed / total if total else None


def pruning_share(history: Sequence[Mapping[str, Any]], numels: Mapping[str, int]) -> dict[str, float]:
    """Where the bit reduction came from: weighted bits removed by threshold steps vs the forced round.

    Returns ``{"threshold": bits, "forced": bits, "threshold_share": fraction in [0, 1] (1.0 when nothing was
    pruned), "forced_layers": layers touched by the forced round, "forced_max_drop": largest bits one layer
    lost in it}``. Bits are parameter-weighted averages (sum over layers of ``numel * drop`` over all weights).
    """
    total = sum(int(n) for n in numels.values()) or 1
    removed = {"threshold": 0.0, "forced": 0.0}
    forced_layers = 0
    forced_max = 0
    for before, after in zip(history, history[1:]):
        kind = "forced" if after.get("forced") else "threshold"
        for name, bits in after["bits"].items():
            drop = int(before["bits"][name]) - int(bits)
            if drop > 0:
                removed[kind] += drop * int(numels[name]) / total
                if kind == "forced":
                    forced_layers += 1
                    forced_max = max(forced_max, drop)
    both = removed["threshold"] + removed["forced"]
    return {
        "threshold": removed["threshold"],
        "forced": removed["forced"],
        "threshold_share": removed["threshold"] / both if both > 0 else 1.0,
        "forced_layers": float(forced_layers),
        "forced_max_drop": float(forced_max),
    }
