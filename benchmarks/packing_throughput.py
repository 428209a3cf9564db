"""Throughput of ``msq_hf.quant.packing`` against safetensors writing and reading the same bytes.

For every width, ``--numel`` random codes (uint8, int16 for width 9: the dtype ``unpack_codes``
returns) are packed and unpacked, and the packed stream is written with ``save_file`` and read
back with ``load_file`` in a temporary directory. All four operations run in interleaved rounds
in the same process; the table reports the median (``--stat min``: the fastest) of ``--repeats`` rounds, with
``--threads`` torch threads (default 1: the codec goal is per core). Every rate is in MB/s
(1 MB = 1e6 bytes) of *packed* bytes, except the ``Mcodes/s`` columns (millions of codes per second: the
issue-13 goal is >= 1000, i.e. 1 GB/s of one-byte codes), so the pack/write and unpack/read ratios compare work on the
same payload; a ratio above 1 means packing is faster than safetensors I/O of its output.

safetensors' default ``load_file`` maps the file and returns before any byte is read, so the
read reference is ``load_file(..., backend="pread")``, which copies the bytes into the tensor;
the lazy mmap time is shown for information.

The last two columns answer the end-to-end question "does packing pay for itself in I/O time?":
``(pack + write packed) / write codes`` and ``(read packed + unpack) / read codes``, where the
``codes`` file holds the unpacked codes (1 byte each, 2 for width 9). Below 1 means saving (or
loading) the packed stream, packing included, is faster than saving (loading) the raw codes.

Usage::

    taskset -c 0 python benchmarks/packing_throughput.py
    python benchmarks/packing_throughput.py --numel 1000000 --repeats 5 --widths 3 9 --stat min

``--baseline`` adds the rates of the super-group kernel (the codec's kernel for widths 2..7 before the byte-field
one) from the same rounds. On a machine shared with other jobs, ``--stat min`` and ``--clock cpu`` (this thread's
CPU time, so not the time it waited for a core) estimate the uncontended cost; compare widths within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msq_hf.quant import packing  # noqa: E402
from msq_hf.quant.packing import pack_codes, packed_nbytes, unpack_codes  # noqa: E402


def _timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def _super_group_ops(codes: torch.Tensor, packed: torch.Tensor, width: int) -> dict[str, Callable[[], object]]:
    """Pack and unpack through the super-group kernel, as ``pack_codes``/``unpack_codes`` did for every width but 1
    (pack) and 8 before the byte-field kernel: the baseline of ``--baseline``."""
    numel, nbytes = codes.numel(), packed.numel()

    def pack() -> torch.Tensor:
        packing._check_range(codes, width)
        return packing._pack_super_groups(codes, width, nbytes)

    def unpack() -> torch.Tensor:
        return packing._unpack_super_groups(packed, width, numel).to(codes.dtype, copy=True)

    ops: dict[str, Callable[[], object]] = {"unpack_sg": unpack}
    if width > 1:  # width 1 has always packed with its multiply
        ops["pack_sg"] = pack
    if not torch.equal(unpack(), codes) or ("pack_sg" in ops and not torch.equal(pack(), packed)):
        raise RuntimeError(f"super-group kernel disagrees for width {width}")
    return ops


def measure(
    width: int,
    numel: int,
    repeats: int,
    directory: str,
    stat: str = "median",
    clock: str = "wall",
    baseline: bool = False,
) -> dict[str, float]:
    """Median (or min) seconds of pack, unpack, safetensors write/read (pread), lazy mmap load, and
    write/read of the unpacked codes (and, with ``baseline``, of the super-group kernel)."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(width)
    dtype = torch.uint8 if width <= 8 else torch.int16
    codes = torch.randint(0, 1 << width, (numel,), generator=gen, dtype=torch.int64).to(dtype)
    packed = pack_codes(codes, width)
    if not torch.equal(unpack_codes(packed, width, numel), codes):
        raise RuntimeError(f"round trip failed for width {width}")
    path = os.path.join(directory, f"w{width}.safetensors")
    raw_path = os.path.join(directory, f"w{width}_codes.safetensors")

    ops: dict[str, Callable[[], object]] = {
        "pack": lambda: pack_codes(codes, width),
        "unpack": lambda: unpack_codes(packed, width, numel),
        "write": lambda: save_file({"packed": packed}, path),
        "read": lambda: load_file(path, backend="pread")["packed"],
        "mmap": lambda: load_file(path)["packed"],
        "write_codes": lambda: save_file({"codes": codes}, raw_path),
        "read_codes": lambda: load_file(raw_path, backend="pread")["codes"],
    }
    if baseline and width != 8:
        ops.update(_super_group_ops(codes, packed, width))
    for fn in ops.values():  # warm-up: allocator, page cache, lazy imports
        fn()
    if not torch.equal(load_file(path, backend="pread")["packed"], packed):
        raise RuntimeError(f"safetensors read back different bytes for width {width}")
    samples: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for key, fn in ops.items():
            samples[key].append(_timed(fn, time.thread_time if clock == "cpu" else time.perf_counter))
    reduce = min if stat == "min" else statistics.median
    return {k: reduce(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=4 * 2**20, help="codes per width (default 4Mi)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per width")
    parser.add_argument("--widths", type=int, nargs="+", default=list(range(1, 10)))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    parser.add_argument("--stat", choices=["median", "min"], default="median", help="per-operation statistic")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time the super-group kernel (the codec before the byte-field kernel) in the same rounds",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this thread's CPU time (user + system): on a shared machine it leaves out the time the "
        "thread waited for a core, not the cache and memory traffic of other jobs",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import safetensors

    print(
        f"torch {torch.__version__}, safetensors {safetensors.__version__}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
        f"{args.numel} codes per width, {args.stat} of {args.repeats}, {args.clock} clock"
    )
    print()
    extra = " super-group pack Mcodes/s | super-group unpack Mcodes/s |" if args.baseline else ""
    print(
        "| width | packed MB | pack Mcodes/s | unpack Mcodes/s | pack MB/s | unpack MB/s | st write MB/s | "
        "st read MB/s | st mmap MB/s | pack / write | unpack / read | (pack+write) / write codes | "
        "(read+unpack) / read codes |" + extra
    )
    print("|---:" * (15 if args.baseline else 13) + "|")
    with tempfile.TemporaryDirectory() as directory:
        for width in args.widths:
            mb = packed_nbytes(args.numel, width) / 1e6
            t = measure(width, args.numel, args.repeats, directory, args.stat, args.clock, args.baseline)
            rate = {k: mb / v for k, v in t.items()}
            mcodes = {k: f"{args.numel / v / 1e6:.0f}" for k, v in t.items()}
            extra = f" {mcodes.get('pack_sg', '–')} | {mcodes.get('unpack_sg', '–')} |" if args.baseline else ""
            print(
                f"| {width} | {mb:.2f} | {args.numel / t['pack'] / 1e6:.0f} | {args.numel / t['unpack'] / 1e6:.0f} | "
                f"{rate['pack']:.0f} | {rate['unpack']:.0f} | {rate['write']:.0f} | "
                f"{rate['read']:.0f} | {rate['mmap']:.0f} | {rate['pack'] / rate['write']:.2f} | "
                f"{rate['unpack'] / rate['read']:.2f} | "
                f"{(t['pack'] + t['write']) / t['write_codes']:.2f} | "
                f"{(t['read'] + t['unpack']) / t['read_codes']:.2f} |" + extra,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
