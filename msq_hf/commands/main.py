"""The ``msq-hf`` command line (also ``python -m msq_hf``).

Commands:

* ``msq-hf train``: MSQ quantization-aware training with :class:`~msq_hf.training.trainer.MSQTrainer`, then
  evaluation, a bit-packed export, ``msq_history.json`` and a report. Without arguments it runs the
  built-in demo (timm ``resnet20_cifar`` on Fashion-MNIST, 8 bits -> 16x compression, ~10 min on 2 CPU cores).
* ``msq-hf inspect DIR_OR_REPO``: what an export holds and whether it is intact.
* ``msq-hf export CHECKPOINT_DIR OUTPUT``: turn an ``MSQTrainer`` checkpoint into a bit-packed export.
* ``msq-hf report RUN_OR_EXPORT_DIR``: plots and ``report.md`` of a run, checkpoint or export.

User errors (bad option values, missing files, unreadable exports) end with exit code 1 or 2 and one line
``msq-hf: error: ...`` on stderr, without a traceback; ``--debug`` (or ``MSQ_HF_DEBUG=1``) shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PROG = "msq-hf"

# The built-in demo run. Measured on 2 shared CPU cores: see docs/cli.md.
DEFAULT_MODEL = "resnet20_cifar"
DEFAULT_DATASET = "fashion_mnist"
DEFAULT_OUTPUT = "msq-run"
DEFAULT_TRAIN_LIMIT = 20000
DEFAULT_EVAL_LIMIT = 2000
DEFAULT_EPOCHS = 4.0
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 0.1
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_INIT_BITS = 8
DEFAULT_MIN_BITS = 1
DEFAULT_TARGET = 16.0
DEFAULT_REG_STRENGTH = 1e-5
DEFAULT_PRUNE_THRESHOLD = 0.3
DEFAULT_PRUNE_INTERVAL = 10
DEFAULT_FINAL_ROUND_FRACTION = 0.7
DEFAULT_HESSIAN_PROBES = 2
DEFAULT_HESSIAN_BATCH = 32
DEFAULT_EVALS_DURING_TRAINING = 4
IN_TRAINING_EVAL_IMAGES = 1000  # periodic evals use a slice of the eval set: the full set is scored once at the end

HISTORY_VERSION = 1

logger = logging.getLogger(__name__)


class CLIError(Exception):
    """A user error: printed as ``msq-hf: error: <message>``, exit code 1."""


# ------------------------------------------------------------------------------------------------
# argparse helpers


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``msq-hf train: error: ...``) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only for real defaults (not for flags or options whose default is 'unset')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _checked(
    parse: Callable[[str], float], ok: Callable[[float], bool], expected: str, noun: str = ""
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``parse`` and accepts values where ``ok`` holds.

    Errors read ``'x' is not a number (expected ...)`` or ``9 bits is not allowed (allowed: 1..8)``.
    """
    kind = "an integer" if parse is int else "a number"

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind} ({expected})") from None
        if not (math.isfinite(value) and ok(value)):
            shown = f"{text} {noun}" if noun else text
            raise argparse.ArgumentTypeError(f"{shown} is not allowed ({expected})")
        return value

    return convert


_positive_int = _checked(int, lambda v: v >= 1, "expected a positive integer")
_positive_float = _checked(float, lambda v: v > 0, "expected a positive number")
_nonnegative_float = _checked(float, lambda v: v >= 0, "expected a number >= 0")
_bits = _checked(int, lambda v: 1 <= v <= 8, "allowed: 1..8", "bits")
_act_bits = _checked(int, lambda v: 2 <= v <= 8, "allowed: 2..8", "activation bits")
_target = _checked(float, lambda v: v > 1, "expected a compression ratio > 1, e.g. 16")
_fraction = _checked(float, lambda v: 0 < v < 1, "expected a value in (0, 1)")


# ------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    """The ``msq-hf`` argument parser with its four subcommands."""
    from msq_hf import __version__

    parser = _Parser(
        prog=PROG,
        description="MSQ mixed-precision quantization-aware training for Hugging Face "
        "and timm models: train, export, inspect, report.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command. "
        f"'{PROG} train' without options runs the built-in demo (about 10 minutes on 2 CPU cores).",
    )
    parser.add_argument("--version", action="version", version=f"msq_hf {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors (also: MSQ_HF_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # -- train ----------------------------------------------------------------------------------
    t = sub.add_parser(
        "train",
        help="train with MSQ, evaluate, export and write a report",
        description="MSQ quantization-aware training with MSQTrainer: the LSB regularizer and Hessian-guided "
        "bit pruning until --target compression, then QAT. Afterwards the model is evaluated, saved to "
        "OUTPUT/model, exported bit-packed to OUTPUT/export, and OUTPUT/msq_history.json plus OUTPUT/report/ "
        "are written. Without options: timm resnet20_cifar on Fashion-MNIST (8 bits -> 16x).",
        formatter_class=_HelpFormatter,
    )
    g = t.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="timm model name, Hugging Face model id or local folder (HF model, timm save_for_hf folder, "
        "MSQTrainer checkpoint or msq_hf export; quantized ones are dequantized and re-trained)",
    )
    g.add_argument(
        "--pretrained", action="store_true", help="timm names: load timm's pretrained weights (downloads from the Hub)"
    )
    g.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="'fashion_mnist', 'digits', a Hub dataset id or an image folder (root/<split>/<class>/*.png)",
    )
    g.add_argument(
        "--train-limit",
        type=_positive_int,
        default=DEFAULT_TRAIN_LIMIT,
        help="train on a class-stratified subset of this many images",
    )
    g.add_argument("--full-train-set", action="store_true", help="ignore --train-limit and use every training image")
    g.add_argument(
        "--eval-limit", type=_positive_int, default=DEFAULT_EVAL_LIMIT, help="evaluate on this many test images"
    )
    g.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="input side in pixels (default: the model's own input size, 32 for resnet20_cifar)",
    )
    g = t.add_argument_group("MSQ")
    g.add_argument(
        "--target",
        type=_target,
        default=DEFAULT_TARGET,
        help="target compression ratio 32*sum(N)/sum(bits*N) (magnitude bits)",
    )
    g.add_argument("--init-bits", type=_bits, default=DEFAULT_INIT_BITS, help="starting bits of every layer (1..8)")
    g.add_argument("--min-bits", type=_bits, default=DEFAULT_MIN_BITS, help="lowest bits a layer may reach (1..8)")
    g.add_argument(
        "--reg-strength", type=_nonnegative_float, default=DEFAULT_REG_STRENGTH, help="lambda of the LSB regularizer"
    )
    g.add_argument(
        "--prune-threshold",
        type=_fraction,
        default=DEFAULT_PRUNE_THRESHOLD,
        help="a layer drops LSBs when its LSB nonzero rate is below this (0..1)",
    )
    g.add_argument(
        "--prune-interval",
        type=_positive_int,
        default=DEFAULT_PRUNE_INTERVAL,
        help="optimizer steps between pruning steps",
    )
    g.add_argument(
        "--final-round-fraction",
        type=_fraction,
        default=DEFAULT_FINAL_ROUND_FRACTION,
        help="force the final pruning round at this fraction of the steps",
    )
    g.add_argument(
        "--no-hessian",
        action="store_true",
        help="skip the Hessian sensitivity pass (k=1 for every layer; faster, less accurate)",
    )
    g.add_argument(
        "--hessian-probes",
        type=_positive_int,
        default=DEFAULT_HESSIAN_PROBES,
        help="max Hutchinson probes per sensitivity estimate",
    )
    g.add_argument(
        "--hessian-batch-size",
        type=_positive_int,
        default=DEFAULT_HESSIAN_BATCH,
        help="samples of the last training batch used by the Hessian pass",
    )
    g.add_argument(
        "--act-bits",
        type=_act_bits,
        default=None,
        help="also quantize the inputs of quantized layers to this many bits (2..8; default: off)",
    )
    g = t.add_argument_group("optimization")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=_positive_float, default=DEFAULT_EPOCHS, help="passes over the training subset")
    steps.add_argument(
        "--max-steps", type=_positive_int, default=None, help="number of optimizer steps (instead of --epochs)"
    )
    g.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="training batch size")
    g.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help="SGD learning rate (cosine schedule)")
    g.add_argument("--momentum", type=_nonnegative_float, default=DEFAULT_MOMENTUM, help="SGD momentum")
    g.add_argument("--weight-decay", type=_nonnegative_float, default=DEFAULT_WEIGHT_DECAY, help="weight decay")
    g.add_argument("--seed", type=int, default=0, help="seed of the data subset, initialization and probes")
    g = t.add_argument_group("output")
    g.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
    g.add_argument(
        "--report-to", default="none", help="comma-separated Trainer loggers (tensorboard, wandb, ...), or 'none'"
    )
    g.add_argument(
        "--logging-steps",
        type=_positive_int,
        default=None,
        help="print/log every N steps (default: about 20 lines per run)",
    )
    g.add_argument(
        "--evals",
        type=int,
        default=DEFAULT_EVALS_DURING_TRAINING,
        help=f"evaluations during training, on the first {IN_TRAINING_EVAL_IMAGES} eval images "
        "(0 = only the final one)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: the cores available to this process)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-report", action="store_true", help="skip the plots and report.md")
    t.set_defaults(func=cmd_train)

    # -- inspect --------------------------------------------------------------------------------
    i = sub.add_parser(
        "inspect",
        help="show the bit scheme, sizes and integrity of an export",
        description="Read an msq_hf export (folder or Hub repo id) without building the model. "
        "Exit code 0 = intact, 1 = a check failed, 2 = nothing readable at that path.",
    )
    i.add_argument("path", metavar="DIR_OR_REPO", help="export folder or Hub repo id (owner/name)")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the weight files")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--max-layers", type=_positive_int, default=None, help="show at most N layers in the table")
    i.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    i.set_defaults(func=cmd_inspect)

    # -- export ---------------------------------------------------------------------------------
    e = sub.add_parser(
        "export",
        help="write a bit-packed export from an MSQTrainer checkpoint",
        description="Load an MSQTrainer checkpoint or save_model folder (timm or transformers; "
        "also an msq-hf train output folder, which uses its model/ subfolder) and write a "
        "bit-packed export with msq_hf.export.",
    )
    e.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="checkpoint folder (config.json + weights)")
    e.add_argument("output", metavar="OUTPUT", help="export folder to create")
    e.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUTPUT")
    e.add_argument("--push-to-hub", action="store_true", help="also upload the export to the Hub (needs --repo-id)")
    e.add_argument("--repo-id", default=None, help="Hub repo id owner/name for --push-to-hub")
    e.add_argument("--private", action="store_true", help="create the Hub repo as private")
    e.add_argument("--max-shard-size", default=None, help="split the weights above this size (e.g. 2GB)")
    e.set_defaults(func=cmd_export)

    # -- report ---------------------------------------------------------------------------------
    r = sub.add_parser(
        "report",
        help="plots and report.md of a run, checkpoint or export",
        description="Write bits_per_layer.png, bits_timeline.png, training_curves.png, "
        "accuracy_vs_compression.png (those the folder's data allows) and report.md.",
    )
    r.add_argument(
        "path", metavar="RUN_OR_EXPORT_DIR", help="msq-hf train output, MSQTrainer checkpoint or export folder"
    )
    r.add_argument("--output", "-o", default=None, help="report folder (default: RUN_OR_EXPORT_DIR/report)")
    r.set_defaults(func=cmd_report)
    return parser


# ------------------------------------------------------------------------------------------------
# entry point


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError reprs its message
    return text.splitlines()[0]


def _details(exc: BaseException) -> list[str]:
    """Lines after the first: how-to hints (e.g. where to get Fashion-MNIST)."""
    return [line for line in str(exc).strip().splitlines()[1:] if line.strip()]


@contextlib.contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars from transformers (the Trainer's own bar stays)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:  # main() may run in-process (tests, notebooks): restore the global switch
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``msq-hf`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version and usage errors (already printed)
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        print(f"{PROG}: error: choose a command: train, inspect, export or report", file=sys.stderr)
        return 2
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in msq_history.json
    debug = args.debug or os.environ.get("MSQ_HF_DEBUG", "") not in ("", "0")
    try:
        if args.command in ("train", "export"):
            with _quiet_transformers_bars():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `msq-hf inspect ... | head`: the reader left; stop quietly like other Unix tools
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps the interpreter's final flush quiet
        return 141
    except Exception as exc:
        from msq_hf.errors import MSQError

        user_error = isinstance(exc, (CLIError, MSQError, ValueError, TypeError, KeyError, OSError, ImportError))
        if debug or not user_error:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        for line in _details(exc)[:8]:
            print(f"  {line.strip()}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------------------
# inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    """``msq-hf inspect``: print :func:`msq_hf.format_report` (or JSON); exit 0 / 1 (check failed) / 2 (unreadable)."""
    from msq_hf.errors import MSQError
    from msq_hf.io.inspect import format_report, inspect_export

    try:
        report = inspect_export(args.path, verify=not args.no_verify, revision=args.revision)
    except (MSQError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_report(report, args.max_layers))
    if not report.ok:
        print(f"{PROG}: error: {report.errors[0].splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# report


def cmd_report(args: argparse.Namespace) -> int:
    """``msq-hf report``: :func:`msq_hf.report.write_report`; prints the written paths."""
    from msq_hf.report import write_report

    written = write_report(args.path, args.output)
    for path in written:
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------
# export


def _checkpoint_folder(path: Path) -> Path:
    """The folder holding ``config.json``: ``path`` itself, its ``model/`` or its newest ``checkpoint-*``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected an MSQTrainer checkpoint folder)")
    if not path.is_dir():
        raise CLIError(f"{path} is not a directory (expected an MSQTrainer checkpoint folder)")
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    checkpoints = sorted(
        (int(p.name.split("-")[1]), p)
        for p in path.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "config.json").is_file()
    )
    if checkpoints:
        return checkpoints[-1][1]
    raise FileNotFoundError(
        f"{path / 'config.json'} is missing: {path} is not an MSQTrainer checkpoint "
        "(save_model / checkpoint-N folder) nor an msq-hf train output"
    )


def load_msq_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load an MSQ model (fake-quantized, trainable layers) from a checkpoint folder.

    Raw timm checkpoints (``config.json`` with ``architecture``) go through
    :func:`msq_hf.load_timm_checkpoint`; transformers checkpoints through the class named in
    ``config.json["architectures"]`` (MSQ layers come back because ``msq_hf`` is imported); an
    msq_hf export through :func:`msq_hf.from_pretrained`. Raises ``CLIError`` when the folder's
    model has no MSQ layers.
    """
    import msq_hf
    from msq_hf.convert import iter_msq_layers

    folder = _checkpoint_folder(Path(path).expanduser())
    if (folder / "msq_manifest.json").is_file():
        return msq_hf.from_pretrained(folder)
    config = _read_config(folder / "config.json")
    if config.get("architecture"):
        if not config.get("quantization_config"):
            raise CLIError(
                f"{folder / 'config.json'} has no quantization_config: {folder} is a plain timm "
                "model, not an MSQ checkpoint (train it with 'msq-hf train --model' first)"
            )
        model = msq_hf.load_timm_checkpoint(folder)
    else:
        model = _load_hf_class(folder, config)
    if not any(True for _ in iter_msq_layers(model)):
        raise CLIError(
            f"{folder} holds a model without MSQ layers (its config.json has no "
            "quantization_config with quant_method 'msq')"
        )
    return model


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CLIError(f"{path} does not hold a JSON object")
    return data


def _load_hf_class(folder: Path | str, config: dict[str, Any], **kwargs: Any) -> Any:
    import transformers

    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        if "model_type" not in config:
            raise CLIError(
                f"{folder}/config.json has neither 'architecture' (timm) nor 'model_type' "
                "(transformers): cannot tell which model to build"
            )
        cls = transformers.AutoModelForImageClassification
    return cls.from_pretrained(str(folder), **kwargs)


def cmd_export(args: argparse.Namespace) -> int:
    """``msq-hf export``: checkpoint folder -> :func:`msq_hf.export`; prints sizes and the path."""
    import msq_hf

    if args.push_to_hub and not args.repo_id:
        raise CLIError("--push-to-hub needs --repo-id owner/name")
    model = load_msq_checkpoint(args.checkpoint)
    model.eval()
    result = msq_hf.export(
        model,
        args.output,
        push_to_hub=args.push_to_hub,
        repo_id=args.repo_id,
        private=args.private or None,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"exported {len(result.bit_scheme)} quantized layers to {result.directory}")
    print(
        f"  compression: {result.compression_ratio:.2f}x (avg {result.average_bits:.2f} bits), "
        f"{result.storage_compression_ratio:.2f}x with the sign bit"
    )
    print(
        f"  weights    : {_human(result.weight_bytes)} on disk vs {_human(result.float_bytes)} as float "
        f"({result.size_ratio:.1f}x smaller)"
    )
    print(f"  bit scheme : {scheme_summary(result.bit_scheme)}")
    if result.commit_url:
        print(f"  pushed     : {result.repo_id} ({result.commit_url})")
    return 0


# ------------------------------------------------------------------------------------------------
# train: model and data


@dataclass
class _ModelSpec:
    kind: str  # "timm", "hf", "timm_dir", "timm_checkpoint", "export"
    ref: str
    image_size: int
    channels: int


def _timm_input_size(name: str) -> int:
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size:
            return int(cfg.input_size[-1])
    except Exception:  # noqa: BLE001 - unknown tag or old timm: fall back to the usual ImageNet size
        pass
    return 224


def _resolve_model(spec: str) -> _ModelSpec:
    """Decide what ``--model`` names (timm name, local folder of some kind, or Hub model id)."""
    import timm

    from msq_hf import models  # noqa: F401  (registers resnet20_cifar & co. with timm)

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"--model {spec}: {path} is a file; pass a model folder, a timm name or a Hub model id")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"--model {spec}: {config_path} is missing (expected a Hugging Face or timm "
                "model folder, an MSQTrainer checkpoint or an msq_hf export)"
            )
        config = _read_config(config_path)
        if (path / "msq_manifest.json").is_file():
            kind = "export"
        elif config.get("architecture"):
            kind = "timm_checkpoint" if config.get("quantization_config") else "timm_dir"
        else:
            kind = "hf"
        if config.get("architecture"):
            size = (config.get("pretrained_cfg") or {}).get("input_size") or [
                3,
                _timm_input_size(config["architecture"]),
            ]
            return _ModelSpec(kind, str(path), int(size[-1]), 3)
        return _ModelSpec(kind, str(path), _hf_image_size(config), int(config.get("num_channels", 3) or 3))
    if timm.is_model(spec):
        return _ModelSpec("timm", spec, _timm_input_size(spec), 3)
    if spec.count("/") != 1 or any(c.isspace() for c in spec):
        raise CLIError(
            f"--model {spec!r} is neither a timm model name, an existing folder nor a Hub model id "
            "(owner/name); e.g. --model resnet20_cifar"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec).to_dict()
    return _ModelSpec("hf", spec, _hf_image_size(config), int(config.get("num_channels", 3) or 3))


def _hf_image_size(config: dict[str, Any]) -> int:
    size = config.get("image_size")
    if size is None and isinstance(config.get("pretrained_cfg"), dict):  # TimmWrapper configs
        size = (config["pretrained_cfg"].get("input_size") or [224])[-1]
    if isinstance(size, (list, tuple)):
        size = size[-1]
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return int(size or 224)


def _build_model(spec: _ModelSpec, num_classes: int, class_names: Sequence[str], pretrained: bool) -> tuple[Any, Any]:
    """Float model with ``num_classes`` outputs, plus the timm ``model_args`` to record (or ``None``)."""
    import timm

    import msq_hf
    from msq_hf.convert import dequantize_model, iter_msq_layers

    model_args = None
    if spec.kind == "timm":
        model_args = {"num_classes": num_classes}
        model = timm.create_model(spec.ref, pretrained=pretrained, **model_args)
    elif spec.kind == "timm_dir":
        model = timm.create_model(f"local-dir:{spec.ref}", pretrained=True)
    elif spec.kind == "timm_checkpoint":
        model = msq_hf.load_timm_checkpoint(spec.ref)
    elif spec.kind == "export":
        model = msq_hf.from_pretrained(spec.ref, dequantize=True)
    else:
        from transformers import AutoModelForImageClassification

        id2label = {i: str(n) for i, n in enumerate(class_names)}
        # a new head when the label count differs (e.g. an ImageNet model on Fashion-MNIST)
        model = AutoModelForImageClassification.from_pretrained(
            spec.ref,
            num_labels=num_classes,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True,
        )
    if any(True for _ in iter_msq_layers(model)):
        # a quantized starting point: keep its (dequantized) weights, restart MSQ from --init-bits
        model = dequantize_model(model)
    if hasattr(model, "pretrained_cfg") and hasattr(model, "reset_classifier"):
        if getattr(model, "num_classes", num_classes) != num_classes:
            model.reset_classifier(num_classes)
    elif getattr(getattr(model, "config", None), "num_labels", num_classes) != num_classes:
        raise CLIError(
            f"--model {spec.ref} has {model.config.num_labels} output classes but the dataset has "
            f"{num_classes}; pass a model with {num_classes} labels"
        )
    return model, model_args


def _load_eval_split(name: str, image_size: int, channels: int, limit: int, seed: int) -> tuple[Any, str]:
    from msq_hf.data import load_image_dataset

    errors = []
    for split in ("test", "validation", "valid", "val"):
        try:
            return load_image_dataset(
                name, split, image_size=image_size, channels=channels, limit=limit, seed=seed
            ), split
        except ValueError as exc:
            if "split" not in str(exc).lower():
                raise
            errors.append(split)
    raise CLIError(f"--dataset {name}: no evaluation split found (tried {errors})")


def _load_data(args: argparse.Namespace, spec: _ModelSpec) -> tuple[Any, Any, str]:
    import datasets

    from msq_hf.data import load_image_dataset

    datasets.disable_progress_bars()
    try:
        limit = None if args.full_train_set else args.train_limit
        train = load_image_dataset(
            args.dataset, "train", image_size=spec.image_size, channels=spec.channels, limit=limit, seed=args.seed
        )
        evaluation, split = _load_eval_split(args.dataset, spec.image_size, spec.channels, args.eval_limit, args.seed)
    except CLIError:
        raise
    except FileNotFoundError as exc:  # keeps the how-to-get-the-data lines of load_fashion_mnist
        raise FileNotFoundError(f"--dataset {args.dataset}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (offline, unknown id, bad folder)
        raise CLIError(f"--dataset {args.dataset}: cannot load it ({type(exc).__name__}: {_one_line(exc)})") from exc
    finally:
        datasets.enable_progress_bars()
    return train, evaluation, split


def _class_names(dataset: Any) -> list[str]:
    feature = getattr(dataset, "features", {}).get("labels")
    names = getattr(feature, "names", None)
    if not names:
        raise CLIError("the dataset's 'labels' column is not a ClassLabel: the number of classes is unknown")
    return list(names)


# ------------------------------------------------------------------------------------------------
# train: console output


def _human(n: float) -> str:
    from msq_hf.io.card import human_bytes

    return human_bytes(n, digits=1)


def scheme_summary(scheme: dict[str, int], numels: dict[str, int] | None = None) -> str:
    """``'22 layers: 2 bits x9, 3 bits x8, 4 bits x5 (weighted avg 2.61)'``: the mix of a bit scheme."""
    if not scheme:
        return "no quantized layers"
    counts = Counter(scheme.values())
    parts = ", ".join(f"{b} bit{'s' if b != 1 else ''} x{counts[b]}" for b in sorted(counts))
    text = f"{len(scheme)} layers: {parts}"
    if numels and all(n in numels for n in scheme):
        total = sum(numels[n] for n in scheme)
        if total:
            text += f" (weighted avg {sum(numels[n] * b for n, b in scheme.items()) / total:.2f})"
    if len(counts) == 1:
        text += " [uniform]"
    return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _make_console_callback(controller: Any, writer: Any) -> Any:
    """A Trainer callback that prints short log lines and one line per pruning step.

    The Trainer's own console printer would write every log dict, which holds ~4 ``msq/*`` keys per
    layer: unreadable. This one keeps loss, lr, compression, bits and accuracy.
    """
    from transformers import TrainerCallback

    from msq_hf.training.controller import PHASE_CODES

    phase_names = {float(v): k for k, v in PHASE_CODES.items()}

    class ConsoleCallback(TrainerCallback):
        def __init__(self) -> None:
            self.seen = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            history = controller.history
            for entry in history[self.seen :]:
                if entry.get("step", 0) > 0 and (entry.get("pruned") or entry.get("phase") == "final"):
                    pruned = entry.get("pruned") or []
                    names = ", ".join(pruned[:3]) + (f" +{len(pruned) - 3} more" if len(pruned) > 3 else "")
                    label = "final round" if entry.get("phase") == "final" else "pruned"
                    writer(
                        f"[step {entry['step']}] {label}: {entry['compression']:.2f}x, avg "
                        f"{entry['avg_bits']:.2f} bits" + (f" ({names})" if names else "")
                    )
            self.seen = len(history)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            logs = logs or {}
            if any(k.startswith("eval_") for k in logs):
                acc = logs.get("eval_accuracy")
                writer(
                    f"[step {state.global_step}] eval: "
                    + (f"accuracy {100 * acc:.2f}%, " if acc is not None else "")
                    + f"loss {logs.get('eval_loss', float('nan')):.4f}"
                )
                return
            if "loss" not in logs:
                return  # the end-of-training summary dict (train_runtime...) is printed by msq-hf itself
            if state.global_step % max(args.logging_steps, 1) and state.global_step != state.max_steps:
                return  # forced log of a pruning step: already printed by on_step_end
            phase = phase_names.get(float(logs.get("msq/phase", -1)), "?")
            writer(
                f"[step {state.global_step}/{state.max_steps}] loss {logs['loss']:.4f}, lr "
                f"{logs.get('learning_rate', 0):.4g}, {logs.get('msq/compression', 0):.2f}x, avg "
                f"{logs.get('msq/avg_bits', 0):.2f} bits, phase {phase}"
            )

    return ConsoleCallback()


# ------------------------------------------------------------------------------------------------
# train


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"--output {out} is not empty; pass --overwrite or choose another --output")
    out.mkdir(parents=True, exist_ok=True)


def _validate_train_args(args: argparse.Namespace) -> None:
    if args.min_bits > args.init_bits:
        raise CLIError(f"--min-bits {args.min_bits} is above --init-bits {args.init_bits}")
    if args.target > 32 / args.min_bits:
        raise CLIError(
            f"--target {args.target:g} cannot be reached with --min-bits {args.min_bits} "
            f"(at most {32 / args.min_bits:g}x)"
        )
    if args.target <= 32 / args.init_bits:
        raise CLIError(
            f"--target {args.target:g} is already met at --init-bits {args.init_bits} "
            f"({32 / args.init_bits:g}x); choose a target above it"
        )
    if args.evals < 0:
        raise CLIError(f"--evals {args.evals} is not allowed (expected 0 or more)")


def cmd_train(args: argparse.Namespace) -> int:
    """``msq-hf train``: MSQTrainer run, evaluation, export, ``msq_history.json`` and report; prints a summary."""
    start = time.time()
    _validate_train_args(args)
    out = Path(args.output).expanduser().resolve()
    _prepare_output(out, args.overwrite)

    import torch
    import transformers
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments, set_seed

    import msq_hf
    from msq_hf.convert import bit_scheme, compression_ratio, layer_numels
    from msq_hf.metrics import compute_accuracy_metrics
    from msq_hf.report import HISTORY_NAME, write_report
    from msq_hf.training.trainer import MSQTrainer

    threads = args.threads or _available_cores()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # the raw-model / optimizer notices are not for this console
    logging.getLogger("msq_hf").setLevel(logging.WARNING)
    # inductor (used by the fused MSQ kernels) notes that no CUDA exists: true and irrelevant on CPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    set_seed(args.seed)

    say = print
    spec = _resolve_model(args.model)
    say(
        f"msq-hf train: {args.model} on {args.dataset}, {spec.image_size}x{spec.image_size}, {threads} CPU "
        f"thread{'s' if threads != 1 else ''} -> {out}"
    )
    train_ds, eval_ds, eval_split = _load_data(args, spec)
    class_names = _class_names(train_ds)
    model, model_args = _build_model(spec, len(class_names), class_names, args.pretrained)

    cfg = msq_hf.MSQConfig(
        init_bits=args.init_bits,
        min_bits=args.min_bits,
        target_compression=args.target,
        reg_strength=args.reg_strength,
        prune_threshold=args.prune_threshold,
        prune_interval=args.prune_interval,
        final_round_fraction=args.final_round_fraction,
        hessian_guided=not args.no_hessian,
        hessian_max_probes=args.hessian_probes,
        hessian_batch_size=args.hessian_batch_size,
        act_bits=args.act_bits,
    )
    steps_per_epoch = math.ceil(len(train_ds) / args.batch_size)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    if max_steps < args.prune_interval:
        say(
            f"note: {max_steps} steps is less than --prune-interval {args.prune_interval}: only the forced final "
            "round will prune"
        )
    logging_steps = args.logging_steps or max(1, max_steps // 20)
    eval_steps = max(1, max_steps // args.evals) if args.evals else None
    in_training_eval = eval_ds.select(range(min(len(eval_ds), IN_TRAINING_EVAL_IMAGES))) if eval_steps else None
    report_to = [s.strip() for s in args.report_to.split(",") if s.strip()] or ["none"]

    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 256),
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        weight_decay=args.weight_decay,
        optim="sgd",
        optim_args=f"momentum={args.momentum}",
        logging_steps=logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="no",
        report_to=report_to,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=args.no_progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = MSQTrainer(
        model=model,
        args=training_args,
        msq_config=cfg,
        model_args=model_args,
        train_dataset=train_ds,
        eval_dataset=in_training_eval,
        compute_metrics=compute_accuracy_metrics,
    )
    # replace the Trainer's console printer (it prints whole log dicts) with short lines
    progress = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)), None)

    def write(line: str) -> None:
        bar = getattr(progress, "training_bar", None)
        (bar.write if bar is not None else print)(line)

    if progress is not None:
        progress.on_log = lambda *a, **k: None  # keep its bars, drop its dict dump
    trainer.remove_callback(PrinterCallback)  # the disable_tqdm=True printer of whole log dicts
    trainer.add_callback(_make_console_callback(trainer.msq_controller, write))
    say(
        f"training {max_steps} steps ({max_steps / steps_per_epoch:.2f} epochs of {len(train_ds):,} images, "
        f"batch {args.batch_size}); MSQ {args.init_bits} bits -> {args.target:g}x, pruning every "
        f"{args.prune_interval} steps"
    )
    train_start = time.time()
    train_output = trainer.train()
    train_seconds = time.time() - train_start

    say(f"evaluating on {len(eval_ds):,} {eval_split} images")
    metrics = trainer.evaluate(eval_dataset=eval_ds, metric_key_prefix="test")
    core = trainer.model
    core.eval()
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    export_dir = out / "export"
    result = msq_hf.export(core, export_dir, overwrite=True)
    scheme, numels = bit_scheme(core), layer_numels(core)
    controller = trainer.msq_controller

    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "train_images": len(train_ds),
        "eval_images": len(eval_ds),
        "eval_split": eval_split,
        "steps": int(trainer.state.global_step),
        "test_accuracy": metrics.get("test_accuracy"),
        "test_loss": metrics.get("test_loss"),
        "compression": compression_ratio(core, count_sign_bit=False),
        "storage_compression": result.storage_compression_ratio,
        "average_bits": result.average_bits,
        "target_compression": args.target,
        "export_weight_bytes": result.weight_bytes,
        "float_weight_bytes": result.float_bytes,
        "train_seconds": round(train_seconds, 1),
        "train_loss": train_output.training_loss,
        "threads": threads,
    }
    history = {
        "version": HISTORY_VERSION,
        "msq_hf_version": msq_hf.__version__,
        "argv": getattr(args, "argv", None),
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "target_compression": args.target,
        "count_sign_bit": cfg.count_sign_bit,
        "total_steps": max_steps,
        "msq_config": cfg.to_dict(),
        "bit_scheme": scheme,
        "numels": numels,
        "summary": summary,
        "history": controller.history,
        "log_history": trainer.state.log_history,
        "baselines": [],
        "paths": {"model": str(model_dir), "export": str(export_dir), "report": str(out / "report")},
    }
    history_path = out / HISTORY_NAME
    written: list[Path] = []
    summary["wall_seconds"] = round(time.time() - start, 1)
    history_path.write_text(json.dumps(history, indent=1, default=_json_default), encoding="utf-8")
    if not args.no_report:
        written = write_report(out)
    summary["wall_seconds"] = round(time.time() - start, 1)
    history_path.write_text(json.dumps(history, indent=1, default=_json_default), encoding="utf-8")

    folder_bytes = sum(p.stat().st_size for p in export_dir.iterdir() if p.is_file())
    acc = summary["test_accuracy"]
    say("")
    say(
        f"MSQ done in {_duration(summary['wall_seconds'])} (training {_duration(train_seconds)}, "
        f"{summary['steps']} steps)"
    )
    say(
        f"  accuracy    : {100 * acc:.2f}% on {len(eval_ds):,} {eval_split} images"
        if acc is not None
        else "  accuracy    : n/a"
    )
    say(
        f"  compression : {summary['compression']:.2f}x (target {args.target:g}x, avg "
        f"{result.average_bits:.2f} magnitude bits; {result.storage_compression_ratio:.2f}x with the sign bit)"
    )
    say(f"  bit scheme  : {scheme_summary(scheme, numels)}")
    say(
        f"  on disk     : export weights {_human(result.weight_bytes)} vs {_human(result.float_bytes)} float32 "
        f"({result.size_ratio:.1f}x smaller); export folder {_human(folder_bytes)}"
    )
    say(f"  export      : {export_dir}   (msq-hf inspect {export_dir})")
    say(f"  checkpoint  : {model_dir}")
    if written:
        pngs = [p for p in written if p.suffix == ".png"]
        say(f"  report      : {out / 'report' / 'report.md'} (+{len(pngs)} plots)")
    say(f"  history     : {history_path}")
    return 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


__all__ = ["CLIError", "build_parser", "load_msq_checkpoint", "main", "scheme_summary"]
