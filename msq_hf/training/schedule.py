"""The MSQ bit-pruning decision (Algorithm 1 of MSQ; see docs/pruning.md).

Pure Python on purpose (no torch; of msq_hf only the pure :mod:`msq_hf.training.allocation`, which orders the layers
and lands each pass on the target; a test loads this file standalone): it only sees numbers -- per layer
``bits``, ``k``, ``numel``, LSB nonzero rate and HAWQ-V2 sensitivity -- and decides which layers drop bits,
identically on every rank given rank-reduced inputs. The controller measures the numbers and writes the decision
back. Contract of ``step(state, rates, sensitivities, global_step)``: ``state`` is every layer *before* this step,
``rates``/``sensitivities`` are measured at those bits, and the returned :class:`PruneDecision` carries the bits
after it and the ``k`` to regularize until the next step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from msq_hf.training.allocation import PRUNE_ORDERS, cheapest_bits, land, order_words, prune_order, uses_sensitivity

__all__ = ["BitPruningSchedule", "LayerState", "PruneDecision", "compression", "make_state"]

STATE_VERSION = 1
_SUPPORTED_BITS = (1, 8)  # same range as msq_hf.quant.functional.MIN_BITS..MAX_BITS (kept torch-free here)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Declared and validated in MSQConfig; this module stays importable without torch and msq_hf, so direct users get
# this minimal check of the same ranges (tests/test_config.py checks that both accept the same values).
_RULES = {
    "target_compression": (lambda v: _real(v) and v >= 1, "a finite number >= 1"),
    "prune_threshold": (lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)"),
    "min_bits": (lambda v: type(v) is int and _SUPPORTED_BITS[0] <= v <= _SUPPORTED_BITS[1], "an integer in 1..8"),
    "final_round_fraction": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "default_k": (lambda v: type(v) is int and v in (1, 2), "1 or 2"),
    "prune_order": (lambda v: v in PRUNE_ORDERS, "'rate' or 'sensitivity'"),
}
# hyperparameters recorded in state_dict (a resume with other values warns) and shown by repr
_HYPERPARAMETERS = (*_RULES, "count_sign_bit")


def compression(bits: Mapping[str, int], numels: Mapping[str, int], count_sign_bit: bool = False) -> float:
    """``C = 32 * sum_l N_l / sum_l b_l N_l`` (``b_l = bits_l`` or ``bits_l + 1``); the formula of
    :func:`msq_hf.quant.functional.compression_ratio`, repeated so that this module needs no torch."""
    if not bits:
        raise ValueError("compression needs at least one layer")
    extra = 1 if count_sign_bit else 0
    total = sum(int(numels[name]) for name in bits)
    stored = sum(int(numels[name]) * (int(b) + extra) for name, b in bits.items())
    if stored <= 0:
        raise ValueError(f"compression is undefined: the layers store {stored} bits (all numels zero?)")
    return 32.0 * total / stored


@dataclass(frozen=True)
class LayerState:
    """Pruning-relevant state of one quantized layer: precision, LSB count, number of weights."""

    bits: int
    k: int
    numel: int


def make_state(bits: Mapping[str, int], k: Mapping[str, int], numels: Mapping[str, int]) -> dict[str, LayerState]:
    """``{name: LayerState}`` from three ``{name: value}`` maps (keys of ``bits`` define the order)."""
    missing = [name for name in bits if name not in k or name not in numels]
    if missing:
        raise KeyError(f"make_state: layer(s) {missing[:5]} have bits but no k or numel")
    return {name: LayerState(int(bits[name]), int(k[name]), int(numels[name])) for name in bits}


@dataclass(frozen=True)
class PruneDecision:
    """What one pruning step decided (JSON round trip: ``PruneDecision(**decision.to_dict())``)."""

    bits: dict[str, int]  # precision of every layer after this step
    k: dict[str, int]  # LSBs to regularize (and test for pruning) until the next step; 0 = not regularized
    pruned: list[str]  # layers whose bits were lowered in this step, in the order they were pruned
    # "regularize" (ordinary step), "final" (this step was the final round), "qat" (finalized before: no change)
    phase: str
    compression: float  # compression ratio of ``bits``
    finalized: bool  # True from the final round on (regularizer and pruning are off)
    reason: str  # one human-readable sentence explaining the decision (for logs)
    step: int = 0  # the ``global_step`` the decision was taken at
    forced: bool = False  # True for the forced final round (the safety net), not threshold pruning

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)


class BitPruningSchedule:
    """MSQ's pruning rule: threshold pruning, Hessian-guided ``k``, a final round and a forced fallback.

    Args:
        target_compression: stop once ``C = 32 sum N / sum b N`` reaches this (>= 1).
        prune_threshold: a layer whose LSB nonzero rate is below this drops its ``k`` LSBs (0 < tau < 1).
        min_bits: no layer goes below this precision (1..8).
        count_sign_bit: count ``bits + 1`` per weight in ``C`` (what a sign-magnitude file stores).
        final_round_fraction: once ``global_step >= final_round_fraction * total_steps`` and the target is not
            reached, a final round over all layers is forced (0 < f <= 1).
        total_steps: optimizer steps of the run (``None`` disables the forced round); assignable later.
        default_k: ``k`` given to every layer when no sensitivities are available (1 or 2).
        prune_order: the order when only some layers may prune (:mod:`~msq_hf.training.allocation`): ``"rate"``
            or ``"sensitivity"`` (least Hessian cost per bit; the rate order without sensitivities).
    """

    def __init__(
        self,
        target_compression: float,
        prune_threshold: float,
        min_bits: int = 1,
        count_sign_bit: bool = False,
        final_round_fraction: float = 0.7,
        total_steps: int | None = None,
        default_k: int = 1,
        prune_order: str = "rate",
    ):
        given = {name: value for name, value in locals().items() if name in _RULES}  # the checked arguments
        for name, (ok, expected) in _RULES.items():
            if not ok(given[name]):
                raise ValueError(f"{name}={given[name]!r} is invalid: expected {expected}")
        self.target_compression = float(target_compression)
        self.prune_threshold = float(prune_threshold)
        self.min_bits = int(min_bits)
        self.count_sign_bit = bool(count_sign_bit)
        self.final_round_fraction = float(final_round_fraction)
        self.default_k = int(default_k)
        self.prune_order = prune_order
        self.total_steps = total_steps
        self._finalized_step: int | None = None  # set by the final round
        self._history: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, config: Any) -> BitPruningSchedule:
        """The schedule of an ``MSQConfig`` (read by attribute: this module does not import the config)."""
        names = ("min_bits", "count_sign_bit", "final_round_fraction", "default_k", "prune_order")
        fields = {name: getattr(config, name) for name in names}
        return cls(config.target_compression, config.prune_threshold, **fields)

    # -- configuration ----------------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the run (``None``: unknown, no forced final round)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"total_steps={value!r} is invalid: expected a positive integer or None")
        self._total_steps = value

    @property
    def finalized(self) -> bool:
        """True once the final round happened (every later :meth:`step` is a no-op)."""
        return self._finalized_step is not None

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every decision taken so far, as dicts (see :meth:`PruneDecision.to_dict`)."""
        return [dict(h) for h in self._history]

    def forced_round_due(self, global_step: int) -> bool:
        """Whether ``global_step`` is at or past the forced-final-round cut-off."""
        return self._total_steps is not None and global_step >= self.final_round_fraction * self._total_steps

    def compression(self, bits: Mapping[str, int], numels: Mapping[str, int]) -> float:
        """:func:`compression` with this schedule's sign-bit accounting."""
        return compression(bits, numels, self.count_sign_bit)

    def _reached(self, bits: Mapping[str, int], numels: Mapping[str, int]) -> bool:
        # relative slack: an exactly representable target (16.0, all at 2 bits) is reached despite float rounding
        return self.compression(bits, numels) >= self.target_compression * (1 - 1e-12)

    def _order(self, names: list[str], rates: Mapping[str, float], sens: Any, state: Any) -> list[str]:
        numels, ks = {n: state[n].numel for n in names}, {n: state[n].k for n in names}
        return prune_order(names, rates, self.prune_order, sens, numels, ks)

    def target_tests(self, numels: Mapping[str, int]) -> tuple[Any, Any]:
        """``reached(bits)`` and ``ratio(bits)`` of this target over ``numels``, as :mod:`.allocation` takes them."""
        return (lambda b: self._reached(b, numels)), (lambda b: self.compression(b, numels))

    # -- checks -----------------------------------------------------------------------------------
    def check_reachable(self, numels: Mapping[str, int]) -> None:
        """Raise ``ValueError`` if even every layer at ``min_bits`` cannot reach the target compression."""
        if not numels:
            raise ValueError("check_reachable: no quantized layers (empty numels)")
        bad = [name for name, n in numels.items() if int(n) < 0]
        if bad:
            raise ValueError(f"check_reachable: layer(s) {bad[:5]} have a negative numel")
        floor = dict.fromkeys(numels, self.min_bits)
        if not self._reached(floor, numels):
            best = self.compression(floor, numels)
            sign = " (sign bit counted)" if self.count_sign_bit else ""
            raise ValueError(
                f"target_compression={self.target_compression:g} is unreachable: with every quantized layer at "
                f"min_bits={self.min_bits}{sign} the best achievable compression is {best:.4f}x; lower "
                f"target_compression or min_bits"
            )

    def _validate_state(self, state: Mapping[str, LayerState]) -> None:
        if not state:
            raise ValueError("the schedule needs at least one layer (state is empty)")
        floor, hi = max(_SUPPORTED_BITS[0], self.min_bits), _SUPPORTED_BITS[1]
        for name, layer in state.items():
            if not isinstance(layer, LayerState):
                raise TypeError(f"state[{name!r}] must be a LayerState, got {type(layer).__name__}")
            if not floor <= layer.bits <= hi:
                raise ValueError(
                    f"layer {name!r} has bits={layer.bits}, outside {floor}..{hi} (min_bits={self.min_bits})"
                )
            if layer.k < 0 or (layer.k > 0 and layer.bits - layer.k < self.min_bits):
                raise ValueError(
                    f"layer {name!r} has k={layer.k} with bits={layer.bits}: expected 0 <= k <= "
                    f"bits - min_bits = {layer.bits - self.min_bits}"
                )
            if layer.numel < 0:
                raise ValueError(f"layer {name!r} has numel={layer.numel}: expected >= 0")

    # -- k assignment ---------------------------------------------------------------------------------
    def assign_k(self, bits: Mapping[str, int], sensitivities: Mapping[str, float] | None) -> dict[str, int]:
        """HAWQ-guided ``k`` per layer (MSQ §3.7).

        ``k = 1`` if ``S_l >= mean(S)`` (sensitive layers lose one bit at a time; equality counts as sensitive, with
        a 1e-9 relative tolerance so that all-equal sensitivities give ``k = 1`` everywhere despite float rounding of
        the mean), else ``k = 2``. The mean is the unweighted mean over *all* layers in ``bits``. ``k`` is capped at
        ``bits - min_bits``, so a layer at ``min_bits`` gets ``k = 0`` (frozen, not regularized). Without
        sensitivities every layer gets ``default_k`` (capped the same way).
        """
        room = {name: max(int(b) - self.min_bits, 0) for name, b in bits.items()}
        if sensitivities is None:
            return {name: min(self.default_k, room[name]) for name in bits}
        missing = [name for name in bits if name not in sensitivities]
        if missing:
            raise KeyError(f"assign_k: no sensitivity for layer(s) {missing[:5]} (got {len(sensitivities)} values)")
        values = {name: float(sensitivities[name]) for name in bits}
        bad = [name for name, s in values.items() if not math.isfinite(s)]
        if bad:
            raise ValueError(
                f"assign_k: sensitivity of layer(s) {bad[:5]} is not finite "
                f"({[values[n] for n in bad[:5]]}); the Hessian pass diverged"
            )
        mean = math.fsum(values.values()) / len(values) if values else 0.0
        sensitive = {name: s > mean or math.isclose(s, mean, rel_tol=1e-9, abs_tol=0.0) for name, s in values.items()}
        return {name: min(1 if sensitive[name] else 2, room[name]) for name in bits}

    # -- the step ---------------------------------------------------------------------------------
    def step(
        self,
        state: Mapping[str, LayerState],
        nonzero_rates: Mapping[str, float],
        sensitivities: Mapping[str, float] | None,
        global_step: int,
        floor_bits: float | None = None,
    ) -> PruneDecision:
        """Take one pruning decision (see the module docstring for the contract).

        ``floor_bits`` (the pacing plan, :mod:`msq_hf.training.pacing`): threshold candidates are pruned by
        ascending rate only while the parameter-weighted average bits stay at or above it; the rest wait.

        Order of the rules: (1) already finalized -> no-op ``"qat"``; (2) target already met -> finalize without
        pruning; (3) at/after the forced-round cut-off -> forced final round over all layers; (4) if pruning every
        candidate (rate < threshold, ``k >= 1``, ``bits - k >= min_bits``) reaches the target -> final round,
        candidates in the prune order up to the target, the crossing made by the candidate and drop that overshoot
        least (:func:`~msq_hf.training.allocation.land`); (5) otherwise prune every candidate and reassign ``k``.
        """
        self._validate_state(state)
        bits = {name: layer.bits for name, layer in state.items()}
        numels = {name: layer.numel for name, layer in state.items()}
        global_step = int(global_step)

        if self.finalized:
            reason = f"finalized at step {self._finalized_step}; plain QAT"
            k = dict.fromkeys(bits, 0)
            return PruneDecision(bits, k, [], "qat", self.compression(bits, numels), True, reason, global_step)
        if self._reached(bits, numels):
            reason = f"target {self.target_compression:g}x already met; no pruning needed"
            return self._record(bits, numels, [], reason, global_step)

        missing = [name for name in state if name not in nonzero_rates]
        if missing:
            raise KeyError(f"step: no LSB nonzero rate for layer(s) {missing[:5]}")
        rates = {name: float(nonzero_rates[name]) for name in state}
        bad = [name for name, r in rates.items() if math.isnan(r)]
        if bad:
            raise ValueError(f"step: LSB nonzero rate of layer(s) {bad[:5]} is NaN")

        if self.forced_round_due(global_step):
            return self._forced_round(state, rates, global_step, sensitivities)

        candidates = [
            name
            for name, layer in state.items()
            if rates[name] < self.prune_threshold and layer.k >= 1 and layer.bits - layer.k >= self.min_bits
        ]
        if floor_bits is not None:  # paced: the candidates with the fewest nonzero LSBs, down to the floor
            total, stored, paced = sum(numels.values()) or 1, sum(numels[n] * bits[n] for n in bits), []
            for name in self._order(candidates, rates, sensitivities, state):
                if (stored - numels[name] * state[name].k) / total >= floor_bits - 1e-9:
                    stored -= numels[name] * state[name].k
                    paced.append(name)
            candidates = paced
        after_all = {name: b - (state[name].k if name in candidates else 0) for name, b in bits.items()}
        if candidates and self._reached(after_all, numels):
            order = self._order(candidates, rates, sensitivities, state)
            new_bits, pruned, _ = land(bits, order, {name: state[name].k for name in order}, *self.target_tests(numels))
            reason = (
                f"final round: pruned {len(pruned)} of {len(candidates)} candidate(s) by "
                f"{order_words(self.prune_order, sensitivities)} until compression >= {self.target_compression:g}x"
            )
            return self._record(new_bits, numels, pruned, reason, global_step)

        new_k = self.assign_k(after_all, sensitivities)
        src = "sensitivities" if sensitivities is not None else f"default_k={self.default_k}"
        done = f"pruned {len(candidates)} layer(s)" if candidates else "no layer"
        reason = f"{done} with nonzero rate < {self.prune_threshold:g}; k from {src}"
        return self._record(after_all, numels, candidates, reason, global_step, new_k)

    def _forced_round(
        self, state: Mapping[str, LayerState], rates: dict[str, float], global_step: int, sens: Any
    ) -> PruneDecision:
        # all layers that can still lose a bit, in the prune order (threshold ignored)
        new_bits = {name: layer.bits for name, layer in state.items()}
        numels = {name: layer.numel for name, layer in state.items()}
        order = self._order([name for name in state if new_bits[name] > self.min_bits], rates, sens, state)
        pruned: list[str] = []
        drops = {name: max(state[name].k, 1) for name in order}  # first pass: the layer's own k (>= 1)
        reached, tests = self._reached(new_bits, numels), self.target_tests(numels)
        if uses_sensitivity(self.prune_order, sens):  # a greedy allocation, one bit at a time
            new_bits, pruned, reached = cheapest_bits(new_bits, order, self.min_bits, (sens, rates, numels), *tests)
        while not reached and any(new_bits[name] > self.min_bits for name in order):
            room = {name: min(drops[name], new_bits[name] - self.min_bits) for name in order}
            new_bits, newly, reached = land(new_bits, [n for n in order if room[n] > 0], room, *tests)
            pruned += [name for name in newly if name not in pruned]
            drops = dict.fromkeys(order, 1)  # later passes: one bit at a time
        cutoff = f"step {global_step} >= {self.final_round_fraction:g} * total_steps={self._total_steps}"
        outcome = f"pruned {len(pruned)} layer(s) by {order_words(self.prune_order, sens)}"
        missed = f"every layer is at min_bits={self.min_bits}, the target {self.target_compression:g}x still not met"
        reason = f"forced final round ({cutoff}): {outcome if reached else missed}"
        return self._record(new_bits, numels, pruned, reason, global_step, forced=True)

    def _record(
        self,
        bits: dict[str, int],
        numels: dict[str, int],
        pruned: list[str],
        reason: str,
        step: int,
        k: Any = None,
        forced: bool = False,
    ) -> PruneDecision:
        """Take and remember a decision: an ordinary step with ``k``, or (``k=None``) the final round."""
        if k is None:  # the final round: no layer is regularized any more
            self._finalized_step, k = step, dict.fromkeys(bits, 0)
        phase = "final" if self.finalized else "regularize"
        decision = PruneDecision(
            bits, k, list(pruned), phase, self.compression(bits, numels), self.finalized, reason, step, forced
        )
        self._history.append(decision.to_dict())
        return decision

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (finalized flag, step, history and the hyperparameters for a sanity check)."""
        return {
            "version": STATE_VERSION,
            "finalized": self.finalized,
            "finalized_step": self._finalized_step,
            "history": self.history,
            "hyperparameters": {key: getattr(self, key) for key in _HYPERPARAMETERS},
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Warns if the stored hyperparameters differ from this schedule's."""
        version = d.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"BitPruningSchedule state version {version!r} is not supported (expected {STATE_VERSION})"
            )
        stored = d.get("hyperparameters", {})
        changed = {key: (stored[key], getattr(self, key)) for key in _HYPERPARAMETERS if key in stored}
        changed = {key: pair for key, pair in changed.items() if pair[0] != pair[1]}
        if changed:
            warnings.warn(
                "BitPruningSchedule: resuming with changed hyperparameter(s) "
                + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()),
                stacklevel=2,
            )
        step = d.get("finalized_step")
        # a finalized state from before finalized_step was recorded counts as finalized at step 0
        self._finalized_step = (int(step) if step is not None else 0) if d["finalized"] else None
        self._history = [dict(h) for h in d.get("history", [])]

    def __repr__(self) -> str:
        fields = [f"{key}={getattr(self, key)!r}" for key in (*_HYPERPARAMETERS, "total_steps", "finalized")]
        return f"BitPruningSchedule({', '.join(fields)})"
