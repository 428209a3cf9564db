"""msq_hf.training.pacing: the planned trajectory, the lambda feedback, sensitivity averaging and run diagnostics."""

from __future__ import annotations

import json

import pytest

from msq_hf import MSQConfig
from msq_hf.training.pacing import (
    MAX_PULL,
    Pacer,
    PruningPlan,
    k_flip_rate,
    last_measurement,
    pruning_share,
    pull_limit,
    rate_change,
    smooth_sensitivities,
    target_average_bits,
)

# -- the target ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "count_sign_bit", "bits"),
    [(16.0, False, 2.0), (32 / 3, False, 3.0), (32 / 3, True, 2.0), (8.0, True, 3.0)],
)
def test_target_average_bits_takes_the_sign_bit_out_only_when_the_target_counts_it(
    target: float, count_sign_bit: bool, bits: float
) -> None:
    assert target_average_bits(target, count_sign_bit) == pytest.approx(bits)
    config = MSQConfig(target_compression=target, count_sign_bit=count_sign_bit)
    assert Pacer.from_config(config).target_bits == pytest.approx(bits)


# -- PruningPlan ----------------------------------------------------------------------------------


def test_planned_bits_is_linear_between_start_and_reach_and_clamped_outside() -> None:
    plan = PruningPlan(start_step=10, reach_step=30, start_bits=8.0, target_bits=4.0)
    assert plan.planned_bits(10) == 8.0
    assert plan.planned_bits(20) == pytest.approx(6.0)
    assert plan.planned_bits(15) == pytest.approx(7.0)
    assert plan.planned_bits(30) == pytest.approx(4.0)
    assert plan.planned_bits(0) == 8.0, "before the start the plan holds the start bits"
    assert plan.planned_bits(1000) == pytest.approx(4.0), "after the reach step the plan holds the target"
    assert PruningPlan(**json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize("start, reach", [(10, 10), (10, 5), (-1, 5)])
def test_plan_needs_a_reach_step_after_a_nonnegative_start(start: int, reach: int) -> None:
    with pytest.raises(ValueError, match="reach_step"):
        PruningPlan(start_step=start, reach_step=reach, start_bits=8.0, target_bits=4.0)


# -- Pacer: warm-up and plan ------------------------------------------------------------------------


def test_warmup_step() -> None:
    pacer = Pacer(1e-3, warmup_fraction=0.05)
    assert pacer.warmup_step(None) == 0, "unknown run length: no warm-up"
    assert pacer.warmup_step(100) == 5
    assert pacer.warmup_step(30) == 2, "rounded up: 1.5 -> 2"
    assert Pacer(1e-3, warmup_fraction=0.0).warmup_step(100) == 0


def test_begin_fixes_the_plan_to_the_target_at_target_fraction() -> None:
    pacer = Pacer(1e-3, target_fraction=0.5, target_bits=3.0)
    plan = pacer.begin(10, 100, 7.5)
    assert plan == PruningPlan(start_step=10, reach_step=50, start_bits=7.5, target_bits=3.0)
    assert pacer.plan == plan


@pytest.mark.parametrize("step, total", [(50, 100), (60, 100), (10, None)])
def test_begin_returns_none_when_the_reach_step_is_not_after_the_start(step: int, total: int | None) -> None:
    pacer = Pacer(1e-3, target_fraction=0.5)
    assert pacer.begin(step, total, 8.0) is None
    assert pacer.plan is None
    assert pacer.update(step + 10, 8.0) == pytest.approx(1e-3), "no plan: no feedback"


# -- Pacer: the lambda feedback ---------------------------------------------------------------------


def _pacer(**kw) -> Pacer:
    pacer = Pacer(1e-3, gain=2.0, target_fraction=0.75, target_bits=4.0, tolerance_bits=0.5, **kw)
    pacer.begin(10, 40, 8.0)  # plan: 8 bits at step 10 -> 4 bits at step 30; 6 bits planned at step 20
    return pacer


def test_update_raises_lambda_when_behind_the_plan_and_not_catching_up() -> None:
    pacer = _pacer()
    assert pacer.update(20, 7.0) == pytest.approx(2e-3), "1 bit removed where the plan asked for 2"
    assert pacer.update(25, 6.0) == pytest.approx(4e-3), "the gap stayed 1 bit: raised again"
    assert pacer.multiplier == pytest.approx(4.0)


def test_update_holds_lambda_while_a_late_run_catches_up() -> None:
    """No wind-up: behind the plan but closing the gap keeps lambda."""
    pacer = _pacer()
    assert pacer.update(20, 7.0) == pytest.approx(2e-3)
    assert pacer.update(25, 5.5) == pytest.approx(2e-3), "1.5 bits removed, the plan's slope asks for 1"
    assert pacer.update(30, 4.2) == pytest.approx(2e-3), "still 0.2 behind, but the gap shrank from 0.5"
    assert pacer.update(35, 4.2) == pytest.approx(4e-3), "stalled behind the plan (at its end): raised"


def test_update_lowers_lambda_only_when_ahead_beyond_the_tolerance() -> None:
    pacer = _pacer()
    assert pacer.update(20, 6.0) == pytest.approx(1e-3), "on the plan: unchanged"
    assert pacer.update(20, 5.6) == pytest.approx(1e-3), "0.4 bits ahead, within the 0.5 tolerance: unchanged"
    assert pacer.update(20, 5.4) == pytest.approx(5e-4), "0.6 bits ahead: divided by the gain"
    assert pacer.update(20, 5.4) == pytest.approx(2.5e-4)


def test_update_backs_off_when_the_rates_rise_behind_the_plan() -> None:
    """More lambda helps only while the rates fall: a rise beyond noise means the pull overshoots the window."""
    pacer = _pacer()
    many = 1_000_000  # weights compared: the noise floor is the 0.01 tolerance
    assert pacer.update(20, 7.0, (-0.05, many)) == pytest.approx(2e-3), "behind, rates falling: raised"
    assert pacer.update(25, 7.0, (+0.03, many)) == pytest.approx(1e-3), "behind, rates rose 3 points: backed off"
    assert pacer.update(30, 7.0, (+0.005, many)) == pytest.approx(2e-3), "a rise within the tolerance is noise"
    assert pacer.update(35, 7.0, (+0.05, 50)) == pytest.approx(4e-3), "5 points over 50 weights is sampling noise"
    assert pacer.rise_limit(50) == pytest.approx(0.3) and pacer.rise_limit(many) == pytest.approx(0.01)
    ahead = _pacer()
    assert ahead.update(20, 5.0, (+0.05, many)) == pytest.approx(5e-4), "ahead: lowered as before"


def test_pull_limit_is_max_pull_grid_steps_of_the_finest_regularized_layer() -> None:
    # scale units: lr * lambda * 2^(n-8) grid steps per SGD step
    assert pull_limit(0.1, [8, 4], "scale") == pytest.approx(MAX_PULL / 0.1)
    assert pull_limit(0.1, [6, 3], "scale") == pytest.approx(MAX_PULL / (0.1 / 4)), "2 bits fewer: 4x the lambda"
    assert pull_limit(0.05, [8], "step") == pytest.approx(MAX_PULL / 0.05), "step units: lr * lambda"
    for args in [(None, [8], "scale"), (0.0, [8], "scale"), (0.1, [], "scale"), (0.1, [8], "code")]:
        assert pull_limit(*args) is None, args


def test_update_never_exceeds_the_limit() -> None:
    pacer = _pacer()
    assert pacer.update(20, 7.0, None, 1.5e-3) == pytest.approx(1.5e-3), "x2 wanted, capped at the limit"
    assert pacer.update(25, 7.0, None, 1.5e-3) == pytest.approx(1.5e-3), "still behind: stays at the limit"
    assert pacer.update(30, 7.0, None, 1e-2) == pytest.approx(3e-3), "the limit rose (lr decayed): raised again"
    assert pacer.update(35, 7.0, None, 1e-9) == pytest.approx(1e-5), "within the span even under a tiny limit"


def test_rate_change_compares_layers_measured_at_the_same_precision() -> None:
    numels = {"a": 100, "b": 300, "c": 50}
    before = {"rates": {"a": 0.5, "b": 0.4, "c": 0.3}, "bits": {"a": 8, "b": 8, "c": 6}, "k": {"a": 1, "b": 2, "c": 1}}
    after = {"rates": {"a": 0.6, "b": 0.2, "c": 0.9}, "bits": {"a": 8, "b": 8, "c": 5}, "k": {"a": 1, "b": 2, "c": 1}}
    change, weights = rate_change(before, after, numels)  # c was pruned in between: not comparable
    assert weights == 400 and change == pytest.approx((100 * 0.1 + 300 * -0.2) / 400)
    after["k"]["b"] = 1  # a new k starts near 0.5 again
    assert rate_change(before, after, numels) == (pytest.approx(0.1), 100)
    assert rate_change(None, after, numels) is None
    after["k"] = {"a": 0, "b": 1, "c": 1}
    assert rate_change(before, after, numels) is None


def test_last_measurement_pairs_rates_with_the_precision_they_were_measured_at() -> None:
    start = {"rates": {"a": 0.5}, "bits": {"a": 8}, "k": {"a": 2}}
    pruned = {"rates": {"a": 0.1}, "bits": {"a": 6}, "k": {"a": 1}}  # rates measured at 8 bits, then pruned
    assert last_measurement([]) is None
    assert last_measurement([start]) == start, "the start entry measured at its own precision"
    assert last_measurement([start, pruned]) == {"rates": {"a": 0.1}, "bits": {"a": 8}, "k": {"a": 2}}


def test_update_before_the_plan_start_is_ignored() -> None:
    pacer = _pacer()
    assert pacer.update(5, 8.0) == pytest.approx(1e-3)
    assert pacer.multiplier == 1.0


def test_lambda_stays_within_the_span() -> None:
    pacer = _pacer(span=4.0)
    for step in range(20, 25):
        pacer.update(step, 7.5)
    assert pacer.multiplier == pytest.approx(4.0) and pacer.strength == pytest.approx(4e-3)
    for _ in range(10):
        pacer.update(25, 3.0)
    assert pacer.multiplier == pytest.approx(0.25) and pacer.strength == pytest.approx(2.5e-4)


def test_no_feedback_keeps_the_base_lambda() -> None:
    pacer = _pacer(feedback=False)
    for _ in range(3):
        assert pacer.update(20, 7.5) == pytest.approx(1e-3)
    assert pacer.strength == pytest.approx(1e-3)


@pytest.mark.parametrize("kw", [{"reg_strength": -1.0}, {"reg_strength": float("nan")}, {"gain": 1.0}])
def test_pacer_rejects_bad_arguments(kw: dict) -> None:
    args = {"reg_strength": 1e-3, **kw}
    with pytest.raises(ValueError, match=next(iter(kw))):
        Pacer(args.pop("reg_strength"), **args)


# -- sensitivity averaging --------------------------------------------------------------------------


def test_smooth_sensitivities() -> None:
    fresh = {"a": 4.0, "b": -2.0}
    assert smooth_sensitivities(None, fresh, 0.5) == fresh
    assert smooth_sensitivities({"a": 2.0, "b": 2.0}, fresh, 0.0) == fresh
    out = smooth_sensitivities({"a": 2.0, "b": 2.0, "gone": 9.0}, {**fresh, "new": 1.0}, 0.75)
    assert out == pytest.approx({"a": 2.5, "b": 1.0, "new": 1.0})
    for keep in (-0.1, 1.0):
        with pytest.raises(ValueError, match="keep"):
            smooth_sensitivities(None, fresh, keep)


def test_pacer_smooth_folds_successive_measurements() -> None:
    pacer = Pacer(1e-3, hessian_ema=0.5)
    assert pacer.smooth({"a": 4.0}) == {"a": 4.0}
    assert pacer.smooth({"a": 0.0}) == {"a": 2.0}
    assert pacer.smooth({"a": 2.0}) == {"a": 2.0}
    assert pacer.sensitivities == {"a": 2.0}


# -- state ----------------------------------------------------------------------------------------------


def test_state_dict_round_trip() -> None:
    pacer = _pacer(hessian_ema=0.5)
    pacer.update(20, 7.0)
    pacer.smooth({"a": 1.0, "b": 3.0})
    state = json.loads(json.dumps(pacer.state_dict()))
    other = Pacer(1e-3, gain=2.0)
    other.load_state_dict(state)
    assert other.state_dict() == pacer.state_dict()
    assert other.strength == pytest.approx(2e-3) and other.plan == pacer.plan
    other.load_state_dict({})  # a version-1 controller state: start values
    assert other.multiplier == 1.0 and other.plan is None and other.sensitivities is None
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="multiplier"):
            other.load_state_dict({"multiplier": bad})


# -- k_flip_rate ------------------------------------------------------------------------------------


def _entry(bits: dict, k: dict, pruned=(), phase: str = "regularize", forced: bool = False) -> dict:
    return {"bits": dict(bits), "k": dict(k), "pruned": list(pruned), "phase": phase, "forced": forced}


def test_k_flip_rate_counts_free_unpruned_layers_only() -> None:
    history = [
        _entry({"a": 8, "b": 8, "c": 2, "d": 8, "e": 8}, {"a": 1, "b": 2, "c": 1, "d": 1, "e": 0}),
        # a flips (free); b flips but was pruned; c has no room for 2 bits; d keeps k; e had k = 0
        _entry({"a": 8, "b": 6, "c": 2, "d": 8, "e": 8}, {"a": 2, "b": 1, "c": 1, "d": 1, "e": 1}, pruned=["b"]),
    ]
    assert k_flip_rate(history) == pytest.approx(1 / 2)
    # a second step: a flips back and d flips; b (not pruned this time) and e (now k = 1) keep k
    history.append(_entry({"a": 8, "b": 6, "c": 2, "d": 8, "e": 8}, {"a": 1, "b": 1, "c": 1, "d": 2, "e": 1}))
    # 1 of 2 free pairs at the first step, 2 of 4 at the second
    assert k_flip_rate(history) == pytest.approx(3 / 6)


def test_k_flip_rate_respects_min_bits_and_skips_the_final_round() -> None:
    history = [
        _entry({"a": 4, "b": 8}, {"a": 1, "b": 1}),
        _entry({"a": 4, "b": 8}, {"a": 2, "b": 2}),
    ]
    assert k_flip_rate(history, min_bits=1) == 1.0
    assert k_flip_rate(history, min_bits=3) == 1.0, "a (4 bits, 1 above min_bits) no longer counts"
    assert k_flip_rate(history, min_bits=7) is None, "no layer has room for 2 bits"
    history.append(_entry({"a": 3, "b": 7}, {"a": 0, "b": 0}, pruned=["a", "b"], phase="final", forced=True))
    assert k_flip_rate(history) == 1.0, "the final round's k = 0 is not a flip"
    assert k_flip_rate(history[:1]) is None and k_flip_rate([]) is None


# -- pruning_share ----------------------------------------------------------------------------------


def test_pruning_share_splits_threshold_and_forced_bits() -> None:
    numels = {"a": 100, "b": 300}
    history = [
        _entry({"a": 8, "b": 8}, {"a": 1, "b": 1}),
        _entry({"a": 6, "b": 8}, {"a": 1, "b": 1}, pruned=["a"]),  # threshold: 2 bits on 1/4 of the weights
        _entry({"a": 6, "b": 8}, {"a": 1, "b": 1}),
        _entry({"a": 5, "b": 5}, {"a": 0, "b": 0}, pruned=["a", "b"], phase="final", forced=True),
    ]
    share = pruning_share(history, numels)
    assert share["threshold"] == pytest.approx(0.5)
    assert share["forced"] == pytest.approx(1 * 0.25 + 3 * 0.75)
    assert share["threshold_share"] == pytest.approx(0.5 / 3.0)
    assert share["forced_layers"] == 2.0 and share["forced_max_drop"] == 3.0
    # the total matches the drop of the parameter-weighted average bits
    assert share["threshold"] + share["forced"] == pytest.approx(8.0 - (5 * 100 + 5 * 300) / 400)


def test_pruning_share_without_a_forced_round_or_any_pruning() -> None:
    numels = {"a": 100, "b": 300}
    threshold_only = [
        _entry({"a": 8, "b": 8}, {"a": 1, "b": 1}),
        _entry({"a": 7, "b": 6}, {"a": 0, "b": 0}, pruned=["a", "b"], phase="final"),
    ]
    share = pruning_share(threshold_only, numels)
    assert share["threshold_share"] == 1.0 and share["forced"] == 0.0
    assert share["forced_layers"] == 0.0 and share["forced_max_drop"] == 0.0
    nothing = [_entry({"a": 8, "b": 8}, {"a": 1, "b": 1}), _entry({"a": 8, "b": 8}, {"a": 1, "b": 1})]
    assert pruning_share(nothing, numels) == {
        "threshold": 0.0,
        "forced": 0.0,
        "threshold_share": 1.0,
        "forced_layers": 0.0,
        "forced_max_drop": 0.0,
    }
    assert pruning_share([], numels)["threshold_share"] == 1.0
