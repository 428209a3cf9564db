"""benchmarks/scheme_qat.py: the schedule tail it restarts from, the scheme it applies, the final round it finds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS
from transformers import get_cosine_schedule_with_warmup

import msq_hf
from msq_hf.convert import msq_layers
from msq_hf.quant.clip import best_clip_ratio
from msq_hf.quant.functional import max_abs_scale
from msq_hf.training.schedule import compression

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import scheme_qat  # noqa: E402


@pytest.mark.parametrize("step", [0, 3, 8, 84, 156])
def test_cosine_lr_is_the_trainers_schedule(step: int) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=8, num_training_steps=157)
    for _ in range(step):
        optimizer.step()
        schedule.step()
    assert scheme_qat.cosine_lr(step, 157, 0.01, 8) == pytest.approx(schedule.get_last_lr()[0], rel=1e-9, abs=1e-15)


def test_apply_scheme_sets_every_layer_and_names_a_mismatch() -> None:
    model = msq_hf.quantize_model(TINY_MODELS["hf/vit"](), msq_hf.MSQConfig())
    names = list(msq_layers(model))
    scheme = {name: 2 + i % 3 for i, name in enumerate(names)}
    scheme_qat.apply_scheme(model, scheme)
    assert msq_hf.bit_scheme(model) == scheme
    assert all(m.n_k == 0 for m in msq_layers(model).values())
    with pytest.raises(KeyError, match="only in the scheme \\['nowhere'\\].*only in the model \\[" + repr(names[0])):
        scheme_qat.apply_scheme(model, {**{n: 3 for n in names[1:]}, "nowhere": 3})


@pytest.mark.parametrize("qat_grid", ["signmag", "full"])
def test_apply_scheme_starts_the_learned_step_as_msqs_final_round_does(qat_grid: str) -> None:
    config = msq_hf.MSQConfig(qat_scale="learned", qat_grid=qat_grid)
    model = msq_hf.quantize_model(TINY_MODELS["hf/vit"](), config)
    scheme = {name: 1 + i % 3 for i, name in enumerate(msq_layers(model))}
    scheme_qat.apply_scheme(model, scheme, config.qat_scale)
    for name, layer in msq_layers(model).items():
        ratio = best_clip_ratio(layer.weight, scheme[name])
        expected = max_abs_scale(layer.weight) * ratio / 2 ** scheme[name]
        assert layer.learned_step_active and layer.full_grid == (qat_grid == "full")
        assert torch.allclose(layer.weight_step.detach(), expected)
    with pytest.raises(ValueError, match="qat_scale='mse'"):
        scheme_qat.apply_scheme(model, scheme, "mse")


def test_final_round_step_reads_the_history() -> None:
    history = [{"step": 8, "phase": "regularize"}, {"step": 84, "phase": "final"}]
    assert scheme_qat.final_round_step({"history": history}) == 84
    with pytest.raises(ValueError, match="no final round"):
        scheme_qat.final_round_step({"history": history[:1]})


def test_the_uniform_control_keeps_the_layers_and_sets_every_width() -> None:
    record = {"bit_scheme": {"conv1": 3, "layer1.0.conv1": 1, "fc": 2}}
    assert scheme_qat.run_scheme(record) == record["bit_scheme"]
    assert scheme_qat.run_scheme(record, 2) == {"conv1": 2, "layer1.0.conv1": 2, "fc": 2}
    with pytest.raises(ValueError, match="bits"):
        scheme_qat.run_scheme(record, 9)


def test_a_chosen_scheme_must_name_the_records_layers_with_valid_widths(tmp_path: Path) -> None:
    record = {"bit_scheme": {"conv1": 3, "layer1.0.conv1": 1, "fc": 2}}
    chosen = tmp_path / "chosen.json"
    chosen.write_text('{"fc": 8, "conv1": 5, "layer1.0.conv1": 1}')
    assert scheme_qat.run_scheme(record, scheme_file=chosen) == {"conv1": 5, "layer1.0.conv1": 1, "fc": 8}
    chosen.write_text('{"fc": 8, "conv1": 5, "layer9": 1}')
    with pytest.raises(ValueError, match=r"chosen.json.*lacks \['layer1.0.conv1'\], adds \['layer9'\]"):
        scheme_qat.run_scheme(record, scheme_file=chosen)
    chosen.write_text('{"fc": 8, "conv1": 9, "layer1.0.conv1": 1}')
    with pytest.raises(ValueError, match="chosen.json: layer 'conv1'"):
        scheme_qat.run_scheme(record, scheme_file=chosen)
    with pytest.raises(ValueError, match="exclusive"):
        scheme_qat.run_scheme(record, 2, chosen)


def test_the_committed_schemes_fit_the_resnet18_records_at_16x() -> None:
    record = json.loads(
        (ROOT / "benchmarks/results/finetune_rerun/resnet18_msq_t16-learned-full-lsqinit_seed0.json").read_text()
    )
    for path in sorted((ROOT / "benchmarks" / "schemes").glob("resnet18-*.json")):
        scheme = scheme_qat.run_scheme(record, scheme_file=path)
        assert compression(scheme, record["numels"]) >= 16.0, path.name
