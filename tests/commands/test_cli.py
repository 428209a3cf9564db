"""The ``msq-hf`` command line: help, one-line errors, and a tiny train -> inspect / report / export run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from msq_hf.commands.common import scheme_summary
from msq_hf.commands.main import main
from msq_hf.data import find_fashion_mnist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESNET20_QUANTIZED_WEIGHTS = 270_896  # 21 convs + fc of resnet20_cifar with 10 classes

needs_fmnist = pytest.mark.skipif(
    find_fashion_mnist() is None, reason="Fashion-MNIST not installed (bash scripts/setup_data.sh)"
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def same_tensors(a: Path, b: Path) -> bool:
    """Same keys and bit-identical tensors. (Whole files may differ: safetensors does not keep the order of
    the metadata keys, so the header bytes are not reproducible.)"""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def assert_one_line_error(err: str, *needles: str) -> str:
    """stderr is exactly one ``msq-hf...: error: ...`` line naming every needle, without a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert lines[0].startswith("msq-hf") and "error:" in lines[0], lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["train", "inspect", "export", "report"]),
        (
            ["train"],
            [
                "--model",
                "--dataset",
                "--train-limit",
                "--eval-limit",
                "--target",
                "--init-bits",
                "--min-bits",
                "--epochs",
                "--max-steps",
                "--batch-size",
                "--lr",
                "--reg-strength",
                "--prune-threshold",
                "--prune-interval",
                "--no-hessian",
                "--act-bits",
                "--output",
                "--seed",
                "--report-to",
            ],
        ),
        (["inspect"], ["DIR_OR_REPO", "--no-verify", "--json"]),
        (["export"], ["CHECKPOINT_DIR", "OUTPUT", "--push-to-hub", "--repo-id"]),
        (["report"], ["RUN_OR_EXPORT_DIR", "--output"]),
    ],
)
def test_help(capsys: pytest.CaptureFixture[str], command: list[str], expected: list[str]) -> None:
    code, out, err = run(capsys, *command, "--help")
    assert code == 0, err
    assert out.startswith("usage: msq-hf" + (f" {command[0]}" if command else ""))
    for option in expected:
        assert option in out, f"{option} missing from '{' '.join(command)} --help'"


def test_train_help_shows_the_demo_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "train", "--help")
    flat = " ".join(out.split())
    assert "(default: resnet20_cifar)" in flat and "(default: fashion_mnist)" in flat
    assert "(default: 16.0)" in flat  # --target


def test_python_m_msq_hf_subprocess(tmp_path: Path) -> None:
    """``python -m msq_hf`` is the same CLI: exit code and one-line error from a real process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run(
        [sys.executable, "-m", "msq_hf", "inspect", str(tmp_path / "no_such_export")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "no_such_export")
    assert bad.stdout == ""


# ------------------------------------------------------------------------------------------------
# bad input -> exit code != 0 and one line naming the culprit


@pytest.mark.parametrize(
    "argv, code, needles",
    [
        (["train", "--target", "0.5"], 2, ["--target", "> 1"]),
        (["train", "--init-bits", "9"], 2, ["--init-bits", "1..8"]),
        (["train", "--batch-size", "0"], 2, ["--batch-size", "positive"]),
        (["train", "--prune-threshold", "1.5"], 2, ["--prune-threshold", "(0, 1)"]),
        (["train", "--act-bits", "1"], 2, ["--act-bits", "2..8"]),
        (["train", "--epochs", "2", "--max-steps", "5"], 2, ["--max-steps", "--epochs"]),
        (["train", "--min-bits", "5", "--init-bits", "4"], 1, ["--min-bits 5", "--init-bits 4"]),
        (["train", "--target", "40"], 1, ["--target 40", "32x"]),
        (["train", "--target", "3", "--init-bits", "8"], 1, ["--target 3", "--init-bits 8"]),
        (["frobnicate"], 2, ["frobnicate"]),
    ],
)
def test_bad_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], code: int, needles: list[str]
) -> None:
    got, _, err = run(capsys, *argv, *(["--output", tmp_path / "o"] if argv[0] == "train" else []))
    assert got == code
    assert_one_line_error(err, *needles)


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == "msq-hf: error: choose a command: train, inspect, export or report"


def test_train_bad_model_and_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", "--model", "no_such_timm_model_xyz", "--output", tmp_path / "a")
    assert code == 1
    assert_one_line_error(err, "--model", "no_such_timm_model_xyz")

    folder = tmp_path / "not_a_model"
    folder.mkdir()
    code, _, err = run(capsys, "train", "--model", folder, "--output", tmp_path / "b")
    assert code == 1
    assert_one_line_error(err, "--model", str(folder / "config.json"))

    # HF_HUB_OFFLINE=1 (conftest): an unknown Hub dataset fails fast
    code, _, err = run(capsys, "train", "--dataset", "nobody/no_such_dataset_xyz", "--output", tmp_path / "c")
    assert code == 1
    assert_one_line_error(err, "--dataset nobody/no_such_dataset_xyz")


def test_train_refuses_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, _, err = run(capsys, "train", "--output", a_file)
    assert code == 1
    assert_one_line_error(err, "--output", "not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    code, _, err = run(capsys, "train", "--output", full)
    assert code == 1
    assert_one_line_error(err, "--output", "not empty", "--overwrite")
    assert (full / "keep.txt").read_text() == "x"


def test_other_commands_bad_paths(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing_dir"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    code, _, err = run(capsys, "inspect", missing)
    assert code == 2
    assert_one_line_error(err, "missing_dir")
    code, _, err = run(capsys, "export", missing, tmp_path / "out")
    assert code == 1
    assert_one_line_error(err, "missing_dir")
    code, _, err = run(capsys, "export", empty, tmp_path / "out")
    assert code == 1
    assert_one_line_error(err, "config.json")
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "report", empty)
    assert code == 1
    assert_one_line_error(err, "empty_dir", "msq_history.json")
    code, _, err = run(capsys, "export", empty, tmp_path / "out", "--push-to-hub")
    assert code == 1
    assert_one_line_error(err, "--repo-id")


def test_export_uses_the_newest_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A Trainer output_dir resolves to its checkpoint-N with the largest N (not the last in name order)."""
    for n in (2, 10, 9):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "config.json").write_text("{}")
    code, _, err = run(capsys, "export", tmp_path, tmp_path / "out")
    assert code == 1
    assert_one_line_error(err, str(tmp_path / "checkpoint-10" / "config.json"))


def test_scheme_summary() -> None:
    assert (
        scheme_summary({"a": 2, "b": 3, "c": 2}, {"a": 10, "b": 30, "c": 60})
        == "3 layers: 2 bits x2, 3 bits x1 (weighted avg 2.30)"
    )
    assert scheme_summary({"a": 1, "b": 1}).endswith("[uniform]")
    assert scheme_summary({}) == "no quantized layers"


# ------------------------------------------------------------------------------------------------
# a tiny real run


TINY_TARGET = 6.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``msq-hf train`` on 128 Fashion-MNIST images for 6 steps (eager kernels: no compile time)."""
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST not installed (bash scripts/setup_data.sh)")
    out = tmp_path_factory.mktemp("cli") / "run"
    previous = os.environ.get("MSQ_HF_COMPILE")
    os.environ["MSQ_HF_COMPILE"] = "0"
    import contextlib
    import io

    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(
                [
                    "train",
                    "--train-limit",
                    "128",
                    "--eval-limit",
                    "64",
                    "--max-steps",
                    "6",
                    "--batch-size",
                    "32",
                    "--prune-interval",
                    "2",
                    "--target",
                    str(TINY_TARGET),
                    "--hessian-probes",
                    "1",
                    "--hessian-batch-size",
                    "8",
                    "--evals",
                    "1",
                    "--eval_after_pruning",
                    "--in_training_eval_samples",
                    "16",
                    "--threads",
                    "1",
                    "--no-progress",
                    "--logging-steps",
                    "2",
                    "--output",
                    str(out),
                ]
            )
    finally:
        if previous is None:
            os.environ.pop("MSQ_HF_COMPILE", None)
        else:
            os.environ["MSQ_HF_COMPILE"] = previous
    assert code == 0, stdout.getvalue()
    return out, stdout.getvalue()


@needs_fmnist
def test_train_writes_everything(tiny_run: tuple[Path, str]) -> None:
    out, console = tiny_run
    for rel in (
        "msq_history.json",
        "export/msq_manifest.json",
        "export/msq_model.safetensors",
        "export/config.json",
        "model/config.json",
        "model/model.safetensors",
        "model/msq_state.json",
        "report/report.md",
        "report/bits_per_layer.png",
        "report/bits_timeline.png",
        "report/training_curves.png",
        "report/accuracy_vs_compression.png",
    ):
        assert (out / rel).is_file(), rel
    for png in (out / "report").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    history = json.loads((out / "msq_history.json").read_text())
    manifest = json.loads((out / "export/msq_manifest.json").read_text())
    assert history["bit_scheme"] == {n: i["bits"] for n, i in manifest["layers"].items()}
    assert sum(history["numels"].values()) == RESNET20_QUANTIZED_WEIGHTS
    assert history["total_steps"] == 6 and history["target_compression"] == TINY_TARGET
    steps = [h["step"] for h in history["history"]]
    # MSQ starts after the warm-up (warmup_fraction 0.05 of 6 steps: step 1), then prunes at later steps
    assert steps[0] == 1 and steps == sorted(steps)
    assert {"threshold_share", "k_flip_rate", "measure_share"} <= set(history["summary"])
    assert any(h["phase"] == "final" for h in history["history"])
    assert any("msq/compression" in e for e in history["log_history"])
    summary = history["summary"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["compression"] >= TINY_TARGET  # the final round meets the target
    assert summary["compression"] == pytest.approx(manifest["totals"]["compression_ratio"])
    assert summary["eval_images"] == 64 and summary["train_images"] == 128 and summary["steps"] == 6
    # evaluations during training (--evals, --eval_after_pruning) score the first 16 eval images only
    in_training = [e for e in history["log_history"] if "eval_runtime" in e]
    pruned_steps = {h["step"] for h in history["history"] if h["pruned"]}
    eval_steps = {int(e["step"]) for e in in_training}
    assert pruned_steps & eval_steps, "an evaluation right after a pruning step"
    assert any(step - 1 in eval_steps for step in pruned_steps & eval_steps), "and one right before it"
    assert all(round(e["eval_samples_per_second"] * e["eval_runtime"]) == 16 for e in in_training)
    assert "max_pruning_eval_drop" in summary
    # the human summary
    assert f"{100 * summary['test_accuracy']:.2f}% on 64 test images" in console
    assert f"{summary['compression']:.2f}x (target 6x" in console
    assert str(out / "export") in console and str(out / "report" / "report.md") in console
    assert "{" not in console  # no raw log dicts on the console


@needs_fmnist
def test_inspect_train_output(capsys: pytest.CaptureFixture[str], tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = tiny_run
    code, text, err = run(capsys, "inspect", out / "export")
    assert code == 0, err
    assert "integrity  : OK" in text and "resnet20_cifar" in text
    code, text, _ = run(capsys, "inspect", out / "export", "--json", "--no-verify")
    assert code == 0
    history = json.loads((out / "msq_history.json").read_text())
    assert json.loads(text)["bit_scheme"] == history["bit_scheme"]
    broken = tmp_path / "broken"
    shutil.copytree(out / "export", broken)
    weights = broken / "msq_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    code, _, err = run(capsys, "inspect", broken)
    assert code == 1
    assert_one_line_error(err, "msq_model.safetensors")

    # `msq-hf inspect ... | head -1`: the reader closes the pipe early; no error text, the shell's 141
    piped = subprocess.run(
        f'{sys.executable} -m msq_hf inspect {out / "export"} | head -n 1; echo "exit=${{PIPESTATUS[0]}}"',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert piped.stdout.splitlines()[0].startswith("msq_hf export:")
    assert piped.stdout.splitlines()[-1] in ("exit=0", "exit=141")  # 0 if everything fit the pipe buffer
    assert "Broken pipe" not in piped.stderr and "error" not in piped.stderr


@needs_fmnist
def test_report_on_train_output(capsys: pytest.CaptureFixture[str], tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = tiny_run
    code, text, err = run(capsys, "report", out, "--output", tmp_path / "rep")
    assert code == 0, err
    paths = [Path(line) for line in text.splitlines()]
    assert {p.name for p in paths} == {
        "bits_per_layer.png",
        "bits_timeline.png",
        "training_curves.png",
        "accuracy_vs_compression.png",
        "report.md",
    }
    assert all(p.parent == tmp_path / "rep" and p.is_file() for p in paths)
    # the export alone has no timeline: only the final bits
    code, text, _ = run(capsys, "report", out / "export", "--output", tmp_path / "rep2")
    assert code == 0
    assert {Path(line).name for line in text.splitlines()} == {"bits_per_layer.png", "report.md"}


@needs_fmnist
def test_export_from_checkpoint(capsys: pytest.CaptureFixture[str], tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = tiny_run
    code, text, err = run(capsys, "export", out / "model", tmp_path / "exp")
    assert code == 0, err
    assert str(tmp_path / "exp") in text
    # same model: the same tensors (packed codes included) as the export written by `train`
    assert same_tensors(tmp_path / "exp/msq_model.safetensors", out / "export/msq_model.safetensors")
    # a train output folder resolves to its model/ subfolder
    code, _, err = run(capsys, "export", out, tmp_path / "exp2")
    assert code == 0, err
    assert same_tensors(tmp_path / "exp2/msq_model.safetensors", out / "export/msq_model.safetensors")
    # an existing export is not overwritten silently
    code, _, err = run(capsys, "export", out / "model", tmp_path / "exp")
    assert code == 1
    assert_one_line_error(err, "exp")
    code, _, err = run(capsys, "export", out / "model", tmp_path / "exp", "--overwrite")
    assert code == 0, err
