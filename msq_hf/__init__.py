"""msq_hf: MSQ (memory-efficient bit sparsification quantization) for Hugging Face models.

Importing this package registers ``quant_method="msq"`` with transformers, so
``AutoModel*.from_pretrained`` can rebuild MSQ checkpoints and exports.
"""

from __future__ import annotations

from .config import MSQConfig, register as _register
from .convert import (
    bit_scheme,
    compression_ratio,
    dequantize_model,
    layer_numels,
    quantize_model,
    set_bit_scheme,
)
from .controller import MSQController
from .errors import MSQError, MSQExportError, MSQFormatError, MSQIntegrityError, MSQMissingFileError
from .inspect import InspectReport, format_report, inspect_export
from .layers import MSQConv2d, MSQLinear
from .loading import from_pretrained
from .packed_layers import MSQPackedConv2d, MSQPackedLinear
from .quantizer import MSQQuantizer
from .schedule import BitPruningSchedule, PruneDecision
from .sensitivity import estimate_sensitivities, hutchinson_trace
from .serialization import ExportResult, export
from .trainer import MSQCallback, MSQTrainer, load_timm_checkpoint
from . import models  # noqa: F401  (registers resnet20/32/56_cifar with timm)

__version__ = "0.1.0"

_register()

__all__ = [
    "BitPruningSchedule",
    "ExportResult",
    "InspectReport",
    "MSQCallback",
    "MSQConfig",
    "MSQController",
    "MSQConv2d",
    "MSQError",
    "MSQExportError",
    "MSQFormatError",
    "MSQIntegrityError",
    "MSQLinear",
    "MSQMissingFileError",
    "MSQPackedConv2d",
    "MSQPackedLinear",
    "MSQQuantizer",
    "MSQTrainer",
    "PruneDecision",
    "__version__",
    "bit_scheme",
    "compression_ratio",
    "dequantize_model",
    "estimate_sensitivities",
    "export",
    "format_report",
    "from_pretrained",
    "hutchinson_trace",
    "inspect_export",
    "layer_numels",
    "load_timm_checkpoint",
    "quantize_model",
    "set_bit_scheme",
]
