"""``hessian_interval``: Hutchinson traces kept between Hessian passes, with the current quantization error.

The pass count is what makes the sensitivity passes cheap (issue 13, item 4), so it is pinned exactly; the reused
sensitivities must still follow a bit-width change (the quantization error is recomputed, only the trace is kept);
and a resumed controller must reuse the very traces an uninterrupted one would.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_hf
from msq_hf.convert import msq_layers
from msq_hf.training import sensitivity
from msq_hf.training.measure import TraceReuse

torch.set_num_threads(1)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 8, 8, generator=g), torch.arange(8) % 3


def model_and_config(interval: int) -> tuple[nn.Module, msq_hf.MSQConfig]:
    torch.manual_seed(0)
    config = msq_hf.MSQConfig(init_bits=8, target_compression=8.0, hessian_interval=interval, hessian_max_probes=3)
    return msq_hf.quantize_model(SmallNet(), config), config


@pytest.fixture
def hessian_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = sensitivity.hutchinson_trace

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "hutchinson_trace", counted)
    return calls


def test_config_default_and_validation() -> None:
    assert msq_hf.MSQConfig().hessian_interval == 2
    with pytest.raises(ValueError, match="hessian_interval"):
        msq_hf.MSQConfig(hessian_interval=0)


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_hessian_runs_every_interval_th_pass(hessian_calls: list[int], interval: int) -> None:
    model, config = model_and_config(interval)
    reuse = TraceReuse(config.hessian_interval)
    for _ in range(7):
        reuse.sensitivities(model, msq_layers(model), data(), config, seed=0, loss_fn=ce)
    expected = len(range(0, 7, interval))
    assert len(hessian_calls) == reuse.hessian_passes == expected
    assert reuse.passes == 7


def test_reused_traces_follow_a_bit_width_change(hessian_calls: list[int]) -> None:
    model, config = model_and_config(2)
    layers = msq_layers(model)
    reuse = TraceReuse(config.hessian_interval)
    first = reuse.sensitivities(model, layers, data(), config, seed=0, loss_fn=ce)
    layers["conv"].set_bits(3, 1)
    second = reuse.sensitivities(model, layers, data(), config, seed=0, loss_fn=ce)
    assert len(hessian_calls) == 1  # the second pass ran no Hessian
    # same trace, new quantization error: the 3-bit conv is far more sensitive, the untouched fc is unchanged
    assert second["conv"] > 100 * first["conv"]
    assert second["fc"] == first["fc"]
    fresh, _ = sensitivity.estimate_sensitivities(model, layers, data(), ce, traces=reuse.estimate)
    assert fresh == second


def test_missing_layer_in_reused_traces_is_named() -> None:
    model, _ = model_and_config(2)
    layers = msq_layers(model)
    partial = sensitivity.TraceEstimate({"conv": 1.0}, {}, 0)
    with pytest.raises(KeyError, match="fc"):
        sensitivity.estimate_sensitivities(model, layers, data(), ce, traces=partial)


def test_controller_resume_reuses_the_same_traces(hessian_calls: list[int]) -> None:
    model, config = model_and_config(2)
    ctl = msq_hf.MSQController(model, config, total_steps=100, loss_fn=ce)
    ctl.start(data())  # pass 0: Hessian
    state = ctl.state_dict()
    assert state["traces"]["passes"] == 1 and state["traces"]["traces"] is not None
    direct = ctl.traces.sensitivities(model, ctl.layers, data(), config, seed=0, loss_fn=ce)

    other, _ = model_and_config(2)
    resumed = msq_hf.MSQController(other, config, total_steps=100, loss_fn=ce)
    resumed.load_state_dict(state)
    before = len(hessian_calls)
    again = resumed.traces.sensitivities(other, resumed.layers, data(), config, seed=0, loss_fn=ce)
    assert len(hessian_calls) == before  # pass 1 reuses the restored traces: no Hessian
    assert again == direct
    # a state without traces (written before hessian_interval existed) makes the next pass run the Hessian
    legacy = {key: value for key, value in state.items() if key != "traces"}
    fresh = msq_hf.MSQController(model_and_config(2)[0], config, total_steps=100, loss_fn=ce)
    fresh.load_state_dict(legacy)
    assert fresh.traces.estimate is None and fresh.traces.passes == 0
