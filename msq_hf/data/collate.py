"""Batching rows of ``pixel_values``/``labels``: ``transformers.DefaultDataCollator`` with a key check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DefaultDataCollator

_COLUMNS = ("pixel_values", "labels")
_collator = DefaultDataCollator(return_tensors="pt")


def collate_pixel_values(batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a list of rows into ``{"pixel_values": (B, C, H, W) float, "labels": (B,) long}``.

    The stacking is ``transformers.DefaultDataCollator``'s; this adds the checks a bare collator does not
    make (an empty batch, a row without ``pixel_values`` or ``labels``) and drops other keys. Usable as
    ``Trainer(data_collator=collate_pixel_values)`` and as a ``DataLoader`` ``collate_fn``.
    """
    if not batch:
        raise ValueError("collate_pixel_values got an empty batch")
    for key in _COLUMNS:
        if key not in batch[0]:
            raise KeyError(f"collate_pixel_values: rows need a {key!r} key, got keys {sorted(batch[0])}")
    return _collator([{key: row[key] for key in _COLUMNS} for row in batch])


__all__ = ["collate_pixel_values"]
