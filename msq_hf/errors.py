"""Exceptions raised when writing or reading MSQ exports.

Every message names the file, layer or field at fault and, where it applies, the allowed values.
The classes subclass the built-in exception a caller would naturally catch (``ValueError`` for a
malformed export, ``FileNotFoundError`` for a missing file), so generic handlers keep working.
"""

from __future__ import annotations


class MSQError(Exception):
    """Base class of every msq_hf export/load error."""


class MSQFormatError(MSQError, ValueError):
    """An export is malformed or inconsistent (bad JSON, unknown format version, bits outside 1..8,
    bit scheme disagreeing with the stored tensors, unknown layer names, ...)."""


class MSQIntegrityError(MSQFormatError):
    """A weight file does not match the manifest (size or sha256), i.e. it is truncated or corrupt."""


class MSQMissingFileError(MSQIntegrityError, FileNotFoundError):
    """A file the export needs (config.json, msq_manifest.json, a weight file) is absent."""


class MSQExportError(MSQError, RuntimeError):
    """``msq_hf.export`` refused or failed (target directory not empty, model not quantized, ...)."""


class MSQTrainingError(MSQError, RuntimeError):
    """Training cannot go on: the loss or the quantized weights became NaN/inf (the message names the step)."""


__all__ = [
    "MSQError",
    "MSQExportError",
    "MSQFormatError",
    "MSQIntegrityError",
    "MSQMissingFileError",
    "MSQTrainingError",
]
