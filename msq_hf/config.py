"""``MSQConfig``: every hyperparameter of MSQ, declared once, as a transformers quantization config.

The fields are declared once, ``name: type = param(default, help, rule)``, in :class:`msq_hf.params.MSQParams`
(pure Python, so the command line can read them without torch); ``MSQConfig`` inherits them. Everything else is
derived from that declaration: the constructor (signature and defaults), the class docstring, the validation
(:func:`validate_field` per field, :data:`CROSS_RULES` across fields, both run by :meth:`MSQConfig.post_init`)
and the command-line flags (:class:`msq_hf.arguments.MSQArguments`). The declarations and checks are re-exported
here, so ``from msq_hf.config import PARAMS, validate_config`` keeps working.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from msq_hf.fields import ConfigFieldError, Param, Rule
from msq_hf.params import (
    BITS,
    CROSS_RULES,
    FORMAT_VERSION,
    OWNER,
    PARAMS,
    MSQParams,
    field_values,
    user_params,
    validate_config,
    validate_field,
)
from msq_hf.quant.bits import check_bits

QUANT_METHOD = "msq"


@dataclass(init=False, repr=False)
class MSQConfig(MSQParams, QuantizationConfigMixin):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the real signature (every field with its default) is generated from the declarations in MSQParams
        bound = _SIGNATURE.bind(self, *args, **kwargs).arguments
        del bound["self"]
        extra = dict(bound.pop("kwargs", {}))
        extra.pop("quant_method", None)
        values = field_values({**bound, **extra})  # ValueError for an unknown field
        self.quant_method = QUANT_METHOD
        for name, value in values.items():
            setattr(self, name, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise :class:`ConfigFieldError` naming the field and its allowed values."""
        validate_config(vars(self))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (what lands in ``config.json['quantization_config']``)."""
        return copy.deepcopy(self.__dict__)

    def __repr__(self) -> str:
        return f"MSQConfig {self.to_json_string(use_diff=False)}"

    def copy(self, **changes: Any) -> MSQConfig:
        """A validated copy with some fields changed."""
        return MSQConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a dict (e.g. ``config.json['quantization_config']``), validating every field."""
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused_kwargs else config


_SIGNATURE = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type)
        for p in PARAMS.values()
    ]
    + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
)
MSQConfig.__init__.__signature__ = _SIGNATURE  # type: ignore[attr-defined]
MSQConfig.__doc__ = (
    "Configuration of MSQ quantization-aware training with learned per-layer bit widths.\n\nFields:\n"
    + (
        "\n".join(
            f"    {p.name} = {p.default!r}: {p.help}; {p.rule.expected}" + ("" if p.user else " (written by msq_hf)")
            for p in PARAMS.values()
        )
    )
)


__all__ = [
    "BITS",
    "CROSS_RULES",
    "OWNER",
    "FORMAT_VERSION",
    "PARAMS",
    "QUANT_METHOD",
    "ConfigFieldError",
    "MSQConfig",
    "Param",
    "Rule",
    "check_bits",
    "user_params",
    "validate_config",
    "validate_field",
]
