"""``MSQQuantizer``: the transformers ``HfQuantizer`` registered under ``quant_method="msq"``.

It makes ``from_pretrained`` rebuild MSQ models and ``save_pretrained`` write the bit scheme:

* before weights load (on the meta device) it swaps Linear/Conv2d for MSQ layers with the
  precisions of ``quantization_config.bit_scheme`` (or ``init_bits`` for a fresh float checkpoint),
  or for packed layers when the checkpoint is an msq_hf export;
* after loading it re-initialises every buffer the checkpoint did not provide (transformers fills
  missing buffers with ``torch.empty_like`` garbage) and validates the loaded bit widths;
* on save it hands transformers the state dict to write and a *copy* of the config carrying the current
  bit scheme for ``config.json`` (the user's ``MSQConfig`` is never modified).

:func:`register` puts ``MSQConfig``/``MSQQuantizer`` into transformers' AUTO mappings; ``import msq_hf`` calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.quantizers import auto
from transformers.quantizers.base import HfQuantizer

from msq_hf.config import QUANT_METHOD, MSQConfig
from msq_hf.convert import (
    bit_scheme,
    dequantize_model,
    finalize_packed_model,
    find_convertible_layers,
    iter_msq_layers,
    prepare_packed_model,
    swap_layers,
)
from msq_hf.io.format import CONFIG_WEIGHTS_KEY, check_weights_entry, packed_metadata, packed_state_dict
from msq_hf.nn.packed import MSQPackedMixin
from msq_hf.quant.functional import MAX_BITS, MIN_BITS


class MSQQuantizer(HfQuantizer):
    """HF quantizer for MSQ checkpoints: fake-quant training checkpoints and bit-packed exports."""

    requires_calibration = False

    def __init__(self, quantization_config: MSQConfig, **kwargs: Any):
        if isinstance(quantization_config, dict):
            quantization_config = MSQConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self._expected_bits: dict[str, int] = {}
        self._export: tuple[dict[str, torch.Tensor], MSQConfig] | None = None  # see exporting()

    @property
    def packed(self) -> bool:
        """True when loading an msq_hf export (bit-packed weights)."""
        return self.pre_quantized and self.quantization_config.msq_format == "packed"

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
        """Nothing to check: MSQ runs wherever torch runs."""

    def update_attn_implementation(self, config: Any) -> Any:
        """Name the export's weight file for ``AutoModel*.from_pretrained(export)`` (after ``import msq_hf``).

        transformers 5 reads the checkpoint file name from ``config.transformers_weights`` and gives a
        quantizer exactly one look at the model config before it resolves files: this call
        (``get_hf_quantizer``, quantizers/auto.py). Exports cannot store ``transformers_weights`` in
        ``config.json`` themselves: transformers *without* msq_hf would then load the packed file as a float
        model with random weights, where the missing ``model.safetensors`` now stops it. So the name lives
        under ``msq_weights`` and only msq_hf turns it into ``transformers_weights``. ``msq_hf.from_pretrained``
        sets it explicitly and does not rely on this. The attention implementation is left as it is.
        """
        config = super().update_attn_implementation(config)
        weights = getattr(config, CONFIG_WEIGHTS_KEY, None)
        if self.packed and weights and getattr(config, "transformers_weights", None) is None:
            config.transformers_weights = check_weights_entry(weights, "config.json")
        return config

    # -- loading --------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg: MSQConfig = self.quantization_config
        if self.packed:
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
        cfg: MSQConfig = self.quantization_config
        if self.packed:
            for attr in ("transformers_weights", CONFIG_WEIGHTS_KEY):
                # load-time redirection only: a later save_pretrained writes model.safetensors
                with contextlib.suppress(AttributeError):
                    delattr(model.config, attr)
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
            sub = getattr(layer, "act_quant", None)
            if sub is not None and hasattr(sub, "signed") and int(sub.signed) not in (-1, 0, 1):
                sub.signed.fill_(-1)
        model.msq_config = cfg
        return model

    # -- saving ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def exporting(self, state: dict[str, torch.Tensor], config: MSQConfig) -> Iterator[None]:
        """Inside this block ``save_pretrained`` writes ``state`` (a packed state dict) and ``config`` (what
        ``msq_hf.export`` does) instead of the model's own tensors and bit scheme."""
        self._export = (state, config)
        try:
            yield
        finally:
            self._export = None

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        """The state dict to save and the ``quantization_config`` that goes to ``config.json``.

        A plain ``save_pretrained`` writes a training checkpoint (``msq_format="fake"``: float latent
        weights + ``bits``/``k``, resumable). Inside :meth:`exporting`, or for a model loaded from an
        export (whose layers hold only packed codes), it writes the bit-packed state dict instead.
        transformers serialises ``model.config.quantization_config`` right after this call, so that
        attribute gets a copy describing this checkpoint; ``self.quantization_config`` (the user's
        ``MSQConfig``, also ``model.msq_config``) stays as it is.
        """
        if self._export is not None:
            state, saved = self._export
            metadata = packed_metadata()
        elif any(isinstance(m, MSQPackedMixin) for m in model.modules()):
            state, layers = packed_state_dict(model)
            scheme = {n: i["bits"] for n, i in layers.items()}
            saved = self.quantization_config.copy(bit_scheme=scheme, msq_format="packed", dequantize=False)
            metadata = packed_metadata()
        else:
            state, metadata = None, {"msq_format": "fake"}
            saved = self.quantization_config.copy(bit_scheme=bit_scheme(model), msq_format="fake")
        model.config.quantization_config = saved
        return state, metadata

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_model(model)


def attach_quantizer(model: nn.Module, config: MSQConfig, pre_quantized: bool = False) -> None:
    """Attach what Trainer and ``save_pretrained`` look for on a quantized model (the inverse of
    :func:`msq_hf.convert.forget_quantization`)."""
    model.hf_quantizer = MSQQuantizer(config, pre_quantized=pre_quantized)
    model.is_quantized = True
    model.quantization_method = "msq"
    model.msq_config = config
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        hf_config.quantization_config = config


def register() -> None:
    """Register ``MSQConfig`` and ``MSQQuantizer`` with transformers under ``"msq"`` (idempotent)."""
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(MSQConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(MSQQuantizer)


__all__ = ["MSQQuantizer", "attach_quantizer", "register"]
