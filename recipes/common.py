"""The paper recipes' front end: a :class:`Recipe` is a table of flag defaults on top of :mod:`msq_hf.pipeline`.

:func:`run` parses the command line with ``transformers.HfArgumentParser`` over the pipeline's
:class:`~msq_hf.pipeline.ModelArguments`, :class:`~msq_hf.pipeline.DataArguments`,
:class:`~msq_hf.pipeline.RunArguments`, :class:`msq_hf.arguments.MSQArguments` (every ``MSQConfig`` field),
:class:`RecipeArguments` (``--smoke_test``) and ``TrainingArguments``; the defaults come from the argument
declarations, then :data:`COMMON_DEFAULTS`, the recipe, the smoke settings (with ``--smoke_test``) and the
command line, which always wins. Then :func:`msq_hf.pipeline.run_pipeline` trains, evaluates, exports,
checks the export, writes ``msq_history.json`` and the report; this module adds ``results.json``.

In multi-process runs every rank also writes ``<output_dir>/ranks/bits_rank<r>.json`` (its bit
scheme and pruning history), so divergent pruning decisions would be visible.

The paper numbers quoted in the recipes come from the MSQ paper and the peer papers it compares with
(their result tables and stated training settings); docs/recipes.md says which are stated and which inferred.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg, string_to_bool

from msq_hf.arguments import MSQArguments
from msq_hf.data import builtin_source, find_fashion_mnist
from msq_hf.io.card import human_bytes
from msq_hf.pipeline import (
    DataArguments,
    GroupedTrainingArguments,
    ModelArguments,
    RunArguments,
    prepare,
    train_and_export,
)
from msq_hf.training.trainer import MSQTrainer

logger = logging.getLogger("msq_hf.recipes")


@dataclass
class RecipeArguments:
    """The recipes' own switch."""

    _argument_group_name = "recipe"

    smoke_test: bool = HfArg(default=False, help="seconds-long run: tiny model, a few dozen local images, a few steps")


# --help lists the groups in this order: the recipe's own switch first, TrainingArguments' ~100 flags last
ARGUMENT_TYPES = (RecipeArguments, ModelArguments, DataArguments, MSQArguments, RunArguments, GroupedTrainingArguments)


class RecipeSetupError(ValueError):
    """A recipe cannot start (no data, no model, Hub unreachable): one line that says what to do instead."""


@dataclass(frozen=True)
class Recipe:
    """One paper setting.

    ``defaults`` and ``smoke`` map flag names (fields of any of the argument dataclasses) to values;
    ``baselines`` are ``(label, compression, top-1 %)`` points of the paper's tables, drawn next to this
    run in the report.
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

# Pretrained start, ImageNet-1k, 100 epochs at batch 256: common to every ImageNet recipe. No image_size: the
# input is the model's own size (224 for the default Hub models; 32 for the local Fashion-MNIST checkpoints of
# benchmarks/pretrain.py, whose ViT would refuse 224 px images and whose ResNet would run 49x slower).
_IMAGENET_RUN: dict[str, Any] = {
    "pretrained": True,
    "dataset_name": "ILSVRC/imagenet-1k",
    "eval_split": "validation",
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
    "reg_strength": 5.0,
    "prune_threshold": 0.6,
    "prune_interval": 2,
    "prune_interval_epochs": None,  # the interval is the 2 steps above, not the recipe's epochs
    "final_round_fraction": 0.7,
    "hessian_max_probes": 2,
    "hessian_batch_size": 4,
}


# ------------------------------------------------------------------------------------------------
# Parsing


def _smoke_requested(argv: Sequence[str]) -> bool:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--smoke_test", "--smoke-test", nargs="?", const=True, default=False, type=string_to_bool)
    namespace, _ = pre.parse_known_args(list(argv))
    return bool(namespace.smoke_test)


def build_parser(recipe: Recipe, smoke: bool = False) -> HfArgumentParser:
    """The recipe's argument parser: declared defaults < common < recipe < (smoke) < command line."""
    parser = HfArgumentParser(ARGUMENT_TYPES, description=recipe.description)
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
    known = {f.name for kind in ARGUMENT_TYPES for f in dataclasses.fields(kind)}
    unknown = sorted(set(defaults) - known)
    if unknown:  # a typo in a recipe table would otherwise be ignored silently by argparse
        raise ValueError(
            f"recipe {recipe.name!r}: default(s) {unknown} are not flags of "
            + ", ".join(kind.__name__ for kind in ARGUMENT_TYPES)
        )
    parser.set_defaults(**defaults)
    return parser


def _given(parser: HfArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options written on the command line (any spelling or alias)."""
    by_option = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {by_option[arg.split("=", 1)[0]] for arg in argv if arg.split("=", 1)[0] in by_option}


def parse_args(recipe: Recipe, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse ``argv`` (default ``sys.argv[1:]``): ``(training, model, data, msq, run, recipe)`` arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(recipe, smoke=_smoke_requested(argv))
    recipe_args, model_args, data_args, msq_args, run_args, training = parser.parse_args_into_dataclasses(args=argv)
    given = _given(parser, argv)
    if "model_name_or_path" in given and "model_kwargs" not in given:
        # the recipe's (or smoke test's) model_kwargs describe its own model, not the one given instead
        model_args.model_kwargs = None
    if "prune_interval" in given and "prune_interval_epochs" not in given:
        run_args.prune_interval_epochs = None  # --prune_interval on the command line beats the recipe's epochs
    if not model_args.model_name_or_path:
        raise ValueError(f"recipe {recipe.name!r}: --model_name_or_path is empty")
    if not data_args.dataset_name:
        raise ValueError(f"recipe {recipe.name!r}: --dataset_name is empty")
    return training, model_args, data_args, msq_args, run_args, recipe_args


# ------------------------------------------------------------------------------------------------
# Before anything is downloaded: can the data and the weights be had at all?

_ALTERNATIVES = (
    "or train on --dataset_name fashion_mnist, a local image folder (--dataset_name path/to/images, laid out "
    "root/<split>/<class>/*.png), or run --smoke_test"
)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _dataset_cached(name: str) -> bool:
    """True when ``datasets`` or the Hub cache already holds ``name`` (an offline run can then use it)."""
    import datasets
    from huggingface_hub import scan_cache_dir

    if (Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir():
        return True
    try:
        return any(r.repo_id == name and r.repo_type == "dataset" for r in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 - no cache folder yet
        return False


def _gated_hint(name: str) -> str:
    url = f"https://huggingface.co/datasets/{name}"
    if "imagenet" in name.lower():
        return f"ImageNet is gated: accept its terms at {url}, then `hf auth login`; "
    return f"if it is gated, accept its terms at {url}, then `hf auth login`; "


def check_dataset_access(data_args: DataArguments, say: Any = None) -> None:
    """Fail in seconds, in one line, when ``--dataset_name`` is a Hub dataset that cannot be downloaded here.

    Local folders and the built-in sources need nothing. Offline (``HF_HUB_OFFLINE=1``) a Hub dataset must be in
    the local cache; online, one metadata request checks that it exists, and whether it is gated while no token
    is stored; its download size is then announced with ``say`` before the download starts.
    """
    name = data_args.dataset_name
    if not name or builtin_source(name) is not None or Path(name).expanduser().exists() or _dataset_cached(name):
        return
    where = f"--dataset_name {name} is a Hugging Face Hub dataset"
    if _hub_offline():
        raise RecipeSetupError(
            f"{where}, the Hub is unreachable (HF_HUB_OFFLINE=1) and it is not in the local cache; "
            f"{_gated_hint(name)}{_ALTERNATIVES}"
        )
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi().dataset_info(name, timeout=10, files_metadata=True)
    except RepositoryNotFoundError as exc:
        raise RecipeSetupError(f"{where} that does not exist (or is private); {_ALTERNATIVES}") from exc
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout, proxy...
        raise RecipeSetupError(
            f"{where} and the Hub is unreachable ({type(exc).__name__}); {_gated_hint(name)}{_ALTERNATIVES}"
        ) from exc
    if info.gated and get_token() is None:
        raise RecipeSetupError(f"{where} that is gated and no Hub token is stored; {_gated_hint(name)}{_ALTERNATIVES}")
    size = sum(f.size or 0 for f in info.siblings or [])
    if say is not None and size:
        say(f"downloading {name} from the Hub: {human_bytes(size, 1)} (once; cached for later runs)")


def check_weights_access(model_args: ModelArguments) -> None:
    """One line instead of a download traceback when pretrained Hub weights are asked for offline."""
    ref = model_args.model_name_or_path
    if not model_args.pretrained or Path(ref).expanduser().exists() or not _hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    repo = ref.removeprefix("hf-hub:").split("@")[0]
    if "/" in repo and isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return  # in the local cache
    raise RecipeSetupError(
        f"--model_name_or_path {ref}: its pretrained weights come from the Hugging Face Hub, which is unreachable "
        "(HF_HUB_OFFLINE=1) and they are not in the local cache; pass --pretrained false (random weights), a "
        "local model folder, or run --smoke_test"
    )


# ------------------------------------------------------------------------------------------------
# The run


def _say(line: str) -> None:
    print(line, flush=True)


def run(recipe: Recipe, argv: Sequence[str] | None = None) -> RecipeResult:
    """Parse ``argv`` and run the pipeline; on the main process also write ``results.json``.

    ``RecipeSetupError`` (a ``ValueError``) when the run cannot start: bad flags, data or weights that cannot be
    had (checked before any download), a model or dataset that does not load.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    training, model_args, data_args, msq_args, run_args, recipe_args = parse_args(recipe, argv)
    main_process = training.process_index == 0
    say = _say if main_process else None
    check_dataset_access(data_args, say)  # the data first: the one thing a newcomer must change
    check_weights_access(model_args)
    try:
        prepared = prepare(model_args, data_args, training.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise RecipeSetupError(str(exc)) from exc
    result = train_and_export(
        prepared,
        training,
        model_args,
        data_args,
        msq_args,
        run_args,
        run_name=recipe.name,
        baselines=recipe.baselines,
        argv=argv,
        extra_args={"recipe": dataclasses.asdict(recipe_args)},
        # short console lines (loss, lr, compression, bits, phase) instead of the log dicts with every layer
        say=say,
    )
    results: dict[str, Any] = {
        "recipe": recipe.name,
        **result.summary,
        "msq_config": result.config.to_dict(),
        "export_dir": str(result.export_dir) if result.export_dir else None,
        "report": [str(p) for p in result.report_paths],
    }
    if result.trainer.is_world_process_zero():
        path = result.output_dir / "results.json"
        path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str), encoding="utf-8")
        logger.info(
            "msq recipe %s: %s",
            recipe.name,
            {k: results.get(k) for k in ("compression", "test_accuracy", "export_logits_equal")},
        )
    return RecipeResult(result.model, result.trainer, results, result.output_dir, result.export_dir)


def command_line(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """The recipe scripts' entry: :func:`run`, with a setup error as one line on stderr (exit status 2)."""
    try:
        run(recipe, argv)
    except RecipeSetupError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message was
        print(f"{os.path.basename(sys.argv[0]) or recipe.name}: error: {message}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "ARGUMENT_TYPES",
    "COMMON_DEFAULTS",
    "IMAGENET_CNN_DEFAULTS",
    "SMOKE_DEFAULTS",
    "VIT_DEFAULTS",
    "Recipe",
    "RecipeArguments",
    "RecipeResult",
    "RecipeSetupError",
    "build_parser",
    "check_dataset_access",
    "check_weights_access",
    "command_line",
    "parse_args",
    "run",
]
