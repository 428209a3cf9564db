"""MSQController with the pacer: warm-up, lambda feedback, history fields, state versions, checkpointing guard.

One paced run (a tiny conv model, 24 optimizer steps) is shared by the read-only tests: warm-up 25% (start
at step 6), plan reaching the target at 50% (step 12), forced final round at 80% (step 20), prune every 3
steps. The threshold is so low and lambda so small that threshold pruning never fires: the run stays behind
the plan, so the feedback must raise lambda at every pruning step, and the forced round does all the pruning.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import msq_hf
from msq_hf.training.controller import STATE_VERSION, MSQController
from msq_hf.training.pacing import Pacer, last_measurement, rate_change

torch.set_num_threads(1)


class SmallNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear (as in tests/training/test_controller.py)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y] += 1.0
    return x, y


TOTAL = 24
PACED = dict(
    init_bits=8,
    target_compression=5.0,  # 6.4 average bits (sign bit not counted)
    reg_strength=1e-6,
    reg_gain=2.0,
    prune_threshold=0.001,
    prune_interval=3,
    hessian_max_probes=2,
    hessian_batch_size=8,
    warmup_fraction=0.25,
    target_fraction=0.5,
    final_round_fraction=0.8,
)


def make(seed: int = 0, **cfg: Any) -> tuple[nn.Module, MSQController]:
    torch.manual_seed(seed)
    model = msq_hf.quantize_model(SmallNet(), msq_hf.MSQConfig(**{**PACED, **cfg}))
    return model, MSQController(model, total_steps=TOTAL, seed=0)


X, Y = data(48, seed=1)


def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = (step - 1) % 6
    return X[i * 8 : (i + 1) * 8], Y[i * 8 : (i + 1) * 8]


def run(model: nn.Module, ctl: MSQController, opt: torch.optim.Optimizer, first: int, last: int) -> dict[str, list]:
    """Optimizer steps ``first..last`` of a Trainer-like loop: start check before the forward, pruning after."""
    log: dict[str, list] = {"started": [], "reg": []}
    for step in range(first, last + 1):
        batch = batch_at(step)
        log["started"].append((step - 1, ctl.maybe_start(step - 1, batch)))  # optimizer steps done so far
        model.train()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        reg = ctl.regularization()
        log["reg"].append((step, float(reg.detach())))
        opt.zero_grad()
        (loss + reg).backward()
        opt.step()
        ctl.maybe_step(step, batch)
    return log


def new_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def paced() -> dict[str, Any]:
    """The shared run, plus the full training state after step 12 (for the resume test)."""
    model, ctl = make()
    opt = new_optimizer(model)
    log = run(model, ctl, opt, 1, 12)
    mid = {
        "model": copy.deepcopy(model.state_dict()),
        "opt": copy.deepcopy(opt.state_dict()),
        "ctl": json.loads(json.dumps(ctl.state_dict())),
    }
    rest = run(model, ctl, opt, 13, TOTAL)
    return {"model": model, "ctl": ctl, "log": {k: log[k] + rest[k] for k in log}, "mid": mid}


# -- warm-up ------------------------------------------------------------------------------------------


def test_controller_starts_exactly_at_the_warmup_step(paced: dict[str, Any]) -> None:
    ctl = paced["ctl"]
    assert ctl.warmup_step == 6
    started = dict(paced["log"]["started"])
    assert [s for s, on in started.items() if not on] == [0, 1, 2, 3, 4, 5]
    assert all(started[s] for s in range(6, TOTAL))
    assert ctl.history[0]["step"] == ctl.warmup_step
    assert all(h["step"] >= ctl.warmup_step for h in ctl.history)
    # no LSB term during the warm-up: every k is 0 until the start
    assert all(value == 0.0 for step, value in paced["log"]["reg"] if step <= 6)
    assert any(value > 0.0 for step, value in paced["log"]["reg"] if step > 6)


def test_maybe_start_before_the_warmup_step_does_nothing() -> None:
    model, ctl = make()
    assert ctl.maybe_start(5, batch_at(1)) is False
    assert not ctl.started and ctl.history == [] and all(k == 0 for k in ctl.ks.values())
    assert ctl.maybe_step(5, batch_at(1)) is None and not ctl.started
    assert ctl.maybe_start(6, batch_at(1)) is True
    assert ctl.started and ctl.history[0]["step"] == 6 and any(k > 0 for k in ctl.ks.values())
    assert ctl.plan is not None and (ctl.plan.start_step, ctl.plan.reach_step) == (6, 12)
    assert ctl.history[0]["planned_bits"] == pytest.approx(8.0)


def test_unreachable_target_raises_on_the_first_call_even_during_the_warmup() -> None:
    model, _ = make(min_bits=4)
    model.msq_config.target_compression = 16.0  # edited after validation: 8x is the best at min_bits=4
    ctl = MSQController(model, total_steps=TOTAL)
    assert ctl.warmup_step == 6
    with pytest.raises(ValueError, match="target_compression=16 is unreachable"):
        ctl.maybe_start(0, batch_at(1))
    with pytest.raises(ValueError, match="unreachable"):
        ctl.maybe_step(1, batch_at(1))
    assert not ctl.started


# -- lambda feedback and the history ----------------------------------------------------------------


def test_lambda_rises_at_pruning_steps_while_behind_the_plan(paced: dict[str, Any]) -> None:
    ctl, history = paced["ctl"], paced["ctl"].history
    assert all({"forced", "reg_strength", "planned_bits"} <= set(h) for h in history)
    assert history[0]["reg_strength"] == pytest.approx(1e-6)
    plan = ctl.plan
    rises = 0
    for i, (before, after) in enumerate(zip(history, history[1:]), start=1):
        assert after["planned_bits"] == pytest.approx(plan.planned_bits(after["step"]))
        if after["phase"] == "final":  # no feedback in the final round
            assert after["reg_strength"] == pytest.approx(before["reg_strength"])
            continue
        measured = {"rates": after["rates"], "bits": before["bits"], "k": before["k"]}
        change = rate_change(last_measurement(history[:i]), measured, ctl.numels)
        rose = change is not None and change[0] > Pacer(1.0).rise_limit(change[1])
        if after["avg_bits"] > after["planned_bits"] + 1e-9 and rose:
            assert after["reg_strength"] == pytest.approx(before["reg_strength"] / 2.0)  # rates rose: back off
        elif after["avg_bits"] > after["planned_bits"] + 1e-9:  # behind the plan: x gain
            assert after["reg_strength"] == pytest.approx(2.0 * before["reg_strength"])
            rises += 1
        else:
            assert after["reg_strength"] == pytest.approx(before["reg_strength"])
    assert rises >= 3, f"the run should be behind the plan at most pruning steps: {history}"
    assert ctl.reg_strength == pytest.approx(history[-1]["reg_strength"])
    # the planned trajectory goes from 8 bits at the start to the 6.4-bit target at step 12
    assert [h["planned_bits"] for h in history if h["step"] in (9, 12, 15)] == pytest.approx([7.2, 6.4, 6.4])
    # the logged lambda is the raised one
    assert ctl.log_dict()["msq/lambda"] == pytest.approx(ctl.reg_strength)


def test_forced_is_true_exactly_on_the_forced_round(paced: dict[str, Any]) -> None:
    ctl = paced["ctl"]
    history = ctl.history
    assert ctl.finalized and ctl.final_round_step == 20
    forced = [h["step"] for h in history if h["forced"]]
    assert forced == [20]
    assert history[-1]["forced"] and history[-1]["phase"] == "final" and history[-1]["pruned"]
    assert not any(h["forced"] for h in history[:-1])
    share = ctl.pruning_share()
    assert share["threshold"] == 0.0 and share["threshold_share"] == 0.0
    assert share["forced"] == pytest.approx(8.0 - history[-1]["avg_bits"])


def test_threshold_final_round_is_not_forced() -> None:
    # a strong, fast run: thresholds reach the target before the forced round (k = 1 everywhere, so the
    # rates this 19-step toy run reaches are below its threshold)
    model, ctl = make(reg_strength=0.5, prune_threshold=0.6, warmup_fraction=0.05, hessian_guided=False, default_k=1)
    opt = new_optimizer(model)
    run(model, ctl, opt, 1, 19)  # stops before the forced round at step 20
    history = ctl.history
    if not ctl.finalized:
        pytest.fail(f"threshold pruning should reach 5x within 19 steps here: {history}")
    assert not any(h["forced"] for h in history)
    assert ctl.pruning_share()["threshold_share"] == 1.0


# -- state ----------------------------------------------------------------------------------------------


def test_state_round_trips_the_pacer_and_resumes_exactly(paced: dict[str, Any]) -> None:
    mid, ctl = paced["mid"], paced["ctl"]
    state = mid["ctl"]
    assert state["version"] == STATE_VERSION == 2
    pacer = state["pacer"]
    assert pacer["multiplier"] > 1.0 and pacer["plan"] is not None and pacer["sensitivities"]
    model, other = make(seed=123)  # different init: everything must come from the states
    model.load_state_dict(mid["model"])
    other.load_state_dict(state)
    assert other.state_dict()["pacer"] == pacer
    assert other.reg_strength == pytest.approx(1e-6 * pacer["multiplier"])
    assert other.plan is not None and other.plan.to_dict() == pacer["plan"]
    opt = new_optimizer(model)
    opt.load_state_dict(mid["opt"])
    run(model, other, opt, 13, TOTAL)
    assert other.history == ctl.history
    assert other.reg_strength == ctl.reg_strength


def test_version_1_state_still_loads(paced: dict[str, Any]) -> None:
    state = {k: v for k, v in paced["mid"]["ctl"].items() if k != "pacer"}
    state["version"] = 1
    model, other = make()
    other.load_state_dict(state)
    assert other.started and other.bits == state["bits"] and other.ks == state["k"]
    assert other.reg_strength == pytest.approx(1e-6), "a version-1 state has no feedback: lambda from the config"
    assert other.plan is None
    assert other.maybe_step(15, batch_at(15)) is not None  # keeps going, lambda fixed
    assert other.reg_strength == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="version 3"):
        other.load_state_dict({**state, "version": 3})


# -- activation checkpointing ------------------------------------------------------------------------


class Checkpointed(nn.Module):
    """linear -> [linear -> relu -> linear] -> linear; the middle block optionally under checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 3)
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        if self.reentrant is None:
            h = self.mid(h)
        else:
            h = checkpoint(self.mid, h, use_reentrant=self.reentrant)
        return self.out(h)


def _checkpointed() -> tuple[Checkpointed, MSQController, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = msq_hf.MSQConfig(init_bits=8, target_compression=5.0, hessian_guided=False, reg_strength=0.1)
    model = msq_hf.quantize_model(Checkpointed(), cfg)
    ctl = MSQController(model, total_steps=100)
    batch = (torch.randn(8, 6), torch.arange(8) % 3)
    ctl.start(batch)
    assert all(k > 0 for k in ctl.ks.values())
    model.train()
    return model, ctl, batch


def _loss_and_grads(model: Checkpointed, ctl: MSQController, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(batch[0])
    reg = ctl.regularization()
    (F.cross_entropy(out, batch[1]) + reg).backward()
    return float(reg.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_reentrant_checkpointing_is_refused() -> None:
    model, ctl, batch = _checkpointed()
    model.reentrant = True
    model(batch[0])
    with pytest.raises(RuntimeError, match="use_reentrant") as err:
        ctl.regularization()
    assert "mid.0" in str(err.value) and "mid.2" in str(err.value)


def test_non_reentrant_checkpointing_gives_the_same_regularizer_and_gradients() -> None:
    model, ctl, batch = _checkpointed()
    reg_plain, grads_plain = _loss_and_grads(model, ctl, batch)
    model.reentrant = False
    reg_ckpt, grads_ckpt = _loss_and_grads(model, ctl, batch)
    assert reg_plain > 0 and reg_ckpt == pytest.approx(reg_plain, rel=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_whole_no_grad_forward_in_train_mode_is_not_refused() -> None:
    model, ctl, batch = _checkpointed()
    with torch.no_grad():
        model(batch[0])
    reg = ctl.regularization()
    assert float(reg) == 0.0 and not reg.requires_grad
    model.reentrant = True  # a reentrant checkpoint inside an all-no_grad forward records nothing either
    with torch.no_grad():
        model(batch[0])
    assert float(ctl.regularization()) == 0.0


def test_a_layer_skipped_after_a_no_grad_pass_is_not_refused() -> None:
    model, ctl, batch = _checkpointed()
    with torch.no_grad():
        model(batch[0])  # e.g. a BatchNorm recalibration pass in train mode
    ctl.regularization()
    # a training forward that does not run the middle block (LayerDrop, a conditional branch)
    h = F.relu(model.inp(batch[0]))
    model.out(h)
    reg = ctl.regularization()
    assert float(reg.detach()) > 0
