"""Training-step cost of MSQ (fake quantization + fused LSB regularizer) against float training.

Measured side by side in one run on CPU:

* step time: float and MSQ run in interleaved blocks (``--block`` timed steps of each, repeated
  ``--rounds`` times, one untimed re-warm step per block); the table reports medians and ratios;
* peak memory: each configuration runs in a fresh child process and reports the growth of its
  peak resident set (``VmHWM``) over the resident set just before its first step.

Usage::

    python benchmarks/step_cost.py                       # ResNet-18 and DeiT-tiny
    python benchmarks/step_cost.py --rounds 6 --json step_cost.json

Goals (issue #2): MSQ <= 1.30x float on ResNet-18 (32 px, batch 64) and <= 1.10x on DeiT-tiny
(patch 4, 32 px, batch 32).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from harness import CASES, build, interleaved_times, median_ms, peak_memory_mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["resnet18", "deit_tiny"], choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mem-steps", type=int, default=3, help="steps per memory child process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from msq_hf.quant.kernels import KERNELS

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    results = []
    for key in args.cases:
        case = CASES[key]
        runners = {m: build(case, m)[1] for m in ("float", "msq")}
        times = interleaved_times(runners, args.rounds, args.block, args.warmup)
        t_float, t_msq = median_ms(times["float"]), median_ms(times["msq"])
        m_float, m_msq = (peak_memory_mib(key, m, args.mem_steps) for m in ("float", "msq"))
        results.append(
            {
                "case": case.name,
                "float_step_ms": t_float,
                "msq_step_ms": t_msq,
                "time_ratio": t_msq / t_float,
                "float_peak_mib": m_float,
                "msq_peak_mib": m_msq,
                "memory_ratio": m_msq / m_float,
            }
        )
    print(f"\nMSQ kernels: {KERNELS.state} (MSQ_HF_COMPILE={os.environ.get('MSQ_HF_COMPILE', 'auto')})")
    print("| model | float step (ms) | MSQ step (ms) | time ratio | float peak (MiB) | MSQ peak (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['float_step_ms']:.1f} | {r['msq_step_ms']:.1f} | {r['time_ratio']:.3f}x | "
            f"{r['float_peak_mib']:.0f} | {r['msq_peak_mib']:.0f} | {r['memory_ratio']:.3f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
