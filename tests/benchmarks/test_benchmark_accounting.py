"""benchmarks/accuracy.py and benchmarks/harness.py: both ratios in the tables, the equal-stored-bits pairing, and
one activation-quantizer declaration for every method."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

import msq_hf
import msq_hf.models  # noqa: F401  (registers resnet20_cifar with timm)
from msq_hf.nn.act import LSQActQuantizer, PACTActQuantizer
from msq_hf.report.accounting import method_accounting

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
import harness  # noqa: E402

# ------------------------------------------------------------------------------------------------
# pairing at equal stored bits


def row(method: str, family: str, bits: float, accuracy_: float = 50.0, act: str = "float") -> accuracy.MethodRow:
    return accuracy.MethodRow(
        method=method,
        family=family,
        title=method,
        seeds=[0],
        accuracies=[accuracy_],
        act=act,
        act_recorded=True,
        accounting=method_accounting(family, bits),
        wall_min=1.0,
    )


def test_pairing_picks_the_uniform_run_with_the_same_stored_bits() -> None:
    rows = [
        row("float", "float", 32),
        row("msq16", "msq", 1.98),  # 2.98 stored bits: pairs with 3-bit DoReFa, not the 2-bit one of its paper ratio
        row("msq10.7", "msq", 2.9),  # 3.90 stored bits: no 4-bit run below
        row("msq_ternary", "msq", 1.0),  # 2 stored bits: DoReFa 2-bit
        row("dorefa2", "dorefa", 2),
        row("dorefa3", "dorefa", 3),
        row("csq", "csq", 2.61),  # 3.61 stored bits
    ]
    pairs = {a.method: [p.method for p in ps] for a, ps in accuracy.pair_equal_stored_bits(rows, tolerance=0.25)}
    assert pairs == {"msq16": ["dorefa3"], "msq10.7": [], "msq_ternary": ["dorefa2"]}
    wide = {a.method: [p.method for p in ps] for a, ps in accuracy.pair_equal_stored_bits(rows, tolerance=0.7)}
    assert wide["msq10.7"] == ["csq"]  # nearest first; dorefa3 is 0.9 bit away
    assert wide["msq16"] == ["dorefa3", "csq"]  # 0.02 then 0.63 bit away; never float or another MSQ run


def record(method: str, family: str, seed: int, acc: float, scheme: dict | None, **extra) -> dict:
    numels = {"conv1": 100, "fc": 300}
    paper = 1.0 if scheme is None else method_accounting(family, scheme, numels).paper_ratio
    return {
        "method": method,
        "family": family,
        "seed": seed,
        "accuracy": acc,
        "compression": paper,
        "avg_bits": 32.0,
        "bit_scheme": scheme,
        "wall_s": 60.0,
        "settings": {},
        **extra,
    }


def test_tables_show_both_ratios_and_the_pairs() -> None:
    numels = {"conv1": 100, "fc": 300}
    records = [
        record("float", "float", 0, 90.0, None),
        record("msq16", "msq", 0, 88.0, {"conv1": 3, "fc": 2}, numels=numels),  # 2.25 magnitude, 3.25 stored
        record("dorefa3", "dorefa", 0, 70.0, {"conv1": 3, "fc": 3}),  # no numels: an old record, uniform anyway
        record("bsq", "bsq", 0, 80.0, {"conv1": 6, "fc": 5}),  # no numels: borrowed from the MSQ record
    ]
    table = accuracy.summary_table(records).splitlines()
    assert "| paper ratio (magnitude bits) | stored ratio (sign counted) | stored bits / weight |" in table[0]
    msq = next(line for line in table if "`msq16`" in line)
    assert "| 14.22x | 9.85x | 3.25 | 2.25 |" in msq  # 32*400/900 and 32*400/1300
    assert "| -2.00 |" in msq  # vs float on the same seed
    assert "| 10.67x | 10.67x | 3.00 | 3.00 |" in next(line for line in table if "`dorefa3`" in line)
    assert "| 6.10x | 5.12x | 6.25 | 5.25 |" in next(line for line in table if "`bsq`" in line)
    assert "float ¹" in msq and table[-1].startswith("¹ not recorded")  # no act entry: predates the flags
    pairs = accuracy.pairing_table(records, tolerance=0.25)
    assert "DoReFa 3-bit (`dorefa3`) | 3.00 | 10.67x / 10.67x | 70.00 (1 seed) | +18.00 |" in pairs
    # a record whose layer sizes do not reproduce its own paper ratio is refused
    records[3]["compression"] = 7.0
    with pytest.raises(ValueError, match="bsq seed 0: recomputed paper ratio"):
        accuracy.summary_table(records)


def history_entry(step: int, bits: dict, phase: str = "regularize", forced: bool = False, lam: float = 1.0) -> dict:
    return {"step": step, "bits": bits, "phase": phase, "forced": forced, "reg_strength": lam}


def test_pacing_table_says_who_pruned_and_compares_with_float_from_another_directory() -> None:
    numels = {"conv1": 100, "fc": 300}
    by_threshold = [  # fc loses 2 bits by threshold, then conv1 1 bit in a threshold final round: share 100 %
        history_entry(0, {"conv1": 4, "fc": 4}, lam=0.5),
        history_entry(10, {"conv1": 4, "fc": 2}, lam=2.0),
        history_entry(20, {"conv1": 3, "fc": 2}, phase="final", lam=3.0),
    ]
    by_force = [  # fc loses 1 bit by threshold (300 of 500 weight-bits), then the forced round takes 2 from conv1
        history_entry(0, {"conv1": 4, "fc": 4}),
        history_entry(10, {"conv1": 4, "fc": 3}),
        history_entry(30, {"conv1": 2, "fc": 3}, phase="final", forced=True),
    ]
    records = [
        record("msq16", "msq", 0, 88.0, {"conv1": 3, "fc": 2}, numels=numels, msq_history=by_threshold),
        record("msq16", "msq", 1, 86.0, {"conv1": 2, "fc": 3}, numels=numels, msq_history=by_force),
        record("dorefa3", "dorefa", 0, 70.0, {"conv1": 3, "fc": 3}),  # not an MSQ run: no row
    ]
    floats = [record("float", "float", 0, 89.0, None), record("float", "float", 1, 87.5, None)]
    lines = accuracy.pacing_table(records, floats).splitlines()
    assert len(lines) == 5 and not any("dorefa" in line for line in lines)
    assert lines[2].startswith("| `msq16` | 0 | 88.00 | 89.00 | -1.00 | 14.22x / 9.85x | 100 % | 20 | 0 | 0.5–3 |")
    assert lines[3].startswith("| `msq16` | 1 | 86.00 | 87.50 | -1.50 |") and "| 60 % | 30 | 1 |" in lines[3]
    assert "**87.00 ± 1.41**" in lines[4] and "| **-1.25** (paired SE 0.25) |" in lines[4]
    # without float runs there is nothing to compare with: dashes, no mean difference
    alone = accuracy.pacing_table(records).splitlines()
    assert "| 88.00 | – | – |" in alone[2] and "| **–** |" in alone[4]


def test_summary_reads_float_runs_from_several_directories(tmp_path: Path, capsys) -> None:
    import json

    history = [history_entry(0, {"conv1": 4, "fc": 4}), history_entry(10, {"conv1": 3, "fc": 2}, phase="final")]
    runs, first, second = tmp_path / "msq", tmp_path / "float_a", tmp_path / "float_b"
    for folder in (runs, first, second):
        folder.mkdir()
    for seed, acc in ((0, 88.0), (1, 86.0)):
        rec = record("msq16", "msq", seed, acc, {"conv1": 3, "fc": 2}, numels={"conv1": 100, "fc": 300})
        (runs / f"msq16_seed{seed}.json").write_text(json.dumps({**rec, "msq_history": history}))
    (first / "float_seed0.json").write_text(json.dumps(record("float", "float", 0, 89.0, None)))
    (second / "float_seed1.json").write_text(json.dumps(record("float", "float", 1, 87.0, None)))
    flags = ["--summary", "--results-dir", str(runs), "--float-dir", str(first), str(second)]
    assert accuracy.main(flags) == 0
    out = capsys.readouterr().out
    assert "| 88.00 | 89.00 | -1.00 |" in out and "| 86.00 | 87.00 | -1.00 |" in out
    assert "| **-1.00** (paired SE 0.00) |" in out


def test_pairing_refuses_different_activations() -> None:
    act = {"bits": 4, "quantizer": "pact", "skip_first": True}
    records = [
        record("msq16", "msq", 0, 88.0, {"conv1": 2, "fc": 2}, numels={"conv1": 100, "fc": 300}, act=act),
        record("dorefa3", "dorefa", 0, 70.0, {"conv1": 3, "fc": 3}),  # float activations
    ]
    with pytest.raises(ValueError, match="different activations"):
        accuracy.pairing_table(records)


# ------------------------------------------------------------------------------------------------
# one activation quantizer for every method


def resnet20() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet20_cifar", pretrained=False, num_classes=10, in_chans=1)


def converted(method: str, flags: list[str]) -> torch.nn.Module:
    args = accuracy.build_parser().parse_args(flags)
    model = resnet20()
    accuracy.make_method(method, model, args, total_steps=100, steps_per_epoch=10, seed=0)
    return model


ACCURACY_METHODS = [
    "float",
    "msq16",
    "msq8_fixed",
    "dorefa2",
    "lsq3",
    "bsq",
    "csq",
]  # one per family, and the fixed grid


@pytest.mark.parametrize(
    "flags, first, conv, fc",
    [
        ([], None, None, None),
        (["--act-bits", "4"], None, PACTActQuantizer, PACTActQuantizer),
        (["--act-bits", "4", "--act-quantizer", "auto"], None, PACTActQuantizer, LSQActQuantizer),
        (["--act-bits", "3", "--act-quantizer", "lsq", "--no-act-skip-first"], LSQActQuantizer, LSQActQuantizer, None),
    ],
)
def test_every_accuracy_method_gets_the_declared_act_quantizers(flags, first, conv, fc) -> None:
    signatures = {m: harness.act_signature(converted(m, flags)) for m in ACCURACY_METHODS}
    reference = signatures["msq16"]
    for method, signature in signatures.items():
        assert signature == reference, f"{method} quantizes activations differently from msq16"
    bits = int(flags[1]) if flags else None
    expected_first = None if first is None else (first.__name__, bits)
    assert reference.get("conv1") == expected_first
    if conv is not None:
        assert reference["layer1.0.conv1"] == (conv.__name__, bits)
        assert reference["fc"] == ((fc or conv).__name__, bits)
    else:
        assert reference == {}


def test_every_cost_method_gets_the_same_act_quantizers() -> None:
    act = harness.ActQuant(4, "auto")
    case = harness.Case("tiny", "resnet20_cifar", {"in_chans": 3}, batch=2)
    signatures = {m: harness.act_signature(harness.build(case, m, act=act)[0]) for m in harness.METHODS}
    assert len({tuple(sorted(s.items())) for s in signatures.values()}) == 1, signatures
    assert signatures["float"]["fc"] == ("LSQActQuantizer", 4) and "conv1" not in signatures["float"]


def test_a_method_with_another_act_quantizer_is_caught() -> None:
    model = converted("dorefa2", ["--act-bits", "4"])
    other = converted("msq16", ["--act-bits", "4"])
    model.layer2[0].conv1.act_quant = LSQActQuantizer(4)  # one layer drifts to another quantizer
    assert harness.act_signature(model) != harness.act_signature(other)
    with pytest.raises(RuntimeError, match="'layer2.0.conv1' quantizes its input with LSQActQuantizer"):
        harness.check_act_quantizers(model, harness.ActQuant(4))
    with pytest.raises(RuntimeError, match="layer 'conv1'"):  # the first layer must stay float under skip_first
        first = converted("bsq", ["--act-bits", "4"])
        first.conv1.act_quant = PACTActQuantizer(4)
        harness.check_act_quantizers(first, harness.ActQuant(4))


def test_act_options_only_come_from_the_declaration() -> None:
    with pytest.raises(ValueError, match="act_bits.*ActQuant declaration"):
        harness.convert_model(resnet20(), "dorefa", harness.ActQuant(), bits=2, act_bits=4)
    with pytest.raises(ValueError, match="act_quantizer.*ActQuant declaration"):
        harness.convert_model(resnet20(), "msq", harness.ActQuant(), init_bits=8, act_quantizer="lsq")
    with pytest.raises(ValueError, match="act bits"):
        harness.ActQuant(1)


def test_cost_benchmark_accounting_table() -> None:
    table = harness.accounting_table()
    assert "| msq | 8 | 9 | 4.00x | 3.56x | float |" in table
    assert "| dorefa | 2 | 2 | 16.00x | 16.00x | float |" in table
    assert "| float | 32 | 32 | 1.00x | 1.00x | float |" in table


def random_images_instead_of_fashion_mnist(monkeypatch) -> None:
    """The accuracy loop on 48 random training and 16 test images (no dataset needed)."""
    gen = torch.Generator().manual_seed(0)

    def fake_tensors(split: str, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = 48 if split == "train" else 16
        return torch.randn(n, 1, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    monkeypatch.setattr(accuracy, "load_tensors", fake_tensors)
    monkeypatch.setattr(accuracy, "machine_description", lambda: "test")


def test_result_records_hold_the_act_declaration_and_both_ratios(tmp_path: Path, monkeypatch) -> None:
    """Two short runs through the real loop (random images instead of Fashion-MNIST): each record names its
    activation quantizers (declared and installed, identical across methods) and both ratios."""
    random_images_instead_of_fashion_mnist(monkeypatch)
    flags = ["--epochs", "1", "--batch-size", "16", "--results-dir", str(tmp_path), "--act-bits", "4"]
    args = accuracy.build_parser().parse_args(flags + ["--hessian-batch-size", "8", "--hessian-max-probes", "1"])
    records = {m: accuracy.run_one(m, 0, args, "test") for m in ("dorefa2", "msq16")}
    acts = [r["act"] for r in records.values()]
    assert (
        acts[0]
        == acts[1]
        == {
            "bits": 4,
            "quantizer": "pact",
            "skip_first": True,
            "installed": {"none": 1, "PACTActQuantizer": 21},
        }
    )
    assert records["dorefa2"]["accounting"]["stored_ratio"] == pytest.approx(16.0)
    msq = records["msq16"]["accounting"]
    assert msq["stored_bits"] == pytest.approx(msq["magnitude_bits"] + 1)
    assert msq["paper_ratio"] == pytest.approx(records["msq16"]["compression"])
    assert "pact A4 (first layer float)" in accuracy.summary_table(accuracy.load_results(tmp_path))


def test_the_fixed_grid_trains_msq_layers_at_their_bits_with_nothing_pruned(tmp_path: Path, monkeypatch) -> None:
    """``msq8_fixed`` is MSQ's starting point alone: its layers train at 8 bits (their weights are quantized, unlike
    float's), no bit is pruned and no controller history is recorded; both ratios are those of 8 bits."""
    random_images_instead_of_fashion_mnist(monkeypatch)
    args = accuracy.build_parser().parse_args(["--epochs", "2", "--batch-size", "16", "--results-dir", str(tmp_path)])
    record = accuracy.run_one("msq8_fixed", 0, args, "test")
    assert record["family"] == "msq" and "msq_history" not in record
    assert len(record["bit_scheme"]) == 22 and set(record["bit_scheme"].values()) == {8}
    assert record["accounting"]["paper_ratio"] == pytest.approx(4.0)
    assert record["accounting"]["stored_ratio"] == pytest.approx(32 / 9)
    model = converted("msq8_fixed", [])
    layer = model.layer1[0].conv1
    assert layer.n_bits == 8 and not torch.equal(layer.quantized_weight(), layer.weight)


# ------------------------------------------------------------------------------------------------
# the loop's MSQ schedule and clipping flags


def test_msq_schedule_flags_reach_the_config_and_clipping_lifts_the_lambda_bound() -> None:
    """``--warmup-fraction``/``--target-fraction`` land in the MSQConfig; with ``--max-grad-norm`` the clip
    already bounds the regularizer's pull, so the loop must not also hand the controller its learning rate."""
    flags = ["--warmup-fraction", "0.3", "--target-fraction", "0.7", "--final-round-fraction", "0.85"]
    for clip, expected_lr in (([], 0.05), (["--max-grad-norm", "1"], None)):
        args = accuracy.build_parser().parse_args(flags + clip)
        method = accuracy.make_method("msq16", resnet20(), args, total_steps=100, steps_per_epoch=10, seed=0)
        assert (method.config.warmup_fraction, method.config.target_fraction) == (0.3, 0.7)
        assert method.config.final_round_fraction == 0.85
        method.learning_rate = 0.05
        method.after_step(1, (torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long)))  # before the warm-up
        assert method.ctl.learning_rate == expected_lr
    defaults = accuracy.make_method(
        "msq16", resnet20(), accuracy.build_parser().parse_args([]), total_steps=100, steps_per_epoch=10, seed=0
    )
    assert defaults.config.warmup_fraction == msq_hf.MSQConfig().warmup_fraction


def test_proximal_flags_reach_the_config_and_keep_the_lambda_bound() -> None:
    """``--lsb-update proximal --lsb-units step --qat-scale mse`` land in the MSQConfig; the proximal step is never
    clipped, so the loop hands the controller its learning rate (the lambda bound) even with ``--max-grad-norm``."""
    flags = ["--lsb-update", "proximal", "--lsb-units", "step", "--qat-scale", "mse", "--max-grad-norm", "1"]
    args = accuracy.build_parser().parse_args(flags)
    method = accuracy.make_method("msq16", resnet20(), args, total_steps=100, steps_per_epoch=10, seed=0)
    assert (method.config.lsb_update, method.config.lsb_units, method.config.qat_scale) == ("proximal", "step", "mse")
    method.learning_rate = 0.05
    method.after_step(1, (torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long)))
    assert method.ctl.learning_rate == 0.05


def test_trajectory_plot_draws_seed_zero_of_every_directory(tmp_path: Path) -> None:
    import json

    numels = {"conv1": 100, "fc": 300}
    history = [history_entry(0, {"conv1": 4, "fc": 4}), history_entry(10, {"conv1": 3, "fc": 2}, phase="final")]
    for entry in history:
        entry["avg_bits"] = sum(entry["bits"][n] * numels[n] for n in numels) / 400
    for name, seed in (("default", 0), ("prox", 0), ("prox", 1)):
        (tmp_path / name).mkdir(exist_ok=True)
        rec = record("msq16", "msq", seed, 88.0, {"conv1": 3, "fc": 2}, numels=numels, msq_history=history)
        rec.update(msq_config={"target_compression": 16.0}, steps=390)
        (tmp_path / name / f"msq16_seed{seed}.json").write_text(json.dumps(rec))
    out = accuracy.plot_trajectories([tmp_path / "default", tmp_path / "prox"], tmp_path / "t.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no MSQ run of seed 0"):
        accuracy.plot_trajectories([tmp_path / "missing"], tmp_path / "u.png")


def test_seed_differences_join_directories_and_compare_with_the_same_budget(tmp_path: Path) -> None:
    """Each run is compared with float of its own seed and step count; ``a+b`` makes one series of two directories;
    a run without its float partner, or a seed found twice in one series, is named in the error."""
    import json

    def write(folder: str, method: str, seed: int, acc: float, steps: int = 390) -> None:
        (tmp_path / folder).mkdir(exist_ok=True)
        rec = record(method, "float" if method == "float" else "msq", seed, acc, None, steps=steps)
        (tmp_path / folder / f"{method}_seed{seed}.json").write_text(json.dumps(rec))

    for seed, acc in ((0, 88.0), (1, 87.5), (2, 87.0)):
        write("float", "float", seed, acc)
    write("float_long", "float", 0, 90.0, steps=780)  # another budget: never the partner of a 390-step run
    write("a", "msq16", 0, 87.5)
    write("a", "msq16", 1, 87.0)
    write("b", "msq16", 2, 86.0)
    write("b", "float", 2, 99.0)  # float runs among the series' directories are not series
    floats = accuracy.load_results(tmp_path / "float") + accuracy.load_results(tmp_path / "float_long")
    series = accuracy.seed_differences([f"{tmp_path / 'a'}+{tmp_path / 'b'}"], floats)
    assert series == {"a: msq16, 390 steps": {0: -0.5, 1: -0.5, 2: -1.0}}
    write("long", "msq16", 1, 89.0, steps=780)
    with pytest.raises(SystemExit, match=r"long/msq16_seed1.json: no float run of seed 1 with 780 steps"):
        accuracy.seed_differences([str(tmp_path / "long")], floats)
    write("c", "msq16", 0, 87.9)
    with pytest.raises(SystemExit, match=r"c/msq16_seed0.json: seed 0 of 'a: msq16, 390 steps' is already"):
        accuracy.seed_differences([f"{tmp_path / 'a'}+{tmp_path / 'c'}"], floats)
    assert (
        accuracy.main(
            [
                "--seed-differences",
                str(tmp_path / "a"),
                "--float-dir",
                str(tmp_path / "float"),
                "--plot-out",
                str(tmp_path / "d.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "d.png").stat().st_size > 10_000


def test_every_accuracy_method_has_a_plot_label() -> None:
    """benchmarks/plot_results.py joins points by label: each method of the table needs one, the grid without a
    search must not join the MSQ line, and each uniform family has its own line."""
    import plot_results

    labels = {m: plot_results.label(m) for m in accuracy.METHODS}
    assert all(labels.values())
    assert labels["msq8_fixed"] != labels["msq16"]
    assert labels["lsq3"] == labels["lsq2"] != labels["dorefa3"]
