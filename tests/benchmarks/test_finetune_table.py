"""benchmarks/finetune_table.py and finetune_pretrained.py: result names, both ratios per method, seed means, the
equal-stored-bits pairing and the migration of the former MSQ result names."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

import msq_hf.report

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import finetune_pretrained  # noqa: E402
import finetune_table as ft  # noqa: E402


def record(method: str, seed: int, acc: float, bits: int | None = None, **summary: float) -> dict:
    rec = {"model": "resnet18", "method": method, "bits": bits, "seed": seed, "float_test_accuracy": 0.923}
    rec["summary"] = {"test_accuracy": acc, **summary}
    if method == "msq":
        rec["summary"].setdefault("compression", 32 / 3)
    return rec


def test_result_names_and_method_checks() -> None:
    assert ft.result_stem("resnet18", "msq", None, 2) == "resnet18_msq_seed2"
    assert ft.result_stem("resnet18", "dorefa", 4, 0) == "resnet18_dorefa_w4_seed0"
    assert ft.result_stem("resnet18", "float", None, 1) == "resnet18_float_seed1"
    with pytest.raises(ValueError, match="required"):
        ft.check_method("dorefa", None)
    with pytest.raises(ValueError, match="not used"):
        ft.check_method("float", 4)
    with pytest.raises(ValueError, match="unknown method"):
        ft.check_method("bsq", None)
    assert ft.result_stem("resnet18", "lsq", 3, 0, tag="clip0") == "resnet18_lsq_w3_clip0_seed0"
    with pytest.raises(ValueError, match="tag"):
        ft.result_stem("resnet18", "msq", None, 0, tag="a/b")


def test_accounting_counts_the_sign_for_msq_only() -> None:
    msq = ft.record_accounting(record("msq", 0, 0.9))  # paper 10.67x: 3 magnitude bits + sign
    assert msq.paper_ratio == pytest.approx(32 / 3)
    assert msq.stored_bits == pytest.approx(4.0) and msq.stored_ratio == pytest.approx(8.0)
    w4, w3 = ft.record_accounting(record("dorefa", 0, 0.9, 4)), ft.record_accounting(record("dorefa", 0, 0.9, 3))
    assert (w4.paper_ratio, w4.stored_ratio) == (pytest.approx(8.0), pytest.approx(8.0))
    assert w3.stored_ratio == pytest.approx(32 / 3)
    assert ft.record_accounting(record("float", 0, 0.9)).stored_ratio == pytest.approx(1.0)
    # a recorded bit scheme wins over the paper ratio: 100 weights at 2 bits and 300 at 4 -> 3.5 bits, 4.5 stored
    scheme = {**record("msq", 0, 0.9), "bit_scheme": {"a": 2, "b": 4}, "numels": {"a": 100, "b": 300}}
    assert ft.record_accounting(scheme).stored_bits == pytest.approx(4.5)
    legacy = record("msq", 0, 0.9)
    del legacy["method"]  # results written before --method are MSQ runs
    assert ft.record_method(legacy) == "msq"


def test_table_gives_seed_means_spread_and_the_float_difference() -> None:
    records = [
        record("msq", 1, 0.918, threshold_share=1.0, forced_round_layers=0, max_pruning_eval_drop=0.01),
        record("msq", 0, 0.914, threshold_share=0.9, forced_round_layers=2, max_pruning_eval_drop=0.03),
        record("float", 0, 0.925),
        record("float", 1, 0.921),
        record("dorefa", 0, 0.90, 4),
    ]
    groups = ft.group_records(records)
    assert [(g.method, g.bits) for g in groups] == [("msq", None), ("float", None), ("dorefa", 4)]
    assert groups[0].seeds == [0, 1]
    assert ft.vs_float(groups[0], groups) == pytest.approx(91.6 - 92.3)
    text = ft.table(records)
    spread = statistics.stdev([91.4, 91.8])
    assert f"91.60 ± {spread:.2f} (91.40, 91.80)" in text
    assert "| -0.70 |" in text and "| 95.0 % |" in text  # vs float; mean threshold share
    assert "| 8.00x | 8.00x |" in text  # DoReFa W4: paper = stored
    assert "| 10.67x | 8.00x |" in text  # MSQ at 3 magnitude bits


def test_pairing_puts_msq_beside_the_uniform_run_with_the_same_stored_bits() -> None:
    records = [record("msq", 0, 0.915), record("dorefa", 0, 0.90, 4), record("dorefa", 0, 0.88, 3)]
    lines = ft.pairing_table(records).splitlines()[2:]
    assert len(lines) == 1 and "DoReFa W4" in lines[0] and "+1.50" in lines[0]
    alone = ft.pairing_table([record("msq", 0, 0.915), record("dorefa", 0, 0.88, 3)])
    assert "needs a uniform 4-bit run" in alone


def test_tagged_runs_form_their_own_rows_and_pairs() -> None:
    records = [
        record("msq", 0, 0.915),
        record("dorefa", 0, 0.90, 4),
        {**record("msq", 0, 0.92), "tag": "clip0"},
        {**record("float", 0, 0.93), "tag": "clip0"},
    ]
    groups = ft.group_records(records)
    assert [g.title for g in groups] == ["MSQ", "DoReFa W4", "MSQ [clip0]", "float [clip0]"]
    assert ft.vs_float(groups[0], groups) is None  # no untagged float run: not compared with the clip0 one
    assert ft.vs_float(groups[2], groups) == pytest.approx(-1.0)
    lines = ft.pairing_table(records).splitlines()[2:]
    assert "DoReFa W4" in lines[0] and "needs a uniform 4-bit run" in lines[1]  # clip0 MSQ has no clip0 partner


def test_msq_only_variants_share_the_untagged_budget() -> None:
    assert (
        ft.baseline_tag("msq", "t16", ["--target_compression", "16", "--rewind-weights=true", "--no_hessian"]) is None
    )
    assert ft.baseline_tag("msq", "clip0", ["--max_grad_norm", "0"]) == "clip0"
    assert ft.baseline_tag("msq", "mix", ["--target_compression", "16", "--num_train_epochs", "2"]) == "mix"
    assert ft.baseline_tag("lsq", "t16", ["--target_compression", "16"]) == "t16"  # not an MSQ run
    records = [
        record("float", 0, 0.93),
        record("lsq", 0, 0.90, 3),
        {**record("msq", 0, 0.915, compression=16.0), "tag": "t16", "baseline_tag": None},
        {**record("msq", 0, 0.92), "tag": "clip0", "baseline_tag": "clip0"},
    ]
    groups = ft.group_records(records)
    t16 = next(g for g in groups if g.tag == "t16")
    assert ft.vs_float(t16, groups) == pytest.approx(-1.5)
    clip0 = next(g for g in groups if g.tag == "clip0")
    assert ft.vs_float(clip0, groups) is None  # its budget's float run is missing: not compared with another budget
    lines = {line.split("|")[1].strip(): line for line in ft.pairing_table(records).splitlines()[2:]}
    assert set(lines) == {"resnet18 MSQ [t16]", "resnet18 MSQ [clip0]"}
    assert "LSQ W3" in lines["resnet18 MSQ [t16]"] and "+1.50" in lines["resnet18 MSQ [t16]"]
    assert "needs a uniform 4-bit run" in lines["resnet18 MSQ [clip0]"]


def test_former_msq_result_names_are_migrated(tmp_path) -> None:
    (tmp_path / "resnet18_seed0.json").write_text(json.dumps({"model": "resnet18", "seed": 0, "summary": {}}))
    (tmp_path / "resnet18_seed1.json").write_text(json.dumps({"model": "resnet18", "seed": 1, "summary": {}}))
    (tmp_path / "resnet18_msq_seed1.json").write_text(json.dumps({"kept": True}))  # never overwritten
    moved = finetune_pretrained.migrate_legacy(tmp_path)
    assert [p.name for p in moved] == ["resnet18_msq_seed0.json"]
    migrated = json.loads((tmp_path / "resnet18_msq_seed0.json").read_text())
    assert migrated["method"] == "msq" and migrated["bits"] is None and migrated["seed"] == 0
    assert not (tmp_path / "resnet18_seed0.json").exists()
    assert json.loads((tmp_path / "resnet18_msq_seed1.json").read_text()) == {"kept": True}


def test_plot_draws_seed_zero_of_every_msq_setting(tmp_path, monkeypatch) -> None:
    history = [
        {"step": 8, "avg_bits": 8.0, "pruned": [], "forced": False, "planned_bits": 8.0},
        {"step": 84, "avg_bits": 2.9, "pruned": ["a"], "forced": False, "planned_bits": 3.0},
    ]
    records = [
        {**record("msq", 0, 0.92, compression=11.0, target_compression=10.67), "history": history},
        {**record("msq", 1, 0.92, compression=11.0, target_compression=10.67), "history": history},
        {**record("msq", 0, 0.91, compression=16.2, target_compression=16.0), "history": history, "tag": "x"},
        record("float", 0, 0.92),
    ]
    path = finetune_pretrained.plot(records, tmp_path / "trajectories.png")
    assert path is not None and path.stat().st_size > 0
    drawn = {}
    monkeypatch.setattr(
        msq_hf.report, "plot_pruning_trajectories", lambda runs, path, target_bits: drawn.update(target_bits)
    )
    finetune_pretrained.plot(records, tmp_path / "again.png")
    assert drawn == {"resnet18 default, seed 0": 32 / 10.67, "resnet18 x, seed 0": 2.0}  # each panel its own target
    assert finetune_pretrained.plot([record("float", 0, 0.92)], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_a_rerun_folder_draws_its_own_figures(tmp_path) -> None:
    default = finetune_pretrained.plot_paths(finetune_pretrained.RESULTS)
    assert default == (finetune_pretrained.PLOT, finetune_pretrained.COMPARISON_PLOT)
    trajectories, comparison = finetune_pretrained.plot_paths(tmp_path / "finetune_rerun")
    assert trajectories.name == "finetune_trajectories_finetune_rerun.png"
    assert comparison.name == "finetune_accuracy_vs_ratio_finetune_rerun.png"
    assert trajectories.parent == finetune_pretrained.PLOT.parent


def test_the_comparison_plot_joins_each_msq_setting_across_its_targets(tmp_path) -> None:
    assert [ft.series_tag(t) for t in ("t16-mse", "t16", "t10.67-ac-rewind", "mse", None, "t1x")] == [
        "mse",
        None,
        "ac-rewind",
        "mse",
        None,
        "t1x",
    ]
    tagged = {"baseline_tag": None}
    records = [
        record("float", 0, 0.922),
        record("lsq", 0, 0.921, 4),
        record("lsq", 0, 0.9207, 3),
        record("msq", 0, 0.920),
        {**record("msq", 0, 0.916, compression=16.0), "tag": "t16", **tagged},
        {**record("msq", 0, 0.921, compression=16.0), "tag": "t16-mse", **tagged},
        {**record("msq", 0, 0.910, compression=16.0), "tag": "t16-other", **tagged},  # not a plotted setting
        {**record("lsq", 0, 0.90, 3), "tag": "clip0"},  # another budget
    ]
    points = ft.comparison_points(records, "resnet18", {None: "MSQ", "mse": "MSQ + clipped"})
    got = {(p.method, round(p.paper_ratio, 2)): round(p.accuracy, 2) for p in points}
    assert got == {
        ("float", 1.0): 92.2,
        ("LSQ", 8.0): 92.1,
        ("LSQ", 10.67): 92.07,
        ("MSQ", 10.67): 92.0,
        ("MSQ", 16.0): 91.6,
        ("MSQ + clipped", 16.0): 92.1,
    }
    path = finetune_pretrained.plot_comparison(records, path=tmp_path / "comparison.png")
    assert path is not None and path.stat().st_size > 0
    assert finetune_pretrained.plot_comparison([], path=tmp_path / "none.png") is None


def test_the_table_reads_the_records_of_the_results_dir_it_is_given(tmp_path, capsys) -> None:
    # another float checkpoint's runs live in their own folder; the default folder is not read
    (tmp_path / "resnet18_lsq_w3_seed0.json").write_text(json.dumps(record("lsq", 0, 0.9111, 3)))
    assert finetune_pretrained.main(["--table-only", "--results-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "91.11" in text and "92.07" not in text  # 92.07: the default folder's LSQ W3 mean


def test_the_float_accuracy_comes_from_the_named_pretraining_record(tmp_path) -> None:
    # a re-trained checkpoint's runs name its own record (--float-record); the default is pretrain/<model>.json
    evaluations = [{"test_images": 10000, "test_accuracy": 0.9}, {"test_images": 10000, "test_accuracy": 0.9228}]
    rerun = tmp_path / "resnet18_rerun.json"
    rerun.write_text(json.dumps({"status": "done", "evaluations": evaluations}))
    assert finetune_pretrained.float_accuracy("resnet18", rerun) == 0.9228
    assert finetune_pretrained.float_record_path("resnet18") == finetune_pretrained.PRETRAIN_RESULTS / "resnet18.json"
    rerun.write_text(json.dumps({"status": "running", "evaluations": evaluations}))
    assert finetune_pretrained.float_accuracy("resnet18", rerun) is None  # an unfinished pretraining says nothing
