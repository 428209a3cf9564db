"""Shared machinery of the cost benchmarks: model cases, training-step builders, interleaved timing
and per-process peak-memory measurement.

Methods: ``float``, ``msq`` (fake quantization + fused LSB regularizer on every layer, the most
expensive MSQ phase), and the baselines ``bsq``, ``csq``, ``dorefa`` from ``msq_hf.baselines``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    """One benchmark workload: a timm architecture at a given input size and batch."""

    name: str
    arch: str
    kwargs: dict = field(default_factory=dict)
    batch: int = 64
    img: int = 32
    classes: int = 10


CASES: dict[str, Case] = {
    "resnet20": Case("ResNet-20 (32 px, batch 128)", "resnet20_cifar", {}, 128),
    "resnet18": Case("ResNet-18 (32 px, batch 64)", "resnet18", {}, 64),
    "deit_tiny": Case(
        "DeiT-tiny (patch 4, 32 px, batch 32)", "deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32
    ),
}

METHODS = ("float", "msq", "bsq", "csq", "dorefa")


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of trainable scalars (what the optimizer holds state for)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(case: Case, method: str, seed: int = 0) -> tuple[torch.nn.Module, Callable[[], None]]:
    """Model and a ``step()`` closure running one SGD training step of ``method`` on fixed data."""
    import timm

    import msq_hf
    from msq_hf.convert import iter_msq_layers

    if case.arch.endswith("_cifar"):
        import msq_hf.models  # noqa: F401  (registers resnet20_cifar with timm)

    torch.manual_seed(seed)
    model = timm.create_model(case.arch, pretrained=False, num_classes=case.classes, **case.kwargs)
    regularizer: Callable[[], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    strength = 1e-6
    if method == "msq":
        msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
        layers = [m for _, m in iter_msq_layers(model)]
        for layer in layers:
            layer.set_bits(8, k=1)

        def regularizer() -> torch.Tensor:
            return torch.stack([m.pop_regularization() for m in layers]).sum()
    elif method in ("bsq", "csq"):
        from msq_hf import baselines

        module = getattr(baselines, method)
        module.convert(model, init_bits=8)

        def regularizer() -> torch.Tensor:
            return module.regularization(model)

        if method == "bsq":

            def after_step() -> None:
                module.clamp_bits_(model)
    elif method == "dorefa":
        from msq_hf.baselines import dorefa

        dorefa.convert(model, init_bits=2)
    elif method != "float":
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, 3, case.img, case.img, generator=gen)
    y = torch.randint(0, case.classes, (case.batch,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if regularizer is not None:
            loss = loss + strength * regularizer()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()

    return model, step


def interleaved_times(
    runners: dict[str, Callable[[], None]], rounds: int, block: int, warmup: int
) -> dict[str, list[float]]:
    """Step times (s) of several runners measured in interleaved blocks.

    Each round runs every method for ``block`` timed steps after one untimed re-warm step;
    alternating models on every single step would thrash allocator and caches, a cost no real
    training run pays.
    """
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {m: [] for m in runners}
    for _ in range(rounds):
        for method, run in runners.items():
            run()
            for _ in range(block):
                t0 = time.perf_counter()
                run()
                times[method].append(time.perf_counter() - t0)
    return times


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_memory_main(case_key: str, method: str, steps: int) -> None:
    """Child-process entry point: print peak RSS growth (MiB) over ``steps`` training steps."""
    model, step = build(CASES[case_key], method)
    base = _proc_status_kib("VmRSS")
    for _ in range(steps):
        step()
    print(
        json.dumps(
            {"peak_growth_mib": (_proc_status_kib("VmHWM") - base) / 1024, "trainable": trainable_parameters(model)}
        )
    )


def peak_memory_mib(case_key: str, method: str, steps: int = 3) -> float:
    """Peak resident-memory growth of ``steps`` training steps, measured in a fresh process.

    Growth over the RSS just before the first step: activations, gradients, optimizer state and
    temporaries -- the memory training adds to a loaded model.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from harness import child_memory_main; "
        f"child_memory_main({case_key!r}, {method!r}, {steps:d})"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]
