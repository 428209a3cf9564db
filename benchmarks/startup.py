"""Startup time of ``import msq_hf`` and ``msq-hf ... --help``, beside ``import torch`` measured in the same run.

Each case is a fresh ``python`` process, timed from spawn to exit. The cases run in interleaved rounds (one of
each per round), so a machine whose load changes over the run slows every case alike; the table reports the
median of ``--repeats`` rounds, and each case's ratio to ``import torch``. The goal (issue 13) is
``msq-hf --help`` and each subcommand's ``--help`` <= 1 s; ``train --help`` builds its flags from the torch-free
declarations (``msq_hf.params``) with ``transformers.hf_argparser``, see docs/cli.md, "Startup time".

Usage::

    python benchmarks/startup.py
    python benchmarks/startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import transformers.hf_argparser": ["-c", "import transformers.hf_argparser"],
    "import transformers.utils.quantization_config": ["-c", "import transformers.utils.quantization_config"],
    "import msq_hf": ["-c", "import msq_hf"],
    "import msq_hf; msq_hf.MSQConfig": ["-c", "import msq_hf; msq_hf.MSQConfig"],
    "msq-hf --help": ["-m", "msq_hf", "--help"],
    "msq-hf --version": ["-m", "msq_hf", "--version"],
    "msq-hf inspect --help": ["-m", "msq_hf", "inspect", "--help"],
    "msq-hf export --help": ["-m", "msq_hf", "export", "--help"],
    "msq-hf report --help": ["-m", "msq_hf", "report", "--help"],
    "msq-hf train --help": ["-m", "msq_hf", "train", "--help"],
    # what `import msq_hf` cost before it was lazy: every public name loaded
    "import msq_hf + all public names": ["-c", "import msq_hf; [getattr(msq_hf, n) for n in msq_hf.__all__]"],
}
REFERENCE = "import torch"
GOAL_SECONDS = 1.0
GOAL_CASES = (
    "msq-hf --help",
    "msq-hf inspect --help",
    "msq-hf export --help",
    "msq-hf report --help",
    "msq-hf train --help",
)


def seconds(args: list[str]) -> float:
    """Wall time of ``python <args>`` (output discarded); raises if the process fails."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, case in CASES.items():
            times[name].append(seconds(case))
    median = {name: statistics.median(values) for name, values in times.items()}
    ref = median[REFERENCE]
    print(f"median of {args.repeats} interleaved rounds, fresh process each")
    print(f"{'case':<45} {'seconds':>8} {'/ import torch':>15}  goal")
    for name, value in median.items():
        goal = ""
        if name in GOAL_CASES:
            goal = f"{'met' if value <= GOAL_SECONDS else 'MISSED'} (<= {GOAL_SECONDS:g} s)"
        print(f"{name:<45} {value:>8.2f} {value / ref:>15.2f}  {goal}")
    return 0 if all(median[name] <= GOAL_SECONDS for name in GOAL_CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
