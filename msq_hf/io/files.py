"""Writing export folders: the atomic directory swap, sharded safetensors, JSON, and the Hub upload.

Nothing here knows about models or MSQ: ``msq_hf.io.export`` decides what goes into the folder, this module
makes it appear all at once (or not at all) with ordinary permissions, and never loses a user file: a target
that is not an msq_hf export (or is the current directory, ``$HOME``, or contains the source) is only replaced
with ``overwrite="force"``; on Linux ``renameat2`` installs the folder (``RENAME_NOREPLACE``: check and install
in one step; ``RENAME_EXCHANGE``: old and new swapped, never a moment without a target), elsewhere a lock file
plus plain ``rename``; temporaries ``.<name>.msq-export-tmp-<host>-<pid>-<kind>-*`` of dead processes are
cleaned up by the next export into the same parent folder. See docs/export.md ("Overwriting and atomicity").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from huggingface_hub import HfApi, split_torch_state_dict_into_shards
from safetensors.torch import save_file

from msq_hf.errors import MSQExportError
from msq_hf.io.format import MANIFEST_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_PATTERN, tensor_bytes

logger = logging.getLogger(__name__)

TMP_MARK = ".msq-export-tmp-"  # infix of the temporary sibling folders
Overwrite = bool | Literal["force"]
RENAME_NOREPLACE = 1  # <linux/fs.h>
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # pids only mean something on their own host
_SHOWN_NAMES = 5  # file names quoted in a refusal
_COUNT_LIMIT = 10_000  # stop counting the files of a huge folder (e.g. $HOME) there


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


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the platform or file system lacks it (use the fallback).

    Raises the ``OSError`` of the call otherwise (``FileExistsError`` for ``RENAME_NOREPLACE`` onto an
    existing ``dst``, ``FileNotFoundError`` for ``RENAME_EXCHANGE`` with a missing ``dst``).
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # e.g. NFS, some FUSE
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Name -> (mode, size, mtime_ns) of the folder's entries: a file written, removed or rewritten changes it."""
    out = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            out[entry.name] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _contents(folder: Path) -> str:
    """``"3 files and 1 folder (a.txt, b/, ...)"``: what replacing ``folder`` would delete."""
    files = dirs = 0
    for _, subdirs, names in os.walk(folder):
        files, dirs = files + len(names), dirs + len(subdirs)
        if files + dirs >= _COUNT_LIMIT:
            break
    top = sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in folder.iterdir())
    shown = ", ".join(top[:_SHOWN_NAMES]) + (", ..." if len(top) > _SHOWN_NAMES else "")
    more = "at least " if files + dirs >= _COUNT_LIMIT else ""
    return f"{more}{files} file{'s' * (files != 1)} and {dirs} folder{'s' * (dirs != 1)} ({shown})"


def _protected(target: Path, sources: Sequence[Path], entries: dict[str, Any]) -> list[str]:
    """Why replacing the non-empty ``target`` needs ``overwrite="force"`` (empty: it may be replaced)."""
    reasons = []
    if target == Path.cwd().resolve():
        reasons.append("it is the current directory")
    if target == Path.home().resolve():
        reasons.append("it is your home directory")
    for source in sources:
        if target in source.parents:
            reasons.append(f"it contains the model being exported ({source})")
    if MANIFEST_NAME not in entries:
        reasons.append(f"it is not an msq_hf export (no {MANIFEST_NAME})")
    elif any(os.path.isdir(target / name) for name in entries):
        reasons.append("it holds sub-folders, which an msq_hf export never does")
    return reasons


def _check_target(target: Path, overwrite: Overwrite, sources: Sequence[Path] = ()) -> dict[str, Any]:
    """The target's entries now ({} when absent or empty); ``MSQExportError`` when it may not be replaced."""
    if overwrite not in (False, True, "force"):
        raise MSQExportError(f"overwrite must be False, True or 'force', got {overwrite!r}")
    if not target.exists():
        return {}
    if not target.is_dir():
        raise MSQExportError(f"export target {target} exists and is not a directory")
    entries = _snapshot(target)
    if not entries:
        return {}
    if not overwrite:
        raise MSQExportError(f"export target {target} exists and is not empty; pass overwrite=True to replace it")
    if target.parent == target:
        raise MSQExportError(f"refusing to replace {target}: it is the root of the file system")
    reasons = _protected(target, [Path(s).expanduser().resolve() for s in sources], entries)
    if reasons and overwrite != "force":
        raise MSQExportError(
            f"refusing to overwrite {target}: {'; '.join(reasons)}. Replacing it would delete {_contents(target)}. "
            "Choose another folder, or pass overwrite='force' (msq-hf export --force-overwrite) to replace it anyway"
        )
    return entries


def check_target(
    save_directory: str | os.PathLike, overwrite: Overwrite, sources: Sequence[str | os.PathLike] = ()
) -> Path:
    """The resolved target folder; ``MSQExportError`` if it may not be (re)placed.

    Refused: a file; a non-empty folder without ``overwrite``; with ``overwrite=True`` a non-empty folder that
    is the current directory, ``$HOME``, contains one of ``sources`` or does not look like an msq_hf export
    (``overwrite="force"`` replaces those too, never ``/``). The message says what would be deleted.
    """
    target = Path(save_directory).expanduser().resolve()
    _check_target(target, overwrite, [Path(s) for s in sources])
    return target


def source_folders(model: Any) -> list[Path]:
    """Local folders a model records it was loaded from (transformers' ``config.name_or_path``)."""
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return [Path(name).resolve()] if isinstance(name, str) and name and os.path.isdir(name) else []


def _tmp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}{TMP_MARK}{_HOST}-{os.getpid()}-{kind}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when that cannot be told: such temporaries are kept)."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Remove the export temporaries in ``parent`` left by dead processes of this host; return them.

    An old export moved aside by a fallback install that was killed before the new one arrived is put
    back in place instead (its target is missing).
    """
    handled = []
    for path in parent.glob(f".*{TMP_MARK}*"):
        name, _, tag = path.name[1:].rpartition(TMP_MARK)
        host, pid, kind, *_ = [*tag.split("-", 3), "", "", ""]
        if host != _HOST or not pid.isdigit() or pid_alive(int(pid)) or not path.is_dir():
            continue
        target = parent / name
        if kind == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(path / "old", target)
                logger.warning("msq_hf: restored %s, moved aside by an export that was killed", target)
        shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


def _apply_umask_permissions(root: Path) -> None:
    """Give the export the permissions a plain ``mkdir``/``open`` would have (``mkdtemp`` and
    ``mkstemp`` create owner-only 0700/0600 entries, which would hide an export from other users)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _changed(target: Path, what: str) -> MSQExportError:
    return MSQExportError(
        f"export target {target} {what} while the export was written (another export or program?); "
        "it was left as it is and this export was discarded"
    )


def _lock(target: Path) -> FileLock:
    """The fallback's lock, among the exports of this host (kept out of the user's folder)."""
    digest = hashlib.sha256(os.fsencode(target)).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"msq-export-{digest}.lock")


def _install_new(tmp: Path, target: Path, was_empty: bool) -> None:
    """``tmp`` -> ``target``, which was absent or empty: never replaces anything written there meanwhile."""
    if was_empty and target.is_dir() and not target.is_symlink():
        try:
            target.rmdir()  # only succeeds while it is still empty
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _changed(target, "received files") from exc
    try:
        if renameat2(tmp, target, RENAME_NOREPLACE):
            return
    except FileExistsError as exc:
        raise _changed(target, "appeared") from exc
    with _lock(target):
        if os.path.lexists(target):  # plain rename would replace an empty folder or a file
            raise _changed(target, "appeared")
        os.rename(tmp, target)


def _install_exchange(tmp: Path, target: Path, before: dict[str, Any]) -> None:
    """Swap ``tmp`` and the old export at ``target``; the old one is deleted only if nobody touched it."""
    try:
        swapped = renameat2(tmp, target, RENAME_EXCHANGE)
    except FileNotFoundError as exc:
        raise _changed(target, "was removed") from exc
    if swapped:
        if _snapshot(tmp) != before:  # tmp now holds the old export
            renameat2(tmp, target, RENAME_EXCHANGE)  # put it back as it is
            raise _changed(target, "changed")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    with _lock(target):
        if not target.is_dir() or _snapshot(target) != before:
            raise _changed(target, "changed")
        # two renames: a kill in between leaves the old export in the "old" temporary, which the next
        # export puts back (clean_stale_temporaries)
        backup = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target, "old"), dir=target.parent))
        os.rename(target, backup / "old")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup / "old", target)
            backup.rmdir()
            raise
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: Overwrite = False, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; on success it is installed as ``target`` in one step.

    ``target`` is checked as by :func:`check_target`. On any exception the temporary folder is removed and an
    existing ``target`` is left as it was; a target that was absent or empty at the start and received files
    meanwhile, or an old export that changed meanwhile, is never replaced (``MSQExportError``). Of two
    concurrent exports into one folder exactly one wins.
    """
    if target.parent.is_dir():  # first: a killed fallback install may have left the old export aside
        clean_stale_temporaries(target.parent)
    before = _check_target(target, overwrite, sources)
    was_empty = not before and target.is_dir()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target, "new"), dir=target.parent))
    except OSError as exc:
        raise MSQExportError(
            f"cannot write the export {target}: its folder {target.parent} is not writable "
            f"({exc.strerror or type(exc).__name__})"
        ) from exc
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.filename is None or tmp not in Path(str(exc.filename)).parents:
                raise
            name = Path(str(exc.filename)).relative_to(tmp)
            raise MSQExportError(f"writing {name} of the export {target} failed: {exc.strerror or exc}") from exc
        _apply_umask_permissions(tmp)
        if before:
            _install_exchange(tmp, target, before)
        else:
            _install_new(tmp, target, was_empty)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def push_export(
    directory: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    **upload_kwargs: Any,
) -> tuple[str, str | None]:
    """Upload an export folder to the Hub (``create_repo(exist_ok=True)`` + ``upload_folder(**upload_kwargs)``)."""
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        repo_type="model",
        commit_message=commit_message or "Upload MSQ bit-packed export (msq_hf)",
        **upload_kwargs,
    )
    return repo_id, getattr(info, "commit_url", None) or (str(info) if info is not None else None)


__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "TMP_MARK",
    "Overwrite",
    "atomic_directory",
    "check_target",
    "clean_stale_temporaries",
    "json_safe",
    "pid_alive",
    "push_export",
    "renameat2",
    "save_safetensors",
    "source_folders",
    "write_json",
]
