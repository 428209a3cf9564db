"""Float or uniform-quantization fine-tuning with exactly an MSQ recipe's budget (a child of finetune_pretrained.py).

The recipe's own parser reads the command line, so the data subset, epochs, batch, optimizer, learning-rate
schedule, warm-up, weight decay, seed and evaluation split are the MSQ run's, flag for flag; the recipe's MSQ-only
flags are parsed and ignored. The network is built by the same :func:`msq_hf.pipeline.prepare`, converted by
``benchmarks/harness.convert_model`` (``float``: untouched; ``dorefa``/``lsq``: every Linear/Conv2d at ``--bits``,
the layers MSQ quantizes) with the recipe's activation setting (float for the CNN recipes), and trained by a plain
``transformers.Trainer`` whose loss is the task loss MSQTrainer uses for raw models (cross-entropy on the logits).

Usage (normally through ``benchmarks/finetune_pretrained.py --method dorefa --bits 4``)::

    python benchmarks/finetune_baseline.py --method dorefa --bits 4 --recipe recipes/resnet18_imagenet.py \\
        --model_name_or_path runs/pretrained/resnet18 --dataset_name fashion_mnist --eval_split test ...

Writes ``<output_dir>/baseline_result.json`` (summary, evaluations, bit scheme and layer sizes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DefaultDataCollator, Trainer
from transformers.trainer_utils import IntervalStrategy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "recipes"))  # the recipes import their shared module as `common`

from common import check_dataset_access, check_weights_access, parse_args  # noqa: E402
from finetune_table import UNIFORM, check_method  # noqa: E402
from harness import ActQuant, convert_model  # noqa: E402

from msq_hf import baselines  # noqa: E402
from msq_hf.baselines.common import QuantLayerBase  # noqa: E402
from msq_hf.metrics import compute_accuracy_metrics  # noqa: E402
from msq_hf.pipeline import prepare  # noqa: E402
from msq_hf.report.accounting import method_accounting  # noqa: E402
from msq_hf.training.measure import check_finite_loss, output_logits  # noqa: E402

RESULT_FILE = "baseline_result.json"


class TaskLossTrainer(Trainer):
    """``Trainer`` with MSQTrainer's raw-model task loss and nothing else: cross-entropy on ``model(pixel_values)``."""

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        logits = output_logits(model(inputs["pixel_values"]))
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_finite_loss(loss, self.state.global_step + 1)  # as MSQTrainer: stop on NaN/inf, not log it away
        return loss


def load_recipe(path: str) -> Any:
    """The ``RECIPE`` of a recipe script (its flag defaults)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load recipe {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPE


def weight_record(model: torch.nn.Module, method: str) -> dict[str, Any]:
    """Bit scheme, layer sizes and both ratios of the converted weights (float: every weight at 32 bits)."""
    if method == "float":
        acc = method_accounting("float", 32)
        return {"bit_scheme": None, "numels": None, "compression": acc.paper_ratio, "storage_ratio": acc.stored_ratio}
    scheme = baselines.METHODS[method].bit_scheme(model)
    numels = {name: int(m.numel) for name, m in model.named_modules() if isinstance(m, QuantLayerBase)}
    acc = method_accounting(method, scheme, numels)
    return {"bit_scheme": scheme, "numels": numels, "compression": acc.paper_ratio, "storage_ratio": acc.stored_ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=["float", *UNIFORM])
    parser.add_argument("--bits", type=int, default=None, help="weight bits of the uniform methods")
    parser.add_argument("--recipe", required=True, help="the MSQ recipe whose budget to reuse")
    args, rest = parser.parse_known_args(argv)
    check_method(args.method, args.bits)
    start = time.time()
    recipe = load_recipe(args.recipe)
    training, model_args, data_args, msq_args, _run_args, _ = parse_args(recipe, rest)
    training.save_strategy = IntervalStrategy.NO  # no checkpoints: nothing resumes these short runs
    check_dataset_access(data_args, print)
    check_weights_access(model_args)
    prepared = prepare(model_args, data_args, training.seed)
    # the recipe's activation setting (MSQConfig fields), so the only difference from MSQ is the weight quantizer
    act = ActQuant(msq_args.act_bits, msq_args.act_quantizer, msq_args.act_skip_first)
    convert_model(prepared.model, args.method, act, **({} if args.method == "float" else {"bits": args.bits}))
    splits = prepared.splits
    trainer = TaskLossTrainer(
        model=prepared.model,
        args=training,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        data_collator=DefaultDataCollator(),
        compute_metrics=compute_accuracy_metrics,
    )
    trainer.model_accepts_loss_kwargs = False  # the loss is a per-batch mean, as MSQTrainer's raw-model loss
    label = args.method + (f" W{args.bits}" if args.bits else "")
    print(f"{label}: training {trainer.args.num_train_epochs:g} epoch(s) of {len(splits.train):,} images", flush=True)
    train_start = time.time()
    output = trainer.train()
    train_seconds = time.time() - train_start
    print(f"evaluating on {len(splits.eval):,} {splits.eval_split} images", flush=True)
    metrics = trainer.evaluate(eval_dataset=splits.eval, metric_key_prefix="test")
    print(f"{label}: test accuracy {metrics['test_accuracy']:.4f}", flush=True)
    weights = weight_record(trainer.model, args.method)
    summary = {
        "method": args.method,
        "bits": args.bits,
        "activations": act.describe(),
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "train_loss": output.training_loss,
        "steps": int(trainer.state.global_step),
        "train_images": len(splits.train),
        "eval_images": len(splits.eval),
        "eval_split": splits.eval_split,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - start, 1),
        "compression": weights.pop("compression"),
        "storage_ratio": weights.pop("storage_ratio"),
    }
    record = {
        "summary": summary,
        **weights,
        "log_history": [e for e in trainer.state.log_history if "eval_accuracy" in e],
        "training": {k: str(v) for k, v in training.to_dict().items()},
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    out = Path(training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
