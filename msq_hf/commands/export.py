"""``msq-hf export CHECKPOINT_DIR OUTPUT``: turn an ``MSQTrainer`` checkpoint into a bit-packed export (options:
``commands.main``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import msq_hf
from msq_hf.commands.common import CLIError, scheme_summary
from msq_hf.convert import iter_msq_layers
from msq_hf.io.card import human_bytes
from msq_hf.io.files import check_target
from msq_hf.pipeline.model import read_config, refuse_pickle_weights


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
    refuse_pickle_weights(folder, "CHECKPOINT_DIR")
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


def checkpoint_processor(path: str | os.PathLike[str]) -> Any:
    """The image processor a checkpoint folder holds (``preprocessor_config.json``, written by ``Trainer`` from its
    ``processing_class``), or None; the export carries it so that ``pipeline(model=OUTPUT)`` works."""
    from transformers import AutoImageProcessor
    from transformers.utils import IMAGE_PROCESSOR_NAME

    folder = checkpoint_folder(Path(path).expanduser())
    if not (folder / IMAGE_PROCESSOR_NAME).is_file():
        return None
    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CLIError(f"{folder / IMAGE_PROCESSOR_NAME} cannot be loaded as an image processor: {exc}") from exc


def cmd_export(args: argparse.Namespace) -> int:
    """``msq-hf export``: checkpoint folder -> :func:`msq_hf.export`; prints sizes and the path."""
    if args.push_to_hub and not args.repo_id:
        raise CLIError("--push-to-hub needs --repo-id owner/name")
    overwrite = "force" if args.force_overwrite else args.overwrite
    check_target(args.output, overwrite, [args.checkpoint])  # before the slow load; knows the source folder
    model = load_msq_checkpoint(args.checkpoint)
    model.eval()
    result = msq_hf.export(
        model,
        args.output,
        push_to_hub=args.push_to_hub,
        repo_id=args.repo_id,
        private=args.private or None,
        max_shard_size=args.max_shard_size,
        overwrite=overwrite,
        processor=checkpoint_processor(args.checkpoint),
    )
    print(f"exported {len(result.bit_scheme)} quantized layers to {result.directory}")
    print(
        f"  compression: {result.compression_ratio:.2f}x (avg {result.average_bits:.2f} bits), "
        f"{result.storage_compression_ratio:.2f}x with the sign bit"
    )
    print(
        f"  weights    : {human_bytes(result.weight_bytes, 1)} on disk vs "
        f"{human_bytes(result.float_bytes, 1)} as float ({result.size_ratio:.1f}x smaller)"
    )
    print(f"  bit scheme : {scheme_summary(result.bit_scheme)}")
    if result.commit_url:
        print(f"  pushed     : {result.repo_id} ({result.commit_url})")
    return 0


__all__ = ["checkpoint_folder", "checkpoint_processor", "cmd_export", "load_msq_checkpoint"]
