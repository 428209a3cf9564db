"""``rewind_weights``: at the final round the weights go back to the start of training, the bit scheme stays.

Checked in every front end (a hand-written loop, ``MSQTrainer``, a plain ``Trainer`` with ``MSQCallback``): right
after the final round every parameter equals its value at the start, ``bits``/``k`` are the scheme found, and the
optimizer state is empty; a run resumed from a checkpoint written before the final round goes back to the weights
that checkpoint carries (``msq_rewind.safetensors``), not to the model it was resumed into.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, toy_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import msq_hf
from msq_hf.errors import MSQFormatError, MSQMissingFileError
from msq_hf.io.format import REWIND_NAME
from msq_hf.pipeline.evals import pacing_summary
from msq_hf.training import callback as callback_module
from msq_hf.training.callback import MSQCallback, refuse_sharded_writes
from msq_hf.training.controller import MSQController
from msq_hf.training.rewind import WeightSnapshot, rewound_tensors
from msq_hf.training.trainer import MSQTrainer

torch.set_num_threads(1)


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TINY_MODELS["hf/vit"]()


def config(**kw) -> msq_hf.MSQConfig:
    # the first pruning step (step 4) is the forced final round of an 8-step run: a known rewind step
    base = dict(
        reg_strength=1.0,
        hessian_guided=False,
        target_compression=6.0,
        prune_interval=4,
        warmup_fraction=0.0,
        final_round_fraction=0.5,
        rewind_weights=True,
    )
    base.update(kw)
    return msq_hf.MSQConfig(**base)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_snapshot_restores_every_tensor_but_not_the_bit_scheme() -> None:
    model = msq_hf.quantize_model(tiny_vit(), config())
    start = parameters(model)
    snapshot = WeightSnapshot.take(model)
    assert not any(name.endswith((".bits", ".k")) for name in snapshot.tensors)
    layer = next(m for m in model.modules() if hasattr(m, "set_bits"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    layer.set_bits(4, 1)
    snapshot.restore(model)
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert (layer.n_bits, layer.n_k) == (4, 1), "the scheme found by the search must survive the rewind"


def test_restore_refuses_another_model_and_writes_nothing() -> None:
    model = msq_hf.quantize_model(tiny_vit(), config())
    snapshot = WeightSnapshot.take(model)
    name = next(iter(snapshot.tensors))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = parameters(model)
    wrong_shape = WeightSnapshot({**snapshot.tensors, name: torch.zeros(3)}, "wrong")
    with pytest.raises(MSQFormatError, match=rf"wrong: 1 tensor\(s\) differ.*{name}"):
        wrong_shape.restore(model)
    missing = WeightSnapshot({k: v for k, v in snapshot.tensors.items() if k != name}, "short")
    with pytest.raises(MSQFormatError, match=rf"short does not match.*{name}"):
        missing.restore(model)
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters()), "a refused restore wrote tensors"


def test_save_and_load_round_trip(tmp_path) -> None:
    model = msq_hf.quantize_model(tiny_vit(), config())
    snapshot = WeightSnapshot.take(model)
    path = snapshot.save(tmp_path)
    assert os.path.basename(path) == REWIND_NAME and os.listdir(tmp_path) == [REWIND_NAME]  # no .tmp left
    loaded = WeightSnapshot.load(tmp_path)
    assert loaded.tensors.keys() == snapshot.tensors.keys()
    assert all(torch.equal(loaded.tensors[n], t) for n, t in snapshot.tensors.items())
    with pytest.raises(MSQMissingFileError, match=REWIND_NAME):
        WeightSnapshot.load(tmp_path / "empty")


def test_hand_loop_needs_the_optimizer_and_rewinds_at_the_final_round() -> None:
    model = msq_hf.quantize_model(tiny_vit(), config())
    start = parameters(model)
    ctl = MSQController(model, total_steps=8)
    rows = toy_dataset(8)
    batch = {
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
        "labels": torch.stack([r["labels"] for r in rows]),
    }
    with pytest.raises(ValueError, match="rewind_weights=True: pass maybe_step"):
        ctl.maybe_step(1, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(1, 9):
        loss = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"]) + ctl.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
        decision = ctl.maybe_step(step, batch, optimizer=opt)
        if decision is not None and decision.finalized:
            assert step == 4 and ctl.snapshot is None
            assert all(torch.equal(p, start[n]) for n, p in model.named_parameters()), "not rewound"
            assert len(opt.state) == 0, "the search's momentum must be cleared"
            assert ctl.compression >= 6.0 and ctl.bits == decision.bits
    assert pacing_summary(ctl, [], 1.0)["rewound_at_step"] == 4


class AtTheFinalRound(TrainerCallback):
    """Records the parameters and the optimizer state size right after the step that finalized MSQ."""

    def __init__(self, controller_of):
        self.controller_of, self.seen = controller_of, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if self.seen is None and self.controller_of().finalized:
            self.seen = (state.global_step, parameters(model), len(optimizer.state))


def arguments(tmp_path, name: str, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        learning_rate=0.05,
        max_steps=8,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        optim="sgd",
        optim_args="momentum=0.9",
    )
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("front", ["msq_trainer", "plain_trainer"])
def test_trainers_rewind_at_the_final_round(front: str, tmp_path) -> None:
    rows, cfg = toy_dataset(16), config()
    if front == "msq_trainer":
        model = tiny_vit()
        start = parameters(model)
        probe = AtTheFinalRound(lambda: trainer.msq_controller)
        trainer = MSQTrainer(model=model, args=arguments(tmp_path, front), train_dataset=rows, msq_config=cfg)
        trainer.add_callback(probe)  # after MSQTrainer's own callback
        controller = trainer.msq_controller
    else:
        model = msq_hf.quantize_model(tiny_vit(), cfg)
        start = parameters(model)
        callback = MSQCallback(cfg)
        probe = AtTheFinalRound(lambda: callback.controller)
        trainer = Trainer(model=model, args=arguments(tmp_path, front), train_dataset=rows, callbacks=[callback, probe])
        controller = callback.controller
    trainer.train()
    step, weights, optimizer_entries = probe.seen
    assert step == 4 and optimizer_entries == 0
    assert weights.keys() == start.keys() and all(torch.equal(weights[n], start[n]) for n in start)
    assert controller.compression >= 6.0 and controller.snapshot is None
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters()), "QAT trains after the rewind"


def test_a_resumed_run_goes_back_to_the_checkpoints_start(tmp_path) -> None:
    rows, cfg = toy_dataset(16), config()
    first = tiny_vit(seed=0)
    start = parameters(first)
    args = arguments(tmp_path, "run", save_strategy="steps", save_steps=2)
    MSQTrainer(model=first, args=args, train_dataset=rows, msq_config=cfg).train()
    before, after = tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"
    assert (before / REWIND_NAME).is_file(), "a checkpoint before the final round must carry the start weights"
    assert not (after / REWIND_NAME).exists(), "after the rewind there is nothing to go back to"

    other = tiny_vit(seed=1)  # a different initialisation: the rewind must not go back to it
    assert any(not torch.equal(p, start[n]) for n, p in other.named_parameters())
    trainer = MSQTrainer(model=other, args=arguments(tmp_path, "resumed"), train_dataset=rows, msq_config=cfg)
    probe = AtTheFinalRound(lambda: trainer.msq_controller)
    trainer.add_callback(probe)
    trainer.train(resume_from_checkpoint=str(before))
    step, weights, _ = probe.seen
    assert step == 4 and all(torch.equal(weights[n], start[n]) for n in start)

    broken = tmp_path / "broken"
    shutil.copytree(before, broken)
    (broken / REWIND_NAME).unlink()
    trainer = MSQTrainer(model=tiny_vit(), args=arguments(tmp_path, "broken-run"), train_dataset=rows, msq_config=cfg)
    with pytest.raises(MSQMissingFileError, match=REWIND_NAME):
        trainer.train(resume_from_checkpoint=str(broken))


def test_the_snapshot_leaves_out_only_the_bit_scheme() -> None:
    model = msq_hf.quantize_model(TINY_MODELS["timm/test_resnet"](), config())
    kept = set(rewound_tensors(model))
    scheme = {n for n in model.state_dict() if n.endswith((".bits", ".k"))}
    assert scheme and kept == set(model.state_dict()) - scheme
    assert any("running_mean" in n for n in kept), "BatchNorm statistics go back with the weights"


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP"])
@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"lsb_update": "proximal"}, "lsb_update='proximal'"),
        ({"rewind_weights": True}, "rewind_weights=True"),
        ({"qat_scale": "mse"}, "qat_scale='mse'"),
    ],
)
def test_in_place_weight_writes_are_refused_when_sharded(kind: str, field: dict, message: str, monkeypatch) -> None:
    # the proximal step, the rewind and the clip write whole weights in place: DeepSpeed and FSDP shard them
    from accelerate.utils import DistributedType

    class Sharded:
        distributed_type = DistributedType[kind]

    monkeypatch.setattr(callback_module, "PartialState", Sharded)
    with pytest.raises(ValueError, match=f"{message} is not supported under {DistributedType[kind].value}"):
        refuse_sharded_writes(config(**{"rewind_weights": False, **field}))
    refuse_sharded_writes(config(rewind_weights=False))  # the loss-term regularizer, no rewind: works there
