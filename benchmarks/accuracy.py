"""Accuracy vs compression of MSQ and its baselines: ResNet-20 on Fashion-MNIST, one shared training loop.

Every method trains ``resnet20_cifar`` (1 input channel, 32 px: Fashion-MNIST padded 28->32) with the same
data subset, epochs, optimizer (SGD, momentum 0.9, cosine learning rate, weight decay) and seeds. Methods:

=================  ==========================================================================================
``float``          plain float training (float weights; with ``--act-bits`` the same activation quantizers)
``dorefa2/3/4``    uniform 2-/3-/4-bit DoReFa weights (16x / 10.7x / 8x: 2, 3, 4 stored bits)
``bsq``            BSQ bit planes from 8 bits, bit-level group Lasso, re-quantize + prune planes every epoch
                   of the regularization phase, then fine-tuning at the fixed scheme
``csq``            CSQ relaxed bits + masks from 8 bits, budget target 2 bits, temperature 1 -> 200,
                   hard masks (ticket phase) for the last epoch
``msq16``          MSQ (``MSQController``) to 16x with Hessian-guided k; ``msq16_nohess`` with k = 1
``msq10.7``        MSQ to 32/3 = 10.67x; ``msq10.7_nohess`` likewise without Hessian guidance
``msq*_stored``    MSQ whose target counts the sign bit (``count_sign_bit``): ``msq16_stored`` stores 2 bits per
                   weight like ``dorefa2``, ``msq10.7_stored`` 3 bits like ``dorefa3``
``lsq2/3``         uniform 2-/3-bit LSQ weights (learned step per layer); ``lsq3`` stores what ``msq16`` stores
``msq8_fixed``     MSQ's layers at 8 bits with nothing driving them (no regularizer, no pruning): the quantized
                   training MSQ starts from, to separate what its grid costs from what the search costs
=================  ==========================================================================================

Accounting: an MSQ (and BSQ/CSQ) layer of n bits stores sign + n magnitude bits; a DoReFa n-bit layer stores n.
Every table shows the paper's ratio (magnitude bits) beside the stored ratio (sign counted) and the stored bits per
weight (:func:`msq_hf.report.accounting.method_accounting`), and ``--summary`` also pairs each MSQ run with the
methods that store the same number of bits per weight (:func:`pair_equal_stored_bits`).

Activations: one declaration (``--act-bits``, ``--act-quantizer``, ``--act-skip-first``; default float) drives every
method through :func:`harness.convert_model`, which checks the converted model against it; each result file records
the declaration and the quantizers really installed.

Schedule and clipping: the loop does not clip gradients by default (``--max-grad-norm 1`` clips task + regularizer
together, as ``transformers.Trainer`` does); ``--warmup-fraction``/``--target-fraction`` move MSQ's start and the
point where its pacing plan reaches the target (docs/results.md: a late start lets threshold pruning do all the
pruning in this short from-scratch budget, at a cost in accuracy).

One JSON file per (method, seed) lands in ``--results-dir`` as soon as that run finishes (and a
``.partial`` progress file after every epoch), so an interrupted suite keeps what it measured.

Usage (from the repository root)::

    python benchmarks/accuracy.py --jobs 2                              # the whole suite
    python benchmarks/accuracy.py --methods float msq16 --epochs 1 --train-limit 2000   # quick check
    python benchmarks/accuracy.py --summary                              # tables of the stored results
    python benchmarks/accuracy.py --storage-table                        # what each method stores per weight
    python benchmarks/plot_results.py                                    # plots from the stored results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAJECTORY_PLOT = ROOT / "docs" / "img" / "resnet20_trajectories.png"
SEED_DIFFERENCE_PLOT = ROOT / "docs" / "img" / "resnet20_seed_differences.png"
#: issue 14's from-scratch goal: MSQ at 16x at most this many points below float (drawn in the seed plot)
GOAL_POINTS = 0.5
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    ActQuant,
    act_from_args,
    add_act_arguments,
    add_regularizer_arguments,
    check_act_quantizers,
    convert_model,
    regularizer_settings,
)

from msq_hf.report.accounting import (  # noqa: E402
    Accounting,
    format_ratio,
    method_accounting,
    storage_reference_table,
)
from msq_hf.training.pacing import final_round_step, pruning_share, target_average_bits  # noqa: E402

DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "accuracy"


@dataclass(frozen=True)
class MethodSpec:
    """One entry of the method table: the family, its quantization target and its title in the tables."""

    family: str  # float | dorefa | lsq | bsq | csq | msq
    title: str = ""
    bits: int | None = None  # DoReFa weight bits; MSQ without a target: the fixed bits of its grid
    target: float | None = None  # MSQ target compression (None: the grid at ``bits``, no search)
    hessian: bool = True  # MSQ Hessian-guided k
    count_sign_bit: bool = False  # MSQ: the target is a stored ratio (sign counted), not the paper ratio


METHODS: dict[str, MethodSpec] = {
    "float": MethodSpec("float", "float"),
    "msq16": MethodSpec("msq", "MSQ 16x, Hessian k", target=16.0, hessian=True),
    "dorefa2": MethodSpec("dorefa", "DoReFa 2-bit", bits=2),
    "msq16_nohess": MethodSpec("msq", "MSQ 16x, k = 1", target=16.0, hessian=False),
    "msq10.7": MethodSpec("msq", "MSQ 10.7x, Hessian k", target=32.0 / 3.0, hessian=True),
    "msq10.7_nohess": MethodSpec("msq", "MSQ 10.7x, k = 1", target=32.0 / 3.0, hessian=False),
    "dorefa3": MethodSpec("dorefa", "DoReFa 3-bit", bits=3),
    "csq": MethodSpec("csq", "CSQ, target 2 bits"),
    "bsq": MethodSpec("bsq", "BSQ, decay 0.5"),
    "dorefa4": MethodSpec("dorefa", "DoReFa 4-bit", bits=4),
    "msq16_stored": MethodSpec("msq", "MSQ 16x stored, Hessian k", target=16.0, count_sign_bit=True),
    "msq10.7_stored": MethodSpec("msq", "MSQ 10.7x stored, Hessian k", target=32.0 / 3.0, count_sign_bit=True),
    "msq8_fixed": MethodSpec("msq", "MSQ's grid at 8 bits, no search", bits=8),
    "lsq3": MethodSpec("lsq", "LSQ 3-bit", bits=3),
    "lsq2": MethodSpec("lsq", "LSQ 2-bit", bits=2),
}
"""Run order of the suite: the headline runs (float, MSQ 16x, DoReFa 2-bit) first, so a suite cut short
still answers the main question; then the equal-stored-bits partners (DoReFa 4-bit for MSQ 10.7x, MSQ with a
stored-ratio target for DoReFa 2/3-bit); last MSQ's grid without a search and uniform LSQ (added in issue 14's
seventh session)."""
#: the families that train every layer at one width (``bits`` of their MethodSpec)
UNIFORM_FAMILIES = ("dorefa", "lsq")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"methods to run (default: all): {', '.join(METHODS)}",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (model init, data order, probes)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-limit", type=int, default=10000, help="class-stratified training subset (0 = all 60k)")
    p.add_argument("--test-limit", type=int, default=5000, help="class-stratified test subset (0 = all 10k)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the subset selection (same for every run)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="clip the total gradient (task + regularizer) to this norm, as transformers.Trainer does by default "
        "(max_grad_norm=1.0); 0 = no clipping",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs executed in parallel processes")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--skip-done", action="store_true", help="skip (method, seed) runs whose JSON already exists")
    p.add_argument("--summary", action="store_true", help="only print the tables of the stored results")
    p.add_argument(
        "--storage-table", action="store_true", help="only print what each method stores per weight (both ratios)"
    )
    p.add_argument(
        "--pair-tolerance",
        type=float,
        default=0.25,
        help="--summary: largest stored-bits gap (bits per weight) of an equal-stored-bits pair",
    )
    p.add_argument(
        "--float-dir",
        type=Path,
        nargs="+",
        default=None,
        help="--summary: float runs of the per-seed MSQ table from these results directories (default: "
        "--results-dir), e.g. when MSQ variants with the same method name are kept in directories of their own",
    )
    p.add_argument(
        "--trajectories",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="only draw seed 0's pruning trajectory of the MSQ runs in each results directory (one panel per run) "
        f"into --plot-out (default {TRAJECTORY_PLOT.relative_to(ROOT)})",
    )
    p.add_argument(
        "--seed-differences",
        nargs="+",
        default=None,
        metavar="DIR",
        help="only plot each non-float run's per-seed accuracy minus float's (same seed and number of steps, from "
        "--float-dir) into --plot-out (default "
        f"{SEED_DIFFERENCE_PLOT.relative_to(ROOT)}); DIR+DIR joins directories into one series",
    )
    p.add_argument("--plot-out", type=Path, default=None, help="--trajectories / --seed-differences: the image written")
    add_act_arguments(p)
    # MSQ
    g = p.add_argument_group("MSQ")
    add_regularizer_arguments(g)
    g.add_argument("--init-bits", type=int, default=8, help="MSQ's starting precision (MSQConfig.init_bits)")
    g.add_argument("--prune-threshold", type=float, default=0.3)
    g.add_argument("--prune-interval", type=int, default=10)
    g.add_argument("--final-round-fraction", type=float, default=0.65)
    g.add_argument(
        "--warmup-fraction", type=float, default=None, help="start of the regularizer (default: MSQConfig's)"
    )
    g.add_argument(
        "--target-fraction", type=float, default=None, help="where the pacing plan reaches the target (MSQConfig's)"
    )
    g.add_argument("--hessian-max-probes", type=int, default=2)
    g.add_argument("--hessian-batch-size", type=int, default=32)
    # baselines
    g = p.add_argument_group("baselines")
    g.add_argument(
        "--bsq-decay",
        type=float,
        default=0.5,
        help="BSQ group-Lasso strength (its --decay); 0.5 because the run is ~1%% of BSQ's 350 epochs",
    )
    g.add_argument(
        "--bsq-threshold", type=float, default=0.05, help="BSQ plane-pruning threshold, a fraction (its --thre / 100)"
    )
    g.add_argument("--csq-lambda", type=float, default=0.01, help="CSQ budget-regularizer strength")
    g.add_argument("--csq-target-bits", type=float, default=2.0)
    g.add_argument(
        "--reg-fraction",
        type=float,
        default=0.65,
        help="BSQ/CSQ: fraction of the epochs spent regularizing/searching before fine-tuning",
    )
    return p


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def load_tensors(split: str, limit: int, seed: int) -> tuple[Any, Any]:
    """Fashion-MNIST ``split`` as ``(pixel_values [N,1,32,32] float32, labels [N] int64)`` tensors."""
    import torch

    from msq_hf.data import load_fashion_mnist

    ds = load_fashion_mnist(split, limit=limit or None, image_size=32, channels=1, seed=seed)
    cols = ds[: len(ds)]  # a torch-formatted slice stacks each column into one tensor
    x = torch.as_tensor(cols["pixel_values"]).float().contiguous()
    y = torch.as_tensor(cols["labels"]).long()
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"Fashion-MNIST {split}: expected pixel_values [N, 1, 32, 32], got {tuple(x.shape)}")
    return x, y


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------


class Method:
    """Hooks of one quantization method inside the shared loop (the default is float training)."""

    name = "float"

    family = "float"

    learning_rate: float | None = None  # the loop's learning rate of the last step (set by the loop)

    def __init__(self, model: Any, args: argparse.Namespace, total_steps: int, steps_per_epoch: int):
        self.model, self.args = model, args
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.act = act_from_args(args)

    def convert(self, **options: Any) -> Any:
        """Convert the model for this method through the shared path (same activation quantizers for all)."""
        return convert_model(self.model, self.family, self.act, **options)

    def start(self, batch: tuple[Any, Any]) -> None:
        """Called once before the first step (MSQ's initial k assignment)."""

    def regularization(self) -> Any:
        """Term added to the task loss of the current training forward."""
        return None

    def after_step(self, global_step: int, batch: tuple[Any, Any]) -> bool:
        """Called after every optimizer step; True means parameter shapes changed (re-create the optimizer)."""
        return False

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch."""

    def on_epoch_end(self, epoch: int) -> bool:
        """Called after each epoch; True means parameter shapes changed."""
        return False

    def summary(self) -> dict[str, Any]:
        """``compression`` (paper ratio), ``avg_bits``, ``bit_scheme``, ``numels`` (and extras) after training."""
        return {"compression": 1.0, "avg_bits": 32.0, "bit_scheme": None, "numels": None}


def _weights_summary(family: str, scheme: dict[str, int], numels: dict[str, int], **extra: Any) -> dict[str, Any]:
    """The bit fields of a result record, both accountings from the one function."""
    acc = method_accounting(family, scheme, numels)
    return {
        "compression": acc.paper_ratio,
        "avg_bits": acc.magnitude_bits,
        "bit_scheme": scheme,
        "numels": numels,
        **extra,
    }


class Uniform(Method):
    """A uniform baseline at ``bits`` for every layer: DoReFa, or LSQ (its step learned with the weights, by the
    same optimizer and weight decay)."""

    def __init__(
        self, family: str, model: Any, args: argparse.Namespace, total_steps: int, steps_per_epoch: int, bits: int
    ):
        super().__init__(model, args, total_steps, steps_per_epoch)
        from msq_hf import baselines

        self.family = family
        self.mod = baselines.METHODS[family]
        self.convert(bits=bits)

    def summary(self) -> dict[str, Any]:
        layers = getattr(self.mod, f"{self.family}_layers")(self.model)  # dorefa_layers / lsq_layers
        return _weights_summary(
            self.family, self.mod.bit_scheme(self.model), {n: int(m.numel) for n, m in layers.items()}
        )


class BSQ(Method):
    """BSQ: group Lasso + per-epoch re-quantization/plane pruning during the first ``reg_fraction`` epochs."""

    family = "bsq"

    def __init__(self, model: Any, args: argparse.Namespace, total_steps: int, steps_per_epoch: int):
        super().__init__(model, args, total_steps, steps_per_epoch)
        from msq_hf.baselines import bsq

        self.mod = bsq
        self.convert(init_bits=8)
        self.reg_epochs = max(1, round(args.reg_fraction * args.epochs))
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def regularization(self) -> Any:
        if self.epoch >= self.reg_epochs:
            return None
        return self.args.bsq_decay * self.mod.regularization(self.model)

    def after_step(self, global_step: int, batch: tuple[Any, Any]) -> bool:
        self.mod.clamp_bits_(self.model)
        return False

    def on_epoch_end(self, epoch: int) -> bool:
        if epoch >= self.reg_epochs:
            return False
        # BSQ re-quantizes every Prun_Int epochs; a few-epoch run needs it every epoch of the search
        scheme = self.mod.requantize_and_adjust(self.model, threshold=self.args.bsq_threshold)
        self.history.append({"epoch": epoch + 1, "bits": scheme, "compression": self.mod.compression_ratio(self.model)})
        return True

    def summary(self) -> dict[str, Any]:
        layers = self.mod.bsq_layers(self.model)
        numels = {n: int(m.numel) for n, m in layers.items()}
        return _weights_summary("bsq", self.mod.bit_scheme(self.model), numels, bsq_history=self.history)


class CSQ(Method):
    """CSQ: temperature 1 -> 200 over the search, hard masks (ticket) for the remaining epochs."""

    family = "csq"

    def __init__(self, model: Any, args: argparse.Namespace, total_steps: int, steps_per_epoch: int):
        super().__init__(model, args, total_steps, steps_per_epoch)
        from msq_hf.baselines import csq

        self.mod = csq
        self.convert(init_bits=8, target_bits=args.csq_target_bits)
        self.ticket_epoch = max(1, round(args.reg_fraction * args.epochs))
        self.epoch = 0
        self.scheme_at_ticket: dict[str, int] | None = None

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        if epoch >= self.ticket_epoch and self.scheme_at_ticket is None:
            self.scheme_at_ticket = self.mod.finalize_masks(self.model)

    def _set_temperature(self, global_step: int) -> None:
        # CSQ's per-epoch schedule beta = 200^(e/ticket), evaluated per step: with a handful of epochs the
        # per-epoch jumps would be 3x each
        epoch = global_step / self.steps_per_epoch
        self.mod.set_temperature(self.model, self.mod.temperature_schedule(epoch, self.ticket_epoch))

    def start(self, batch: tuple[Any, Any]) -> None:
        self._set_temperature(0)

    def regularization(self) -> Any:
        if self.epoch >= self.ticket_epoch:
            return None
        return self.args.csq_lambda * self.mod.regularization(self.model)

    def after_step(self, global_step: int, batch: tuple[Any, Any]) -> bool:
        self._set_temperature(global_step)
        return False

    def summary(self) -> dict[str, Any]:
        layers = self.mod.csq_layers(self.model)
        numels = {n: int(m.numel) for n, m in layers.items()}
        return _weights_summary(
            "csq", self.mod.bit_scheme(self.model), numels, csq_code_average_bits=self.mod.average_bits(self.model)
        )


class FixedGrid(Method):
    """MSQ's layers at fixed bits with nothing driving them: the quantized training MSQ starts from.

    No regularizer, no pruning: the difference to float of this run is what MSQ's grid alone costs (or the
    trajectory it sends training on), before any bit is pruned.
    """

    family = "msq"

    def __init__(self, model: Any, args: argparse.Namespace, total_steps: int, steps_per_epoch: int, bits: int):
        super().__init__(model, args, total_steps, steps_per_epoch)
        self.convert(init_bits=bits)

    def summary(self) -> dict[str, Any]:
        from msq_hf.convert import bit_scheme, msq_layers

        numels = {name: int(layer.weight.numel()) for name, layer in msq_layers(self.model).items()}
        return _weights_summary("msq", bit_scheme(self.model), numels)


class MSQ(Method):
    """MSQ through :class:`msq_hf.MSQController` (regularize + prune, final round, then QAT)."""

    family = "msq"

    def __init__(
        self,
        model: Any,
        args: argparse.Namespace,
        total_steps: int,
        steps_per_epoch: int,
        target: float,
        hessian: bool,
        seed: int,
        count_sign_bit: bool = False,
    ):
        super().__init__(model, args, total_steps, steps_per_epoch)
        from msq_hf.training.controller import MSQController

        self.config = self.convert(
            init_bits=args.init_bits,
            target_compression=target,
            count_sign_bit=count_sign_bit,
            **regularizer_settings(args),
            prune_threshold=args.prune_threshold,
            prune_interval=args.prune_interval,
            final_round_fraction=args.final_round_fraction,
            **{
                field: getattr(args, field)
                for field in ("warmup_fraction", "target_fraction")
                if getattr(args, field) is not None
            },
            hessian_guided=hessian,
            hessian_max_probes=args.hessian_max_probes,
            hessian_batch_size=args.hessian_batch_size,
        )
        self.ctl = MSQController(model, self.config, total_steps=total_steps, seed=seed)

    def regularization(self) -> Any:
        return self.ctl.regularization()

    def after_step(self, global_step: int, batch: tuple[Any, Any]) -> bool:
        # the learning rate bounds lambda's pull (pacing.pull_limit) only where no clipping rescales that pull
        self.ctl.proximal_step(self.learning_rate)  # lsb_update="proximal" only
        self.ctl.learning_rate = self.learning_rate if self.args.max_grad_norm <= 0 or self.ctl.proximal else None
        self.ctl.maybe_step(global_step, batch)  # also starts MSQ once the config's warm-up is over
        return False

    def summary(self) -> dict[str, Any]:
        acc = method_accounting("msq", dict(self.ctl.bits), dict(self.ctl.numels), self.config.wnorm)
        return {
            "compression": acc.paper_ratio,  # the paper ratio, whatever accounting the target used
            "avg_bits": acc.magnitude_bits,
            "bit_scheme": self.ctl.bits,
            "msq_config": self.config.to_dict(),
            "msq_history": self.ctl.history,
            "final_round_step": self.ctl.final_round_step,
            "numels": dict(self.ctl.numels),
        }


def make_method(
    name: str, model: Any, args: argparse.Namespace, total_steps: int, steps_per_epoch: int, seed: int
) -> Method:
    """Convert ``model`` in place for method ``name`` and return its hooks."""
    spec = METHODS[name]
    if spec.family == "float":
        hooks = Method(model, args, total_steps, steps_per_epoch)
        hooks.convert()  # float weights; the declared activation quantizers when --act-bits is set
        return hooks
    if spec.family in UNIFORM_FAMILIES:
        return Uniform(spec.family, model, args, total_steps, steps_per_epoch, int(spec.bits))
    if spec.family == "bsq":
        return BSQ(model, args, total_steps, steps_per_epoch)
    if spec.family == "csq":
        return CSQ(model, args, total_steps, steps_per_epoch)
    if spec.family == "msq" and spec.target is None:
        return FixedGrid(model, args, total_steps, steps_per_epoch, int(spec.bits))
    if spec.family == "msq":
        return MSQ(
            model, args, total_steps, steps_per_epoch, float(spec.target), spec.hessian, seed, spec.count_sign_bit
        )
    raise ValueError(f"method {name!r} has unknown family {spec.family!r}")


def evaluate(model: Any, x: Any, y: Any, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train()
    return 100.0 * correct / len(y)


def result_path(results_dir: Path, method: str, seed: int) -> Path:
    return results_dir / f"{method}_seed{seed}.json"


def run_one(method: str, seed: int, args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train ``method`` with ``seed`` in this process; write and return its result record."""
    import timm
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    import msq_hf.models  # noqa: F401  (registers resnet20_cifar with timm)

    torch.set_num_threads(args.threads)
    t_start = time.time()
    x_train, y_train = load_tensors("train", args.train_limit, args.data_seed)
    x_test, y_test = load_tensors("test", args.test_limit, args.data_seed)

    torch.manual_seed(seed)
    model = timm.create_model("resnet20_cifar", pretrained=False, num_classes=10, in_chans=1)
    steps_per_epoch = len(y_train) // args.batch_size  # drop the last partial batch: equal steps
    total_steps = steps_per_epoch * args.epochs
    hooks = make_method(method, model, args, total_steps, steps_per_epoch, seed)
    act_installed = check_act_quantizers(model, hooks.act)  # what really sits in front of each layer
    model.train()

    def make_optimizer() -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    def lr_at(step: int) -> float:
        # cosine decay per step, set by hand so it survives BSQ's optimizer re-creation
        return 0.5 * args.lr * (1.0 + math.cos(math.pi * step / total_steps))

    opt = make_optimizer()
    gen = torch.Generator().manual_seed(seed)
    out = result_path(args.results_dir, method, seed)
    partial = out.with_suffix(".partial.json")
    record: dict[str, Any] = {
        "method": method,
        "family": METHODS[method].family,
        "seed": seed,
        "command": command,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("methods", "seeds", "jobs", "summary", "skip_done")
        },
        "train_images": int(len(y_train)),
        "test_images": int(len(y_test)),
        "steps": total_steps,
        "act": {**hooks.act.record(), "installed": act_installed},
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": machine_description(),
        "epochs_log": [],
    }
    step = 0
    bar = tqdm(total=total_steps, desc=f"{method}/s{seed}", mininterval=5.0, dynamic_ncols=True)
    for epoch in range(args.epochs):
        hooks.on_epoch_start(epoch)
        order = torch.randperm(len(y_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            batch = (x_train[idx], y_train[idx])
            if step == 0:
                hooks.start(batch)
            hooks.learning_rate = lr_at(step)
            for group in opt.param_groups:
                group["lr"] = hooks.learning_rate
            logits = model(batch[0])
            loss = F.cross_entropy(logits, batch[1])
            reg = hooks.regularization()
            total = loss if reg is None else loss + reg
            opt.zero_grad(set_to_none=True)
            total.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            step += 1
            if hooks.after_step(step, batch):
                opt = make_optimizer()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == batch[1]).sum())
            seen += len(idx)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", **extra_postfix(hooks))
        if hooks.on_epoch_end(epoch):
            opt = make_optimizer()
        record["epochs_log"].append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_acc": 100.0 * correct / seen,
                "wall_s": time.time() - t_start,
                **extra_postfix(hooks),
            }
        )
        partial.write_text(json.dumps(record, indent=1))
    bar.close()
    record["accuracy"] = evaluate(model, x_test, y_test)
    record.update(hooks.summary())
    acc = record_accounting(record)
    record["accounting"] = {
        "paper_ratio": acc.paper_ratio,
        "stored_ratio": acc.stored_ratio,
        "stored_bits": acc.stored_bits,
        "magnitude_bits": acc.magnitude_bits,
    }
    record["wall_s"] = time.time() - t_start
    out.write_text(json.dumps(record, indent=1))
    partial.unlink(missing_ok=True)
    print(
        f"{method} seed {seed}: accuracy {record['accuracy']:.2f}%, paper ratio {format_ratio(acc.paper_ratio)}, "
        f"stored ratio {format_ratio(acc.stored_ratio)} ({acc.stored_bits:.2f} stored bits/weight), "
        f"wall {record['wall_s']:.0f} s -> {out}",
        flush=True,
    )
    return record


def extra_postfix(hooks: Method) -> dict[str, str]:
    """Progress-bar extras: current compression of MSQ / BSQ / CSQ."""
    if isinstance(hooks, MSQ):
        return {"comp": f"{hooks.ctl.compression:.2f}", "phase": hooks.ctl.phase}
    if isinstance(hooks, BSQ):
        return {"comp": f"{hooks.mod.compression_ratio(hooks.model):.2f}"}
    if isinstance(hooks, CSQ):
        return {"comp": f"{hooks.mod.compression_ratio(hooks.model):.2f}"}
    return {}


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


# ------------------------------------------------------------------------------------------------
# suite driver
# ------------------------------------------------------------------------------------------------


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every finished run record in ``results_dir`` (partial files excluded)."""
    if not results_dir.is_dir():
        return []
    records = []
    for path in sorted(results_dir.glob("*.json")):
        if path.name.endswith(".partial.json"):
            continue
        records.append(json.loads(path.read_text()))
    order = list(METHODS)
    return sorted(records, key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["seed"]))


def record_act(record: dict[str, Any]) -> tuple[str, bool]:
    """``(activation label, recorded?)`` of a result record.

    Records written before the ``--act-*`` flags existed hold no ``act`` entry; the benchmark then had no activation
    quantization at all, so they read as float (``recorded`` False, flagged in the tables).
    """
    act = record.get("act")
    if act is None:
        if "act_bits" in (record.get("settings") or {}):
            raise ValueError(f"{record['method']} seed {record['seed']}: the act flags were set but not recorded")
        return ActQuant().describe(), False
    return ActQuant(act.get("bits"), act.get("quantizer", "pact"), act.get("skip_first", True)).describe(), True


def record_accounting(record: dict[str, Any], numels: dict[str, int] | None = None) -> Accounting:
    """Paper and stored ratio of one result record, recomputed from its bit scheme and layer sizes.

    ``numels`` stands in for a record that lacks its own (DoReFa/BSQ/CSQ records before the accounting change; the
    model is the same in every run). The recomputed paper ratio must match the record's ``compression``.
    """
    family = record["family"]
    if family == "float":
        return method_accounting("float", 32)
    scheme = record.get("bit_scheme") or {}
    sizes = record.get("numels") or numels
    wnorm = (record.get("msq_config") or {}).get("wnorm")
    acc = method_accounting(family, scheme, sizes, wnorm)
    stored = record.get("compression")
    if stored is not None and not math.isclose(acc.paper_ratio, stored, rel_tol=1e-6):
        raise ValueError(
            f"{record['method']} seed {record['seed']}: recomputed paper ratio {acc.paper_ratio:.4f}x differs from the "
            f"recorded {stored:.4f}x (wrong layer sizes?)"
        )
    return acc


def shared_numels(records: list[dict[str, Any]]) -> dict[str, int] | None:
    """Layer sizes of the benchmark model, from the first record that has them."""
    return next((dict(r["numels"]) for r in records if r.get("numels")), None)


@dataclass
class MethodRow:
    """One method of the summary: means over its seeds, both accountings, the activation quantizer."""

    method: str
    family: str
    title: str
    seeds: list[int]
    accuracies: list[float]
    act: str
    act_recorded: bool
    accounting: Accounting
    wall_min: float
    vs_float: float | None = None

    @property
    def accuracy(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)


def method_rows(records: list[dict[str, Any]]) -> list[MethodRow]:
    """One :class:`MethodRow` per method (seed means), "vs float" against float on the same seeds."""
    import statistics

    numels = shared_numels(records)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    float_by_seed = {r["seed"]: r["accuracy"] for r in by.get("float", [])}
    rows = []
    for method, rs in by.items():
        accts = [record_accounting(r, numels) for r in rs]
        acts = {record_act(r) for r in rs}
        if len(acts) > 1:
            raise ValueError(f"{method}: its seeds used different activation quantizers {sorted(acts)}")
        (act, recorded), seeds = acts.pop(), [r["seed"] for r in rs]
        spec = METHODS.get(method)
        row = MethodRow(
            method=method,
            family=rs[0]["family"],
            title=(spec.title if spec else method) + ("" if method == "float" else f" (`{method}`)"),
            seeds=seeds,
            accuracies=[r["accuracy"] for r in rs],
            act=act,
            act_recorded=recorded,
            accounting=Accounting(
                family=rs[0]["family"],
                magnitude_bits=statistics.mean(a.magnitude_bits for a in accts),
                stored_bits=statistics.mean(a.stored_bits for a in accts),
                paper_ratio=statistics.mean(a.paper_ratio for a in accts),
                stored_ratio=statistics.mean(a.stored_ratio for a in accts),
            ),
            wall_min=statistics.mean(r["wall_s"] for r in rs) / 60,
        )
        if method != "float" and all(s in float_by_seed for s in seeds):
            row.vs_float = row.accuracy - statistics.mean(float_by_seed[s] for s in seeds)
        rows.append(row)
    return rows


def _accuracy_cell(row: MethodRow) -> str:
    import statistics

    if len(row.accuracies) == 1:
        return f"{row.accuracy:.2f}"
    spread = statistics.stdev(row.accuracies)
    return f"{row.accuracy:.2f} ± {spread:.2f} (" + ", ".join(f"{a:.2f}" for a in row.accuracies) + ")"


def _act_cell(row: MethodRow) -> str:
    return row.act if row.act_recorded else f"{row.act} ¹"


def summary_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of every method: accuracy over seeds, both ratios, stored bits, activations, wall time."""
    rows = method_rows(records)
    lines = [
        "| method | seeds | activations | accuracy (%) | vs float (pt) | paper ratio (magnitude bits) "
        "| stored ratio (sign counted) | stored bits / weight | bits (paper) | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        a = row.accounting
        delta = "–" if row.vs_float is None else f"{row.vs_float:+.2f}"
        lines.append(
            f"| {row.title} | {len(row.seeds)} | {_act_cell(row)} | {_accuracy_cell(row)} | {delta} "
            f"| {format_ratio(a.paper_ratio)} | {format_ratio(a.stored_ratio)} | {a.stored_bits:.2f} "
            f"| {a.magnitude_bits:.2f} | {row.wall_min:.1f} |"
        )
    if any(not row.act_recorded for row in rows):
        lines += [
            "",
            "¹ not recorded: the run predates the `--act-*` flags, when the benchmark had no activation quantization.",
        ]
    return "\n".join(lines)


def pacing_table(records: list[dict[str, Any]], float_records: list[dict[str, Any]] | None = None) -> str:
    """Markdown table, one row per MSQ run: accuracy against float on the same seed, both ratios, and who pruned.

    "threshold share" is the part of the bit reduction done by threshold steps (:func:`pacing.pruning_share`); the
    final-round step is when the target was reached (by threshold or by the forced round); the λ range is what the
    pacing feedback did. Float comes from ``float_records`` (default: ``records``); a mean row closes each seed list.
    """
    import statistics

    numels = shared_numels(records)
    float_by_seed = {
        r["seed"]: r["accuracy"]
        for r in (records if float_records is None else float_records)
        if r["family"] == "float"
    }
    lines = [
        "| method | seed | accuracy (%) | float, same seed (%) | vs float (pt) | paper / stored ratio "
        "| threshold share | final round at step | forced-round layers | λ range |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("msq_history"):
            by.setdefault(r["method"], []).append(r)
    for method, rs in by.items():
        deltas = []
        for r in rs:
            history = r["msq_history"]
            acct = record_accounting(r, numels)
            share = pruning_share(history, r.get("numels") or numels)
            lam = [float(e["reg_strength"]) for e in history if e.get("reg_strength") is not None]
            ref = float_by_seed.get(r["seed"])
            delta = None if ref is None else r["accuracy"] - ref
            if delta is not None:
                deltas.append(delta)
            lines.append(
                f"| `{method}` | {r['seed']} | {r['accuracy']:.2f} | {'–' if ref is None else f'{ref:.2f}'} "
                f"| {'–' if delta is None else f'{delta:+.2f}'} "
                f"| {format_ratio(acct.paper_ratio)} / {format_ratio(acct.stored_ratio)} "
                f"| {100 * share['threshold_share']:.0f} % | {final_round_step(history) or '–'} "
                f"| {share['forced_layers']:.0f} | {f'{min(lam):.2g}–{max(lam):.2g}' if lam else '–'} |"
            )
        if len(rs) > 1:
            accs = [r["accuracy"] for r in rs]
            mean_delta = "**–**"
            if len(deltas) == len(rs):  # the mean paired difference and its standard error
                se = statistics.stdev(deltas) / len(deltas) ** 0.5
                mean_delta = f"**{statistics.mean(deltas):+.2f}** (paired SE {se:.2f})"
            lines.append(
                f"| **`{method}`, mean** | | **{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}** | "
                f"| {mean_delta} | | | | | |"
            )
    return "\n".join(lines)


def pair_equal_stored_bits(
    rows: list[MethodRow], tolerance: float = 0.25, anchor_family: str = "msq"
) -> list[tuple[MethodRow, list[MethodRow]]]:
    """Each ``anchor_family`` row with the other quantized methods that store the same bits per weight.

    Partners are the rows of other families (float excluded) whose stored bits per weight are within
    ``tolerance`` of the anchor's, nearest first: an MSQ run at ``b - 1`` magnitude bits + sign pairs with a
    uniform ``b``-bit DoReFa/LSQ run, not with the ``b - 1``-bit one its paper ratio matches.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0")
    candidates = [r for r in rows if r.family not in (anchor_family, "float")]
    pairs = []
    for anchor in (r for r in rows if r.family == anchor_family):
        near = [
            r for r in candidates if abs(r.accounting.stored_bits - anchor.accounting.stored_bits) <= tolerance + 1e-9
        ]
        near.sort(key=lambda r: abs(r.accounting.stored_bits - anchor.accounting.stored_bits))
        pairs.append((anchor, near))
    return pairs


def _uniform_partner(stored_bits: float) -> str:
    """The uniform run an unpaired MSQ row needs, as a ``--methods`` name when the table has one."""
    width = round(stored_bits)
    name = next((m for m, s in METHODS.items() if s.family in UNIFORM_FAMILIES and s.bits == width), None)
    return f"`--methods {name}`" if name else f"a uniform {width}-bit run"


def _seeds(row: MethodRow) -> str:
    return f"{len(row.seeds)} seed" + ("s" if len(row.seeds) > 1 else "")


def pairing_table(records: list[dict[str, Any]], tolerance: float = 0.25) -> str:
    """Markdown table: every MSQ run beside the methods that store the same bits per weight (same activations)."""
    rows = method_rows(records)
    lines = [
        "| MSQ run | stored bits / weight | paper / stored ratio | accuracy (%) | partner at equal stored bits "
        "| partner stored bits / weight | partner paper / stored ratio | partner accuracy (%) | MSQ − partner (pt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for anchor, partners in pair_equal_stored_bits(rows, tolerance):
        a = anchor.accounting
        head = (
            f"| {anchor.title} | {a.stored_bits:.2f} | {format_ratio(a.paper_ratio)} / {format_ratio(a.stored_ratio)} "
            f"| {anchor.accuracy:.2f} ({_seeds(anchor)}) |"
        )
        if not partners:
            lines.append(head + f" none run: needs {_uniform_partner(a.stored_bits)} | | | | |")
        for p in partners:
            if p.act != anchor.act:
                raise ValueError(f"{anchor.method} and {p.method} used different activations ({anchor.act}, {p.act})")
            b = p.accounting
            lines.append(
                head + f" {p.title} | {b.stored_bits:.2f} | {format_ratio(b.paper_ratio)} / "
                f"{format_ratio(b.stored_ratio)} | {p.accuracy:.2f} ({_seeds(p)}) "
                f"| {anchor.accuracy - p.accuracy:+.2f} |"
            )
    return "\n".join(lines)


def child_command(method: str, seed: int, argv: list[str]) -> list[str]:
    """Command line running one (method, seed) of this suite in a child process."""
    keep: list[str] = []
    skip = False
    for _i, tok in enumerate(argv):
        if skip:
            if tok.startswith("--"):
                skip = False
            else:
                continue
        if tok in ("--methods", "--seeds"):
            skip = True
            continue
        if tok.startswith("--jobs"):
            if tok == "--jobs":
                skip = True
            continue
        keep.append(tok)
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        *keep,
        "--methods",
        method,
        "--seeds",
        str(seed),
        "--jobs",
        "1",
    ]


def plot_trajectories(dirs: list[Path], path: Path = TRAJECTORY_PLOT) -> Path:
    """Seed 0's average-bits trajectory of every MSQ run in ``dirs`` (threshold dots, the forced round's cross,
    the run's own target)."""
    from msq_hf.report import plot_pruning_trajectories

    runs, targets = {}, {}
    for results_dir in dirs:
        for r in load_results(results_dir):
            if r["seed"] == 0 and r.get("msq_history"):
                steps = r.get("steps")
                label = f"{results_dir.name}: {r['method']}, seed 0" + (f", {steps} steps" if steps else "")
                runs[label] = r["msq_history"]
                config = r["msq_config"]
                targets[label] = target_average_bits(config["target_compression"], config.get("count_sign_bit", False))
    if not runs:
        raise SystemExit(f"no MSQ run of seed 0 in {[str(d) for d in dirs]}")
    return plot_pruning_trajectories(runs, path, target_bits=targets)


def seed_differences(groups: list[str], float_records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``{"<dir>: <method>, <steps> steps": {seed: accuracy - float's}}`` for every non-float run.

    Each group is a results directory, or several joined by ``+`` whose runs form one series (seeds 0-2 in one
    directory, 3-4 in another), named after the first. A run is compared with the float run of the same seed and
    number of training steps; a run without one is an error that names it (a difference to another budget's float
    would mean nothing), and so is a seed found twice in one series.
    """
    floats = {(r["seed"], r["steps"]): r["accuracy"] for r in float_records if r["method"] == "float"}
    series: dict[str, dict[int, float]] = {}
    for group in groups:
        dirs = [Path(d) for d in group.split("+")]
        for results_dir in dirs:
            for r in sorted(load_results(results_dir), key=lambda r: r["seed"]):
                if r["method"] == "float":
                    continue
                name = results_dir / f"{r['method']}_seed{r['seed']}.json"
                key = (r["seed"], r["steps"])
                if key not in floats:
                    raise SystemExit(f"{name}: no float run of seed {key[0]} with {key[1]} steps in --float-dir")
                label = f"{dirs[0].name}: {r['method']}, {r['steps']} steps"
                if r["seed"] in series.get(label, {}):
                    raise SystemExit(f"{name}: seed {r['seed']} of {label!r} is already in another directory")
                series.setdefault(label, {})[r["seed"]] = r["accuracy"] - floats[key]
    if not series:
        raise SystemExit(f"no non-float run in {groups}")
    return series


def print_summary(args: argparse.Namespace) -> None:
    """The summary, equal-stored-bits and (when MSQ runs are present) pacing tables of ``args.results_dir``."""
    records = load_results(args.results_dir)
    print(summary_table(records))
    print(f"\nEqual stored bits (within {args.pair_tolerance:g} bit per weight):\n")
    print(pairing_table(records, args.pair_tolerance))
    if any(r.get("msq_history") for r in records):
        float_records = None if args.float_dir is None else [r for d in args.float_dir for r in load_results(d)]
        print("\nMSQ runs, per seed (who pruned, and how far from float):\n")
        print(pacing_table(records, float_records))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.storage_table:
        print(storage_reference_table(), end="")
        return 0
    if args.summary:
        print_summary(args)
        return 0
    if args.trajectories:
        print(f"wrote {plot_trajectories(args.trajectories, args.plot_out or TRAJECTORY_PLOT)}")
        return 0
    if args.seed_differences:
        from msq_hf.report import plot_seed_differences

        if args.float_dir is None:
            raise SystemExit("--seed-differences needs --float-dir: the float runs each seed is compared with")
        floats = [r for d in args.float_dir for r in load_results(d)]
        series = seed_differences(args.seed_differences, floats)
        print(f"wrote {plot_seed_differences(series, args.plot_out or SEED_DIFFERENCE_PLOT, goal=GOAL_POINTS)}")
        return 0
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit(f"--jobs ({args.jobs}) and --threads ({args.threads}) must be >= 1")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    runs = [(m, s) for s in args.seeds for m in args.methods]
    if args.skip_done:
        runs = [(m, s) for m, s in runs if not result_path(args.results_dir, m, s).exists()]
    command = "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in argv)
    t0 = time.time()
    if args.jobs == 1 or len(runs) <= 1:
        for method, seed in runs:
            run_one(method, seed, args, command)
    else:
        # one process per run: separate interpreters, so two runs really use two cores
        logs = args.results_dir / "logs"
        logs.mkdir(exist_ok=True)
        pending = list(runs)
        active: list[tuple[str, int, subprocess.Popen, Any]] = []
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        failures = []
        while pending or active:
            while pending and len(active) < args.jobs:
                method, seed = pending.pop(0)
                log = open(logs / f"{method}_seed{seed}.log", "w")  # noqa: SIM115 -- closed when the child exits
                proc = subprocess.Popen(
                    child_command(method, seed, argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)
                )
                print(
                    f"[{time.time() - t0:6.0f} s] started {method} seed {seed} (pid {proc.pid}, log {log.name})",
                    flush=True,
                )
                active.append((method, seed, proc, log))
            time.sleep(2.0)
            for item in list(active):
                method, seed, proc, log = item
                if proc.poll() is not None:
                    log.close()
                    active.remove(item)
                    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                    if proc.returncode != 0:
                        failures.append((method, seed))
                    print(f"[{time.time() - t0:6.0f} s] {status}: {method} seed {seed}", flush=True)
        if failures:
            print(f"failed runs: {failures}; see {logs}", file=sys.stderr)
    print(f"\nsuite wall time {(time.time() - t0) / 60:.1f} min\n")
    print_summary(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
