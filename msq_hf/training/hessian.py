"""Making a model double-differentiable for a Hessian pass, and restoring it afterwards.

Several common kernels have no second derivative (docs/pruning.md, ``hessian_safe``): the fused CPU/flash SDPA
kernels, timm's fused attention, ``hardsigmoid`` (and on older torch ``hardswish``). :func:`hessian_safe`
switches a model to equivalents that have one for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)


class HardSigmoidDD(nn.Module):
    """``relu6(x + 3) / 6`` written with ``clamp`` so it has a second derivative (torch's native
    ``hardsigmoid_backward`` has none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 3.0).clamp(0.0, 6.0) / 6.0


class HardSwishDD(nn.Module):
    """``x * relu6(x + 3) / 6`` in plain ops (double-differentiable on every backend)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x + 3.0).clamp(0.0, 6.0) / 6.0


# Activation modules whose native kernels lack a double backward, with their replacements.
# Checked on CPU with torch 2.14: Hardsigmoid fails ("derivative for aten::hardsigmoid_backward is
# not implemented"); Hardswish, SiLU, GELU, Mish, ELU, ReLU6 pass. Hardswish is swapped anyway
# because older torch releases and other backends lacked its double backward and the swap is exact.
_DD_REPLACEMENTS: dict[type[nn.Module], Callable[[], nn.Module]] = {
    nn.Hardsigmoid: HardSigmoidDD,
    nn.Hardswish: HardSwishDD,
}


def _device_types(model: nn.Module) -> list[str]:
    types = {p.device.type for p in model.parameters()} | {"cpu"}
    if torch.cuda.is_available():
        types.add("cuda")
    return sorted(types)


@contextlib.contextmanager
def _swap_activations(model: nn.Module) -> Iterator[int]:
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and type(child) in _DD_REPLACEMENTS:
                    parent._modules[name] = _DD_REPLACEMENTS[type(child)]()
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, original in reversed(swapped):
            parent._modules[name] = original  # the exact original object (hooks, attributes kept)


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[bool]:
    """Switch HF models from sdpa/flash/flex attention to eager; restore every config afterwards."""
    configs: dict[int, tuple[Any, Any]] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs.setdefault(id(config), (config, config._attn_implementation_internal))
            for sub_key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, sub_key, None)
                if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                    configs.setdefault(id(sub), (sub, sub._attn_implementation_internal))
    changed = False
    try:
        for module in model.modules():
            config = getattr(module, "config", None)
            setter = getattr(module, "set_attn_implementation", None)
            impl = getattr(config, "_attn_implementation", None) if config is not None else None
            if setter is None or impl in (None, "eager"):
                continue
            try:
                setter("eager")
                changed = True
            except Exception as err:  # an unusual model: the math-SDPA context still covers sdpa
                logger.warning(
                    "hessian_safe: could not switch %s to eager attention (%s); relying on the math SDPA backend",
                    type(module).__name__,
                    err,
                )
        yield changed
    finally:
        for config, value in configs.values():
            config._attn_implementation_internal = value


@contextlib.contextmanager
def hessian_safe(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which double backward through ``model`` works; restores the model on exit.

    Inside the context:

    * ``model.eval()`` (no dropout, BatchNorm uses and keeps its running statistics); the previous
      ``training`` flag of every submodule is restored afterwards;
    * ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: the fused CPU/flash SDPA kernels have no
      double backward, the math one has;
    * timm attention modules get ``fused_attn = False`` (explicit softmax attention);
    * HF models whose ``config._attn_implementation`` is not eager are switched to eager with
      ``set_attn_implementation`` (every config's value is restored afterwards);
    * ``nn.Hardsigmoid`` / ``nn.Hardswish`` modules are replaced by pure-PyTorch equivalents (the exact
      original module objects are put back afterwards);
    * autocast is disabled (CPU and CUDA) so the pass runs in the parameters' dtype.

    Activations called functionally (``F.hardsigmoid`` inside a custom ``forward``) cannot be
    swapped; such a model raises "derivative for aten::hardsigmoid_backward is not implemented".
    """
    flags = [(m, m.training) for m in model.modules()]
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    with contextlib.ExitStack() as stack:
        try:
            model.eval()
            for module, _ in fused:
                module.fused_attn = False
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(_eager_attention(model))
            stack.enter_context(_swap_activations(model))
            for device_type in _device_types(model):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield model
        finally:
            for module, value in fused:
                module.fused_attn = value
            for module, value in flags:
                module.training = value


__all__ = ["HardSigmoidDD", "HardSwishDD", "hessian_safe"]
