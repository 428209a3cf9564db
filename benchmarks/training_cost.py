"""Training cost of MSQ against float training and the baselines BSQ, CSQ and DoReFa.

For each case (ResNet-20 32 px batch 128, ResNet-18 32 px batch 64, DeiT-tiny patch 4 32 px batch 32)
and each method it measures, in one run:

* **trainable parameters**: scalars the optimizer holds state for (BSQ/CSQ train relaxed bit planes);
* **step time**: median of one full training step (forward, backward, regularizer, optimizer step;
  BSQ also clamps its planes) with every method of a case timed in interleaved blocks
  (``--block`` timed steps each, ``--rounds`` times), so machine-load drift hits all methods alike;
* **peak memory**: growth of the peak resident set over ``--mem-steps`` steps in a fresh child process
  (CPU), or ``torch.cuda.max_memory_allocated`` on CUDA;
* on CUDA only, the **largest batch** whose training step fits in ``--memory-budget-mib``.

MSQ runs in its most expensive phase (fake quantization plus the fused LSB regularizer on every layer,
``k = 1``); DoReFa is 2-bit weights; BSQ and CSQ start from 8 bits, like MSQ.

Usage (from ``benchmarks/``)::

    python training_cost.py                                   # all cases, all methods
    python training_cost.py --cases resnet20 --rounds 2 --block 3 --json cost.json
    python training_cost.py --methods float msq --no-memory   # quick

Goals (issue "Baselines and evidence"): MSQ trainable parameters == float; MSQ step <= 1.15x float on
ResNet-20; BSQ and CSQ steps >= 3x MSQ's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import CASES, METHODS, Case, build, interleaved_times, median_ms, peak_memory_mib, trainable_parameters

# ------------------------------------------------------------------------------------------------
# CUDA: step on a device and the largest batch under a memory budget
# ------------------------------------------------------------------------------------------------


def device_step(
    model: torch.nn.Module, method: str, batch: int, case: Case, device: torch.device
) -> Callable[[], None]:
    """A training-step closure of ``model`` (already converted by ``harness.build``) on ``device``.

    Same rules as the harness step: SGD with momentum, task loss plus ``1e-6`` times the method's
    regularizer, BSQ plane clamping after the step.
    """
    from msq_hf.convert import iter_msq_layers

    model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, case.img, case.img, device=device)
    y = torch.randint(0, case.classes, (batch,), device=device)
    regularizer: Callable[[], torch.Tensor] | None = None
    after: Callable[[], None] | None = None
    if method == "msq":
        layers = [m for _, m in iter_msq_layers(model)]

        def regularizer() -> torch.Tensor:
            return torch.stack([m.pop_regularization() for m in layers]).sum()
    elif method in ("bsq", "csq"):
        from msq_hf import baselines

        module = getattr(baselines, method)

        def regularizer() -> torch.Tensor:
            return module.regularization(model)

        if method == "bsq":

            def after() -> None:
                module.clamp_bits_(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if regularizer is not None:
            loss = loss + 1e-6 * regularizer()
        loss.backward()
        opt.step()
        if after is not None:
            after()

    return step


def cuda_peak_mib(case_key: str, method: str, batch: int, steps: int = 2) -> float:
    """Peak CUDA memory (MiB) of ``steps`` training steps at ``batch``; raises ``torch.cuda.OutOfMemoryError``."""
    case = dataclasses.replace(CASES[case_key], batch=batch)
    device = torch.device("cuda")
    model, _ = build(case, method)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step = device_step(model, method, batch, case, device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    finally:
        del model
        torch.cuda.empty_cache()


def largest_batch(case_key: str, method: str, budget_mib: float, cap: int = 8192) -> int:
    """Largest batch (power-of-two search, then bisection) whose training step peaks under ``budget_mib`` on CUDA."""

    def fits(batch: int) -> bool:
        try:
            return cuda_peak_mib(case_key, method, batch) <= budget_mib
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        return lo
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def cuda_step_ms(runners: dict[str, Callable[[], None]], rounds: int, block: int, warmup: int) -> dict[str, float]:
    """Median step times on CUDA (synchronized around each timed step)."""

    def synced(run: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            run()
            torch.cuda.synchronize()

        return wrapped

    times = interleaved_times({m: synced(r) for m, r in runners.items()}, rounds, block, warmup)
    return {m: median_ms(t) for m, t in times.items()}


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------


def measure_case(key: str, methods: list[str], args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """All measurements of one case; ``{"case", "methods": {method: {...}}}``."""
    case = CASES[key]
    rows: dict[str, dict[str, Any]] = {m: {} for m in methods}
    runners: dict[str, Callable[[], None]] = {}
    for method in methods:
        model, step = build(case, method)
        rows[method]["trainable_params"] = trainable_parameters(model)
        if cuda:
            step = device_step(model, method, case.batch, case, torch.device("cuda"))
        runners[method] = step
    if cuda:
        medians = cuda_step_ms(runners, args.rounds, args.block, args.warmup)
    else:
        times = interleaved_times(runners, args.rounds, args.block, args.warmup)
        medians = {m: median_ms(t) for m, t in times.items()}
        for method in methods:
            rows[method]["step_samples"] = len(times[method])
    for method in methods:
        rows[method]["step_ms"] = medians[method]
    del runners
    if not args.no_memory:
        for method in methods:
            rows[method]["peak_mib"] = (
                cuda_peak_mib(key, method, case.batch) if cuda else peak_memory_mib(key, method, args.mem_steps)
            )
    if cuda and args.memory_budget_mib:
        for method in methods:
            rows[method]["largest_batch"] = largest_batch(key, method, args.memory_budget_mib)
    for method in methods:
        for ref in ("float", "msq"):
            if ref in rows and ref != method:
                rows[method][f"time_vs_{ref}"] = rows[method]["step_ms"] / rows[ref]["step_ms"]
                rows[method][f"params_vs_{ref}"] = rows[method]["trainable_params"] / rows[ref]["trainable_params"]
                if "peak_mib" in rows[method] and rows[ref].get("peak_mib"):
                    rows[method][f"memory_vs_{ref}"] = rows[method]["peak_mib"] / rows[ref]["peak_mib"]
    return {"case": case.name, "key": key, "batch": case.batch, "methods": rows}


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "–"


def markdown(results: list[dict[str, Any]], cuda: bool) -> str:
    """One markdown table per case."""
    out = []
    for res in results:
        rows = res["methods"]
        extra = " | largest batch" if cuda and any("largest_batch" in r for r in rows.values()) else ""
        out.append(f"\n**{res['case']}**\n")
        out.append(
            "| method | trainable params | params vs float | step (ms) | vs float | vs MSQ | peak memory (MiB) "
            f"| memory vs float{extra} |"
        )
        out.append("|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
        for method, r in rows.items():
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "–"
            line = (
                f"| {method} | {r['trainable_params']:,} | {_ratio(r, 'params_vs_float')} | {r['step_ms']:.1f} | "
                f"{_ratio(r, 'time_vs_float')} | {_ratio(r, 'time_vs_msq')} | {peak} | "
                f"{_ratio(r, 'memory_vs_float')} |"
            )
            if extra:
                line += f" {r.get('largest_batch', '–')} |"
            out.append(line)
    return "\n".join(out)


def goals(results: list[dict[str, Any]]) -> list[str]:
    """Goal checks of the issue, as printable lines (only for what was measured)."""
    lines = []
    for res in results:
        rows = res["methods"]
        if "float" in rows and "msq" in rows:
            same = rows["msq"]["trainable_params"] == rows["float"]["trainable_params"]
            lines.append(
                f"{res['key']}: MSQ trainable params == float: {'MET' if same else 'MISSED'} "
                f"({rows['msq']['trainable_params']:,} vs {rows['float']['trainable_params']:,})"
            )
            if res["key"] == "resnet20":
                r = rows["msq"]["time_vs_float"]
                lines.append(f"{res['key']}: MSQ step <= 1.15x float: {'MET' if r <= 1.15 else 'MISSED'} ({r:.2f}x)")
        if "msq" in rows:
            for b in ("bsq", "csq"):
                if b in rows:
                    r = rows[b]["time_vs_msq"]
                    lines.append(
                        f"{res['key']}: {b.upper()} step >= 3x MSQ: {'MET' if r >= 3 else 'MISSED'} ({r:.2f}x)"
                    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=3, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps per memory child process")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--memory-budget-mib",
        type=float,
        default=None,
        help="CUDA only: also find the largest batch whose step fits this budget",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.block < 1:
        parser.error(f"--rounds ({args.rounds}) and --block ({args.block}) must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.memory_budget_mib and not cuda:
        print("note: --memory-budget-mib needs CUDA; skipping the largest-batch search on CPU")
    # float first: ratios are taken against it
    methods = sorted(dict.fromkeys(args.methods), key=list(METHODS).index)

    from msq_hf.quant.kernels import KERNELS

    header = (
        f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(header, flush=True)
    results = []
    for key in args.cases:
        res = measure_case(key, methods, args, cuda)
        results.append(res)
        print(markdown([res], cuda), flush=True)
    print(f"\nMSQ kernels: {KERNELS.state} (MSQ_HF_COMPILE={os.environ.get('MSQ_HF_COMPILE', 'auto')})")
    print(markdown(results, cuda))
    print()
    for line in goals(results):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": header,
                    "settings": vars(args) | {"json": str(args.json)},
                    "results": results,
                    "goals": goals(results),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
