"""Training-step cost of MSQ against float training, for both MSQ phases: time, peak memory, saved tensors.

Runners (one model each, same data, SGD with momentum):

* ``float``          -- the float model;
* ``regularize/...`` -- MSQ before the final round: every layer at 8 bits with ``k = 1``, the fused LSB regularizer
  in the loss (``lambda * sum R``);
* ``qat/...``        -- MSQ after the final round: every ``k = 0``, the terms popped but not in the loss (what
  ``MSQController.regularization`` does then);

each MSQ phase on the paths given by ``--paths``: ``two-node`` (``recompute_weight = False``: the quantizer node,
then ``F.linear``/``F.conv2d``, which keep ``W_q`` for the backward), ``auto`` (the layers' default: one node where
the weight has at least as many elements as the layer's input) and ``one-node``
(``recompute_weight = True``: ``msq_hf.nn.quantizer.MSQWeightOp``, ``W_q`` recomputed in the backward).

Before timing, one step of every MSQ runner counts the quantizer calls: each layer must go through one fused
forward kernel (``KERNELS.forward``; ``KERNELS.op_forward`` on the one-node path, whose backward rebuilds ``W_q``
with ``KERNELS.requantize`` from the saved scale) and never through the eager fake quantizer, in both phases. The
script stops if not.

* step time: the runners take turns in interleaved blocks (``--block`` timed steps each after one untimed
  re-warm step, ``--rounds`` times); medians and ratios against float;
* peak memory: each runner in a fresh child process. An MSQ child first compiles the MSQ kernels on a small
  tensor; that one-off cost (imports of dynamo/inductor, generated code) is reported on its own
  (``compile MiB``). Then the peak-RSS mark is reset (``/proc/self/clear_refs``), and ``peak MiB`` is the growth
  of peak RSS over ``--mem-steps`` steps above the RSS before the first step: activations, gradients, optimizer
  state, saved tensors, workspaces. The goal applies to it. glibc's mmap threshold is pinned in the children
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the RSS and the peak tracks live memory;
* ``--saved``: bytes saved for the backward during one step, per module, beyond tensors that are alive anyway
  (parameters; a tensor saved twice counts once), float vs each MSQ runner (exact, from
  ``torch.autograd.graph.saved_tensors_hooks``).

Usage::

    python benchmarks/step_cost.py --rounds 3                       # ResNet-18 and DeiT-tiny
    python benchmarks/step_cost.py --rounds 3 --saved --json benchmarks/results/step_cost.json

Goals (issue 13): each MSQ phase <= 1.15x float step time on ResNet-18 (32 px, batch 64) and <= 1.10x on
DeiT-tiny (patch 4, 32 px, batch 32); peak training memory <= 1.15x float on both.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import CASES, build, interleaved_times, median_ms, proc_status_kib

from msq_hf.convert import iter_msq_layers
from msq_hf.nn.layers import msq_quantize_weight
from msq_hf.quant.kernels import KERNELS

GOALS = {"resnet18": (1.15, 1.15), "deit_tiny": (1.10, 1.15)}  # (time, memory) ratio against float
DEFAULT_GOAL = (1.15, 1.15)
STRENGTH = 1e-6  # lambda of the regularize phase (the benchmark's value since issue 2)
PHASES = ("regularize", "qat")


# the benchmark drives MSQ by hand (layers' k, the regularizer in the loss): the "nothing drives MSQ" guard is noise
logging.getLogger("msq_hf.integrations.guard").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*nothing drives MSQ")


# path -> MSQLayerMixin.recompute_weight
PATHS = {"two-node": False, "auto": "auto", "one-node": True}


def runner_names(paths: list[str]) -> list[str]:
    return ["float", *(f"{phase}/{path}" for path in paths for phase in PHASES)]


def build_runner(case_key: str, name: str, seed: int = 0) -> tuple[torch.nn.Module, Callable[[], None], list]:
    """``(model, step, msq_layers)`` of one runner (see the module docstring)."""
    case = CASES[case_key]
    if name == "float":
        model, step = build(case, "float", seed)
        return model, step, []
    phase, _, variant = name.partition("/")
    model, _ = build(case, "msq", seed)  # every layer at 8 bits, k = 1
    layers = [m for _, m in iter_msq_layers(model)]
    for layer in layers:
        layer.set_bits(8, k=1 if phase == "regularize" else 0)
        layer.recompute_weight = PATHS[variant]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)  # the data of harness.build
    x = torch.randn(case.batch, 3, case.img, case.img, generator=gen)
    y = torch.randint(0, case.classes, (case.batch,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        terms = [m.pop_regularization() for m in layers]
        if phase == "regularize":
            loss = loss + STRENGTH * torch.stack(terms).sum()
        loss.backward()
        opt.step()

    return model, step, layers


def count_kernel_calls(step: Callable[[], None], layers: list, path: str) -> dict[str, int]:
    """Run one step counting the calls of the kernels' entry points; raise unless every layer ran one fused forward
    (``forward``, or ``op_forward`` where the layer runs the one-node path, whose backward then only
    ``requantize``-s W_q from the saved scale) and none the eager fake quantizer."""
    calls = Counter()
    names = ("forward", "op_forward", "requantize", "fake_quantize")
    originals = {name: getattr(KERNELS, name) for name in names}

    def count(key: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    for name, fn in originals.items():
        setattr(KERNELS, name, count(name, fn))
    try:
        step()
    finally:
        for name in names:
            delattr(KERNELS, name)  # the class attributes again
    n = len(layers)
    one_node = calls["op_forward"]
    ok = calls["forward"] + one_node == n and calls["requantize"] == one_node and not calls["fake_quantize"]
    ok = ok and {"one-node": one_node == n, "two-node": one_node == 0}.get(path, True)
    if not ok:
        raise RuntimeError(
            f"kernel calls per step {dict(calls)}: expected one fused forward per layer ({n}) on the "
            f"{path} path, a requantize per op_forward and no fake_quantize"
        )
    return dict(calls)


# -- saved tensors ------------------------------------------------------------------------------------------


def saved_bytes(model: torch.nn.Module, step: Callable[[], None]) -> dict[str, Counter]:
    """``{module name: Counter(dtype -> bytes)}`` saved for the backward in one step, beyond parameters and
    tensors already counted (attributed to the innermost module running when the tensor was saved)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = ["(loss)"]
    hooks = []

    def enter(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: object) -> None:
            stack.append(name)

        return hook

    def leave(module: torch.nn.Module, args: object, output: object) -> None:
        stack.pop()

    for name, module in model.named_modules():
        hooks += [module.register_forward_pre_hook(enter(name or "(model)")), module.register_forward_hook(leave)]
    seen: set[int] = set()
    per: dict[str, Counter] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            per.setdefault(stack[-1], Counter())[str(t.dtype).removeprefix("torch.")] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in hooks:
            h.remove()
    return per


def saved_table(case_key: str, names: list[str]) -> tuple[str, dict]:
    """Markdown table of saved bytes per quantized layer (MB) and the totals, for each runner."""
    results = {}
    for name in names:
        model, step, _ = build_runner(case_key, name)
        step()  # warm (and compile)
        results[name] = saved_bytes(model, step)
    msq_layers = [n for n, _ in iter_msq_layers(build_runner(case_key, "qat/two-node")[0])]
    mb = lambda c: sum(c.values()) / 1e6  # noqa: E731
    rows = [f"| layer | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
    for layer in msq_layers:
        cells = [f"{mb(results[n].get(layer, Counter())):.2f}" for n in names]
        rows.append(f"| {layer} | {' | '.join(cells)} |")
    for label, pick in (("all quantized layers", msq_layers), ("whole step", None)):
        cells = []
        for n in names:
            total = Counter()
            for module, c in results[n].items():
                if pick is None or module in pick:
                    total.update(c)
            cells.append(f"{mb(total):.1f} ({', '.join(f'{k} {v / 1e6:.1f}' for k, v in sorted(total.items()))})")
        rows.append(f"| **{label}** | {' | '.join(cells)} |")
    totals = {n: sum(mb(c) for c in results[n].values()) for n in names}
    return "\n".join(rows), totals


# -- peak memory (child processes) ---------------------------------------------------------------------------


def _prime_kernels() -> None:
    # the one-off compile of the fused kernels, on a small tensor (both backward kernels)
    for k in (1, 0):
        w = torch.randn(4096, requires_grad=True)
        wq, reg = msq_quantize_weight(w, torch.tensor(8, dtype=torch.int32), torch.tensor(k, dtype=torch.int32))
        (wq.sum() + reg).backward()


def child_main(case_key: str, name: str, steps: int) -> None:
    """Child process: print the one-off compile cost and the peak RSS growth of ``steps`` steps (MiB)."""
    model, step, _ = build_runner(case_key, name)
    before = proc_status_kib("VmRSS")
    if name != "float":
        _prime_kernels()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = proc_status_kib("VmRSS")
    for _ in range(steps):
        step()
    peak = proc_status_kib("VmHWM")
    print(json.dumps({"compile_mib": (base - before) / 1024, "peak_mib": (peak - base) / 1024}))


def peak_memory(case_key: str, name: str, steps: int) -> dict[str, float]:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from step_cost import child_main; "
        f"child_main({case_key!r}, {name!r}, {steps:d})"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main ------------------------------------------------------------------------------------------------------


def verdict(ratio: float, goal: float) -> str:
    return "met" if ratio <= goal else "**missed**"


def row_cells(result: dict, name: str, t_goal: float, m_goal: float) -> list[str]:
    """Step time, ratio, goal; peak memory, ratio, goal; compile cost of one runner."""
    t_ratio = result["step_ms"][name] / result["step_ms"]["float"]
    cells = [f"{result['step_ms'][name]:.1f}", f"{t_ratio:.3f}x"]
    cells.append("" if name == "float" else f"≤ {t_goal:.2f}x {verdict(t_ratio, t_goal)}")
    mem = result["memory"].get(name)
    if mem is None:
        return cells + ["", "", "", ""]
    m_ratio = mem["peak_mib"] / result["memory"]["float"]["peak_mib"]
    cells += [f"{mem['peak_mib']:.0f}", f"{m_ratio:.3f}x"]
    if name == "float":
        return cells + ["", ""]
    return cells + [f"≤ {m_goal:.2f}x {verdict(m_ratio, m_goal)}", f"{mem['compile_mib']:.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["resnet18", "deit_tiny"], choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=5, help="timed steps per runner per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mem-steps", type=int, default=3, help="steps per memory child process")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="MSQ layer paths")
    parser.add_argument("--saved", action="store_true", help="print the saved-for-backward table per layer")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    names = runner_names(args.paths)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load}")
    results = []
    for key in args.cases:
        case = CASES[key]
        runners = {}
        for name in names:
            _, step, layers = build_runner(key, name)
            if layers:
                step()  # compile outside the count
                calls = count_kernel_calls(step, layers, name.partition("/")[2])
                print(f"{case.name} {name}: {len(layers)} layers, kernel calls in one step {calls}")
            runners[name] = step
        times = {n: median_ms(t) for n, t in interleaved_times(runners, args.rounds, args.block, args.warmup).items()}
        memory = {} if args.no_memory else {n: peak_memory(key, n, args.mem_steps) for n in names}
        saved = saved_table(key, names) if args.saved else None
        load = os.getloadavg()[0]
        results.append(
            {"key": key, "case": case.name, "threads": torch.get_num_threads(), "load_1min": load}
            | {"step_ms": times, "memory": memory, "saved_mb": saved}
        )

    print(f"\nMSQ kernels: {KERNELS.state} (MSQ_HF_COMPILE={os.environ.get('MSQ_HF_COMPILE', 'auto')})\n")
    print("| model | runner | step (ms) | vs float | time goal | peak (MiB) | vs float | memory goal | compile (MiB) |")
    print("|---|---|---:|---:|---|---:|---:|---|---:|")
    for r in results:
        t_goal, m_goal = GOALS.get(r["key"], DEFAULT_GOAL)
        for name in names:
            print("| " + " | ".join([r["case"], name, *row_cells(r, name, t_goal, m_goal)]) + " |")
    for r in results:
        if r["saved_mb"]:
            table, totals = r["saved_mb"]
            print(f"\nSaved for backward, {r['case']} (MB = 1e6 bytes, beyond parameters):\n\n{table}")
            r["saved_mb"] = totals
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
