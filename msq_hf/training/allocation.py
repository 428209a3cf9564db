"""Which eligible layers lose bits first, and how a pruning pass lands on the target (see docs/pruning.md).

:mod:`msq_hf.training.schedule` decides *when* layers may prune and *which* are eligible (threshold candidates,
the plan's floor, the forced round); this module decides the *order* among them and where a pass stops. Pure
Python like the schedule, which imports it: no torch, no other msq_hf module. The schedule's target test and
ratio come in as two callables, ``reached(bits)`` and ``ratio(bits)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "PRUNE_ORDERS",
    "bit_cost",
    "cheapest_bits",
    "land",
    "order_words",
    "prune_order",
    "pull_weights",
    "uses_sensitivity",
]

PRUNE_ORDERS = ("rate", "sensitivity")

Bits = dict[str, int]
Reached = Callable[[Mapping[str, int]], bool]
Ratio = Callable[[Mapping[str, int]], float]


def bit_cost(sensitivity: float, numel: int, drop: int) -> float:
    """Estimated loss per stored bit saved by dropping ``drop`` LSBs of a layer of ``numel`` weights whose HAWQ-V2
    sensitivity at its current bits is ``sensitivity``: each dropped bit doubles the grid step, so the squared
    error and the sensitivity grow about ``4^drop`` times, by ``(4^drop - 1) S`` for ``numel * drop`` bits. A
    negative estimate (Hutchinson noise around a trace of about zero) ranks as the cheapest of all."""
    return math.inf if numel * drop <= 0 else (4**drop - 1) * sensitivity / (numel * drop)


def uses_sensitivity(order: str, sensitivities: Mapping[str, float] | None) -> bool:
    """Whether ``order`` ranks by :func:`bit_cost` here (``"sensitivity"`` with sensitivities given); ``ValueError``
    naming ``prune_order`` for an order that is not one of :data:`PRUNE_ORDERS`."""
    if order not in PRUNE_ORDERS:
        raise ValueError(f"prune_order={order!r} is not one of {', '.join(map(repr, PRUNE_ORDERS))}")
    return order == "sensitivity" and sensitivities is not None


def prune_order(
    names: Sequence[str],
    rates: Mapping[str, float],
    order: str,
    sensitivities: Mapping[str, float] | None,
    numels: Mapping[str, int],
    drops: Mapping[str, int],
) -> list[str]:
    """``names`` in the order they prune when only some may: fewest nonzero LSBs first (``"rate"``), or the least
    :func:`bit_cost` of dropping ``max(drops[name], 1)`` bits first (``"sensitivity"``; the rate order without
    sensitivities). Ties by rate, then by name: the order never depends on dict order."""
    if not uses_sensitivity(order, sensitivities):
        return sorted(names, key=lambda n: (rates[n], n))
    cost = {n: bit_cost(float(sensitivities[n]), numels[n], max(drops[n], 1)) for n in names}  # type: ignore[index]
    return sorted(names, key=lambda n: (cost[n], rates[n], n))


def order_words(order: str, sensitivities: Mapping[str, float] | None) -> str:
    """How :func:`prune_order` ranked, for the decision's ``reason``."""
    return "ascending Hessian cost/bit" if uses_sensitivity(order, sensitivities) else "ascending nonzero rate"


def land(
    bits: Mapping[str, int], order: Sequence[str], drops: Mapping[str, int], reached: Reached, ratio: Ratio
) -> tuple[Bits, list[str], bool]:
    """Prune ``order``'s layers in turn by ``drops[name]`` bits until the target is reached; ``(bits, pruned,
    reached)``. The prune that would cross the target is replaced by the crossing that overshoots least: the
    layer not pruned yet and drop (1 to its ``drops``) that reach the target by the smallest margin (ties: the
    earlier in ``order``). The first crossing can overshoot by a whole large layer's ``k`` bits; dropping fewer
    LSBs than ``k`` is safe, as all ``k`` had a low nonzero rate."""
    new_bits, pruned = dict(bits), []
    for index, name in enumerate(order):
        trial = {**new_bits, name: new_bits[name] - drops[name]}
        if not reached(trial):
            new_bits, pruned = trial, [*pruned, name]
            continue
        options = [(o, {**new_bits, o: new_bits[o] - d}) for o in order[index:] for d in range(1, drops[o] + 1)]
        crossings = [(ratio(b), i, o, b) for i, (o, b) in enumerate(options) if reached(b)]
        _, _, chosen, landed = min(crossings, key=lambda c: c[:2])
        return landed, [*pruned, chosen], True
    return new_bits, pruned, reached(new_bits)


def cheapest_bits(
    bits: Mapping[str, int],
    names: Sequence[str],
    min_bits: int,
    costs: tuple[Mapping[str, float], Mapping[str, float], Mapping[str, int]],
    reached: Reached,
    ratio: Ratio,
) -> tuple[Bits, list[str], bool]:
    """A greedy HAWQ-style allocation (the forced round in the sensitivity order): one bit at a time from the layer
    whose next bit costs least -- its sensitivity grows about 4x per bit it lost here -- until the target is
    reached, the crossing landed with the least overshoot (:func:`land`). ``costs`` is ``(sensitivities, rates,
    numels)``; returns ``(bits, pruned, reached)``."""
    sens, rates, numels = costs
    new_bits, pruned, lost = dict(bits), [], dict.fromkeys(names, 0)
    done = reached(new_bits)
    while not done and any(new_bits[name] > min_bits for name in names):
        cost = {name: bit_cost(float(sens[name]) * 4 ** lost[name], numels[name], 1) for name in names}
        order = sorted((n for n in names if new_bits[n] > min_bits), key=lambda n: (cost[n], rates[n], n))
        trial = {**new_bits, order[0]: new_bits[order[0]] - 1}
        if reached(trial):
            new_bits, newly, done = land(new_bits, order, dict.fromkeys(order, 1), reached, ratio)
        else:
            new_bits, newly = trial, order[:1]
        lost[newly[-1]] += 1
        pruned += [name for name in newly if name not in pruned]
    return new_bits, pruned, done


def pull_weights(
    bits: Mapping[str, int],
    min_bits: int,
    costs: tuple[Mapping[str, float], Mapping[str, float], Mapping[str, int]],
    reached: Reached,
    ratio: Ratio,
) -> dict[str, float]:
    """Each layer's share of lambda under ``lsb_pull="sensitivity"``: 1 for a layer that the greedy allocation of the
    target from ``bits`` now (:func:`cheapest_bits`, ``costs = (sensitivities, rates, numels)``) still takes bits
    from, 0 for a layer it keeps where it is. Threshold pruning then does the cutting -- the regularizer empties the
    LSBs of the layers the Hessian chose, the others keep theirs and stay above the threshold -- and the choice is
    re-made at every measurement, from the sensitivities at the bits reached."""
    names = [name for name in bits if bits[name] > min_bits]
    destination, _, _ = cheapest_bits(bits, names, min_bits, costs, reached, ratio)
    return {name: 1.0 if destination[name] < bits[name] else 0.0 for name in bits}
