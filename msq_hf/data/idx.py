"""IDX files (the MNIST / Fashion-MNIST container): a strict parser, no pickle."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# IDX type codes (third magic byte) → big-endian numpy dtype.
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
IDX_MAX_DIMS = 8


def _read_exact(stream: Any, n: int, path: Path, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise ValueError(f"IDX file {path}: truncated while reading the {what} (expected {n} bytes, got {len(data)})")
    return data


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (raw or gzip-compressed) into a native-endian numpy array.

    The header is validated strictly: two zero bytes, a known type code
    (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), 1 to 8
    dimensions, and a payload whose size matches the dimensions exactly. Any violation (or a
    corrupt gzip stream) raises ``ValueError`` naming the file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        is_gzip = fh.read(2) == b"\x1f\x8b"  # detect by content, not by file name
    opener: Callable[..., Any] = gzip.open if is_gzip else open
    try:
        with opener(path, "rb") as stream:
            magic = _read_exact(stream, 4, path, "magic number")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
                raise ValueError(
                    f"IDX file {path}: bad magic number 0x{magic.hex()} (expected 0x0000TTNN with type "
                    f"TT in {{{', '.join(f'{k:02x}' for k in IDX_DTYPES)}}} and NN dimensions)"
                )
            ndim = magic[3]
            if not 1 <= ndim <= IDX_MAX_DIMS:
                raise ValueError(f"IDX file {path}: {ndim} dimensions in the header (allowed 1..{IDX_MAX_DIMS})")
            dims = tuple(
                int(d) for d in np.frombuffer(_read_exact(stream, 4 * ndim, path, "dimension sizes"), dtype=">u4")
            )
            dtype = np.dtype(IDX_DTYPES[magic[2]])
            expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            # Read one byte more than needed: detects trailing garbage without loading a bomb.
            payload = stream.read(expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"IDX file {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if len(payload) < expected:
        raise ValueError(f"IDX file {path}: truncated payload: dims {dims} need {expected} bytes, found {len(payload)}")
    if len(payload) > expected:
        raise ValueError(f"IDX file {path}: trailing data after the {expected}-byte payload of dims {dims}")
    array = np.frombuffer(bytearray(payload), dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


__all__ = ["IDX_DTYPES", "IDX_MAX_DIMS", "read_idx"]
