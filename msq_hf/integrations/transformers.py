"""``MSQQuantizer``: the transformers ``HfQuantizer`` registered under ``quant_method="msq"``.

It makes ``from_pretrained`` rebuild MSQ models and ``save_pretrained`` write the bit scheme:

* before weights load (on the meta device) it swaps Linear/Conv2d for MSQ layers with the
  precisions of ``quantization_config.bit_scheme`` (or ``init_bits`` for a fresh float checkpoint);
* after loading it re-initialises every buffer the checkpoint did not provide (transformers fills
  missing buffers with ``torch.empty_like`` garbage) and validates the loaded bit widths;
* on save it records the current bit scheme in ``config.json['quantization_config']``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from msq_hf.config import MSQConfig
from msq_hf.quant.functional import MAX_BITS, MIN_BITS


class MSQQuantizer(HfQuantizer):
    """HF quantizer for MSQ fake-quant (training) checkpoints."""

    requires_calibration = False

    def __init__(self, quantization_config: MSQConfig, **kwargs: Any):
        if isinstance(quantization_config, dict):
            quantization_config = MSQConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self._expected_bits: dict[str, int] = {}
        # set by msq_hf.export around save_pretrained: (packed state dict, metadata, bit scheme)
        self._msq_export_payload: tuple[dict[str, torch.Tensor], dict[str, str], dict[str, int]] | None = None

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
            from msq_hf.io import export  # noqa: F401  (packed exports need the export module)

    def update_attn_implementation(self, config: Any) -> Any:
        """Point transformers at the packed weight file of an msq_hf export before it resolves files.

        Exports name their weights ``msq_model.safetensors`` (recorded as ``config.msq_weights``) so that
        transformers *without* ``import msq_hf`` fails with "no file named model.safetensors" instead of
        loading random weights; with msq_hf imported this hook (called from ``get_hf_quantizer``, before
        the checkpoint files are resolved) sets ``config.transformers_weights`` to that name.
        """
        config = super().update_attn_implementation(config)
        weights = getattr(config, "msq_weights", None)
        if (
            self.pre_quantized
            and self.quantization_config.msq_format == "packed"
            and weights
            and getattr(config, "transformers_weights", None) is None
        ):
            if (
                not isinstance(weights, str)
                or os.path.basename(weights) != weights
                or not weights.endswith((".safetensors", ".safetensors.index.json"))
            ):
                from msq_hf.errors import MSQFormatError

                raise MSQFormatError(
                    f"config.json msq_weights={weights!r} is invalid: expected a safetensors "
                    "file name (or index) inside the export directory"
                )
            config.transformers_weights = weights
        return config

    # -- loading --------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from msq_hf.convert import find_convertible_layers, swap_layers

        cfg: MSQConfig = self.quantization_config
        if self.pre_quantized and cfg.msq_format == "packed":
            from msq_hf.io.export import prepare_packed_model

            return prepare_packed_model(model, cfg, dequantize=cfg.dequantize)
        names = find_convertible_layers(model, cfg.modules_to_not_convert)
        scheme = cfg.bit_scheme or {}
        unknown = sorted(set(scheme) - set(names))
        if unknown:
            raise ValueError(
                f"quantization_config.bit_scheme names layer(s) {unknown[:5]} that this "
                f"{type(model).__name__} does not have (or that are excluded); the checkpoint "
                "was saved from a different architecture or transformers version"
            )
        swap_layers(model, cfg, names, scheme)
        self._expected_bits = {n: scheme.get(n, cfg.init_bits) for n in names}
        model.msq_config = cfg
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from msq_hf.convert import iter_msq_layers

        cfg: MSQConfig = self.quantization_config
        if self.pre_quantized and cfg.msq_format == "packed":
            from msq_hf.io.export import finalize_packed_model

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
                    raise ValueError(
                        f"layer {name!r}: checkpoint holds bits={bits}, but quantization_config."
                        f"bit_scheme says {expected} (allowed {MIN_BITS}..{MAX_BITS}); the "
                        "checkpoint is corrupt or was edited"
                    )
                if not 0 <= int(layer.k) < bits:
                    layer.k.fill_(0)
            for sub in (getattr(layer, "act_quant", None),):
                if sub is not None and hasattr(sub, "signed") and int(sub.signed) not in (-1, 0, 1):
                    sub.signed.fill_(-1)
        model.msq_config = cfg
        return model

    # -- saving ---------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        """Record the current bit scheme in the config before ``config.json`` is written.

        A plain ``save_pretrained`` writes a training checkpoint (``msq_format="fake"``: float latent
        weights + ``bits``/``k``, resumable). Inside ``msq_hf.export`` (or for a model loaded from an
        export, whose layers hold only packed codes) it returns the bit-packed state dict instead.
        """
        from msq_hf.convert import bit_scheme, quantized_layers
        from msq_hf.io.export import packed_state_dict

        if self._msq_export_payload is not None:
            state, metadata, scheme = self._msq_export_payload
            self.quantization_config.bit_scheme = dict(scheme)
            self.quantization_config.msq_format = "packed"
            return state, dict(metadata)
        from msq_hf.nn.packed import MSQPackedMixin

        if any(isinstance(m, MSQPackedMixin) for m in quantized_layers(model, required=False).values()):
            state, layers = packed_state_dict(model)
            self.quantization_config.bit_scheme = {n: i["bits"] for n, i in layers.items()}
            self.quantization_config.msq_format = "packed"
            self.quantization_config.dequantize = False
            from msq_hf.config import FORMAT_VERSION

            return state, {"msq_format": "packed", "format_version": str(FORMAT_VERSION)}
        self.quantization_config.bit_scheme = bit_scheme(model)
        self.quantization_config.msq_format = "fake"
        return None, {"msq_format": "fake"}

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from msq_hf.convert import dequantize_model

        return dequantize_model(model)
