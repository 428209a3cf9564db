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
from .layers import MSQConv2d, MSQLinear
from .quantizer import MSQQuantizer
from . import models  # noqa: F401  (registers resnet20/32/56_cifar with timm)

__version__ = "0.1.0"

_register()

__all__ = [
    "MSQConfig",
    "MSQConv2d",
    "MSQLinear",
    "MSQQuantizer",
    "__version__",
    "bit_scheme",
    "compression_ratio",
    "dequantize_model",
    "layer_numels",
    "quantize_model",
    "set_bit_scheme",
]
