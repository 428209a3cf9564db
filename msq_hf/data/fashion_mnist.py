"""Fashion-MNIST from the Debian package's IDX files (``dataset-fashion-mnist``), offline.

Looked up in ``$MSQ_FASHION_MNIST_DIR``, then ``/usr/share/datasets/fashion-mnist`` and
``/usr/local/share/datasets/fashion-mnist``; the Hub copy ``zalando-datasets/fashion_mnist`` is only
tried when none of them holds the four files.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from msq_hf.data.arrays import array_dataset, check_shape_args, check_split, stratified_subset, to_pixel_values
from msq_hf.data.idx import read_idx

logger = logging.getLogger(__name__)

FASHION_MNIST_ENV = "MSQ_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Pixel statistics of the 60,000 training images at 28x28 in [0, 1] (measured from the Debian
# files: mean 0.286041, std 0.353024). Padding adds background zeros, which is what the
# digit/garment background already is, so the same constants are used for the padded 32x32 input.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _idx_file(directory: Path, prefix: str, kind: str) -> Path | None:
    """``train-images-idx3-ubyte[.gz]`` (also the ``train-images.idx3-ubyte`` spelling)."""
    ndim = 3 if kind == "images" else 1
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in (".gz", ""):
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _missing_fashion_files(directory: Path) -> list[str]:
    return [
        f"{prefix}-{kind}"
        for prefix in _SPLIT_PREFIX.values()
        for kind in ("images", "labels")
        if _idx_file(directory, prefix, kind) is None
    ]


def find_fashion_mnist(search_dirs: Iterable[str | os.PathLike[str]] | None = None) -> Path | None:
    """Return the directory holding the four Fashion-MNIST IDX files, or ``None``.

    ``$MSQ_FASHION_MNIST_DIR`` is checked first (a warning names the missing files if it is set
    but incomplete), then ``search_dirs`` (default: the Debian package location
    ``/usr/share/datasets/fashion-mnist`` and ``/usr/local/share/datasets/fashion-mnist``).
    """
    candidates: list[Path] = []
    env_dir = os.environ.get(FASHION_MNIST_ENV)
    if env_dir:
        candidates.append(Path(env_dir).expanduser())
    candidates.extend(
        Path(d).expanduser() for d in (search_dirs if search_dirs is not None else DEBIAN_FASHION_MNIST_DIRS)
    )
    for directory in candidates:
        if not directory.is_dir():
            if env_dir and directory == Path(env_dir).expanduser():
                warnings.warn(f"{FASHION_MNIST_ENV}={env_dir} is not a directory; ignoring it", stacklevel=2)
            continue
        missing = _missing_fashion_files(directory)
        if not missing:
            return directory
        if env_dir and directory == Path(env_dir).expanduser():
            warnings.warn(
                f"{FASHION_MNIST_ENV}={env_dir} lacks {missing} (IDX, optionally .gz); ignoring it", stacklevel=2
            )
    return None


def _load_fashion_arrays(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _SPLIT_PREFIX[split]
    images_path = _idx_file(directory, prefix, "images")
    labels_path = _idx_file(directory, prefix, "labels")
    assert images_path is not None and labels_path is not None  # guaranteed by find_fashion_mnist
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"IDX file {images_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"IDX file {labels_path}: expected {len(images)} labels (one per image in "
            f"{images_path.name}), got shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"IDX file {labels_path}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels.astype(np.int64)


def _load_fashion_hub(split: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    hub = datasets.load_dataset(FASHION_MNIST_HUB_ID, split=split)
    images = np.stack([np.asarray(img.convert("L"), dtype=np.uint8) for img in hub["image"]])
    return images, np.asarray(hub["label"], dtype=np.int64)


def _fashion_missing_message(errors: list[str]) -> str:
    return (
        "Fashion-MNIST not found. Get it in one of these ways:\n"
        "  1. Debian/Ubuntu (as root): apt-get update && apt-get install -y dataset-fashion-mnist "
        "(or: bash scripts/setup_data.sh) -> /usr/share/datasets/fashion-mnist\n"
        f"  2. point {FASHION_MNIST_ENV} at a directory holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzip optional)\n"
        f"  3. with network access: the Hugging Face Hub dataset '{FASHION_MNIST_HUB_ID}' is used "
        "automatically (unset HF_HUB_OFFLINE)\n" + ("Attempts: " + "; ".join(errors) if errors else "")
    )


def load_fashion_mnist(
    split: str = "train",
    limit: int | None = None,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
    *,
    fit: str = "auto",
    search_dirs: Iterable[str | os.PathLike[str]] | None = None,
    allow_hub: bool = True,
) -> Any:
    """Fashion-MNIST as a torch-formatted :class:`datasets.Dataset` (``pixel_values``, ``labels``).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        limit: keep a class-stratified random subset of this many images (``seed`` picks it).
        image_size: output side; 32 pads 28→32 (CIFAR-style input), other sizes resize (see ``fit``).
        channels: 1, or 3 (grayscale replicated, for RGB models).
        seed: subset selection seed.
        fit: ``"auto"`` (pad when the target is ≤4 px larger, else resize), ``"pad"`` or ``"resize"``.
        search_dirs: directories to search after ``$MSQ_FASHION_MNIST_DIR`` (default: Debian path).
        allow_hub: try ``zalando-datasets/fashion_mnist`` on the Hub when no local files exist.

    Raises:
        FileNotFoundError: no local files and the Hub is unavailable; the message says how to get
            the data.
    """
    check_split(split)
    check_shape_args(image_size, channels)
    search_dirs = list(search_dirs) if search_dirs is not None else None  # iterated twice below
    errors: list[str] = []
    directory = find_fashion_mnist(search_dirs)
    if directory is not None:
        images, labels = _load_fashion_arrays(directory, split)
        source = str(directory)
    else:
        errors.append(
            f"no IDX files in ${FASHION_MNIST_ENV} or "
            f"{[str(d) for d in (search_dirs if search_dirs is not None else DEBIAN_FASHION_MNIST_DIRS)]}"
        )
        if not allow_hub:
            raise FileNotFoundError(_fashion_missing_message(errors))
        try:
            images, labels = _load_fashion_hub(split)
            source = f"hf://datasets/{FASHION_MNIST_HUB_ID}"
        except Exception as exc:  # offline, no network, missing dataset: all mean "not available"
            errors.append(f"Hub '{FASHION_MNIST_HUB_ID}': {type(exc).__name__}: {str(exc)[:200]}")
            raise FileNotFoundError(_fashion_missing_message(errors)) from exc
    keep = stratified_subset(labels, limit, seed)
    pixel_values = to_pixel_values(
        images[keep], image_size, channels, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 255.0, fit
    )
    logger.info("Fashion-MNIST %s: %d images from %s", split, len(keep), source)
    return array_dataset(pixel_values, labels[keep], FASHION_MNIST_CLASSES, f"Fashion-MNIST {split} from {source}")


__all__ = [
    "DEBIAN_FASHION_MNIST_DIRS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_HUB_ID",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "find_fashion_mnist",
    "load_fashion_mnist",
]
