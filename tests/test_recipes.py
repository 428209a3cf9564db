"""The paper recipes (``recipes/*.py``): paper defaults, smoke runs, exports, multi-process runs.

Every recipe's ``--smoke_test`` runs in-process through its ``main(argv)``; one also runs through
``accelerate launch --cpu --num_processes 1`` and one under two CPU processes (gloo), whose ranks
must end with identical bit schemes. The compiled MSQ kernels are switched off
(``MSQ_HF_COMPILE=0``): compiling costs more than the few smoke steps it would speed up.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import msq_hf
from msq_hf.pipeline import ModelArguments, logits_of, make_msq_config
from msq_hf.pipeline.outputs import SUMMARY_KEYS
from msq_hf.report import HISTORY_VERSION, RunHistory, find_run_data

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "recipes"
RECIPES = ["resnet20_cifar10", "resnet18_imagenet", "resnet50_imagenet", "mobilenetv3_large", "deit_tiny", "swin_tiny"]


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSQ_HF_COMPILE", "0")


def load_recipe(name: str) -> ModuleType:
    """Import ``recipes/<name>.py`` (the recipes import ``common`` from their own folder)."""
    if str(RECIPES_DIR) not in sys.path:
        sys.path.insert(0, str(RECIPES_DIR))
    spec = importlib.util.spec_from_file_location(f"msq_recipe_{name}", RECIPES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _common() -> ModuleType:
    load_recipe("resnet20_cifar10")
    import common  # noqa: PLC0415  (importable once the recipes folder is on sys.path)

    return common


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits_of(model, x)


def _check_export(export_dir: Path) -> dict:
    for name in ("config.json", "msq_manifest.json", "msq_model.safetensors", "README.md"):
        assert (export_dir / name).is_file(), f"{export_dir} lacks {name}"
    return json.loads((export_dir / "msq_manifest.json").read_text())


# ------------------------------------------------------------------------------------------------
# Paper defaults (parsing only, no training)

PAPER = {
    "resnet20_cifar10": dict(
        model_name_or_path="resnet20_cifar",
        pretrained=False,
        dataset_name="uoft-cs/cifar10",
        init_bits=8,
        target_compression=16.0,
        act_bits=None,
        learning_rate=0.1,
        per_device_train_batch_size=1024,
        num_train_epochs=400,
        optim="sgd",
        prune_interval_epochs=10,
    ),
    "resnet18_imagenet": dict(
        model_name_or_path="timm/resnet18.tv_in1k",
        pretrained=True,
        dataset_name="ILSVRC/imagenet-1k",
        init_bits=8,
        target_compression=10.67,
        act_bits=None,
        learning_rate=0.01,
        per_device_train_batch_size=256,
        num_train_epochs=100,
        optim="sgd",
    ),
    "resnet50_imagenet": dict(
        model_name_or_path="timm/resnet50.tv_in1k",
        init_bits=8,
        target_compression=10.67,
        learning_rate=0.01,
        num_train_epochs=100,
    ),
    "mobilenetv3_large": dict(
        model_name_or_path="timm/mobilenetv3_large_100.ra_in1k", init_bits=8, target_compression=10.3, act_bits=None
    ),
    "deit_tiny": dict(
        model_name_or_path="timm/deit_tiny_patch16_224.fb_in1k",
        dataset_name="ILSVRC/imagenet-1k",
        init_bits=4,
        act_bits=8,
        act_quantizer="lsq",
        target_compression=10.5,
        learning_rate=5e-4,
        optim="adamw_torch",
        weight_decay=0.05,
    ),
    "swin_tiny": dict(
        model_name_or_path="timm/swin_tiny_patch4_window7_224.ms_in1k",
        init_bits=4,
        act_bits=8,
        act_quantizer="lsq",
        target_compression=9.1,
    ),
}


@pytest.mark.parametrize("name", RECIPES)
def test_paper_defaults(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    training, model_args, data_args, msq_args, run_args, recipe_args = _common().parse_args(
        recipe.RECIPE, ["--output_dir", str(tmp_path)]
    )
    parsed = {
        **vars(model_args),
        **vars(data_args),
        **vars(msq_args),
        **vars(run_args),
        **{
            k: getattr(training, k)
            for k in ("learning_rate", "per_device_train_batch_size", "num_train_epochs", "weight_decay")
        },
        "optim": str(training.optim.value),
    }
    for key, expected in PAPER[name].items():
        assert parsed[key] == expected, f"{name}: {key}={parsed[key]!r}, paper setting {expected!r}"
    assert recipe_args.smoke_test is False and training.remove_unused_columns is False
    # the paper configuration is a valid MSQConfig
    cfg = make_msq_config(msq_args, run_args, steps_in_epoch=100)
    assert cfg.init_bits == PAPER[name]["init_bits"] and cfg.prune_interval >= 100


def test_command_line_beats_smoke_and_recipe_defaults(tmp_path: Path) -> None:
    common = _common()
    recipe = load_recipe("deit_tiny").RECIPE
    training, model_args, _, msq_args, run_args, recipe_args = common.parse_args(
        recipe, ["--smoke_test", "--max_steps", "3", "--act_bits", "6", "--output_dir", str(tmp_path)]
    )
    assert training.max_steps == 3 and msq_args.act_bits == 6 and recipe_args.smoke_test
    assert model_args.model_name_or_path == "deit_tiny_patch16_224" and model_args.pretrained is False
    bad = common.Recipe(name="typo", description="", defaults={"target_compresion": 3.0}, smoke={})
    with pytest.raises(ValueError, match="target_compresion"):
        common.build_parser(bad)
    with pytest.raises(ValueError, match="model_kwargs"):
        ModelArguments("resnet18", pretrained=False, model_kwargs="[1]")
    # a model given on the command line does not inherit the smoke model's kwargs
    _, model_args, _, _, _, _ = common.parse_args(recipe, ["--smoke_test", "--model_name_or_path", "resnet18"])
    assert model_args.model_kwargs is None
    # the short aliases work in the recipes too, and --prune_interval beats the recipe's interval in epochs
    _, model_args, data_args, msq_args, run_args, _ = common.parse_args(
        load_recipe("resnet20_cifar10").RECIPE,
        ["--model", "resnet32_cifar", "--train-limit", "9", "--prune_interval", "7"],
    )
    assert model_args.model_name_or_path == "resnet32_cifar" and data_args.max_train_samples == 9
    assert run_args.prune_interval_epochs is None and make_msq_config(msq_args, run_args, 100).prune_interval == 7


# ------------------------------------------------------------------------------------------------
# Smoke runs in-process


@pytest.mark.parametrize("name", RECIPES)
def test_smoke_run_exports_and_reloads_identically(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    report = name == "resnet20_cifar10"  # the report is checked once; plotting costs ~2 s per run
    result = recipe.main(["--smoke_test", "--output_dir", str(tmp_path), "--write_report", str(report).lower()])
    res = result.results
    smoke = {**_common().SMOKE_DEFAULTS, **recipe.RECIPE.smoke}
    assert res["steps"] == smoke["max_steps"]
    assert res["pruning_steps"] >= 1 and res["phase"] == "qat"
    # pruning reached the target; bits fell below the start
    init_bits = PAPER[name]["init_bits"]
    scheme = msq_hf.bit_scheme(result.model)
    assert res["compression"] >= smoke["target_compression"] - 1e-9
    assert min(scheme.values()) < init_bits <= max(scheme.values()) + 2
    assert 0.0 <= res["test_accuracy"] <= 1.0
    if PAPER[name].get("act_bits"):  # the ViT smoke runs keep the paper's 8-bit LSQ activations
        assert res["msq_config"]["act_bits"] == 8 and res["msq_config"]["act_quantizer"] == "lsq"
    # the export reloads with the same bits and bit-identical logits (on inputs the recipe never saw)
    manifest = _check_export(result.export_dir)
    assert res["export_logits_equal"] is True
    reloaded = msq_hf.from_pretrained(result.export_dir)
    assert msq_hf.bit_scheme(reloaded) == scheme == {n: i["bits"] for n, i in manifest["layers"].items()}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    expected, got = _logits(result.model, x), _logits(reloaded, x)
    assert got.shape == (3, res["num_classes"]) and torch.isfinite(got).all()
    assert torch.equal(expected, got)
    history = json.loads((tmp_path / "msq_history.json").read_text())
    assert history["bit_scheme"] == scheme and history["summary"] == {k: res[k] for k in SUMMARY_KEYS}
    assert len(history["history"]) - 1 == res["pruning_steps"]  # the first entry is the start
    if report:
        for png in ("bits_per_layer.png", "bits_timeline.png", "accuracy_vs_compression.png"):
            assert (tmp_path / "report" / png).stat().st_size > 1000
        report_md = (tmp_path / "report" / "report.md").read_text()
        assert "## Bits over training" in report_md and "layer3.2.conv2" in report_md


def test_cli_and_recipe_write_one_history_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``msq-hf train`` and a recipe go through the same pipeline: the same msq_history.json keys and version."""
    from msq_hf.commands.main import main

    recipe_out, cli_out = tmp_path / "recipe", tmp_path / "cli"
    load_recipe("resnet20_cifar10").main(["--smoke_test", "--output_dir", str(recipe_out), "--write_report", "false"])
    code = main(
        ["train", "--dataset", "digits", "--train-limit", "64", "--eval-limit", "32", "--max-steps", "2"]
        + ["--batch-size", "16", "--prune-interval", "1", "--target", "5", "--hessian-probes", "1"]
        + ["--hessian-batch-size", "4", "--evals", "0", "--threads", "1", "--no-progress", "--no-report"]
        + ["--output", str(cli_out)]
    )
    assert code == 0, capsys.readouterr().err
    histories = [json.loads((out / "msq_history.json").read_text()) for out in (recipe_out, cli_out)]
    keys = [f.name for f in dataclasses.fields(RunHistory)]
    for history in histories:
        assert sorted(history) == sorted(keys) and history["version"] == HISTORY_VERSION
        assert list(history["summary"]) == list(SUMMARY_KEYS)
        assert {"model", "data", "msq", "run", "training"} <= set(history["args"])
    assert histories[0]["run"] == "resnet20_cifar10" and histories[1]["run"] == "msq-hf train"
    assert histories[1]["args"]["msq"]["target_compression"] == 5.0 and histories[1]["argv"][0] == "train"
    for out in (recipe_out, cli_out):  # both readable by the report
        data = find_run_data(out)
        assert data.history and data.scheme and data.summary["compression"] >= 5.0 - 1e-9


def test_offline_local_model_folder_and_image_folder(tmp_path: Path) -> None:
    """--model_name_or_path <timm folder> --pretrained true and --dataset_name <image folder> work offline."""
    import numpy as np
    import timm
    from PIL import Image

    kwargs = dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8)
    source = timm.create_model("resnet18", pretrained=False, num_classes=5, **kwargs)
    model_dir = tmp_path / "local_resnet18"
    timm.models.save_for_hf(source, str(model_dir), model_args=dict(kwargs), safe_serialization=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8) // (2 - label)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    recipe = load_recipe("resnet18_imagenet")
    result = recipe.main(
        [
            "--smoke_test",
            "--model_name_or_path",
            str(model_dir),
            "--pretrained",
            "true",
            "--dataset_name",
            str(tmp_path / "images"),
            "--output_dir",
            str(tmp_path / "out"),
            "--write_report",
            "false",
        ]
    )
    res = result.results
    assert res["num_classes"] == 2 and res["train_images"] == 16 and res["model_kind"] == "timm"
    # the pretrained local weights were loaded (the classifier was re-initialised for 2 classes)
    assert result.model.conv1.weight.shape == source.conv1.weight.shape
    assert res["export_logits_equal"] is True
    _check_export(result.export_dir)


def test_offline_local_transformers_folder(tmp_path: Path) -> None:
    """A transformers save_pretrained folder trains through the DeiT recipe and reloads as a transformers model."""
    import transformers

    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    result = load_recipe("deit_tiny").main(
        [
            "--smoke_test",
            "--model_name_or_path",
            str(tmp_path / "vit"),
            "--output_dir",
            str(tmp_path / "out"),
            "--write_report",
            "false",
        ]
    )
    res = result.results
    assert res["model_kind"] == "transformers" and res["export_reloaded_class"] == "ViTForImageClassification"
    assert res["num_classes"] == 10 and result.model.config.id2label[9] in ("Ankle boot", "9")
    assert res["export_logits_equal"] is True and res["compression"] >= 10.0
    reloaded = msq_hf.from_pretrained(result.export_dir)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(result.model, x), _logits(reloaded, x))


# ------------------------------------------------------------------------------------------------
# Launched in subprocesses


def _launch_env() -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MSQ_HF_COMPILE="0",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )


def _accelerate() -> list[str]:
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.skip("the accelerate CLI is not installed")
    return [exe, "launch"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, env=_launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_accelerate_launch_one_process(tmp_path: Path) -> None:
    _run(
        _accelerate()
        + [
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(RECIPES_DIR / "deit_tiny.py"),
            "--smoke_test",
            "--output_dir",
            str(tmp_path),
            "--write_report",
            "false",
        ]
    )
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world_size"] == 1 and res["export_logits_equal"] is True and res["compression"] >= 10.0
    manifest = _check_export(tmp_path / "export")
    model = msq_hf.from_pretrained(tmp_path / "export")
    assert msq_hf.bit_scheme(model) == {n: i["bits"] for n, i in manifest["layers"].items()}
    logits = _logits(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.distributed
def test_two_processes_take_identical_pruning_decisions(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    _run(
        _accelerate()
        + [
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            str(RECIPES_DIR / "resnet20_cifar10.py"),
            "--smoke_test",
            "--output_dir",
            str(tmp_path),
            "--write_report",
            "false",
        ]
    )
    ranks = [json.loads((tmp_path / "ranks" / f"bits_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["history"]) >= 2, "pruning steps must have run"
    assert ranks[0]["history"] == ranks[1]["history"], "the ranks took different pruning decisions"
    assert ranks[0]["bit_scheme"] == ranks[1]["bit_scheme"]
    res = json.loads((tmp_path / "results.json").read_text())
    # DDP really split the data: 48 samples / (8 per device x 2 ranks) = 3 steps per epoch, 6 steps = 2 epochs
    assert res["world_size"] == 2 and res["steps"] == 6
    assert res["export_logits_equal"] is True and min(ranks[0]["bit_scheme"].values()) < 8
    manifest = _check_export(tmp_path / "export")
    assert {n: i["bits"] for n, i in manifest["layers"].items()} == ranks[0]["bit_scheme"]
