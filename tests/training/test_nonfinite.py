"""A diverged run stops at once with an error naming the step (issue 12, item 9).

NaN weights have an LSB nonzero rate of 0, so the schedule used to prune them to its floor and report the
target reached, while the Trainer logged the NaN loss as a finite running mean (``loss 0.0000``).
"""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import TrainerCallback, TrainingArguments

import msq_hf
from msq_hf.errors import MSQTrainingError
from msq_hf.training.measure import check_finite_loss, check_finite_weights
from msq_hf.training.trainer import MSQTrainer

NUM_CLASSES = 3


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)


def batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "labels": torch.arange(n) % NUM_CLASSES}


def config(**kw) -> msq_hf.MSQConfig:
    base = dict(init_bits=8, target_compression=16.0, prune_interval=1, prune_threshold=0.9, hessian_guided=False)
    return msq_hf.MSQConfig(**{**base, **kw})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_controller_refuses_to_prune_non_finite_weights(bad: float) -> None:
    model = tiny_model()
    msq_hf.quantize_model(model, config())
    ctl = msq_hf.MSQController(model, model.msq_config)
    ctl.start(batch())
    assert ctl.maybe_step(1, batch()) is not None  # finite: an ordinary pruning step
    name, layer = next(iter(ctl.layers.items()))
    bits = ctl.bits
    with torch.no_grad():
        layer.weight[0].fill_(bad)
    expected = rf"non-finite \(NaN/inf\) weights in {name} at step 2: the run diverged"
    with pytest.raises(MSQTrainingError, match=expected):
        ctl.maybe_step(2, batch())
    assert ctl.bits == bits  # nothing was pruned on the broken weights


def test_check_finite_names_step_and_layers() -> None:
    layers = {f"l{i}": torch.nn.Linear(2, 2) for i in range(5)}
    check_finite_weights(layers, 3)
    for layer in layers.values():
        layer.weight.data[0, 0] = float("nan")
    with pytest.raises(MSQTrainingError, match="in l0, l1, l2 and 2 more at step 7") as info:
        check_finite_weights(layers, 7)
    assert "\n" not in str(info.value)
    check_finite_loss(torch.tensor(1.5), 1)
    with pytest.raises(MSQTrainingError, match="the training loss is nan at step 4"):
        check_finite_loss(torch.tensor(float("nan")), 4)


class Diverge(TrainerCallback):
    """Makes a weight NaN after optimizer step ``at`` (what a too-large learning rate ends in)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            with torch.no_grad():
                next(p for p in model.parameters() if p.dim() == 4).fill_(float("nan"))


def test_trainer_stops_at_the_first_non_finite_loss(tmp_path) -> None:
    model = tiny_model()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        learning_rate=0.01,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    data = [{"pixel_values": x, "labels": y} for x, y in zip(batch(24)["pixel_values"], batch(24)["labels"])]
    trainer = MSQTrainer(
        model=model, args=args, train_dataset=data, msq_config=config(prune_interval=10), callbacks=[Diverge(2)]
    )
    with pytest.raises(MSQTrainingError, match="the training loss is nan at step 3"):
        trainer.train()
    assert trainer.state.global_step == 2
