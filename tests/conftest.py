"""Shared test setup: one CPU thread, offline Hub, private HF cache, seeded RNGs, tiny model factories.

The environment variables are set at import time, before ``huggingface_hub``/``transformers`` are
imported by any test module (``HF_HUB_OFFLINE`` is read once at import).
"""

from __future__ import annotations

import os
import random
import tempfile

# -- process-wide settings (must precede the torch / transformers imports below) -----------------
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# a private, empty HF cache: no test can silently pick up a model from the developer's cache
_HF_HOME = tempfile.mkdtemp(prefix="msq_hf_tests_hf_home_")
os.environ["HF_HOME"] = _HF_HOME

from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

try:  # hypothesis is a dev dependency; keep property tests quick and reproducible
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "msq", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "msq"))
except ImportError:  # pragma: no cover
    pass


def seed_everything(seed: int = 0) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    """Every test starts from the same RNG state and a single thread."""
    seed_everything(0)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_cache() -> None:
    """Start every test module with empty torch.compile caches.

    msq_hf's compiled kernels (``MSQ_HF_COMPILE=auto``) recompile for each new weight rank, size-1
    dimension, LSB form and grad mode; with ``fullgraph=True`` the 9th recompile is a hard error. A
    single model stays below that, but the whole suite exercises far more combinations in one
    process (see ``test_layers.py::test_kernels_survive_many_layer_kinds``), so modules must not
    inherit each other's compile state.
    """
    import torch._dynamo

    torch._dynamo.reset()


# -- tiny model factories -------------------------------------------------------------------------
# Each factory builds a randomly initialised model offline (no Hub access) that accepts 32x32 RGB
# images and has 10 classes. ``forward_logits(model, x)`` hides the HF / timm call difference.

IMAGE_SIZE = 32
NUM_CLASSES = 10


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _timm_conv2d_same() -> nn.Module:
    """A small CNN whose stride-2 convs are timm ``Conv2dSame`` (TF "SAME" padding)."""
    from timm.layers import create_conv2d

    return nn.Sequential(
        create_conv2d(3, 8, 3, stride=2, padding="same"),
        nn.ReLU(),
        create_conv2d(8, 8, 3, stride=2, padding="same", depthwise=True),
        nn.ReLU(),
        create_conv2d(8, 16, 1, padding="same"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, NUM_CLASSES),
    )


def _kaiming_convs(model: nn.Module) -> nn.Module:
    """He-initialise conv weights: HF MobileNetV2's std-0.02 init shrinks activations to ~1e-22 after
    50 layers in eval mode, which would make every float-vs-quantized comparison vacuous."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return model


def _hf(
    model_cls: str, config_cls: str, post: Callable[[nn.Module], nn.Module] | None = None, **cfg
) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(num_labels=NUM_CLASSES, **cfg)
        model = getattr(transformers, model_cls)(config)
        return post(model) if post is not None else model

    return build


_VIT_KW = dict(
    image_size=IMAGE_SIZE,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)

#: name -> factory. HF models take ``pixel_values``; timm models a tensor.
TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm/test_resnet": _timm("test_resnet"),
    "timm/test_vit": _timm("test_vit", img_size=IMAGE_SIZE),
    "timm/test_efficientnet": _timm("test_efficientnet"),
    "timm/test_efficientnet_same": _timm("test_efficientnet", pad_type="same"),  # Conv2dSame inside
    "timm/test_convnext": _timm("test_convnext"),
    "timm/test_byobnet": _timm("test_byobnet"),
    "timm/test_vit_relpos": _timm("test_vit_relpos", img_size=IMAGE_SIZE),
    "timm/mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "timm/resnet18": _timm("resnet18"),
    "timm/swin_tiny": _timm(
        "swin_tiny_patch4_window7_224",
        img_size=IMAGE_SIZE,
        window_size=2,
        embed_dim=24,
        depths=(1, 1),
        num_heads=(1, 1),
    ),
    "timm/conv2d_same": _timm_conv2d_same,
    "hf/vit": _hf("ViTForImageClassification", "ViTConfig", **_VIT_KW),
    "hf/deit": _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **_VIT_KW),
    "hf/swin": _hf(
        "SwinForImageClassification",
        "SwinConfig",
        image_size=IMAGE_SIZE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
    ),
    "hf/resnet": _hf(
        "ResNetForImageClassification",
        "ResNetConfig",
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
    ),
    "hf/mobilenet_v2": _hf(
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        image_size=IMAGE_SIZE,
        depth_multiplier=0.5,
        post=_kaiming_convs,
    ),
    "hf/convnext": _hf(
        "ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]
    ),
    # built from the config alone: TimmWrapper only touches the Hub in from_pretrained
    "hf/timm_wrapper": _hf("TimmWrapperForImageClassification", "TimmWrapperConfig", architecture="test_resnet"),
}


def is_hf_model(model: nn.Module) -> bool:
    """True for transformers ``PreTrainedModel`` instances."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of an HF (``pixel_values=``) or timm/plain model."""
    if is_hf_model(model):
        return model(pixel_values=x).logits
    return model(x)


def toy_dataset(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A learnable toy task for the tiny models: ``n`` rows of ``pixel_values`` (3 x IMAGE_SIZE^2) and ``labels``,
    where the label (``i % NUM_CLASSES``) raises the mean of colour channel ``i % 3``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        x = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 0.5
        x[i % 3] += 1.0
        rows.append({"pixel_values": x, "labels": torch.tensor(i % NUM_CLASSES)})
    return rows


def toy_batch(n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` rows of :func:`toy_dataset` as one batch."""
    rows = toy_dataset(n)
    return {k: torch.stack([r[k] for r in rows]) for k in ("pixel_values", "labels")}


#: MSQConfig fields under which the first pruning step (step 4) is the forced final round of a 12-step run, so that
#: the QAT phase after it can be checked in a short hand loop
EARLY_FINAL_ROUND = dict(
    hessian_guided=False,
    target_compression=6.0,
    prune_interval=4,
    warmup_fraction=0.0,
    final_round_fraction=0.3,
    target_fraction=0.3,
)


@pytest.fixture
def tiny_model_factories() -> dict[str, Callable[[], nn.Module]]:
    """The table of tiny offline model factories."""
    return TINY_MODELS


@pytest.fixture
def images() -> torch.Tensor:
    """A fixed batch of 2 random 32x32 RGB images."""
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


FRONTS = ("msq_trainer", "plain_trainer")
"""The two ways to train with MSQ: ``MSQTrainer``, or a plain ``transformers.Trainer`` with an ``MSQCallback``."""


def trainer_for(
    front: str, model: nn.Module, config: Any, args: Any, dataset: Any, callbacks: Sequence[Any] = ()
) -> tuple[Any, Any]:
    """``(trainer, msq_callback)`` training ``model`` with MSQ ``config`` through ``front`` (one of :data:`FRONTS`);
    ``callbacks`` run after MSQ's."""
    from transformers import Trainer

    import msq_hf
    from msq_hf.training.callback import MSQCallback
    from msq_hf.training.trainer import MSQTrainer

    if front == "msq_trainer":
        trainer = MSQTrainer(model=model, args=args, train_dataset=dataset, msq_config=config, callbacks=[*callbacks])
        return trainer, trainer.msq_callback
    callback = MSQCallback(config)
    model = msq_hf.quantize_model(model, config)
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback, *callbacks]), callback
