"""Shared machinery of the benchmarks: the one conversion path of every method (with one activation-quantizer
declaration, :class:`ActQuant`), model cases, training-step builders, interleaved timing and per-process
peak-memory measurement.

Methods: ``float``, ``msq`` (fake quantization + fused LSB regularizer on every layer, the most
expensive MSQ phase), and the baselines ``bsq``, ``csq``, ``dorefa`` from ``msq_hf.baselines``.

Every benchmark converts its models through :func:`convert_model`, so MSQ and the baselines get exactly the same
activation quantizer (class, bits, which layers) from one :class:`ActQuant`; :func:`check_act_quantizers` verifies
the converted model against the declaration and :func:`act_signature` is what the result files record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msq_hf.nn.act import MAX_ACT_BITS, MIN_ACT_BITS, make_act_quantizer  # noqa: E402
from msq_hf.params import PARAMS  # noqa: E402
from msq_hf.quant.functional import check_bits  # noqa: E402
from msq_hf.report.accounting import Accounting, method_accounting  # noqa: E402

# The MSQ regularizer settings before issue 14 (code units, fixed lambda, no warm-up, no sensitivity averaging, no
# BatchNorm re-estimation): what produced the recorded MSQ rows of the accuracy and ablation benchmarks.
PREVIOUS_REGULARIZER: dict[str, Any] = {
    "lsb_units": "code",
    "reg_control": "fixed",
    "reg_strength": 1e-5,
    "warmup_fraction": 0.0,
    "hessian_ema": 0.0,
    "bn_recalibration": False,
}


def field_choices(name: str) -> tuple[str, ...]:
    """The values MSQConfig's field ``name`` accepts (its ``Literal``), so a flag's choices follow the config."""
    return typing.get_args(PARAMS[name].type)


#: the MSQConfig fields with a choice flag (``--lsb-update`` ...) and what each sets
CHOICE_FLAGS = {
    "lsb_update": "how the LSB regularizer moves the weights",
    "lsb_units": "units of the LSB pull",
    "qat_scale": "each layer's scale once the bit scheme is final",
    "qat_grid": "the levels of the learned step's grid",
    "learned_step_init": "where the learned step starts",
    "prune_order": "which layers prune first when only some may",
    "lsb_pull": "each layer's share of the LSB pull",
}


def add_regularizer_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """``--reg-strength``, ``--previous-regularizer`` (see :data:`PREVIOUS_REGULARIZER`) and a flag per field of
    :data:`CHOICE_FLAGS`."""
    parser.add_argument("--reg-strength", type=float, default=None, help="lambda (default: MSQConfig's)")
    parser.add_argument(
        "--previous-regularizer",
        action="store_true",
        help="the MSQ regularizer before issue 14, which produced the recorded MSQ rows (PREVIOUS_REGULARIZER)",
    )
    for name, what in CHOICE_FLAGS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            choices=field_choices(name),
            default=None,
            help=f"{what} (MSQConfig.{name}; default: MSQConfig's)",
        )


def regularizer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The MSQConfig regularizer fields chosen by :func:`add_regularizer_arguments`'s flags."""
    settings = dict(PREVIOUS_REGULARIZER) if args.previous_regularizer else {}
    if args.reg_strength is not None:
        settings["reg_strength"] = args.reg_strength
    for name in CHOICE_FLAGS:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    return settings


ACT_KINDS = ("pact", "lsq", "auto")


@dataclass(frozen=True)
class ActQuant:
    """The one activation-quantizer declaration of a comparison: every method converts with it.

    ``bits=None`` keeps activations float. ``quantizer`` is a kind of :func:`msq_hf.nn.act.make_act_quantizer`
    (``"pact"``, ``"lsq"``, or ``"auto"``: LSQ in front of Linear layers, PACT in front of convolutions). The default
    is ``"pact"``, the baselines' own quantizer; MSQConfig's default ``"auto"`` would give a CNN's classifier LSQ.
    ``skip_first`` leaves the input of the first quantized layer (the image) float.
    """

    bits: int | None = None
    quantizer: str = "pact"
    skip_first: bool = True

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_bits(self.bits, "act bits", MIN_ACT_BITS, MAX_ACT_BITS)
        if self.quantizer not in ACT_KINDS:
            raise ValueError(f"act quantizer {self.quantizer!r} is not one of {ACT_KINDS}")

    def describe(self) -> str:
        """Short label for tables: ``float`` or ``pact A4 (first layer float)``."""
        if self.bits is None:
            return "float"
        return f"{self.quantizer} A{self.bits}" + (" (first layer float)" if self.skip_first else "")

    def record(self) -> dict[str, Any]:
        """The declaration as stored in a result file."""
        return {"bits": self.bits, "quantizer": self.quantizer, "skip_first": self.skip_first}

    def msq_fields(self) -> dict[str, Any]:
        """The same declaration as :class:`msq_hf.MSQConfig` fields."""
        return {"act_bits": self.bits, "act_quantizer": self.quantizer, "act_skip_first": self.skip_first}


def add_act_arguments(parser: argparse.ArgumentParser) -> None:
    """``--act-bits``, ``--act-quantizer``, ``--act-skip-first`` (one flag set for every method)."""
    g = parser.add_argument_group("activations (one declaration for every method)")
    g.add_argument("--act-bits", type=int, default=None, help="activation bits of every method (default: float)")
    g.add_argument("--act-quantizer", choices=ACT_KINDS, default="pact", help="activation quantizer of every method")
    g.add_argument(
        "--act-skip-first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the first quantized layer's input float, for every method",
    )


def act_from_args(args: argparse.Namespace) -> ActQuant:
    """The :class:`ActQuant` of parsed :func:`add_act_arguments` flags."""
    return ActQuant(args.act_bits, args.act_quantizer, args.act_skip_first)


def _quantized_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """MSQ and baseline layers in module order (the layers an activation quantizer can sit in front of)."""
    from msq_hf.baselines.common import QuantLayerBase
    from msq_hf.nn.layers import MSQLayerMixin

    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (MSQLayerMixin, QuantLayerBase)) and id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or getattr(module, "kind", None) == "linear"


def act_signature(model: torch.nn.Module) -> dict[str, tuple[str, int]]:
    """``{layer: (quantizer class, bits)}`` of every quantized layer whose input is quantized."""
    return {
        name: (type(m.act_quant).__name__, int(m.act_quant.bits))
        for name, m in _quantized_layers(model)
        if getattr(m, "act_quant", None) is not None
    }


def check_act_quantizers(model: torch.nn.Module, act: ActQuant) -> dict[str, int]:
    """Raise ``RuntimeError`` naming the layer if ``model``'s input quantizers differ from ``act``.

    Returns the count of each quantizer class (``"none"`` for float inputs), the summary a result file records.
    """
    counts: Counter[str] = Counter()
    for i, (name, module) in enumerate(_quantized_layers(model)):
        have = getattr(module, "act_quant", None)
        if act.bits is None or (i == 0 and act.skip_first):
            want = None
        else:
            want = type(make_act_quantizer(act.quantizer, act.bits, linear=_is_linear(module)))
        got = None if have is None else type(have)
        if got is not want or (have is not None and int(have.bits) != act.bits):
            raise RuntimeError(
                f"layer {name!r} quantizes its input with {have!r}, but the comparison declares {act.describe()}"
            )
        counts["none" if have is None else type(have).__name__] += 1
    return dict(counts)


def convert_model(model: torch.nn.Module, family: str, act: ActQuant, **options: Any) -> Any:
    """Convert ``model`` in place for ``family`` with the activation quantizers of ``act``; the one path of every
    benchmark. Returns the :class:`msq_hf.MSQConfig` for MSQ, else ``None``.

    ``options`` are the method's weight options: :class:`msq_hf.MSQConfig` fields for ``msq``, the ``convert``
    keywords of ``bsq``/``csq``/``dorefa`` (``init_bits``, ``bits``, ``target_bits``...). Activation options in
    ``options`` are refused: they come from ``act`` only. ``float`` stays untouched when activations are float, and
    otherwise becomes DoReFa with float weights (``bits=32``) so that it quantizes its inputs like every other method.
    """
    import msq_hf
    from msq_hf import baselines

    clash = sorted(k for k in options if k.startswith("act_"))
    if clash:
        raise ValueError(f"convert_model: {clash} must come from the ActQuant declaration, not per method")
    config = None
    if family == "float":
        if options:
            raise ValueError(f"convert_model: float takes no weight options, got {sorted(options)}")
        if act.bits is not None:
            baselines.dorefa.convert(model, bits=32, act_bits=act.bits, act_skip_first=act.skip_first)
    elif family == "msq":
        config = msq_hf.MSQConfig(**options, **act.msq_fields())
        msq_hf.quantize_model(model, config)
    elif family in baselines.METHODS:
        baselines.METHODS[family].convert(model, act_bits=act.bits, act_skip_first=act.skip_first, **options)
    else:
        raise ValueError(f"convert_model: unknown method family {family!r}")
    if family != "msq" and act.bits is not None and act.quantizer != "pact":
        # the baselines build PACT; put the declared quantizer in its place, built by the same factory as MSQ's
        for _, layer in _quantized_layers(model):
            if layer.act_quant is not None:
                layer.act_quant = make_act_quantizer(act.quantizer, act.bits, linear=_is_linear(layer))
    check_act_quantizers(model, act)
    return config


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

#: weight bits each method trains at in the cost benchmark (MSQ/BSQ/CSQ start from 8 bits, DoReFa is 2-bit)
WEIGHT_BITS: dict[str, int] = {"msq": 8, "bsq": 8, "csq": 8, "dorefa": 2}


def weight_accounting(method: str) -> Accounting:
    """Paper and stored ratio of ``method``'s weights in the cost benchmark (uniform width :data:`WEIGHT_BITS`)."""
    return method_accounting(method, WEIGHT_BITS.get(method, 32))


def accounting_table(methods: tuple[str, ...] = METHODS, act: ActQuant | None = None) -> str:
    """Markdown table: the weight precision of each method in the cost benchmark, in both accountings."""
    act = act or ActQuant()
    rows = [
        "| method | weight bits (paper) | stored bits / weight | paper ratio (magnitude bits) "
        "| stored ratio (sign counted) | activations |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for method in methods:
        acc = weight_accounting(method)
        rows.append(
            f"| {method} | {acc.magnitude_bits:g} | {acc.stored_bits:g} | {acc.paper_ratio:.2f}x "
            f"| {acc.stored_ratio:.2f}x | {act.describe()} |"
        )
    return "\n".join(rows) + "\n"


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of trainable scalars (what the optimizer holds state for)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(
    case: Case, method: str, seed: int = 0, act: ActQuant | None = None
) -> tuple[torch.nn.Module, Callable[[], None]]:
    """Model and a ``step()`` closure running one SGD training step of ``method`` on fixed data.

    Every method converts through :func:`convert_model` with the same ``act`` (default: float activations).
    """
    import timm

    from msq_hf.convert import iter_msq_layers

    if case.arch.endswith("_cifar"):
        import msq_hf.models  # noqa: F401  (registers resnet20_cifar with timm)

    torch.manual_seed(seed)
    model = timm.create_model(case.arch, pretrained=False, num_classes=case.classes, **case.kwargs)
    regularizer: Callable[[], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    strength = 1e-6
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    act = act or ActQuant()
    weights = {"init_bits": WEIGHT_BITS[method]} if method in WEIGHT_BITS else {}
    convert_model(model, method, act, **weights)
    if method == "msq":
        layers = [m for _, m in iter_msq_layers(model)]
        for layer in layers:
            layer.set_bits(WEIGHT_BITS["msq"], k=1)

        def regularizer() -> torch.Tensor:
            return torch.stack([m.pop_regularization() for m in layers]).sum()
    elif method in ("bsq", "csq"):
        from msq_hf import baselines

        module = getattr(baselines, method)

        def regularizer() -> torch.Tensor:
            return module.regularization(model)

        if method == "bsq":

            def after_step() -> None:
                module.clamp_bits_(model)

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


def proc_status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_memory_main(case_key: str, method: str, steps: int) -> None:
    """Child-process entry point: print peak RSS growth (MiB) over ``steps`` training steps."""
    model, step = build(CASES[case_key], method)
    base = proc_status_kib("VmRSS")
    for _ in range(steps):
        step()
    print(
        json.dumps(
            {"peak_growth_mib": (proc_status_kib("VmHWM") - base) / 1024, "trainable": trainable_parameters(model)}
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


if __name__ == "__main__":
    print(accounting_table())
