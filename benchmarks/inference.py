"""Memory and latency of a loaded export: float vs packed vs packed + decode cache vs dequantized.

For each model (randomly initialised from its transformers config: ResNet-18, ResNet-50, DeiT-tiny,
Swin-tiny, 1000 classes) the float model is saved with ``save_pretrained``, then quantized with a random
bit scheme (1..8 bits per layer, seeded) and exported with ``msq_hf.export``. Four variants are loaded:

* ``float``: the float model (``from_pretrained`` of the saved float folder);
* ``packed``: ``msq_hf.from_pretrained(export)`` -- weights stay packed, decoded in every forward;
* ``packed+cache``: ``msq_hf.from_pretrained(export, decode_cache="all")`` -- decoded once, kept;
* ``dequantized``: ``msq_hf.from_pretrained(export, dequantize=True)`` -- plain float layers.

Memory: each variant loads in a fresh subprocess, twice: the first load (then freed, with ``malloc_trim``)
pays the lazy imports and one-time initialisations; ``load`` is the growth of the resident set (VmRSS) from
just before to just after loading (``anon``/``file``: its anonymous and file-backed parts, RssAnon/RssFile; file
pages are a weight file still mapped behind the tensors), ``peak`` the growth of the peak resident set (VmHWM,
reset before loading), ``+fwd`` the growth after one batch-1 forward (workspace or cache included). The goal
(issue 13) compares the packed load with ``1.25 x (packed bytes + float tensors that are not quantized)`` (the
export's manifest) ``+ the per-layer workspace`` (the decode scratch after one forward).

Latency: all four variants live in one process and run interleaved (float, packed, cache, dequantized,
repeat), so load on a shared machine hits them alike; the table gives medians and the ratios to float.

Usage::

    python benchmarks/inference.py                       # all four models, batch 1 and 32, 224 px
    python benchmarks/inference.py --models resnet18 --batches 1 --repeats 5
    python benchmarks/inference.py --memory-only                 # the memory table only (no latency runs)

Results vary across machines, torch builds and thread counts; rerun on the target machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # name -> (model class, config class, config kwargs)
    "resnet18": (
        "ResNetForImageClassification",
        "ResNetConfig",
        {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], "embedding_size": 64},
    ),
    "resnet50": ("ResNetForImageClassification", "ResNetConfig", {}),
    "deit_tiny": (
        "DeiTForImageClassification",
        "DeiTConfig",
        {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    ),
    "swin_tiny": ("SwinForImageClassification", "SwinConfig", {}),
}
VARIANTS = ("float", "packed", "packed+cache", "dequantized")


def build(name: str) -> torch.nn.Module:
    import transformers

    model_cls, config_cls, kwargs = MODELS[name]
    config = getattr(transformers, config_cls)(num_labels=1000, **kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def prepare(name: str, root: Path, seed: int) -> dict:
    """Save the float model and the export of a random bit scheme; return their folders and byte counts."""
    import msq_hf

    model = build(name)
    model.save_pretrained(root / f"{name}_float")
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    rng = random.Random(seed)
    msq_hf.set_bit_scheme(model, {n: rng.randint(1, 8) for n in msq_hf.bit_scheme(model)})
    msq_hf.export(model, root / f"{name}_msq")
    manifest = json.loads((root / f"{name}_msq" / "msq_manifest.json").read_text())
    return {"float": str(root / f"{name}_float"), "export": str(root / f"{name}_msq"), "totals": manifest["totals"]}


def load(variant: str, folders: dict) -> torch.nn.Module:
    import transformers

    import msq_hf

    if variant == "float":
        config = transformers.AutoConfig.from_pretrained(folders["float"])
        cls = getattr(transformers, config.architectures[0])
        return cls.from_pretrained(folders["float"]).eval()
    options = {"packed": {}, "packed+cache": {"decode_cache": "all"}, "dequantized": {"dequantize": True}}
    return msq_hf.from_pretrained(folders["export"], **options[variant])


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(variant: str, folders: dict, size: int) -> dict:
    """Runs in a fresh process: RSS growth of loading ``variant``, its peak, and after one forward."""
    import msq_hf  # noqa: F401  (imports and registrations happen before the baseline)
    from msq_hf.quant import packing

    x = torch.randn(1, 3, size, size)
    warm = load(variant, folders)  # a first load pays the lazy imports and one-time initialisations
    with torch.no_grad():
        warm(pixel_values=x)
    del warm
    gc.collect()
    packing.release_scratch()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the freed heap back, so the next load has to grow RSS again
    before, anon0, file0 = _status("VmRSS"), _status("RssAnon"), _status("RssFile")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model = load(variant, folders)
    loaded, peak = _status("VmRSS"), _status("VmHWM")
    anon, file = _status("RssAnon") - anon0, _status("RssFile") - file0
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    with torch.no_grad():
        model(pixel_values=x)
    return {
        "load": loaded - before,
        "anon": anon,
        "file": file,
        "peak": peak - before,
        "fwd": _status("VmRSS") - before,
        "tensors": sum(tensors.values()),
        "scratch": packing.scratch_nbytes(),
    }


def measure_memory(folders: dict, size: int) -> dict[str, dict]:
    out = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", variant, json.dumps(folders), "--image-size", str(size)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ})
        if res.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{res.stderr[-2000:]}")
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def measure_latency(folders: dict, size: int, batch: int, repeats: int) -> dict[str, float]:
    models = {v: load(v, folders) for v in VARIANTS}
    x = torch.randn(batch, 3, size, size)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch.no_grad():
        for model in models.values():  # warm-up (and the cache fill)
            model(pixel_values=x)
        for _ in range(repeats):
            for v, model in models.items():
                t0 = time.perf_counter()
                model(pixel_values=x)
                samples[v].append(time.perf_counter() - t0)
    return {v: statistics.median(s) for v, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per batch size (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random bit scheme")
    parser.add_argument("--memory-only", action="store_true", help="measure memory only, skip the latency runs")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "FOLDERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        variant, folders = args.memory_child
        print(json.dumps(memory_child(variant, json.loads(folders), args.image_size)))
        return 0

    mb = 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {args.image_size} px")
    mem_rows, lat_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folders = prepare(name, Path(tmp), args.seed)
            totals = folders.pop("totals")
            packed, other = totals["quantized_bytes"], totals["unquantized_bytes"]
            mem = measure_memory(folders, args.image_size)
            for v in VARIANTS:
                m = mem[v]
                ratio = m["load"] / (packed + other)
                goal = 1.25 * (packed + other) + m["scratch"]
                verdict = f"{goal / mb:.1f} {'met' if m['load'] <= goal else 'MISSED'}" if v == "packed" else "–"
                mem_rows.append(
                    f"| {name} | {v} | {m['tensors'] / mb:.1f} | {m['load'] / mb:.1f} | {m['anon'] / mb:.1f} / "
                    f"{m['file'] / mb:.1f} | {m['peak'] / mb:.1f} | {m['fwd'] / mb:.1f} | {m['scratch'] / mb:.1f} | "
                    f"{ratio:.2f} | {verdict} |"
                )
                print(mem_rows[-1], flush=True)
            print(f"{name}: packed weights {packed / mb:.1f} MB + other float tensors {other / mb:.1f} MB", flush=True)
            for batch in [] if args.memory_only else args.batches:
                t = measure_latency(folders, args.image_size, batch, args.repeats)
                lat_rows.append(
                    f"| {name} | {batch} | "
                    + " | ".join(f"{t[v] * 1e3:.1f}" for v in VARIANTS)
                    + " | "
                    + " | ".join(f"{t[v] / t['float']:.2f}" for v in VARIANTS[1:])
                    + " |"
                )
                print(lat_rows[-1], flush=True)
    print()
    print("Memory (MB = 1e6 bytes; growth of the process RSS; ratio = load / (packed + other float bytes))")
    print()
    print(
        "| model | variant | tensors MB | load MB | anon / file MB | peak MB | +fwd MB | workspace MB "
        "| load / (packed+other) | goal MB (packed) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(mem_rows))
    if args.memory_only:
        return 0
    print()
    print(f"Latency (ms, median of {args.repeats} interleaved rounds; ratios to float)")
    print()
    print(
        "| model | batch | float | packed | packed+cache | dequantized | packed / float | cache / float "
        "| dequantized / float |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lat_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
