"""In-memory image arrays → the ``pixel_values``/``labels`` dataset every msq_hf loader returns.

Shared by the Fashion-MNIST and digits loaders: argument checks, the class-stratified subset, the
pad/resize + normalization of grayscale images and the fast ``Array3D`` dataset construction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> None:
    """``ValueError`` listing the allowed values when ``split`` is not one of them."""
    if split not in allowed:
        raise ValueError(f"split={split!r} is not available; allowed values: {list(allowed)}")


def check_shape_args(image_size: int, channels: int) -> None:
    """``ValueError`` unless ``image_size`` is a positive int and ``channels`` is 1 or 3."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Class-stratified subset of ``limit`` indices (class counts differ by at most one).

    Each sample gets a random rank inside its class; taking the lowest ranks first is a
    round-robin over classes in random order. Returned indices are sorted (original order).
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    rng = np.random.default_rng(seed)
    rank = np.empty(n, dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rank[members] = rng.permutation(len(members))
    tie_break = rng.permutation(n)  # random class order inside one round
    order = np.lexsort((tie_break, rank))
    return np.sort(order[:limit])


def resolve_fit(height: int, width: int, image_size: int, fit: str = "auto") -> str:
    """``"pad"`` or ``"resize"``: ``"auto"`` pads square images at most 4 pixels smaller than ``image_size``."""
    if fit == "auto":
        return "pad" if 0 <= image_size - max(height, width) <= 4 and height == width else "resize"
    return fit


def to_pixel_values(
    images: np.ndarray, image_size: int, channels: int, mean: float, std: float, scale: float, fit: str
) -> np.ndarray:
    """``(N, H, W)`` grayscale → ``(N, channels, image_size, image_size)`` float32, normalized.

    ``fit="pad"`` centers the image on a zero background (28→32 for CIFAR-style models),
    ``"resize"`` uses bilinear (antialiased) interpolation, ``"auto"`` pads when the target is at
    most 4 pixels larger and resizes otherwise.
    """
    n, height, width = images.shape
    x = images.astype(np.float32) / scale
    fit = resolve_fit(height, width, image_size, fit)
    if fit == "pad":
        if image_size < height or image_size < width:
            raise ValueError(f"fit='pad' cannot shrink {height}x{width} images to {image_size}; use fit='resize'")
        top, left = (image_size - height) // 2, (image_size - width) // 2
        out = np.zeros((n, image_size, image_size), dtype=np.float32)
        out[:, top : top + height, left : left + width] = x
        x = out
    elif fit == "resize":
        if (height, width) != (image_size, image_size):
            t = torch.from_numpy(x).unsqueeze(1)
            x = (
                torch.nn.functional.interpolate(
                    t, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
                )
                .squeeze(1)
                .numpy()
            )
    else:
        raise ValueError(f"fit={fit!r} is not supported; allowed values: ['auto', 'pad', 'resize']")
    x = (x - mean) / std
    return np.ascontiguousarray(np.broadcast_to(x[:, None], (n, channels, image_size, image_size)), dtype=np.float32)


def _nested_list_storage(x: np.ndarray) -> Any:
    """Arrow storage of ``Array3D`` (list<list<list<float>>>) built from one contiguous buffer.

    Building the offsets with numpy is ~6x faster than ``Dataset.from_dict`` (2.6 s instead of
    16 s for the 60,000 x 3 x 32 x 32 training set) and avoids a per-row Python conversion.
    """
    import pyarrow as pa

    storage = pa.array(np.ascontiguousarray(x).reshape(-1))
    for dim in reversed(x.shape[1:]):
        rows = len(storage) // dim
        storage = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * dim + 1, dim, dtype=np.int32)), storage)
    return storage


def array_dataset(pixel_values: np.ndarray, labels: np.ndarray, class_names: Sequence[str], info: str) -> Any:
    """Fixed-shape (``Array3D``) torch-formatted dataset from numpy arrays."""
    from datasets import Array3D, ClassLabel, Dataset, DatasetInfo, Features

    shape = tuple(int(d) for d in pixel_values.shape[1:])
    features = Features(
        {
            "pixel_values": Array3D(shape=shape, dtype="float32"),
            "labels": ClassLabel(names=list(class_names)),
        }
    )
    labels = labels.astype(np.int64)
    try:
        import pyarrow as pa
        from datasets.features.features import Array3DExtensionType

        column = pa.ExtensionArray.from_storage(
            Array3DExtensionType(shape, "float32"), _nested_list_storage(pixel_values.astype(np.float32, copy=False))
        )
        table = pa.table({"pixel_values": column, "labels": pa.array(labels, type=pa.int64())})
        ds = Dataset(table, info=DatasetInfo(description=info, features=features))
    except (ImportError, AttributeError, TypeError) as exc:  # datasets internals moved: take the public path
        logger.debug("fast Array3D construction unavailable (%s); using Dataset.from_dict", exc)
        ds = Dataset.from_dict(
            {"pixel_values": pixel_values, "labels": labels}, info=DatasetInfo(description=info, features=features)
        )
    return ds.with_format("torch")


__all__ = [
    "SPLITS",
    "array_dataset",
    "check_shape_args",
    "check_split",
    "resolve_fit",
    "stratified_subset",
    "to_pixel_values",
]
