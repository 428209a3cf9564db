"""The Hugging Face user's training paths, table-driven over the model families (issue 11, items 1, 3, 10).

* resume: a run resumed from a mid-pruning checkpoint ends bit-identical to the uninterrupted run (every
  state-dict tensor, bits/k, msq_state), for HF ViT/DeiT/Swin (saved by transformers 5 under legacy key names),
  ConvNext, ResNet, TimmWrapper and a raw timm model;
* ``load_best_model_at_end``: the final model is the best checkpoint (every tensor and its schedule);
* a checkpoint with a deleted tensor fails loudly, naming the tensor and the folder, and loads nothing;
* ``transformers.Trainer(callbacks=[MSQCallback(config)])`` runs the same MSQ method as ``MSQTrainer``; a plain
  ``Trainer`` on an MSQ model without it warns; the callback refuses models it cannot train;
* ``MSQTrainer(model=<a loaded packed export>)`` says what the model is and how to fine-tune it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import IMAGE_SIZE, NUM_CLASSES, TINY_MODELS
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import msq_hf
from msq_hf.data.collate import collate_pixel_values
from msq_hf.errors import MSQFormatError
from msq_hf.training.callback import MSQCallback
from msq_hf.training.checkpoint import load_checkpoint_exact, read_msq_state
from msq_hf.training.trainer import MSQTrainer

FAMILIES = ["hf/vit", "hf/deit", "hf/swin", "hf/convnext", "hf/resnet", "hf/timm_wrapper", "timm/test_resnet"]
STEPS = 6  # 4 batches per epoch: the resumed run crosses an epoch boundary


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TINY_MODELS[family]()
    if family == "hf/deit":  # the "WithTeacher" head computes no loss: train the plain DeiT classifier
        model = transformers.DeiTForImageClassification(model.config)
    return model


def dataset(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


def config(**kw) -> msq_hf.MSQConfig:
    base = dict(
        init_bits=6,
        target_compression=10.0,
        reg_strength=5.0,
        prune_threshold=0.9,
        prune_interval=2,
        hessian_max_probes=2,
        hessian_batch_size=4,
        final_round_fraction=0.8,
        warmup_fraction=0.0,  # the first step's gradient already carries the regularizer
    )
    return msq_hf.MSQConfig(**{**base, **kw})


def arguments(output_dir, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=0.05,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=2,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **kw})


class ScriptedMetric:
    """``compute_metrics`` whose scores are scripted per evaluation (the 1st evaluation is the best)."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)

    def __call__(self, prediction) -> dict[str, float]:
        return {"score": self.scores.pop(0)}


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def checkpoint_model(family: str, folder) -> torch.nn.Module:
    model = build(family)
    msq_hf.quantize_model(model, config())
    load_checkpoint_exact(model, folder)
    return model


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=x) if isinstance(model, transformers.PreTrainedModel) else model(x)
    return getattr(out, "logits", out)


# ---------------------------------------------------------------------------------------------
# item 1: resume and load_best_model_at_end, exact for every family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_and_best_model_are_exact(family: str, tmp_path) -> None:
    # (a) uninterrupted run, evaluated every 2 steps; the scripted metric makes checkpoint-2 the best one
    def trainer(name: str, scores: list[float], **kw) -> MSQTrainer:
        # the same evaluations in both runs: every eval DataLoader draws a seed from the global RNG, which
        # the stochastic depth of Swin then sees
        args = arguments(tmp_path / name, eval_strategy="steps", eval_steps=2, metric_for_best_model="score", **kw)
        return MSQTrainer(
            model=build(family),
            args=args,
            train_dataset=dataset(),
            eval_dataset=dataset(8, seed=1),
            compute_metrics=ScriptedMetric(scores),
            msq_config=config(),
            msq_layer_logs="never",
        )

    full = trainer("full", [3.0, 1.0, 2.0], load_best_model_at_end=True)
    full.train()
    ckpt2, ckpt6 = tmp_path / "full" / "checkpoint-2", tmp_path / "full" / f"checkpoint-{STEPS}"
    mid, last = read_msq_state(ckpt2), read_msq_state(ckpt6)
    assert mid["phase"] == "regularize", "checkpoint-2 must be taken mid-pruning"
    assert mid["bits"] != last["bits"], "the bits must change after the checkpoint"

    # (c) load_best_model_at_end: the final model *is* checkpoint-2 (every tensor, bits, k, schedule)
    assert full.state.best_model_checkpoint == str(ckpt2)
    assert state_equal(full.model.state_dict(), checkpoint_model(family, ckpt2).state_dict()) == []
    assert msq_hf.bit_scheme(full.model) == mid["bits"]
    assert json.loads(json.dumps(full.msq_controller.state_dict())) == mid

    # (b) a fresh trainer resumes from checkpoint-2 and ends where the uninterrupted run was at step 6
    resumed = trainer("resumed", [1.0, 2.0])
    resumed.train(resume_from_checkpoint=str(ckpt2))
    reference = checkpoint_model(family, ckpt6)
    assert state_equal(resumed.model.state_dict(), reference.state_dict()) == []
    assert msq_hf.bit_scheme(resumed.model) == last["bits"]
    assert json.loads(json.dumps(resumed.msq_controller.state_dict())) == last
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(logits(resumed.model, x), logits(reference, x))


@pytest.mark.parametrize("family", ["hf/vit", "timm/test_resnet"])
def test_checkpoint_with_a_deleted_tensor_fails_loudly(family: str, tmp_path) -> None:
    run = MSQTrainer(
        model=build(family),
        args=arguments(tmp_path / "run", max_steps=2),
        train_dataset=dataset(16),
        msq_config=config(),
    )
    run.train()
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "run" / "checkpoint-2", broken)
    tensors = load_file(broken / "model.safetensors")
    victim = max((k for k in tensors if k.endswith(".bits")), key=len)  # a deep layer's (legacy-named) bits
    del tensors[victim]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})

    fresh = MSQTrainer(
        model=build(family), args=arguments(tmp_path / "again"), train_dataset=dataset(16), msq_config=config()
    )
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(MSQFormatError, match="refusing a partial load") as info:
        fresh.train(resume_from_checkpoint=str(broken))
    message = str(info.value)
    assert str(broken) in message and "missing (1)" in message
    named = [k for k in before if k in message]
    assert len(named) == 1 and named[0].endswith(".bits"), message
    assert state_equal(fresh.model.state_dict(), before) == []  # nothing was loaded


def test_resume_needs_the_msq_state(tmp_path) -> None:
    run = MSQTrainer(
        model=build("hf/vit"),
        args=arguments(tmp_path / "run", max_steps=2),
        train_dataset=dataset(16),
        msq_config=config(),
    )
    run.train()
    (tmp_path / "run" / "checkpoint-2" / "msq_state.json").unlink()
    fresh = MSQTrainer(
        model=build("hf/vit"), args=arguments(tmp_path / "b"), train_dataset=dataset(16), msq_config=config()
    )
    with pytest.raises(FileNotFoundError, match="msq_state.json is missing"):
        fresh.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


# ---------------------------------------------------------------------------------------------
# item 3: a plain transformers.Trainer with MSQCallback runs MSQ; without it, a warning
# ---------------------------------------------------------------------------------------------


class FirstGrads(TrainerCallback):
    """The gradients of the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_run(tmp_path, name: str, callbacks: list, **kw) -> Trainer:
    model = msq_hf.quantize_model(build("hf/vit"), config())
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path / name, save_strategy="no", max_grad_norm=0.0, **kw),
        train_dataset=dataset(),
        data_collator=collate_pixel_values,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_plain_trainer_with_msq_callback_runs_msq(tmp_path) -> None:
    ref_grads, cb_grads, none_grads = FirstGrads(), FirstGrads(), FirstGrads()
    reference = MSQTrainer(
        model=build("hf/vit"),
        args=arguments(tmp_path / "msq", save_strategy="no", max_grad_norm=0.0),
        train_dataset=dataset(),
        msq_config=config(),
        callbacks=[ref_grads],
    )
    reference.train()
    callback = MSQCallback(config())
    plain_run(tmp_path, "callback", [callback, cb_grads])
    with pytest.warns(UserWarning, match="nothing drives MSQ"):
        plain_run(tmp_path, "none", [none_grads])

    ctl, ref = callback.controller, reference.msq_controller
    # the regularizer gradient is there (a plain Trainer without the callback lacks exactly it) ...
    reg_part = {n: cb_grads.grads[n] - none_grads.grads[n] for n in cb_grads.grads}
    assert any(reg_part[f"{n}.weight"].abs().sum() > 0 for n in ctl.names)
    for name, grad in cb_grads.grads.items():
        torch.testing.assert_close(grad, ref_grads.grads[name], rtol=1e-5, atol=1e-7)
    # ... and the same pruning decisions follow: the MSQ method, not 8-bit QAT
    assert [(h["step"], h["bits"], h["k"]) for h in ctl.history] == [
        (h["step"], h["bits"], h["k"]) for h in ref.history
    ]
    assert ctl.phase == "qat" and ctl.compression >= config().target_compression
    for name, layer in ctl.layers.items():
        torch.testing.assert_close(layer.weight, ref.layers[name].weight, rtol=1e-4, atol=1e-5)


def test_plain_trainer_with_msq_callback_resumes_exactly(tmp_path) -> None:
    def run(name: str, resume=None) -> MSQCallback:
        callback = MSQCallback(config())
        model = msq_hf.quantize_model(build("hf/swin"), config())
        trainer = Trainer(
            model=model,
            args=arguments(tmp_path / name),
            train_dataset=dataset(),
            data_collator=collate_pixel_values,
            callbacks=[callback],
        )
        trainer.train(resume_from_checkpoint=resume)
        return callback

    full = run("full")
    assert read_msq_state(tmp_path / "full" / "checkpoint-2")["phase"] == "regularize"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run("resumed", resume=str(tmp_path / "resumed" / "checkpoint-2"))
    assert state_equal(resumed.controller.model.state_dict(), full.controller.model.state_dict()) == []
    assert resumed.controller.state_dict() == full.controller.state_dict()


def test_msq_callback_refuses_what_it_cannot_train(tmp_path) -> None:
    args = arguments(tmp_path / "x", save_strategy="no")
    with pytest.raises(ValueError, match="has no MSQ layers; convert it before building the Trainer"):
        Trainer(model=build("hf/vit"), args=args, train_dataset=dataset(8), callbacks=[MSQCallback(config())])
    raw = msq_hf.quantize_model(build("timm/test_resnet"), config())
    with pytest.raises(ValueError, match="use msq_hf.MSQTrainer"):
        Trainer(model=raw, args=args, train_dataset=dataset(8), callbacks=[MSQCallback(config())])


# ---------------------------------------------------------------------------------------------
# item 10: a loaded packed export is inference-only, and the error says how to fine-tune it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["hf/vit", "timm/test_resnet"])
def test_trainer_on_a_loaded_export_says_what_to_do(family: str, tmp_path) -> None:
    model = msq_hf.quantize_model(build(family), config())
    msq_hf.export(model, tmp_path / "export")
    packed = msq_hf.from_pretrained(tmp_path / "export")
    args = arguments(tmp_path / "t", save_strategy="no")
    for make in (
        lambda: MSQTrainer(model=packed, args=args, train_dataset=dataset(8), msq_config=config()),
        lambda: Trainer(model=packed, args=args, train_dataset=dataset(8), callbacks=[MSQCallback(config())]),
    ):
        with pytest.raises(ValueError, match="packed msq_hf export") as info:
            make()
        assert "inference-only" in str(info.value) and "dequantize=True" in str(info.value)
    # the advice works: dequantize, then MSQ training starts again from the exported weights
    floats = msq_hf.from_pretrained(tmp_path / "export", dequantize=True)
    trainer = MSQTrainer(model=floats, args=args, train_dataset=dataset(8), msq_config=config())
    assert len(trainer.msq_controller.layers) == len(msq_hf.bit_scheme(model))
