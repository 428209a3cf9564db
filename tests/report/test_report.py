"""msq_hf.report: plots write valid PNGs, the bit table's numbers, finding run data in run / checkpoint / export
folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from msq_hf.report import (
    HISTORY_NAME,
    HISTORY_VERSION,
    ComparisonPoint,
    RunHistory,
    bit_table_markdown,
    find_run_data,
    method_accounting,
    plot_accuracy_vs_compression,
    plot_bits_per_layer,
    plot_bits_timeline,
    plot_seed_differences,
    plot_training_curves,
    write_history,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SCHEME = {"conv1": 4, "layer1.conv": 2, "layer2.conv": 3, "fc": 5}
NUMELS = {"conv1": 432, "layer1.conv": 2304, "layer2.conv": 4608, "fc": 640}
HISTORY = [
    {
        "step": 0,
        "bits": {n: 8 for n in SCHEME},
        "compression": 4.0,
        "avg_bits": 8.0,
        "phase": "regularize",
        "pruned": [],
    },
    {
        "step": 10,
        "bits": {"conv1": 6, "layer1.conv": 5, "layer2.conv": 6, "fc": 7},
        "compression": 5.7,
        "avg_bits": 5.6,
        "phase": "regularize",
        "pruned": ["conv1", "layer1.conv", "layer2.conv", "fc"],
    },
    {
        "step": 20,
        "bits": dict(SCHEME),
        "compression": 11.1,
        "avg_bits": 2.9,
        "phase": "final",
        "pruned": ["layer1.conv", "layer2.conv"],
    },
]
LOG_HISTORY = [
    {"step": 5, "loss": 2.1, "msq/compression": 4.0},
    {"step": 10, "loss": 1.7, "msq/compression": 5.7},
    {"step": 15, "eval_accuracy": 0.55, "eval_loss": 1.2},
    {"step": 30, "eval_accuracy": 0.71, "eval_loss": 0.9},
]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ------------------------------------------------------------------------------------------------
# plots


def test_plots_write_pngs(tmp_path: Path) -> None:
    paths = [
        plot_bits_per_layer(SCHEME, tmp_path / "a" / "bits.png", NUMELS),
        plot_bits_timeline(HISTORY, tmp_path / "timeline.png", NUMELS, total_steps=30),
        plot_training_curves(HISTORY, tmp_path / "curves.png", LOG_HISTORY, target=10.0),
        plot_accuracy_vs_compression(
            [("MSQ", 8.1, 11.1, 0.71), ("DoReFa 2-bit", 16.0, 16.0, 0.64), ("DoReFa 4-bit", 8.0, 8.0, 0.7)],
            tmp_path / "acc.png",
        ),
        plot_seed_differences({"grid": {0: 0.1, 1: -1.2}, "msq": {0: -0.4, 1: -1.1, 2: -0.9}}, tmp_path / "d.png", 0.5),
    ]
    assert paths[0] == tmp_path / "a" / "bits.png"  # parent folder created
    for path in paths:
        width, height = png_size(path)
        assert width >= 300 and height >= 200


def test_bits_per_layer_height_grows_with_layers(tmp_path: Path) -> None:
    small = plot_bits_per_layer(SCHEME, tmp_path / "small.png")
    big = plot_bits_per_layer({f"blocks.{i}.mlp.fc1": 1 + i % 8 for i in range(60)}, tmp_path / "big.png")
    assert png_size(big)[1] > 2 * png_size(small)[1]  # one readable row per layer


def test_training_curves_from_history_only(tmp_path: Path) -> None:
    png_size(plot_training_curves(HISTORY, tmp_path / "c.png"))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: plot_bits_per_layer({}, p), "empty"),
        (lambda p: plot_bits_timeline([{"step": 3}], p), "no entry with 'bits'"),
        (lambda p: plot_training_curves([], p, [{"step": 1, "loss": 2.0}]), "neither compression"),
        (lambda p: plot_accuracy_vs_compression([], p), "no \\(method"),
        (lambda p: plot_accuracy_vs_compression([("LSQ", float("nan"), 8.0, 0.5)], p), "'LSQ'"),
        (lambda p: plot_accuracy_vs_compression([("MSQ", 16.0, 0.5)], p), "stored ratio, paper ratio"),
        (lambda p: plot_seed_differences({}, p), "at least one seed"),
        (lambda p: plot_seed_differences({"msq": {0: -0.5}, "grid": {}}, p), "at least one seed"),
    ],
)
def test_plot_errors(tmp_path: Path, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------
# bit table


def test_bit_table_numbers() -> None:
    """Both ratios side by side: paper 32*400/1400, stored (sign counted) 32*400/(300+1500); the share column is
    the share of the stored bits."""
    table = bit_table_markdown({"a": 2, "b": 4}, {"a": 100, "b": 300})
    lines = table.strip().splitlines()
    assert lines[0] == "| layer | weights | bits | stored bits | share of stored bits |"
    assert lines[2] == "| `a` | 100 | 2 | 3 | 16.7% |"  # 300 of 1800 stored bits
    assert lines[3] == "| `b` | 300 | 4 | 5 | 83.3% |"
    assert lines[4] == (
        "| **total** (2 layers) | 400 | 3.50 avg | 4.50 avg | paper ratio (magnitude bits) 9.14x, "
        "stored ratio (sign counted) 7.11x |"
    )
    # a DoReFa-normalized MSQ run stores its n bits as they are: both ratios agree
    dorefa = bit_table_markdown({"a": 2, "b": 4}, {"a": 100, "b": 300}, wnorm="dorefa")
    assert "| `a` | 100 | 2 | 2 | 14.3% |" in dorefa and "9.14x, stored ratio (sign counted) 9.14x" in dorefa


def test_bit_table_without_numels_and_errors() -> None:
    table = bit_table_markdown({"x.conv": 3, "y.fc": 1})
    assert table.splitlines() == [
        "| layer | bits | stored bits |",
        "|---|---:|---:|",
        "| `x.conv` | 3 | 4 |",
        "| `y.fc` | 1 | 2 |",
    ]
    with pytest.raises(ValueError, match="empty"):
        bit_table_markdown({})
    with pytest.raises(ValueError, match="y.fc"):
        bit_table_markdown({"x.conv": 3, "y.fc": 1}, {"x.conv": 10})


# ------------------------------------------------------------------------------------------------
# find_run_data


def write_run_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / HISTORY_NAME).write_text(
        json.dumps(
            {
                "history": HISTORY,
                "log_history": LOG_HISTORY,
                "numels": NUMELS,
                "bit_scheme": SCHEME,
                "target_compression": 10.0,
                "total_steps": 30,
                "summary": {"test_accuracy": 0.71, "compression": 11.1},
                "baselines": [["DoReFa 2-bit", 16.0, 0.64]],
            }
        )
    )
    return root


def write_checkpoint(folder: Path, step: int, scheme: dict[str, int]) -> Path:
    folder.mkdir(parents=True)
    (folder / "msq_state.json").write_text(
        json.dumps({"bits": scheme, "history": HISTORY[: 1 + step // 10], "total_steps": 30, "schedule": {}})
    )
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": LOG_HISTORY[: step // 5]}))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": "x",
                "quantization_config": {"quant_method": "msq", "target_compression": 10.0, "count_sign_bit": True},
            }
        )
    )
    shapes = {"conv1": (16, 3, 3, 3), "layer1.conv": (16, 16, 3, 3), "layer2.conv": (32, 16, 3, 3), "fc": (10, 64)}
    save_file(
        {f"{n}.weight": torch.zeros(s) for n, s in shapes.items()} | {"fc.bias": torch.zeros(10)},
        str(folder / "model.safetensors"),
    )
    return folder


def test_find_run_data_run_dir(tmp_path: Path) -> None:
    data = find_run_data(write_run_dir(tmp_path / "run"))
    assert data.history == HISTORY and data.log_history == LOG_HISTORY
    assert data.scheme == SCHEME and data.numels == NUMELS
    assert data.target == 10.0 and data.total_steps == 30
    assert data.baselines == [("DoReFa 2-bit", 16.0, 0.64)]
    assert data.files == [str(tmp_path / "run" / HISTORY_NAME)]


def test_find_run_data_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "out"
    write_checkpoint(root / "checkpoint-5", 5, {n: 7 for n in SCHEME})
    write_checkpoint(root / "checkpoint-20", 20, SCHEME)  # newest by number, not by name
    data = find_run_data(root)
    assert data.scheme == SCHEME
    assert len(data.history) == 3 and len(data.log_history) == 4
    assert data.target == 10.0 and data.count_sign_bit is True and data.total_steps == 30
    # layer sizes come from the safetensors header of the checkpoint
    assert data.numels == {"conv1": 432, "layer1.conv": 2304, "layer2.conv": 4608, "fc": 640}
    assert all("checkpoint-20" in f for f in data.files)
    # a checkpoint folder passed directly
    assert find_run_data(root / "checkpoint-5").scheme == {n: 7 for n in SCHEME}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm

    import msq_hf
    import msq_hf.models  # noqa: F401

    model = timm.create_model("resnet20_cifar", num_classes=10)
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8, target_compression=10.0))
    scheme = {n: 2 + i % 5 for i, n in enumerate(msq_hf.bit_scheme(model))}
    msq_hf.set_bit_scheme(model, scheme)
    out = tmp_path_factory.mktemp("report") / "export"
    msq_hf.export(model.eval(), out)
    return out


def test_find_run_data_export(export_dir: Path) -> None:
    manifest = json.loads((export_dir / "msq_manifest.json").read_text())
    data = find_run_data(export_dir)
    assert data.scheme == {n: i["bits"] for n, i in manifest["layers"].items()}
    assert len(set(data.scheme.values())) == 5
    assert sum(data.numels.values()) == manifest["totals"]["quantized_params"]
    assert data.history == [] and data.target == 10.0
    written = write_report(export_dir, export_dir.parent / "rep")
    assert [p.name for p in written] == ["bits_per_layer.png", "report.md"]
    text = (export_dir.parent / "rep" / "report.md").read_text()
    totals = manifest["totals"]
    assert "| **total** (22 layers)" in text
    # the report's two ratios are the export's own two totals (what the file really stores)
    assert f"paper ratio (magnitude bits) {totals['compression_ratio']:.2f}x" in text
    assert f"stored ratio (sign counted) {totals['storage_compression_ratio']:.2f}x" in text
    assert totals["storage_compression_ratio"] < totals["compression_ratio"]


def test_write_report_run_dir(tmp_path: Path) -> None:
    root = write_run_dir(tmp_path / "run")
    written = write_report(root)
    names = [p.name for p in written]
    assert names == [
        "bits_per_layer.png",
        "bits_timeline.png",
        "training_curves.png",
        "accuracy_vs_compression.png",
        "report.md",
    ]
    assert all(p.parent == root / "report" for p in written)
    text = (root / "report" / "report.md").read_text()
    for png in names[:-1]:
        assert f"]({png})" in text  # every plot is linked, relative to report.md
        png_size(root / "report" / png)
    assert "| test_accuracy | 0.71 |" in text
    # pruning history row: both ratios from the entry's bits, not the entry's own 11.1 -- paper
    # 32*7984/(4*432+2*2304+3*4608+5*640) = 32*7984/23360, stored 32*7984/(23360+7984)
    assert "| 20 | final | 10.94x | 8.15x | 2.90 |" in text
    assert "| paper ratio (magnitude bits) | 2.93 | 10.94x |" in text
    assert "| stored ratio (sign counted, `wnorm=signmag`) | 3.93 | 8.15x |" in text


def test_find_run_data_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing usable")
    with pytest.raises(FileNotFoundError, match="msq_history.json.*msq_state.json.*msq_manifest.json") as info:
        find_run_data(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_run_data(empty / "notes.txt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / HISTORY_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=f"{HISTORY_NAME} is not valid JSON"):
        find_run_data(bad)
    with pytest.raises(FileNotFoundError):
        write_report(empty)
    assert not (empty / "report").exists()  # nothing written for an unusable folder


def test_export_bits_win_but_model_order_is_kept(tmp_path: Path) -> None:
    """A run folder with an export: bits from the manifest (what was stored), order from the history (model order,
    not the manifest's alphabetical key order)."""
    root = write_run_dir(tmp_path / "run")
    stored = {"conv1": 4, "fc": 6, "layer1.conv": 2, "layer2.conv": 3}  # alphabetical, fc differs from SCHEME
    (root / "export").mkdir()
    (root / "export" / "msq_manifest.json").write_text(
        json.dumps({"layers": {n: {"bits": b, "numel": NUMELS[n]} for n, b in stored.items()}})
    )
    data = find_run_data(root)
    assert list(data.scheme) == list(SCHEME)
    assert data.scheme == stored
    assert data.files[-1] == str(root / "export" / "msq_manifest.json")


def test_write_history_is_what_find_run_data_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One schema: the record written by write_history comes back through find_run_data; this run's accuracy (a
    fraction) and the paper baselines (percent) land on one percent axis."""
    record = RunHistory(
        run="unit",
        summary={"test_accuracy": 0.71, "compression": 11.1, "eval_images": None},
        history=HISTORY,
        log_history=LOG_HISTORY,
        bit_scheme=SCHEME,
        numels=NUMELS,
        target_compression=10.0,
        count_sign_bit=True,
        total_steps=30,
        msq_config={"init_bits": 8},
        baselines=[["paper", 10.0, 69.5]],
    )
    path = write_history(tmp_path / "run", record)
    raw = json.loads(path.read_text())
    assert path.name == HISTORY_NAME and next(iter(raw)) == "version" and raw["version"] == HISTORY_VERSION
    data = find_run_data(tmp_path / "run")
    assert (data.history, data.log_history, data.scheme, data.numels) == (HISTORY, LOG_HISTORY, SCHEME, NUMELS)
    assert (data.target, data.count_sign_bit, data.total_steps) == (10.0, True, 30)
    assert data.baselines == [("paper", 10.0, 69.5)]
    import msq_hf.report.markdown as markdown

    drawn: list = []
    plot = markdown.plot_accuracy_vs_compression

    def spy(points: list, path: Path) -> Path:
        drawn.extend(points)
        return plot(points, path)

    monkeypatch.setattr(markdown, "plot_accuracy_vs_compression", spy)
    written = write_report(tmp_path / "run")
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "accuracy_vs_compression.png" in {p.name for p in written}
    # the paper point has no family: "paper" is a uniform label, stored as quoted; this run gets both ratios from
    # its scheme (numels known), not from the summary's 11.1
    own = method_accounting("msq", SCHEME, NUMELS)
    assert drawn == [
        ComparisonPoint("paper", 10.0, 10.0, 69.5),
        ComparisonPoint("MSQ (this run)", own.stored_ratio, own.paper_ratio, pytest.approx(71.0)),
    ]
    assert "eval_images" not in text  # a None entry (a step switched off) is not listed
