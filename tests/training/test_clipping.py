"""``qat_scale="mse"``: once the bit scheme is final, each layer's scale is the clipped ``c max|W|`` of least error.

Checked: clipping the latent weights is exactly the clipped scale (the quantized weights are bit-identical), the
search never returns a worse ratio than its candidates or ``c = 1``, an outlier is what gets clipped; in a training
loop the clip happens at the final round (after a rewind, from the rewound weights), lowers every layer's
quantization error at its final bits, is recorded in the history and is refitted every ``prune_interval`` steps
of the QAT phase; the config refuses it with DoReFa's normalization.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import EARLY_FINAL_ROUND, TINY_MODELS, toy_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import msq_hf
from msq_hf.convert import msq_layers
from msq_hf.fields import ConfigFieldError
from msq_hf.quant.clip import COARSE_POINTS, best_clip_ratio, clip_weight_, quantization_error, search_ratio
from msq_hf.quant.functional import fake_quantize_signmag, max_abs_scale
from msq_hf.training.controller import MSQController

torch.set_num_threads(1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(1, 8), outlier=st.floats(1.0, 20.0))
def test_clipping_the_weights_is_the_clipped_scale(seed: int, bits: int, outlier: float) -> None:
    torch.manual_seed(seed)
    w = torch.randn(64, 33)
    w[0, 0] *= outlier
    ratio = best_clip_ratio(w, bits)
    before = fake_quantize_signmag(w, bits, max_abs_scale(w) * ratio)
    clipped = clip_weight_(w.clone(), ratio)
    assert torch.equal(fake_quantize_signmag(clipped, bits, max_abs_scale(clipped)), before)
    error = quantization_error(w, bits, max_abs_scale(w) * ratio)
    assert error <= quantization_error(w, bits, max_abs_scale(w))  # c = 1 is a candidate
    for i in range(COARSE_POINTS):  # and so is every coarse point
        assert error <= quantization_error(w, bits, max_abs_scale(w) * ((i + 1) / COARSE_POINTS))


def test_the_search_finds_the_minimum_of_a_smooth_error_to_the_fine_step() -> None:
    assert search_ratio(lambda c: (c - 0.6137) ** 2) == pytest.approx(0.6137, abs=1.0 / (COARSE_POINTS * 20))
    assert search_ratio(lambda c: 0.0) == 1.0  # ties go to the least clipping


def test_an_outlier_is_clipped_and_a_ratio_outside_zero_one_is_refused() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 64) * 0.05
    w[0, 0] = 1.0  # 20 sigma: at 2 bits the max-based step would round almost every weight to 0
    ratio = best_clip_ratio(w, 2)
    assert ratio < 0.3
    assert quantization_error(w, 2, max_abs_scale(w) * ratio) < 0.3 * quantization_error(w, 2, max_abs_scale(w))
    with pytest.raises(ValueError, match="clip ratio 1.5"):
        clip_weight_(w, 1.5)


def test_the_config_refuses_the_clip_with_dorefa() -> None:
    with pytest.raises(ConfigFieldError, match="qat_scale"):
        msq_hf.MSQConfig(qat_scale="mse", wnorm="dorefa")


def _config(**kw) -> msq_hf.MSQConfig:
    # the first pruning step (step 4) is the forced final round of a 12-step run, then QAT refits at 8 and 12
    return msq_hf.MSQConfig(**{**EARLY_FINAL_ROUND, "qat_scale": "mse", **kw})


def _errors(model: torch.nn.Module) -> dict[str, float]:
    return {
        name: quantization_error(m.weight, m.n_bits, max_abs_scale(m.weight)) for name, m in msq_layers(model).items()
    }


@pytest.mark.parametrize("rewind", [False, True])
def test_the_final_round_clips_and_the_qat_phase_refits(rewind: bool) -> None:
    torch.manual_seed(0)
    model = msq_hf.quantize_model(TINY_MODELS["timm/test_resnet"](), _config(rewind_weights=rewind))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctl = MSQController(model, total_steps=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = toy_batch(8)
    model.train()
    for step in range(1, 13):
        loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"]) + ctl.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 4:  # the weights the final round clips: the start of training after a rewind, else the current
            current = {n: p.detach().clone() for n, p in model.named_parameters()}
            before_all = {n: (start if rewind else current)[f"{n}.weight"] for n in ctl.layers}
        pre = {n: m.weight.detach().clone() for n, m in ctl.layers.items()}
        decision = ctl.maybe_step(step, batch, optimizer=opt)
        if step in (9, 10, 11):  # the QAT phase refits every prune_interval steps only
            assert all(torch.equal(m.weight, pre[n]) for n, m in ctl.layers.items()), step
        if step == 4:
            assert decision is not None and decision.finalized
            for name, layer in ctl.layers.items():
                before = before_all[name]
                error = quantization_error(layer.weight, layer.n_bits, max_abs_scale(layer.weight))
                assert error <= quantization_error(before, layer.n_bits, max_abs_scale(before)) * (1 + 1e-6), name
                assert max_abs_scale(layer.weight) <= max_abs_scale(before), name
            assert any(c < 1 for c in ctl.clip_ratios.values()), "a tiny model at 6x clips some layer"
            assert ctl.history[-1]["clip_ratios"] == ctl.clip_ratios
        if step == 12:  # a refit from the weights the optimizer moved since the final round
            for name, layer in ctl.layers.items():
                assert ctl.clip_ratios[name] == best_clip_ratio(pre[name], layer.n_bits), name
                assert torch.equal(layer.weight, clip_weight_(pre[name], ctl.clip_ratios[name])), name
    assert ctl.history[0]["clip_ratios"] is None  # no clip while bits are being pruned


def test_the_default_keeps_the_max_scale() -> None:
    torch.manual_seed(0)
    model = msq_hf.quantize_model(TINY_MODELS["timm/test_resnet"](), _config(qat_scale="max"))
    ctl = MSQController(model, total_steps=12)
    batch = toy_batch(8)
    for step in range(1, 9):
        ctl.maybe_step(step, batch)
    assert ctl.finalized and ctl.clip_ratios == {} and ctl.history[-1]["clip_ratios"] is None
