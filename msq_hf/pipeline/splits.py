"""The training and evaluation splits of a run, and their class names."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from msq_hf.data import builtin_source, load_image_dataset
from msq_hf.pipeline.arguments import DataArguments

EVAL_SPLITS = ("test", "validation", "valid", "val")
"""Tried in this order when ``--eval_split`` is unset."""


@dataclass
class DataSplits:
    """What :func:`load_splits` returns: the datasets (``pixel_values``/``labels``) and what they are."""

    train: Any
    eval: Any | None
    eval_split: str | None
    class_names: list[str]


def class_names(dataset: Any) -> list[str]:
    """Class names from the ``labels`` ClassLabel feature; ``ValueError`` when there is none."""
    feature = getattr(dataset, "features", {}).get("labels")
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(
            "the dataset's 'labels' column is not a ClassLabel (features: "
            f"{getattr(dataset, 'features', None)}): the number of classes is unknown"
        )
    return list(names)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars while loading (restored afterwards: callers may be notebooks)."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_split(
    data_args: DataArguments,
    split: str,
    limit: int | None,
    *,
    image_size: int,
    channels: int,
    seed: int,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Any:
    """One split of ``--dataset`` with ``pixel_values``/``labels`` (errors name ``--dataset`` and the split).

    ``normalization`` (mean, std) applies to Hub and image-folder data; the built-in sources keep their own.
    A missing Fashion-MNIST keeps its ``FileNotFoundError`` and the lines that say how to get it.
    """
    name = data_args.dataset_name
    if not name:
        raise ValueError("--dataset is empty: pass 'fashion_mnist', 'digits', a Hub dataset id or an image folder")
    mean, std = normalization if normalization and builtin_source(name) is None else (None, None)
    try:
        with _quiet_datasets():
            return load_image_dataset(
                name, split, image_size=image_size, channels=channels, limit=limit, seed=seed, mean=mean, std=std
            )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--dataset {name}: {exc}") from exc
    except Exception as exc:  # datasets raises many types (offline, unknown id, bad folder, missing split)
        raise ValueError(
            f"--dataset {name}: cannot load it (split {split!r}; {type(exc).__name__}: {_first_line(exc)})"
        ) from exc


def _is_missing_split(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc
    return isinstance(cause, ValueError) and "split" in str(cause).lower()


def load_eval_split(data_args: DataArguments, **kwargs: Any) -> tuple[Any | None, str | None]:
    """The evaluation split and its name: ``--eval_split``, or the first of :data:`EVAL_SPLITS` that exists.

    ``--eval_split ''`` means no evaluation: ``(None, None)``. ``kwargs`` are those of :func:`load_split`.
    """
    if data_args.eval_split is not None:
        if not data_args.eval_split:
            return None, None
        return load_split(data_args, data_args.eval_split, data_args.max_eval_samples, **kwargs), data_args.eval_split
    for split in EVAL_SPLITS:
        try:
            return load_split(data_args, split, data_args.max_eval_samples, **kwargs), split
        except ValueError as exc:
            if not _is_missing_split(exc):
                raise
    raise ValueError(
        f"--dataset {data_args.dataset_name}: no evaluation split found (tried {list(EVAL_SPLITS)}); "
        "name one with --eval_split"
    )


__all__ = ["EVAL_SPLITS", "DataSplits", "class_names", "load_eval_split", "load_split"]
