"""The recipes as a newcomer runs them: no arguments and no Hub, ``--help``, the console during training.

* ``python recipes/deit_tiny.py`` offline ends in seconds (the interpreter's imports are most of it) with one
  line on stderr naming the ways out (``hf auth login``, ``--dataset_name fashion_mnist``, a local image folder,
  ``--smoke_test``), exit status 2 and no traceback -- it used to retry the Hub for 39 s and print 25 lines;
* online, a gated dataset without a token and an unreachable Hub fail the same way, and a reachable dataset's
  download size is announced before the download starts (``HfApi`` mocked);
* pretrained Hub weights asked for offline fail in one line suggesting ``--pretrained false``;
* ``--help`` starts with the recipe's own flag, and training prints short lines without per-layer ``msq/*``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "recipes"


def _recipe(name: str) -> ModuleType:
    if str(RECIPES_DIR) not in sys.path:
        sys.path.insert(0, str(RECIPES_DIR))
    spec = importlib.util.spec_from_file_location(f"msq_newcomer_{name}", RECIPES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _common() -> ModuleType:
    _recipe("deit_tiny")
    import common  # noqa: PLC0415  (importable once the recipes folder is on sys.path)

    return common


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_no_arguments_offline_is_one_actionable_line(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(RECIPES_DIR / "deit_tiny.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line.startswith("deit_tiny.py: error: --dataset_name ILSVRC/imagenet-1k")
    for needed in ("HF_HUB_OFFLINE=1", "hf auth login", "--dataset_name fashion_mnist", "image folder", "--smoke_test"):
        assert needed in line, needed
    assert proc.stdout.strip() == ""  # nothing was announced, nothing downloaded


def test_gated_or_unreachable_hub_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    common = _common()
    data = common.DataArguments(dataset_name="ILSVRC/imagenet-1k")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)

    def gated(self, repo_id, **kwargs):
        return SimpleNamespace(gated="manual", siblings=[])

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", gated)
    with pytest.raises(common.RecipeSetupError, match=r"gated and no Hub token.*hf auth login.*fashion_mnist"):
        common.check_dataset_access(data)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(common.RecipeSetupError, match=r"Hub is unreachable \(ConnectionError\).*--smoke_test"):
        common.check_dataset_access(data)


def test_download_size_is_announced_before_the_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    common = _common()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    sizes = [60_000_000_000, 80_000_000_000, None]

    def info(self, repo_id, **kwargs):
        assert kwargs.get("files_metadata") is True and kwargs.get("timeout")  # one quick request
        return SimpleNamespace(gated=False, siblings=[SimpleNamespace(size=s) for s in sizes])

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", info)
    said: list[str] = []
    common.check_dataset_access(common.DataArguments(dataset_name="owner/big-images"), said.append)
    assert said == ["downloading owner/big-images from the Hub: 140.0 GB (once; cached for later runs)"]


def test_pretrained_weights_offline_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from huggingface_hub import constants

    common = _common()
    deit = _recipe("deit_tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sys, "argv", ["deit_tiny.py"])
    assert common.command_line(deit.RECIPE, ["--dataset_name", "digits"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--model_name_or_path timm/deit_tiny_patch16_224.fb_in1k" in line and "--pretrained false" in line


def test_help_lists_the_recipe_flags_first(capsys: pytest.CaptureFixture[str]) -> None:
    common = _common()
    deit = _recipe("deit_tiny")
    with pytest.raises(SystemExit):
        common.build_parser(deit.RECIPE).parse_args(["--help"])
    out = capsys.readouterr().out
    options = [word for word in out.split() if word.startswith("[--")]
    assert options[0].startswith("[--smoke_test")
    groups = [line.rstrip(":") for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert groups.index("recipe") < groups.index("model") < groups.index("training (transformers.TrainingArguments)")


def test_training_console_has_short_lines(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSQ_HF_COMPILE", "0")
    deit = _recipe("deit_tiny")
    args = ["--smoke_test", "--dataset_name", "digits", "--output_dir", str(tmp_path), "--write_report", "false"]
    deit.main(args)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[step")]
    assert any("loss" in line and "bits" in line for line in lines)
    assert "msq/" not in out  # no log dicts: the per-layer msq/bits/*, msq/k/* ... values stay in the logs
    assert max(len(line) for line in lines) < 200
