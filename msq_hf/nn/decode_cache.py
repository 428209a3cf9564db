"""The decode cache of packed layers: decoded float weights kept for reuse, all of them or an LRU by bytes.

A loaded export decodes each layer's weight on every ``forward`` (:mod:`msq_hf.nn.packed`). Users who trade
memory for speed give the model's packed layers one shared :class:`DecodeCache`
(``msq_hf.from_pretrained(..., decode_cache=...)`` or :func:`msq_hf.nn.packed.set_decode_cache`).
"""

from __future__ import annotations

from typing import Literal

import torch

CacheOption = Literal["all"] | int | None


class DecodeCache:
    """Decoded weights of packed layers, within ``max_bytes`` (``None``: every layer).

    One cache serves all the packed layers of a model. A bounded cache keeps the first weights that fit and
    then admits nothing more (until :meth:`clear`). It deliberately does *not* evict the least recently used
    entry: a forward pass visits the layers in the same cyclic order every time, so an LRU smaller than the
    model evicts each weight just before its next use and never hits; keeping a fixed subset gives
    ``budget / model`` of the decodes back on every pass. ``hits``/``misses`` count lookups.
    """

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"decode_cache must be None, 'all' or a number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.entries: dict[int, torch.Tensor] = {}
        self.nbytes = self.hits = self.misses = 0

    def get(self, key: int) -> torch.Tensor | None:
        """The cached weight of layer ``key``, or ``None``."""
        w = self.entries.get(key)
        if w is None:
            self.misses += 1
        else:
            self.hits += 1
        return w

    def put(self, key: int, weight: torch.Tensor) -> bool:
        """Keep ``weight`` for layer ``key`` if it fits in the budget; returns whether it was kept."""
        self.discard(key)
        size = weight.numel() * weight.element_size()
        if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
            return False
        self.entries[key] = weight
        self.nbytes += size
        return True

    def discard(self, key: int) -> None:
        """Forget layer ``key``'s weight (its packed buffers changed)."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        """Forget every weight."""
        self.entries.clear()
        self.nbytes = 0


def make_decode_cache(option: CacheOption) -> DecodeCache | None:
    """``None`` (decode on every forward), ``"all"`` (decode each layer once) or a byte budget (keep what fits)."""
    if option is None:
        return None
    if option == "all":
        return DecodeCache(None)
    if isinstance(option, bool) or not isinstance(option, int) or option < 0:
        raise ValueError(f"decode_cache must be None, 'all' or a number of bytes >= 0, got {option!r}")
    return DecodeCache(option)


__all__ = ["CacheOption", "DecodeCache", "make_decode_cache"]
