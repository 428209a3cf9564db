"""Writing export folders: the atomic directory swap, sharded safetensors, JSON, and the Hub upload.

Nothing here knows about models or MSQ: ``msq_hf.io.export`` decides what goes into the folder, this module
makes sure it appears all at once (or not at all) with ordinary permissions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, split_torch_state_dict_into_shards
from safetensors.torch import save_file

from msq_hf.errors import MSQExportError
from msq_hf.io.format import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_PATTERN, tensor_bytes

TMP_MARK = ".msq-export-tmp-"  # infix of the temporary sibling folders


def write_json(path: Path, data: Any) -> None:
    """Indented, key-sorted JSON with a trailing newline (stable diffs)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def json_safe(value: Any, what: str) -> Any:
    """``value`` as plain JSON types, or ``MSQExportError`` naming ``what``."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise MSQExportError(f"{what} is not JSON-serialisable ({exc}); the export could not be rebuilt") from exc


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage: give each later alias its own copy
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            tensor = tensor.clone()
        seen.add(ident)
        out[key] = tensor
    return out


def save_safetensors(
    state: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str], max_shard_size: int | str | None
) -> tuple[list[str], str]:
    """Write ``msq_model*.safetensors`` (+ index when sharded); return (weight files, the entry to record)."""
    state = _dedupe_shared(state)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size or "50GB"
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({k: state[k] for k in names}, str(directory / filename), metadata=metadata)
    if not split.is_sharded:
        return sorted(split.filename_to_tensors), WEIGHTS_NAME
    index = {
        "metadata": {"total_size": sum(tensor_bytes(t) for t in state.values())},
        "weight_map": split.tensor_to_filename,
    }
    write_json(directory / WEIGHTS_INDEX_NAME, index)
    return sorted(split.filename_to_tensors), WEIGHTS_INDEX_NAME


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists():
        if not target.is_dir():
            raise MSQExportError(f"export target {target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise MSQExportError(f"export target {target} exists and is not empty; pass overwrite=True to replace it")


def _apply_umask_permissions(root: Path) -> None:
    """Give the export the permissions a plain ``mkdir``/``open`` would have (``mkdtemp`` and
    ``mkstemp`` create owner-only 0700/0600 entries, which would hide an export from other users)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _install(tmp: Path, target: Path) -> None:
    """Move the finished temp dir into place; an existing target is swapped out, then deleted."""
    _apply_umask_permissions(tmp)
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}old-", dir=target.parent))
        os.replace(target, backup / "old")
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            os.replace(backup / "old", target)
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def check_target(save_directory: str | os.PathLike, overwrite: bool) -> Path:
    """The resolved target folder; ``MSQExportError`` if it is a file or (without ``overwrite``) not empty."""
    target = Path(save_directory).expanduser().resolve()
    _check_target(target, overwrite)
    return target


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; on success it replaces ``target`` in one rename.

    On any exception the temporary folder is removed and an existing ``target`` is left as it was.
    """
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))
    try:
        yield tmp
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def push_export(
    directory: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> tuple[str, str | None]:
    """Upload an export folder to the Hub (``create_repo(exist_ok=True)`` + ``upload_folder``)."""
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        repo_type="model",
        commit_message=commit_message or "Upload MSQ bit-packed export (msq_hf)",
    )
    return repo_id, getattr(info, "commit_url", None) or (str(info) if info is not None else None)


__all__ = ["TMP_MARK", "atomic_directory", "check_target", "json_safe", "push_export", "save_safetensors", "write_json"]
