"""``quantize_model`` / ``dequantize_model``: the small functional façade over the replacement engine.

Works on any ``nn.Module`` tree: HF vision models (ViT, DeiT, Swin, ResNet, MobileNetV2, ConvNext, ...),
``TimmWrapperForImageClassification`` and raw timm models. Layers are matched by exact type
(``nn.Linear``, ``nn.Conv2d`` and timm's ``Linear``/``Conv2dSame``, see :mod:`msq_hf.convert`); other
subclasses are left in float with a warning, because their custom ``forward`` would bypass the
quantized weight. The converted model carries the ``MSQConfig`` and an ``MSQQuantizer``
(:func:`msq_hf.integrations.transformers.attach_quantizer`), so ``Trainer`` and ``save_pretrained`` treat
it as a quantized model (``save_pretrained``/``push_to_hub`` then write the packed export, see
:mod:`msq_hf.io.save`). The caller's objects are never written to: the model gets a private copy of its HF
config before ``quantization_config`` goes into it (a float model built later from the same config object stays
float), and the ``MSQConfig`` is only read.
"""

from __future__ import annotations

import logging

from torch import nn

from msq_hf.config import MSQConfig
from msq_hf.convert import dequantize_model, find_convertible_layers, iter_msq_layers, swap_layers, unconvertible_layers
from msq_hf.integrations.transformers import attach_quantizer

logger = logging.getLogger(__name__)


def quantize_model(model: nn.Module, config: MSQConfig | None = None, **overrides) -> nn.Module:
    """Convert ``model`` in place to MSQ (every Linear/Conv2d weight at ``config.init_bits``) and return it.

    ``overrides`` are ``MSQConfig`` fields (``quantize_model(model, init_bits=4)``). Raises
    ``ValueError`` if the model is already MSQ-quantized, if nothing can be converted, or if a
    ``modules_to_not_convert`` pattern matches no layer.
    """
    if config is None:
        config = MSQConfig(**overrides)
    elif overrides:
        config = config.copy(**overrides)
    if not isinstance(config, MSQConfig):
        raise TypeError(f"config must be an msq_hf.MSQConfig, got {type(config).__name__}")
    existing = [name for name, _ in iter_msq_layers(model)]
    if existing:
        raise ValueError(
            f"{type(model).__name__} is already MSQ-quantized ({len(existing)} MSQ layers, "
            f"e.g. {existing[0]!r}); pass the float model"
        )
    names = find_convertible_layers(model, config.modules_to_not_convert)
    skipped = unconvertible_layers(model)
    if skipped:
        logger.warning(
            "msq_hf: left %d layer(s) of unsupported Linear/Conv2d subclasses in float: %s",
            len(skipped),
            ", ".join(skipped[:10]),
        )
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear/nn.Conv2d layer to quantize"
            + (" after applying modules_to_not_convert" if config.modules_to_not_convert else "")
        )
    swap_layers(model, config, names, config.bit_scheme)
    attach_quantizer(model, config)
    return model


__all__ = ["dequantize_model", "quantize_model"]
