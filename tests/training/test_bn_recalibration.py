"""BatchNorm running statistics are re-estimated after a pruning step that lowered bits (and only then)."""

from __future__ import annotations

import torch
from torch import nn

import msq_hf
from msq_hf.training.controller import MSQController
from msq_hf.training.measure import recalibrate_batchnorm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
    )


def _batch(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 6, 6, generator=g) * 3 + 1, torch.randint(0, 4, (n,), generator=g)


def test_running_statistics_become_the_batch_statistics_and_settings_are_restored() -> None:
    model = _model()
    bn = model[1]
    bn.momentum = 0.1
    model.eval()  # training flags must come back as they were
    x, y = _batch()
    assert recalibrate_batchnorm(model, (x, y)) == 1
    with torch.no_grad():
        feats = model[0](x)
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, feats.var(dim=(0, 2, 3), unbiased=True))
    assert bn.momentum == 0.1 and not bn.training and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_a_model_without_batchnorm_is_left_alone() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, _batch()) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _controller(recalibrate: bool) -> tuple[nn.Module, MSQController]:
    model = _model()
    cfg = msq_hf.MSQConfig(
        init_bits=8, target_compression=5.0, prune_threshold=0.99, prune_interval=2, hessian_guided=False,
        warmup_fraction=0.0, final_round_fraction=1.0, bn_recalibration=recalibrate,
    )  # fmt: skip
    msq_hf.quantize_model(model, cfg)
    return model, MSQController(model, cfg, total_steps=10)


def test_the_controller_re_estimates_after_a_pruning_step_that_lowered_bits() -> None:
    batch = _batch()
    for recalibrate in (True, False):
        model, ctl = _controller(recalibrate)
        model.train()
        ctl.maybe_step(0, batch)  # start: no pruning, statistics untouched
        assert model[1].num_batches_tracked.item() == 0
        decision = ctl.maybe_step(2, batch)  # tau 0.99: every layer drops k bits
        assert decision is not None and decision.pruned
        assert (model[1].num_batches_tracked.item() == 1) is recalibrate
        assert ctl.maybe_step(3, batch) is None and model[1].num_batches_tracked.item() == int(recalibrate)
