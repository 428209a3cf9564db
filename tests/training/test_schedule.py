"""Tests of the pure-Python pruning decision (msq_hf/training/schedule.py)."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msq_hf.quant import functional as QF
from msq_hf.training.allocation import bit_cost
from msq_hf.training.schedule import BitPruningSchedule, LayerState, PruneDecision, compression, make_state

SCHEDULE_PY = pathlib.Path(__file__).resolve().parents[2] / "msq_hf" / "training" / "schedule.py"
ALLOCATION_PY = SCHEDULE_PY.with_name("allocation.py")
# what loading the schedule may import of msq_hf: the lazy package (no torch) and the pure allocation module
PURE_MSQ_MODULES = {"msq_hf", "msq_hf.lazy", "msq_hf.training", "msq_hf.training.allocation"}


def sched(target: float = 16.0, tau: float = 0.05, **kw) -> BitPruningSchedule:
    return BitPruningSchedule(target_compression=target, prune_threshold=tau, **kw)


def state_of(bits: dict[str, int], k: dict[str, int] | int = 1, numels: dict[str, int] | int = 100):
    ks = k if isinstance(k, dict) else {n: k for n in bits}
    ns = numels if isinstance(numels, dict) else {n: numels for n in bits}
    return make_state(bits, ks, ns)


# ---------------------------------------------------------------------------------------------
# torch-free
# ---------------------------------------------------------------------------------------------


def test_schedule_module_does_not_import_torch():
    # msq_hf/__init__ imports torch, so load schedule.py as a standalone module in a fresh interpreter;
    # this proves the file itself (and anything it imports) is torch-free.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('msq_schedule_standalone', {str(SCHEDULE_PY)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
        "s = mod.BitPruningSchedule(16.0, 0.05)\n"
        "d = s.step(mod.make_state({'a': 8}, {'a': 1}, {'a': 10}), {'a': 0.0}, None, 1)\n"
        "assert d.bits == {'a': 7}, d\n"
        "print('torch' in sys.modules, sorted(m for m in sys.modules if m.startswith('msq_hf')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_loaded, msq_modules = out.stdout.split(" ", 1)
    assert torch_loaded == "False"
    assert set(ast.literal_eval(msq_modules)) <= PURE_MSQ_MODULES


@pytest.mark.parametrize("path", [SCHEDULE_PY, ALLOCATION_PY], ids=lambda p: p.name)
def test_schedule_source_imports_only_the_standard_library_and_the_allocation(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else node.module)
    stdlib = {"__future__", "collections.abc", "itertools", "math", "warnings", "dataclasses", "typing"}
    allowed = stdlib | ({"msq_hf.training.allocation"} - {f"msq_hf.training.{path.stem}"})  # never itself
    assert imported <= allowed, imported


# ---------------------------------------------------------------------------------------------
# compression formula
# ---------------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 10_000)), min_size=1, max_size=8), st.booleans())
def test_compression_matches_functional(layers, sign):
    bits = {f"l{i}": b for i, (b, _) in enumerate(layers)}
    numels = {f"l{i}": n for i, (_, n) in enumerate(layers)}
    expected = QF.compression_ratio([n for _, n in layers], [b for b, _ in layers], sign)
    assert compression(bits, numels, sign) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# k rule
# ---------------------------------------------------------------------------------------------


def test_k_above_mean_is_1_below_is_2():
    s = sched()
    k = s.assign_k({"a": 8, "b": 8, "c": 8}, {"a": 3.0, "b": 1.0, "c": 0.5})
    # mean = 1.5: a is above, b and c below
    assert k == {"a": 1, "b": 2, "c": 2}


def test_k_equal_to_mean_goes_to_1():
    s = sched()
    # mean exactly 2.0 = b
    assert s.assign_k({"a": 8, "b": 8, "c": 8}, {"a": 3.0, "b": 2.0, "c": 1.0}) == {"a": 1, "b": 1, "c": 2}


@pytest.mark.parametrize("value, count", [(0.1, 3), (0.1, 6), (0.7, 3), (1e-30, 5), (7.3, 7), (0.0, 4)])
def test_k_all_equal_sensitivities_is_1_everywhere(value, count):
    # fsum([0.1] * 3) / 3 == 0.10000000000000002 > 0.1: the rule must still see equality
    names = [f"l{i}" for i in range(count)]
    k = sched().assign_k({n: 8 for n in names}, {n: value for n in names})
    assert set(k.values()) == {1}


def test_k_capped_by_min_bits_and_zero_at_min_bits():
    s = sched(min_bits=2)
    k = s.assign_k({"a": 3, "b": 2, "c": 8, "d": 4}, {"a": 0.0, "b": 0.0, "c": 10.0, "d": 0.0})
    # a: below mean -> 2, capped to 3-2 = 1; b at min_bits -> 0; c above mean -> 1; d below -> 2
    assert k == {"a": 1, "b": 0, "c": 1, "d": 2}


def test_k_without_sensitivities_uses_default_k():
    assert sched(default_k=2).assign_k({"a": 8, "b": 2, "c": 1}, None) == {"a": 2, "b": 1, "c": 0}
    assert sched().assign_k({"a": 8, "b": 1}, None) == {"a": 1, "b": 0}


def test_k_missing_or_nonfinite_sensitivity_names_layer():
    with pytest.raises(KeyError, match="'b'"):
        sched().assign_k({"a": 8, "b": 8}, {"a": 1.0})
    with pytest.raises(ValueError, match="'b'"):
        sched().assign_k({"a": 8, "b": 8}, {"a": 1.0, "b": float("nan")})


def test_mean_includes_frozen_layers():
    # documented choice: the mean is over all layers (a frozen, very sensitive layer raises it)
    k = sched().assign_k({"a": 8, "b": 8, "frozen": 1}, {"a": 2.0, "b": 1.0, "frozen": 30.0})
    assert k == {"a": 2, "b": 2, "frozen": 0}


# ---------------------------------------------------------------------------------------------
# validation and reachability
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target_compression": 0.5}, "target_compression"),
        ({"target_compression": float("inf")}, "target_compression"),
        ({"prune_threshold": 0.0}, "prune_threshold"),
        ({"prune_threshold": 1.0}, "prune_threshold"),
        ({"min_bits": 0}, "min_bits"),
        ({"min_bits": 9}, "min_bits"),
        ({"final_round_fraction": 0.0}, "final_round_fraction"),
        ({"final_round_fraction": 1.5}, "final_round_fraction"),
        ({"total_steps": 0}, "total_steps"),
        ({"default_k": 3}, "default_k"),
        ({"prune_order": "cost"}, "prune_order"),
    ],
)
def test_constructor_rejects_bad_values(kwargs, field):
    args = {"target_compression": 16.0, "prune_threshold": 0.05, **kwargs}
    with pytest.raises(ValueError, match=field):
        BitPruningSchedule(**args)


def test_unreachable_target_raises_with_best_ratio():
    s = sched(target=20.0, min_bits=2)
    with pytest.raises(ValueError, match=r"20.*16\.0000"):
        s.check_reachable({"a": 10, "b": 1000})
    sched(target=16.0, min_bits=2).check_reachable({"a": 10, "b": 1000})  # exactly reachable: fine
    with pytest.raises(ValueError, match="sign bit"):
        sched(target=16.5, count_sign_bit=True).check_reachable({"a": 10})


def test_state_validation_names_layer():
    s = sched(min_bits=2)
    with pytest.raises(ValueError, match="'x'"):
        s.step(state_of({"x": 1}), {"x": 0.0}, None, 1)
    with pytest.raises(ValueError, match="'y'"):
        s.step(state_of({"y": 3}, k=2), {"y": 0.0}, None, 1)
    with pytest.raises(KeyError, match="'z'"):
        s.step(state_of({"a": 8, "z": 8}), {"a": 0.0}, None, 1)


# ---------------------------------------------------------------------------------------------
# regular steps
# ---------------------------------------------------------------------------------------------


def test_regular_step_prunes_all_candidates_and_reassigns_k():
    s = sched(target=16.0, tau=0.05)
    st0 = state_of({"a": 8, "b": 8, "c": 8, "d": 2}, k={"a": 1, "b": 2, "c": 1, "d": 1})
    d = s.step(st0, {"a": 0.01, "b": 0.02, "c": 0.5, "d": 0.0}, {"a": 5.0, "b": 0.1, "c": 0.1, "d": 0.1}, 10)
    assert d.phase == "regularize" and not d.finalized
    assert d.bits == {"a": 7, "b": 6, "c": 8, "d": 1}
    assert d.pruned == ["a", "b", "d"]
    # mean S = 1.325: a -> 1, b, c -> 2, d at min_bits -> 0
    assert d.k == {"a": 1, "b": 2, "c": 2, "d": 0}
    assert d.compression == pytest.approx(compression(d.bits, {n: 100 for n in d.bits}))


def test_candidate_needs_k_and_room():
    s = sched(target=16.0, tau=0.05, min_bits=2)
    st0 = state_of({"a": 8, "b": 2, "c": 8}, k={"a": 0, "b": 0, "c": 1})
    d = s.step(st0, {"a": 0.0, "b": 0.0, "c": 0.06}, None, 5)
    assert d.pruned == [] and d.bits == {"a": 8, "b": 2, "c": 8}
    assert d.k == {"a": 1, "b": 0, "c": 1}  # k reassigned (default_k) every step


def test_rate_equal_to_threshold_is_not_pruned():
    d = sched(tau=0.05).step(state_of({"a": 8, "b": 8}), {"a": 0.05, "b": 0.0499}, None, 1)
    assert d.pruned == ["b"]


def test_everything_at_min_bits_finalizes_when_target_met_and_not_otherwise():
    # all at min_bits=1 -> 32x >= 16x: already met
    s = sched(target=16.0)
    d = s.step(state_of({"a": 1, "b": 1}, k=0), {"a": 0.0, "b": 0.0}, None, 1)
    assert d.finalized and d.phase == "final" and d.pruned == [] and d.k == {"a": 0, "b": 0}


def test_target_met_at_start_finalizes_immediately():
    s = sched(target=4.0)
    d = s.step(state_of({"a": 8, "b": 8}), {"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 2.0}, 0)
    assert d.finalized and d.bits == {"a": 8, "b": 8} and d.pruned == [] and "already met" in d.reason
    assert s.finalized


# ---------------------------------------------------------------------------------------------
# final round
# ---------------------------------------------------------------------------------------------


def test_final_round_stops_at_first_crossing():
    # four equal layers at 3 bits, target 32/2.5 = 12.8 -> average must reach 2.5 bits
    s = sched(target=12.8, tau=0.5)
    st0 = state_of({"a": 3, "b": 3, "c": 3, "d": 3}, k=1)
    rates = {"a": 0.3, "b": 0.1, "c": 0.2, "d": 0.4}
    d = s.step(st0, rates, None, 7)
    # pruning all four would give 2 bits (16x) >= 12.8 -> final round; lowest rates first: b, c
    assert d.phase == "final" and d.finalized
    assert d.pruned == ["b", "c"]
    assert d.bits == {"a": 3, "b": 2, "c": 2, "d": 3}
    assert d.compression == pytest.approx(12.8)
    assert d.k == {n: 0 for n in st0}


def test_final_round_lands_just_above_target():
    s = sched(target=10.0, tau=0.5)
    st0 = state_of({f"l{i}": 4 for i in range(10)}, k=1, numels={f"l{i}": 10 * (i + 1) for i in range(10)})
    rates = {f"l{i}": 0.01 * i for i in range(10)}
    d = s.step(st0, rates, None, 1)
    assert d.finalized and d.compression >= 10.0
    # undoing the last pruned layer would fall below the target
    last = d.pruned[-1]
    undo = dict(d.bits, **{last: d.bits[last] + 1})
    assert compression(undo, {n: x.numel for n, x in st0.items()}) < 10.0


def first_crossing(bits: dict[str, int], numels: dict[str, int], order: list[str], drops: dict[str, int], target):
    """The rule before the least-overshoot landing: prune in order, stop at the first crossing (reference)."""
    bits = dict(bits)
    for name in order:
        bits[name] -= drops[name]
        if compression(bits, numels) >= target:
            break
    return bits


def test_final_round_crosses_with_the_least_overshoot():
    # all at 4 bits (8x), target 8.1x: "big" has the lowest rate, but its k = 2 bits overshoot to 10.5x (the
    # first-crossing rule); "small" dropping its 2 bits lands at 32 * 2100 / 8200 = 8.195x
    s = sched(target=8.1, tau=0.5)
    numels = {"big": 1000, "mid": 1000, "small": 100}
    ks = {"big": 2, "mid": 1, "small": 2}
    rates = {"big": 0.1, "mid": 0.2, "small": 0.3}
    d = s.step(state_of(dict.fromkeys(numels, 4), k=ks, numels=numels), rates, None, 3)
    assert d.finalized and d.phase == "final" and not d.forced
    assert compression(first_crossing(dict.fromkeys(numels, 4), numels, list(rates), ks, 8.1), numels) == 10.5
    assert d.bits == {"big": 4, "mid": 4, "small": 2} and d.pruned == ["small"]
    assert d.compression == pytest.approx(32 * 2100 / 8200)


def test_final_round_may_drop_fewer_bits_than_k_at_the_crossing():
    # one layer, k = 2: dropping 1 bit already reaches 32/7 = 4.57x; the first-crossing rule dropped both (5.33x)
    s = sched(target=4.5, tau=0.5)
    d = s.step(state_of({"a": 8}, k=2, numels=1000), {"a": 0.1}, None, 1)
    assert d.finalized and d.bits == {"a": 7} and d.pruned == ["a"] and d.compression == pytest.approx(32 / 7)


def test_forced_round_crosses_with_the_least_overshoot():
    # forced round at 8 bits (4x), target 4.1x: the first pass would drop a's own k = 2 (4.91x); one bit of it
    # is enough (32 * 2010 / 15080 = 4.27x) and the tiny c cannot cross at all
    s = sched(target=4.1, tau=0.01, total_steps=10, final_round_fraction=0.5)
    numels = {"a": 1000, "b": 1000, "c": 10}
    d = s.step(state_of({"a": 8, "b": 8, "c": 8}, k=2, numels=numels), {"a": 0.1, "b": 0.2, "c": 0.3}, None, 5)
    assert d.forced and d.bits == {"a": 7, "b": 8, "c": 8} and d.pruned == ["a"]
    assert d.compression == pytest.approx(32 * 2010 / 15080)


def test_forced_round_later_pass_lands_with_the_least_overshoot():
    # the first pass (k = 1 each) leaves 7 bits (4.57x < 4.6x); in the second pass a's bit would give the
    # first-crossing rule's 4.99x, c's lands at 32 * 1700 / 11800 = 4.61x
    s = sched(target=4.6, tau=0.01, total_steps=10, final_round_fraction=0.5)
    numels = {"a": 1000, "b": 600, "c": 100}
    d = s.step(state_of(dict.fromkeys(numels, 8), k=1, numels=numels), {"a": 0.1, "b": 0.2, "c": 0.3}, None, 5)
    assert d.forced and d.bits == {"a": 7, "b": 7, "c": 6} and d.pruned == ["a", "b", "c"]
    assert d.compression == pytest.approx(32 * 1700 / 11800)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(2, 8), st.integers(1, 2), st.integers(1, 5000), st.floats(0, 0.49)),
             min_size=1, max_size=8),
    st.floats(0.001, 1.0),
)  # fmt: skip
def test_landing_reaches_the_target_and_never_overshoots_more_than_the_first_crossing(layers, position):
    state = {f"l{i}": LayerState(b, min(k, b - 1), n) for i, (b, k, n, _) in enumerate(layers)}
    rates = {f"l{i}": r for i, (*_, r) in enumerate(layers)}
    bits = {n: x.bits for n, x in state.items()}
    numels = {n: x.numel for n, x in state.items()}
    order = sorted(state, key=lambda n: (rates[n], n))
    drops = {n: x.k for n, x in state.items()}
    after_all = {n: bits[n] - drops[n] for n in bits}
    # a target between the start and all candidates pruned: rule (4), the final round, always applies
    start, floor = compression(bits, numels), compression(after_all, numels)
    target = start + position * (floor - start)
    if target <= start * (1 + 1e-9):
        return
    d = sched(target=target, tau=0.5).step(make_state(bits, drops, numels), rates, None, 1)
    assert d.finalized and target * (1 - 1e-12) <= d.compression
    assert d.compression <= compression(first_crossing(bits, numels, order, drops, target), numels) + 1e-9
    assert all(bits[n] - drops[n] <= d.bits[n] <= bits[n] for n in bits)
    assert set(d.pruned) == {n for n in bits if d.bits[n] < bits[n]}


def test_final_round_tie_order_is_by_name():
    s1, s2 = sched(target=12.8, tau=0.5), sched(target=12.8, tau=0.5)
    bits = {"zeta": 3, "alpha": 3, "mid": 3, "beta": 3}
    rates = {n: 0.1 for n in bits}
    d1 = s1.step(state_of(bits), rates, None, 1)
    # same layers inserted in another order give the same decision
    d2 = s2.step(state_of(dict(reversed(list(bits.items())))), rates, None, 1)
    assert d1.pruned == d2.pruned == ["alpha", "beta"]
    assert d1.bits == d2.bits


def test_no_op_after_finalize():
    s = sched(target=12.8, tau=0.5)
    st0 = state_of({"a": 3, "b": 3, "c": 3, "d": 3})
    d = s.step(st0, {n: 0.0 for n in st0}, None, 1)
    assert d.finalized
    st1 = make_state(d.bits, d.k, {n: 100 for n in d.bits})
    for step in (2, 3, 1000):
        e = s.step(st1, {n: 0.0 for n in st0}, {n: 1.0 for n in st0}, step)
        assert e.phase == "qat" and e.finalized and e.pruned == [] and e.bits == d.bits
        assert e.k == {n: 0 for n in st0}


# ---------------------------------------------------------------------------------------------
# forced final round (fallback)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# prune order (prune_order="sensitivity": least Hessian cost per stored bit saved first)
# ---------------------------------------------------------------------------------------------


@given(st.floats(-1e3, 1e3, allow_nan=False), st.integers(1, 10**7), st.integers(1, 2), st.floats(0.01, 100))
def test_bit_cost_is_the_error_growth_per_bit_saved(sens, numel, drop, scale):
    assert bit_cost(sens, numel, drop) == pytest.approx((4**drop - 1) * sens / (numel * drop), rel=1e-12)
    # linear in the sensitivity: scaling every layer's S scales every cost alike, so the order is unchanged
    assert bit_cost(sens * scale, numel, drop) == pytest.approx(scale * bit_cost(sens, numel, drop), rel=1e-9, abs=0)


def test_bit_cost_of_a_layer_that_saves_nothing_is_infinite():
    assert bit_cost(1.0, 0, 2) == float("inf") and bit_cost(1.0, 10, 0) == float("inf")


# a large insensitive layer and three small sensitive ones; the rates say the opposite order
ORDER_BITS = {"big": 8, "s1": 8, "s2": 8, "s3": 8}
ORDER_NUMELS = {"big": 300, "s1": 100, "s2": 100, "s3": 100}
ORDER_RATES = {"big": 0.04, "s1": 0.01, "s2": 0.02, "s3": 0.03}
ORDER_SENS = {"big": 1e-9, "s1": 1e-3, "s2": 1e-4, "s3": 1e-5}


def test_sensitivity_order_lets_the_cheapest_layer_prune_first_under_the_floor():
    state = state_of(ORDER_BITS, k=2, numels=ORDER_NUMELS)
    by_rate = sched(tau=0.05).step(state, ORDER_RATES, ORDER_SENS, 1, floor_bits=6.9)
    by_cost = sched(tau=0.05, prune_order="sensitivity").step(state, ORDER_RATES, ORDER_SENS, 1, floor_bits=6.9)
    # the floor lets 1.1 bits of 8 go: the rate order spends it on the small sensitive layers
    assert by_rate.pruned == ["s1", "s2", "s3"]
    assert by_cost.pruned == ["big"] and by_cost.bits == {**ORDER_BITS, "big": 6}


def test_sensitivity_order_drives_the_final_and_the_forced_round():
    state = state_of(ORDER_BITS, k=1, numels=ORDER_NUMELS)
    target = compression({**ORDER_BITS, "big": 7, "s3": 7}, ORDER_NUMELS)
    final = sched(target=target, tau=0.05, prune_order="sensitivity").step(state, ORDER_RATES, ORDER_SENS, 1)
    assert final.finalized and final.pruned == ["big", "s3"] and "Hessian cost" in final.reason
    forced = sched(target=16.0, tau=0.001, total_steps=10, prune_order="sensitivity")
    decision = forced.step(state, ORDER_RATES, ORDER_SENS, 7)
    assert decision.forced and decision.pruned[0] == "big" and decision.compression >= 16.0
    # the big layer reaches min_bits before the most sensitive one loses a single bit more than it must
    assert decision.bits["big"] == 1 and decision.bits["s1"] == max(decision.bits.values())


def test_sensitivity_order_counts_the_drop_and_falls_back_to_rates_without_sensitivities():
    # equal S and N: a layer dropping 2 LSBs costs (4^2 - 1)/2 = 7.5 per bit, one dropping 1 costs 3
    state = state_of({"a": 8, "b": 8}, k={"a": 2, "b": 1}, numels=100)
    rates = {"a": 0.01, "b": 0.02}
    s = sched(target=compression({"a": 8, "b": 7}, {"a": 100, "b": 100}), tau=0.05, prune_order="sensitivity")
    assert s.step(state, rates, {"a": 1.0, "b": 1.0}, 1).pruned == ["b"]
    s = sched(target=compression({"a": 8, "b": 7}, {"a": 100, "b": 100}), tau=0.05, prune_order="sensitivity")
    blind = s.step(state, rates, None, 1)
    assert blind.pruned == ["a"] and "nonzero rate" in blind.reason


def test_an_unknown_order_is_refused_by_name():
    from msq_hf.training.allocation import prune_order

    with pytest.raises(ValueError, match="prune_order='cost' is not one of 'rate', 'sensitivity'"):
        prune_order(["a"], {"a": 0.1}, "cost", None, {"a": 1}, {"a": 1})


def test_from_config_reads_every_schedule_field():
    from msq_hf import MSQConfig

    config = MSQConfig(target_compression=12.0, prune_threshold=0.2, min_bits=2, prune_order="sensitivity")
    s = BitPruningSchedule.from_config(config)
    assert (s.target_compression, s.prune_threshold, s.min_bits, s.prune_order) == (12.0, 0.2, 2, "sensitivity")
    assert (s.count_sign_bit, s.final_round_fraction, s.default_k) == (False, 0.7, 1)


def test_fallback_not_before_fraction():
    s = sched(target=16.0, tau=0.01, total_steps=100, final_round_fraction=0.7)
    st0 = state_of({"a": 8, "b": 8})
    d = s.step(st0, {"a": 0.5, "b": 0.5}, None, 69)
    assert d.phase == "regularize" and d.bits == {"a": 8, "b": 8}
    assert not s.forced_round_due(69) and s.forced_round_due(70)


def test_fallback_at_fraction_reaches_target_ignoring_threshold():
    s = sched(target=16.0, tau=0.01, total_steps=100, final_round_fraction=0.7)
    st0 = state_of({"a": 8, "b": 8, "c": 8}, k={"a": 1, "b": 2, "c": 1}, numels={"a": 100, "b": 100, "c": 100})
    d = s.step(st0, {"a": 0.5, "b": 0.3, "c": 0.9}, None, 70)
    assert d.finalized and d.phase == "final" and "forced" in d.reason
    assert d.compression >= 16.0
    assert all(b >= 1 for b in d.bits.values())
    # lowest rate first: b is pruned first, then a, then c
    assert d.pruned[:3] == ["b", "a", "c"]
    # target 16 = 2 bits on average; stops exactly at the first crossing
    numels = {n: 100 for n in st0}
    assert sum(d.bits.values()) == 6
    assert compression(d.bits, numels) == pytest.approx(16.0)


def test_fallback_repeated_passes_never_below_min_bits():
    s = sched(target=32 / 2.2, tau=0.01, min_bits=2, total_steps=10, final_round_fraction=0.5)
    st0 = state_of({"a": 8, "b": 3, "c": 6}, k=1, numels={"a": 1000, "b": 10, "c": 10})
    d = s.step(st0, {"a": 0.9, "b": 0.1, "c": 0.2}, None, 9)
    assert d.finalized and d.compression >= 32 / 2.2 and min(d.bits.values()) >= 2
    assert d.bits["a"] == 2  # the big layer had to go down several bits


def test_fallback_later_passes_drop_one_bit_at_a_time():
    # first pass drops k=2 (8 -> 6, 5.33x); the second pass drops 1 bit (6 -> 5 = 6.4x), not 2 (-> 4 = 8x)
    s = sched(target=6.4, tau=0.01, total_steps=10)
    d = s.step(state_of({"a": 8}, k=2, numels=1000), {"a": 0.5}, None, 7)
    assert d.finalized and d.bits == {"a": 5} and d.compression == pytest.approx(6.4)


def test_fallback_unreachable_finalizes_at_min_bits():
    # check_reachable was skipped: the forced round takes everything to min_bits and says so
    s = sched(target=16.0, tau=0.01, min_bits=2, total_steps=10)
    s.target_compression = 20.0
    d = s.step(state_of({"a": 5, "b": 4}), {"a": 0.5, "b": 0.5}, None, 10)
    assert d.finalized and d.bits == {"a": 2, "b": 2} and "still not met" in d.reason


def test_no_fallback_without_total_steps():
    s = sched(target=16.0, tau=0.01)
    d = s.step(state_of({"a": 8}), {"a": 0.5}, None, 10**9)
    assert d.phase == "regularize" and not d.finalized


# ---------------------------------------------------------------------------------------------
# state_dict round trip
# ---------------------------------------------------------------------------------------------


def _simulate(schedule: BitPruningSchedule, state: dict[str, LayerState], steps: range, seed: int):
    """Deterministic pseudo-random rates/sensitivities; returns the decisions and the final state."""
    import random

    decisions = []
    for step in steps:
        rng = random.Random(seed * 1000 + step)
        rates = {n: rng.random() * 0.1 for n in state}
        sens = {n: rng.random() for n in state}
        d = schedule.step(state, rates, sens, step)
        decisions.append(d)
        state = make_state(d.bits, d.k, {n: x.numel for n, x in state.items()})
    return decisions, state


def test_state_dict_round_trip_gives_identical_decisions():
    numels = {f"l{i}": 50 * (i + 1) for i in range(6)}
    init = make_state({n: 8 for n in numels}, {n: 1 for n in numels}, numels)
    ref = sched(target=12.0, tau=0.03, total_steps=40)
    ref_dec, _ = _simulate(ref, init, range(1, 41), seed=3)

    first = sched(target=12.0, tau=0.03, total_steps=40)
    dec_a, mid = _simulate(first, init, range(1, 13), seed=3)
    saved = json.loads(json.dumps(first.state_dict()))  # really JSON-serialisable
    resumed = sched(target=12.0, tau=0.03, total_steps=40)
    resumed.load_state_dict(saved)
    dec_b, _ = _simulate(resumed, mid, range(13, 41), seed=3)
    assert [d.to_dict() for d in dec_a + dec_b] == [d.to_dict() for d in ref_dec]
    assert resumed.history == ref.history
    assert any(d.phase == "final" for d in ref_dec)  # the run really went through the final round


def test_state_dict_after_finalize_keeps_qat():
    s = sched(target=4.0)
    s.step(state_of({"a": 8}), {"a": 0.0}, None, 3)
    t = sched(target=4.0)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.finalized
    assert t.step(state_of({"a": 8}, k=0), {"a": 0.0}, None, 4).phase == "qat"


def test_load_state_dict_checks_version_and_warns_on_changed_hparams():
    s = sched()
    with pytest.raises(ValueError, match="version"):
        s.load_state_dict({"version": 99, "finalized": False})
    with pytest.warns(UserWarning, match="prune_threshold"):
        sched(tau=0.2).load_state_dict(sched(tau=0.05).state_dict())


def test_decision_dict_round_trip():
    d = sched(tau=0.5).step(state_of({"a": 8, "b": 8}), {"a": 0.1, "b": 0.9}, {"a": 1.0, "b": 0.0}, 4)
    assert PruneDecision(**json.loads(json.dumps(d.to_dict()))) == d


# ---------------------------------------------------------------------------------------------
# properties over random runs
# ---------------------------------------------------------------------------------------------

layer_st = st.tuples(st.integers(1, 8), st.integers(1, 5000))


@settings(max_examples=150, deadline=None)
@given(
    layers=st.lists(layer_st, min_size=1, max_size=6),
    min_bits=st.integers(1, 3),
    target=st.floats(1.0, 32.0),
    tau=st.floats(0.01, 0.99),
    total=st.one_of(st.none(), st.integers(5, 30)),
    frac=st.floats(0.1, 1.0),
    use_sens=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_random_runs_monotone_and_bounded(layers, min_bits, target, tau, total, frac, use_sens, seed):
    import random

    rng = random.Random(seed)
    s = BitPruningSchedule(target, tau, min_bits=min_bits, final_round_fraction=frac, total_steps=total)
    numels = {f"l{i}": n for i, (_, n) in enumerate(layers)}
    bits = {f"l{i}": max(b, min_bits) for i, (b, _) in enumerate(layers)}
    try:
        s.check_reachable(numels)
    except ValueError:
        assert compression({n: min_bits for n in numels}, numels) < target
        return
    k = s.assign_k(bits, {n: rng.random() for n in bits} if use_sens else None)
    state = make_state(bits, k, numels)
    prev_c = compression(bits, numels)
    finalized_at = None
    for step in range(1, 31):
        rates = {n: rng.random() for n in state}
        sens = {n: rng.random() * 10 for n in state} if use_sens else None
        d = s.step(state, rates, sens, step)
        for n in state:
            assert d.bits[n] <= state[n].bits, "bits never increase"
            assert d.bits[n] >= min_bits, "never below min_bits"
            assert 0 <= d.k[n] <= d.bits[n] - min_bits or d.k[n] == 0
        assert d.compression >= prev_c - 1e-12, "compression is monotone"
        assert set(d.pruned) <= set(state) and len(set(d.pruned)) == len(d.pruned)
        assert all(d.bits[n] < state[n].bits for n in d.pruned)
        assert all(d.bits[n] == state[n].bits for n in state if n not in d.pruned)
        if finalized_at is not None:
            assert d.phase == "qat" and d.bits == {n: x.bits for n, x in state.items()}
        if d.finalized and finalized_at is None:
            finalized_at = step
            assert d.phase == "final"
            assert d.compression >= target * (1 - 1e-12)
        prev_c = d.compression
        state = make_state(d.bits, d.k, numels)
    if total is not None and frac * total <= 30:
        assert finalized_at is not None, "the forced round must finalize the run"
