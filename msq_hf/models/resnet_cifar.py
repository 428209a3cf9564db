"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2) registered with timm.

``resnet20_cifar`` / ``resnet32_cifar`` / ``resnet56_cifar``: a 3x3 stem conv with 16 channels,
three stages of ``n`` BasicBlocks with widths 16/32/64 (stride 2 at the start of stages 2 and 3),
global average pooling and a linear classifier; depth = 6n + 2. Projection shortcuts (the paper's
"option B": 1x1 conv + BN) are used where the shape changes, so every weight is an ``nn.Conv2d`` or
``nn.Linear`` that MSQ can quantize (option A's zero-padding shortcut has no weights).

After ``import msq_hf.models``::

    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=3)   # 0.27M params

Only plain ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.ReLU``/``nn.Linear`` modules are used, and no
in-place ops, so the model is double-backward (HVP) friendly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["BasicBlockCifar", "ResNetCifar", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_POOL_TYPES = ("avg", "max")


class BasicBlockCifar(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN projection shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def zero_init_last(self) -> None:
        """Start the residual branch at zero (block = identity at init)."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)  # no in-place add: keeps autograd / hooks simple


class ResNetCifar(nn.Module):
    """CIFAR ResNet (6n+2 layers) with the timm classifier interface.

    Args:
        layers: blocks per stage (``(3, 3, 3)`` = ResNet-20).
        widths: channels per stage.
        num_classes: classifier outputs (0 = no classifier, ``forward`` returns pooled features).
        in_chans: input image channels.
        global_pool: ``"avg"`` or ``"max"``.
        drop_rate: dropout before the classifier.
        zero_init_last: zero the last BN gamma of every block.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            # timm passes only known keys; anything else is a user typo we should not swallow.
            raise TypeError(
                f"ResNetCifar got unexpected arguments {sorted(kwargs)}; allowed: layers, widths, "
                "num_classes, in_chans, global_pool, drop_rate, zero_init_last"
            )
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} must be non-empty and equally long")
        if global_pool not in _POOL_TYPES:
            raise ValueError(f"global_pool={global_pool!r} is not supported; allowed values: {list(_POOL_TYPES)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.grad_checkpointing = False

        stem_chs = widths[0]
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU()
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="act1")]
        in_chs, reduction = stem_chs, 1
        for idx, (depth, width) in enumerate(zip(layers, widths), start=1):
            stride = 1 if idx == 1 else 2
            reduction *= stride
            blocks = [
                BasicBlockCifar(in_chs if i == 0 else width, width, stride if i == 0 else 1) for i in range(depth)
            ]
            self.add_module(f"layer{idx}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layer{idx}"))
            in_chs = width
        self.num_stages = len(layers)
        self.num_features = self.head_hidden_size = in_chs
        self.fc: nn.Module = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=5**0.5)  # PyTorch default, explicit for clarity
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, BasicBlockCifar):
                    module.zero_init_last()

    @property
    def stages(self) -> list[nn.Sequential]:
        """The residual stages ``layer1..layerN`` in order."""
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for timm's layer-wise LR decay helpers."""
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in backward (saves memory, costs compute)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier module (or its attribute name ``"fc"``)."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialized one for ``num_classes`` (0 removes it)."""
        if global_pool is not None:
            if global_pool not in _POOL_TYPES:
                raise ValueError(f"global_pool={global_pool!r} is not supported; allowed values: {list(_POOL_TYPES)}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.conv1.weight
        self.fc = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and residual stages: ``(B, in_chans, H, W)`` → ``(B, num_features, H/4, W/4)``."""
        x = self.act1(self.bn1(self.conv1(x)))
        for stage in self.stages:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and classifier (``pre_logits=True`` returns the pooled features)."""
        x = x.mean(dim=(2, 3)) if self.global_pool == "avg" else x.amax(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:1512.03385",
        "paper_name": "Deep Residual Learning for Image Recognition",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "resnet20_cifar": _cfg(),
        "resnet32_cifar": _cfg(),
        "resnet56_cifar": _cfg(),
    }
)


def _create_resnet_cifar(variant: str, blocks_per_stage: int, pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """Build through timm so ``pretrained_cfg``, model args and ``features_only`` work as for timm models."""
    return build_model_with_cfg(
        ResNetCifar,
        variant,
        pretrained,
        layers=(blocks_per_stage,) * 3,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-20 for 32x32 inputs (3 stages x 3 BasicBlocks, 16/32/64 channels, ~0.27M params)."""
    return _create_resnet_cifar("resnet20_cifar", 3, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-32 for 32x32 inputs (3 stages x 5 BasicBlocks, ~0.47M params)."""
    return _create_resnet_cifar("resnet32_cifar", 5, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-56 for 32x32 inputs (3 stages x 9 BasicBlocks, ~0.86M params)."""
    return _create_resnet_cifar("resnet56_cifar", 9, pretrained, **kwargs)
