"""``torch.compile`` of whole MSQ models: one graph for forward+backward, the eager numbers, no host reads.

The MSQ layers pass their ``bits``/``k`` buffers into the fused quantizer as tensors, so

* ``torch.compile(model, fullgraph=True)`` traces an HF ViT and a timm CNN (forward, the regularizer terms and
  the backward) without a graph break, and a bit-width change is new data: it needs no recompile;
* the compiled step gives the eager logits, regularizer and gradients;
* ``TrainingArguments(torch_compile=True)`` trains with :class:`msq_hf.MSQTrainer` and prunes to the same
  bit scheme as eager training.

Backends: ``aot_eager`` runs dynamo + AOTAutograd (the parts that used to fail: tracing the autograd Function,
the saved tensors, the buffer reads) and then the same aten kernels as eager, so the comparison is exact.
``inductor`` generates its own loops for LayerNorm/softmax/GELU and the weight reductions (other summation
order), so its comparison allows float32 rounding (see ``test_inductor_matches_eager``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conftest import IMAGE_SIZE, NUM_CLASSES, TINY_MODELS, is_hf_model, toy_dataset
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import TrainingArguments

import msq_hf
from msq_hf.convert import iter_msq_layers
from msq_hf.quant.kernels import KERNELS
from msq_hf.training.trainer import MSQTrainer

MODELS = ["hf/vit", "timm/test_resnet"]
LAMBDA = 1e-3


@pytest.fixture(autouse=True)
def _eager_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager side runs the plain eager kernels (no per-layer compile time; the reference numbers)."""
    monkeypatch.setattr(KERNELS, "_state", "eager")
    torch._dynamo.reset()


def _quantized(name: str) -> nn.Module:
    model = TINY_MODELS[name]()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=8))
    _set_scheme(model, offset=0)
    return model.train()


def _set_scheme(model: nn.Module, offset: int) -> None:
    """Mixed bits and k, including regularized (k > 0) and unregularized (k = 0) layers."""
    for i, (_, layer) in enumerate(iter_msq_layers(model)):
        bits = 8 - (i + offset) % 5
        layer.set_bits(bits, min((i + offset) % 3, bits - 1))


def _layers(model: nn.Module) -> list[nn.Module]:
    return [layer for _, layer in iter_msq_layers(getattr(model, "_orig_mod", model))]


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits, summed regularizer and parameter gradients of one training step."""
    inner = getattr(model, "_orig_mod", model)
    for p in inner.parameters():
        p.grad = None
    logits = model(pixel_values=x).logits if is_hf_model(inner) else model(x)
    reg = torch.stack([layer.pop_regularization() for layer in _layers(model)]).sum()
    (F.cross_entropy(logits, y) + LAMBDA * reg).backward()
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    return logits.detach(), reg.detach(), grads


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)


@pytest.mark.parametrize("name", MODELS)
def test_whole_model_compiles_fullgraph_and_equals_eager(name: str) -> None:
    """fullgraph=True (a graph break raises), exact equality with eager, and set_bits needs no recompile."""
    eager = _quantized(name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    for offset in (0, 2):  # a pruning step between the two training steps: other bits and k everywhere
        _set_scheme(eager, offset)
        _set_scheme(compiled_model, offset)
        x, y = _batch(offset)
        ref_logits, ref_reg, ref_grads = _step(eager, x, y)
        logits, reg, grads = _step(compiled, x, y)
        assert torch.equal(logits, ref_logits)
        # R is a sum over each weight tensor: eager and the traced graph reduce in their own order
        torch.testing.assert_close(reg, ref_reg, rtol=1e-6, atol=0)
        assert ref_reg > 0 and grads.keys() == ref_grads.keys()
        for key, ref in ref_grads.items():
            assert torch.equal(grads[key], ref), key
    # bits and k are graph inputs: one forward graph for both schemes (a recompile would count 2)
    assert counter.frame_count == 1


@pytest.mark.parametrize("act_quantizer", ["pact", "lsq", "auto"])
@pytest.mark.parametrize("name", MODELS)
def test_activation_quantized_model_compiles_fullgraph(name: str, act_quantizer: str) -> None:
    """With act_bits (the ViT recipes use 8-bit LSQ) the whole model still traces as one graph, including the
    first batch that fixes each quantizer's sign mode and LSQ step, and equals eager bit for bit."""
    eager = TINY_MODELS[name]()
    msq_hf.quantize_model(eager, msq_hf.MSQConfig(init_bits=8, act_bits=4, act_quantizer=act_quantizer))
    _set_scheme(eager.train(), offset=1)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for seed in (0, 1):  # the first batch initialises the quantizers, the second runs the steady state
        x, y = _batch(seed)
        ref_logits, _, ref_grads = _step(eager, x, y)
        logits, _, grads = _step(compiled, x, y)
        assert torch.equal(logits, ref_logits)
        assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], g) for k, g in ref_grads.items())
    act = [m for m in compiled_model.modules() if hasattr(m, "signed")]
    assert act and all(int(m.signed) in (0, 1) for m in act)


@pytest.mark.parametrize("name", MODELS)
def test_eager_training_step_reads_no_tensor_on_the_host(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``int(t)``/``bool(t)``/``t.item()`` in the training forward+backward (each is a device sync on GPU)."""
    model = _quantized(name)
    x, y = _batch()
    _step(model, x, y)  # first batch: one-time initialisation (act-quantizer modes, warnings) is not per step

    def refuse(self, *args, **kwargs):
        raise AssertionError("host read of a tensor in the training step")

    for method in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    logits = model(pixel_values=x).logits if is_hf_model(model) else model(x)
    reg = torch.stack([layer.pop_regularization() for layer in _layers(model)]).sum()
    (F.cross_entropy(logits, y) + LAMBDA * reg).backward()
    monkeypatch.undo()
    assert reg.item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", range(1, 9))
def test_tensor_bits_quantizer_is_the_export_formula(bits: int, dtype: torch.dtype) -> None:
    """The sync-free quantizer (bits as a tensor) is bit-identical to ``fake_quantize_signmag`` at int bits,
    the formula exports are checked against, in every dtype; so is the fused training kernel's ``W_q``."""
    from msq_hf.quant import functional as QF
    from msq_hf.quant.kernels import fake_quantize, fused_forward_eager, fused_forward_graph

    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(257, generator=g) * 0.3).to(dtype)
    w[:32] = (torch.arange(-16, 16) / 16.0 * w.float().abs().max()).to(dtype)  # ties on the grids
    ref = QF.fake_quantize_signmag(w, bits, QF.max_abs_scale(w))
    b = torch.tensor(bits, dtype=torch.int32)
    assert torch.equal(fake_quantize(w, b), ref)
    k = torch.tensor(min(1, bits - 1), dtype=torch.int32)
    for fused in (fused_forward_eager, fused_forward_graph):
        wq, _, _, _ = fused(w, b, k, True, "step", False)
        assert wq.dtype == dtype and torch.equal(wq, ref), fused.__name__


def test_k_zero_layers_add_nothing_under_compile() -> None:
    """A layer at k = 0 returns R = 0 and the pure straight-through gradient, compiled or not."""
    model = _quantized("hf/vit")
    for _, layer in iter_msq_layers(model):
        layer.set_bits(6, 0)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x, y = _batch()
    _, reg, grads = _step(compiled, x, y)
    assert reg.item() == 0.0
    # with no regularizer the gradient is the STE gradient of the task loss alone
    inner = copy.deepcopy(model)
    logits = inner(pixel_values=x).logits
    for layer in _layers(inner):
        layer.pop_regularization()
    F.cross_entropy(logits, y).backward()
    for n, p in inner.named_parameters():
        assert torch.equal(grads[n], p.grad), n


def test_inductor_matches_eager() -> None:
    """The default backend: same quantized weights (identical rounding), float32-rounding-level differences.

    Inductor fuses LayerNorm, softmax and GELU into its own loops and reduces in another order; over the two
    blocks of the tiny ViT that moves logits and gradients by a few float32 ulps of their magnitude
    (measured ~5e-8 and ~3e-7). The regularizer is a function of the quantized codes only, so its value
    agrees to float32 summation error.
    """
    eager = _quantized("hf/vit")
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x, y = _batch()
    ref_logits, ref_reg, ref_grads = _step(eager, x, y)
    logits, reg, grads = _step(compiled, x, y)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg, ref_reg, rtol=1e-6, atol=0)
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-5, msg=key)


def _train(tmp_path, name: str, compile_backend: str | None) -> tuple[dict[str, int], list[dict]]:
    torch.manual_seed(0)
    model = TINY_MODELS[name]()
    cfg = msq_hf.MSQConfig(
        init_bits=6, target_compression=8.0, reg_strength=1e-3, prune_interval=2, prune_threshold=0.9
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / (compile_backend or "eager")),
        per_device_train_batch_size=8,
        learning_rate=0.01,
        max_steps=6,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        torch_compile=compile_backend is not None,
        torch_compile_backend=compile_backend,
    )
    trainer = MSQTrainer(model=model, args=args, msq_config=cfg, train_dataset=toy_dataset(24))
    trainer.train()
    return msq_hf.bit_scheme(trainer.model), trainer.msq_controller.history


@pytest.mark.parametrize("name", ["hf/vit", "timm/test_resnet"])
def test_trainer_torch_compile_prunes_like_eager(tmp_path, name: str) -> None:
    """``TrainingArguments(torch_compile=True)``: MSQTrainer trains, prunes, and ends with the eager bit scheme."""
    bits_eager, history_eager = _train(tmp_path, name, None)
    torch._dynamo.reset()
    bits_compiled, history_compiled = _train(tmp_path, name, "aot_eager")
    assert bits_compiled == bits_eager
    assert [h.get("pruned") for h in history_compiled] == [h.get("pruned") for h in history_eager]
    assert any(h.get("pruned") for h in history_eager), "the run must prune for the comparison to mean something"
