"""scikit-learn's bundled 8x8 digits: a tiny offline dataset for tests and smoke runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from msq_hf.data.arrays import array_dataset, check_shape_args, check_split, stratified_subset, to_pixel_values

# sklearn digits (values 0..16 scaled to [0, 1]), all 1,797 images at 8x8.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_dataset(
    split: str = "train", image_size: int = 32, channels: int = 3, seed: int = 0, limit: int | None = None
) -> Any:
    """scikit-learn's 8x8 digits upsampled to ``image_size``: same columns/format as Fashion-MNIST.

    Deterministic class-stratified 80/20 split (``seed`` selects it): 1,437 train / 360 test
    images for ``seed=0``. Needs ``scikit-learn`` (data ships inside the wheel; no download).
    """
    check_split(split)
    check_shape_args(image_size, channels)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("load_digits_dataset needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(labels, 0.2, seed)
    idx = train_idx if split == "train" else test_idx
    idx = idx[stratified_subset(labels[idx], limit, seed)]
    pixel_values = to_pixel_values(images[idx], image_size, channels, DIGITS_MEAN, DIGITS_STD, 16.0, "resize")
    return array_dataset(pixel_values, labels[idx], [str(d) for d in range(10)], f"sklearn digits {split}")


__all__ = ["DIGITS_MEAN", "DIGITS_STD", "load_digits_dataset"]
