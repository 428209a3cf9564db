"""``msq-hf export CHECKPOINT_DIR OUTPUT``: turn an ``MSQTrainer`` checkpoint into a bit-packed export."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import msq_hf
from msq_hf.commands.common import CLIError, human, scheme_summary
from msq_hf.convert import iter_msq_layers
from msq_hf.pipeline.model import read_config


def add_export_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``sub`` (the ``add_subparsers()`` object of ``msq-hf``)."""
    parser = sub.add_parser(
        "export",
        help="write a bit-packed export from an MSQTrainer checkpoint",
        description="Load an MSQTrainer checkpoint or save_model folder (timm or transformers; "
        "also an msq-hf train output folder, which uses its model/ subfolder) and write a "
        "bit-packed export with msq_hf.export.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="checkpoint folder (config.json + weights)")
    parser.add_argument("output", metavar="OUTPUT", help="export folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUTPUT")
    parser.add_argument(
        "--push-to-hub", action="store_true", help="also upload the export to the Hub (needs --repo-id)"
    )
    parser.add_argument("--repo-id", default=None, help="Hub repo id owner/name for --push-to-hub")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--max-shard-size", default=None, help="split the weights above this size (e.g. 2GB)")
    parser.set_defaults(func=cmd_export)
    return parser


def checkpoint_folder(path: Path) -> Path:
    """The folder holding ``config.json``: ``path`` itself, its ``model/`` or its newest ``checkpoint-N``."""
    from transformers.trainer_utils import get_last_checkpoint

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected an MSQTrainer checkpoint folder)")
    if not path.is_dir():
        raise CLIError(f"{path} is not a directory (expected an MSQTrainer checkpoint folder)")
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    last = get_last_checkpoint(str(path))  # Trainer output_dir: the checkpoint-N with the largest N
    if last is not None and (Path(last) / "config.json").is_file():
        return Path(last)
    raise FileNotFoundError(
        f"{(Path(last) if last else path) / 'config.json'} is missing: {path} is not an MSQTrainer checkpoint "
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
    folder = checkpoint_folder(Path(path).expanduser())
    if (folder / "msq_manifest.json").is_file():
        return msq_hf.from_pretrained(folder)
    config = read_config(folder / "config.json")
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


def _load_hf_class(folder: Path, config: dict[str, Any]) -> Any:
    """The transformers class named by ``config.json['architectures']`` (else the image-classification auto
    class), loaded from ``folder``."""
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
    return cls.from_pretrained(str(folder))


def cmd_export(args: argparse.Namespace) -> int:
    """``msq-hf export``: checkpoint folder -> :func:`msq_hf.export`; prints sizes and the path."""
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
        f"  weights    : {human(result.weight_bytes)} on disk vs {human(result.float_bytes)} as float "
        f"({result.size_ratio:.1f}x smaller)"
    )
    print(f"  bit scheme : {scheme_summary(result.bit_scheme)}")
    if result.commit_url:
        print(f"  pushed     : {result.repo_id} ({result.commit_url})")
    return 0


__all__ = ["add_export_parser", "checkpoint_folder", "cmd_export", "load_msq_checkpoint"]
