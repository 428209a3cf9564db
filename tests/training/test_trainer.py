"""MSQTrainer / MSQCallback: loss, gradient accumulation, pruning, logs, checkpoints, resume, model kinds."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from conftest import FRONTS, trainer_for
from torch import nn
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

import msq_hf
import msq_hf.models  # noqa: F401  (registers resnet20_cifar with timm)
from msq_hf.training.callback import MSQCallback, can_join_after_clipping
from msq_hf.training.measure import default_loss
from msq_hf.training.trainer import MSQ_STATE_NAME, MSQTrainer, load_timm_checkpoint, read_msq_state

timm = pytest.importorskip("timm")

torch.set_num_threads(1)

NUM_CLASSES = 3


def make_dataset(n: int = 16, size: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A learnable toy task: the class sets the mean of one colour channel."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % NUM_CLASSES
        x = torch.randn(3, size, size, generator=g) * 0.5
        x[label] += 1.0
        rows.append({"pixel_values": x, "labels": torch.tensor(label)})
    return rows


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=NUM_CLASSES,
    )
    return ViTForImageClassification(cfg)


def tiny_timm_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=1,
        embed_dim=16,
        num_heads=2,
        num_classes=NUM_CLASSES,
    )


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet20_cifar", pretrained=False, num_classes=NUM_CLASSES)


def args_for(tmp_path, name: str = "run", **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=8,
        learning_rate=0.05,
        max_steps=6,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        max_grad_norm=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


class GradCapture(TrainerCallback):
    """Copies every gradient right before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class LogCapture(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append({**logs, "_step": state.global_step})


# ---------------------------------------------------------------------------------------------
# loss and gradient accumulation
# ---------------------------------------------------------------------------------------------


def test_regularizer_joins_the_loss_only_in_training(tmp_path) -> None:
    cfg = msq_hf.MSQConfig(
        reg_strength=1.0, hessian_guided=False, target_compression=5.0, prune_interval=100, warmup_fraction=0.0
    )
    model = tiny_resnet()
    trainer = MSQTrainer(model=model, args=args_for(tmp_path), train_dataset=make_dataset(), msq_config=cfg)
    batch = trainer.data_collator(make_dataset(8))
    ctl = trainer.msq_controller
    model.train()
    loss = trainer.compute_loss(model, batch)  # first training batch: starts the controller (k > 0)
    assert ctl.started and all(layer.n_k > 0 for layer in ctl.layers.values())
    reg = ctl.last_regularization
    assert reg > 0
    model.train()
    with torch.no_grad():
        task = default_loss(model, batch)
    # BN in train mode uses batch statistics: the same forward, so the difference is the regularizer
    assert float(loss.detach()) - float(task) == pytest.approx(reg, rel=1e-4)
    model.eval()
    with torch.no_grad():
        eval_loss = trainer.compute_loss(model, batch)
        eval_task = default_loss(model, batch)
    assert float(eval_loss) == pytest.approx(float(eval_task), abs=1e-7)
    assert ctl.regularization().item() == 0.0


def _grads(model_fn, tmp_path, name, ga, reg, data) -> dict[str, torch.Tensor]:
    # target 1.0: one optimizer step cannot prune anything, and the test is about the step-0 regularizer
    cfg = msq_hf.MSQConfig(
        reg_strength=reg, hessian_guided=False, target_compression=1.0, prune_interval=100, warmup_fraction=0.0
    )
    cap = GradCapture()
    args = args_for(
        tmp_path,
        name,
        per_device_train_batch_size=len(data) // ga,
        gradient_accumulation_steps=ga,
        max_steps=1,
        learning_rate=0.0,
    )
    trainer = MSQTrainer(model=model_fn(), args=args, train_dataset=data, msq_config=cfg, callbacks=[cap])
    trainer.train()
    assert cap.grads
    return cap.grads


@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_timm_vit], ids=["hf_vit", "timm_vit"])
def test_gradient_accumulation_matches_one_big_batch(model_fn, tmp_path) -> None:
    # models without BatchNorm, so micro-batches see the same function as the full batch
    data = make_dataset(8)
    reg = 10.0  # step units: the pull must stand out of the task gradient for the comparison to mean anything
    g1 = _grads(model_fn, tmp_path, "ga1", 1, reg, data)
    g2 = _grads(model_fn, tmp_path, "ga2", 2, reg, data)
    g0 = _grads(model_fn, tmp_path, "noreg", 1, 0.0, data)
    quantized = [n for n in g1 if n.endswith("weight") and g1[n].dim() >= 2]
    assert quantized
    reg_effect = max(float((g1[n] - g0[n]).abs().max()) for n in quantized)
    assert reg_effect > 1e-3, "the regularizer must visibly change the gradient for this test to mean anything"
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("front", FRONTS)
def test_regularizer_gradient_joins_after_clipping_unclipped(front: str, tmp_path) -> None:
    # clip at 1e-3: the task gradient (norm ~1) is scaled down ~1000x; the LSB pull must arrive in full, once
    data = make_dataset(8)

    def first_grads(name: str, reg: float, clip: float, after: bool = True) -> tuple[dict[str, torch.Tensor], Any]:
        cfg = msq_hf.MSQConfig(
            reg_strength=reg,
            hessian_guided=False,
            target_compression=1.0,
            prune_interval=100,
            warmup_fraction=0.0,
            regularizer_after_clipping=after,
        )
        cap = GradCapture()
        args = args_for(tmp_path, name, max_steps=1, learning_rate=0.0, max_grad_norm=clip)
        trainer, callback = trainer_for(front, tiny_vit(), cfg, args, data, [cap])
        trainer.train()
        return cap.grads, callback

    task, _ = first_grads("task", 0.0, 0.0)
    in_loss, _ = first_grads("in_loss", 10.0, 0.0)  # no clipping: lambda * R is part of the loss
    clipped, callback = first_grads("clipped", 10.0, 1e-3)
    assert callback.after_clipping and not can_join_after_clipping(args_for(tmp_path, "x", max_grad_norm=0.0))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in task.values()]))
    coef = min(1.0, 1e-3 / (float(norm) + 1e-6))  # torch.nn.utils.clip_grad_norm_'s factor
    assert coef < 0.01
    reg_part = {n: in_loss[n] - task[n] for n in task}
    quantized = [f"{n}.weight" for n in callback.controller.names]
    assert max(float(reg_part[n].abs().max()) for n in quantized) > 1e-3, "the pull must be visible"
    for name in task:
        torch.testing.assert_close(clipped[name], task[name] * coef + reg_part[name], rtol=1e-4, atol=1e-6, msg=name)
    # the default: lambda * R is a loss term, clipped with the task gradient
    as_loss_term, default_cb = first_grads("default", 10.0, 1e-3, after=False)
    assert not default_cb.after_clipping
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in in_loss.values()])))
    for name in task:
        torch.testing.assert_close(as_loss_term[name], in_loss[name] * (1e-3 / (total + 1e-6)), rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# pruning, phases, logs
# ---------------------------------------------------------------------------------------------


def pruning_config(**kw) -> msq_hf.MSQConfig:
    base = dict(
        init_bits=8,
        target_compression=6.0,
        reg_strength=2e-3,
        prune_threshold=0.6,
        prune_interval=2,
        hessian_guided=True,
        hessian_max_probes=2,
        hessian_batch_size=4,
        final_round_fraction=0.8,
    )
    base.update(kw)
    return msq_hf.MSQConfig(**base)


def test_pruning_lowers_bits_at_the_interval_then_qat(tmp_path) -> None:
    logs = LogCapture()
    trainer = MSQTrainer(
        model=tiny_resnet(),
        args=args_for(tmp_path, max_steps=12),
        train_dataset=make_dataset(32),
        msq_config=pruning_config(),
        callbacks=[logs],
        msq_layer_logs="pruning",
    )
    trainer.train()
    ctl = trainer.msq_controller
    pruning_steps = [h["step"] for h in ctl.history[1:]]  # history[0] is the start (after the warm-up)
    assert pruning_steps and all(step % 2 == 0 for step in pruning_steps)
    # the controller learned the optimizer's learning rate at the last pruning step (it bounds lambda's pull)
    lr_at_last_pruning = trainer.lr_scheduler.lr_lambdas[0](pruning_steps[-1]) * trainer.args.learning_rate
    assert ctl.learning_rate == pytest.approx(lr_at_last_pruning)
    avg_bits = [h["avg_bits"] for h in ctl.history]
    assert avg_bits[-1] < avg_bits[0] == 8.0
    assert all(b <= a for a, b in zip(avg_bits, avg_bits[1:]))
    assert ctl.compression >= 6.0 and ctl.phase == "qat"
    assert all(layer.n_k == 0 for layer in ctl.layers.values())
    trainer.model.train()
    trainer.compute_loss(trainer.model, trainer.data_collator(make_dataset(4)))
    assert ctl.regularization().item() == 0.0 and not ctl.regularization().requires_grad
    # logs: every training log carries the global msq metrics (also in log_history); the per-layer
    # ones (msq_layer_logs="pruning") exactly in the logs of pruning steps and the final log
    train_logs = [entry for entry in logs.logs if "loss" in entry or "train_runtime" in entry]
    assert train_logs and "train_runtime" in train_logs[-1]
    qat_logs = 0
    for entry in train_logs:
        for key in ("msq/compression", "msq/avg_bits", "msq/phase", "msq/reg"):
            assert key in entry
        layer_keys = any(k.startswith("msq/bits/") for k in entry)
        assert layer_keys == (entry["_step"] in pruning_steps or "train_runtime" in entry), entry["_step"]
        if layer_keys:
            assert any(k.startswith("msq/nonzero/") for k in entry) and any(k.startswith("msq/sens/") for k in entry)
        qat_logs += not layer_keys
    assert qat_logs > 0, "no log without per-layer entries: the QAT phase was not logged"
    assert train_logs[-1]["msq/compression"] == pytest.approx(ctl.compression, rel=1e-3)
    assert any("msq/compression" in h for h in trainer.state.log_history)


def test_unreachable_target_fails_before_training(tmp_path) -> None:
    # MSQConfig validates on construction; an edit afterwards (min_bits=4 caps compression at 8x)
    # must still fail before the first optimizer step
    cfg = pruning_config(target_compression=5.0, prune_interval=5, min_bits=4)
    cfg.target_compression = 16.0
    trainer = MSQTrainer(
        model=tiny_resnet(), args=args_for(tmp_path, max_steps=10), train_dataset=make_dataset(16), msq_config=cfg
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="target_compression=16 is unreachable"):
        trainer.train()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed although training should not have started"


# ---------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------


def _run(tmp_path, name, resume=None):
    args = args_for(tmp_path, name, max_steps=12, save_strategy="steps", save_steps=4, logging_steps=4)
    trainer = MSQTrainer(
        model=tiny_resnet(),
        args=args,
        train_dataset=make_dataset(48),
        msq_config=pruning_config(target_compression=8.0, prune_threshold=0.5, final_round_fraction=0.9),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_checkpoint_has_msq_state_and_resume_gives_same_scheme(tmp_path) -> None:
    full = _run(tmp_path, "full")
    ckpt = tmp_path / "full" / "checkpoint-4"
    state = read_msq_state(ckpt)
    assert state is not None and (ckpt / MSQ_STATE_NAME).is_file()
    json.dumps(state)  # JSON-able
    assert state["phase"] == "regularize", "checkpoint-4 must be mid-pruning for this test"
    assert len(full.msq_controller.history) > 1, "pruning must have happened"
    # a raw timm checkpoint can be rebuilt from config.json + model.safetensors
    rebuilt = load_timm_checkpoint(ckpt)
    assert msq_hf.bit_scheme(rebuilt) == state["bits"]
    resumed = _run(tmp_path, "resumed", resume=str(ckpt))
    assert msq_hf.bit_scheme(resumed.model) == msq_hf.bit_scheme(full.model)
    assert [(h["step"], h["bits"]) for h in resumed.msq_controller.history] == [
        (h["step"], h["bits"]) for h in full.msq_controller.history
    ]
    assert resumed.msq_controller.phase == full.msq_controller.phase


# ---------------------------------------------------------------------------------------------
# model kinds
# ---------------------------------------------------------------------------------------------


def tiny_timm_wrapper(seed: int = 0) -> nn.Module:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet20_cifar", num_labels=NUM_CLASSES))


@pytest.mark.parametrize("model_fn", [tiny_resnet, tiny_timm_wrapper, tiny_vit], ids=["timm", "timm_wrapper", "hf_vit"])
def test_model_kinds_train_and_prune(model_fn, tmp_path) -> None:
    trainer = MSQTrainer(
        model=model_fn(),
        args=args_for(tmp_path, max_steps=8),
        train_dataset=make_dataset(32),
        eval_dataset=make_dataset(8, seed=1),
        msq_config=pruning_config(target_compression=5.0),
    )
    trainer.train()
    ctl = trainer.msq_controller
    assert ctl.compression >= 5.0 and ctl.phase == "qat"
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_requires_msq_layers_or_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="msq_config"):
        MSQTrainer(model=tiny_resnet(), args=args_for(tmp_path), train_dataset=make_dataset(8))


def test_raw_model_argument_defaults(tmp_path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path / "d"), report_to=[], use_cpu=True)
    assert args.remove_unused_columns and args.label_names is None
    trainer = MSQTrainer(model=tiny_resnet(), args=args, train_dataset=make_dataset(8), msq_config=pruning_config())
    assert trainer.args.remove_unused_columns is False and trainer.args.label_names == ["labels"]
    assert trainer.model_accepts_loss_kwargs is False
    hf = MSQTrainer(
        model=tiny_vit(),
        args=TrainingArguments(output_dir=str(tmp_path / "e"), report_to=[], use_cpu=True),
        train_dataset=make_dataset(8),
        msq_config=pruning_config(),
    )
    assert hf.args.remove_unused_columns is True  # HF models keep the Trainer's defaults
    assert copy.copy(hf.msq_controller.names)


# ---------------------------------------------------------------------------------------------
# real data (mechanics): ResNet-20 on a Fashion-MNIST slice reaches 8x and learns
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet20_fashion_mnist_reaches_target_and_learns(tmp_path) -> None:
    import numpy as np

    from msq_hf.data import load_digits_dataset, load_fashion_mnist

    try:
        train, test = (
            load_fashion_mnist("train", limit=3000, allow_hub=False),
            load_fashion_mnist("test", limit=500, allow_hub=False),
        )
    except FileNotFoundError:
        pytest.importorskip("sklearn")
        train, test = load_digits_dataset("train"), load_digits_dataset("test")
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", pretrained=False, num_classes=10)
    cfg = msq_hf.MSQConfig(
        init_bits=8,
        target_compression=8.0,
        prune_threshold=0.3,
        prune_interval=3,  # 90 steps: the feedback needs a few pruning steps to find lambda
        reg_strength=2.0,
        reg_gain=2.0,
        hessian_max_probes=2,
        hessian_batch_size=32,
        final_round_fraction=0.7,
    )
    args = args_for(
        tmp_path,
        per_device_train_batch_size=64,
        max_steps=90,
        learning_rate=0.1,
        lr_scheduler_type="cosine",
        weight_decay=5e-4,
        optim="sgd",
        logging_steps=30,
        # no clipping: the clip would scale the regularizer's pull down with the task gradient once lambda
        # grows (docs/pruning.md, "Pacing"), and this 90-step run needs the feedback's full range
        max_grad_norm=0.0,
    )
    trainer = MSQTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        msq_config=cfg,
        compute_metrics=lambda p: {"acc": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
    )
    trainer.train()
    ctl = trainer.msq_controller
    avg = [h["avg_bits"] for h in ctl.history]
    assert avg[0] == 8.0 and all(b <= a for a, b in zip(avg, avg[1:])) and len(set(avg)) >= 3
    assert ctl.compression >= 8.0 and ctl.phase == "qat"
    # MSQ's own mechanism did the pruning: threshold steps paced by the lambda feedback, not the forced round
    share = ctl.pruning_share()
    assert share["threshold_share"] >= 0.9 and share["forced_layers"] <= 3, share
    metrics = trainer.evaluate()
    assert metrics["eval_acc"] > 0.4, metrics


def test_default_logs_hold_only_the_global_msq_values(tmp_path) -> None:
    """Issue 11.9: a log line shows the few global msq/* values, never the ~90 per-layer ones (by default)."""
    logs = LogCapture()
    trainer = MSQTrainer(
        model=tiny_resnet(),
        args=args_for(tmp_path, max_steps=6),
        train_dataset=make_dataset(16),
        msq_config=pruning_config(),
        callbacks=[logs],
    )
    trainer.train()
    assert len(trainer.msq_controller.history) > 1, "the run pruned nothing"
    train_logs = [entry for entry in logs.logs if "loss" in entry or "train_runtime" in entry]
    assert train_logs
    for entry in train_logs:
        msq_keys = [k for k in entry if k.startswith("msq/")]
        assert "msq/compression" in msq_keys and len(msq_keys) <= 8, msq_keys


class ShareSetter(TrainerCallback):
    """Gives the first MSQ layer a zero share of lambda before the first step (what lsb_pull="sensitivity" does
    to a layer the Hessian keeps)."""

    def __init__(self, msq_callback: MSQCallback) -> None:
        self.msq_callback = msq_callback

    def on_step_begin(self, args, state, control, **kw):
        regularizer = self.msq_callback.controller.regularizer
        regularizer.weights = {**regularizer.weights, next(iter(regularizer.weights)): 0.0}


@pytest.mark.parametrize("after", [False, True], ids=["in_loss", "after_clipping"])
@pytest.mark.parametrize("front", FRONTS)
def test_every_path_of_the_pull_applies_each_layers_share(front: str, after: bool, tmp_path) -> None:
    data = make_dataset(8)

    def first_grads(name: str, reg: float, share: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
        cfg = msq_hf.MSQConfig(
            reg_strength=reg, hessian_guided=False, target_compression=1.0, prune_interval=100, warmup_fraction=0.0,
            regularizer_after_clipping=after,
        )  # fmt: skip
        cap, args = GradCapture(), args_for(tmp_path, name, max_steps=1, learning_rate=0.0, max_grad_norm=1e3)
        trainer, callback = trainer_for(front, tiny_vit(), cfg, args, data, [cap])
        if share:
            trainer.add_callback(ShareSetter(callback))
        trainer.train()
        return cap.grads, [f"{n}.weight" for n in callback.controller.names]

    task, names = first_grads("task", 0.0, False)
    full, _ = first_grads("full", 10.0, False)
    shared, _ = first_grads("shared", 10.0, True)
    assert float((full[names[0]] - task[names[0]]).abs().max()) > 1e-3, "the pull must be visible"
    torch.testing.assert_close(shared[names[0]], task[names[0]], rtol=1e-4, atol=1e-7)  # share 0: no pull
    for name in names[1:]:
        torch.testing.assert_close(shared[name], full[name], rtol=1e-4, atol=1e-7, msg=name)  # share 1: as before
