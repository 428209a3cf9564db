"""Bad training inputs fail before training, with one line naming what is wrong (issue 12, items 8 and 10).

* an image folder with one class (``imagefolder`` then has no label column at all);
* images PIL cannot read (found at load time, not when training reaches them);
* a ``--model`` folder whose weights are only a pickle (never unpickled: it could run any code).
"""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import msq_hf
from msq_hf.commands.main import main
from msq_hf.data import load_image_dataset
from msq_hf.pipeline.model import resolve_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("hf_home")  # datasets' cache goes to a throwaway folder
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def image_folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (12, 12), (40 * i, 10 * j, 0)).save(root / name / f"{j}.png")
    return root


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("msq-hf train: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("layout", ["root", "split"])
def test_one_class_image_folder_says_so(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "pets"
    image_folder(root / "train" if layout == "split" else root, ["cat"])
    with pytest.raises(ValueError, match=r"has only one class sub-folder \('cat'\).*at least two classes"):
        load_image_dataset(root, "train")


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="has no class sub-folders"):
        load_image_dataset(tmp_path / "flat", "train")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not an image at all", id="text"),
        pytest.param(None, id="truncated-png"),
    ],
)
def test_unreadable_images_are_found_before_training(tmp_path: Path, content: bytes | None) -> None:
    root = image_folder(tmp_path / "pets", ["cat", "dog"])
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "broken.png").write_bytes(good[: len(good) // 2] if content is None else content)
    with pytest.raises(ValueError, match=r"1 of 7 images cannot be read: .*broken\.png \(") as info:
        load_image_dataset(root, "train", image_size=8)
    assert "\n" not in str(info.value)
    (root / "dog" / "broken.png").unlink()
    assert len(load_image_dataset(root, "train", image_size=8)) == 6


def test_cli_train_reports_a_one_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = image_folder(tmp_path / "pets", ["cat"])
    code = main(["train", "--model", "resnet20_cifar", "--dataset", str(root), "--output", str(tmp_path / "o")])
    assert code == 1
    line = one_error_line(capsys)
    assert "only one class" in line and "cat" in line and "label column" not in line


class Payload:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def pickle_checkpoint(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = ViTForImageClassification(cfg)
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "payload": Payload(marker)}, folder / name)
    return folder


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_checkpoints_are_refused_without_unpickling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    marker = tmp_path / "unpickled"
    folder = pickle_checkpoint(tmp_path / "ckpt", marker, name)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_load)
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(ValueError, match=rf"only in pickle files \({name}\).*never loads"):
        resolve_model(str(folder))
    code = main(["train", "--model", str(folder), "--dataset", "digits", "--output", str(tmp_path / "o")])
    assert code == 1
    line = one_error_line(capsys)
    assert f"--model {folder}" in line and name in line and "safetensors" in line
    code = main(["export", str(folder), str(tmp_path / "exp")])
    assert code == 1
    assert "CHECKPOINT_DIR" in one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "exp").exists()


def test_safetensors_next_to_trainer_pickles_is_fine(tmp_path: Path) -> None:
    """A Trainer checkpoint holds optimizer.pt etc. next to model.safetensors: the model loads, no pickle read."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "ckpt")
    torch.save({"state": {}}, tmp_path / "ckpt" / "optimizer.pt")
    spec = resolve_model(str(tmp_path / "ckpt"))
    assert spec.kind == "transformers" and msq_hf is not None
