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

Why the feedback also listens to the nonzero rates. Raising lambda helps only while one step's pull stays within
the zero-LSB window of the grid: once ``eta * lambda`` moves weights by more than about a grid step per SGD step
(with momentum, more still), weights overshoot the window and the LSB nonzero rates *rise* again, however far
behind the plan the run is. Measured on the 390-step ResNet-20 benchmark at ``eta = 0.1``: the rates fell while
lambda grew to about 4, rose from there, and a feedback blind to them drove lambda to its cap (50) and the run
to 52-60 % accuracy (docs/results.md). So a step whose rates rose since the last one (same layers, same
``bits``/``k``: :func:`rate_change`) by more than ``rise_tolerance`` and more than sampling noise (three standard
deviations of the difference of two rates over that many weights, ``3 sqrt(0.5/N)``: a toy layer's rates jump
by several points between steps without any trend) divides lambda by ``gain`` instead.

Flat rates are ambiguous -- a pull too weak to beat the task gradient's noise, or one so strong that the weights
jump across the window every step and the LSBs stay at chance -- so where nothing clips the regularizer's
gradient the learning rate decides: lambda never exceeds :func:`pull_limit`, the value at which one plain SGD step
pulls the finest regularized layer by ``MAX_PULL`` grid steps (the controller knows the learning rate when its
trainer tells it: ``MSQCallback`` does when the Trainer does not clip the loss term). Without that bound, with the
regularizer's gradient added after the Trainer's clipping, the default ``msq-hf train`` run drove lambda to 50
and its loss from 0.7 to 3.8 within 60 steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MAX_PULL",
    "Pacer",
    "final_round_step",
    "PruningPlan",
    "k_flip_rate",
    "last_measurement",
    "pruning_share",
    "pull_limit",
    "rate_change",
    "smooth_sensitivities",
    "target_average_bits",
]


MAX_PULL = 0.25
"""Grid steps one plain SGD step (learning rate times gradient, before momentum) may pull the finest regularized
layer's weights. Measured on ResNet-20 with SGD momentum 0.9 (which multiplies a steady pull by ~10): the LSB
nonzero rates fell while ``lr * lambda`` stayed below 0.25-0.4 at 8 bits, and rose beyond."""


def target_average_bits(target_compression: float, count_sign_bit: bool = False) -> float:
    """The average magnitude bits per weight that ``target_compression`` asks for (the sign bit taken out when
    the target counts it)."""
    return 32.0 / target_compression - (1 if count_sign_bit else 0)


def pull_limit(
    learning_rate: float | None, regularized_bits: Sequence[int], units: str, shares: Sequence[float] | None = None
) -> float | None:
    """The largest lambda whose LSB pull moves a weight of every regularized layer (``regularized_bits``, pulled
    at ``shares`` of lambda, default 1 each) by at most :data:`MAX_PULL` of its grid steps per plain SGD step at
    ``learning_rate``: with equal shares the finest layer's (``max(regularized_bits)`` bits) bound.

    The pull is ``lr * share * lambda * 2^(n-8)`` grid steps in ``"scale"`` units and ``lr * share * lambda`` in
    ``"step"`` units (``msq_hf.quant.grid``); ``"code"``/``"value"`` units depend on the weights' scale, and an
    unknown learning rate or no regularized layer gives no limit (``None``).
    """
    if learning_rate is None or not learning_rate > 0 or not regularized_bits or units not in ("scale", "step"):
        return None
    shares = [1.0] * len(regularized_bits) if shares is None else shares
    per_lambda = learning_rate * max(
        w * (2.0 ** (n - 8) if units == "scale" else 1.0) for n, w in zip(regularized_bits, shares, strict=True)
    )
    return MAX_PULL / per_lambda if per_lambda > 0 else None  # every share 0: nothing is pulled


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
        rise_tolerance: a rise of the mean LSB nonzero rate above this (absolute) counts as overshooting.
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
        rise_tolerance: float = 0.01,
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
        self.rise_tolerance = float(rise_tolerance)
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
            target_bits=target_average_bits(config.target_compression, config.count_sign_bit),
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

    def update(
        self, step: int, avg_bits: float, rate_change: tuple[float, int] | None = None, limit: float | None = None
    ) -> float:
        """One feedback step after the pruning decision at ``step``; returns the new lambda.

        ``rate_change``: ``(change of the mean LSB nonzero rate, weights compared)`` since the previous update
        (:func:`rate_change`; ``None`` if no layer compares). Behind the plan: lambda divided by ``gain`` if the
        rates rose beyond :meth:`rise_limit` (the pull overshoots the zero-LSB window, see the module docstring), else
        times ``gain`` unless the run is catching up (the gap to the plan shrank since the last update) -- a
        run that is behind but pruning fast enough keeps its lambda, so lambda does not wind up while the weights
        are still catching up with it. More than ``tolerance_bits`` ahead: lambda divided by ``gain``. ``limit``
        (:func:`pull_limit`) caps the result (within the span).
        """
        last = self.last
        self.last = (int(step), float(avg_bits))
        if not (self.feedback and self.plan is not None and step >= self.plan.start_step):
            return self.strength
        gap = avg_bits - self.plan.planned_bits(step)  # > 0: more bits than planned, the run is behind
        if gap > 1e-9:
            since = last if last is not None and last[0] >= self.plan.start_step else None
            catching_up = since is not None and gap < since[1] - self.plan.planned_bits(since[0]) - 1e-9
            if rate_change is not None and rate_change[0] > self.rise_limit(rate_change[1]):
                self.multiplier = max(self.multiplier / self.gain, 1.0 / self.span)
            elif not catching_up:
                self.multiplier = min(self.multiplier * self.gain, self.span)
        elif gap < -self.tolerance_bits:
            self.multiplier = max(self.multiplier / self.gain, 1.0 / self.span)
        if limit is not None and self.base > 0:
            self.multiplier = max(min(self.multiplier, limit / self.base), 1.0 / self.span)
        return self.strength

    def rise_limit(self, weights: int) -> float:
        """Smallest rise of the mean nonzero rate over ``weights`` weights that counts as overshooting."""
        return max(self.rise_tolerance, 3.0 * math.sqrt(0.5 / max(int(weights), 1)))

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


def final_round_step(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The step of the final round (threshold or forced) in a controller history; ``None`` if it has not happened."""
    return next((int(entry["step"]) for entry in history if entry.get("phase") == "final"), None)


def last_measurement(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The last history entry's rates with the ``bits``/``k`` they were measured at (``None`` on an empty history).

    An entry records the precision *after* its decision, so its rates belong to the previous entry's precision
    (the start entry measured its own).
    """
    if not history:
        return None
    basis = history[-2] if len(history) > 1 else history[-1]
    return {"rates": history[-1]["rates"], "bits": basis["bits"], "k": basis["k"]}


def rate_change(
    before: Mapping[str, Any] | None, after: Mapping[str, Any], numels: Mapping[str, int]
) -> tuple[float, int] | None:
    """``(parameter-weighted mean change of the LSB nonzero rate, weights compared)`` between two measurements;
    ``None`` if no layer compares.

    ``before``/``after`` are ``{"rates": ..., "bits": ..., "k": ...}`` with the precision each rate was measured
    at; only layers with the same ``bits`` and ``k > 0`` in both count (a layer that was pruned or got a new
    ``k`` starts again near 0.5 and says nothing about the pull).
    """
    if before is None:
        return None
    weight, change = 0, 0.0
    for name, rate in after["rates"].items():
        same = before["bits"].get(name) == after["bits"][name] and before["k"].get(name) == after["k"][name]
        if same and after["k"][name] > 0 and name in before["rates"]:
            weight += int(numels[name])
            change += int(numels[name]) * (float(rate) - float(before["rates"][name]))
    return (change / weight, weight) if weight else None


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
