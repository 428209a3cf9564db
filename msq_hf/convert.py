"""The module-replacement engine (one registry, one swap routine) and the queries on converted models.

Every layer swap in msq_hf goes through :func:`replace_modules` with a *kind*:

* ``"msq"``: float ``nn.Linear``/timm ``Linear``/``nn.Conv2d``/timm ``Conv2dSame`` -> ``MSQLinear``/``MSQConv2d``
  (training, :func:`swap_layers`);
* ``"packed"``: the same float types -> ``MSQPackedLinear``/``MSQPackedConv2d`` (loading an export,
  :func:`prepare_packed_model`);
* ``"float"``: MSQ and packed layers -> plain float layers (:func:`swap_to_float`, dequantize);
* ``"bsq"``, ``"csq"``, ``"dorefa"``: the float types -> the baselines' layers (registered by their modules).

A kind maps *exact* source types to a factory ``factory(module, **options) -> new module``
(:func:`register_layer`, after optimum-quanto's ``register_qmodule``). Matching is by exact type because a
subclass of ``nn.Linear``/``nn.Conv2d`` may override ``forward`` and bypass the swapped weight; such layers
stay float (:func:`unconvertible_layers`). The swap routine replaces a module under every parent it is
registered with (shared blocks), keeps its train/eval mode and moves the new module to the old one's device.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch import nn

from msq_hf.config import MSQConfig
from msq_hf.errors import MSQFormatError
from msq_hf.nn.act import make_act_quantizer
from msq_hf.nn.base import CONV_TYPES, LINEAR_TYPES
from msq_hf.nn.layers import MSQConv2d, MSQLayerMixin, MSQLinear
from msq_hf.nn.packed import MSQPackedConv2d, MSQPackedLinear, MSQPackedMixin
from msq_hf.quant import functional as QF
from msq_hf.quant.packing import release_scratch

LayerFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, dict[type[nn.Module], LayerFactory]] = {}


# ------------------------------------------------------------------------------------------------
# registry and swap routine


def register_layer(kind: str, *source_types: type[nn.Module]) -> Callable[[LayerFactory], LayerFactory]:
    """Decorator: ``factory(module, **options)`` builds the ``kind`` replacement of each of ``source_types``."""
    if not source_types:
        raise ValueError(f"register_layer({kind!r}) needs at least one source type")

    def decorate(factory: LayerFactory) -> LayerFactory:
        table = _REGISTRY.setdefault(kind, {})
        for source in source_types:
            table[source] = factory
        return factory

    return decorate


def layer_factory(kind: str, module: nn.Module) -> LayerFactory | None:
    """The factory registered under ``kind`` for ``type(module)`` exactly, or ``None``."""
    if kind not in _REGISTRY:
        raise KeyError(f"no replacement kind {kind!r} is registered (known: {sorted(_REGISTRY)})")
    return _REGISTRY[kind].get(type(module))


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


def replace_modules(model: nn.Module, kind: str, options: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Module]:
    """Replace each module named in ``options`` by its ``kind`` twin ``factory(module, **options[name])``.

    The new module takes the old one's place under every parent, its train/eval mode and its device.
    ``TypeError`` naming the layer (before anything is swapped) if ``kind`` has no factory for its type.
    Returns ``{name: new module}``.
    """
    modules = {name: model.get_submodule(name) for name in options}
    factories = {name: layer_factory(kind, module) for name, module in modules.items()}
    missing = [f"{name!r} ({type(modules[name]).__name__})" for name, f in factories.items() if f is None]
    if missing:
        raise TypeError(f"no {kind!r} replacement is registered for layer(s) {', '.join(missing[:5])}")
    refs = _references(model)
    swapped: dict[str, nn.Module] = {}
    for name, module in modules.items():
        new = factories[name](module, **options[name])  # type: ignore[misc]
        new.train(module.training)
        tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
        if tensor is not None:
            new.to(tensor.device)
        for parent, attr in refs.get(id(module), []):
            setattr(parent, attr, new)
        swapped[name] = new
    return swapped


register_layer("msq", *LINEAR_TYPES)(MSQLinear.from_float)
register_layer("msq", *CONV_TYPES)(MSQConv2d.from_float)
register_layer("packed", *LINEAR_TYPES)(MSQPackedLinear.from_float)
register_layer("packed", *CONV_TYPES)(MSQPackedConv2d.from_float)
for _cls in (MSQLinear, MSQConv2d, MSQPackedLinear, MSQPackedConv2d):
    register_layer("float", _cls)(_cls.to_float)


# ------------------------------------------------------------------------------------------------
# which layers


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


def find_convertible_layers(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None) -> list[str]:
    """Names of the float layers a conversion replaces (registered ``"msq"`` source types, after exclusions).

    Raises ``ValueError`` if an exclusion pattern matches no convertible layer (a typo would
    otherwise silently quantize a layer the user meant to keep).
    """
    patterns = list(modules_to_not_convert or [])
    in_mha = _inside_multihead_attention(model)
    candidates = [n for n, m in model.named_modules() if layer_factory("msq", m) is not None and n not in in_mha]
    unused = [p for p in patterns if not any(pattern_matches(p, n) for n in candidates)]
    if unused:
        sample = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(
            f"modules_to_not_convert pattern(s) {unused} match no Linear/Conv2d layer of "
            f"{type(model).__name__}; layer names look like: {sample}"
        )
    return [n for n in candidates if not any(pattern_matches(p, n) for p in patterns)]


def unconvertible_layers(model: nn.Module) -> list[str]:
    """Linear/Conv2d subclasses that stay float because their ``forward`` may bypass a swapped weight."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and not isinstance(m, MSQLayerMixin)
        and layer_factory("msq", m) is None
    ]


def _act_quantizer(config: MSQConfig, module: nn.Module, first: bool) -> nn.Module | None:
    if config.act_bits is None or (first and config.act_skip_first):
        return None
    return make_act_quantizer(config.act_quantizer, config.act_bits, linear=isinstance(module, nn.Linear))


# ------------------------------------------------------------------------------------------------
# the three MSQ conversions: float -> MSQ (training), float -> packed (loading), MSQ/packed -> float


def swap_layers(
    model: nn.Module, config: MSQConfig, names: list[str], bit_scheme: Mapping[str, int] | None = None
) -> None:
    """Replace the named float layers by MSQ layers at ``bit_scheme[name]`` (default ``init_bits``) bits.

    Parameters are shared, not copied. Every layer but the first gets an input quantizer when
    ``config.act_bits`` is set (the first one too unless ``act_skip_first``).
    """
    scheme = bit_scheme or {}
    layer_kwargs = {
        "wnorm": config.wnorm,
        "lsb_form": config.lsb_form,
        "lsb_units": config.lsb_units,
        "reg_reduction": config.reg_reduction,
        "learned_step": config.qat_scale == "learned",
        "full_grid": config.qat_grid == "full",
    }
    options = {
        name: {
            "bits": scheme.get(name, config.init_bits),
            "act_quantizer": _act_quantizer(config, model.get_submodule(name), i == 0),
            **layer_kwargs,
        }
        for i, name in enumerate(names)
    }
    replace_modules(model, "msq", options)


def prepare_packed_model(model: nn.Module, cfg: MSQConfig, dequantize: bool = False) -> nn.Module:
    """Replace every layer named in ``cfg.bit_scheme`` by an empty packed layer of the right shapes.

    Works on the meta device (transformers) and on real tensors (timm). ``dequantize`` only checks
    that the layers can become plain float layers (no activation quantizers); the swap to
    ``nn.Linear``/``nn.Conv2d`` happens in :func:`finalize_packed_model`, once the codes are loaded.
    ``MSQFormatError`` if the bit scheme is empty or names a layer the model lacks or cannot pack.
    """
    scheme = dict(cfg.bit_scheme or {})
    if not scheme:
        raise MSQFormatError(
            "quantization_config.bit_scheme is empty: a packed MSQ export must list the bits of every quantized layer"
        )
    modules = dict(model.named_modules())
    unknown = sorted(n for n in scheme if n not in modules)
    if unknown:
        sample = ", ".join(n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)))[:300]
        raise MSQFormatError(
            f"quantization_config.bit_scheme names layer(s) {unknown[:5]} that "
            f"{type(model).__name__} does not have (the export comes from a different "
            f"architecture or transformers version); its Linear/Conv2d layers are: {sample}"
        )
    for name in scheme:
        if layer_factory("packed", modules[name]) is None:
            raise MSQFormatError(
                f"quantization_config.bit_scheme names {name!r}, a {type(modules[name]).__name__}; "
                "only nn.Linear / nn.Conv2d layers can hold packed MSQ weights"
            )
    if dequantize and cfg.act_bits is not None:
        raise MSQFormatError(
            f"dequantize=True is impossible: the export quantizes layer inputs (act_bits="
            f"{cfg.act_bits}), which plain float layers cannot reproduce"
        )
    order = [n for n in modules if n in scheme]
    options = {
        name: {
            "bits": scheme[name],  # each value validated by MSQConfig
            "wnorm": cfg.wnorm,
            "full_grid": cfg.qat_grid == "full",
            "act_quantizer": _act_quantizer(cfg, modules[name], i == 0),
            "layer_name": name,
        }
        for i, name in enumerate(order)
    }
    replace_modules(model, "packed", options)
    model.msq_config = cfg
    return model


def finalize_packed_model(model: nn.Module, cfg: MSQConfig) -> nn.Module:
    """After the tensors are loaded: decode every packed layer (validating it), then either keep the
    packed layers or, with ``cfg.dequantize``, swap them for plain float layers."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MSQPackedMixin)}
    for module in layers.values():
        module.refresh()
    release_scratch()  # the validation's unpack workspace: forward grows it again only as far as it needs
    if cfg.dequantize:
        swap_to_float(model, layers)
        forget_quantization(model)
    else:
        model.msq_config = cfg
    return model


def swap_to_float(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Replace each of ``layers`` (MSQ or packed) by its plain float twin wherever it is registered."""
    replace_modules(model, "float", {name: {} for name in layers})


def forget_quantization(model: nn.Module) -> None:
    """Remove the MSQ attributes a conversion or load put on ``model`` (it is plain float again)."""
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


# ------------------------------------------------------------------------------------------------
# queries


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
    numels = [m.weight.numel() for m in layers.values()]
    return QF.compression_ratio(numels, [m.n_bits for m in layers.values()], count_sign_bit)


def set_bit_scheme(model: nn.Module, scheme: Mapping[str, int]) -> None:
    """Set bits per layer from ``{name: bits}``; unknown names raise ``KeyError`` naming them."""
    layers = msq_layers(model)
    unknown = sorted(set(scheme) - set(layers))
    if unknown:
        raise KeyError(f"bit scheme names layer(s) {unknown} that are not MSQ layers of {type(model).__name__}")
    for name, bits in scheme.items():
        layers[name].set_bits(int(bits))


__all__ = [
    "LayerFactory",
    "bit_scheme",
    "compression_ratio",
    "dequantize_model",
    "finalize_packed_model",
    "find_convertible_layers",
    "forget_quantization",
    "iter_msq_layers",
    "layer_factory",
    "layer_numels",
    "msq_layers",
    "pattern_matches",
    "prepare_packed_model",
    "quantized_layers",
    "register_layer",
    "replace_modules",
    "set_bit_scheme",
    "swap_layers",
    "swap_to_float",
    "unconvertible_layers",
]
