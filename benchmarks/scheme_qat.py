"""Where an MSQ fine-tune loses accuracy: plain QAT of the float checkpoint at the bit scheme an MSQ run found.

``benchmarks/finetune_pretrained.py`` records the bit scheme each MSQ fine-tune ended with. This script takes that
scheme, quantizes the *float checkpoint* with MSQ's quantizer at exactly those bits (no regularizer, no pruning:
``MSQLayerMixin.set_bits`` with ``k = 0``) and trains it with the MSQ run's own recipe flags (data subset, batch,
optimizer, schedule, clipping, seed), through ``finetune_baseline.TaskLossTrainer``. A run with
``--qat_scale learned`` (and its ``--qat_grid``) starts every layer's learned step at its clipped scale, as MSQ's
final round does, and trains it; ``--qat_scale mse`` is refused (its refit every ``prune_interval`` steps is the
controller's). Two budgets:

* ``full``: the whole budget of the MSQ run (every step at the final bits);
* ``tail``: only the steps the MSQ run had left after its final round, starting at the learning rate the recipe's
  schedule had reached there (warm-up 0, cosine to 0 over those steps).

``--uniform-bits N`` trains every layer at ``N`` magnitude bits instead (the same quantizer, budget and seed): the
uniform control for the scheme the record found, at ``N + 1`` stored bits per weight.

If the ``tail`` run scores well above the MSQ run, the bits are not what cost accuracy: MSQ's weights at the
moment of the final round are (docs/results.md, "Where the accuracy goes").

Usage (from the repository root)::

    python benchmarks/scheme_qat.py benchmarks/results/finetune/resnet18_msq_after-clip_seed0.json --budget tail

Writes ``scheme_qat/<record stem>_<budget>.json`` next to the record (e.g. ``benchmarks/results/finetune/scheme_qat/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from msq_hf.convert import msq_layers
from msq_hf.quant.bits import check_bits
from msq_hf.training.clipping import fit_final_scales
from msq_hf.training.pacing import final_round_step as history_final_round_step
from msq_hf.training.schedule import compression

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "scheme_qat"  # the folder, next to the MSQ record, of its scheme-QAT records
BUDGETS = ("full", "tail")


def apply_scheme(model: Any, scheme: dict[str, int], qat_scale: str = "max", init: str = "mse") -> None:
    """Put every MSQ layer of ``model`` at ``scheme[name]`` bits with ``k = 0`` and, with ``qat_scale="learned"``,
    start its learned step at the clipped scale (MSQ's final round); ``KeyError`` naming the layers that the scheme
    and the model do not share."""
    if qat_scale not in ("max", "learned"):
        raise ValueError(f"qat_scale={qat_scale!r}: QAT at a scheme runs at max|W| or with the learned step only")
    layers = msq_layers(model)
    if set(layers) != set(scheme):
        raise KeyError(
            f"the bit scheme and the model differ: only in the scheme {sorted(set(scheme) - set(layers))[:5]}, "
            f"only in the model {sorted(set(layers) - set(scheme))[:5]}"
        )
    for name, layer in layers.items():
        layer.set_bits(int(scheme[name]), 0)
    fit_final_scales(layers, qat_scale, init)


def run_scheme(
    record: dict[str, Any], uniform_bits: int | None = None, scheme_file: Path | None = None
) -> dict[str, int]:
    """The bit scheme to train: the record's, every one of its layers at ``uniform_bits`` (the uniform control), or
    the ``{layer: bits}`` JSON of ``scheme_file`` (a chosen scheme; ``ValueError`` naming the file and the layers it
    does not share with the record, or its first bad width)."""
    scheme = record["bit_scheme"]
    if uniform_bits is not None and scheme_file is not None:
        raise ValueError("--uniform-bits and --scheme are exclusive: give one")
    if uniform_bits is not None:
        check_bits(uniform_bits)
        return dict.fromkeys(scheme, uniform_bits)
    if scheme_file is None:
        return dict(scheme)
    chosen = json.loads(Path(scheme_file).read_text())
    if not isinstance(chosen, dict) or set(chosen) != set(scheme):
        names = set(chosen) if isinstance(chosen, dict) else set()
        missing, unknown = sorted(set(scheme) - names)[:5], sorted(names - set(scheme))[:5]
        msg = f"{scheme_file}: not a {{layer: bits}} map of the record's layers: lacks {missing}, adds {unknown}"
        raise ValueError(msg)
    return {name: check_bits(chosen[name], f"{scheme_file}: layer {name!r}") for name in scheme}


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """The learning rate of transformers' linear-warm-up cosine schedule at ``step`` (its own multiplier)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    return peak * get_cosine_schedule_with_warmup(optimizer, warmup, total).lr_lambdas[0](step)


def final_round_step(record: dict[str, Any]) -> int:
    """The step of the MSQ run's final round (threshold or forced), from its controller history."""
    step = history_final_round_step(record["history"])
    if step is None:
        raise ValueError("the record's history has no final round: the MSQ run never reached its target")
    return step


def child_argv(record: dict[str, Any], budget: str, out: Path) -> list[str]:
    """The MSQ run's recipe flags (its MSQ-only flags are parsed and ignored), for this script's ``--child`` mode."""
    command = record["command"][2:]  # drop "OMP_NUM_THREADS=1 python"
    recipe, flags = command[0], command[1:]
    flags[flags.index("--output_dir") + 1] = str(out)
    tail = ["--start-step", str(final_round_step(record))] if budget == "tail" else []
    steps = ["--total-steps", str(record["summary"]["steps"])]
    return [sys.executable, __file__, "--child", "--recipe", recipe, *steps, *tail, *flags]


def child(argv: list[str], scheme: dict[str, int]) -> dict[str, Any]:
    """Train the float checkpoint at ``scheme`` with the recipe flags in ``argv``; the test metrics."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "recipes")]
    from common import parse_args
    from finetune_baseline import TaskLossTrainer, load_recipe
    from transformers import DefaultDataCollator
    from transformers.trainer_utils import IntervalStrategy

    import msq_hf
    from msq_hf.metrics import compute_accuracy_metrics
    from msq_hf.pipeline import prepare

    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--total-steps", type=int, required=True)
    parser.add_argument("--start-step", type=int, default=0)
    args, rest = parser.parse_known_args(argv)
    training, model_args, data_args, msq_args, _run, _ = parse_args(load_recipe(args.recipe), rest)
    training.save_strategy = IntervalStrategy.NO
    if args.start_step:  # the schedule's tail: its learning rate at start_step, cosine to 0 over the steps left
        warmup = training.get_warmup_steps(args.total_steps)
        training.learning_rate = cosine_lr(args.start_step, args.total_steps, training.learning_rate, warmup)
        training.max_steps, training.warmup_steps = args.total_steps - args.start_step, 0
    prepared = prepare(model_args, data_args, training.seed)
    config = msq_hf.MSQConfig(**msq_args.config_values())  # the MSQ run's quantizer (scale, grid); no search here
    msq_hf.quantize_model(prepared.model, config)
    apply_scheme(prepared.model, scheme, config.qat_scale, config.learned_step_init)
    trainer = TaskLossTrainer(
        model=prepared.model,
        args=training,
        train_dataset=prepared.splits.train,
        eval_dataset=prepared.splits.eval,
        data_collator=DefaultDataCollator(),
        compute_metrics=compute_accuracy_metrics,
    )
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    metrics = trainer.evaluate(eval_dataset=prepared.splits.eval, metric_key_prefix="test")
    steps, lr = int(trainer.state.global_step), training.learning_rate
    return {"test_accuracy": metrics["test_accuracy"], "steps": steps, "start_step": args.start_step, "peak_lr": lr}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        scheme = json.loads(os.environ["MSQ_SCHEME_QAT_SCHEME"])
        result = child(argv[1:], scheme)
        print("SCHEME_QAT_RESULT " + json.dumps(result), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="MSQ records of benchmarks/finetune_pretrained.py")
    parser.add_argument("--budget", choices=BUDGETS, default="tail")
    parser.add_argument("--skip-done", action="store_true")
    parser.add_argument(
        "--uniform-bits", type=int, default=None, help="every layer at N magnitude bits: the uniform control"
    )
    parser.add_argument("--scheme", type=Path, default=None, help="a {layer: magnitude bits} JSON to train instead")
    args = parser.parse_args(argv)
    for path in (p.resolve() for p in args.records):
        record = json.loads(path.read_text())
        if record.get("method") != "msq" or not record.get("bit_scheme"):
            raise ValueError(f"{path}: not an MSQ record with a bit scheme")
        (path.parent / RESULTS).mkdir(exist_ok=True)
        control, suffix = [], ""
        if args.uniform_bits is not None:
            control, suffix = ["--uniform-bits", str(args.uniform_bits)], f"_uniform{args.uniform_bits}"
        if args.scheme is not None:
            control, suffix = ["--scheme", os.path.relpath(args.scheme.resolve(), ROOT)], f"_{args.scheme.stem}"
        target = path.parent / RESULTS / f"{path.stem}_{args.budget}{suffix}.json"
        scheme = run_scheme(record, args.uniform_bits, args.scheme)
        if args.skip_done and target.exists():
            print(f"[{target.stem}] done before")
            continue
        argv_child = child_argv(record, args.budget, ROOT / "runs" / "scheme_qat" / target.stem)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MSQ_SCHEME_QAT_SCHEME": json.dumps(scheme)}
        started = time.time()
        out = subprocess.run(argv_child, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.split("SCHEME_QAT_RESULT ", 1)[1].splitlines()[0])
        summary = {
            **result,
            "budget": args.budget,
            "msq_test_accuracy": record["summary"]["test_accuracy"],
            "compression": compression(scheme, record["numels"]),
            "uniform_bits": args.uniform_bits,
            "threshold_share": record["summary"].get("threshold_share"),
            "wall_seconds": round(time.time() - started, 1),
        }
        source = os.path.relpath(path, ROOT)
        command = ["OMP_NUM_THREADS=1", "python", "benchmarks/scheme_qat.py", source, "--budget", args.budget, *control]
        saved = {"source": source, "command": command}
        target.write_text(json.dumps({**saved, "summary": summary, "bit_scheme": scheme}, indent=1))
        print(f"[{target.stem}] QAT at the scheme {result['test_accuracy']:.4f} vs MSQ {summary['msq_test_accuracy']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
