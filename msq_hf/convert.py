"""``quantize_model``: swap Linear/Conv2d layers for MSQ layers, in place.

Works on any ``nn.Module`` tree: HF vision models (ViT, DeiT, Swin, ResNet, MobileNetV2, ConvNext, ...),
``TimmWrapperForImageClassification`` and raw timm models. Layers are matched by exact type
(``nn.Linear``, ``nn.Conv2d``) plus an allow-list of subclasses whose forward is the plain
linear/conv (timm's ``Linear``, timm's ``Conv2dSame``). Other subclasses are left in float with a
warning, because their custom ``forward`` would bypass the quantized weight.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Iterator

from torch import nn

from msq_hf.config import MSQConfig
from msq_hf.nn.layers import MSQConv2d, MSQLayerMixin, MSQLinear, make_act_quantizer
from msq_hf.nn.packed import MSQPackedMixin
from msq_hf.quant.functional import compression_ratio as _compression_ratio

logger = logging.getLogger(__name__)


def _allowed_linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from timm.layers import Linear as TimmLinear

        types.append(TimmLinear)
    except ImportError:  # timm is optional for pure-transformers users
        pass
    return tuple(types)


def _same_pad_conv_types() -> tuple[type, ...]:
    try:
        from timm.layers.conv2d_same import Conv2dSame

        return (Conv2dSame,)
    except ImportError:
        return ()


def _is_convertible(module: nn.Module) -> bool:
    if isinstance(module, MSQLayerMixin):
        return False
    return (
        type(module) in _allowed_linear_types() or type(module) is nn.Conv2d or type(module) in _same_pad_conv_types()
    )


def _is_unsupported_subclass(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.Linear, nn.Conv2d))
        and not _is_convertible(module)
        and not isinstance(module, MSQLayerMixin)
    )


def pattern_matches(pattern: str, name: str) -> bool:
    """Does an exclusion pattern match a module name?

    ``re:<regex>`` is a full-match regular expression on the whole name. Any other pattern is a
    glob matched against the whole name or any dotted suffix of it, so ``"classifier"`` matches
    ``"classifier"`` and ``"head.classifier"`` but not ``"classifier2"``, and ``"attn.*"`` matches
    ``"blocks.0.attn.qkv"``.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _inside_multihead_attention(model: nn.Module) -> set[str]:
    # nn.MultiheadAttention reads out_proj.weight directly (never calls out_proj.forward):
    # swapping it would silently not quantize, so those layers stay float.
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
    return names


def find_convertible_layers(
    model: nn.Module,
    modules_to_not_convert: Iterable[str] | None = None,
) -> list[str]:
    """Names of the layers ``quantize_model`` would convert (after exclusions).

    Raises ``ValueError`` if an exclusion pattern matches no convertible layer (a typo would
    otherwise silently quantize a layer the user meant to keep).
    """
    patterns = list(modules_to_not_convert or [])
    in_mha = _inside_multihead_attention(model)
    candidates = [n for n, m in model.named_modules() if _is_convertible(m) and n not in in_mha]
    unused = [p for p in patterns if not any(pattern_matches(p, n) for n in candidates)]
    if unused:
        sample = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(
            f"modules_to_not_convert pattern(s) {unused} match no Linear/Conv2d layer of "
            f"{type(model).__name__}; layer names look like: {sample}"
        )
    return [n for n in candidates if not any(pattern_matches(p, n) for p in patterns)]


def _layer_kwargs(config: MSQConfig) -> dict:
    return dict(
        wnorm=config.wnorm, lsb_form=config.lsb_form, lsb_units=config.lsb_units, reg_reduction=config.reg_reduction
    )


def _act_quantizer(config: MSQConfig, module: nn.Module) -> nn.Module | None:
    if config.act_bits is None:
        return None
    kind = config.act_quantizer
    if kind == "auto":
        kind = "lsq" if isinstance(module, nn.Linear) else "pact"
    return make_act_quantizer(kind, config.act_bits)


def _references(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(module) -> [(parent, attribute)]`` for every place a module is registered.

    A module can be registered under several parents (shared blocks); all of them must see the
    swapped layer, or the model would run half float, half quantized.
    """
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, attr))
    return refs


def swap_layers(
    model: nn.Module, config: MSQConfig, names: list[str], bit_scheme: dict[str, int] | None = None
) -> None:
    """Replace the named Linear/Conv2d modules by MSQ layers (parameters are shared, not copied)."""
    same_pad = _same_pad_conv_types()
    first = names[0] if names else None
    refs = _references(model)
    for name in names:
        module = model.get_submodule(name)
        bits = (bit_scheme or {}).get(name, config.init_bits)
        act = None if (config.act_skip_first and name == first) else _act_quantizer(config, module)
        if isinstance(module, nn.Linear):
            new: nn.Module = MSQLinear.from_float(module, bits, act_quantizer=act, **_layer_kwargs(config))
        else:
            new = MSQConv2d.from_float(module, bits, act_quantizer=act, **_layer_kwargs(config))
            new.same_pad = bool(same_pad) and isinstance(module, same_pad)
        if act is not None:
            act.to(device=module.weight.device)
        new.train(module.training)
        for parent, attr in refs.get(id(module), []):
            setattr(parent, attr, new)


def attach_quantizer(model: nn.Module, config: MSQConfig, pre_quantized: bool = False) -> None:
    """Attach what Trainer and ``save_pretrained`` look for on a quantized model."""
    from msq_hf.integrations.transformers import MSQQuantizer

    model.hf_quantizer = MSQQuantizer(config, pre_quantized=pre_quantized)
    model.is_quantized = True
    model.quantization_method = "msq"
    model.msq_config = config
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        hf_config.quantization_config = config


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
    existing = [n for n, m in model.named_modules() if isinstance(m, MSQLayerMixin)]
    if existing:
        raise ValueError(
            f"{type(model).__name__} is already MSQ-quantized ({len(existing)} MSQ layers, "
            f"e.g. {existing[0]!r}); pass the float model"
        )
    names = find_convertible_layers(model, config.modules_to_not_convert)
    skipped = [n for n, m in model.named_modules() if _is_unsupported_subclass(m)]
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


def iter_msq_layers(model: nn.Module) -> Iterator[tuple[str, MSQLayerMixin]]:
    """``(name, layer)`` for every MSQ layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MSQLayerMixin):
            yield name, module


def msq_layers(model: nn.Module) -> dict[str, MSQLayerMixin]:
    """``{name: layer}`` for every MSQ layer; ``ValueError`` if there is none."""
    layers = dict(iter_msq_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MSQ layers; call msq_hf.quantize_model(model, config) first")
    return layers


def quantized_layers(model: nn.Module, required: bool = True) -> dict[str, nn.Module]:
    """``{name: layer}`` for every trainable MSQ layer *or* packed (loaded-export) layer, in module order.

    The reporting functions below use this, so they work on a model being trained and on one
    rebuilt by :func:`msq_hf.from_pretrained` alike. ``ValueError`` if there is none and ``required``.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (MSQLayerMixin, MSQPackedMixin))}
    if required and not layers:
        raise ValueError(
            f"{type(model).__name__} has no MSQ layers; call msq_hf.quantize_model(model, config) first "
            "or load an MSQ export with msq_hf.from_pretrained"
        )
    return layers


def bit_scheme(model: nn.Module) -> dict[str, int]:
    """Current bits per quantized layer, keyed by in-memory module name."""
    return {name: layer.n_bits for name, layer in quantized_layers(model).items()}


def layer_numels(model: nn.Module) -> dict[str, int]:
    """Number of weights of each quantized layer (what the compression ratio counts)."""
    return {name: layer.weight.numel() for name, layer in quantized_layers(model).items()}


def compression_ratio(model: nn.Module, count_sign_bit: bool | None = None) -> float:
    """Current compression ``C = 32 * sum_l N_l / sum_l n_l N_l`` over quantized layer weights.

    ``N_l`` counts the weight tensor of every MSQ layer (first and last layers included); biases,
    norms, activation quantizer parameters and float layers are not counted. ``n_l`` counts
    magnitude bits (paper accounting) unless ``count_sign_bit`` (default: the model's config).
    """
    layers = quantized_layers(model)
    if count_sign_bit is None:
        cfg = getattr(model, "msq_config", None)
        count_sign_bit = bool(cfg.count_sign_bit) if cfg is not None else False
    return _compression_ratio(
        [m.weight.numel() for m in layers.values()], [m.n_bits for m in layers.values()], count_sign_bit
    )


def set_bit_scheme(model: nn.Module, scheme: dict[str, int]) -> None:
    """Set bits per layer from ``{name: bits}``; unknown names raise ``KeyError`` naming them."""
    layers = msq_layers(model)
    unknown = sorted(set(scheme) - set(layers))
    if unknown:
        raise KeyError(f"bit scheme names layer(s) {unknown} that are not MSQ layers of {type(model).__name__}")
    for name, bits in scheme.items():
        layers[name].set_bits(int(bits))


def swap_to_float(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Replace each of ``layers`` by its plain ``to_float()`` twin wherever it is registered."""
    refs = _references(model)
    for layer in layers.values():
        plain = layer.to_float()
        plain.train(layer.training)
        for parent, attr in refs.get(id(layer), []):
            setattr(parent, attr, plain)


def forget_quantization(model: nn.Module) -> None:
    """Remove what :func:`attach_quantizer` put on ``model`` (the model is plain float again)."""
    for attr in ("hf_quantizer", "msq_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    model.quantization_method = None


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every MSQ layer by a plain ``nn.Linear``/``nn.Conv2d`` with the dequantized weight."""
    layers = dict(iter_msq_layers(model))
    for name, layer in layers.items():
        if getattr(layer, "act_quant", None) is not None:
            raise ValueError(
                f"layer {name!r} quantizes its inputs (act_bits); a plain float layer cannot "
                "reproduce it, so dequantize is refused"
            )
    swap_to_float(model, layers)
    forget_quantization(model)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    return model


__all__ = [
    "attach_quantizer",
    "bit_scheme",
    "compression_ratio",
    "dequantize_model",
    "find_convertible_layers",
    "forget_quantization",
    "iter_msq_layers",
    "layer_numels",
    "msq_layers",
    "pattern_matches",
    "quantize_model",
    "quantized_layers",
    "set_bit_scheme",
    "swap_layers",
    "swap_to_float",
]
