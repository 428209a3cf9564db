"""``save_pretrained`` / ``push_to_hub`` of MSQ transformers models: what the user saves is the packed export.

:func:`msq_hf.quantize_model` (and loading an MSQ checkpoint or export with transformers) binds
:func:`save_pretrained` and :func:`push_to_hub` on the model (``msq_hf.integrations.transformers.install_save_hooks``):

* ``model.save_pretrained(d)``, ``Trainer.save_model()`` and ``Trainer.push_to_hub()`` write the packed export
  (``msq_model.safetensors`` + manifest + card + plot) into ``d``, replacing earlier weight files there, so a
  stale float ``model.safetensors`` can never sit next to it;
* ``model.push_to_hub(repo_id)`` exports into a temporary folder and uploads it, card included (transformers'
  own ``push_to_hub`` would replace the card with an empty one);
* Trainer checkpoints (folders ``checkpoint-<step>``) and ``save_pretrained(d, msq_format="fake")`` stay resumable
  training checkpoints: float latent weights + ``bits``/``k`` in ``model.safetensors``. Their ``config.json`` carries
  the load guard as well, so transformers without msq_hf refuses them instead of loading the latent weights as a
  float model.

A model that is no longer MSQ (``model.dequantize()``) saves with transformers' own ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from msq_hf.convert import iter_msq_layers
from msq_hf.integrations.transformers import GUARD_KEY, LOAD_GUARD, MSQQuantizer, register_save_hooks
from msq_hf.io import card
from msq_hf.io.export import ExportResult, export
from msq_hf.io.files import push_export, write_json
from msq_hf.io.format import CARD_NAME, CONFIG_NAME, MANIFEST_NAME, WEIGHTS_PATTERN
from msq_hf.io.format import WEIGHTS_INDEX_NAME as MSQ_WEIGHTS_INDEX_NAME
from msq_hf.nn.packed import MSQPackedMixin

logger = logging.getLogger(__name__)

FORMATS = ("packed", "fake")
_CHECKPOINT_DIR = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-\d+")
# weight files of any earlier save in the folder: they must not outlive a new save (a float model.safetensors
# next to a packed export would be what plain transformers loads)
_STALE_WEIGHTS = (
    SAFE_WEIGHTS_NAME.replace(".safetensors", "*.safetensors"),
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME.replace(".bin", "*.bin"),
    WEIGHTS_INDEX_NAME,
    WEIGHTS_PATTERN.format(suffix="*"),
    MSQ_WEIGHTS_INDEX_NAME,
)
_HUB_ARGS = ("repo_id", "private", "token", "commit_message", "create_pr", "revision", "commit_description")


def is_msq_model(model: nn.Module) -> bool:
    """True while ``model`` is MSQ (MSQ or packed layers + the MSQ quantizer); False after ``dequantize()``."""
    if not isinstance(getattr(model, "hf_quantizer", None), MSQQuantizer):
        return False
    return any(True for _ in iter_msq_layers(model)) or any(isinstance(m, MSQPackedMixin) for m in model.modules())


def saves_as(model: nn.Module, save_directory: str | os.PathLike, msq_format: str | None = None) -> str:
    """``"packed"`` (export) or ``"fake"`` (training checkpoint) for a save of ``model`` into ``save_directory``."""
    if msq_format is not None and msq_format not in FORMATS:
        raise ValueError(f"msq_format={msq_format!r} is invalid: expected one of {FORMATS}")
    if any(isinstance(m, MSQPackedMixin) for m in model.modules()):
        return "packed"  # a loaded export holds codes only: there are no latent weights to checkpoint
    if msq_format is not None:
        return msq_format
    return "fake" if _CHECKPOINT_DIR.fullmatch(Path(save_directory).name) else "packed"


def add_load_guard(config_path: Path) -> None:
    """Put :data:`LOAD_GUARD` into a ``config.json`` (see ``msq_hf.integrations.transformers``)."""
    data = json.loads(config_path.read_text())
    data[GUARD_KEY] = LOAD_GUARD
    write_json(config_path, data)


def _install_files(source: Path, target: Path) -> None:
    """Move every file of ``source`` into ``target`` after removing ``target``'s earlier weight files."""
    target.mkdir(parents=True, exist_ok=True)
    for pattern in _STALE_WEIGHTS:
        for stale in target.glob(pattern):
            if stale.is_file():
                stale.unlink()
    for path in sorted(source.iterdir()):
        os.replace(path, target / path.name)


def _export_into(model: nn.Module, target: Path, **export_kwargs: Any) -> ExportResult:
    """``export`` into a fresh sibling folder of ``target``, then move the files into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.msq-save-", dir=target.parent))
    try:
        result = export(model, scratch / "export", **export_kwargs)
        _install_files(scratch / "export", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.directory = target
    return result


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    msq_format: str | None = None,
    card_data: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``model.save_pretrained`` of an MSQ transformers model: the packed export, or a training checkpoint.

    Args:
        save_directory: folder to write into (created if needed); earlier weight files in it are replaced.
        msq_format: ``"packed"`` (default; ``"fake"`` for Trainer ``checkpoint-<step>`` folders) or ``"fake"``
            (a resumable training checkpoint: latent weights + ``bits``/``k``).
        card_data: model card metadata, see :func:`msq_hf.export` (default: ``model.msq_card_data`` if set).
        kwargs: ``save_pretrained`` arguments. Packed saves take ``max_shard_size``, ``is_main_process``,
            ``state_dict`` (ignored with a warning: the model's own layers are packed), ``push_to_hub`` and the
            Hub arguments (``repo_id``, ``token``, ``private``, ``commit_message``...); others are refused.
    """
    if not is_msq_model(model):
        return type(model).save_pretrained(model, save_directory, **kwargs)
    fmt = saves_as(model, save_directory, msq_format)
    target = Path(save_directory)
    if fmt == "fake":
        type(model).save_pretrained(model, save_directory, **kwargs)
        if kwargs.get("is_main_process", True) and (target / CONFIG_NAME).is_file():
            add_load_guard(target / CONFIG_NAME)
        return None
    push = kwargs.pop("push_to_hub", False)
    hub = {k: kwargs.pop(k) for k in _HUB_ARGS if k in kwargs}
    max_shard_size = kwargs.pop("max_shard_size", None)
    if not kwargs.pop("is_main_process", True):
        return None
    if kwargs.pop("state_dict", None) is not None:
        logger.warning("msq_hf: save_pretrained(state_dict=...) is ignored: the export packs the model's own layers")
    kwargs.pop("safe_serialization", None)  # exports are always safetensors
    if kwargs:
        raise TypeError(
            f"save_pretrained of an MSQ model writes the packed export and does not take {sorted(kwargs)}; "
            "pass msq_format='fake' for a plain transformers checkpoint of the training state"
        )
    card_data = card_data if card_data is not None else getattr(model, "msq_card_data", None)
    repo_id = hub.pop("repo_id", None) or (target.name if push else None)
    _export_into(model, target, max_shard_size=max_shard_size, card_data=card_data, repo_id=repo_id)
    if push:
        private, token, message = hub.pop("private", None), hub.pop("token", None), hub.pop("commit_message", None)
        return push_export(target, repo_id, private=private, token=token, commit_message=message, **hub)[1]
    return None


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    card_data: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``model.push_to_hub`` of an MSQ transformers model: upload the packed export with its model card.

    Same arguments as transformers' ``push_to_hub``; ``tags`` join the card's tags; ``card_data`` as in
    :func:`msq_hf.export`. Returns the commit URL.
    """
    if not is_msq_model(model):
        return type(model).push_to_hub(
            model,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=tags,
            **kwargs,
        )
    if kwargs:
        raise TypeError(f"push_to_hub of an MSQ model got unexpected argument(s) {sorted(kwargs)}")
    meta = dict(card_data if card_data is not None else getattr(model, "msq_card_data", None) or {})
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    extra_tags += list(getattr(model, "model_tags", None) or [])
    if extra_tags:
        meta["tags"] = list(dict.fromkeys([*meta.get("tags", []), *extra_tags]))
    upload = {"commit_description": commit_description, "revision": revision, "create_pr": create_pr or None}
    with tempfile.TemporaryDirectory(prefix="msq-push-") as tmp:
        result = export(model, Path(tmp) / "export", max_shard_size=max_shard_size, card_data=meta, repo_id=repo_id)
        _, url = push_export(
            result.directory,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            **{k: v for k, v in upload.items() if v is not None},
        )
    return url


def adopt_trainer_card(directory: str | os.PathLike) -> bool:
    """After ``Trainer.create_model_card`` wrote its card over an export's, write the export's card again,
    keeping what the Trainer knew (datasets, license, base model, evaluation results). False if ``directory``
    holds no export."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    meta = dict(manifest.get("card") or {})
    readme = directory / CARD_NAME
    if readme.is_file():
        data = ModelCard.load(readme).data
        meta.setdefault("datasets", data.datasets)
        meta.setdefault("license", data.license)
        if data.base_model and not manifest["model"].get("base_model"):
            base = data.base_model if isinstance(data.base_model, str) else data.base_model[0]
            manifest["model"]["base_model"] = base
        results = [r for r in data.eval_results or [] if isinstance(r.metric_value, (int, float))]
        if results and not meta.get("metrics"):
            meta["metrics"] = {r.metric_type: r.metric_value for r in results}
            meta.setdefault("datasets", [results[0].dataset_type])
            meta["datasets"] = meta["datasets"] or [results[0].dataset_type]
        meta["model_name"] = meta.get("model_name") or data.model_name
    manifest["card"] = card.check_card_data(meta)
    card.build_model_card(manifest).save(readme)
    return True


register_save_hooks(save_pretrained=save_pretrained, push_to_hub=push_to_hub)

__all__ = ["FORMATS", "adopt_trainer_card", "is_msq_model", "push_to_hub", "save_pretrained", "saves_as"]
