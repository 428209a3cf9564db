"""Shared machinery of the MSQ paper recipes (``recipes/*.py``).

A recipe is a :class:`Recipe`: a name, the paper setting as flag defaults, the ``--smoke_test``
overrides and the paper's reference points. :func:`run` does the rest:

1. parse ``TrainingArguments`` + :class:`ModelArguments` + :class:`DataArguments` +
   :class:`MSQArguments` with ``transformers.HfArgumentParser`` (recipe defaults, then smoke
   defaults, then the command line, which always wins);
2. load the data (Hub id, local image folder, ``fashion_mnist`` or ``digits``) with
   :func:`msq_hf.data.load_image_dataset`;
3. build the model (timm name or ``timm/<name>`` Hub id, local timm or transformers folder,
   transformers Hub id), with as many classes as the data has;
4. train with :class:`msq_hf.MSQTrainer`, evaluate top-1 accuracy with :mod:`msq_hf.metrics`;
5. on the main process: write the bit-packed export to ``<output_dir>/export`` (:func:`msq_hf.export`),
   reload it with :func:`msq_hf.from_pretrained` and check the logits are identical, write
   ``msq_history.json``, ``results.json`` and a report (:func:`msq_hf.report.write_report`).

In multi-process runs every rank also writes ``<output_dir>/ranks/bits_rank<r>.json`` (its bit
scheme and pruning history), so divergent pruning decisions would be visible.

The paper numbers quoted in the recipes come from the MSQ paper and the peer papers it compares with
(their result tables and stated training settings); docs/recipes.md says which are stated and which inferred.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

import msq_hf
import msq_hf.report
from msq_hf.data import collate_pixel_values, find_fashion_mnist, load_image_dataset
from msq_hf.metrics import compute_accuracy_metrics
from msq_hf.training.trainer import MSQTrainer

logger = logging.getLogger("msq_hf.recipes")

# Data sources that msq_hf.data reads itself (own normalization, no image transform).
_BUILTIN_DATA = ("fashion_mnist", "fashion-mnist", "digits")


# ------------------------------------------------------------------------------------------------
# Argument dataclasses


@dataclass
class ModelArguments:
    """Which network to train."""

    model_name_or_path: str = field(
        default="",
        metadata={
            "help": "timm model name (e.g. deit_tiny_patch16_224), timm Hub id (timm/<name>.<tag>), local "
            "folder (timm save_for_hf layout or a transformers save_pretrained folder), or a "
            "transformers Hub id."
        },
    )
    pretrained: bool = field(
        default=True,
        metadata={
            "help": "Load pretrained weights (from the Hub or the local folder). Use --pretrained false to "
            "build the architecture with random weights, which works offline."
        },
    )
    model_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of extra timm.create_model keyword arguments, e.g. "
            '\'{"img_size": 32, "depth": 2}\' (timm models only).'
        },
    )


@dataclass
class DataArguments:
    """Which images to train and evaluate on."""

    dataset_name: str = field(
        default="",
        metadata={
            "help": "Hub dataset id (uoft-cs/cifar10, ILSVRC/imagenet-1k), a local image folder "
            "(root/<split>/<class>/*.png), 'fashion_mnist' (local IDX files) or 'digits' "
            "(scikit-learn)."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(default="validation", metadata={"help": "Split used for evaluation."})
    image_size: int = field(default=224, metadata={"help": "Square input resolution in pixels."})
    channels: int = field(default=3, metadata={"help": "Image channels (3 = RGB, 1 = gray)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a subset of the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use a subset of the evaluation split."})


@dataclass
class MSQArguments:
    """MSQ hyperparameters (see msq_hf.MSQConfig) and recipe switches."""

    init_bits: int = field(default=8, metadata={"help": "Starting magnitude bits of every quantized layer (1..8)."})
    min_bits: int = field(default=1, metadata={"help": "Lowest bits a layer may reach."})
    target_compression: float = field(default=16.0, metadata={"help": "Target 32 / average weight bits."})
    reg_strength: float = field(default=5e-5, metadata={"help": "lambda of the L1 LSB regularizer (Eq. 8)."})
    prune_threshold: float = field(default=0.01, metadata={"help": "tau: prune when the LSB nonzero rate is below."})
    prune_interval: int | None = field(
        default=None, metadata={"help": "Optimizer steps between pruning steps; overrides --prune_interval_epochs."}
    )
    prune_interval_epochs: float = field(
        default=1.0, metadata={"help": "Pruning interval in epochs, converted to steps from the data size."}
    )
    final_round_fraction: float = field(
        default=0.7, metadata={"help": "Force the final round at this fraction of training if not reached."}
    )
    hessian_guided: bool = field(default=True, metadata={"help": "Choose k from Hessian-trace sensitivity."})
    hessian_max_probes: int = field(default=50, metadata={"help": "Hutchinson probes cap."})
    hessian_tol: float = field(default=1e-2, metadata={"help": "Hutchinson relative tolerance."})
    hessian_batch_size: int = field(default=64, metadata={"help": "Samples used for the Hessian pass."})
    act_bits: int | None = field(default=None, metadata={"help": "Activation bits (2..8); unset = float."})
    act_quantizer: str = field(default="auto", metadata={"help": "auto | pact | lsq."})
    count_sign_bit: bool = field(default=False, metadata={"help": "Count the sign bit in the compression."})
    modules_to_not_convert: list[str] | None = field(
        default=None, metadata={"help": "Glob or 're:' patterns of Linear/Conv2d layers to keep in float."}
    )
    smoke_test: bool = field(
        default=False, metadata={"help": "Seconds-long run: tiny model, a few dozen local images, a few steps."}
    )
    export: bool = field(default=True, metadata={"help": "Write the bit-packed export to <output_dir>/export."})
    verify_export: bool = field(
        default=True, metadata={"help": "Reload the export and require identical logits on an eval batch."}
    )
    write_report: bool = field(default=True, metadata={"help": "Write plots + report.md to <output_dir>/report."})


@dataclass(frozen=True)
class Recipe:
    """One paper setting.

    ``defaults`` and ``smoke`` map flag names (fields of any of the four argument dataclasses) to
    values; ``baselines`` are ``(label, compression, top-1 %)`` points of the paper's tables, drawn
    next to this run in the report.
    """

    name: str
    description: str
    defaults: Mapping[str, Any]
    smoke: Mapping[str, Any]
    baselines: tuple[tuple[str, float, float], ...] = ()


@dataclass
class RecipeResult:
    """What :func:`run` produced (the model and trainer stay in memory for callers such as tests)."""

    model: nn.Module
    trainer: MSQTrainer
    results: dict[str, Any]
    output_dir: Path
    export_dir: Path | None


# Every recipe: the Trainer must keep pixel_values/labels (timm forward(x) names no columns and the
# Hub/imagefolder loaders convert images on the fly from the 'image' column).
COMMON_DEFAULTS: dict[str, Any] = {
    "remove_unused_columns": False,
    "label_names": ["labels"],
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 50,
    "lr_scheduler_type": "cosine",
    "report_to": "none",
    # every parameter of these classifiers is used in each forward: skip DDP's extra graph traversal
    "ddp_find_unused_parameters": False,
}

# Pretrained start, ImageNet-1k at 224 px, 100 epochs at batch 256: common to every ImageNet recipe.
_IMAGENET_RUN: dict[str, Any] = {
    "pretrained": True,
    "dataset_name": "ILSVRC/imagenet-1k",
    "eval_split": "validation",
    "image_size": 224,
    "num_train_epochs": 100,
    "per_device_train_batch_size": 256,
    "per_device_eval_batch_size": 256,
    "dataloader_num_workers": 8,
}

# The shared ImageNet CNN setting of ResNet-18/50 and MobileNetV3-Large (MSQ paper):
# 100 epochs, SGD lr 0.01 warm-start cosine, batch 256 [SEED]; momentum 0.9, wd 1e-4, 5 warm-up
# epochs, pruning every 2 epochs, Hessian batch 128 [INF]; float activations [SEED]; target ≈ 10.67×.
IMAGENET_CNN_DEFAULTS: dict[str, Any] = {
    **_IMAGENET_RUN,
    "learning_rate": 0.01,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "weight_decay": 1e-4,
    "warmup_steps": 5 / 100,
    "init_bits": 8,
    "target_compression": 10.67,
    "reg_strength": 5e-5,
    "prune_threshold": 0.01,
    "prune_interval_epochs": 2,
    "hessian_batch_size": 128,
    "hessian_max_probes": 50,
}

# The shared ViT setting of DeiT-T and Swin-T (MSQ paper): 4-bit start [INF, the paper
# starts from an OFQ 4-bit checkpoint], 8-bit LSQ activations [SEED 8 bits; INF LSQ from OFQ];
# training hyperparameters are not reported, the OFQ recipe is used [INF]: AdamW lr 5e-4, wd 0.05,
# cosine, 10 warm-up epochs. Epochs (100) and batch (256) are this package's choice.
VIT_DEFAULTS: dict[str, Any] = {
    **_IMAGENET_RUN,
    "learning_rate": 5e-4,
    "optim": "adamw_torch",
    "weight_decay": 0.05,
    "warmup_steps": 10 / 100,
    "init_bits": 4,
    "act_bits": 8,
    "act_quantizer": "lsq",
    "reg_strength": 5e-5,
    "prune_threshold": 0.01,
    "prune_interval_epochs": 1,
    "hessian_batch_size": 64,
    "hessian_max_probes": 50,
}

# --smoke_test on top of the recipe's own smoke overrides: tiny data, a few steps, aggressive MSQ
# settings so that pruning visibly happens within 6 steps, nothing saved but the export.
SMOKE_DEFAULTS: dict[str, Any] = {
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 2,
    "warmup_steps": 0,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "disable_tqdm": True,
    "image_size": 32,
    "max_train_samples": 48,
    "max_eval_samples": 32,
    "train_split": "train",
    "eval_split": "test",
    "pretrained": False,
    "reg_strength": 2e-4,
    "prune_threshold": 0.6,
    "prune_interval": 2,
    "final_round_fraction": 0.7,
    "hessian_max_probes": 2,
    "hessian_batch_size": 4,
}


# ------------------------------------------------------------------------------------------------
# Parsing


def _dataclass_types() -> tuple[type, ...]:
    return (TrainingArguments, ModelArguments, DataArguments, MSQArguments)


def _smoke_requested(argv: Sequence[str]) -> bool:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--smoke_test", "--smoke-test", nargs="?", const=True, default=False, type=string_to_bool)
    namespace, _ = pre.parse_known_args(list(argv))
    return bool(namespace.smoke_test)


def build_parser(recipe: Recipe, smoke: bool = False) -> HfArgumentParser:
    """The recipe's argument parser: dataclass defaults < common < recipe < (smoke) < command line."""
    parser = HfArgumentParser(_dataclass_types(), description=recipe.description)
    defaults: dict[str, Any] = {**COMMON_DEFAULTS, "output_dir": f"outputs/{recipe.name}", **recipe.defaults}
    if not torch.accelerator.is_available():
        # Without use_cpu, TrainingArguments on a GPU-less machine ignores the process group that
        # `accelerate launch --multi_gpu` / torchrun created, and every rank trains alone (no DDP).
        defaults["use_cpu"] = True
    if smoke:
        defaults.update(SMOKE_DEFAULTS)
        defaults["output_dir"] = f"outputs/{recipe.name}-smoke"
        defaults["dataset_name"] = "fashion_mnist" if find_fashion_mnist() is not None else "digits"
        defaults.update(recipe.smoke)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:  # a typo in a recipe table would otherwise be ignored silently by argparse
        raise ValueError(
            f"recipe {recipe.name!r}: default(s) {unknown} are not flags of TrainingArguments, "
            "ModelArguments, DataArguments or MSQArguments"
        )
    parser.set_defaults(**defaults)
    return parser


def parse_args(
    recipe: Recipe, argv: Sequence[str] | None = None
) -> tuple[TrainingArguments, ModelArguments, DataArguments, MSQArguments]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the four argument dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(recipe, smoke=_smoke_requested(argv))
    training, model_args, data_args, msq_args = parser.parse_args_into_dataclasses(args=argv)
    given = {arg.split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    if "__model_name_or_path" in given and "__model_kwargs" not in given:
        # the recipe's (or smoke test's) model_kwargs describe its own model, not the one given instead
        model_args.model_kwargs = None
    if not model_args.model_name_or_path:
        raise ValueError(f"recipe {recipe.name!r}: --model_name_or_path is empty")
    if not data_args.dataset_name:
        raise ValueError(f"recipe {recipe.name!r}: --dataset_name is empty")
    return training, model_args, data_args, msq_args


# ------------------------------------------------------------------------------------------------
# Data


def _is_builtin(name: str) -> bool:
    return name.lower() in _BUILTIN_DATA


def load_split(
    data_args: DataArguments,
    split: str,
    limit: int | None,
    seed: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Any:
    """One split as a ``datasets.Dataset`` with ``pixel_values``/``labels`` (see msq_hf.data)."""
    try:
        return load_image_dataset(
            data_args.dataset_name,
            split=split,
            image_size=data_args.image_size,
            channels=data_args.channels,
            limit=limit,
            seed=seed,
            mean=mean,
            std=std,
        )
    except ValueError as exc:
        exc.add_note(
            f"recipe data: --dataset_name {data_args.dataset_name!r}, split {split!r} (set --train_split/--eval_split)"
        )
        raise


def class_names(dataset: Any) -> list[str]:
    """Class names from the ``labels`` ClassLabel feature (raises naming the dataset if absent)."""
    feature = getattr(dataset, "features", {}).get("labels")
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(
            f"the training data has no ClassLabel 'labels' feature (features: "
            f"{getattr(dataset, 'features', None)}); cannot tell the number of classes"
        )
    return list(names)


# ------------------------------------------------------------------------------------------------
# Model


def _model_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    if not model_args.model_kwargs:
        return {}
    try:
        kwargs = json.loads(model_args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model_kwargs is not valid JSON ({exc}): {model_args.model_kwargs!r}") from exc
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model_kwargs must be a JSON object, got {model_args.model_kwargs!r}")
    return kwargs


def _timm_name(name: str) -> str | None:
    """The timm model name for ``name`` (``timm/<name>`` Hub ids included), or None if timm has no such model."""
    import timm

    bare = name[len("timm/") :] if name.startswith("timm/") else name
    if bare.startswith("hf-hub:"):
        return bare
    return bare if timm.is_model(bare) else None


def build_model(model_args: ModelArguments, labels: int | Sequence[str]) -> tuple[nn.Module, str]:
    """Build the network for ``labels`` (class names, or a class count); returns ``(model, "timm" | "transformers")``.

    transformers models also get the class names as ``config.id2label``/``label2id``.
    """
    import timm

    names = [str(i) for i in range(labels)] if isinstance(labels, int) else list(labels)
    num_labels = len(names)

    name = model_args.model_name_or_path
    kwargs = _model_kwargs(model_args)
    path = Path(name).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"--model_name_or_path {path} is a folder without config.json (expected a timm "
                "save_for_hf folder or a transformers save_pretrained folder)"
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if "architecture" in config:  # timm's Hub layout
            model = timm.create_model(
                f"local-dir:{path}", pretrained=model_args.pretrained, num_classes=num_labels, **kwargs
            )
            return model, "timm"
        return _build_transformers(str(path), model_args.pretrained, names, kwargs), "transformers"
    timm_name = _timm_name(name)
    if timm_name is not None:
        model = timm.create_model(timm_name, pretrained=model_args.pretrained, num_classes=num_labels, **kwargs)
        return model, "timm"
    return _build_transformers(name, model_args.pretrained, names, kwargs), "transformers"


def _build_transformers(name: str, pretrained: bool, names: Sequence[str], kwargs: Mapping[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    if kwargs:
        raise ValueError(
            f"--model_kwargs is only supported for timm models; {name!r} is a transformers model "
            "(edit its config.json instead)"
        )
    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {label: i for i, label in enumerate(names)},
    }
    if pretrained:
        # a head trained for other classes is replaced by a fresh one of the right size
        return AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **labels)
    config = AutoConfig.from_pretrained(name, **labels)
    return AutoModelForImageClassification.from_config(config)


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input mean/std the model was trained with (timm ``pretrained_cfg``), or None if unknown."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("mean") and cfg.get("std"):
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return None


def logits_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers (``pixel_values=``) or timm (positional) classifier."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model(pixel_values=pixel_values).logits
    return model(pixel_values)


# ------------------------------------------------------------------------------------------------
# MSQ


def steps_per_epoch(num_samples: int, training: TrainingArguments) -> int:
    """Optimizer steps per epoch on ``num_samples`` with the run's batch size, processes and accumulation."""
    global_batch = training.per_device_train_batch_size * max(1, training.world_size)
    batches = math.ceil(num_samples / global_batch)
    return max(1, batches // max(1, training.gradient_accumulation_steps))


def make_msq_config(msq_args: MSQArguments, steps_in_epoch: int) -> msq_hf.MSQConfig:
    """The :class:`msq_hf.MSQConfig` of the run (``--prune_interval`` wins over ``--prune_interval_epochs``)."""
    interval = msq_args.prune_interval
    if interval is None:
        if msq_args.prune_interval_epochs <= 0:
            raise ValueError(f"--prune_interval_epochs={msq_args.prune_interval_epochs} must be > 0")
        interval = max(1, round(msq_args.prune_interval_epochs * steps_in_epoch))
    return msq_hf.MSQConfig(
        init_bits=msq_args.init_bits,
        min_bits=msq_args.min_bits,
        target_compression=msq_args.target_compression,
        count_sign_bit=msq_args.count_sign_bit,
        reg_strength=msq_args.reg_strength,
        prune_threshold=msq_args.prune_threshold,
        prune_interval=interval,
        final_round_fraction=msq_args.final_round_fraction,
        hessian_guided=msq_args.hessian_guided,
        hessian_max_probes=msq_args.hessian_max_probes,
        hessian_tol=msq_args.hessian_tol,
        hessian_batch_size=msq_args.hessian_batch_size,
        act_bits=msq_args.act_bits,
        act_quantizer=msq_args.act_quantizer,
        modules_to_not_convert=msq_args.modules_to_not_convert,
    )


# ------------------------------------------------------------------------------------------------
# Outputs


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str), encoding="utf-8")


def verify_export(model: nn.Module, export_dir: Path, eval_dataset: Any, n: int = 8) -> dict[str, Any]:
    """Reload the export and compare its logits with ``model`` on the first ``n`` eval images."""
    batch = collate_pixel_values([eval_dataset[i] for i in range(min(n, len(eval_dataset)))])
    reloaded = msq_hf.from_pretrained(export_dir)
    device = next(model.parameters()).device
    reloaded.to(device)  # same device, same kernels: the comparison is meaningful bit for bit
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = logits_of(model, batch["pixel_values"].to(device)).cpu()
        got = logits_of(reloaded, batch["pixel_values"]).cpu()
    return {
        "export_logits_equal": bool(torch.equal(expected, got)),
        "export_logits_max_abs_diff": float((expected.float() - got.float()).abs().max()),
        "export_reloaded_class": type(reloaded).__name__,
    }


# ------------------------------------------------------------------------------------------------
# The run


def run(recipe: Recipe, argv: Sequence[str] | None = None) -> RecipeResult:
    """Parse ``argv``, train with MSQ, evaluate, export, verify and report. See the module docstring."""
    training, model_args, data_args, msq_args = parse_args(recipe, argv)
    output_dir = Path(training.output_dir)
    torch.manual_seed(training.seed)

    train_dataset = load_split(data_args, data_args.train_split, data_args.max_train_samples, training.seed)
    names = class_names(train_dataset)
    model, kind = build_model(model_args, names)
    norm = model_normalization(model)
    eval_dataset = None
    if not _is_builtin(data_args.dataset_name) and norm is not None:
        # Hub/imagefolder data is normalised on the fly: use the statistics the model was trained with
        train_dataset = load_split(data_args, data_args.train_split, data_args.max_train_samples, training.seed, *norm)
    if data_args.eval_split:
        eval_dataset = load_split(
            data_args,
            data_args.eval_split,
            data_args.max_eval_samples,
            training.seed,
            *(norm if not _is_builtin(data_args.dataset_name) and norm else (None, None)),
        )
    if eval_dataset is None and training.eval_strategy != "no":
        training.eval_strategy = "no"  # nothing to evaluate on

    cfg = make_msq_config(msq_args, steps_per_epoch(len(train_dataset), training))
    model_kwargs = _model_kwargs(model_args) if kind == "timm" else None
    trainer = MSQTrainer(
        model=model,
        args=training,
        msq_config=cfg,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_pixel_values,
        compute_metrics=compute_accuracy_metrics,
        model_args=({**model_kwargs, "num_classes": len(names)} if model_kwargs is not None else None),
    )
    # TrainingArguments only records --resume_from_checkpoint; the Trainer must be told explicitly
    train_output = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    model = trainer.model
    ctl = trainer.msq_controller

    results: dict[str, Any] = {
        "recipe": recipe.name,
        "model": model_args.model_name_or_path,
        "model_kind": kind,
        "dataset": data_args.dataset_name,
        "num_classes": len(names),
        "train_samples": len(train_dataset),
        "global_steps": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "compression": ctl.compression,
        "avg_bits": ctl.avg_bits,
        "phase": ctl.phase,
        "pruning_steps": len(ctl.history),
        "target_compression": cfg.target_compression,
        "world_size": training.world_size,
        "msq_config": cfg.to_dict(),
    }
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        results["eval_loss"] = metrics.get("eval_loss")
        results["eval_accuracy"] = metrics.get("eval_accuracy")

    scheme = msq_hf.bit_scheme(model)
    if training.world_size > 1:
        rank = training.process_index
        _write_json(
            output_dir / "ranks" / f"bits_rank{rank}.json",
            {
                "rank": rank,
                "world_size": training.world_size,
                "bit_scheme": scheme,
                "history": [
                    {"step": h["step"], "bits": h["bits"], "k": h["k"], "phase": h["phase"]} for h in ctl.history
                ],
            },
        )

    export_dir: Path | None = None
    if trainer.is_world_process_zero():
        if msq_args.export:
            export_dir = output_dir / "export"
            exported = msq_hf.export(model, export_dir, overwrite=True)
            results.update(
                export_dir=str(export_dir),
                export_weight_bytes=exported.weight_bytes,
                export_float_bytes=exported.float_bytes,
                export_storage_compression=exported.storage_compression_ratio,
            )
            if msq_args.verify_export and eval_dataset is not None:
                results.update(verify_export(model, export_dir, eval_dataset))
        summary = {
            k: results[k]
            for k in ("compression", "avg_bits", "eval_accuracy", "global_steps")
            if results.get(k) is not None
        }
        if isinstance(summary.get("eval_accuracy"), float):
            summary["test_accuracy"] = 100.0 * summary["eval_accuracy"]  # report plots accuracy in %
        _write_json(
            output_dir / msq_hf.report.HISTORY_NAME,
            {
                "history": ctl.history,
                "log_history": trainer.state.log_history,
                "numels": msq_hf.layer_numels(model),
                "bit_scheme": scheme,
                "target_compression": cfg.target_compression,
                "count_sign_bit": cfg.count_sign_bit,
                "total_steps": trainer.state.max_steps,
                "summary": summary,
                "baselines": [list(b) for b in recipe.baselines],
            },
        )
        if msq_args.write_report:
            written = msq_hf.report.write_report(output_dir)
            results["report"] = [str(p) for p in written]
        _write_json(output_dir / "results.json", results)
        logger.info(
            "msq recipe %s: %s",
            recipe.name,
            {k: results.get(k) for k in ("compression", "eval_accuracy", "export_logits_equal")},
        )
    return RecipeResult(model=model, trainer=trainer, results=results, output_dir=output_dir, export_dir=export_dir)


__all__ = [
    "COMMON_DEFAULTS",
    "DataArguments",
    "MSQArguments",
    "ModelArguments",
    "Recipe",
    "RecipeResult",
    "SMOKE_DEFAULTS",
    "IMAGENET_CNN_DEFAULTS",
    "VIT_DEFAULTS",
    "build_model",
    "build_parser",
    "class_names",
    "load_split",
    "logits_of",
    "make_msq_config",
    "parse_args",
    "run",
    "steps_per_epoch",
    "verify_export",
]
