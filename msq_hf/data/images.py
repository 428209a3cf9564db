"""``load_image_dataset``: one entry point for the built-in sources, local image folders and Hub datasets."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from msq_hf.data.arrays import check_shape_args
from msq_hf.data.digits import load_digits_dataset
from msq_hf.data.fashion_mnist import load_fashion_mnist

# Used for imagefolder / Hub datasets when the caller gives no statistics (timm's defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGE_COLUMNS = ("image", "img")
_LABEL_COLUMNS = ("label", "labels")


def builtin_source(name: str | os.PathLike[str]) -> str | None:
    """``"fashion_mnist"`` or ``"digits"`` when msq_hf reads ``name`` itself (own normalization), else None."""
    key = str(name).lower().replace("-", "_")
    return key if key in ("fashion_mnist", "digits") else None


def _detect_column(ds: Any, candidates: Sequence[str], feature_type: type, role: str, source: str) -> str:
    columns = list(ds.column_names)
    for name in candidates:
        if name in columns:
            return name
    typed = [c for c in columns if isinstance(ds.features.get(c), feature_type)]
    if len(typed) == 1:
        return typed[0]
    raise ValueError(
        f"dataset {source!r}: cannot find the {role} column; looked for {list(candidates)} "
        f"or a single {feature_type.__name__} feature, available columns: {columns}"
    )


def _class_folders(path: Path, split: str) -> tuple[Path, list[str]]:
    """The folder holding the class sub-folders of ``split`` (``root/split`` or ``root``) and their names."""
    root = path / split if (path / split).is_dir() else path
    return root, sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_label_column(ds: Any, path: Path, split: str) -> None:
    """``ValueError`` when an image folder has fewer than two classes (``imagefolder`` then adds no labels)."""
    if "label" in ds.column_names:
        return
    root, classes = _class_folders(path, split)
    found = f"only one class sub-folder ({classes[0]!r})" if classes else "no class sub-folders"
    raise ValueError(
        f"image folder {root} has {found}: classification needs at least two classes, one sub-folder "
        f"each ({root}/<class>/*.png)"
    )


def check_images(ds: Any, image_col: str, source: str) -> None:
    """``ValueError`` naming the images PIL cannot read, found before training rather than during it.

    ``PIL.Image.verify`` parses each file without decoding all pixels (for PNG it checks every chunk's CRC).
    """
    from datasets import Image as ImageFeature
    from PIL import Image

    bad = []
    files = ds.select_columns([image_col]).cast_column(image_col, ImageFeature(decode=False))
    for rows in files.iter(batch_size=256):
        for row in rows[image_col]:
            where = row.get("path") or "<embedded bytes>"
            try:
                with Image.open(row["path"] if row.get("bytes") is None else io.BytesIO(row["bytes"])) as img:
                    img.verify()
            except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
                bad.append(f"{where} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"dataset {source!r}: {len(bad)} of {len(ds)} images cannot be read: {shown}")


def _build_image_transform(image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    from torchvision import transforms

    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values (one per channel), got {list(mean)} / {list(std)}")
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )


def hf_image_dataset(
    ds: Any,
    source: str,
    image_size: int,
    channels: int,
    limit: int | None,
    seed: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    verify_images: bool = False,
) -> Any:
    """Attach an on-the-fly transform producing ``pixel_values``/``labels`` to an image dataset.

    The image (``image``/``img``, else the only ``Image`` feature) and label (``label``/``labels``, else
    the only ``ClassLabel``) columns are detected; ``ValueError`` lists the columns when one is missing.
    ``verify_images``: open every (selected) image now (:func:`check_images`), not when training reaches it.
    """
    from datasets import ClassLabel, Image

    image_col = _detect_column(ds, _IMAGE_COLUMNS, Image, "image", source)
    label_col = _detect_column(ds, _LABEL_COLUMNS, ClassLabel, "label", source)
    ds = ds.select_columns([image_col, label_col])
    if label_col != "labels":
        ds = ds.rename_column(label_col, "labels")
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        ds = ds.shuffle(seed=seed).select(range(min(limit, len(ds))))
    if verify_images:
        check_images(ds, "image", source)
    if mean is None or std is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    transform = _build_image_transform(image_size, channels, mean, std)
    mode = "RGB" if channels == 3 else "L"

    def to_pixels(batch: Mapping[str, list[Any]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([transform(img.convert(mode)) for img in batch["image"]])
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch["labels"], dtype=torch.long)}

    return ds.with_transform(to_pixels)


def load_image_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    limit: int | None = None,
    *,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Any:
    """Load an image-classification dataset with ``pixel_values``/``labels`` columns.

    ``name_or_path``:

    * ``"fashion_mnist"`` (also ``"fashion-mnist"``) → :func:`load_fashion_mnist`;
    * ``"digits"`` → :func:`load_digits_dataset`;
    * an existing local directory → ``datasets.load_dataset("imagefolder", data_dir=...)``
      (``root/<split>/<class>/*.png``, or ``root/<class>/*.png`` which becomes ``"train"``); it needs at
      least two classes, and every image of the split (after ``limit``) is checked to open;
    * anything else → ``datasets.load_dataset(name, split=split)`` (a Hub dataset id).

    For imagefolder/Hub data the image (``image``/``img``) and label (``label``/``labels``) columns
    are auto-detected and converted on the fly (resize, to tensor, normalize with ``mean``/``std``,
    default ImageNet statistics for RGB and 0.5/0.5 for grayscale).
    """
    check_shape_args(image_size, channels)
    key = str(name_or_path)
    builtin = builtin_source(key)
    if builtin == "fashion_mnist":
        return load_fashion_mnist(split, limit=limit, image_size=image_size, channels=channels, seed=seed)
    if builtin == "digits":
        return load_digits_dataset(split, image_size=image_size, channels=channels, seed=seed, limit=limit)

    import datasets

    path = Path(key).expanduser()
    if path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        if split not in loaded:
            raise ValueError(
                f"imagefolder {path}: split={split!r} is not available; "
                f"found splits {list(loaded.keys())} (sub-directories named train/test/validation)"
            )
        ds = loaded[split]
        check_label_column(ds, path, split)
    else:
        try:
            ds = datasets.load_dataset(key, split=split)
        except Exception as exc:
            # keep the original type (callers may catch ConnectionError etc.), just say what was tried
            exc.add_note(
                f"load_image_dataset({key!r}, split={split!r}): not a local directory, "
                "'fashion_mnist' or 'digits', so it was loaded as a Hub dataset id"
            )
            raise
    return hf_image_dataset(ds, key, image_size, channels, limit, seed, mean, std, verify_images=path.is_dir())


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "builtin_source",
    "check_images",
    "check_label_column",
    "hf_image_dataset",
    "load_image_dataset",
]
