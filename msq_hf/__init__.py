"""msq_hf: MSQ (memory-efficient bit sparsification quantization) for Hugging Face models.

Importing this package registers ``quant_method="msq"`` with transformers, so
``AutoModel*.from_pretrained`` can rebuild MSQ checkpoints and exports.
"""

from __future__ import annotations

from msq_hf import models  # noqa: F401  (registers resnet20/32/56_cifar with timm)
from msq_hf.config import MSQConfig
from msq_hf.convert import bit_scheme, compression_ratio, layer_numels, set_bit_scheme
from msq_hf.errors import MSQError, MSQExportError, MSQFormatError, MSQIntegrityError, MSQMissingFileError
from msq_hf.integrations.transformers import MSQQuantizer
from msq_hf.integrations.transformers import register as _register
from msq_hf.io.export import ExportResult, export
from msq_hf.io.inspect import InspectReport, format_report, inspect_export
from msq_hf.io.load import from_pretrained
from msq_hf.nn.layers import MSQConv2d, MSQLinear
from msq_hf.nn.packed import MSQPackedConv2d, MSQPackedLinear
from msq_hf.quantize import dequantize_model, quantize_model
from msq_hf.training.controller import MSQController
from msq_hf.training.schedule import BitPruningSchedule, PruneDecision
from msq_hf.training.sensitivity import estimate_sensitivities, hutchinson_trace
from msq_hf.training.trainer import MSQCallback, MSQTrainer, load_timm_checkpoint

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
