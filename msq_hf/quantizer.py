"""``MSQQuantizer``: the transformers ``HfQuantizer`` registered under ``quant_method="msq"``.

It makes ``from_pretrained`` rebuild MSQ models and ``save_pretrained`` write the bit scheme:

* before weights load (on the meta device) it swaps Linear/Conv2d for MSQ layers with the
  precisions of ``quantization_config.bit_scheme`` (or ``init_bits`` for a fresh float checkpoint);
* after loading it re-initialises every buffer the checkpoint did not provide (transformers fills
  missing buffers with ``torch.empty_like`` garbage) and validates the loaded bit widths;
* on save it records the current bit scheme in ``config.json['quantization_config']``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .config import MSQConfig
from .functional import MAX_BITS, MIN_BITS


class MSQQuantizer(HfQuantizer):
    """HF quantizer for MSQ fake-quant (training) checkpoints."""

    requires_calibration = False

    def __init__(self, quantization_config: MSQConfig, **kwargs: Any):
        if isinstance(quantization_config, dict):
            quantization_config = MSQConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self._expected_bits: dict[str, int] = {}

    # -- capabilities ---------------------------------------------------------------------------
    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.quantization_config.msq_format == "packed" and self.pre_quantized:
            from . import serialization  # noqa: F401  (packed exports need the export module)

    # -- loading --------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .convert import find_convertible_layers, swap_layers

        cfg: MSQConfig = self.quantization_config
        if self.pre_quantized and cfg.msq_format == "packed":
            from .serialization import prepare_packed_model

            return prepare_packed_model(model, cfg, dequantize=cfg.dequantize)
        names = find_convertible_layers(model, cfg.modules_to_not_convert)
        scheme = cfg.bit_scheme or {}
        unknown = sorted(set(scheme) - set(names))
        if unknown:
            raise ValueError(f"quantization_config.bit_scheme names layer(s) {unknown[:5]} that this "
                             f"{type(model).__name__} does not have (or that are excluded); the checkpoint "
                             "was saved from a different architecture or transformers version")
        swap_layers(model, cfg, names, scheme)
        self._expected_bits = {n: scheme.get(n, cfg.init_bits) for n in names}
        model.msq_config = cfg
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .convert import iter_msq_layers

        cfg: MSQConfig = self.quantization_config
        if self.pre_quantized and cfg.msq_format == "packed":
            from .serialization import finalize_packed_model

            return finalize_packed_model(model, cfg)
        for name, layer in iter_msq_layers(model):
            expected = self._expected_bits.get(name, cfg.init_bits)
            if not self.pre_quantized:
                # float checkpoint: bits/k were never stored, their memory is uninitialised
                layer.bits.fill_(expected)
                layer.k.fill_(0)
            else:
                bits = int(layer.bits)
                if not MIN_BITS <= bits <= MAX_BITS or (cfg.bit_scheme and bits != expected):
                    raise ValueError(f"layer {name!r}: checkpoint holds bits={bits}, but quantization_config."
                                     f"bit_scheme says {expected} (allowed {MIN_BITS}..{MAX_BITS}); the "
                                     "checkpoint is corrupt or was edited")
                if not 0 <= int(layer.k) < bits:
                    layer.k.fill_(0)
            for sub in (getattr(layer, "act_quant", None),):
                if sub is not None and hasattr(sub, "signed") and int(sub.signed) not in (-1, 0, 1):
                    sub.signed.fill_(-1)
        model.msq_config = cfg
        return model

    # -- saving ---------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        """Record the current bit scheme in the config before ``config.json`` is written."""
        from .convert import bit_scheme

        self.quantization_config.bit_scheme = bit_scheme(model)
        self.quantization_config.msq_format = "fake"
        return None, {"msq_format": "fake"}

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from .convert import dequantize_model

        return dequantize_model(model)
