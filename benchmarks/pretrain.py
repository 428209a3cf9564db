"""Pretrain the recipes' float starting points on the full Fashion-MNIST training set (issue 14).

The MSQ paper fine-tunes pretrained networks. Offline there are no ImageNet weights, so this script trains
the two architectures of the main regime on the 60,000 Fashion-MNIST training images and evaluates them on the
official 10,000 test images, never used for training (every epoch, or every ``eval_steps`` steps on the first
``eval_images`` of them, and the finished model on all of them):

* ``resnet18``: timm ``resnet18`` (unchanged architecture, 10 classes) at 32 px, 3 channels;
* ``deit_tiny``: transformers ``ViTForImageClassification`` with the DeiT-tiny shape (hidden 192, 12 layers,
  3 heads, MLP 768) at 32 px with 4 px patches (64 tokens + CLS), 10 labels named after the classes.

The data and the models come from :func:`msq_hf.pipeline.prepare` with ``--dataset_name fashion_mnist
--image_size 32``, so the inputs are exactly those the recipes train on (28 px images zero-padded to 32,
grey replicated to 3 channels, normalised with the Fashion-MNIST statistics). The results are saved where the
recipes' ``--model_name_or_path`` reads them:

* ``<output_root>/resnet18``: ``timm.models.save_for_hf`` (``config.json`` with the preprocessing and the class
  names, ``model.safetensors``);
* ``<output_root>/deit_tiny``: ``save_pretrained`` of the model and a ``DeiTImageProcessor`` that pads like
  the loader (:func:`padding_processor`), so ``transformers.pipeline`` sees the training pixels.

``SETTINGS`` holds each model's optimiser, batch, epochs and, in ``sizing``, why those epochs: they come from the
timing probe (``--probe``) and the wall-time budgets of issue 14 (ResNet-18 <= 30 min, DeiT-tiny <= 45 min).

Usage (from the repository root)::

    python benchmarks/pretrain.py --probe 200                 # time 200 steps of each model, nothing saved
    nohup python benchmarks/pretrain.py resnet18 --skip-done > runs/pretrained/resnet18.log 2>&1 &

Training resumes from the newest checkpoint in ``<output_root>/<model>-work`` (``--fresh`` ignores them);
``--skip-done`` skips a model whose folder exists and whose results JSON says ``"status": "done"``.
``benchmarks/results/pretrain/<model>.json`` holds the test accuracy of every evaluation, the wall time, the
seconds per step, the command, the seed and the library versions; it is rewritten after every evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (
    DefaultDataCollator,
    DeiTImageProcessor,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
)
from transformers.trainer_utils import get_last_checkpoint

import msq_hf
from msq_hf.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from msq_hf.integrations.timm import timm_data_config
from msq_hf.metrics import compute_accuracy_metrics
from msq_hf.pipeline import DataArguments, ModelArguments, Prepared, logits_of, prepare, steps_per_epoch
from msq_hf.training.checkpoint import load_checkpoint_exact

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
FASHION_MNIST_SIDE = 28
# what the saved timm config says about where its weights come from (instead of timm's default tag's values)
PRETRAINED_CFG = {
    "tag": "fashion_mnist_32",
    "origin_url": "benchmarks/pretrain.py (msq_hf)",
    "license": None,
    "paper_ids": None,
    "hf_hub_id": None,
}


@dataclass(frozen=True)
class Setting:
    """How one model is pretrained; ``sizing`` says why these epochs (from the timing probe).

    ``eval_steps``: evaluate every so many steps (None: at every epoch's end) on the first ``eval_images`` test
    images (None: all 10,000); the finished model is always evaluated on the whole test set.
    """

    name: str
    description: str
    epochs: float
    batch_size: int
    optim: str
    optim_args: str | None
    learning_rate: float
    weight_decay: float
    warmup: float  # fraction of all steps
    budget_minutes: float
    sizing: str
    eval_steps: int | None = None
    eval_images: int | None = None


SETTINGS: dict[str, Setting] = {
    "resnet18": Setting(
        name="resnet18",
        description="timm resnet18 (11.2 M parameters), 32 px, 3 channels, 10 classes, random init",
        epochs=2,
        batch_size=128,
        optim="sgd",
        optim_args="momentum=0.9,nesterov=true",
        learning_rate=0.1,
        weight_decay=5e-4,
        warmup=0.05,
        budget_minutes=30,
        sizing="200-step probe (1 thread, machine load average 4.8 from other jobs): 1.38 s/step at batch 128, "
        "469 steps = 10.8 min per epoch + 37 s test evaluation, 11.4 min per epoch, 2.6 epochs in 30 min; "
        "2 epochs chosen to stay within 30 min while the load was rising (8 at launch)",
    ),
    "deit_tiny": Setting(
        name="deit_tiny",
        description="ViTForImageClassification, DeiT-tiny shape (hidden 192, 12 layers, 3 heads, MLP 768), "
        "patch 4 at 32 px (65 tokens), 10 labels, random init",
        epochs=0.5,
        batch_size=64,
        optim="adamw_torch",
        optim_args=None,
        learning_rate=5e-4,
        weight_decay=0.05,
        warmup=0.1,
        budget_minutes=45,
        sizing="probe stopped after 39 of 200 steps (it would have taken 15-30 min): 3.4-5.3 s/step at batch 64 "
        "with 1 thread at load average ~5 from other jobs (6.8-12.8 s/step while more jobs ran), i.e. 938 "
        "steps = 55-80 min per epoch (about 2 GFLOP per training image); a full epoch does not fit in 45 min, so "
        "0.5 epoch (469 steps, cosine to zero) at the full DeiT-tiny depth and width, evaluated every 100 steps "
        "on the first 2,000 test images and at the end on all 10,000",
        eval_steps=100,
        eval_images=2000,
    ),
}


def deit_tiny_config() -> ViTConfig:
    """DeiT-tiny's shape as a transformers ViT at 32 px with 4 px patches, labelled with the Fashion-MNIST classes."""
    names = list(FASHION_MNIST_CLASSES)
    return ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        patch_size=4,
        image_size=IMAGE_SIZE,
        num_channels=3,
        qkv_bias=True,
        layer_norm_eps=1e-6,  # DeiT's (timm's) value; ViTConfig's default is BERT's 1e-12
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )


def prepare_run(name: str, seed: int, limits: tuple[int | None, int | None] = (None, None)) -> Prepared:
    """Model and Fashion-MNIST splits through the recipes' own :func:`msq_hf.pipeline.prepare`."""
    data = DataArguments(
        dataset_name="fashion_mnist",
        train_split="train",
        eval_split="test",
        image_size=IMAGE_SIZE,
        max_train_samples=limits[0],
        max_eval_samples=limits[1],
    )
    if name == "resnet18":
        return prepare(ModelArguments(model_name_or_path="resnet18", pretrained=False), data, seed)
    with tempfile.TemporaryDirectory() as tmp:  # prepare() builds transformers models from a config folder
        deit_tiny_config().save_pretrained(tmp)
        prepared = prepare(ModelArguments(model_name_or_path=tmp, pretrained=False), data, seed)
    prepared.processor = padding_processor()
    return prepared


def padding_processor() -> DeiTImageProcessor:
    """An image processor that reproduces the loader's pixels exactly: resize to 28, zero-pad to 32, normalise.

    The pipeline's default for a transformers model (``ViTImageProcessor``) resizes 28 -> 32 instead of padding
    (and, in transformers 5, stays at 224: its ``size`` is a ``SizeDict``). A center crop larger than the image
    pads with black, the Fashion-MNIST background, before normalisation: the loader's padding.
    """
    return DeiTImageProcessor(
        size={"height": FASHION_MNIST_SIDE, "width": FASHION_MNIST_SIDE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # bilinear, for images that are not 28 x 28
        image_mean=[FASHION_MNIST_MEAN] * 3,
        image_std=[FASHION_MNIST_STD] * 3,
    )


class FloatTrainer(Trainer):
    """Cross-entropy training of a timm (``forward(x)``) or transformers (``pixel_values=``) classifier."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss below is a per-batch mean

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # transformers 5's Trainer loads a ViT checkpoint (legacy key names on disk) with strict=False and keeps
        # none of its weights (seen here: a resumed DeiT-tiny restarted from its random init); this renames the
        # keys as from_pretrained does and refuses a partial load
        load_checkpoint_exact(model if model is not None else self.model, resume_from_checkpoint)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Mean cross-entropy of the logits (both model kinds through ``logits_of``)."""
        logits = logits_of(model, inputs["pixel_values"])
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


def save_final(prepared: Prepared, model: nn.Module, folder: Path) -> None:
    """Write the float model where ``--model_name_or_path`` reads it, replacing ``folder`` only when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model = model.eval()
    if isinstance(model, PreTrainedModel):
        model.save_pretrained(tmp)
        prepared.processor.save_pretrained(tmp)  # pipeline("image-classification") preprocesses like training
    else:
        # the preprocessing is the loader's (prepare -> timm_processor); the pretrained_cfg inherited from
        # timm's default resnet18 tag would otherwise describe ImageNet weights at 224/288 px
        names = list(prepared.splits.class_names)
        timm.models.save_for_hf(
            model,
            str(tmp),
            model_config={"label_names": names, "pretrained_cfg": {**PRETRAINED_CFG, "pool_size": [1, 1]}},
            data_config=timm_data_config(prepared.processor),
            safe_serialization=True,
        )
        # timm records num_classes in model_args too; transformers' TimmWrapper (pipeline, AutoModel) passes
        # num_classes=num_labels *and* **model_args to create_model and fails on the duplicate
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["model_args"] = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


class EvalRecorder(TrainerCallback):
    """Test accuracy, train loss and wall time of every evaluation; rewrites the results JSON each time."""

    def __init__(self, record: dict[str, Any], path: Path | None, resumed_step: int) -> None:
        self.record, self.path, self.resumed_step = record, path, resumed_step
        self.last = self.run_start = time.time()
        self.losses: list[float] = []
        self.eval_images = 0  # set by the caller before each evaluation

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
        metrics = metrics or {}
        now = time.time()
        prefix = next((k[: -len("_accuracy")] for k in metrics if k.endswith("_accuracy")), "eval")
        entry = {
            "epoch": round(float(state.epoch or 0), 3),
            "step": int(state.global_step),
            "test_images": self.eval_images,
            "test_accuracy": metrics.get(f"{prefix}_accuracy"),
            "test_loss": metrics.get(f"{prefix}_loss"),
            "train_loss": round(statistics.fmean(self.losses), 5) if self.losses else None,
            "seconds_since_previous": round(now - self.last, 1),  # training since the last evaluation, + this one
            "eval_seconds": metrics.get(f"{prefix}_runtime"),
            "session_elapsed_seconds": round(now - self.run_start, 1),
        }
        if self.resumed_step:
            entry["resumed"] = True  # seconds_since_previous then covers only the part after the resume
            self.resumed_step = 0
        self.losses, self.last = [], now
        self.record["evaluations"].append(entry)
        self.record["wall_seconds"] = round(self.record.get("wall_seconds_before", 0.0) + now - self.run_start, 1)
        write_json(self.path, self.record)
        print(
            f"\n[step {entry['step']}, epoch {entry['epoch']:g}] test accuracy {entry['test_accuracy']:.4f} "
            f"({self.eval_images:,} images), train loss {entry['train_loss']}, "
            f"{entry['seconds_since_previous'] / 60:.1f} min since the previous evaluation "
            f"(eval {entry['eval_seconds']} s), wall {self.record['wall_seconds'] / 60:.1f} min",
            flush=True,
        )


class StepTimer(TrainerCallback):
    """Wall-clock timestamps of every optimizer step (the probe)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def environment() -> dict[str, Any]:
    """Library versions and the machine, recorded with every result."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "msq_hf": msq_hf.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],  # the machine is shared
        "dtype": "float32 (no bf16: the CPU has no avx512)",
    }


def training_arguments(setting: Setting, work: Path, seed: int, epochs: float, **overrides: Any) -> TrainingArguments:
    """The Trainer settings of a pretraining run (``overrides`` win)."""
    values: dict[str, Any] = {
        "output_dir": str(work),
        "num_train_epochs": epochs,
        "per_device_train_batch_size": setting.batch_size,
        "per_device_eval_batch_size": 256,
        "learning_rate": setting.learning_rate,
        "weight_decay": setting.weight_decay,
        "optim": setting.optim,
        "optim_args": setting.optim_args,
        "lr_scheduler_type": "cosine",
        "warmup_steps": setting.warmup,
        "eval_strategy": "steps" if setting.eval_steps else "epoch",
        "eval_steps": setting.eval_steps,
        "save_strategy": "steps",
        "save_total_limit": 1,
        "logging_steps": 50,
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "report_to": "none",
        "seed": seed,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "use_cpu": not torch.accelerator.is_available(),
    }
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(
    prepared: Prepared, args: TrainingArguments, callbacks: list[TrainerCallback], eval_images: int | None = None
) -> FloatTrainer:
    """A :class:`FloatTrainer` on the prepared model and splits (evaluating on the first ``eval_images``)."""
    evaluation = prepared.splits.eval
    if eval_images is not None and eval_images < len(evaluation):
        evaluation = evaluation.select(range(eval_images))
    return FloatTrainer(
        model=prepared.model,
        args=args,
        train_dataset=prepared.splits.train,
        eval_dataset=evaluation,
        data_collator=DefaultDataCollator(),
        compute_metrics=compute_accuracy_metrics,
        # a raw timm model's processor lives in its config.json (TimmWrapperImageProcessor cannot save_pretrained)
        processing_class=prepared.processor if isinstance(prepared.model, PreTrainedModel) else None,
        callbacks=callbacks,
    )


def probe(name: str, steps: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Time ``steps`` training steps and an evaluation on 2,560 test images; extrapolate an epoch."""
    setting = SETTINGS[name]
    prepared = prepare_run(name, opts.seed)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as work:
        args = training_arguments(
            setting, Path(work), opts.seed, 1, max_steps=steps, eval_strategy="no", save_strategy="no", logging_steps=50
        )
        trainer = make_trainer(prepared, args, [timer])
        start = time.time()
        trainer.train()
        train_seconds = time.time() - start
        sample = prepared.splits.eval.select(range(2560))
        metrics = trainer.evaluate(eval_dataset=sample)
    skip = min(10, steps // 10)  # the first steps include allocator and thread-pool warm-up
    per_step = statistics.median(b - a for a, b in zip(timer.times[skip:], timer.times[skip + 1 :], strict=False))
    n_steps = steps_per_epoch(len(prepared.splits.train), args)
    eval_epoch = metrics["eval_runtime"] * len(prepared.splits.eval) / len(sample)
    epoch = per_step * n_steps + eval_epoch
    result = {
        "model": name,
        "probe_steps": steps,
        "batch_size": setting.batch_size,
        "seconds_per_step_median": round(per_step, 4),
        "steps_per_epoch": n_steps,
        "train_seconds_per_epoch": round(per_step * n_steps, 1),
        "eval_seconds_per_epoch": round(eval_epoch, 1),
        "epoch_minutes": round(epoch / 60, 2),
        "epochs_in_budget": math.floor(setting.budget_minutes * 60 / epoch * 10) / 10,
        "budget_minutes": setting.budget_minutes,
        "probe_wall_seconds": round(train_seconds, 1),
        "command": [sys.executable, *sys.argv],
        "environment": environment(),
    }
    print(json.dumps(result, indent=1), flush=True)
    write_json(opts.results_dir / f"probe_{name}.json", result)
    if opts.probe_save:  # a small real folder for smoke-testing the recipes before the full run ends
        save_final(prepared, trainer.model, opts.output_root / "probe" / name)
    return result


def pretrain(name: str, opts: argparse.Namespace) -> dict[str, Any] | None:
    """Train ``name`` (resuming from its newest checkpoint), save the final folder, write the results JSON."""
    setting = SETTINGS[name]
    final, work = opts.output_root / name, opts.output_root / f"{name}-work"
    results_path = opts.results_dir / f"{name}.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if opts.skip_done and final.is_dir() and previous.get("status") == "done":
        print(f"{name}: done already ({final}, {results_path}); skipped", flush=True)
        return None
    epochs = opts.epochs if opts.epochs is not None else setting.epochs
    checkpoint = None if opts.fresh else (get_last_checkpoint(str(work)) if work.is_dir() else None)
    if opts.fresh and work.is_dir():
        shutil.rmtree(work)
    prepared = prepare_run(name, opts.seed, (opts.max_train_samples, opts.max_eval_samples))
    n_steps = steps_per_epoch(len(prepared.splits.train), training_arguments(setting, work, opts.seed, epochs))
    args = training_arguments(setting, work, opts.seed, epochs, save_steps=max(1, n_steps // 4))
    resumed_step = int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0
    kept = [e for e in previous.get("evaluations", []) if e["step"] <= resumed_step] if checkpoint else []
    record: dict[str, Any] = {
        "model": name,
        "status": "running",
        "setting": asdict(setting),
        "evaluations": kept,
        "epochs_planned": epochs,
        "steps_per_epoch": n_steps,
        "train_images": len(prepared.splits.train),
        "test_images": len(prepared.splits.eval),
        "parameters": sum(p.numel() for p in prepared.model.parameters()),
        "data": "fashion_mnist (Debian dataset-fashion-mnist), train split for training, official test split "
        "(10k) for evaluation only; 28 px zero-padded to 32, 3 channels, Fashion-MNIST mean/std; no augmentation",
        "seed": opts.seed,
        "command": [sys.executable, *sys.argv],
        "resumed_from": checkpoint,
        "wall_seconds_before": previous.get("wall_seconds", 0.0) if checkpoint else 0.0,
        "output_dir": str(final),
        "environment": environment(),
    }
    print(
        f"{name}: {record['parameters'] / 1e6:.2f} M parameters, {epochs:g} epochs of {n_steps} steps "
        f"(batch {setting.batch_size}), {setting.optim} lr {setting.learning_rate:g}"
        + (f", resuming from {checkpoint}" if checkpoint else ""),
        flush=True,
    )
    recorder = EvalRecorder(record, results_path, resumed_step)
    trainer = make_trainer(prepared, args, [recorder], setting.eval_images)
    recorder.eval_images = len(trainer.eval_dataset)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    steps_run = trainer.state.global_step - resumed_step
    evals = [e for e in record["evaluations"] if e["step"] > resumed_step]
    train_seconds = output.metrics["train_runtime"] - sum(e["eval_seconds"] or 0 for e in evals)
    last = record["evaluations"][-1] if record["evaluations"] else {}
    if last.get("step") != trainer.state.global_step or last.get("test_images") != len(prepared.splits.eval):
        recorder.eval_images = len(prepared.splits.eval)  # the finished model on the whole test set
        trainer.evaluate(eval_dataset=prepared.splits.eval, metric_key_prefix="test")
    if trainer.is_world_process_zero():
        save_final(prepared, trainer.model, final)
        record.update(
            status="done",
            test_accuracy=record["evaluations"][-1]["test_accuracy"],
            seconds_per_step=round(train_seconds / max(1, steps_run), 3),
            epoch_minutes=round(train_seconds / max(1, steps_run) * n_steps / 60, 2),  # training only, no evals
            wall_seconds=round(record["wall_seconds_before"] + time.time() - recorder.run_start, 1),
        )
        write_json(results_path, record)
        print(f"{name}: saved {final}; test accuracy {record['test_accuracy']}", flush=True)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", choices=sorted(SETTINGS), default=list(SETTINGS), metavar="MODEL")
    parser.add_argument("--probe", type=int, default=0, metavar="STEPS", help="only time STEPS steps (e.g. 200)")
    parser.add_argument("--probe-save", action="store_true", help="also save the probed model to OUT/probe/<model>")
    parser.add_argument("--epochs", type=float, default=None, help="override the table's epochs")
    parser.add_argument("--output-root", type=Path, default=ROOT / "runs" / "pretrained")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results" / "pretrain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on the shared 2-core machine, 2 spinning OpenMP threads ran a ResNet-18 "
        "step 4x slower than 1 thread whenever another job was running)",
    )
    parser.add_argument("--skip-done", action="store_true", help="skip models whose folder and results are done")
    parser.add_argument("--fresh", action="store_true", help="delete the model's checkpoints and start over")
    parser.add_argument("--max-train-samples", type=int, default=None, help="subset (tests of this script only)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="subset (tests of this script only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Probe or pretrain every model named on the command line, in order."""
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    for name in opts.models:
        if opts.probe:
            probe(name, opts.probe, opts)
        else:
            pretrain(name, opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
