"""Hutchinson trace estimator, HAWQ-V2 sensitivity (msq_hf/training/sensitivity.py) and hessian_safe (hessian.py)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from msq_hf.training.hessian import HardSigmoidDD, HardSwishDD, hessian_safe
from msq_hf.training.sensitivity import (
    estimate_sensitivities,
    hawq_sensitivity,
    hutchinson_trace,
    reduce_across_ranks,
)

torch.set_num_threads(1)


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return F.cross_entropy(getattr(out, "logits", out), y)


def double_backward(model: nn.Module, loss: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(gi, p) for gi, p in zip(g, params) if gi is not None and gi.requires_grad]
    torch.autograd.grad(
        [gi for gi, _ in pairs], [p for _, p in pairs], [torch.ones_like(gi) for gi, _ in pairs], allow_unused=True
    )


# ---------------------------------------------------------------------------------------------
# Hutchinson vs the exact Hessian
# ---------------------------------------------------------------------------------------------


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 5)).double()  # 50 weights per layer


def exact_block_traces(model: nn.Module, batch, names: dict[str, str]) -> dict[str, float]:
    """Exact per-layer Hessian trace with torch.autograd.functional.hessian (small models only)."""
    out = {}
    base = {k: v.detach() for k, v in model.named_parameters()}
    for layer, pname in names.items():

        def f(w, pname=pname):
            return ce(lambda x: functional_call(model, {**base, pname: w}, (x,)), batch)

        h = torch.autograd.functional.hessian(f, base[pname])
        n = base[pname].numel()
        out[layer] = float(h.reshape(n, n).diagonal().sum())
    return out


def test_hutchinson_matches_exact_trace_within_4_stderr():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (32,), generator=g))
    names = {"fc1": "0.weight", "fc2": "2.weight"}
    exact = exact_block_traces(model, batch, names)
    params = {"fc1": model[0].weight, "fc2": model[2].weight}
    est = hutchinson_trace(
        lambda: ce(model, batch), params, max_probes=300, tol=0.0, generator=torch.Generator().manual_seed(1)
    )
    assert est.probes == 300 and not est.converged
    for name in params:
        assert est.stderr[name] > 0
        assert abs(est.trace[name] - exact[name]) < 4 * est.stderr[name], (
            name,
            est.trace[name],
            exact[name],
            est.stderr[name],
        )
        # and the estimate is informative (the error bar is small against the value)
        assert est.stderr[name] < 0.2 * abs(exact[name])


def test_hutchinson_exact_for_diagonal_hessian():
    # separable loss: H is diagonal, so z^T H z = tr(H) for every Rademacher z (z_i^2 = 1)
    w1 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)

    def loss():
        return (c * w1**2).sum() + (w2**4).sum() + torch.cos(w2).sum()

    exact1 = float(2 * c.sum())
    exact2 = float((12 * w2.detach() ** 2 - torch.cos(w2.detach())).sum())
    est = hutchinson_trace(loss, {"a": w1, "b": w2}, max_probes=5, min_probes=2, tol=1e-3)
    assert est.trace["a"] == pytest.approx(exact1, rel=1e-12)
    assert est.trace["b"] == pytest.approx(exact2, rel=1e-12)
    assert est.stderr["a"] == pytest.approx(0.0, abs=1e-9) and est.stderr["b"] == pytest.approx(0.0, abs=1e-9)
    # the running mean does not move, so the loop stops at min_probes
    assert est.probes == 2 and est.converged


def test_stopping_rule_and_determinism():
    model = tiny_mlp()
    batch = (torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 5, (16,)))
    params = {"fc1": model[0].weight, "fc2": model[2].weight}
    loose = hutchinson_trace(
        lambda: ce(model, batch),
        params,
        max_probes=50,
        tol=10.0,
        min_probes=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert loose.probes == 3 and loose.converged
    a = hutchinson_trace(
        lambda: ce(model, batch), params, max_probes=20, tol=0.0, generator=torch.Generator().manual_seed(5)
    )
    b = hutchinson_trace(
        lambda: ce(model, batch), params, max_probes=20, tol=0.0, generator=torch.Generator().manual_seed(5)
    )
    c = hutchinson_trace(
        lambda: ce(model, batch), params, max_probes=20, tol=0.0, generator=torch.Generator().manual_seed(6)
    )
    assert a.trace == b.trace and a.trace != c.trace
    assert len(a.history) == 20 and a.history[-1] == pytest.approx(a.total)


def test_hutchinson_never_touches_grad_and_validates():
    model = tiny_mlp()
    batch = (torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,)))
    sentinel = torch.full_like(model[2].weight, 3.0)
    model[2].weight.grad = sentinel
    hutchinson_trace(lambda: ce(model, batch), {"fc1": model[0].weight, "fc2": model[2].weight}, max_probes=3)
    assert model[0].weight.grad is None
    assert model[2].weight.grad is sentinel and bool((sentinel == 3.0).all())
    assert model[0].bias.grad is None
    with pytest.raises(ValueError, match="min_probes"):
        hutchinson_trace(lambda: ce(model, batch), {"fc1": model[0].weight}, max_probes=3, min_probes=0)
    # min_probes above max_probes is clamped, not an error
    assert hutchinson_trace(lambda: ce(model, batch), {"fc1": model[0].weight}, max_probes=2, tol=1e9).probes == 2
    with pytest.raises(ValueError, match="'frozen'"):
        hutchinson_trace(lambda: ce(model, batch), {"frozen": torch.zeros(3)}, max_probes=3)
    with pytest.raises(ValueError, match="scalar"):
        hutchinson_trace(lambda: model(batch[0]), {"fc1": model[0].weight}, max_probes=3)


def test_unused_parameter_gets_zero_trace():
    w = torch.randn(4, requires_grad=True)
    unused = torch.randn(3, requires_grad=True)
    est = hutchinson_trace(lambda: (w**2).sum(), {"w": w, "unused": unused}, max_probes=4)
    assert est.trace["unused"] == 0.0 and est.trace["w"] == pytest.approx(8.0)


# ---------------------------------------------------------------------------------------------
# HAWQ-V2
# ---------------------------------------------------------------------------------------------


def test_hawq_avg_vs_sum():
    w = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([[0.5, -0.5]])}
    q = {"a": torch.tensor([1.0, 2.0, 3.5, 4.0]), "b": torch.tensor([[0.0, 0.0]])}
    tr = {"a": 8.0, "b": 3.0}
    avg = hawq_sensitivity(tr, w, q, "avg")
    total = hawq_sensitivity(tr, w, q, "sum")
    assert avg == pytest.approx({"a": 8.0 / 4 * 0.25, "b": 3.0 / 2 * 0.5})
    assert total == pytest.approx({"a": 8.0 * 0.25, "b": 3.0 * 0.5})
    # the two normalizations can disagree on the ranking (why the choice is a config switch)
    assert (avg["a"] > avg["b"]) != (total["a"] > total["b"])
    assert list(avg) == ["a", "b"]
    with pytest.raises(ValueError, match="normalize"):
        hawq_sensitivity(tr, w, q, "mean")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="'b'"):
        hawq_sensitivity(tr, {"a": w["a"]}, q)


# ---------------------------------------------------------------------------------------------
# estimate_sensitivities
# ---------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.drop(F.softplus(self.bn(self.conv(x)))).flatten(1))


def test_estimate_sensitivities_leaves_model_untouched():
    torch.manual_seed(0)
    model = SmallCNN().train()
    model.conv.weight.requires_grad_(False)  # frozen weights are switched on for the pass and back off
    batch = (torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)))
    bn_before = (model.bn.running_mean.clone(), model.bn.running_var.clone(), int(model.bn.num_batches_tracked))
    layers = {"conv": model.conv, "fc": model.fc}
    qfn = lambda m: torch.round(m.weight * 8) / 8  # noqa: E731
    sens, est = estimate_sensitivities(model, layers, batch, ce, qfn, max_probes=6, seed=3)
    assert set(sens) == {"conv", "fc"} and all(math.isfinite(v) for v in sens.values())
    assert model.training and model.bn.training and model.drop.training
    assert not model.conv.weight.requires_grad and model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.bn.running_mean, bn_before[0]) and torch.equal(model.bn.running_var, bn_before[1])
    assert int(model.bn.num_batches_tracked) == bn_before[2]
    # the trace is that of the eval-mode model (dropout off): identical across two seeded calls
    sens2, est2 = estimate_sensitivities(model, layers, batch, ce, qfn, max_probes=6, seed=3)
    assert sens == sens2 and est.trace == est2.trace
    # and sens = Tr/N * ||Q - W||^2
    for name, mod in layers.items():
        err = float((qfn(mod) - mod.weight).detach().double().pow(2).sum())
        assert sens[name] == pytest.approx(est.trace[name] / mod.weight.numel() * err, rel=1e-9)


def test_estimate_sensitivities_on_msq_layers_default_quantized_weight():
    from msq_hf import quantize_model

    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4))
    batch = (torch.randn(10, 6), torch.randint(0, 4, (10,)))
    import copy

    msq = quantize_model(copy.deepcopy(float_model), init_bits=3)
    layers = {n: m for n, m in msq.named_modules() if hasattr(m, "quantized_weight")}
    assert len(layers) == 2
    sens, est = estimate_sensitivities(msq, layers, batch, ce, max_probes=10, tol=0.0, seed=11)
    # with the straight-through estimator the Hessian w.r.t. W is the float model's Hessian at Q(W):
    # same probes (seed) -> the same estimate
    with torch.no_grad():
        for (_name, layer), ref in zip(layers.items(), (float_model[0], float_model[2])):
            ref.weight.copy_(layer.quantized_weight())
    ref_layers = {"0": float_model[0], "2": float_model[2]}
    _, ref_est = estimate_sensitivities(
        float_model, ref_layers, batch, ce, lambda m: m.weight, max_probes=10, tol=0.0, seed=11
    )
    assert [est.trace[n] for n in layers] == pytest.approx([ref_est.trace[n] for n in ref_layers], rel=1e-4)
    assert all(math.isfinite(v) and (v > 0) == (est.trace[n] > 0) for n, v in sens.items())
    # CE is convex in the logits and the last layer is linear: its Hessian block is PSD
    assert est.trace["2"] > 0 and sens["2"] > 0


def test_estimate_sensitivities_errors_name_the_layer():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(TypeError, match="'act'"):
        estimate_sensitivities(
            model, {"act": model[1]}, (torch.randn(2, 3), torch.tensor([0, 1])), ce, lambda m: m.weight, max_probes=2
        )
    with pytest.raises(TypeError, match="quantized_weight"):
        estimate_sensitivities(model, {"fc": model[0]}, (torch.randn(2, 3), torch.tensor([0, 1])), ce, max_probes=2)


# ---------------------------------------------------------------------------------------------
# hessian_safe on real architectures
# ---------------------------------------------------------------------------------------------


def test_hessian_safe_timm_vit_fused_attention():
    timm = pytest.importorskip("timm")
    assert "test_vit" in timm.list_models("test_*")
    torch.manual_seed(0)
    model = timm.create_model("test_vit.r160_in1k", pretrained=False, num_classes=10, img_size=32).train()
    model.blocks[0].eval()  # a mixed training-flag pattern that must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attns and all(a.fused_attn for a in attns)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))
    with pytest.raises(RuntimeError, match="not implemented"):
        model.eval()
        double_backward(model, ce(model, batch))
    model.train()
    model.blocks[0].eval()
    with hessian_safe(model):
        assert not model.training and not any(a.fused_attn for a in attns)
        double_backward(model, ce(model, batch))
    assert all(a.fused_attn for a in attns)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_hessian_safe_hf_vit_sdpa():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    model = ViTForImageClassification(config)
    assert model.config._attn_implementation == "sdpa"
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([3, 4]))
    model.eval()
    with pytest.raises(RuntimeError, match="not implemented"):
        double_backward(model, ce(model, batch))
    model.train()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with hessian_safe(model):
        assert model.config._attn_implementation == "eager"
        double_backward(model, ce(model, batch))
    assert model.config._attn_implementation == "sdpa" and model.training
    sens, est = estimate_sensitivities(model, layers, batch, ce, lambda m: m.weight.detach().round(), max_probes=4)
    assert len(sens) == len(layers) and all(math.isfinite(v) for v in sens.values())
    assert model.config._attn_implementation == "sdpa"


def test_hessian_safe_sdpa_kernel_alone_suffices_for_math_fallback():
    # a module calling F.scaled_dot_product_attention directly (no config, no fused_attn flag)
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).sum((1, 2, 3))

    torch.manual_seed(0)
    model = Attn()
    x = torch.randn(2, 5, 8)
    loss = lambda: model(x).pow(2).mean()  # noqa: E731
    with pytest.raises(RuntimeError, match="not implemented"):
        double_backward(model, loss())
    with hessian_safe(model):
        double_backward(model, loss())


def test_hessian_safe_mobilenetv3_activations_swapped_and_restored():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10).eval()
    acts = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Hardswish, nn.Hardsigmoid))}
    assert any(isinstance(m, nn.Hardsigmoid) for m in acts.values())
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        double_backward(model, ce(model, batch))
    with torch.no_grad():
        ref = model(batch[0])
    with hessian_safe(model):
        inside = {n: m for n, m in model.named_modules() if isinstance(m, (HardSwishDD, HardSigmoidDD))}
        assert set(inside) == set(acts)
        with torch.no_grad():
            assert torch.allclose(model(batch[0]), ref, atol=1e-6)  # the replacements are exact
        double_backward(model, ce(model, batch))
    after = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Hardswish, nn.Hardsigmoid))}
    assert set(after) == set(acts) and all(after[n] is acts[n] for n in acts)
    assert not any(isinstance(m, (HardSwishDD, HardSigmoidDD)) for m in model.modules())


def test_hessian_safe_disables_autocast_and_restores_on_error():
    model = nn.Sequential(nn.Linear(4, 4)).train()
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        with hessian_safe(model):
            assert model(x).dtype == torch.float32
    with pytest.raises(KeyError), hessian_safe(model):
        raise KeyError("boom")
    assert model.training and model[0].training


# ---------------------------------------------------------------------------------------------
# distributed reduction
# ---------------------------------------------------------------------------------------------


def test_reduce_identity_without_process_group():
    values = {"b": 2.0, "a": 1.5}
    out = reduce_across_ranks(values)
    assert out == values and list(out) == ["b", "a"] and out is not values


def _rank_worker(out_dir: str) -> None:
    # debug_launcher has already initialised a gloo group through a FileStore (no TCP port needed)
    import torch.distributed as dist

    rank = dist.get_rank()
    # insertion order differs between ranks on purpose: the reduction must key by name
    values = {"conv": float(rank), "fc": 10.0 * rank + 1} if rank == 0 else {"fc": 10.0 * rank + 1, "conv": float(rank)}
    out = reduce_across_ranks(values)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"out": out, "order": list(out), "world": dist.get_world_size()}, f)
    dist.barrier()


@pytest.mark.distributed
def test_reduce_across_two_ranks(tmp_path):
    from accelerate import debug_launcher

    debug_launcher(_rank_worker, args=(str(tmp_path),), num_processes=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for _r, res in enumerate(results):
        assert res["world"] == 2
        assert res["out"] == {"conv": 0.5, "fc": 6.0}
    assert results[0]["order"] == ["conv", "fc"] and results[1]["order"] == ["fc", "conv"]
