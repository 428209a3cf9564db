"""The hyperparameters of MSQ, declared once, in pure Python: :class:`MSQParams`, :data:`PARAMS` and their checks.

Each field is declared once, ``name: type = param(default, help, rule)`` (see :mod:`msq_hf.fields`), in
:class:`MSQParams`. :class:`msq_hf.MSQConfig` (the transformers quantization config) inherits these
declarations and derives its constructor and docstring from them; :mod:`msq_hf.arguments` derives the
command-line flags. The validation lives here too: :func:`validate_field` per field, :data:`CROSS_RULES` across
fields, :func:`validate_config` for both.

This module imports neither torch nor transformers (only :mod:`msq_hf.fields` and :mod:`msq_hf.quant.bits`),
so ``msq-hf train --help`` builds its flags from it at once (docs/cli.md, "Startup time").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from msq_hf.fields import (
    ConfigFieldError,
    CrossRule,
    Param,
    Rule,
    check_field,
    collect_params,
    exactly,
    integer,
    number,
    param,
)
from msq_hf.quant.bits import MAX_ACT_BITS, MAX_BITS, MIN_ACT_BITS, MIN_BITS

FORMAT_VERSION = 1
OWNER = "MSQConfig"  # error messages read "MSQConfig.<field>=<value> is invalid: expected ..."

BITS = integer(MIN_BITS, MAX_BITS)
OPEN_UNIT = number("a number in the open interval (0, 1)", lambda v: 0 < v < 1)


def _as_list(value: Any) -> Any:
    return (list(value) or None) if isinstance(value, (list, tuple)) else value


def _as_dict(value: Any) -> Any:
    return (dict(value) or None) if isinstance(value, Mapping) else value


_PATTERNS = Rule(
    "None or a list of glob or 're:' patterns (strings)",
    lambda v: v is None or (isinstance(v, list) and all(isinstance(p, str) for p in v)),
)
_SCHEME = Rule("None or {module_name: bits}", lambda v: v is None or isinstance(v, dict), entries=BITS)
_VERSION = exactly(
    FORMAT_VERSION, f"is not supported by this msq_hf (format {FORMAT_VERSION}); upgrade msq_hf to read it"
)


@dataclass(init=False, repr=False, eq=False)
class MSQParams:
    """The declaration of every :class:`msq_hf.MSQConfig` field (MSQConfig inherits them; never instantiated)."""

    # -- bits and the schedule
    init_bits: int = param(
        8,
        "starting magnitude bits of every quantized layer (8 for CNNs, 4 for ViTs starting from a 4-bit checkpoint)",
        BITS,
    )
    min_bits: int = param(1, "lowest bits a layer may reach (1 bit = ternary weights)", BITS)
    target_compression: float = param(
        16.0,
        "stop pruning once the compression ratio 32*sum(N)/sum(bits*N) reaches this",
        number("a compression ratio >= 1: 1 keeps the starting bits, > 1 prunes (e.g. 16)", lambda v: v >= 1),
        aliases=("--target",),
    )
    count_sign_bit: bool = param(
        False,
        "count the sign bit in the ratio (bits+1 per weight, what a signmag "
        "export stores) instead of the paper's magnitude-only accounting",
    )
    reg_strength: float = param(
        0.5,
        "lambda of the L1 LSB regularizer (MSQ Eq. 8); in 'step' units SGD moves weights lr*lambda grid steps per step",
        number("a finite number >= 0", lambda v: v >= 0),
    )
    reg_control: Literal["trajectory", "fixed"] = param(
        "trajectory",
        "'trajectory': at each pruning step lambda is multiplied by reg_gain if the compression is behind a linear "
        "plan reaching the target at target_fraction of training (divided if far ahead); 'fixed': constant lambda",
    )
    reg_gain: float = param(1.5, "lambda feedback factor per pruning step", number("a number > 1", lambda v: v > 1))
    target_fraction: float = param(
        0.5,
        "fraction of training at which the planned compression trajectory reaches the target",
        number("a number in (0, 1]", lambda v: 0 < v <= 1),
    )
    warmup_fraction: float = param(
        0.05,
        "no regularizer, pruning or Hessian pass before this fraction of training (weights and BatchNorm "
        "statistics settle first)",
        number("a number in [0, 1)", lambda v: 0 <= v < 1),
    )
    prune_threshold: float = param(0.01, "a layer drops k LSBs when its LSB nonzero rate falls below this", OPEN_UNIT)
    prune_interval: int = param(100, "optimizer steps between pruning steps", integer(1))
    final_round_fraction: float = param(
        0.7,
        "force a final pruning round after this fraction of training if the target was not reached",
        number("a number in (0, 1]", lambda v: 0 < v <= 1),
    )
    default_k: Literal[1, 2] = param(1, "LSBs pruned per step when hessian_guided is off")
    prune_order: Literal["rate", "sensitivity"] = param(
        "rate",
        "which layers go first when the plan or the target lets only some prune: 'rate' (fewest nonzero LSBs) or "
        "'sensitivity' (least Hessian cost per stored bit saved; needs hessian_guided)",
    )
    lsb_pull: Literal["uniform", "sensitivity"] = param(
        "uniform",
        "which layers the LSB regularizer pulls: 'uniform' (every layer, one lambda: the paper) or 'sensitivity' "
        "(only the layers the greedy Hessian allocation of the target, re-made at each measurement, would cut; "
        "needs hessian_guided)",
    )
    # -- Hessian sensitivity (HAWQ-V2, Eq. 9)
    hessian_guided: bool = param(
        True, "choose k from Hessian-trace sensitivity (k=1 above the mean, 2 below)", negations=("--no-hessian",)
    )
    hessian_max_probes: int = param(
        16, "most Hutchinson probes per sensitivity estimate", integer(1), aliases=("--hessian-probes",)
    )
    hessian_tol: float = param(1e-2, "relative tolerance of the Hutchinson estimate", OPEN_UNIT)
    hessian_batch_size: int = param(64, "samples of the last training batch used by the Hessian pass", integer(1))
    sensitivity_norm: Literal["avg", "sum"] = param("avg", "'avg' (Tr/N, HAWQ-V2) or 'sum' (Tr)")
    bn_recalibration: bool = param(
        True, "after a pruning step that lowered bits, re-estimate BatchNorm running statistics on the current batch"
    )
    regularizer_after_clipping: bool = param(
        False,
        "with a Trainer that clips gradients (max_grad_norm > 0): add lambda*dR/dW after the clipping, unclipped and "
        "bounded by the learning rate, instead of clipping it with the task gradient as a loss term (the default)",
    )
    lsb_update: Literal["gradient", "proximal"] = param(
        "gradient",
        "how the LSB regularizer moves the weights: 'gradient' (lambda*R in the loss, the paper) or 'proximal' (after "
        "every optimizer step, each weight moves lr*lambda*dR/dW toward its zero-LSB grid point, never past it: "
        "no clipping, no momentum)",
    )
    rewind_weights: bool = param(
        False,
        "at the final round, reload every weight and buffer the run started from (a fine-tune's checkpoint), clear "
        "the optimizer state and train the remaining steps as QAT at the bit scheme MSQ found",
    )
    qat_scale: Literal["max", "mse", "learned"] = param(
        "max",
        "each layer's scale S once the bit scheme is final: 'max' keeps the paper's S = max|W|; 'mse' clips the "
        "layer's latent weights to the range c*max|W| of least quantization error at its final bits, at the final "
        "round and every prune_interval steps after it; 'learned' starts each layer's grid step there and trains it "
        "with the loss (LSQ's gradient) for the rest of the run",
    )
    learned_step_init: Literal["mse", "lsq"] = param(
        "mse",
        "where each learned step starts at the final round (qat_scale='learned'): 'mse' at the clipped scale of least "
        "quantization error; 'lsq' at the LSQ paper's 2*mean|W|/sqrt(2^n-1), the start of a uniform LSQ quantizer "
        "with the same n+1 stored bits",
    )
    qat_grid: Literal["signmag", "full"] = param(
        "signmag",
        "the levels of the learned step's grid (qat_scale='learned'): 'signmag' keeps MSQ's 2^(n+1)-1 levels; 'full' "
        "adds the level +2^n, the one code the n+1 stored bits leave unused (sign-magnitude's -0), so a layer uses "
        "all 2^(n+1) codes of its stored bits, as a uniform (n+1)-bit grid does; the export's size is unchanged",
    )
    hessian_interval: int = param(
        2,
        "re-estimate the Hutchinson traces at every N-th sensitivity pass; in between, the last traces are reused with "
        "the current quantization error (no backward pass)",
        integer(1),
    )
    hessian_ema: float = param(
        0.5,
        "weight of the previous sensitivities in their moving average across pruning steps (0: no averaging)",
        number("a number in [0, 1)", lambda v: 0 <= v < 1),
    )
    # -- quantizer variants
    wnorm: Literal["signmag", "dorefa"] = param(
        "signmag", "weight quantizer: max-abs sign-magnitude or DoReFa tanh-affine"
    )
    lsb_form: Literal["continuous", "discrete"] = param(
        "continuous", "LSB term: continuous (Eq. 5) or discrete (Eq. 3 with STE)"
    )
    lsb_units: Literal["scale", "step", "code", "value"] = param(
        "scale",
        "LSB gradient per weight: 'scale' (S/2^8 sign: lr*lambda 8-bit grid steps of the layer, whatever its "
        "scale S), 'step' (S/2^n sign: lr*lambda grid steps at every precision), 'code' (2^n/S sign) or 'value' "
        "(sign/S)",
    )
    reg_reduction: Literal["sum", "mean"] = param(
        "sum", "regularizer reduction over weights: 'sum' (paper) or 'mean' (rescales lambda)"
    )
    # -- activations (off by default)
    act_bits: int | None = param(
        None,
        "bits of the inputs of quantized layers (None: float activations)",
        integer(MIN_ACT_BITS, MAX_ACT_BITS, optional=True),
    )
    act_quantizer: Literal["auto", "pact", "lsq"] = param(
        "auto", "activation quantizer ('auto': LSQ for Linear inputs, PACT for Conv inputs)"
    )
    act_skip_first: bool = param(True, "leave the input of the first quantized layer (the image) unquantized")
    # -- layer selection
    modules_to_not_convert: list[str] | None = param(
        None,
        "fnmatch globs or 're:<regex>' patterns of module names whose Linear/Conv2d layers stay float",
        _PATTERNS,
        convert=_as_list,
    )
    # -- serialization (written by msq_hf, not by users)
    bit_scheme: dict[str, int] | None = param(
        None, "{module_name: bits} at save time", _SCHEME, user=False, convert=_as_dict
    )
    msq_format: Literal["fake", "packed"] = param("fake", "fake-quantized or bit-packed weights", user=False)
    dequantize: bool = param(False, "load an export as plain float layers", user=False)
    format_version: int = param(FORMAT_VERSION, "version of the msq_hf export format", _VERSION, user=False)


PARAMS: dict[str, Param] = collect_params(MSQParams)
"""Every MSQConfig field's declaration, in declaration order."""


def user_params() -> list[Param]:
    """The declarations of the training hyperparameters (the fields a user sets; not the serialization ones)."""
    return [p for p in PARAMS.values() if p.user]


def field_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every field's value in ``values`` (its default where missing), normalized as declared (``convert``:
    a tuple of patterns becomes a list, an empty one None); not validated. ``ValueError`` for a name that is
    not a field."""
    unknown = sorted(set(values) - set(PARAMS))
    if unknown:
        raise ValueError(f"MSQConfig got unknown field(s) {unknown}; see help(MSQConfig) for the fields")
    found = {}
    for name, spec in PARAMS.items():
        value = values.get(name, spec.default)
        found[name] = spec.convert(value) if spec.convert else value
    return found


def validate_field(name: str, value: Any) -> None:
    """Raise :class:`ConfigFieldError` unless ``value`` is valid for the MSQConfig field ``name`` on its own."""
    check_field(OWNER, PARAMS[name], value)


def _ratio(bits: int, values: Mapping[str, Any]) -> float:
    """Compression when every layer has ``bits`` magnitude bits (plus the sign bit if it counts)."""
    return 32.0 / (bits + (1 if values["count_sign_bit"] else 0))


def _with_sign(values: Mapping[str, Any], show: Any) -> str:
    return f" and {show('count_sign_bit')}" if values["count_sign_bit"] else ""


def _learned_step_only(name: str, default: str, why: str) -> CrossRule:
    """The rule of a field that only ``qat_scale="learned"`` uses: any value but ``default`` needs it."""
    return CrossRule(
        name,
        ("qat_scale",),
        lambda v: v[name] == default or v["qat_scale"] == "learned",
        lambda v, s: f"{default!r} with {s('qat_scale')} ({why}: 'learned')",
    )


def _hessian_only(name: str, default: str, what: str) -> CrossRule:
    """The rule of a field whose non-default value ranks layers by Hessian sensitivity: it needs the Hessian pass."""
    return CrossRule(
        name,
        ("hessian_guided",),
        lambda v: v[name] == default or v["hessian_guided"],
        lambda v, s: f"{default!r} with {s('hessian_guided')} ({what} needs the Hessian pass)",
    )


CROSS_RULES: tuple[CrossRule, ...] = (
    CrossRule(
        "min_bits", ("init_bits",), lambda v: v["min_bits"] <= v["init_bits"], lambda v, s: f"at most {s('init_bits')}"
    ),
    CrossRule(
        "target_compression",
        ("min_bits", "count_sign_bit"),
        lambda v: v["target_compression"] <= _ratio(v["min_bits"], v) + 1e-9,
        lambda v, s: (
            f"at most {_ratio(v['min_bits'], v):g}x, the ratio with every layer at {s('min_bits')}" + _with_sign(v, s)
        ),
    ),
    # a run whose target is met before any pruning only does QAT: fine for the API, a mistake on a command line
    CrossRule(
        "target_compression",
        ("init_bits", "count_sign_bit"),
        lambda v: v["target_compression"] > _ratio(v["init_bits"], v),
        lambda v, s: (
            f"above {_ratio(v['init_bits'], v):g}x, the ratio already met at {s('init_bits')}" + _with_sign(v, s)
        ),
        strict=True,
    ),
    CrossRule(
        "target_fraction",
        ("warmup_fraction", "final_round_fraction"),
        lambda v: v["warmup_fraction"] < v["target_fraction"] <= v["final_round_fraction"],
        lambda v, s: f"above {s('warmup_fraction')} and at most {s('final_round_fraction')}",
    ),
    # the proximal step works on the sign-magnitude grid (msq_hf.quant.grid); DoReFa's tanh domain has none
    CrossRule(
        "lsb_update",
        ("wnorm",),
        lambda v: v["lsb_update"] == "gradient" or v["wnorm"] == "signmag",
        lambda v, s: f"'gradient' with {s('wnorm')} (the proximal step needs wnorm='signmag')",
    ),
    CrossRule(
        "qat_scale",
        ("wnorm",),
        lambda v: v["qat_scale"] == "max" or v["wnorm"] == "signmag",
        lambda v, s: f"'max' with {s('wnorm')} (the clipped and learned scales fit the sign-magnitude grid)",
    ),
    _hessian_only("prune_order", "rate", "the 'sensitivity' order"),
    _hessian_only("lsb_pull", "uniform", "the 'sensitivity' pull"),
    _learned_step_only("learned_step_init", "mse", "only a learned step has a start"),
    _learned_step_only("qat_grid", "signmag", "the extra level needs the learned step"),
)


def validate_config(values: Mapping[str, Any], strict: bool = False) -> None:
    """Validate MSQConfig field values: every field on its own, then :data:`CROSS_RULES` (``strict``: also
    the rules for a run, which front ends apply). Raises :class:`ConfigFieldError`."""
    for name in PARAMS:
        validate_field(name, values[name])
    for rule in CROSS_RULES:
        if strict or not rule.strict:
            rule.check(OWNER, values)


__all__ = [
    "BITS",
    "CROSS_RULES",
    "FORMAT_VERSION",
    "OWNER",
    "PARAMS",
    "ConfigFieldError",
    "MSQParams",
    "field_values",
    "user_params",
    "validate_config",
    "validate_field",
]
