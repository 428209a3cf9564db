"""Short ResNet-20 / Fashion-MNIST runs that settle MSQ's open choices (docs/design-choices.md).

Every variant trains the same network from the same seed on the same data slice with the same
optimizer, changing one :class:`msq_hf.MSQConfig` field from the default. For each it records what
the choice is supposed to influence:

* ``first_k2``: layers given ``k = 2`` at the first assignment (Eq. 9 normalization ``avg`` vs ``sum``);
* ``rho@<step>``: parameter-weighted mean LSB nonzero rate after the first regularized interval
  (how fast the LSB form / units push the LSBs to zero);
* ``final_step`` and ``forced``: when the target was reached, and whether only the forced final
  round got there; ``avg_bits_before_final``: how far the regularizer and threshold pruning got on
  their own before the final round;
* ``zero_codes``: fraction of weights whose final code is 0 (DoReFa's "spike at zero");
* ``acc``: test accuracy at the end (short runs: compare variants against each other only);
* ``paper_ratio`` (magnitude bits), ``stored_ratio`` (sign counted) and ``stored_bits`` per weight: the variants do
  not all store the same bits (``wnorm=dorefa`` stores ``n`` bits, sign-magnitude ``n + 1``), so both ratios are
  shown (:func:`msq_hf.report.accounting.method_accounting`).

Usage (from the repository root)::

    python benchmarks/ablation.py --steps 150 --train-limit 4000 --eval-limit 2000 --json docs/ablation.json
    python benchmarks/ablation.py --table benchmarks/results/ablation/lambda1e-5.json   # re-render stored rows

Prints a markdown table; ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_regularizer_arguments, regularizer_settings  # noqa: E402

from msq_hf.report.accounting import method_accounting  # noqa: E402

VARIANTS: dict[str, dict] = {
    "default (signmag, continuous, code, Tr/N, sum)": {},
    "wnorm=dorefa": {"wnorm": "dorefa"},
    "lsb_form=discrete": {"lsb_form": "discrete"},
    "lsb_units=value": {"lsb_units": "value"},
    "sensitivity_norm=sum (Tr)": {"sensitivity_norm": "sum"},
    "reg_reduction=mean": {"reg_reduction": "mean"},
}


def _loader(dataset, batch: int, shuffle: bool, seed: int):
    from msq_hf.data import collate_pixel_values

    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=shuffle, generator=gen, collate_fn=collate_pixel_values, drop_last=shuffle
    )


@torch.no_grad()
def _accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        pred = model(batch["pixel_values"]).argmax(-1)
        correct += int((pred == batch["labels"]).sum())
        total += len(pred)
    model.train()
    return correct / total


def _weighted_rate(ctl) -> float:
    rates = ctl.nonzero_rates()
    active = {n: r for n, r in rates.items() if ctl.layers[n].n_k > 0}
    if not active:
        return 0.0
    total = sum(ctl.numels[n] for n in active)
    return sum(ctl.numels[n] * r for n, r in active.items()) / total


def _zero_code_fraction(ctl) -> float:
    zeros = total = 0
    for layer in ctl.layers.values():
        codes, _ = layer.integer_codes()
        if layer.wnorm == "dorefa":  # affine codes: the level nearest to w = 0 is the middle one
            mid = (2**layer.n_bits - 1) / 2
            zeros += int(((codes.float() - mid).abs() <= 0.5).sum())
        else:
            zeros += int((codes == 0).sum())
        total += codes.numel()
    return zeros / total


def accounting_columns(bits: dict[str, int], numels: dict[str, int], wnorm: str) -> dict[str, float]:
    """Both ratios and the stored bits per weight of a variant's final scheme."""
    acc = method_accounting("msq", bits, numels, wnorm)
    return {
        "paper_ratio": round(acc.paper_ratio, 3),
        "stored_ratio": round(acc.stored_ratio, 3),
        "stored_bits": round(acc.stored_bits, 3),
    }


def model_numels() -> dict[str, int]:
    """Weights per quantized layer of the ablation model (for rows stored without them)."""
    import timm

    import msq_hf

    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    return msq_hf.layer_numels(model)


def print_table(rows: list[dict]) -> None:
    cols = [c for c in rows[0] if c not in ("bits", "numels")]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")


def rerender(path: Path) -> None:
    """Print the table of a stored ``--json`` file with both ratios (recomputed from each row's bits)."""
    rows = json.loads(path.read_text())["rows"]
    numels = model_numels()
    for row in rows:
        wnorm = VARIANTS.get(row["variant"], {}).get("wnorm", "signmag")
        extra = accounting_columns(row["bits"], row.get("numels") or numels, wnorm)
        if "compression" in row and abs(row["compression"] - extra["paper_ratio"]) > 1e-3:
            raise SystemExit(f"{path}: {row['variant']}: stored compression {row['compression']} != {extra}")
        row.pop("compression", None)
        row.update(extra)
    print_table(rows)


def run_variant(name: str, overrides: dict, args: argparse.Namespace, train, test) -> dict:
    """Train one variant and return its row."""
    import timm

    import msq_hf

    torch.manual_seed(args.seed)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    base = dict(
        init_bits=8,
        target_compression=args.target,
        prune_threshold=args.prune_threshold,
        prune_interval=args.prune_interval,
        hessian_max_probes=2,
        hessian_batch_size=32,
        final_round_fraction=0.7,
    )
    base.update(regularizer_settings(args))
    base.update(overrides)
    msq_hf.quantize_model(model, msq_hf.MSQConfig(**base))
    if overrides.get("reg_reduction") == "mean":
        # a per-layer mean divides layer l's term by N_l; scale lambda by the mean N_l so the run
        # tests whether the reduction changes anything beyond the scale of lambda
        numels = msq_hf.layer_numels(model)
        model.msq_config.reg_strength *= sum(numels.values()) / len(numels)
    ctl = msq_hf.MSQController(model, total_steps=args.steps, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    loader = _loader(train, args.batch, True, args.seed)
    step, start = 0, time.perf_counter()
    first_k2 = rho_first = final_step = None
    forced = False
    model.train()
    while step < args.steps:
        for batch in loader:
            if step == 0:
                ctl.start(batch)
                first_k2 = sum(1 for k in ctl.ks.values() if k == 2)
            logits = model(batch["pixel_values"])
            loss = F.cross_entropy(logits, batch["labels"]) + ctl.regularization()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == args.prune_interval:
                rho_first = _weighted_rate(ctl)
            decision = ctl.maybe_step(step, batch)
            if decision is not None and decision.finalized and final_step is None:
                final_step = step
                forced = decision.reason.startswith("forced")
            if step >= args.steps:
                break
    acc = _accuracy(model, _loader(test, 256, False, 0))
    # how far the regularizer + threshold pruning got on its own, before the final round
    before_final = [h["avg_bits"] for h in ctl.history if h["phase"] != "final"]
    return {
        "variant": name,
        "first_k2": first_k2,
        f"rho@{args.prune_interval}": round(rho_first or 0.0, 4),
        "final_step": final_step,
        "forced": forced,
        "avg_bits_before_final": round(before_final[-1], 3) if before_final else None,
        **accounting_columns(dict(ctl.bits), dict(ctl.numels), base.get("wnorm", "signmag")),
        "zero_codes": round(_zero_code_fraction(ctl), 4),
        "acc": round(acc, 4),
        "bits": msq_hf.bit_scheme(model),
        "numels": dict(ctl.numels),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=4000)
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--target", type=float, default=16.0)
    add_regularizer_arguments(parser)
    parser.add_argument("--prune-threshold", type=float, default=0.3)
    parser.add_argument("--prune-interval", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of: {list(VARIANTS)}")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="only re-render the table of a stored --json file")
    args = parser.parse_args(argv)
    if args.table is not None:
        rerender(args.table)
        return 0
    torch.set_num_threads(args.threads)

    import msq_hf  # noqa: F401  (registers resnet20_cifar)
    from msq_hf.data import load_fashion_mnist

    train = load_fashion_mnist("train", limit=args.train_limit, channels=1, seed=args.seed)
    test = load_fashion_mnist("test", limit=args.eval_limit, channels=1, seed=args.seed)
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    rows = []
    for name in names:
        rows.append(run_variant(name, VARIANTS[name], args, train, test))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("bits", "numels")}), flush=True)
    print_table(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
