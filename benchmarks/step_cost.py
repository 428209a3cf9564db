"""Training-step cost of MSQ (fake quantization + fused LSB regularizer) against float training.

Measured side by side in one run on CPU:

* step time: float and MSQ run in interleaved blocks (``--block`` steps of float, then of MSQ,
  repeated ``--rounds`` times) so machine noise hits both alike; the first step of each block is
  discarded (alternating models every single step thrashes the allocator and the caches, a cost no
  real training run pays); the table reports medians and their ratio;
* peak memory: each configuration runs in a fresh child process and reports the growth of its
  peak resident set (``VmHWM``) over the resident set measured just before its first step.

Usage::

    python benchmarks/step_cost.py                 # ResNet-18 (32 px, batch 64) and DeiT-tiny (patch 4, 32 px, batch 32)
    python benchmarks/step_cost.py --rounds 6 --block 5 --json out.json

Goals (issue #2): MSQ <= 1.30x float on ResNet-18 and <= 1.10x on DeiT-tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Case:
    name: str
    arch: str
    kwargs: dict
    batch: int
    img: int = 32


CASES = {
    "resnet18": Case("ResNet-18 (32 px, batch 64)", "resnet18", {"num_classes": 10}, 64),
    "deit_tiny": Case("DeiT-tiny (patch 4, 32 px, batch 32)", "deit_tiny_patch16_224",
                      {"num_classes": 10, "img_size": 32, "patch_size": 4}, 32),
}


def build(case: Case, method: str, seed: int = 0):
    """Model + optimizer + step function for ``method`` in {"float", "msq"}."""
    import timm

    import msq_hf
    from msq_hf.convert import iter_msq_layers

    torch.manual_seed(seed)
    model = timm.create_model(case.arch, pretrained=False, **case.kwargs)
    layers = []
    if method == "msq":
        msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
        layers = [m for _, m in iter_msq_layers(model)]
        for layer in layers:  # every layer regularized: the most expensive phase of MSQ
            layer.set_bits(8, k=1)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, 3, case.img, case.img, generator=gen)
    y = torch.randint(0, 10, (case.batch,), generator=gen)
    reg_strength = 1e-6

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if layers:
            loss = loss + reg_strength * torch.stack([m.pop_regularization() for m in layers]).sum()
        loss.backward()
        opt.step()

    return model, step


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(case_key: str, method: str, steps: int) -> None:
    """Child-process entry: print the peak RSS growth (MiB) of ``steps`` training steps."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    _, step = build(CASES[case_key], method)
    base = _rss_kib("VmRSS")
    for _ in range(steps):
        step()
    print(json.dumps({"peak_growth_mib": (_rss_kib("VmHWM") - base) / 1024}))


def measure_memory(case_key: str, method: str, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", case_key, method, "--mem-steps", str(steps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def measure_time(case: Case, rounds: int, block: int, warmup: int) -> dict[str, list[float]]:
    runners = {m: build(case, m)[1] for m in ("float", "msq")}
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {m: [] for m in runners}
    for _ in range(rounds):
        for method, run in runners.items():
            run()  # re-warm this model's memory after the other model ran
            for _ in range(block):
                t0 = time.perf_counter()
                run()
                times[method].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mem-steps", type=int, default=3, help="steps per memory child process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_memory(args.child[0], args.child[1], args.mem_steps)
        return 0

    results = []
    from msq_hf.kernels import KERNELS

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for key in args.cases:
        case = CASES[key]
        times = measure_time(case, args.rounds, args.block, args.warmup)
        t_float, t_msq = (statistics.median(times[m]) for m in ("float", "msq"))
        m_float, m_msq = (measure_memory(key, m, args.mem_steps) for m in ("float", "msq"))
        results.append({"case": case.name, "float_step_ms": 1e3 * t_float, "msq_step_ms": 1e3 * t_msq,
                        "time_ratio": t_msq / t_float, "float_peak_mib": m_float, "msq_peak_mib": m_msq,
                        "memory_ratio": m_msq / m_float})
    print(f"\nMSQ kernels: {KERNELS.state} (MSQ_HF_COMPILE={os.environ.get('MSQ_HF_COMPILE', 'auto')})")
    print("| model | float step (ms) | MSQ step (ms) | time ratio | float peak (MiB) | MSQ peak (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['float_step_ms']:.1f} | {r['msq_step_ms']:.1f} | {r['time_ratio']:.3f}x | "
              f"{r['float_peak_mib']:.0f} | {r['msq_peak_mib']:.0f} | {r['memory_ratio']:.3f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
