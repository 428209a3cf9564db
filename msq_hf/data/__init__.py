"""Image-classification data for msq_hf examples, tests and benchmarks, usable offline.

Every loader returns a :class:`datasets.Dataset` with two columns that the MSQ trainer and any
``Trainer`` with ``remove_unused_columns=False`` understand:

* ``pixel_values``: ``float32`` tensor of shape ``(channels, image_size, image_size)``, normalized;
* ``labels``: ``int64`` class index (feature type :class:`datasets.ClassLabel` carrying the names).

Sources (one module each):

* ``"fashion_mnist"`` (:mod:`~msq_hf.data.fashion_mnist`): the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or ``$MSQ_FASHION_MNIST_DIR``; the Hub
  copy ``zalando-datasets/fashion_mnist`` is only tried when those are missing.
* ``"digits"`` (:mod:`~msq_hf.data.digits`): scikit-learn's bundled 8x8 digits (1,797 images).
* a local directory (``imagefolder`` layout ``root/[split/]class/*.png``) or a Hub dataset id
  (:mod:`~msq_hf.data.images`, whose :func:`load_image_dataset` dispatches to all of them).

No pickle is used anywhere: IDX files are parsed with :func:`read_idx` (:mod:`~msq_hf.data.idx`).
"""

from __future__ import annotations

from msq_hf.data.collate import collate_pixel_values
from msq_hf.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits_dataset
from msq_hf.data.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIRS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    FASHION_MNIST_HUB_ID,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    find_fashion_mnist,
    load_fashion_mnist,
)
from msq_hf.data.idx import read_idx
from msq_hf.data.images import IMAGENET_MEAN, IMAGENET_STD, builtin_source, load_image_dataset

__all__ = [
    "DEBIAN_FASHION_MNIST_DIRS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_HUB_ID",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "builtin_source",
    "collate_pixel_values",
    "find_fashion_mnist",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_image_dataset",
    "read_idx",
]
