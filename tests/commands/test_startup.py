"""A CLI that answers at once: ``import msq_hf`` and ``msq-hf [COMMAND] --help`` import no heavy library, and the
lazy package still registers with transformers and timm, in either import order.

Every check runs in a fresh interpreter and looks at ``sys.modules`` (or ``python -X importtime``), not at the
clock: timings are in benchmarks/startup.py and docs/cli.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, TINY_MODELS

import msq_hf
from msq_hf.commands.main import COMMANDS

HEAVY = ("torch", "transformers", "timm", "datasets", "matplotlib")
# `msq-hf train --help` needs transformers.hf_argparser (the ecosystem's dataclass parser), nothing heavier
TRAIN_PARSER_HEAVY = (
    "torch",
    "transformers.training_args",
    "transformers.modeling_utils",
    "transformers.trainer",
    "timm",
    "datasets",
    "matplotlib",
)


def python(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python *args`` in a fresh interpreter, offline, from a neutral directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)[:200]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def heavy_loaded_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The ``heavy`` modules in ``sys.modules`` after running ``code`` in a fresh interpreter (in that order)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    return json.loads(python("-c", probe).stdout.splitlines()[-1])


def imported_by(*argv: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Every module ``python -m msq_hf *argv`` imports (from ``-X importtime``), and the finished process."""
    proc = python("-X", "importtime", "-m", "msq_hf", *argv, check=False)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return names, proc


def test_import_msq_hf_imports_no_heavy_library() -> None:
    assert heavy_loaded_after("import msq_hf\nassert msq_hf.__version__") == []
    # the schedule is pure Python (docs/architecture.md): a public name of it stays light too
    assert heavy_loaded_after("from msq_hf import BitPruningSchedule, MSQError") == []


@pytest.mark.parametrize(
    ("argv", "code", "shown"),
    [
        (["--help"], 0, "inspect"),
        (["--version"], 0, msq_hf.__version__),
        ([], 2, "choose a command"),
        (["inspect", "--help"], 0, "--no-verify"),
        (["export", "--help"], 0, "--force-overwrite"),
        (["report", "--help"], 0, "RUN_OR_EXPORT_DIR"),
        (["inspect"], 2, "the following arguments are required: DIR_OR_REPO"),
        (["nosuchcommand"], 2, "invalid choice"),
    ],
)
def test_help_and_usage_errors_import_no_heavy_library(argv: list[str], code: int, shown: str) -> None:
    names, proc = imported_by(*argv)
    assert "msq_hf.commands.main" in names  # the probe sees the CLI's imports
    assert proc.returncode == code, proc.stderr[-2000:]
    assert shown in proc.stdout + proc.stderr
    assert sorted(names & set(HEAVY)) == []
    # no command module: their code loads only when the command runs
    assert {n for n in names if n.startswith("msq_hf.commands.")} == {"msq_hf.commands.main", "msq_hf.commands.common"}


def test_train_help_lists_the_generated_flags_without_torch() -> None:
    names, proc = imported_by("train", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--init-bits" in proc.stdout and "--target" in proc.stdout and "--epochs" in proc.stdout
    assert "--model" in proc.stdout and "--prune_interval_epochs" in proc.stdout
    # the flags come from the torch-free declarations (msq_hf.params) and transformers.hf_argparser alone
    assert {"msq_hf.params", "transformers.hf_argparser"} <= names
    assert sorted(names & set(TRAIN_PARSER_HEAVY)) == []
    # -X importtime does not log importlib.import_module (how main loads a command's parser): ask sys.modules
    code = "from msq_hf.commands.main import main\nassert main(['train', '--help']) == 0"
    watched = (*TRAIN_PARSER_HEAVY, "msq_hf.config", "msq_hf.commands.train", "msq_hf.commands.train_args")
    assert heavy_loaded_after(code, watched) == ["msq_hf.commands.train_args"]  # the parser, not the runner


TRAIN_PARSE = """
from msq_hf.commands.main import build_parser
from msq_hf.commands.train_args import parse_namespace
parser = build_parser("train")
args = parser.parse_args({argv!r})
model, data, msq, train, run = parse_namespace(args)
values = msq.config_values()
print(values["init_bits"], values["target_compression"], values["hessian_guided"], train.epochs, data.dataset_name)
"""


def test_train_flags_are_parsed_and_checked_without_torch() -> None:
    argv = ["train", "--init-bits", "6", "--target", "10", "--no-hessian", "--epochs", "2"]
    code = TRAIN_PARSE.format(argv=argv)
    assert python("-c", code).stdout.split() == ["6", "10.0", "False", "2.0", "fashion_mnist"]
    assert heavy_loaded_after(code, TRAIN_PARSER_HEAVY) == []


def test_every_command_is_listed_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    from msq_hf.commands.main import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, spec in COMMANDS.items():
        assert f"{name}  " in out and spec.help in out, name


def test_public_names_resolve_lazily() -> None:
    assert "__version__" in msq_hf.__all__ and len(msq_hf.__all__) == len(set(msq_hf.__all__))
    namespace: dict[str, object] = {}
    exec(f"from msq_hf import {', '.join(msq_hf.__all__)}", namespace)
    for name in msq_hf.__all__:
        assert namespace[name] is getattr(msq_hf, name), name
        assert name in dir(msq_hf)
    assert msq_hf.MSQConfig.__module__ == "msq_hf.config" and msq_hf.export.__module__ == "msq_hf.io.export"
    with pytest.raises(AttributeError, match="no attribute 'nosuchname'"):
        msq_hf.nosuchname  # noqa: B018
    # a subpackage is still imported by the import system, not shadowed by the lazy names
    exec("from msq_hf import report as r", namespace)
    assert namespace["r"].__name__ == "msq_hf.report"


def test_a_fresh_interpreter_resolves_the_public_names() -> None:
    code = "import msq_hf\nfor n in msq_hf.__all__: getattr(msq_hf, n)\nprint(msq_hf.MSQTrainer.__name__)"
    assert python("-c", code).stdout.split()[-1] == "MSQTrainer"


# --------------------------------------------------------------------------------------------------------------
# registration with transformers and timm without eager imports


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny HF ViT export (mixed bits) and a file with (inputs, logits of msq_hf.from_pretrained)."""
    folder = tmp_path_factory.mktemp("startup")
    torch.manual_seed(0)
    model = TINY_MODELS["hf/vit"]().eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    scheme = {name: 2 + i % 6 for i, name in enumerate(msq_hf.bit_scheme(model))}
    msq_hf.set_bit_scheme(model, scheme)
    msq_hf.export(model, folder / "export")
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref = msq_hf.from_pretrained(folder / "export")(pixel_values=x).logits
    torch.save((x, ref), folder / "reference.pt")
    return folder / "export", folder / "reference.pt"


LOAD_WITH_TRANSFORMERS = """
from transformers import AutoModelForImageClassification
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from msq_hf.io.format import MANIFEST_NAME

model = AutoModelForImageClassification.from_pretrained({export!r})
x, ref = torch.load({reference!r})
with torch.no_grad():
    assert torch.equal(model(pixel_values=x).logits, ref), "logits differ from msq_hf.from_pretrained"
assert type(model.hf_quantizer) is msq_hf.MSQQuantizer, type(model.hf_quantizer)
assert AUTO_QUANTIZER_MAPPING["msq"] is msq_hf.MSQQuantizer  # the stand-in is gone after first use
model.save_pretrained({resaved!r})  # the save hooks are bound: an MSQ model saves as a packed export
assert os.path.isfile(os.path.join({resaved!r}, MANIFEST_NAME)), os.listdir({resaved!r})
print("ok")
"""

IMPORT_ORDERS = {
    "msq_hf first": "import os, sys, torch\nimport msq_hf\nassert 'transformers' not in sys.modules\n",
    "transformers first": (
        "import os, sys, torch\nimport transformers\nfrom transformers import AutoModelForImageClassification, "
        "PreTrainedModel\nimport transformers.quantizers.auto\nimport msq_hf\n"
    ),
    "msq_hf, then its quantizer module": (
        "import os, sys, torch\nimport msq_hf\nfrom msq_hf.integrations.transformers import MSQQuantizer\n"
    ),
}


@pytest.mark.parametrize("order", list(IMPORT_ORDERS))
def test_transformers_loads_an_export_after_import_msq_hf(
    order: str, vit_export: tuple[Path, Path], tmp_path: Path
) -> None:
    export, reference = vit_export
    body = LOAD_WITH_TRANSFORMERS.format(export=str(export), reference=str(reference), resaved=str(tmp_path / "re"))
    assert python("-c", IMPORT_ORDERS[order] + textwrap.dedent(body)).stdout.split()[-1] == "ok"


@pytest.mark.parametrize(
    "imports",
    ["import msq_hf\nimport timm", "import timm\nimport msq_hf", "import msq_hf\nfrom timm import create_model"],
)
def test_timm_creates_the_cifar_resnets_after_import_msq_hf(imports: str) -> None:
    code = f"""{imports}
import timm
model = timm.create_model("resnet20_cifar", num_classes=7, in_chans=1)
assert model.fc.out_features == 7 and model.conv1.in_channels == 1
assert {{"resnet20_cifar", "resnet32_cifar", "resnet56_cifar"}} <= set(timm.list_models("resnet*_cifar"))
print("ok")
"""
    assert python("-c", code).stdout.split()[-1] == "ok"


def test_quantizer_registry_holds_the_real_class_once_it_is_loaded() -> None:
    code = """
import msq_hf
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
assert AUTO_QUANTIZATION_CONFIG_MAPPING["msq"] is msq_hf.MSQConfig
stand_in = AUTO_QUANTIZER_MAPPING["msq"]
assert stand_in is not msq_hf.MSQQuantizer and stand_in.msq_hf_stand_in
assert AUTO_QUANTIZER_MAPPING["msq"] is msq_hf.MSQQuantizer
quantizer = stand_in(msq_hf.MSQConfig(init_bits=5), pre_quantized=False)
assert type(quantizer) is msq_hf.MSQQuantizer and quantizer.quantization_config.init_bits == 5
print("ok")
"""
    assert python("-c", code).stdout.split()[-1] == "ok"
