"""``MSQConfig``: every hyperparameter of MSQ, as a transformers quantization config."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from msq_hf.quant.functional import MAX_BITS, MIN_BITS

QUANT_METHOD = "msq"
FORMAT_VERSION = 1

_CHOICES: dict[str, tuple[str, ...]] = {
    "wnorm": ("signmag", "dorefa"),
    "lsb_form": ("continuous", "discrete"),
    "lsb_units": ("code", "value"),
    "reg_reduction": ("sum", "mean"),
    "sensitivity_norm": ("avg", "sum"),
    "act_quantizer": ("auto", "pact", "lsq"),
    "msq_format": ("fake", "packed"),
}


@dataclass(init=False, repr=False)
class MSQConfig(QuantizationConfigMixin):
    """Configuration of MSQ quantization-aware training with learned per-layer bit widths.

    Bits and the schedule:
        init_bits: starting magnitude precision of every quantized layer (1..8; 8 for CNNs,
            4 for ViTs starting from a 4-bit checkpoint).
        min_bits: lowest precision a layer may reach (1..init_bits). 1 bit = ternary weights.
        target_compression: stop pruning once ``32 * sum N_l / sum b_l N_l`` reaches this (> 1).
        count_sign_bit: count the sign bit in ``b_l`` (``n+1`` bits, what a signmag export stores)
            instead of the paper's magnitude-only accounting.
        reg_strength: lambda of the L1 LSB regularizer (MSQ Eq. 8).
        prune_threshold: a layer drops k LSBs when its LSB nonzero rate falls below this (0, 1).
        prune_interval: optimizer steps between pruning steps (> 0).
        final_round_fraction: fraction of training after which a final round is forced if the
            target was not reached (0, 1].
        default_k: k used when ``hessian_guided`` is False (1 or 2).
    Hessian sensitivity (HAWQ-V2, Eq. 9):
        hessian_guided: choose k from Hessian-trace sensitivity (k=1 above mean, 2 below).
        hessian_max_probes, hessian_tol: Hutchinson probes cap and relative tolerance.
        hessian_batch_size: samples of the last training batch used for the Hessian pass.
        sensitivity_norm: "avg" (Tr/N, HAWQ-V2) or "sum" (Tr).
    Quantizer variants:
        wnorm: "signmag" (max-abs sign-magnitude, default) or "dorefa" (tanh-affine).
        lsb_form: "continuous" (Eq. 5) or "discrete" (Eq. 3 with STE).
        lsb_units: "code" (gradient 2^n sign) or "value" (gradient sign).
        reg_reduction: "sum" over weights (paper) or "mean" (rescales lambda).
    Activations (off by default):
        act_bits: None, or 2..8 bits for the inputs of quantized layers.
        act_quantizer: "auto" (LSQ for Linear inputs, PACT for Conv inputs), "pact" or "lsq".
        act_skip_first: leave the input of the first quantized layer (the image) unquantized.
    Layer selection:
        modules_to_not_convert: glob patterns (``fnmatch``) or ``re:<regex>`` matched against
            module names; matching Linear/Conv2d layers stay float.
    Serialization (written by msq_hf, not by users):
        bit_scheme: ``{module_name: bits}`` at save time; msq_format: "fake" or "packed";
        dequantize: load an export as plain float layers.
    """

    init_bits: int
    min_bits: int
    target_compression: float
    count_sign_bit: bool
    reg_strength: float
    prune_threshold: float
    prune_interval: int
    final_round_fraction: float
    default_k: int
    hessian_guided: bool
    hessian_max_probes: int
    hessian_tol: float
    hessian_batch_size: int
    sensitivity_norm: str
    wnorm: str
    lsb_form: str
    lsb_units: str
    reg_reduction: str
    act_bits: int | None
    act_quantizer: str
    act_skip_first: bool
    modules_to_not_convert: list[str] | None
    bit_scheme: dict[str, int] | None
    msq_format: str
    dequantize: bool
    format_version: int

    def __init__(
        self,
        init_bits: int = 8,
        min_bits: int = 1,
        target_compression: float = 16.0,
        count_sign_bit: bool = False,
        reg_strength: float = 5e-5,
        prune_threshold: float = 0.01,
        prune_interval: int = 100,
        final_round_fraction: float = 0.7,
        default_k: int = 1,
        hessian_guided: bool = True,
        hessian_max_probes: int = 16,
        hessian_tol: float = 1e-2,
        hessian_batch_size: int = 64,
        sensitivity_norm: str = "avg",
        wnorm: str = "signmag",
        lsb_form: str = "continuous",
        lsb_units: str = "code",
        reg_reduction: str = "sum",
        act_bits: int | None = None,
        act_quantizer: str = "auto",
        act_skip_first: bool = True,
        modules_to_not_convert: list[str] | None = None,
        bit_scheme: dict[str, int] | None = None,
        msq_format: str = "fake",
        dequantize: bool = False,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ):
        kwargs.pop("quant_method", None)
        unknown = sorted(kwargs)
        if unknown:
            raise ValueError(f"MSQConfig got unknown field(s) {unknown}; see help(MSQConfig) for the fields")
        self.quant_method = QUANT_METHOD
        self.init_bits = init_bits
        self.min_bits = min_bits
        self.target_compression = target_compression
        self.count_sign_bit = count_sign_bit
        self.reg_strength = reg_strength
        self.prune_threshold = prune_threshold
        self.prune_interval = prune_interval
        self.final_round_fraction = final_round_fraction
        self.default_k = default_k
        self.hessian_guided = hessian_guided
        self.hessian_max_probes = hessian_max_probes
        self.hessian_tol = hessian_tol
        self.hessian_batch_size = hessian_batch_size
        self.sensitivity_norm = sensitivity_norm
        self.wnorm = wnorm
        self.lsb_form = lsb_form
        self.lsb_units = lsb_units
        self.reg_reduction = reg_reduction
        self.act_bits = act_bits
        self.act_quantizer = act_quantizer
        self.act_skip_first = act_skip_first
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.bit_scheme = dict(bit_scheme) if bit_scheme else None
        self.msq_format = msq_format
        self.dequantize = dequantize
        self.format_version = format_version
        self.post_init()

    # ------------------------------------------------------------------------------------------
    def post_init(self) -> None:
        """Validate every field; raise ``ValueError`` naming the field and its allowed range."""

        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"MSQConfig.{field}={getattr(self, field)!r} is invalid: expected {allowed}")

        for field in ("init_bits", "min_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                raise bad(field, f"an integer in {MIN_BITS}..{MAX_BITS}")
        if self.min_bits > self.init_bits:
            raise ValueError(
                f"MSQConfig.min_bits={self.min_bits} is invalid: expected min_bits <= init_bits={self.init_bits}"
            )
        if (
            not isinstance(self.target_compression, (int, float))
            or isinstance(self.target_compression, bool)
            or not math.isfinite(self.target_compression)
            or self.target_compression < 1
        ):
            raise bad("target_compression", "a finite number >= 1 (32 / average bits)")
        best = 32.0 / (self.min_bits + (1 if self.count_sign_bit else 0))
        if self.target_compression > best + 1e-9:
            raise bad("target_compression", f"<= {best:.2f}, the ratio when every layer is at min_bits={self.min_bits}")
        if (
            not isinstance(self.reg_strength, (int, float))
            or not math.isfinite(self.reg_strength)
            or self.reg_strength < 0
        ):
            raise bad("reg_strength", "a finite number >= 0")
        for field in ("prune_threshold", "hessian_tol"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise bad(field, "a number in the open interval (0, 1)")
        if not isinstance(self.final_round_fraction, (int, float)) or not 0 < self.final_round_fraction <= 1:
            raise bad("final_round_fraction", "a number in (0, 1]")
        for field in ("prune_interval", "hessian_max_probes", "hessian_batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(field, "a positive integer")
        if self.default_k not in (1, 2):
            raise bad("default_k", "1 or 2")
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise bad(field, "one of " + ", ".join(repr(a) for a in allowed))
        if self.act_bits is not None and (
            isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8
        ):
            raise bad("act_bits", "None (float activations) or an integer in 2..8")
        if self.modules_to_not_convert is not None and not all(isinstance(p, str) for p in self.modules_to_not_convert):
            raise bad("modules_to_not_convert", "a list of glob or 're:' patterns (strings)")
        if self.bit_scheme is not None:
            for name, bits in self.bit_scheme.items():
                if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                    raise ValueError(
                        f"MSQConfig.bit_scheme[{name!r}]={bits!r} is invalid: expected an "
                        f"integer in {MIN_BITS}..{MAX_BITS}"
                    )
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"MSQConfig.format_version={self.format_version!r} is not supported by this "
                f"msq_hf (format {FORMAT_VERSION}); upgrade msq_hf to read it"
            )
        for flag in ("count_sign_bit", "hessian_guided", "act_skip_first", "dequantize"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "True or False")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (what lands in ``config.json['quantization_config']``)."""
        return copy.deepcopy(self.__dict__)

    def __repr__(self) -> str:
        return f"MSQConfig {self.to_json_string(use_diff=False)}"

    def copy(self, **changes: Any) -> MSQConfig:
        """A validated copy with some fields changed."""
        data = self.to_dict()
        data.update(changes)
        return MSQConfig.from_dict(data)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a dict (e.g. ``config.json['quantization_config']``), validating every field."""
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused_kwargs else config


def register() -> None:
    """Register ``MSQConfig`` and ``MSQQuantizer`` with transformers under ``"msq"`` (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(MSQConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        from msq_hf.integrations.transformers import MSQQuantizer

        auto.register_quantizer(QUANT_METHOD)(MSQQuantizer)
