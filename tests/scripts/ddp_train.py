"""Two-process CPU (gloo) MSQTrainer run; every rank writes its bit scheme and pruning history.

Run by ``tests/test_distributed.py`` as::

    torchrun --nproc_per_node 2 tests/scripts/ddp_train.py OUT_DIR [QAT_SCALE]

Each rank sees different samples (DistributedSampler), so its local sensitivities differ; the
controller reduces rates and sensitivities across ranks, so all ranks must take identical decisions.
DDP's buffer broadcast is switched off, so a divergent decision would stay visible in the output. The run uses
``rewind_weights`` and ``qat_scale="mse"``: at the final round every rank must put back the weights it started
from, clipped to the scales fitted to the scheme found, and clear its optimizer state (recorded by a callback right
after that step). With ``QAT_SCALE=learned`` the weights are not clipped; each layer's learned step starts at the
fitted scale and DDP must then keep the steps of the ranks identical (they are written at the end).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback, TrainingArguments

import msq_hf
from msq_hf.quant.clip import clip_weight_
from msq_hf.training.trainer import MSQTrainer


class AtTheFinalRound(TrainerCallback):
    """Right after the step that finalized MSQ: do the parameters equal the start, and is the optimizer state empty?"""

    def __init__(self, start: dict[str, torch.Tensor], clipped: bool):
        self.start, self.clipped, self.controller, self.seen = start, clipped, None, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if self.seen is None and self.controller.finalized:
            live = dict(model.module.named_parameters() if hasattr(model, "module") else model.named_parameters())
            ratios = {f"{name}.weight": c for name, c in self.controller.clip_ratios.items()} if self.clipped else {}
            expected = {n: clip_weight_(w.clone(), ratios[n]) if n in ratios else w for n, w in self.start.items()}
            same = all(torch.equal(live[name].detach(), w) for name, w in expected.items())
            self.seen = {"step": state.global_step, "rewound": same, "optimizer_entries": len(optimizer.state)}
            self.seen["clip_ratios"] = dict(self.controller.clip_ratios)
            self.seen["steps"] = learned_steps(self.controller)


def learned_steps(controller) -> dict[str, float]:
    return {name: float(layer.weight_step) for name, layer in controller.layers.items() if layer.learned_step_active}


def main(out_dir: str, qat_scale: str = "mse") -> None:
    torch.set_num_threads(1)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=1,
        embed_dim=16,
        num_heads=2,
        num_classes=3,
    )
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(64):
        x = torch.randn(3, 16, 16, generator=g) * 0.5
        x[i % 3] += 1.0
        rows.append({"pixel_values": x, "labels": torch.tensor(i % 3)})
    cfg = msq_hf.MSQConfig(
        init_bits=8,
        target_compression=5.0,
        reg_strength=2e-3,
        prune_threshold=0.6,
        prune_interval=2,
        hessian_max_probes=2,
        hessian_batch_size=4,
        final_round_fraction=0.8,
        rewind_weights=True,
        qat_scale=qat_scale,
    )
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=8,
        max_steps=8,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        logging_steps=4,
        ddp_broadcast_buffers=False,
        ddp_find_unused_parameters=qat_scale == "learned",  # the learned steps are unused until the final round
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    probe = AtTheFinalRound({name: p.detach().clone() for name, p in model.named_parameters()}, qat_scale == "mse")
    trainer = MSQTrainer(model=model, args=args, train_dataset=rows, msq_config=cfg)
    probe.controller = trainer.msq_controller
    trainer.add_callback(probe)
    trainer.train()
    ctl = trainer.msq_controller
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "distributed": bool(torch.distributed.is_initialized()),
        "bits": msq_hf.bit_scheme(trainer.model),
        "compression": ctl.compression,
        "phase": ctl.phase,
        "history": [{"step": h["step"], "bits": h["bits"], "k": h["k"]} for h in ctl.history],
        "sensitivities": [h["sensitivities"] for h in ctl.history],
        "at_final_round": probe.seen,
        "learned_steps": learned_steps(ctl),
        "final_weights_sum": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
    }
    with open(os.path.join(out_dir, f"scheme_rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
