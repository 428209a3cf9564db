"""Model definitions shipped with msq_hf, registered with timm on import.

``import msq_hf.models`` makes ``timm.create_model("resnet20_cifar" | "resnet32_cifar" |
"resnet56_cifar", num_classes=..., in_chans=...)`` available.
"""

from __future__ import annotations

from msq_hf.models.resnet_cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BasicBlockCifar,
    ResNetCifar,
    resnet20_cifar,
    resnet32_cifar,
    resnet56_cifar,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BasicBlockCifar",
    "ResNetCifar",
    "resnet20_cifar",
    "resnet32_cifar",
    "resnet56_cifar",
]
