"""``msq_history.json``: the one record of a training run (written by the pipeline, read by the report).

:class:`RunHistory` is the schema (version :data:`HISTORY_VERSION`), :func:`write_history` the only writer
and :func:`find_run_data` the reader. The reader also takes what other folders hold: ``msq_state.json``
written by ``MSQTrainer`` into ``save_model`` output and every ``checkpoint-*`` folder (the controller state,
whose ``history`` is the pruning timeline) with ``trainer_state.json`` next to it (the Trainer log history),
and ``msq_manifest.json`` of an export (final bits and layer sizes only: no timeline). Older history files
(version 1 of ``msq-hf train``, the unversioned files of the first recipes) read the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

HISTORY_NAME = "msq_history.json"
"""File written into the output directory of every run (``msq-hf train`` and the recipes)."""
HISTORY_VERSION = 2
"""Version 2: one schema for the CLI and the recipes (``run``, ``args`` per argument group, ``paths``)."""

STATE_NAME = "msq_state.json"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "msq_manifest.json"


@dataclass
class RunHistory:
    """The content of ``msq_history.json``.

    Attributes:
        run: what produced it: ``"msq-hf train"`` or the recipe name.
        summary: final results (``test_accuracy`` as a fraction, ``compression``, ``average_bits``, sizes,
            steps, times; see :func:`msq_hf.pipeline.run.summarize`).
        history: the controller history, one entry per pruning step (bits, k, LSB nonzero rates,
            sensitivities, compression, phase).
        log_history: the Trainer log history (every ``msq/*`` metric and the evaluations).
        bit_scheme, numels: final bits and weight count of each quantized layer.
        target_compression, count_sign_bit, total_steps: the run's target, accounting and length.
        msq_config: ``MSQConfig.to_dict()`` of the run.
        args: the parsed arguments, one dict per argument group (``model``, ``data``, ``msq``, ``run``,
            ``training``, plus the front end's own).
        argv: the command line, when there was one.
        baselines: ``[label, paper ratio, accuracy %]`` reference points drawn next to the run, optionally with
            the method family as a fourth element (else :func:`msq_hf.report.accounting.family_of_label` decides
            how the point's weights are stored).
        paths: where the run wrote ``model``, ``export`` and ``report`` (``None`` when not written).
    """

    run: str
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    log_history: list[dict[str, Any]]
    bit_scheme: dict[str, int]
    numels: dict[str, int]
    target_compression: float
    count_sign_bit: bool
    total_steps: int | None
    msq_config: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)
    argv: list[str] | None = None
    baselines: list[list[Any]] = field(default_factory=list)
    paths: dict[str, str | None] = field(default_factory=dict)
    msq_hf_version: str = ""
    version: int = HISTORY_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to the file (``version`` first)."""
        data = dataclasses.asdict(self)
        return {"version": data.pop("version"), **data}


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)  # paths, enums, dtypes


def write_history(directory: str | os.PathLike[str], record: RunHistory) -> Path:
    """Write ``record`` to ``<directory>/msq_history.json``; return the path."""
    path = Path(directory) / HISTORY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_dict(), indent=1, default=_json_default), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# reading


@dataclass
class RunData:
    """What :func:`find_run_data` collected from a folder (any field may be empty)."""

    source: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    scheme: dict[str, int] = field(default_factory=dict)
    numels: dict[str, int] = field(default_factory=dict)
    target: float | None = None
    count_sign_bit: bool = False
    total_steps: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    baselines: list[tuple[Any, ...]] = field(default_factory=list)  # (label, paper ratio, accuracy[, family])
    wnorm: str = "signmag"  # the run's weight quantizer: decides the stored bits per weight
    files: list[str] = field(default_factory=list)  # which files were read


def layer_order(history: Sequence[Mapping[str, Any]], scheme: Mapping[str, int] | None = None) -> list[str]:
    """Layer names in model order: the scheme's, then any the history adds."""
    names: list[str] = list(scheme) if scheme else []
    for entry in history:
        for name in entry.get("bits") or {}:
            if name not in names:
                names.append(name)
    return names


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc


def _numels_from_state(state: Mapping[str, Any]) -> dict[str, int]:
    schedule = state.get("schedule")
    if isinstance(schedule, Mapping):
        for key in ("numels", "numel"):
            if isinstance(schedule.get(key), Mapping):
                return {k: int(v) for k, v in schedule[key].items()}
    return {}


def _numels_from_weights(folder: Path, names: Iterable[str]) -> dict[str, int]:
    """Weight counts of ``names`` from the safetensors headers of a checkpoint (no tensor is read).

    ``msq_state.json`` holds no layer sizes, but every ``<layer>.weight`` shape is in the header.
    Layers whose key is not found (e.g. renamed on disk) are left out.
    """
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:  # memory-mapped: only the header is parsed
                shapes.update({key: handle.get_slice(key).get_shape() for key in handle.keys()})  # noqa: SIM118 (no __iter__)
        except (SafetensorError, OSError):
            continue  # a broken weight file only costs the per-layer sizes of the report
    return {name: int(math.prod(shapes[f"{name}.weight"])) for name in names if f"{name}.weight" in shapes}


def _read_history_file(data: RunData, path: Path) -> None:
    raw = _read_json(path)
    data.files.append(str(path))
    data.history = list(raw.get("history") or [])
    data.log_history = list(raw.get("log_history") or [])
    data.numels = {k: int(v) for k, v in (raw.get("numels") or {}).items()}
    data.scheme = {k: int(v) for k, v in (raw.get("bit_scheme") or {}).items()}
    data.target = raw.get("target_compression")
    data.count_sign_bit = bool(raw.get("count_sign_bit", False))
    data.total_steps = raw.get("total_steps")
    data.summary = dict(raw.get("summary") or {})
    data.baselines = [tuple(p) for p in raw.get("baselines") or []]
    data.wnorm = str((raw.get("msq_config") or {}).get("wnorm") or data.wnorm)


def _read_checkpoint(data: RunData, folder: Path) -> None:
    state_path = folder / STATE_NAME
    if state_path.is_file() and not data.history:
        state = _read_json(state_path)
        data.files.append(str(state_path))
        data.history = list(state.get("history") or [])
        data.scheme = data.scheme or {k: int(v) for k, v in (state.get("bits") or {}).items()}
        data.numels = data.numels or _numels_from_state(state) or _numels_from_weights(folder, data.scheme)
        data.total_steps = data.total_steps or state.get("total_steps")
    trainer_state = folder / TRAINER_STATE_NAME
    if trainer_state.is_file() and not data.log_history:
        data.files.append(str(trainer_state))
        data.log_history = list(_read_json(trainer_state).get("log_history") or [])
    config_path = folder / "config.json"
    if config_path.is_file() and data.target is None:
        qc = (_read_json(config_path) or {}).get("quantization_config") or {}
        data.target = qc.get("target_compression")
        data.count_sign_bit = bool(qc.get("count_sign_bit", data.count_sign_bit))
        data.wnorm = str(qc.get("wnorm") or data.wnorm)


def find_run_data(path: str | os.PathLike[str]) -> RunData:
    """Collect the history, logs and final bits from a run folder, checkpoint folder or export folder.

    Looks (in this order, merging what it finds) for ``msq_history.json``, ``msq_state.json`` +
    ``trainer_state.json`` in the folder or its newest ``checkpoint-*`` subfolder, ``msq_manifest.json``
    in the folder or an ``export`` subfolder. Raises ``FileNotFoundError`` naming the folder when none
    of them exists.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory (expected an msq-hf train output, a checkpoint or an export folder)"
        )
    data = RunData(source=root)
    if (root / HISTORY_NAME).is_file():
        _read_history_file(data, root / HISTORY_NAME)
    latest = get_last_checkpoint(str(root))
    for folder in (root, Path(latest) if latest else None):
        if folder is not None:
            _read_checkpoint(data, folder)
    for folder in (root, root / "export"):
        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_file():
            manifest = _read_json(manifest_path)
            data.files.append(str(manifest_path))
            layers = manifest.get("layers") or {}
            # the export's scheme is the ground truth of what was stored; the manifest lists layers in
            # state-dict key order (alphabetical), so keep the model order of the history when known
            order = [n for n in (list(data.scheme) or layer_order(data.history)) if n in layers]
            order += [n for n in layers if n not in order]
            data.scheme = {n: int(layers[n]["bits"]) for n in order}
            data.numels = data.numels or {n: int(i["numel"]) for n, i in layers.items()}
            break
    if not data.scheme and data.history:
        data.scheme = {k: int(v) for k, v in (data.history[-1].get("bits") or {}).items()}
    if not data.files:
        raise FileNotFoundError(
            f"{root}: no {HISTORY_NAME}, {STATE_NAME} (also in checkpoint-*/) or "
            f"{MANIFEST_NAME} found; pass an msq-hf train output dir, a checkpoint or an export"
        )
    return data


__all__ = [
    "HISTORY_NAME",
    "HISTORY_VERSION",
    "RunData",
    "RunHistory",
    "find_run_data",
    "layer_order",
    "write_history",
]
