"""``lsb_update="proximal"``: the LSB pull as a proximal step after each optimizer step, in every front end.

The loss carries no regularizer, the optimizer sees the task gradient alone (clipped or not, with momentum), and
right after ``optimizer.step()`` each regularized layer moves by :func:`msq_hf.quant.grid.lsb_proximal` at
``lr * lambda``: checked against that function, step for step, in a hand-written loop, under ``MSQTrainer`` and
under a plain ``Trainer`` with ``MSQCallback``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FRONTS, TINY_MODELS, toy_dataset, trainer_for
from transformers import TrainerCallback, TrainingArguments

import msq_hf
from msq_hf.config import ConfigFieldError
from msq_hf.quant.grid import lsb_proximal, max_abs_scale
from msq_hf.training.controller import MSQController

torch.set_num_threads(1)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY_MODELS["hf/vit"]()


def config(**kw) -> msq_hf.MSQConfig:
    base = dict(
        reg_strength=5.0,
        hessian_guided=False,
        target_compression=5.0,
        prune_interval=100,
        warmup_fraction=0.0,
        lsb_update="proximal",
    )
    base.update(kw)
    return msq_hf.MSQConfig(**base)


class StopAfterFirstStep(TrainerCallback):
    """Ends training after one optimizer step of a longer run (no forced final round at step 1)."""

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = True
        return control


def expected_after_proximal(layers: dict, weights: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    """What the proximal step at ``amount`` makes of ``weights`` (the layers give bits, k, units)."""
    out = {}
    for name, layer in layers.items():
        w = weights[name]
        mean = layer.reg_reduction == "mean"
        out[name] = lsb_proximal(w, max_abs_scale(w), layer.bits, layer.k, layer.lsb_units, mean, amount)
    return out


def test_the_loss_carries_no_regularizer_and_the_step_is_the_proximal_one() -> None:
    model = msq_hf.quantize_model(tiny_vit(), config())
    ctl = MSQController(model, total_steps=10)
    before = {n: layer.weight.detach().clone() for n, layer in ctl.layers.items()}
    ctl.proximal_step(0.1)  # before the start: nothing
    assert all(torch.equal(layer.weight, before[n]) for n, layer in ctl.layers.items())
    ctl.start()
    batch = toy_dataset(4)
    model.train()
    out = model(pixel_values=torch.stack([r["pixel_values"] for r in batch]))
    reg = ctl.regularization()
    assert not reg.requires_grad and float(reg) == 0.0, "proximal mode must not add lambda * R to the loss"
    assert ctl.last_regularization > 0, "msq/reg still logs lambda * R"
    assert out.logits.requires_grad
    ctl.proximal_step(0.1)
    want = expected_after_proximal(ctl.layers, before, 0.1 * ctl.reg_strength)
    moved = 0.0
    for name, layer in ctl.layers.items():
        torch.testing.assert_close(layer.weight.detach(), want[name], rtol=0, atol=0)
        moved = max(moved, float((layer.weight.detach() - before[name]).abs().max()))
    assert moved > 0, "the step must move some weight for this test to mean anything"


def test_hand_loop_prunes_by_threshold_alone() -> None:
    # a steady proximal pull empties the LSBs: the threshold rule reaches the target before the forced round
    torch.manual_seed(0)
    model = msq_hf.quantize_model(
        tiny_vit(),
        config(
            reg_strength=20.0,
            target_compression=8.0,
            prune_interval=4,
            prune_threshold=0.3,
            final_round_fraction=0.9,
            target_fraction=0.6,
        ),
    )
    rows = toy_dataset(16)
    x = torch.stack([r["pixel_values"] for r in rows])
    y = torch.stack([r["labels"] for r in rows])
    steps = 80
    ctl = MSQController(model, total_steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(pixel_values=x).logits, y) + ctl.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.proximal_step(0.05)
        ctl.learning_rate = 0.05
        ctl.maybe_step(step, {"pixel_values": x, "labels": y})
    share = ctl.pruning_share()
    assert ctl.compression >= 8.0
    assert share["threshold_share"] == 1.0 and share["forced_layers"] == 0


@pytest.mark.parametrize("front", FRONTS)
def test_trainers_apply_the_proximal_step_after_the_optimizer(front: str, tmp_path) -> None:
    # same model, same data, one step: the proximal run's weights are the task-only run's, moved by lsb_proximal
    lr, reg = 0.05, 5.0

    def train(name: str, cfg: msq_hf.MSQConfig) -> dict[str, torch.Tensor]:
        rows, stop = toy_dataset(8), StopAfterFirstStep()
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=8,
            learning_rate=lr,
            lr_scheduler_type="constant",
            max_steps=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            max_grad_norm=1.0,
        )
        trainer, callback = trainer_for(front, tiny_vit(), cfg, args, rows, [stop])
        trainer.train()
        controller = callback.controller
        assert trainer.state.global_step == 1 and not controller.finalized
        train.layers = controller.layers
        return {n: layer.weight.detach().clone() for n, layer in controller.layers.items()}

    task_only = train("task", config(reg_strength=0.0, lsb_update="gradient"))
    layers = copy.copy(train.layers)
    proximal = train("proximal", config(reg_strength=reg))
    want = expected_after_proximal(layers, task_only, lr * reg)
    assert any(not torch.equal(want[n], task_only[n]) for n in want), "the pull must be visible"
    for name in want:
        torch.testing.assert_close(proximal[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_proximal_needs_the_sign_magnitude_grid() -> None:
    with pytest.raises(ConfigFieldError, match="lsb_update.*wnorm"):
        config(wnorm="dorefa")
