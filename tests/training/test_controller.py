"""MSQController without any trainer: regularizer, Hessian pass hygiene, custom loop, state round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_hf
from msq_hf.training.controller import MSQController
from msq_hf.training.measure import default_loss, detach_batch, hutchinson_seed, slice_batch

torch.set_num_threads(1)


class SmallNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear: has BatchNorm running stats to watch."""

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


def make(seed: int = 0, **cfg) -> tuple[nn.Module, MSQController]:
    torch.manual_seed(seed)
    base = dict(
        init_bits=8,
        target_compression=5.0,
        reg_strength=1e-3,
        prune_threshold=0.6,
        prune_interval=3,
        hessian_max_probes=2,
        hessian_batch_size=8,
        final_round_fraction=0.8,
    )
    base.update(cfg)
    model = msq_hf.quantize_model(SmallNet(), msq_hf.MSQConfig(**base))
    return model, MSQController(model, total_steps=24, seed=0)


def test_batch_helpers() -> None:
    x, y = data(8)
    batch = {"pixel_values": x.requires_grad_(), "labels": y, "meta": "keep"}
    det = detach_batch(batch)
    assert not det["pixel_values"].requires_grad and det["meta"] == "keep" and det is not batch
    cut = slice_batch(det, 3)
    assert cut["pixel_values"].shape[0] == 3 and cut["labels"].tolist() == y[:3].tolist()
    assert slice_batch((x, y), 2)[1].shape == (2,)
    assert hutchinson_seed(0, 10) == hutchinson_seed(0, 10) != hutchinson_seed(0, 11)


def test_default_loss_accepts_dicts_and_tuples() -> None:
    model, _ = make()
    model.eval()
    x, y = data(6)
    expected = F.cross_entropy(model(x), y)
    assert torch.allclose(default_loss(model, {"pixel_values": x, "labels": y}), expected)
    assert torch.allclose(default_loss(model, (x, y)), expected)
    with pytest.raises(KeyError, match="labels"):
        default_loss(model, {"pixel_values": x})


def test_regularization_is_lambda_times_the_recorded_terms_and_only_in_training() -> None:
    model, ctl = make()
    x, y = data(8)
    ctl.start((x, y))
    assert any(layer.n_k > 0 for layer in ctl.layers.values())
    model.train()
    model(x)
    terms = {name: layer._msq_reg.detach().clone() for name, layer in ctl.layers.items()}
    reg = ctl.regularization()
    assert reg.requires_grad
    assert float(reg.detach()) == pytest.approx(1e-3 * float(sum(terms.values())), rel=1e-5)
    assert ctl.regularization().item() == 0.0, "terms are consumed once"
    model.eval()
    model(x)
    assert ctl.regularization().item() == 0.0
    with torch.no_grad():
        model.train()
        model(x)
    assert ctl.regularization().item() == 0.0


def test_hessian_pass_leaves_grads_optimizer_and_bn_untouched() -> None:
    model, ctl = make()
    x, y = data(8)
    model.train()
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    sens = ctl.sensitivities((x, y), global_step=3)
    assert set(sens) == set(ctl.names) and all(torch.isfinite(torch.tensor(v)) for v in sens.values())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        if k in running:
            assert torch.equal(v, running[k]), f"{k} changed during the Hessian pass"
    assert model.training, "the train/eval mode must be restored"
    # same (seed, step) -> same probes -> same estimate
    assert ctl.sensitivities((x, y), global_step=3) == sens


def _custom_loop(seed: int, steps: int = 24) -> MSQController:
    model, ctl = make(seed)
    x, y = data(48, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, steps + 1):
        i = (step - 1) % 6
        batch = (x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8])
        if step == 1:
            ctl.start(batch)
        model.train()
        loss = F.cross_entropy(model(batch[0]), batch[1]) + ctl.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.maybe_step(step, batch)
    return ctl


def test_custom_loop_prunes_to_target_then_qat() -> None:
    ctl = _custom_loop(0)
    steps = [h["step"] for h in ctl.history]
    assert steps[0] == 0 and all(s % 3 == 0 or s == ctl.final_round_step for s in steps[1:])
    assert ctl.history[-1]["avg_bits"] < 8.0
    assert ctl.compression >= 5.0 and ctl.phase == "qat" and ctl.finalized
    assert all(layer.n_k == 0 for layer in ctl.layers.values())
    assert ctl.maybe_step(30, None) is None
    logs = ctl.log_dict()
    assert logs["msq/phase"] == 2.0 and logs["msq/compression"] == pytest.approx(ctl.compression, rel=1e-3)
    assert {f"msq/bits/{n}" for n in ctl.names} <= set(logs)


def test_state_dict_round_trip_is_json_and_restores_bits() -> None:
    model, ctl = make()
    x, y = data(8)
    ctl.start((x, y))
    for layer in ctl.layers.values():
        with torch.no_grad():
            layer.weight.copy_(layer.quantized_weight())  # every LSB field becomes exactly representable
    ctl.maybe_step(3, (x, y))
    state = json.loads(json.dumps(ctl.state_dict()))
    other_model, other = make()
    other.load_state_dict(state)
    assert other.bits == ctl.bits and other.ks == ctl.ks and other.history == ctl.history
    assert other.phase == ctl.phase and other.started
    bad = dict(state, bits={"nope": 3})
    with pytest.raises(ValueError, match="nope"):
        other.load_state_dict(bad)


def test_unreachable_target_raises_on_start() -> None:
    # MSQConfig refuses this on construction; a config edited afterwards must still be caught before
    # training: every layer at min_bits=4 gives 8x at best and the forced round cannot go below min_bits
    model, _ = make(min_bits=4, target_compression=5.0)
    model.msq_config.target_compression = 16.0
    ctl = MSQController(model, total_steps=24)
    with pytest.raises(ValueError, match="target_compression=16 is unreachable.*8.0000x"):
        ctl.start(data(8))
    assert not ctl.started


def test_controller_needs_a_config() -> None:
    with pytest.raises(ValueError, match="MSQ layers"):
        MSQController(SmallNet(), msq_hf.MSQConfig())


class PaddedNet(SmallNet):
    """SmallNet with a wide hidden layer whose input is the 8 pooled features padded with 504 zeros: 63/64 of its
    weights never see data, like the 3x3 convolutions of 1x1 maps in ResNet-18's ``layer4`` at 32 px."""

    def __init__(self, classes: int = 3):
        super().__init__(classes)
        self.wide = nn.Linear(512, 64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(F.relu(self.wide(F.pad(pooled, (0, 504)))))


def _padded_run(order: str, **extra: str) -> MSQController:
    torch.manual_seed(0)
    config = msq_hf.MSQConfig(
        init_bits=8, target_compression=8.0, reg_strength=1e-3, prune_threshold=0.6, prune_interval=3,
        hessian_max_probes=16, hessian_batch_size=16, final_round_fraction=0.8, warmup_fraction=0.25,
        prune_order=order, **extra,
    )  # fmt: skip
    model = msq_hf.quantize_model(PaddedNet(), config)
    ctl = MSQController(model, total_steps=24, seed=0)
    x, y = data(96, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, 25):
        batch = (x[(step - 1) % 6 * 16 :][:16], y[(step - 1) % 6 * 16 :][:16])
        ctl.maybe_start(step - 1, batch)
        loss = F.cross_entropy(model(batch[0]), batch[1]) + ctl.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.maybe_step(step, batch)
    assert ctl.finalized and ctl.compression >= 8.0
    return ctl


def test_the_hessian_order_takes_the_bits_from_the_layer_that_never_sees_data() -> None:
    by_cost, by_rate = _padded_run("sensitivity"), _padded_run("rate")
    # the padded layer holds 98 % of the weights: the Hessian order takes the reduction from it alone ...
    assert by_cost.bits["wide"] < min(by_cost.bits["conv"], by_cost.bits["fc"]), by_cost.bits
    # ... and so leaves the two small layers that see data more bits than the rate order, at the same target
    assert by_cost.bits["conv"] + by_cost.bits["fc"] > by_rate.bits["conv"] + by_rate.bits["fc"], (
        by_cost.bits,
        by_rate.bits,
    )


def test_the_sensitivity_pull_regularizes_only_the_layers_the_hessian_would_cut() -> None:
    from msq_hf.training.allocation import pull_weights
    from msq_hf.training.schedule import BitPruningSchedule

    ctl = _padded_run("sensitivity", lsb_pull="sensitivity")
    tests = BitPruningSchedule.from_config(ctl.config).target_tests(ctl.numels)
    measured = [entry for entry in ctl.history if not entry["forced"] and entry["phase"] == "regularize"]
    for entry in measured:  # every measurement re-chooses from its sensitivities, at the bits it left
        costs = (entry["sensitivities"], entry["rates"], ctl.numels)
        assert entry["pull"] == pull_weights(entry["bits"], 1, costs, *tests), entry["step"]
    assert any(not all(entry["pull"].values()) for entry in measured), "some step left a layer unpulled"
    assert all(entry["pull"] is None for entry in _padded_run("sensitivity").history), "uniform: nothing recorded"
    # a resume re-derives the shares from the checkpoint's bits, last rates and sensitivities
    state = {
        **ctl.state_dict(),
        "finalized": False,
        "bits": dict.fromkeys(ctl.names, 8),
        "k": dict.fromkeys(ctl.names, 2),
    }
    resumed = MSQController(ctl.model, ctl.config, total_steps=24)
    resumed.load_state_dict(state)
    costs = (state["last_sensitivities"], state["last_rates"], ctl.numels)
    assert resumed.regularizer.weights == pull_weights(state["bits"], 1, costs, *tests)
